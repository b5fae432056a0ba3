"""Logging: to the journal through systemd-python when available and running under systemd,
else plain lines on stderr (which systemd also captures). systemd-python is the optional extra
`cyrushelper[journal]`: it adds structured fields (CYRUS_INSTANCE, SYNC_CHANNEL …) to each entry.
"""

from __future__ import annotations

import logging
import os
import sys

try:  # optional: needs libsystemd-dev to build
    from systemd.journal import JournalHandler as _JournalHandler
except ImportError:  # pragma: no cover - depends on the environment
    _JournalHandler = None

_use_stderr = True


def journal_available() -> bool:
    return _JournalHandler is not None


def setup_logging(verbose: bool = False) -> None:
    global _use_stderr
    root = logging.getLogger("cyrushelper")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    under_systemd = bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))
    if under_systemd and _JournalHandler is not None:
        handler = _JournalHandler(SYSLOG_IDENTIFIER="cyrushelper")
        handler.setFormatter(logging.Formatter("%(message)s"))
        _use_stderr = False
    else:
        handler = logging.StreamHandler(sys.stderr)
        # systemd adds its own timestamp; a terminal user gets one from us
        fmt = "%(message)s" if under_systemd else "%(asctime)s cyrushelper: %(message)s"
        handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
        _use_stderr = True
    root.addHandler(handler)


def logs_to_stderr() -> bool:
    return _use_stderr

"""Logging: to the journal through systemd-python when available and running under systemd,
else plain lines on stderr (which systemd also captures). systemd-python is the optional extra
`cyrushelper[journal]`: with it every entry carries CYRUS_INSTANCE=<instance>, and a line about one
sync log channel SYNC_CHANNEL=<channel> (`log.info(..., extra=channel_field(label))`), so that
`journalctl CYRUS_INSTANCE=primary SYNC_CHANNEL=repl2` finds them.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

try:  # optional: needs libsystemd-dev to build
    from systemd.journal import JournalHandler as _JournalHandler
except ImportError:  # pragma: no cover - depends on the environment
    _JournalHandler = None

_use_stderr = True


def journal_available() -> bool:
    return _JournalHandler is not None


def channel_field(label: str) -> dict[str, str]:
    """`extra=` for a log call about one sync log channel."""
    return {"SYNC_CHANNEL": label}


class _InstanceField(logging.Filter):
    def __init__(self, instance: str):
        super().__init__()
        self.instance = instance

    def filter(self, record: logging.LogRecord) -> bool:
        record.CYRUS_INSTANCE = self.instance
        return True


def setup_logging(verbose: bool = False, instance: str | None = None) -> None:
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
    if instance is not None:  # on the handler: a logger's own filters skip its children's records
        handler.addFilter(_InstanceField(instance))
    root.addHandler(handler)


def logs_to_stderr() -> bool:
    return _use_stderr


def also_to_syslog(ident: str, address: str = "/dev/log") -> bool:
    """Copy every record to syslog as well (journald reads /dev/log): a command an operator runs
    in a terminal, such as `switchover`, still leaves its steps in the journal. Standard library
    only, so it works without the systemd-python extra. False when nothing listens there."""
    if not os.path.exists(address):
        return False
    try:
        handler = logging.handlers.SysLogHandler(address=address)
    except OSError:
        return False
    handler.ident = f"{ident}: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("cyrushelper").addHandler(handler)
    return True

"""Logging: to the journal through systemd-python when available and running under systemd,
else plain lines on stderr (which systemd also captures). systemd-python is the optional extra
`cyrushelper[journal]`: with it every entry carries CYRUS_INSTANCE=<instance>, and a line about one
sync log channel SYNC_CHANNEL=<channel> (`log.info(..., extra=channel_field(label))`), so that
`journalctl CYRUS_INSTANCE=primary SYNC_CHANNEL=repl2` finds them. It is imported only under
systemd, where it is used: a command run from a terminal does not pay its ~8 ms of import.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

_use_stderr = True


def _journal_handler_class():
    """systemd-python's JournalHandler, None without the extra. Imported on first use, not with
    this module (an optional dependency, not a cycle: see tests/unit/test_structure.py)."""
    try:
        return importlib.import_module("systemd.journal").JournalHandler
    except ImportError:
        return None


def journal_available() -> bool:
    return _journal_handler_class() is not None


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
    journal_handler = _journal_handler_class() if under_systemd else None
    if journal_handler is not None:
        handler = journal_handler(SYSLOG_IDENTIFIER="cyrushelper")
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
        # imported here, like systemd.journal above: 5-10 ms of every command's start otherwise
        # (the drain's in ExecStopPost too), for the one command that copies to syslog
        handler = importlib.import_module("logging.handlers").SysLogHandler(address=address)
    except OSError:
        return False
    handler.ident = f"{ident}: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("cyrushelper").addHandler(handler)
    return True

"""Logging degrades cleanly without the optional systemd-python extra."""

import logging
import subprocess
import sys

from cyrushelper import journal


def test_stderr_logging_outside_systemd(monkeypatch, capsys):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    journal.setup_logging()
    logging.getLogger("cyrushelper").info("hello %s", "operator")
    assert journal.logs_to_stderr()
    assert "cyrushelper: hello operator" in capsys.readouterr().err


def test_without_systemd_python_under_systemd_logs_plain_lines_to_stderr():
    """Simulate a host without systemd-python: `import systemd` fails, INVOCATION_ID is set."""
    code = ("import sys; sys.modules['systemd'] = None; sys.modules['systemd.journal'] = None\n"
            "from cyrushelper import journal; import logging\n"
            "assert not journal.journal_available()\n"
            "journal.setup_logging(); logging.getLogger('cyrushelper').warning('kept 12 lines')\n"
            "assert journal.logs_to_stderr()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"INVOCATION_ID": "x", "PATH": "/usr/bin:/bin"}, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "kept 12 lines"   # systemd adds its own timestamp


def test_journal_handler_used_when_available_under_systemd(monkeypatch):
    if not journal.journal_available():
        # the extra is optional; CI installs it (scripts/bootstrap.sh: .[journal])
        import os

        import pytest
        if os.environ.get("CI"):
            pytest.fail("CI installs the journal extra (scripts/bootstrap.sh); systemd-python is missing")
        pytest.skip("systemd-python not installed in this environment")
    monkeypatch.setenv("INVOCATION_ID", "x")
    journal.setup_logging()
    assert not journal.logs_to_stderr()
    handlers = logging.getLogger("cyrushelper").handlers
    assert type(handlers[0]).__name__ == "JournalHandler"
    journal.setup_logging()  # idempotent: still one handler
    assert len(logging.getLogger("cyrushelper").handlers) == 1


def test_instance_and_channel_fields_reach_every_record(monkeypatch):
    """journalctl CYRUS_INSTANCE=… SYNC_CHANNEL=… finds the lines: the fields are on the records
    the handler emits, from child loggers too (JournalHandler sends record attributes as fields)."""
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    journal.setup_logging(instance="primary")
    seen = []

    class Capture(logging.Handler):
        def emit(self, record):
            seen.append(record)

    [handler] = logging.getLogger("cyrushelper").handlers
    capture = Capture()
    for f in handler.filters:
        capture.addFilter(f)
    logging.getLogger("cyrushelper").addHandler(capture)
    try:
        logging.getLogger("cyrushelper.drain").info("drained", extra=journal.channel_field("repl2"))
        logging.getLogger("cyrushelper").info("plain")
    finally:
        logging.getLogger("cyrushelper").removeHandler(capture)
    assert [(r.CYRUS_INSTANCE, getattr(r, "SYNC_CHANNEL", None)) for r in seen] == [
        ("primary", "repl2"), ("primary", None)]

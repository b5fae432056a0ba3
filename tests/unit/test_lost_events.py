"""Issue 10, fast loop: seeing events Cyrus acknowledged but could not log, and saying so.

cyruslog (Cyrus's own lines from `journalctl -o json`), the supervisor's judgement of them and of
the sync file system's room, synclog's damaged-line scan and orphans, status's problem lines.
The real thing (a full tmpfs under a real pair in a real systemd) is tests/system/test_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cyrushelper import cyruslog, state, status, synclog
from cyrushelper.config import Instance
from cyrushelper.notify import Notifier
from cyrushelper.supervisor import Options, Supervisor

UNIT = "cyrus@primary.service"


def journal_line(message: str, pid: int = 4242, ident: str = "primary/lmtpd", cursor: str = "c1") -> str:
    return json.dumps({"MESSAGE": message, "_PID": str(pid), "SYSLOG_IDENTIFIER": ident, "__CURSOR": cursor,
                       "__REALTIME_TIMESTAMP": "1796140000000000"})


@pytest.fixture
def instance(tmp_path) -> Instance:
    conf = tmp_path / "config"
    (conf / "sync").mkdir(parents=True)
    imapd = tmp_path / "imapd.conf"
    imapd.write_text(f"configdirectory: {conf}\nsync_log: 1\nsync_host: 127.0.0.1\n")
    cyrus = tmp_path / "cyrus.conf"
    cyrus.write_text(f'SERVICES {{\n  imap cmd="imapd -C {imapd}" listen="13999"\n}}\n')
    return Instance.load(imapd, cyrus, "primary")


# --------------------------------------------------------------------------- what Cyrus says

@pytest.mark.parametrize("message, failure", [
    ("write() to /srv/c/sync/log failed: No space left on device", True),          # lmtpd, 3.6.1
    ("sync_log(): Unable to write to log file /srv/c/sync/log: Permission denied", True),
    ("sync_log(): Failed to lock /srv/c/sync/log for APPEND user.bob: Interrupted", True),
    ("Delivered: <m1@x> to mailbox: user.bob", False),
    ("write() to /srv/c/sync/repl2/log failed: Input/output error", True),
    ("write() to /srv/c/user/b/bob.seen failed: No space left on device", False),  # not a sync log
])
def test_sync_log_failure_lines_are_recognised(message, failure):
    assert cyruslog.parse(journal_line(message)).sync_log_failure is failure


def test_journald_suppression_counts_only_for_our_unit():
    mine = cyruslog.parse(journal_line("Suppressed 812 messages from /system.slice/system-cyrus.slice/"
                                       f"{UNIT}", ident="systemd-journald"))
    other = cyruslog.parse(journal_line("Suppressed 9 messages from /system.slice/cron.service"))
    assert mine.suppressed(UNIT) == 812 and other.suppressed(UNIT) == 0


def test_a_non_utf8_message_comes_as_bytes():
    raw = json.dumps({"MESSAGE": list(b"write() to /x/sync/log failed: \xff"), "_PID": "1", "__CURSOR": "c"})
    assert cyruslog.parse(raw).sync_log_failure
    assert cyruslog.parse("not json") is None


def fake_journalctl(tmp_path: Path, lines: list[str]) -> Path:
    """A journalctl that prints `lines` for --follow (then waits) and for queries, and records calls."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    (bindir / "lines.json").write_text("".join(line + "\n" for line in lines))
    script = bindir / "journalctl"
    script.write_text(f"""#!{sys.executable}
import sys, time
open({str(bindir / 'calls')!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
if "--sync" in sys.argv:
    sys.exit(0)
sys.stdout.write(open({str(bindir / 'lines.json')!r}).read())
sys.stdout.flush()
if "--follow" in sys.argv:
    time.sleep(60)
""")
    script.chmod(0o755)
    return bindir


def test_the_watcher_reports_each_failure_once(tmp_path, monkeypatch):
    lines = [journal_line("write() to /srv/c/sync/log failed: No space left on device", cursor="a"),
             journal_line("Delivered: <m1@x>", cursor="b")]
    bindir = fake_journalctl(tmp_path, lines)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    watcher = cyruslog.Watcher("inv1", UNIT, since=1796140000.0)
    [failure] = watcher.poll()
    assert failure.cursor == "a"
    assert watcher.poll(sync=True) == []  # the overlap shows it again: not reported twice
    calls = (bindir / "calls").read_text().splitlines()
    assert "--since=@1796139995" in calls[0] and "_SYSTEMD_INVOCATION_ID=inv1 PRIORITY=0 PRIORITY=1 PRIORITY=2 PRIORITY=3 + MESSAGE_ID=" in calls[0]
    assert calls[1] == "--sync" and f"--since=@{watcher.since - 5:.0f}"[:12] in calls[2]


class FakeReader:
    """sd-journal as the Watcher uses it: what `query` was asked, and the entries it returns."""

    def __init__(self, entries: list[cyruslog.Entry], fail: bool = False):
        self.entries, self.fail, self.asked = entries, fail, []

    def query(self, matches, since_usec):
        self.asked.append((matches, since_usec))
        if self.fail:
            raise OSError(5, "sd_journal_next: Input/output error")
        return self.entries


def test_the_in_process_reader_is_asked_like_journalctl_and_filtered_like_its_grep(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_journalctl(tmp_path, [])))  # it must not be run
    reader = FakeReader([cyruslog.parse(journal_line("write() to /srv/c/sync/log failed: Read-only file system",
                                                     cursor="a")),
                         cyruslog.parse(journal_line("IOERROR: opening /srv/c/quota: Permission denied", cursor="b"))])
    watcher = cyruslog.Watcher("inv1", UNIT, since=1796140000.0, reader=reader)
    [failure] = watcher.poll()
    assert failure.cursor == "a"
    assert reader.asked == [(cyruslog.invocation_matches("inv1"), 1796139995 * 1_000_000)]
    assert not (tmp_path / "fakebin" / "calls").exists()


def test_a_failing_reader_falls_back_to_journalctl_for_good(tmp_path, monkeypatch):
    bindir = fake_journalctl(tmp_path, [journal_line("write() to /srv/c/sync/log failed: No space left on device")])
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    reader = FakeReader([], fail=True)
    watcher = cyruslog.Watcher("inv1", UNIT, since=1796140000.0, reader=reader)
    assert [e.cursor for e in watcher.poll()] == ["c1"]   # the same poll, through journalctl
    assert watcher.reader is None and "Input/output error" in watcher.reader_failure
    watcher.poll()
    assert len(reader.asked) == 1 and len((bindir / "calls").read_text().splitlines()) == 2


def test_sd_journal_reads_this_machines_journal():
    """libsystemd through ctypes, on whatever journal this machine has (none in CI: no entries);
    an invocation that never ran has no entries either way."""
    reader = cyruslog.sd_journal()
    assert reader is not None, "libsystemd.so.0 could not be loaded"
    assert reader.query(cyruslog.invocation_matches("0" * 32), 0) == []
    every = reader.query([], 0)
    assert all(isinstance(e, cyruslog.Entry) and e.cursor for e in every)


def test_said_by_quotes_the_process_by_pid(tmp_path, monkeypatch):
    bindir = fake_journalctl(tmp_path, [journal_line("Failed to stat /srv/c/sync/log: Permission denied",
                                                     pid=777)])
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert cyruslog.said_by(777, 1796140000.0) == ["Failed to stat /srv/c/sync/log: Permission denied"]
    calls = (bindir / "calls").read_text().splitlines()
    assert calls[0] == "--sync" and "_PID=777" in calls[1]


# --------------------------------------------------------------------------- the supervisor's judgement

def supervisor(instance: Instance) -> Supervisor:
    sup = Supervisor(instance, Options(space_warn=10.0), Notifier())
    sup.unit = UNIT
    return sup


def test_failed_writes_in_the_journal_mark_the_instance_and_show_in_status(instance):
    sup = supervisor(instance)
    entries = [cyruslog.parse(journal_line(f"write() to {instance.imapd.sync_dir}/log failed: No space left "
                                           f"on device", cursor=f"c{i}")) for i in range(3)]
    sup._judge_entries(entries)
    marker = state.sync_log_failure(instance)
    assert marker["evidence"]["lines"] == 3 and "No space left on device" in marker["reason"]
    assert sup.sync_failures == 3
    assert "SYNC LOG WRITE FAILED since " in sup.status_text()
    assert "(3 failed writes reported by Cyrus)" in sup.status_text()


def test_journald_drops_of_our_unit_also_mark(instance):
    sup = supervisor(instance)
    sup._judge_entries([cyruslog.parse(journal_line(f"Suppressed 50 messages from /system.slice/{UNIT}"))])
    assert "suppressed 50 messages" in state.sync_log_failure(instance)["reason"]


def test_space_warning_before_full_and_a_failure_once_full_while_master_runs(instance, monkeypatch):
    sup = supervisor(instance)
    rooms = iter([synclog.Room("s", 50 << 20, 100 << 20, 1000, 2000, False),
                  synclog.Room("s", 5 << 20, 100 << 20, 1000, 2000, False),
                  synclog.Room("s", 0, 100 << 20, 1000, 2000, False),
                  synclog.Room("s", 0, 100 << 20, 1000, 2000, False),
                  synclog.Room("s", 50 << 20, 100 << 20, 1000, 2000, False)])
    monkeypatch.setattr(synclog, "room", lambda path: next(rooms))
    sup.master = subprocess.Popen(["sleep", "30"])
    try:
        sup.check_space()
        assert "space" not in sup.notes
        sup.check_space()
        assert sup.notes["space"] == "sync file system low: default 5% free"
        assert state.sync_log_failure(instance) is None  # a warning, not yet a failure
        sup.check_space()
        sup.check_space()  # still full: the same episode, one marker event
        assert sup.notes["space"] == "sync file system low: default FULL"
        assert state.sync_log_failure(instance)["events"] == 1
        sup.check_space()
        assert "space" not in sup.notes
    finally:
        sup.master.kill()
        sup.master.wait()


def test_no_journal_is_said_once(instance, monkeypatch, caplog):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    sup = supervisor(instance)
    sup._open_journal()
    assert sup.journal is None
    assert "no journal to read" in caplog.text


# --------------------------------------------------------------------------- status names each problem

def test_status_names_every_problem(instance):
    state.record_sync_log_failure(instance, "Cyrus reported a failed sync log write: lmtpd[1]: write() to x "
                                            "failed: No space left on device")
    sync = instance.imapd.sync_dir
    (sync / "log").write_bytes(b"APPEND user.a\nMAILBOX user")
    (sync / "repl2").mkdir()
    (sync / "repl2" / "log").write_bytes(b"APPEND user.a\n" * 128)
    report = status.collect(instance, probe=False)
    text = "\n".join(report["problems"])
    assert "sync log events may be missing" in text and "No space left on device" in text
    assert f"{sync / 'log'}:2: cut off (no newline at the end of the file): 'MAILBOX user'" in text
    assert f"orphaned channel repl2: 128 lines in {sync / 'repl2'}" in text
    assert report["exit_code"] == status.NOT_RUNNING  # not running: 3, but the problems are listed
    assert "PROBLEM: orphaned channel repl2" in status.format_text(report)
    state.clear_reconcile_markers(instance, by="test")
    assert "sync log events may be missing" not in "\n".join(status.collect(instance, probe=False)["problems"])


def test_orphaned_default_channel_when_only_named_channels_are_listed(tmp_path):
    conf = tmp_path / "config"
    (conf / "sync").mkdir(parents=True)
    (conf / "sync" / "log").write_text("APPEND user.a\n")
    (conf / "sync" / "shutdown").write_text("")  # a sync_shutdown_file is not a channel
    imapd = tmp_path / "imapd.conf"
    imapd.write_text(f"configdirectory: {conf}\nsync_log: 1\nsync_log_channels: repl1\nrepl1_sync_host: r\n")
    cyrus = tmp_path / "cyrus.conf"
    cyrus.write_text(f'SERVICES {{\n  imap cmd="imapd -C {imapd}" listen="13999"\n}}\n')
    [orphan] = synclog.orphaned_channels(Instance.load(imapd, cyrus))
    assert (orphan.label, orphan.lines, orphan.files) == ("default", 1, ("log",))


def test_scan_of_a_fifo_never_opens_it_for_reading(tmp_path):
    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    assert synclog.scan(fifo) == [] and synclog.count_lines(fifo) == 0
    assert synclog.file_kind(fifo) == "a FIFO"


def test_journal_directories_are_the_machine_id_directories_of_existing_bases(tmp_path):
    machine = "0123456789abcdef0123456789abcdef"
    (tmp_path / "machine-id").write_text(machine + "\n")
    (tmp_path / "run").mkdir()
    bases = (str(tmp_path / "run"), str(tmp_path / "var"))   # volatile storage only
    assert cyruslog.journal_directories(bases, str(tmp_path / "machine-id")) == [tmp_path / "run" / machine]
    (tmp_path / "machine-id").write_text("uninitialized\n")
    assert cyruslog.journal_directories(bases, str(tmp_path / "machine-id")) == []

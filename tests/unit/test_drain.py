"""`cyrushelper drain` against a FAKE sync_client that follows Cyrus 3.6's `-R -1` file protocol.

The fake (written into a temp bin dir, found through CYRUSHELPER_CYRUS_BINDIR or `bindir=`):
takes `log-run` if present, else renames `log` to `log-run`, "replicates" it by appending its
bytes to `{configdirectory}/replica-<channel>.txt`, unlinks it and exits 0 — the same steps as
imap/sync_log.c. FAKE_SYNC_MODE (or FAKE_SYNC_MODE_<channel>) makes it misbehave like the real
one does: `down` prints Cyrus's "Can not connect" line and retries forever, `silent` hangs
without a word, `fail` leaves log-run and still exits 0, `flaky:N` fails the first N runs,
`slow:S` sleeps S seconds holding log-run, `fatal` exits 78 like a Cyrus config refusal.
Like the real one, a present sync_shutdown_file makes it exit at once and deletes the file.
The real thing is covered by tests/system/test_drain.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cyrushelper import drain as drain_mod
from cyrushelper import channels, exitcodes, state
from cyrushelper.config import Instance
from cyrushelper.locks import ChannelLock, LockBusy, channel_lock_path
from cyrushelper.notify import Notifier, Pulse
from tests.bounds import upper

FAKE_SYNC_CLIENT = r'''#!@PYTHON@
import os, sys, time
args = sys.argv[1:]
opts, i = {}, 0
while i < len(args):
    a = args[i]
    if a in ("-C", "-n", "-F", "-f"):
        opts[a] = args[i + 1]; i += 2
    else:
        opts[a] = True; i += 1
conf = {}
for line in open(opts["-C"]):
    if ":" in line and not line.startswith("#"):
        k, v = line.split(":", 1); conf[k.strip()] = v.strip()
confdir = conf["configdirectory"]
chan = opts.get("-n")
label = chan or "default"
sync_dir = os.path.join(confdir, "sync", chan) if chan else os.path.join(confdir, "sync")
with open(os.path.join(confdir, "fake-calls.log"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + " notify=%s pid=%d\n" % ("NOTIFY_SOCKET" in os.environ, os.getpid()))
mode = os.environ.get("FAKE_SYNC_MODE_" + label) or os.environ.get("FAKE_SYNC_MODE", "ok")
if "-A" in opts:              # a reconcile: "all users" re-synced, or failed (exit 1, like Cyrus)
    sys.exit(1 if mode == "reconcile-fails" else 0)
if "-1" not in opts:          # a "rolling" client, used to test detection: just stay alive
    time.sleep(60); sys.exit(0)
if mode == "down":
    sys.stderr.write("Can not connect to server '%s', retrying in 15 seconds\n" % conf.get("sync_host"))
    sys.stderr.flush()
    while True: time.sleep(15)
if mode == "silent":
    while True: time.sleep(15)
if mode == "fatal":
    sys.stderr.write("Fatal error: sync_host not defined\n"); sys.exit(78)
shutdown = opts.get("-F") or conf.get(chan + "_sync_shutdown_file" if chan else "sync_shutdown_file")
if shutdown and os.path.exists(shutdown):
    os.unlink(shutdown); sys.exit(0)
if mode.startswith("flaky:"):
    counter = os.path.join(confdir, "flaky-" + label)
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    mode = "fail" if n < int(mode.split(":")[1]) else "ok"
work, log = os.path.join(sync_dir, "log-run"), os.path.join(sync_dir, "log")
if not os.path.exists(work):
    if not os.path.exists(log):
        sys.exit(0)
    os.rename(log, work)
if mode == "fail":
    sys.exit(0)               # like Cyrus: batch failed, log-run left, exit code 0
if mode.startswith("slow:"):
    time.sleep(float(mode.split(":")[1]))
data = open(work, "rb").read()
with open(os.path.join(confdir, "replica-" + label + ".txt"), "ab") as f:
    f.write(data)
os.unlink(work)
'''


class FakeCyrus:
    """An imapd.conf/cyrus.conf pair with sync dirs, and the fake sync_client in a bin dir."""

    def __init__(self, tmp_path: Path, channels: str | None = None, extra: str = "",
                 sync_port: int | None = None):
        self.root = tmp_path
        self.confdir = tmp_path / "config"
        self.bindir = tmp_path / "bin"
        self.bindir.mkdir()
        (self.confdir / "sync").mkdir(parents=True)
        self.sync_port = sync_port or _closed_port()
        lines = [f"configdirectory: {self.confdir}", "sync_log: 1", "sync_host: 127.0.0.1",
                 f"sync_port: {self.sync_port}"]
        if channels is not None:
            lines.append(f"sync_log_channels: {channels}")
        self.imapd_conf = tmp_path / "imapd.conf"
        self.imapd_conf.write_text("\n".join(lines) + "\n" + extra)
        self.cyrus_conf = tmp_path / "cyrus.conf"
        self.cyrus_conf.write_text(f'SERVICES {{\n  imap cmd="imapd -C {self.imapd_conf}" listen="13999"\n}}\n')
        fake = self.bindir / "sync_client"
        fake.write_text(FAKE_SYNC_CLIENT.replace("@PYTHON@", sys.executable))
        fake.chmod(0o755)

    def instance(self) -> Instance:
        return Instance.load(self.imapd_conf, self.cyrus_conf)

    def sync_dir(self, channel: str | None = None) -> Path:
        d = self.confdir / "sync" / channel if channel else self.confdir / "sync"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write(self, name: str, events: list[str], channel: str | None = None) -> bytes:
        data = "".join(e + "\n" for e in events).encode()
        (self.sync_dir(channel) / name).write_bytes(data)
        return data

    def replica(self, channel: str = "default") -> bytes:
        p = self.confdir / f"replica-{channel}.txt"
        return p.read_bytes() if p.exists() else b""

    def calls(self) -> list[str]:
        p = self.confdir / "fake-calls.log"
        return p.read_text().splitlines() if p.exists() else []

    def snapshot(self, channel: str | None = None) -> dict[str, bytes]:
        d = self.sync_dir(channel)
        return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}

    def drain(self, **kw):
        kw.setdefault("bindir", self.bindir)
        kw.setdefault("deadline", 20)
        return drain_mod.drain(self.instance(), **kw)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def events(prefix: str, n: int) -> list[str]:
    return [f"APPEND user.{prefix}{i}" for i in range(n)]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_SYNC_MODE", raising=False)
    return FakeCyrus(tmp_path)


def assert_no_fake_alive(fake: FakeCyrus):
    for line in fake.calls():
        pid = int(line.rsplit("pid=", 1)[1])
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state == "Z", f"fake sync_client {pid} still running"


# --------------------------------------------------------------------------- happy paths

def test_log_run_before_log_then_both_gone(fake):
    older = fake.write("log-run", events("old", 3))
    newer = fake.write("log", events("new", 5))
    report = fake.drain()
    assert report.exit_code == exitcodes.OK
    assert fake.replica() == older + newer  # log-run replayed first
    assert fake.snapshot() == {}
    [ch] = report.channels
    assert (ch.result, ch.lines_before, ch.lines_after, ch.runs) == ("drained", 8, 0, 2)
    for call in fake.calls():
        assert call.startswith(f"-C {fake.imapd_conf} -F {drain_mod.NO_SHUTDOWN_FILE} -R -1")
        assert "-n" not in call.split()
    assert_no_fake_alive(fake)


def test_nothing_pending_runs_no_sync_client(fake):
    """sync_client -R -1 connects even with nothing to do: don't start it for nothing."""
    report = fake.drain()
    assert report.exit_code == exitcodes.OK
    assert fake.calls() == []


def test_sync_shutdown_file_is_neither_obeyed_nor_consumed(tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_SYNC_MODE", raising=False)
    shutdown = tmp_path / "sync-shutdown"
    fake = FakeCyrus(tmp_path, extra=f"sync_shutdown_file: {shutdown}\n")
    shutdown.write_text("")
    data = fake.write("log", events("a", 4))
    assert fake.drain().exit_code == exitcodes.OK
    assert fake.replica() == data
    assert shutdown.exists()


def test_flaky_batch_is_retried(fake, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE", "flaky:2")
    data = fake.write("log", events("a", 10))
    report = fake.drain()
    assert report.exit_code == exitcodes.OK
    assert fake.replica() == data
    assert report.channels[0].runs == 3


def test_state_file_records_the_last_drain(fake):
    fake.write("log", events("a", 2))
    report = fake.drain()
    saved = json.loads((fake.confdir / "cyrushelper" / "last-drain.json").read_text())
    assert saved["exit_code"] == 0 and saved["result"] == "drained"
    assert saved["channels"][0]["lines_before"] == 2
    assert saved == state.last_drain(fake.instance()) == json.loads(json.dumps(report.to_json()))
    assert not [p for p in (fake.confdir / "cyrushelper").iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- legacy log-<pid>

def test_legacy_files_are_replayed_then_removed(fake):
    run = fake.write("log-run", events("run", 2))
    legacy = fake.write("log-4242", events("legacy", 3))
    log = fake.write("log", events("log", 4))
    report = fake.drain()
    assert report.exit_code == exitcodes.OK
    assert report.channels[0].lines_before == 9
    assert fake.snapshot() == {}
    # log-run first (Cyrus's own order), legacy adopted as the next log-run once the replica answered
    assert fake.replica() == run + log + legacy or fake.replica() == run + legacy + log
    assert sorted(fake.replica().splitlines()) == sorted((run + legacy + log).splitlines())


def test_legacy_only_is_adopted_after_the_replica_answered(fake):
    legacy = fake.write("log-99", events("legacy", 3))
    report = fake.drain()
    assert report.exit_code == exitcodes.OK
    assert fake.replica() == legacy
    assert fake.snapshot() == {}
    assert report.channels[0].runs == 2  # one probe run, one replay


def test_legacy_kept_untouched_when_replica_down(fake, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE", "down")
    fake.write("log-99", events("legacy", 3))
    fake.write("log", events("log", 2))
    before = fake.snapshot()
    report = fake.drain()
    assert report.exit_code == exitcodes.REPLICA_UNREACHABLE
    assert fake.snapshot() == before


def test_legacy_kept_when_its_replay_fails(fake, monkeypatch):
    legacy = fake.write("log-99", events("legacy", 3))
    monkeypatch.setenv("FAKE_SYNC_MODE", "flaky:100")  # every run fails after the probe
    report = fake.drain()
    assert report.exit_code == exitcodes.SYNC_FAILED
    # the events are still there, as Cyrus's log-run (replayed by the next drain or start)
    assert b"".join(fake.snapshot().values()) == legacy
    assert report.channels[0].lines_after == 3


# --------------------------------------------------------------------------- failures keep everything

def test_replica_down_exits_69_fast_files_identical(fake, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_SYNC_MODE", "down")
    fake.write("log-run", events("old", 3))
    fake.write("log", events("new", 7))
    before = fake.snapshot()
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="cyrushelper"):
        report = fake.drain(deadline=30)
    assert time.monotonic() - t0 < 30 / 2   # did not wait for the deadline
    assert report.exit_code == exitcodes.REPLICA_UNREACHABLE
    assert fake.snapshot() == before
    [ch] = report.channels
    assert (ch.result, ch.lines_before, ch.lines_after) == ("unreachable", 10, 10)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "channel default" in errors[0] and "10 lines kept" in errors[0]
    assert f"127.0.0.1:{fake.sync_port}" in errors[0] and "unreachable" in errors[0]
    assert_no_fake_alive(fake)


def test_silent_replica_and_closed_port_is_unreachable_at_deadline(fake, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE", "silent")
    fake.write("log", events("a", 3))
    before = fake.snapshot()
    t0 = time.monotonic()
    report = fake.drain(deadline=1.0)
    assert time.monotonic() - t0 < upper(1.0 + drain_mod.KILL_GRACE)
    assert report.exit_code == exitcodes.REPLICA_UNREACHABLE
    assert fake.snapshot() == before
    assert_no_fake_alive(fake)


@pytest.fixture
def listening_fake(tmp_path, monkeypatch):
    """A FakeCyrus whose sync_port accepts TCP connections (a replica that is there but slow/mute)."""
    monkeypatch.delenv("FAKE_SYNC_MODE", raising=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    yield FakeCyrus(tmp_path, sync_port=listener.getsockname()[1])
    listener.close()


def test_silent_replica_with_open_port_is_a_deadline(listening_fake, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE", "silent")
    listening_fake.write("log", events("a", 3))
    before = listening_fake.snapshot()
    report = listening_fake.drain(deadline=1.0)
    assert report.exit_code == exitcodes.DEADLINE
    assert listening_fake.snapshot() == before


def test_batch_failure_with_exit_0_is_sync_failed(fake, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE", "fail")
    data = fake.write("log", events("a", 6))
    report = fake.drain()
    assert report.exit_code == exitcodes.SYNC_FAILED
    assert fake.snapshot() == {"log-run": data}  # renamed by "Cyrus", never deleted
    [ch] = report.channels
    assert (ch.runs, ch.lines_after) == (drain_mod.MAX_FAILED_RUNS, 6)


def test_slow_replica_past_deadline_keeps_log_run(listening_fake, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE", "slow:30")
    data = listening_fake.write("log", events("a", 5))
    t0 = time.monotonic()
    report = listening_fake.drain(deadline=1.0)
    assert time.monotonic() - t0 < upper(1.0 + drain_mod.KILL_GRACE)
    assert report.exit_code == exitcodes.DEADLINE
    assert listening_fake.snapshot() == {"log-run": data}
    assert_no_fake_alive(listening_fake)


def test_cyrus_config_refusal_is_78(fake, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE", "fatal")
    data = fake.write("log", events("a", 1))
    report = fake.drain()
    assert report.exit_code == exitcodes.CONFIG
    assert fake.snapshot() == {"log": data}
    assert "sync_host not defined" in report.channels[0].message


def test_missing_sync_client_fails_only_with_work_pending(fake, tmp_path):
    empty_bin = tmp_path / "nobin"
    empty_bin.mkdir()
    assert fake.drain(bindir=empty_bin).exit_code == exitcodes.OK
    fake.write("log", events("a", 1))
    assert fake.drain(bindir=empty_bin).exit_code == exitcodes.CONFIG


# --------------------------------------------------------------------------- one drainer per channel

def test_lock_held_by_another_drainer_gives_73(fake):
    data = fake.write("log", events("a", 2))
    other = ChannelLock(channel_lock_path(fake.confdir, None))
    other.acquire()
    try:
        t0 = time.monotonic()
        report = fake.drain(lock_wait=0.3)
        assert time.monotonic() - t0 < upper(0.3)
    finally:
        other.release()
    assert report.exit_code == exitcodes.LOCKED
    assert str(os.getpid()) in report.channels[0].message
    assert fake.snapshot() == {"log": data} and fake.calls() == []


def test_lock_released_during_wait_lets_the_drain_go_on(fake):
    data = fake.write("log", events("a", 2))
    other = ChannelLock(channel_lock_path(fake.confdir, None))
    other.acquire()
    threading.Timer(0.3, other.release).start()
    report = fake.drain(lock_wait=5)
    assert report.exit_code == exitcodes.OK
    assert fake.replica() == data


def test_rolling_sync_client_on_the_channel_gives_73(fake, monkeypatch):
    data = fake.write("log", events("a", 2))
    rolling = subprocess.Popen([str(fake.bindir / "sync_client"), "-C", str(fake.imapd_conf), "-r"])
    try:
        for _ in range(100):  # until the interpreter shows up with its script name
            if channels.find_sync_readers(fake.imapd_conf, None):
                break
            time.sleep(0.02)
        assert [pid for pid, _ in channels.find_sync_readers(fake.imapd_conf, None)] == [rolling.pid]
        assert channels.find_sync_readers(fake.imapd_conf, "other") == []
        report = fake.drain(lock_wait=0.3)
    finally:
        rolling.kill()
        rolling.wait()
    assert report.exit_code == exitcodes.LOCKED
    assert f"PID {rolling.pid}" in report.channels[0].message
    assert fake.snapshot() == {"log": data}
    assert fake.drain().exit_code == exitcodes.OK


def test_lock_outlives_a_killed_drainer_while_its_sync_client_runs(fake, monkeypatch):
    """flock is handed to sync_client: killing cyrushelper must not let a second reader in."""
    fake.write("log", events("a", 2))
    env = {**os.environ, "FAKE_SYNC_MODE": "slow:3", "CYRUSHELPER_CYRUS_BINDIR": str(fake.bindir)}
    drainer = subprocess.Popen([sys.executable, "-m", "cyrushelper", "drain", "-C", str(fake.imapd_conf),
                                "-M", str(fake.cyrus_conf)], env=env, stderr=subprocess.DEVNULL)
    lock = ChannelLock(channel_lock_path(fake.confdir, None))
    try:
        for _ in range(200):
            if fake.calls():
                break
            time.sleep(0.02)
        assert fake.calls(), "sync_client never started"
        drainer.kill()
        drainer.wait()
        with pytest.raises(LockBusy):
            lock.acquire(wait=0)
        lock.acquire(wait=10)  # free once the orphaned sync_client finished its run
    finally:
        lock.release()
        if drainer.poll() is None:
            drainer.kill()
    assert fake.snapshot() == {}


# --------------------------------------------------------------------------- channels

@pytest.fixture
def multi(tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_SYNC_MODE", raising=False)
    return FakeCyrus(tmp_path, channels='"" repl2 squatter')


def test_every_channel_drained_with_n(multi):
    d = multi.write("log", events("d", 3))
    r = multi.write("log", events("r", 4), channel="repl2")
    report = multi.drain()
    assert report.exit_code == exitcodes.OK
    assert multi.replica("default") == d and multi.replica("repl2") == r
    assert any(" -n repl2 " in c for c in multi.calls())
    assert {c.channel: c.result for c in report.channels} == {"default": "drained", "repl2": "drained",
                                                              "squatter": "drained"}


def test_squatter_channel_is_left_alone(multi):
    s = multi.write("log", events("s", 2), channel="squatter")
    report = multi.drain()
    assert report.exit_code == exitcodes.OK
    assert multi.snapshot("squatter") == {"log": s}
    squatter = [c for c in report.channels if c.channel == "squatter"][0]
    assert (squatter.result, squatter.lines_after) == ("skipped", 2)


def test_one_channel_down_others_drained(multi, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE_repl2", "down")
    d = multi.write("log", events("d", 3))
    multi.write("log", events("r", 4), channel="repl2")
    before = multi.snapshot("repl2")
    report = multi.drain()
    assert report.exit_code == exitcodes.REPLICA_UNREACHABLE
    assert multi.replica("default") == d
    assert multi.snapshot("repl2") == before
    assert {c.channel: c.result for c in report.channels}["repl2"] == "unreachable"


def test_channel_filter(multi):
    d = multi.write("log", events("d", 3))
    r = multi.write("log", events("r", 4), channel="repl2")
    report = multi.drain(channels=["repl2"])
    assert [c.channel for c in report.channels] == ["repl2"]
    assert multi.replica("repl2") == r and multi.snapshot() == {"log": d}


def test_unknown_channel_is_a_config_error(multi):
    from cyrushelper.config import ConfigError
    with pytest.raises(ConfigError, match="nope"):
        multi.drain(channels=["nope"])


def test_exit_code_precedence(multi, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE_default", "fail")
    monkeypatch.setenv("FAKE_SYNC_MODE_repl2", "down")
    multi.write("log", events("d", 1))
    multi.write("log", events("r", 1), channel="repl2")
    assert multi.drain().exit_code == exitcodes.REPLICA_UNREACHABLE


# --------------------------------------------------------------------------- progress + systemd

def test_progress_reports_lines_left_and_extends(fake, monkeypatch):
    monkeypatch.setenv("FAKE_SYNC_MODE", "slow:1.2")
    fake.write("log", events("a", 7))
    notifier = Notifier()
    pulse = Pulse(notifier, extend=30, interval=0.5)
    assert fake.drain(progress=pulse).exit_code == exitcodes.OK
    statuses = [m for m in notifier.sent if "STATUS=" in m]
    assert any("STATUS=drain: default=7 lines left" in m for m in statuses)
    assert "STATUS=drain done: default=0 lines left" in notifier.sent[-1]
    assert sum("EXTEND_TIMEOUT_USEC=30000000" in m for m in notifier.sent) >= 2


def _cli(fake: FakeCyrus, *args, env=None, timeout=60):
    full_env = {**os.environ, "CYRUSHELPER_CYRUS_BINDIR": str(fake.bindir), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cyrushelper", "drain", "-C", str(fake.imapd_conf),
                           "-M", str(fake.cyrus_conf), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def test_cli_json_summary(fake):
    fake.write("log", events("a", 4))
    r = _cli(fake, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    [ch] = data["channels"]
    assert (data["exit_code"], ch["result"], ch["lines_before"], ch["lines_after"]) == (0, "drained", 4, 0)
    assert ch["seconds"] >= 0 and ch["replica"] == f"127.0.0.1:{fake.sync_port}"


def test_cli_replica_down_exit_code_and_one_line(fake):
    fake.write("log", events("a", 4))
    r = _cli(fake, "--json", env={"FAKE_SYNC_MODE": "down"})
    assert r.returncode == exitcodes.REPLICA_UNREACHABLE
    assert json.loads(r.stdout)["channels"][0]["result"] == "unreachable"
    lines = [l for l in r.stderr.splitlines() if "unreachable" in l]
    assert len(lines) == 1 and "4 lines kept" in lines[0]


def test_cli_from_systemd_logs_service_result_and_notifies(fake, tmp_path):
    fake.write("log", events("a", 3))
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    try:
        r = _cli(fake, "--from-systemd", env={"NOTIFY_SOCKET": str(sock_path), "SERVICE_RESULT": "timeout",
                                              "EXIT_CODE": "killed", "EXIT_STATUS": "KILL",
                                              "FAKE_SYNC_MODE": "slow:0.6"})
        sock.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        sock.close()
    # the logs are replayed, but a killed unit may have lost events no replay recovers: no all-clear
    assert r.returncode == exitcodes.RECONCILE_NEEDED, r.stderr
    assert "SERVICE_RESULT=timeout EXIT_CODE=killed EXIT_STATUS=KILL" in r.stderr
    assert "did not stop cleanly" in r.stderr
    assert "not a clean drain until a reconcile succeeds" in r.stderr
    assert any("EXTEND_TIMEOUT_USEC=" in m for m in messages)
    assert any("STATUS=drain: default=3 lines left" in m for m in messages)
    assert all("notify=False" in c for c in fake.calls()), "NOTIFY_SOCKET leaked to sync_client"


def test_cli_sigterm_kills_sync_client_and_keeps_events(fake):
    data = fake.write("log", events("a", 2))
    env = {**os.environ, "FAKE_SYNC_MODE": "slow:30", "CYRUSHELPER_CYRUS_BINDIR": str(fake.bindir)}
    p = subprocess.Popen([sys.executable, "-m", "cyrushelper", "drain", "-C", str(fake.imapd_conf),
                          "-M", str(fake.cyrus_conf)], env=env, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if fake.calls():
            break
        time.sleep(0.02)
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=10)
    assert p.returncode == exitcodes.DEADLINE, err
    assert "interrupted" in err
    assert fake.snapshot() == {"log-run": data}
    assert_no_fake_alive(fake)


def test_cli_bad_arguments(fake):
    assert _cli(fake, "--deadline", "0").returncode == exitcodes.USAGE
    assert _cli(fake, "--channel", "nope").returncode == exitcodes.CONFIG


# --------------------------------------------------------------------------- pieces

@pytest.mark.parametrize("argv, expected", [
    (["sync_client", "-C", "/c", "-r"], {"C": "/c", "r": True}),
    (["sync_client", "-rv", "-n", "ch"], {"r": True, "v": True, "n": "ch"}),
    (["sync_client", "-nch", "-C/c", "-R", "-1"], {"n": "ch", "C": "/c", "R": True, "1": True}),
    (["sync_client", "-x"], None),
    (["sync_client", "-n"], None),
    (["sync_client", "-A", "--", "-r"], {"A": True}),
])
def test_parse_sync_client_argv(argv, expected):
    assert channels.read_options(argv[1:], channels.SYNC_CLIENT_SHORT, channels.SYNC_CLIENT_LONG) == expected


def test_channel_lock_bounded_wait(tmp_path):
    path = channel_lock_path(tmp_path, "repl2")
    assert path == tmp_path / "cyrushelper" / "drain.repl2.lock"
    assert channel_lock_path(tmp_path, None).name == "drain.lock"
    a, b = ChannelLock(path), ChannelLock(path)
    a.acquire()
    t0 = time.monotonic()
    with pytest.raises(LockBusy) as e:
        b.acquire(wait=0.3)
    assert 0.3 <= time.monotonic() - t0 < upper(0.3)
    assert e.value.holder == os.getpid()
    a.release()
    b.acquire(wait=0)
    b.release()


# --------------------------------------------------------------------------- review fixes

def test_pending_events_without_sync_host_is_a_config_error_not_success(tmp_path):
    """A channel whose <chan>_sync_host is missing (or misspelled) must not end 'drained'/0."""
    from cyrushelper.config import Instance
    from cyrushelper.drain import drain
    conf = tmp_path / "imapd.conf"
    cdir = tmp_path / "config"
    (cdir / "sync" / "repl2").mkdir(parents=True)
    conf.write_text(f"configdirectory: {cdir}\npartition-default: {tmp_path / 'spool'}\nsync_log: 1\n"
                    "sync_log_channels: repl2\nrepl2_sync_hots: 127.0.0.1\n")
    cyrus = tmp_path / "cyrus.conf"
    cyrus.write_text("SERVICES {\n  imap cmd=\"imapd\" listen=\"127.0.0.1:1143\"\n}\n")
    log = cdir / "sync" / "repl2" / "log"
    log.write_text("APPEND user.alice\nAPPEND user.bob\n")
    before = log.read_bytes()
    inst = Instance.load(conf, cyrus, "t")
    report = drain(inst, deadline=5, bindir=tmp_path, record=False)
    (res,) = report.channels
    assert res.result == "config" and "repl2_sync_host" in res.message
    assert report.exit_code == exitcodes.CONFIG
    assert log.read_bytes() == before


def test_from_systemd_records_unclean_stop_only_when_cyrus_was_killed(tmp_path, monkeypatch):
    """Issue 13: the marker means Cyrus processes were killed, with evidence, and always holds
    the latest event; a helper killed after Cyrus stopped cleanly, or before master ran, is not
    an unclean stop."""
    from cyrushelper import state
    from cyrushelper.config import Instance
    from cyrushelper.drain import _record_if_killed
    (tmp_path / "config").mkdir()
    conf = tmp_path / "imapd.conf"
    conf.write_text(f"configdirectory: {tmp_path / 'config'}\npartition-default: {tmp_path / 'spool'}\n")
    cyrus = tmp_path / "cyrus.conf"
    cyrus.write_text("SERVICES {\n  imap cmd=\"imapd\" listen=\"127.0.0.1:1143\"\n}\n")
    inst = Instance.load(conf, cyrus, "t")
    killed = {"result": "signal", "exit_code": "killed", "exit_status": "KILL"}

    monkeypatch.setenv("INVOCATION_ID", "start1")
    state.record_run(inst, 4242)
    _record_if_killed(inst, {"result": "exit-code", "exit_code": "exited", "exit_status": "1"})
    assert state.unclean_stop(inst) is None
    _record_if_killed(inst, {"result": "timeout", "exit_code": "killed", "exit_status": "KILL"})
    first = state.unclean_stop(inst)
    assert "SERVICE_RESULT=timeout" in first["reason"] and first["master_pid"] == 4242
    assert first["evidence"]["run"]["invocation_id"] == "start1" and first["events"] == 1
    _record_if_killed(inst, killed)           # the same start again: not a second event
    assert state.unclean_stop(inst)["events"] == 1

    monkeypatch.setenv("INVOCATION_ID", "start2")   # a clean start and stop
    state.record_run(inst, 4300)
    state.record_last_stop(inst, {"result": "clean"})
    monkeypatch.setenv("INVOCATION_ID", "start3")   # then a start that is killed
    state.record_run(inst, 4343)
    _record_if_killed(inst, killed)
    latest = state.unclean_stop(inst)
    assert "SERVICE_RESULT=signal" in latest["reason"] and latest["master_pid"] == 4343
    assert (latest["events"], latest["first_time"], len(latest["history"])) == (2, first["time"], 2)
    assert latest["stops_since"] == 0

    monkeypatch.setenv("INVOCATION_ID", "start4")   # Cyrus stopped cleanly, then the helper died
    state.record_run(inst, 4444)
    state.record_last_stop(inst, {"result": "clean", "by": "ExecStop"})
    _record_if_killed(inst, killed)
    assert state.unclean_stop(inst)["events"] == 2
    assert state.unclean_stop(inst)["stops_since"] == 1

    monkeypatch.setenv("INVOCATION_ID", "start5")   # killed before master ran (run.json is older)
    _record_if_killed(inst, killed)
    assert state.unclean_stop(inst)["events"] == 2

    assert state.clear_unclean_stop(inst, by="a test proof")
    assert state.unclean_stop(inst) is None
    cleared = state.last_reconcile(inst)
    assert cleared["by"] == "a test proof" and cleared["cleared_marker"]["events"] == 2


def test_stuck_channel_thread_stops_pulses_and_drain_returns(tmp_path, monkeypatch):
    """A sync_client that survives SIGKILL (D state) must not keep systemd's stop timer extended
    for ever: pulses stop after the deadline + grace, and the drain returns with events kept."""
    import threading
    import time as time_mod
    from cyrushelper.drain import drain
    (tmp_path / "config" / "sync").mkdir(parents=True)
    conf = tmp_path / "imapd.conf"
    conf.write_text(f"configdirectory: {tmp_path / 'config'}\npartition-default: {tmp_path / 'spool'}\n"
                    "sync_log: 1\nsync_host: 127.0.0.1\n")
    cyrus = tmp_path / "cyrus.conf"
    cyrus.write_text("SERVICES {\n  imap cmd=\"imapd\" listen=\"127.0.0.1:1143\"\n}\n")
    (tmp_path / "config" / "sync" / "log").write_text("APPEND user.alice\n")
    inst = Instance.load(conf, cyrus, "t")
    release = threading.Event()
    monkeypatch.setattr(drain_mod._ChannelDrainer, "run", lambda self: release.wait(30))
    monkeypatch.setattr(drain_mod, "KILL_GRACE", 0.1)
    monkeypatch.setattr(drain_mod, "OVERDUE_MARGIN", 0.5)
    calls = []
    t0 = time_mod.monotonic()
    try:
        report = drain(inst, deadline=0.5, progress=lambda s: calls.append(time_mod.monotonic() - t0),
                       record=False)
    finally:
        release.set()
    elapsed = time_mod.monotonic() - t0
    overdue = 0.5 + 3 * 0.1 + 0.5   # deadline + the kill grace of each sync_client step + OVERDUE_MARGIN
    assert elapsed < upper(overdue), elapsed
    (res,) = report.channels
    assert res.result == "error" and res.lines_after == 1 and "SIGKILL" in res.message
    assert report.exit_code == exitcodes.FAILURE
    # no pulse after the overdue point (deadline 0.5 + 3*0.1 + 0.5), except the final status
    assert all(t < upper(overdue, work=0.2) for t in calls[:-1]), calls


# --------------------------------------------------------------------------- issue 10: no false all-clear

def test_a_log_that_is_not_a_regular_file_is_damaged_and_untouched(fake, tmp_path):
    """A FIFO `log` used to hang the drain past its deadline, a directory gave a traceback."""
    fake.write("log-run", events("a", 2))
    os.mkfifo(fake.sync_dir() / "log")
    r = _cli(fake, "--json", "--deadline", "5", timeout=30)
    assert r.returncode == exitcodes.RECONCILE_NEEDED, r.stderr
    assert "Traceback" not in r.stderr
    [line] = [l for l in r.stderr.splitlines() if "channel default" in l]
    assert "log is a FIFO, not a regular file" in line and "2 lines kept" in line
    assert fake.calls() == [] and fake.snapshot() == {"log-run": b"".join(e.encode() + b"\n" for e in events("a", 2))}
    assert state.sync_log_failure(fake.instance())["events"] == 1
    os.unlink(fake.sync_dir() / "log")
    (fake.sync_dir() / "log").mkdir()
    r = _cli(fake, "--json", timeout=30)
    assert r.returncode == exitcodes.RECONCILE_NEEDED and "log is a directory" in r.stderr


def test_a_cut_off_last_line_is_kept_aside_marked_and_refuses_a_clean_result(fake):
    good = fake.write("log", events("a", 3))
    with open(fake.sync_dir() / "log", "ab") as f:
        f.write(b"MAILBOX user")  # what a write cut short by a full disk leaves behind
    report = fake.drain()
    [ch] = report.channels
    assert report.exit_code == exitcodes.RECONCILE_NEEDED and ch.result == "damaged"
    assert fake.snapshot() == {}  # the good lines were replayed (the fake replays bytes as they are)
    assert fake.replica().startswith(good)
    assert ch.damage == [f"{fake.sync_dir() / 'log'}:4: cut off (no newline at the end of the file): 'MAILBOX user'"]
    [kept] = ch.kept
    assert Path(kept).read_bytes() == good + b"MAILBOX user"
    marker = state.sync_log_failure(fake.instance())
    assert marker["evidence"]["channels"]["default"]["damage"] == ch.damage
    # the next drain has nothing to replay, but the marker still refuses a clean result ...
    again = fake.drain()
    assert again.exit_code == exitcodes.RECONCILE_NEEDED and again.result == "reconcile_needed"
    # ... until a reconcile succeeds: then exit 0 and the marker is gone (recorded as cleared)
    fixed = fake.drain(reconcile="auto")
    assert fixed.exit_code == exitcodes.OK, fixed.reconcile
    assert state.reconcile_markers(fake.instance()) == {}
    assert "drain --reconcile=auto" in state.last_reconcile(fake.instance())["by"]
    assert any(c.endswith(" -A notify=False pid=" + c.rsplit("pid=", 1)[1]) for c in fake.calls())


def test_a_failed_reconcile_keeps_the_marker(fake, monkeypatch):
    state.record_sync_log_failure(fake.instance(), "test: Cyrus could not write a line")
    monkeypatch.setenv("FAKE_SYNC_MODE", "reconcile-fails")
    report = fake.drain(reconcile="auto")
    assert report.exit_code == exitcodes.RECONCILE_NEEDED
    assert report.reconcile["failed"] == {"default": "exit 1: no output; see syslog for sync_client[%s]"
                                          % report.reconcile["failed"]["default"].split("[")[1].split("]")[0]}
    assert state.sync_log_failure(fake.instance()) is not None


@pytest.mark.parametrize("line, reason", [
    (b"MAILAPPEND user.bob", "unknown event type 'MAILAPPEND'"),  # a fragment merged with the next line
    (b"SEEN alice", "SEEN with 1 names"),
    (b"USER alice bob", "USER with 2 names"),
    (b'MAILBOX "user.a b', "malformed name"),
    (b"APPEND", "no argument"),
])
def test_lines_cyrus_would_drop_are_named(fake, line, reason):
    fake.write("log", events("a", 1))
    with open(fake.sync_dir() / "log", "ab") as f:
        f.write(line + b"\nAPPEND user.b\n")
    report = fake.drain()
    assert report.channels[0].damage[0].endswith(f"log:2: {reason}: {line.decode()!r}")


def test_an_orphaned_channel_with_events_is_not_success(tmp_path, monkeypatch):
    """repl2 was removed from sync_log_channels with 128 lines pending: no longer exit 0 in silence."""
    monkeypatch.delenv("FAKE_SYNC_MODE", raising=False)
    fake = FakeCyrus(tmp_path, channels='""')
    orphan = fake.write("log", events("r", 128), channel="repl2")
    fake.write("log", events("a", 2))
    report = fake.drain()
    assert report.exit_code == exitcodes.CONFIG
    by = {c.channel: c for c in report.channels}
    assert by["default"].result == "drained" and by["repl2"].result == "orphaned"
    assert by["repl2"].lines_after == 128 and "sync_log_channels" in by["repl2"].message
    assert fake.snapshot("repl2") == {"log": orphan}
    # draining a chosen channel does not look for orphans
    assert fake.drain(channels=["default"]).exit_code == exitcodes.OK


def test_a_drain_that_waited_for_another_counts_only_its_own_lines(fake, capsys):
    """The first drain replays everything while the second waits for the lock: the second must not
    report those lines as drained too (it said "drained 10008 lines" after 0 runs)."""
    fake.write("log", events("a", 40))
    lock = ChannelLock(channel_lock_path(fake.confdir, None))
    lock.acquire()
    results = {}
    second = threading.Thread(target=lambda: results.setdefault("r", fake.drain(lock_wait=20)))
    second.start()
    for _ in range(200):  # the second drain counted its lines and now waits for the lock
        if second.is_alive() and not fake.calls():
            break
        time.sleep(0.01)
    time.sleep(0.3)
    # the "first drainer" replays everything, then lets go
    os.rename(fake.sync_dir() / "log", fake.confdir / "replayed-elsewhere")
    lock.release()
    second.join(30)
    [ch] = results["r"].channels
    assert (ch.result, ch.runs, ch.lines_before) == ("drained", 0, 0)

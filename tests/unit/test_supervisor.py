"""`cyrushelper run` against a fake master (tests/unit/test_supervisor_fakes.py) and a fake
NOTIFY_SOCKET: READY only when Cyrus can serve, exactly one SIGTERM, bounded stop, markers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cyrushelper import exitcodes, fence, proc, supervisor
from tests.unit.test_supervisor_fakes import FakeCyrus, NotifySocket
from tests.bounds import upper


@pytest.fixture
def short_tmp():
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="cyhs-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def notify(short_tmp):
    n = NotifySocket(short_tmp)
    yield n
    n.close()


@pytest.fixture
def fake(short_tmp):
    return FakeCyrus(short_tmp / "cyrus")


class Helper:
    """`cyrushelper run` in a subprocess; kills everything it started (by PID) at the end."""

    def __init__(self, fake: FakeCyrus, notify: NotifySocket, mode: str = "", extra=(), **env):
        self.fake = fake
        self.p = subprocess.Popen([sys.executable, "-m", "cyrushelper", "run", *fake.args(), *extra],
                                  env={**fake.env(mode, **env), "NOTIFY_SOCKET": notify.path},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self._lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def wait_output(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, f"{text!r} not in the helper's output:\n{self.output}"
            time.sleep(0.02)

    def signal(self, sig=signal.SIGTERM):
        self.p.send_signal(sig)

    def wait(self, timeout=20) -> int:
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            raise
        self._reader.join(timeout=10)
        return code

    def master_pid(self) -> int:
        e = self.fake.first("master start")
        assert e is not None, "fake master never started"
        return e[1]

    def cleanup(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        e = self.fake.first("master start")
        if e is not None:
            proc.kill_session(e[1])


@pytest.fixture
def helpers():
    started = []

    def start(*a, **kw):
        h = Helper(*a, **kw)
        started.append(h)
        return h
    yield start
    for h in started:
        h.cleanup()


def test_ready_only_after_listeners_accept_and_master_isolated(fake, notify, helpers):
    h = helpers(fake, notify, "slow_start=1.0")
    t_ready, fields = notify.wait_for("READY", "1", timeout=15)
    listening = fake.first("master listening")
    assert listening is not None and t_ready > listening[0]
    assert "backlog default=0" in fields.get("STATUS", "")
    _, master_pid, start_line = fake.first("master start")
    # own session, no NOTIFY_SOCKET, and a child of the helper
    assert f"sid={master_pid} pgid={master_pid}" in start_line
    assert f"ppid={h.p.pid}" in start_line
    assert "notify=None" in start_line
    assert os.getsid(h.p.pid) != master_pid
    assert not notify.has("STOPPING")
    h.signal()
    assert h.wait() == 0, h.output


def test_sigterm_stop_is_clean_with_exactly_one_sigterm(fake, notify, helpers):
    h = helpers(fake, notify)
    notify.wait_for("READY", "1")
    master = h.master_pid()
    assert not notify.has("STOPPING"), "STOPPING=1 before any stop was requested"
    h.signal()
    assert h.wait() == exitcodes.OK, h.output
    t_stop, _ = notify.wait_for("STOPPING", "1")
    t_term = next(t for t, pid, w in fake.events() if w == "master SIGTERM")
    assert t_stop <= t_term + 0.5
    # one SIGTERM to master's PID, from us; the children get theirs from master alone (a signal
    # to master's process group would reach them from us first)
    assert fake.senders("master SIGTERM") == [h.p.pid]
    assert fake.senders("child SIGTERM") == [master, master]
    assert not proc.alive(master)
    assert proc.session_members(master) == []
    last = json.loads((fake.config / "cyrushelper" / "last-stop.json").read_text())
    assert last["result"] == "clean"
    assert not (fake.config / "cyrushelper" / "unclean-stop.json").exists()


def test_sigterm_fences_and_waits_for_open_sessions_before_master_gets_its_sigterm(fake, notify, helpers):
    """systemd's SIGTERM reaches run (the unit has no ExecStop): the fence with --message goes up
    at once, master's SIGTERM waits until the open session ended, well inside --grace."""
    h = helpers(fake, notify, extra=("--grace", "60", "--message", "Moving to the new server"))
    notify.wait_for("READY", "1")
    (fake.config / "proc").mkdir(exist_ok=True)
    session = subprocess.Popen(["sleep", "120"])
    try:
        (fake.config / "proc" / str(session.pid)).write_text("imap\tlocalhost [127.0.0.1]\talice\tuser.alice\t\n")
        h.signal()
        h.wait_output("fence written")
        assert (fake.config / "msg" / "shutdown").read_text() == "Moving to the new server\n", h.output
        notify.wait_for("STOPPING", "1")
        time.sleep(0.3)  # a helper that does not wait would have signalled master by now
        assert fake.senders("master SIGTERM") == [], h.output
        ended = time.time()
        session.kill()
    finally:
        session.kill()
        session.wait()
    assert h.wait() == exitcodes.OK, h.output
    t_term = next(t for t, pid, w in fake.events() if w == "master SIGTERM")
    assert t_term >= ended and fake.senders("master SIGTERM") == [h.p.pid], (t_term, ended, h.output)
    assert fence_lines(h.output) == [fence.ALL_CLEAR], h.output
    assert not (fake.config / "msg" / "shutdown").exists()  # removed once nothing runs


def fence_lines(output: str) -> list[str]:
    return [words for line in output.splitlines() for words in (fence.ALL_CLEAR, fence.GRACE_OVER) if words in line]


def test_stuck_child_bounded_stop_kills_session_and_marks_unclean(fake, notify, helpers):
    h = helpers(fake, notify, "stuck_child", extra=["--stop-timeout", "1.5"])
    notify.wait_for("READY", "1")
    master = h.master_pid()
    members = proc.session_members(master)
    assert len(members) == 3
    t0 = time.monotonic()
    h.signal()
    assert h.wait() == exitcodes.UNCLEAN_STOP, h.output
    # waited for --stop-timeout (a lower bound by construction), then escalated instead of hanging
    assert 1.5 <= time.monotonic() - t0 < upper(1.5, work=2)
    assert fake.count("master SIGTERM") == 1
    assert proc.session_members(master) == []
    statuses = [f.get("STATUS", "") for _, f in notify.drain()]
    assert any("children left" in s for s in statuses), statuses
    assert any(f.get("EXTEND_TIMEOUT_USEC") for _, f in notify.messages)
    marker = json.loads((fake.config / "cyrushelper" / "unclean-stop.json").read_text())
    # master and the child that ignored SIGTERM; the obedient child had exited by itself
    assert master in marker["killed_pids"] and len(marker["killed_pids"]) == 2
    assert set(marker["killed_pids"]) <= set(members)
    assert "deadline" in marker["reason"]
    # status reports it (not running -> 3) and the next start recommends a reconcile
    r = subprocess.run([sys.executable, "-m", "cyrushelper", "status", "--json", *fake.args()],
                       env=fake.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r.stderr
    report = json.loads(r.stdout)
    assert report["unclean_stop"]["killed_pids"] == marker["killed_pids"]
    assert report["last_stop"]["result"] == "unclean"


def test_repeated_sigterm_during_a_slow_stop_never_reaches_master(short_tmp, fake, notify, helpers):
    """systemd or an operator repeating SIGTERM while master is still waiting for a child: a second
    SIGTERM from master would kill that child in the middle of its work (SA_RESETHAND)."""
    release = short_tmp / "release"
    h = helpers(fake, notify, "slow_child", FAKE_RELEASE=str(release))
    notify.wait_for("READY", "1")
    master = h.master_pid()
    h.signal()
    notify.wait_for("STATUS", "stopping: master and 1 children left")  # the slow child holds the stop
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        h.signal(sig)
    h.wait_output("while stopping: ignored")  # the repeat arrived while the stop went on
    release.touch()
    assert h.wait() == exitcodes.OK, h.output
    assert fake.senders("master SIGTERM") == [h.p.pid]
    assert fake.senders("child SIGTERM") == [master, master]
    assert fake.count("child released") == 1  # the slow child finished its work, it was not killed
    assert h.output.count("while stopping: ignored") == 1  # said once, however many repeats


@pytest.mark.parametrize("mode,extra,expected", [
    ("", [], exitcodes.OK),
    ("stuck_child", ["--stop-timeout", "1"], exitcodes.UNCLEAN_STOP),
])
def test_repeated_sigterm_until_exit_never_replaces_the_exit_code(fake, notify, helpers, mode, extra,
                                                                   expected):
    """systemd or an operator may repeat SIGTERM at any moment of a stop, also while the process is
    already exiting; death by SIGTERM would hide an unclean stop (exit 70) from systemd. Flooding
    with SIGTERM until the process is gone covers interpreter finalization, where CPython resets
    Python-level handlers to SIG_DFL."""
    h = helpers(fake, notify, mode, extra=extra)
    notify.wait_for("READY", "1")
    sent = 0
    while h.p.poll() is None:
        try:
            h.signal()
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.001)
    assert h.wait() == expected, h.output
    assert sent > 1
    assert fake.count("master SIGTERM") == 1


def test_master_ignoring_sigterm_is_killed_after_deadline(fake, notify, helpers):
    h = helpers(fake, notify, "ignore_term", extra=["--stop-timeout", "1"])
    notify.wait_for("READY", "1")
    master = h.master_pid()
    h.signal()
    assert h.wait() == exitcodes.UNCLEAN_STOP, h.output
    assert fake.count("master SIGTERM") == 1
    assert not proc.alive(master)


@pytest.mark.parametrize("mode", ["die_after=0.5", "crash_after=0.5"])
def test_master_dying_by_itself_fails_the_unit(fake, notify, helpers, mode):
    h = helpers(fake, notify, mode)
    notify.wait_for("READY", "1")
    master = h.master_pid()
    assert h.wait() == exitcodes.FAILURE, h.output
    assert "exited unexpectedly" in h.output
    assert not notify.has("STOPPING")
    assert proc.session_members(master) == []
    last = json.loads((fake.config / "cyrushelper" / "last-stop.json").read_text())
    assert last["result"] == "master died"
    if mode.startswith("crash"):
        # children never heard from master: they get one SIGTERM from us, no SIGKILL needed
        assert fake.count("child SIGTERM") == 2
        assert last["master_exit"][1] == signal.SIGKILL


def test_stale_fence_removed_at_start(fake, notify, helpers):
    fence = fake.config / "msg" / "shutdown"
    fence.write_text("old shutdown\n")
    h = helpers(fake, notify)
    notify.wait_for("READY", "1")
    assert not fence.exists()
    h.signal()
    assert h.wait() == 0


def test_status_follows_sync_log_appends_via_inotify(fake, notify, helpers):
    h = helpers(fake, notify, extra=["--status-interval", "0.3"])
    notify.wait_for("READY", "1")
    log = fake.config / "sync" / "log"
    with open(log, "a") as f:
        f.write('APPEND "user.alice"\n')
    notify.wait_for("STATUS", "backlog default=1")
    before = len(notify.drain())
    with open(log, "a") as f:  # a burst, one append per message as Cyrus does
        for i in range(300):
            f.write(f'APPEND "user.u{i}"\n')
            f.flush()
    notify.wait_for("STATUS", "backlog default=301")
    time.sleep(0.7)
    updates = [f for _, f in notify.drain()[before:] if "STATUS" in f]
    assert len(updates) <= 6, updates  # coalesced: not one per line
    os.rename(log, fake.config / "sync" / "log-run")  # a reader took the file: count unchanged
    os.unlink(fake.config / "sync" / "log-run")
    notify.wait_for("STATUS", "backlog default=0")
    h.signal()
    assert h.wait() == 0


def test_status_follows_a_channel_directory_created_later(short_tmp, notify, helpers):
    fake = FakeCyrus(short_tmp / "cyrus", channels="repl2")
    h = helpers(fake, notify)
    notify.wait_for("READY", "1")
    d = fake.config / "sync" / "repl2"
    d.mkdir()
    (d / "log").write_text("SEEN alice user.alice\nMAILBOX user.bob\n")
    notify.wait_for("STATUS", "backlog repl2=2")
    h.signal()
    assert h.wait() == 0


def test_ready_file_of_cyrus_310_is_awaited(fake, notify, helpers):
    stale = fake.config / "master.ready"
    stale.touch()  # from a master that was SIGKILLed: must not count
    h = helpers(fake, notify, "ready_file", READY_DELAY="1.0")
    t_ready, _ = notify.wait_for("READY", "1")
    ready = fake.first("master ready file")
    assert ready is not None and t_ready >= ready[0]
    assert t_ready - fake.first("master listening")[0] >= 0.9
    assert fake.count("master accepted") == 0  # Cyrus said it serves: no probe connection needed
    h.signal()
    assert h.wait() == 0
    assert f"ready: {supervisor.READY_BY_FILE})" in h.output, h.output


def last_stop(fake) -> dict:
    return json.loads((fake.config / "cyrushelper" / "last-stop.json").read_text())


def test_shutdown_hang_master_alone_is_killed_and_the_stop_stays_clean(fake, notify, helpers):
    """Cyrus 3.6: after its last child exited, master neither reaps nor exits (#5309). It is
    SIGKILLed once it has been alone for the grace, long before the stop deadline, and since
    every child finished, the stop is clean."""
    h = helpers(fake, notify, "hang", extra=["--stop-timeout", "600"])
    notify.wait_for("READY", "1")
    master = h.master_pid()
    h.signal()
    assert h.wait(timeout=120) == exitcodes.OK, h.output
    assert "has not reaped its 2 exited children" in h.output and "#5309" in h.output
    assert fake.count("master SIGTERM") == 1 and fake.count("child SIGTERM") == 2
    stop = last_stop(fake)
    assert stop["result"] == "clean" and stop["master_hung_after_children"]
    assert stop["master_exit"] == [None, signal.SIGKILL]
    assert not (fake.config / "cyrushelper" / "unclean-stop.json").exists()
    assert proc.session_members(master) == []


def test_a_master_without_the_hang_is_not_killed_early(fake, notify, helpers):
    """Cyrus 3.12 has the fix: the same lone master waits for the deadline like anything else
    (then SIGKILL to master alone, still clean: no child was cut short)."""
    h = helpers(fake, notify, "hang,ready_file,version=3.12.0", extra=["--stop-timeout", "2"])
    notify.wait_for("READY", "1")
    h.signal()
    assert h.wait(timeout=120) == exitcodes.OK, h.output
    assert "stop deadline of 2s passed with master" in h.output and "#5309" not in h.output
    stop = last_stop(fake)
    assert stop["result"] == "clean" and stop["master_hung_after_children"]


def test_a_master_that_reaps_its_children_exits_on_its_own(fake, notify, helpers):
    """Alone but reaping: not the hang, only slow. It is left to exit by itself."""
    h = helpers(fake, notify, "slow_exit=2", extra=["--master-alone-grace", "0.5"])
    notify.wait_for("READY", "1")
    h.signal()
    assert h.wait(timeout=120) == exitcodes.OK, h.output
    stop = last_stop(fake)
    assert stop["master_exit"] == [0, None] and "master_hung_after_children" not in stop
    assert stop["master_after_last_child"] > 0   # recorded: what the grace is measured against
    assert fake.count("master exit 0") == 1


def test_an_idle_helper_sleeps_without_a_timeout(fake, notify, helpers):
    """Nothing happening, nothing to do: the loop blocks in epoll_wait with no timeout at all
    (no periodic check; this run has no journal to watch)."""
    h = helpers(fake, notify)
    notify.wait_for("READY", "1")
    end = time.monotonic() + 30
    syscall = ""
    while time.monotonic() < end:
        syscall = Path(f"/proc/{h.p.pid}/syscall").read_text().split()
        if syscall[0] in ("232", "281") and int(syscall[4], 16) & 0xFFFFFFFF == 0xFFFFFFFF:
            break  # epoll_wait/epoll_pwait(fd, events, maxevents, timeout=-1)
        time.sleep(0.05)
    else:
        raise AssertionError(f"the idle helper never blocked without a timeout: {syscall}")
    h.signal()
    assert h.wait() == 0


def test_start_timeout_stops_master_and_fails(fake, notify, helpers):
    h = helpers(fake, notify, "no_listen", extra=["--start-timeout", "1"])
    assert h.wait() == exitcodes.FAILURE, h.output
    assert not notify.has("READY")
    assert fake.count("master SIGTERM") == 1
    assert "did not become ready" in h.output


def test_stop_during_start(fake, notify, helpers):
    h = helpers(fake, notify, "slow_start=3")
    fake_started = time.time() + 5
    while fake.first("master start") is None and time.time() < fake_started:
        time.sleep(0.02)
    h.signal()
    assert h.wait() == 0, h.output
    assert not notify.has("READY")
    assert notify.has("STOPPING", "1")


def test_refuses_when_a_master_already_runs(fake, notify, helpers):
    first = helpers(fake, notify)
    notify.wait_for("READY", "1")
    fence = fake.config / "msg" / "shutdown"
    fence.write_text("fenced by a stop in progress\n")
    second = Helper(fake, notify)
    try:
        assert second.wait() == exitcodes.FAILURE
        assert "already runs" in second.output
        assert fence.exists(), "the second start removed the fence of the running instance"
    finally:
        second.cleanup() if second.p.poll() is None else None
    first.signal()
    assert first.wait() == 0


def test_sighup_is_forwarded_to_master(fake, notify, helpers):
    h = helpers(fake, notify)
    notify.wait_for("READY", "1")
    h.signal(signal.SIGHUP)
    end = time.time() + 5
    while fake.count("master SIGHUP") == 0 and time.time() < end:
        time.sleep(0.05)
    assert fake.count("master SIGHUP") == 1
    h.signal()
    assert h.wait() == 0


def _write_marker(fake):
    d = fake.config / "cyrushelper"
    d.mkdir(exist_ok=True)
    (d / "unclean-stop.json").write_text(json.dumps({"time": "2026-01-01T00:00:00", "reason": "test",
                                                     "killed_pids": [1234]}))
    return d / "unclean-stop.json"


def test_unclean_marker_recommend_shows_in_status_and_stays(fake, notify, helpers):
    marker = _write_marker(fake)
    h = helpers(fake, notify)
    _, fields = notify.wait_for("READY", "1")
    notify.wait_for("STATUS", predicate=lambda s: "unclean stop 2026-01-01" in s and "sync_client -A" in s)
    h.signal()
    assert h.wait() == 0
    assert marker.exists()
    assert fake.count("sync_client -C") == 0


def test_unclean_marker_auto_reconciles_each_channel_and_clears(short_tmp, notify, helpers):
    fake = FakeCyrus(short_tmp / "cyrus", channels='"" repl2')
    marker = _write_marker(fake)
    h = helpers(fake, notify, extra=["--reconcile", "auto"])
    notify.wait_for("READY", "1")
    end = time.time() + 10
    while marker.exists() and time.time() < end:
        time.sleep(0.05)
    assert not marker.exists()
    runs = [w for _, _, w in fake.events() if w.startswith("sync_client")]
    assert runs == [f"sync_client -C {fake.imapd_conf} -A", f"sync_client -C {fake.imapd_conf} -n repl2 -A"]
    h.signal()
    assert h.wait() == 0


def test_failed_reconcile_keeps_marker(fake, notify, helpers):
    marker = _write_marker(fake)
    h = helpers(fake, notify, extra=["--reconcile", "auto"], FAKE_SYNC_CLIENT_EXIT="1")
    notify.wait_for("STATUS", predicate=lambda s: "reconcile FAILED" in s and "marker kept" in s)
    assert marker.exists()
    h.signal()
    assert h.wait() == 0


def test_leftover_events_without_rolling_client_are_reported(fake, notify, helpers):
    (fake.config / "sync" / "log").write_text("MAILBOX user.alice\n")
    h = helpers(fake, notify, extra=["--leftover-drain", "off"])
    notify.wait_for("STATUS", predicate=lambda s: "leftover events default=1" in s)
    h.signal()
    assert h.wait() == 0


def test_leftover_events_with_rolling_client_are_left_to_it(short_tmp, notify, helpers):
    fake = FakeCyrus(short_tmp / "cyrus", sync_client_entry='syncclient cmd="sync_client -C x -r"')
    (fake.config / "sync" / "log").write_text("MAILBOX user.alice\n")
    h = helpers(fake, notify)
    _, fields = notify.wait_for("READY", "1")
    time.sleep(0.3)
    assert not any("leftover" in f.get("STATUS", "") for _, f in notify.drain())
    h.signal()
    assert h.wait() == 0


def test_rolling_channels_reads_flags():
    from cyrushelper.config import Instance
    from cyrushelper.channels import rolling_channels
    with tempfile.TemporaryDirectory() as d:
        fake = FakeCyrus(Path(d), channels='"" repl2',
                         sync_client_entry='s2 cmd="sync_client -C x -vr -n repl2"')
        inst = Instance.load(fake.imapd_conf, fake.cyrus_conf)
        assert rolling_channels(inst) == {"repl2"}


def test_bad_arguments_are_usage_errors(fake):
    r = subprocess.run([sys.executable, "-m", "cyrushelper", "run", *fake.args(), "--stop-timeout", "-1"],
                       env=fake.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == exitcodes.USAGE
    r = subprocess.run([sys.executable, "-m", "cyrushelper", "run", "-C", "/nonexistent/imapd.conf"],
                       env=fake.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == exitcodes.CONFIG
    assert "/nonexistent/imapd.conf" in r.stderr


def test_catches_reads_sigterm_handler_and_sees_sa_resethand():
    """proc.catches tells a child that still waits for its first SIGTERM from one that got it."""
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: None)\n"
            "print('ready', flush=True); time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert proc.catches(p.pid, signal.SIGTERM)
        assert not proc.catches(p.pid, signal.SIGUSR2)
    finally:
        p.kill()
        p.wait()
    assert not proc.catches(p.pid, signal.SIGTERM)  # gone: no handler to speak of

"""`cyrushelper worker`: systemd's socket (fd 3, LISTEN_FDS=1) handed to the service as master hands
it over (fd 4), the slot's status file on fd 3, the environment; the loop that runs the service
again after it exits 0 by design, folds its messages into the slot's counter and stops at a
signal. The "service" is a small script that reports what it got and answers one connection like
a Cyrus service, writing the messages Cyrus writes for master; its exit code comes from a file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cyrushelper import exitcodes, worker

SERVICE = """\
import json, os, signal, socket, struct, sys, time
report, codes = sys.argv[1], sys.argv[2]
hup = []
signal.signal(signal.SIGHUP, lambda *_: hup.append(1))
fds = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (3, 4) if os.path.exists(f"/proc/self/fd/{fd}")}
env = {k: v for k, v in os.environ.items() if k.startswith(("CYRUS_", "LISTEN_", "NOTIFY_", "WATCHDOG_"))}
listener = socket.socket(fileno=4)
conn, _ = listener.accept()
os.write(3, struct.pack("@ii", 2, os.getpid()))   # UNAVAILABLE, then CONNECTION: as service.c does
os.write(3, struct.pack("@ii", 3, os.getpid()))
conn.sendall(b"* OK fake\\r\\n")
conn.recv(10)                                      # the client says when this connection is over
conn.close()
with open(report, "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "fds": fds, "env": env, "argv": sys.argv[3:], "hup": bool(hup)}) + "\\n")
lines = open(codes).read().split()
open(codes, "w").write(" ".join(lines[1:]))
sys.exit(int(lines[0]) if lines else 0)
"""

# the worker units' way (render.worker_command), and the command an operator would type
ENTRIES = {"module": ["-I", "-m", "cyrushelper.worker"], "command": ["-m", "cyrushelper", "worker"]}


class Worker:
    """`cyrushelper worker` as systemd starts it: the socket on fd 3, LISTEN_PID = its own PID."""

    def __init__(self, tmp_path: Path, listener: socket.socket, status: Path, codes: list[int], *,
                 listen_fds: str = "1", entry: str = "module"):
        script = tmp_path / "service.py"
        script.write_text(SERVICE)
        self.report = tmp_path / "report.jsonl"
        self.codes = tmp_path / "codes"
        self.codes.write_text(" ".join(map(str, codes)))
        self.listener = listener
        env = {**os.environ, "LISTEN_FDS": listen_fds, "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1"}
        cmd = [sys.executable, *ENTRIES[entry], "--service", "lmtpunix", "--id", "1", "--status", str(status),
               "--", sys.executable, str(script), str(self.report), str(self.codes), "-C", "/etc/x.conf"]
        launcher = ("import os, sys; fd = int(sys.argv[1])\n"
                    "if fd != 3: os.dup2(fd, 3); os.close(fd)\n"
                    "os.set_inheritable(3, True); os.environ['LISTEN_PID'] = str(os.getpid())\n"
                    "os.execv(sys.argv[2], sys.argv[2:])")
        # its own session: a signal to the group reaches the loop and the service, as systemd's does
        self.p = subprocess.Popen([sys.executable, "-c", launcher, str(listener.fileno()), *cmd], env=env,
                                  pass_fds=(listener.fileno(),), stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)

    def connect(self) -> socket.socket:
        c = socket.create_connection(self.listener.getsockname(), timeout=30)
        assert c.recv(100) == b"* OK fake\r\n"
        return c

    def serve_one(self) -> None:
        before = len(self.reports())
        with self.connect() as c:
            c.sendall(b"bye")
        self.wait_reports(before + 1)

    def reports(self) -> list[dict]:
        return [json.loads(line) for line in self.report.read_text().splitlines()] if self.report.exists() else []

    def wait_reports(self, n: int) -> None:
        while len(self.reports()) < n:
            assert self.p.poll() is None, f"the worker ended ({self.p.returncode}): {self.p.stderr.read()}"
            time.sleep(0.01)

    def wait(self) -> int:
        return self.p.wait(timeout=30)


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def no_worker_left_behind(monkeypatch):
    """A failing test must not leave its worker (its own session) running."""
    started: list[Worker] = []
    init = Worker.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(Worker, "__init__", tracked)
    yield
    for w in started:
        if w.p.poll() is None:
            os.killpg(w.p.pid, signal.SIGKILL)
            w.p.wait()


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_service_gets_the_socket_on_fd4_and_its_status_file_on_fd3(tmp_path, listener, entry):
    status = tmp_path / "workers" / "lmtpunix-2@1"
    w = Worker(tmp_path, listener, status, [75], entry=entry)
    w.serve_one()
    assert w.wait() == 75   # what the service exits with, the worker exits with (75: SIGTERM's)
    (got,) = w.reports()
    assert got["fds"][str(worker.LISTEN_FD)].startswith("socket:")
    assert got["fds"][str(worker.STATUS_FD)] == str(status)
    assert got["env"] == {"CYRUS_SERVICE": "lmtpunix", "CYRUS_ID": "1"}  # LISTEN_*, NOTIFY_*, WATCHDOG_* gone
    assert got["argv"] == ["-C", "/etc/x.conf"]
    pid = got["pid"]
    assert worker.read_records(status) == [(worker.UNAVAILABLE, pid), (worker.CONNECTION, pid)]
    assert worker.read_served(status) == 0


def test_exit_0_runs_the_service_again_and_folds_its_connections(tmp_path, listener):
    status = tmp_path / "workers" / "imap@3"
    w = Worker(tmp_path, listener, status, [0, 0, 75])
    for _ in range(3):
        w.serve_one()
    assert w.wait() == 75
    first, second, third = (r["pid"] for r in w.reports())
    assert len({first, second, third}) == 3     # a new process each time, in the same worker
    assert worker.read_served(status) == 2      # the first two runs' connections
    assert worker.read_records(status) == [(worker.UNAVAILABLE, third), (worker.CONNECTION, third)]
    with open(status, "ab") as f:               # a torn last record is ignored, not misread
        f.write(b"\x03\x00")
    assert len(worker.read_records(status)) == 2


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN])
def test_a_stop_signal_ends_the_loop_once_the_service_has_finished(tmp_path, listener, inherited):
    # whatever the worker inherits (systemd resets dispositions; a shell may have ignored HUP)
    previous = signal.signal(signal.SIGHUP, inherited)
    try:
        w = Worker(tmp_path, listener, tmp_path / "s@1", [0, 0])
    finally:
        signal.signal(signal.SIGHUP, previous)
    c = w.connect()                             # a session in progress
    os.killpg(w.p.pid, signal.SIGHUP)           # systemd signals every process of the unit
    time.sleep(0.2)                             # (nothing below depends on how long this is)
    assert w.p.poll() is None                   # the session goes on
    c.sendall(b"bye")
    c.close()
    assert w.wait() == 0                        # the service finished and exited 0: not run again
    assert [r["hup"] for r in w.reports()] == [True]


@pytest.mark.parametrize("code", [70, 1])
def test_any_other_exit_ends_the_worker_for_systemd_to_restart(tmp_path, listener, code):
    w = Worker(tmp_path, listener, tmp_path / "s@1", [code, 0])
    w.serve_one()
    assert w.wait() == code
    assert len(w.reports()) == 1


@pytest.mark.parametrize("listen_fds", ["", "2"])
def test_without_exactly_one_socket_from_systemd_it_refuses_with_78(tmp_path, listener, listen_fds):
    w = Worker(tmp_path, listener, tmp_path / "s@1", [0], listen_fds=listen_fds)
    assert w.wait() == exitcodes.CONFIG
    assert "LISTEN_FDS" in w.p.stderr.read()
    assert w.reports() == []


@pytest.mark.parametrize("argv", [["--service", "x"], ["--service", "x", "--status", "f", "--id", "one", "--", "/bin/true"],
                                  ["--bogus", "1", "--", "/bin/true"]])
def test_the_module_entry_refuses_a_bad_command_line(argv):
    r = subprocess.run([sys.executable, "-I", "-m", "cyrushelper.worker", *argv], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == exitcodes.USAGE and r.stderr


def test_a_program_that_cannot_be_executed_is_78(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cyrushelper", "worker", "--service", "x", "--status",
                        str(tmp_path / "s@1"), "--", str(tmp_path / "missing")], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "LISTEN_FDS": "1"})
    assert r.returncode == exitcodes.CONFIG  # LISTEN_PID is not ours here: refused before exec
    r = subprocess.run([sys.executable, "-m", "cyrushelper", "worker", "--service", "x", "--status",
                        str(tmp_path / "s@1"), "--", "relative/prog"], capture_output=True, text=True, timeout=30)
    assert r.returncode == exitcodes.USAGE and "absolute" in r.stderr

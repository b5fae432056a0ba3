"""`cyrushelper worker`: systemd's socket (fd 3, LISTEN_FDS=1) handed to the service as master hands
it over (fd 4), the slot's status file on fd 3, the environment, exec keeping the PID. The
"service" is a small script that reports what it got and answers one connection like a Cyrus
service: the messages it writes to fd 3 are the ones Cyrus writes for master."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cyrushelper import exitcodes, worker

SERVICE = """\
import json, os, socket, struct, sys
fds = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (3, 4) if os.path.exists(f"/proc/self/fd/{fd}")}
env = {k: v for k, v in os.environ.items() if k.startswith(("CYRUS_", "LISTEN_", "NOTIFY_", "WATCHDOG_"))}
listener = socket.socket(fileno=4)
conn, _ = listener.accept()
os.write(3, struct.pack("@ii", 2, os.getpid()))   # UNAVAILABLE, then CONNECTION: as service.c does
os.write(3, struct.pack("@ii", 3, os.getpid()))
conn.sendall(b"* OK fake\\r\\n")
conn.close()
with open(sys.argv[1], "w") as f:
    json.dump({"pid": os.getpid(), "fds": fds, "env": env, "argv": sys.argv[2:]}, f)
"""


def start_worker(tmp_path: Path, listener: socket.socket, status: Path, *, listen_fds: str = "1",
                 extra_env: dict | None = None) -> subprocess.Popen:
    """`cyrushelper worker` as systemd starts it: the socket on fd 3, LISTEN_PID = its own PID."""
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    report = tmp_path / "report.json"
    env = {**os.environ, "LISTEN_FDS": listen_fds, "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1",
           **(extra_env or {})}
    cmd = [sys.executable, "-m", "cyrushelper", "worker", "--service", "lmtpunix", "--id", "1",
           "--status", str(status), "--", sys.executable, str(script), str(report), "-C", "/etc/x.conf"]

    # a launcher puts the socket on fd 3 and LISTEN_PID = its own PID, then execs the worker,
    # which keeps that PID: what systemd does
    launcher = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
                "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])")
    return subprocess.Popen([sys.executable, "-c", launcher, str(listener.fileno()), *cmd], env=env,
                            pass_fds=(listener.fileno(),), stderr=subprocess.PIPE, text=True)


def serve_one(tmp_path: Path, listener: socket.socket, status: Path) -> dict:
    p = start_worker(tmp_path, listener, status)
    with socket.create_connection(listener.getsockname(), timeout=30) as c:
        assert c.recv(100) == b"* OK fake\r\n"
    assert p.wait(timeout=30) == 0, p.stderr.read()
    return json.loads((tmp_path / "report.json").read_text())


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s
    s.close()


def test_the_service_gets_the_socket_on_fd4_and_its_status_file_on_fd3(tmp_path, listener):
    status = tmp_path / "workers" / "lmtpunix-2@1"
    got = serve_one(tmp_path, listener, status)
    assert got["fds"][str(worker.LISTEN_FD)].startswith("socket:")
    assert got["fds"][str(worker.STATUS_FD)] == str(status)
    assert got["env"] == {"CYRUS_SERVICE": "lmtpunix", "CYRUS_ID": "1"}  # LISTEN_*, NOTIFY_*, WATCHDOG_* gone
    assert got["argv"] == ["-C", "/etc/x.conf"]
    # exec kept the PID: our first record and Cyrus's messages name the same process
    pid = got["pid"]
    assert worker.read_records(status) == [(worker.AVAILABLE, pid), (worker.UNAVAILABLE, pid),
                                           (worker.CONNECTION, pid)]
    assert worker.read_served(status) == 0


def test_the_next_process_of_a_slot_folds_the_count_and_starts_afresh(tmp_path, listener):
    status = tmp_path / "workers" / "imap@3"
    serve_one(tmp_path, listener, status)
    with open(status, "ab") as f:                   # as if it had served two more before its exit
        f.write(worker.RECORD.pack(worker.CONNECTION, 1) * 2 + worker.RECORD.pack(worker.UNAVAILABLE, 1))
    second = serve_one(tmp_path, listener, status)
    assert worker.read_served(status) == 3          # the first process's connections
    assert worker.read_records(status)[0] == (worker.AVAILABLE, second["pid"])
    assert len(worker.read_records(status)) == 3
    with open(status, "ab") as f:                   # a torn last record is ignored, not misread
        f.write(b"\x03\x00")
    assert len(worker.read_records(status)) == 3


@pytest.mark.parametrize("listen_fds", ["", "2"])
def test_without_exactly_one_socket_from_systemd_it_refuses_with_78(tmp_path, listener, listen_fds):
    p = start_worker(tmp_path, listener, tmp_path / "s@1", listen_fds=listen_fds)
    assert p.wait(timeout=30) == exitcodes.CONFIG
    assert "LISTEN_FDS" in p.stderr.read()
    assert not (tmp_path / "report.json").exists()


def test_a_program_that_cannot_be_executed_is_78(tmp_path, listener):
    status = tmp_path / "s@1"
    r = subprocess.run([sys.executable, "-m", "cyrushelper", "worker", "--service", "x", "--status", str(status),
                        "--", str(tmp_path / "missing")], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "LISTEN_FDS": "1"}, pass_fds=())
    assert r.returncode == exitcodes.CONFIG  # LISTEN_PID is not ours here: refused before exec
    r = subprocess.run([sys.executable, "-m", "cyrushelper", "worker", "--service", "x", "--status", str(status),
                        "--", "relative/prog"], capture_output=True, text=True, timeout=30)
    assert r.returncode == exitcodes.USAGE and "absolute" in r.stderr

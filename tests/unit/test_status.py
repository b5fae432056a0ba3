"""`cyrushelper status` and `watch` against a fake master and real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cyrushelper import proc
from tests.unit.test_supervisor_fakes import FakeCyrus


@pytest.fixture
def fake(tmp_path):
    return FakeCyrus(tmp_path / "cyrus", channels='"" repl2')


@pytest.fixture
def running(fake):
    """The fake master started directly (its comm is 'master', like Cyrus's)."""
    p = subprocess.Popen([str(fake.bindir / "master"), *fake.args(), "-p", str(fake.pid_file), "-D"],
                         env=fake.env(), start_new_session=True)
    end = time.time() + 10
    while fake.first("master listening") is None and time.time() < end:
        time.sleep(0.02)
    yield p
    proc.kill_session(p.pid)
    p.wait()


def status(fake, *extra):
    r = subprocess.run([sys.executable, "-m", "cyrushelper", "status", *fake.args(), *extra],
                       env=fake.env(), capture_output=True, text=True, timeout=30)
    return r, (json.loads(r.stdout) if "--json" in extra else None)


def test_not_running_is_3_and_reports_backlog(fake):
    (fake.config / "sync" / "log").write_text("MAILBOX user.a\nMAILBOX user.b\n")
    fake.pid_file.write_text("999999\n")  # stale pid file
    r, report = status(fake, "--json")
    assert r.returncode == 3, r.stderr
    assert report["state"] == "not running"
    assert report["master"]["running"] is False and report["master"]["pid"] == 999999
    chans = {c["name"]: c for c in report["channels"]}
    assert chans["default"]["lines"] == 2 and chans["default"]["files"] == ["log"]
    assert chans["repl2"]["lines"] == 0
    r, _ = status(fake)
    assert "stale PID 999999" in r.stdout and "channel default" in r.stdout


def test_running_healthy_is_0(fake, running):
    r, report = status(fake, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["master"]["pid"] == running.pid
    assert report["master"]["processes"] == 3
    assert set(report["listeners"].values()) == {"ok"}
    assert report["fence"]["present"] is False


def test_fence_and_unclean_marker_make_it_degraded_until_acked(fake, running):
    (fake.config / "msg" / "shutdown").write_text("bye\n")
    d = fake.config / "cyrushelper"
    d.mkdir()
    (d / "unclean-stop.json").write_text(json.dumps({"time": "T", "reason": "deadline", "killed_pids": [5]}))
    (d / "last-drain.json").write_text(json.dumps({"result": "drained", "seconds": 1.5}))
    r, report = status(fake, "--json")
    assert r.returncode == 1
    assert report["fence"]["present"] is True
    assert report["unclean_stop"]["reason"] == "deadline"
    assert report["last_drain"]["result"] == "drained"
    r, _ = status(fake)
    assert "UNCLEAN STOP: unclean stop at T (deadline)" in r.stdout and "fence present" in r.stdout
    assert "cleared by: a reconcile" in r.stdout
    assert "last drain: result=drained" in r.stdout
    r, _ = status(fake, "--ack-unclean")
    assert r.returncode == 0
    assert not (d / "unclean-stop.json").exists()
    assert "the last one was cleared" in r.stdout and "status --ack-unclean" in r.stdout


def test_listener_down_is_degraded(fake, running):
    text = fake.cyrus_conf.read_text().replace("SERVICES {\n", "SERVICES {\n  pop3 cmd=\"pop3d\" listen=\"127.0.0.1:1\"\n")
    fake.cyrus_conf.write_text(text)
    r, report = status(fake, "--json")
    assert r.returncode == 1
    assert report["listeners"]["pop3 127.0.0.1:1"] != "ok"


def test_watch_prints_changes(fake, running):
    w = subprocess.Popen([sys.executable, "-m", "cyrushelper", "watch", "--json", "--duration", "3",
                          "--interval", "0.2", *fake.args()], env=fake.env(), stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    (fake.config / "sync" / "repl2").mkdir()
    with open(fake.config / "sync" / "repl2" / "log", "a") as f:
        for i in range(50):
            f.write(f"APPEND user.u{i}\n")
            f.flush()
    out, _ = w.communicate(timeout=20)
    assert w.returncode == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["channels"] == {"default": 0, "repl2": 0}
    assert lines[0]["master_pid"] == running.pid
    assert lines[-1]["channels"]["repl2"] == 50
    assert len(lines) <= 8


def test_watch_notices_master_exit(fake, running):
    w = subprocess.Popen([sys.executable, "-m", "cyrushelper", "watch", "--duration", "3", *fake.args()],
                         env=fake.env(), stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.kill_session(running.pid)
    running.wait()
    out, _ = w.communicate(timeout=20)
    assert f"master {running.pid}" in out.splitlines()[0]
    assert "master not running" in out.splitlines()[-1]


# --------------------------------------------------------------------------- socket mode

def _socket_mode(fake, pid: int, slots: dict[str, list[tuple[int, int]]], served: dict[str, int],
                 listen: str = "127.0.0.1:1") -> None:
    """What `run --listeners systemd` records, and worker status files as Cyrus writes them."""
    from cyrushelper import worker
    d = fake.config / "cyrushelper"
    (d / "workers").mkdir(parents=True, exist_ok=True)
    files = []
    for name, records in slots.items():
        path = d / "workers" / name
        path.write_bytes(b"".join(worker.RECORD.pack(m, p) for m, p in records))
        if name in served:
            (d / "workers" / f"{name}.served").write_text(f"{served[name]}\n")
        files.append(str(path))
    (d / "listeners.json").write_text(json.dumps({
        "mode": "systemd", "unit": "cyrus@x.service", "pid": pid, "start_time": proc.start_time(pid),
        "pools": [{"service": "lmtp", "socket": "cyrus-x-lmtp.socket", "listen": listen, "stream": True,
                   "greets": False, "workers": [f"cyrus-x-{s}.service" for s in slots], "status_files": files}]}))


def test_socket_mode_shows_workers_busy_idle_down_and_connections(fake):
    me, dead = os.getpid(), 999999  # this test process stands in for the supervisor and the workers
    busy, idle = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    try:
        _socket_mode(fake, me, {
            "lmtp@1": [(1, busy.pid), (2, busy.pid), (3, busy.pid)],               # in a connection
            "lmtp@2": [(1, idle.pid), (2, idle.pid), (3, idle.pid), (1, idle.pid)],  # served one, waits
            "lmtp@3": [(1, dead), (2, dead), (3, dead)],                           # gone
        }, served={"lmtp@2": 40})
        r, report = status(fake, "--json", "--no-probe")
        assert r.returncode == 0, r.stdout + r.stderr
        assert report["mode"] == "systemd" and report["master"]["running"] is True
        (service,) = report["services"]
        assert service["workers"] == {"total": 3, "busy": 1, "idle": 1, "down": 1}
        assert service["connections_served"] == 1 + 41 + 1
        r, _ = status(fake, "--no-probe")
        assert "workers 1 busy, 1 idle, 1 down of 3; 43 connections served" in r.stdout
        assert "socket mode" in r.stdout
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()


def test_socket_mode_not_running_and_socket_not_serving(fake):
    _socket_mode(fake, 999999, {"lmtp@1": []}, {})
    r, report = status(fake, "--json")
    assert r.returncode == 3 and report["master"]["running"] is False
    assert report["services"][0]["workers"]["down"] == 1
    _socket_mode(fake, os.getpid(), {"lmtp@1": []}, {}, listen="127.0.0.1:1")  # nothing listens there
    r, report = status(fake, "--json")
    assert r.returncode == 1 and report["services"][0]["serves"] != "ok"

"""`cyrushelper status` and `watch` against a fake master and real files."""

from __future__ import annotations

import json
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

"""The fence (msg/shutdown) and the session grace of `cyrushelper stop`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from cyrushelper import exitcodes, fence
from cyrushelper.config import Instance
from tests.unit.test_supervisor_fakes import FakeCyrus
from tests.bounds import upper


@pytest.fixture
def fake(tmp_path):
    return FakeCyrus(tmp_path / "cyrus")


@pytest.fixture
def instance(fake):
    return Instance.load(fake.imapd_conf, fake.cyrus_conf)


def test_message_rules():
    assert fence.check_message("  back soon ") == "back soon"
    assert fence.check_message("[[maintenance]") == "maintenance]"  # imapd would strip '[' anyway
    for bad in ("", "   ", "two\nlines", "bell\a", "x" * 401, "[["):
        with pytest.raises(ValueError):
            fence.check_message(bad)


def test_write_and_remove(instance, fake):
    (fake.config / "msg").rmdir()  # created on demand
    path = fence.write_fence(instance, "going down")
    assert path == fake.config / "msg" / "shutdown"
    assert path.read_text() == "going down\n"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert fence.fence_present(instance)
    assert fence.remove_fence(instance) is True
    assert fence.remove_fence(instance) is False


def _proc_file(fake, pid, service="imap", user="alice"):
    (fake.config / "proc" / str(pid)).write_text(f"{service}\tlocalhost [127.0.0.1]\t{user}\tuser.{user}\t\n")


def test_sessions_skip_dead_pids_and_temp_files(instance, fake):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        _proc_file(fake, sleeper.pid)
        dead = subprocess.Popen(["true"])
        dead.wait()
        _proc_file(fake, dead.pid)  # a process killed hard leaves its file behind
        (fake.config / "proc" / f"{sleeper.pid}.new").write_text("imap\t\t\t\t\n")
        found = fence.sessions(instance)
        assert [(s.pid, s.service, s.user) for s in found] == [(sleeper.pid, "imap", "alice")]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_grace_ends_early_when_the_last_session_ends(instance, fake):
    sleeper = subprocess.Popen(["sleep", "30"])
    _proc_file(fake, sleeper.pid)

    def end_session():
        time.sleep(0.4)
        os.unlink(fake.config / "proc" / str(sleeper.pid))
    threading.Thread(target=end_session).start()
    try:
        t0 = time.monotonic()
        left = fence.wait_for_sessions(instance, grace=10)
        waited = time.monotonic() - t0
    finally:
        sleeper.kill()
        sleeper.wait()
    assert left == []
    assert 0.3 < waited < 10 / 2   # ended with the session, not with the grace


def test_grace_is_bounded(instance, fake):
    sleeper = subprocess.Popen(["sleep", "30"])
    _proc_file(fake, sleeper.pid)
    try:
        t0 = time.monotonic()
        left = fence.wait_for_sessions(instance, grace=0.6)
        assert 0.6 <= time.monotonic() - t0 < upper(0.6)
        assert [s.pid for s in left] == [sleeper.pid]
    finally:
        sleeper.kill()
        sleeper.wait()


def _stop(fake, *extra):
    return subprocess.run([sys.executable, "-m", "cyrushelper", "stop", *fake.args(), *extra],
                          env=fake.env(), capture_output=True, text=True, timeout=30)


def test_stop_without_master_writes_no_fence(fake):
    r = _stop(fake)
    assert r.returncode == 0, r.stderr
    assert "no master running" in r.stderr
    assert not (fake.config / "msg" / "shutdown").exists()


def test_stop_force_writes_fence_with_message(fake):
    r = _stop(fake, "--force", "--grace", "0", "--message", "Moving to the new server")
    assert r.returncode == 0, r.stderr
    assert (fake.config / "msg" / "shutdown").read_text() == "Moving to the new server\n"


def test_stop_refuses_bad_message_and_grace(fake):
    assert _stop(fake, "--message", "a\nb").returncode == exitcodes.USAGE
    assert _stop(fake, "--grace", "-1").returncode == exitcodes.USAGE


def test_replication_processes_are_not_sessions(tmp_path, fake):
    """A sync_server serving the primary's rolling client (named by its cyrus.conf entry), and
    Cyrus 3.10's rolling sync_client registering itself, do not end because of the fence: the
    grace must not wait for them (issue 13: every replica stop waited its full 5 s)."""
    conf = fake.cyrus_conf.read_text().replace(
        "SERVICES {\n", f'SERVICES {{\n  syncsrv cmd="sync_server -C {fake.imapd_conf}" listen="127.0.0.1:1"\n')
    fake.cyrus_conf.write_text(conf)
    inst = Instance.load(fake.imapd_conf, fake.cyrus_conf)
    sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    try:
        _proc_file(fake, sleepers[0].pid, service="syncsrv", user="repl")
        _proc_file(fake, sleepers[1].pid, service="sync_client", user="")
        _proc_file(fake, sleepers[2].pid, service="imap", user="alice")
        assert [s.pid for s in fence.sessions(inst)] == [sleepers[2].pid]
        everything = fence.sessions(inst, replication=True)
        assert sorted((s.service, s.replication) for s in everything) == [
            ("imap", False), ("sync_client", True), ("syncsrv", True)]
        os.unlink(fake.config / "proc" / str(sleepers[2].pid))
        # with replication counted, this would wait the whole grace and return them
        assert fence.wait_for_sessions(inst, grace=30) == []
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


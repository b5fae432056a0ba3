"""The fence (msg/shutdown) and the session grace of `cyrushelper stop`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from cyrushelper import exitcodes, fence, proc
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


@pytest.mark.parametrize("pid_file", ["absent", "dead process", "live process that is no master"])
def test_stop_without_master_writes_no_fence(fake, pid_file):
    """A fence left by a stop of an instance that does not run would greet its next start's users
    with BYE (run removes it, but a manual start of master would not)."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        if pid_file == "dead process":
            dead = subprocess.Popen(["true"])
            dead.wait()
            fake.pid_file.write_text(f"{dead.pid}\n")
        elif pid_file != "absent":
            fake.pid_file.write_text(f"{other.pid}\n")  # the PID was reused since master exited
        r = _stop(fake)
    finally:
        other.kill()
        other.wait()
    assert r.returncode == 0, r.stderr
    assert "no master running" in r.stderr
    assert not (fake.config / "msg" / "shutdown").exists()


def test_stop_with_a_running_master_writes_the_fence(fake):
    master = subprocess.Popen([str(fake.bindir / "master"), *fake.args(), "-p", str(fake.pid_file), "-D"],
                              env=fake.env("no_listen"), start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while fake.first("master start") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        r = _stop(fake, "--grace", "0")
    finally:
        proc.kill_session(master.pid)   # master and the children it forked (they outlive a lone master)
        master.wait()
    assert r.returncode == 0, r.stderr
    assert (fake.config / "msg" / "shutdown").exists()


def test_stop_force_writes_fence_with_message(fake):
    r = _stop(fake, "--force", "--grace", "0", "--message", "Moving to the new server")
    assert r.returncode == 0, r.stderr
    assert (fake.config / "msg" / "shutdown").read_text() == "Moving to the new server\n"


def test_stop_refuses_bad_message_and_grace(fake):
    assert _stop(fake, "--message", "a\nb").returncode == exitcodes.USAGE
    assert _stop(fake, "--grace", "-1").returncode == exitcodes.USAGE


@contextlib.contextmanager
def _registered(fake, *services):
    """A live process for each (service, user), with its proc_path file; yields their PIDs."""
    sleepers = [subprocess.Popen(["sleep", "30"]) for _ in services]
    try:
        for p, (service, user) in zip(sleepers, services):
            _proc_file(fake, p.pid, service=service, user=user)
        yield [p.pid for p in sleepers]
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


def test_replication_processes_are_not_sessions(tmp_path, fake):
    """A sync_server serving the primary's rolling client (named by its cyrus.conf entry), and
    Cyrus 3.10's rolling sync_client registering itself, do not end because of the fence: the
    grace must not wait for them (issue 13: every replica stop waited its full 5 s)."""
    conf = fake.cyrus_conf.read_text().replace(
        "SERVICES {\n", f'SERVICES {{\n  syncsrv cmd="sync_server -C {fake.imapd_conf}" listen="127.0.0.1:1"\n')
    fake.cyrus_conf.write_text(conf)
    inst = Instance.load(fake.imapd_conf, fake.cyrus_conf)
    with _registered(fake, ("syncsrv", "repl"), ("sync_client", ""), ("imap", "alice")) as pids:
        assert [s.pid for s in fence.sessions(inst)] == [pids[2]]
        everything = fence.sessions(inst, replication=True)
        assert sorted((s.service, s.replication) for s in everything) == [
            ("imap", False), ("sync_client", True), ("syncsrv", True)]
        os.unlink(fake.config / "proc" / str(pids[2]))
        # with replication counted, this would wait the whole grace and return them
        assert fence.wait_for_sessions(inst, grace=30) == []


def test_daemon_and_event_children_are_not_sessions(fake):
    """Cyrus >= 3.10's master registers its DAEMON and EVENTS children in proc_path (no client, no
    user); the fence does not end them, so the grace must not wait for them (measured on 3.10.2:
    every stop with a DAEMON entry waited the whole grace)."""
    conf = fake.cyrus_conf.read_text()
    conf += '\nDAEMON {\n  idled cmd="idled"\n}\n'
    if "EVENTS {" in conf:
        conf = conf.replace("EVENTS {\n", 'EVENTS {\n  checkpoint cmd="ctl_cyrusdb -c" period=30\n')
    else:
        conf += 'EVENTS {\n  checkpoint cmd="ctl_cyrusdb -c" period=30\n}\n'
    fake.cyrus_conf.write_text(conf)
    inst = Instance.load(fake.imapd_conf, fake.cyrus_conf)
    with _registered(fake, ("idled", ""), ("checkpoint", ""), ("imap", "alice")) as pids:
        assert [s.pid for s in fence.sessions(inst)] == [pids[2]]
        os.unlink(fake.config / "proc" / str(pids[2]))
        assert fence.wait_for_sessions(inst, grace=30) == []
# --------------------------------------------------------------------------- deliveries in flight

@pytest.fixture
def lmtp_listener(fake):
    """Stands in for lmtpd on the fake cyrus.conf's LMTP port: (listener, accept())."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", fake.lmtp_port))
    listener.listen(8)
    opened = [listener]

    def connect() -> socket.socket:
        opened.append(socket.create_connection(("127.0.0.1", fake.lmtp_port)))
        opened.append(listener.accept()[0])
        return opened[-1]
    yield connect
    for s in opened:
        s.close()


def test_deliveries_are_the_lmtp_connections_open_at_the_fence(instance, fake, lmtp_listener):
    assert [str(listen) for listen in fence.delivery_listeners(instance)] == [f"127.0.0.1:{fake.lmtp_port}"]
    first, second = lmtp_listener(), lmtp_listener()
    with socket.socket() as imap:  # an IMAP connection is a session (proc_path), not a delivery
        imap.bind(("127.0.0.1", fake.imap_port))
        imap.listen(1)
        deliveries = fence.Deliveries(instance)
    assert deliveries.left() == {os.fstat(s.fileno()).st_ino for s in (first, second)}
    lmtp_listener()  # opened after the fence: MAIL would get 421, it cannot be inside a transaction
    first.close()
    assert deliveries.left() == {os.fstat(second.fileno()).st_ino}


def test_grace_waits_for_an_open_delivery_and_ends_when_it_closes(instance, fake, lmtp_listener):
    server_side = lmtp_listener()
    deliveries = fence.Deliveries(instance)
    threading.Timer(0.4, server_side.close).start()
    t0 = time.monotonic()
    left = fence.wait_for_sessions(instance, grace=10, deliveries=deliveries)
    assert left == [] and deliveries.left() == set()
    assert 0.3 < time.monotonic() - t0 < 5


def test_grace_for_deliveries_is_bounded(instance, fake, lmtp_listener):
    lmtp_listener()
    deliveries = fence.Deliveries(instance)
    t0 = time.monotonic()
    fence.wait_for_sessions(instance, grace=0.6, deliveries=deliveries)
    assert 0.5 < time.monotonic() - t0 < 3
    assert len(deliveries.left()) == 1


@contextlib.contextmanager
def stop_in_background(*args: str, env: dict | None = None):
    """`cyrushelper stop ARGS` running (stderr piped); killed at the end if it still runs."""
    stop = subprocess.Popen([sys.executable, "-m", "cyrushelper", "stop", *args], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield stop
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait()


def assert_ends_once_nothing_is_left(stop: subprocess.Popen) -> None:
    assert stop.wait(timeout=30) == 0
    assert "no session and no LMTP delivery left" in stop.stderr.read()


def test_stop_waits_for_a_delivery_in_flight(fake, lmtp_listener):
    server_side = lmtp_listener()
    with stop_in_background(*fake.args(), "--force", "--grace", "60", env=fake.env()) as stop:
        said = stop.stderr.readline()
        assert "0 session(s) and 1 LMTP connection(s) open" in said, said
        with pytest.raises(subprocess.TimeoutExpired):
            stop.wait(timeout=1.5)  # still waiting: the delivery may be inside a transaction
        server_side.close()
        assert_ends_once_nothing_is_left(stop)

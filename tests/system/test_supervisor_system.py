"""`cyrushelper run` / `stop` / `status` with a REAL Cyrus 3.6 on the host (no systemd needed).

The helper gets a fake NOTIFY_SOCKET, so READY/STOPPING/STATUS are observed exactly as systemd
would receive them. Ports from the shared allocator ($CYRUSHELPER_TEST_PORT_BASE, per run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cyrushelper import exitcodes, proc
from testbed.mail import message, message_ids
from testbed.pair import CyrusPair

from tests.conftest import require_syslog_capture
from tests.unit.test_fence import assert_ends_once_nothing_is_left, stop_in_background
from tests.unit.test_supervisor_fakes import NotifySocket  # noqa: E402

pytestmark = pytest.mark.system

UNEXPECTED = "graceful shutdown initiated by unexpected process"


@pytest.fixture
def pair(syslog_sink):
    from tests.conftest import next_port_base
    # not a fixed base: concurrent runs on one host (each with its own $CYRUSHELPER_TEST_PORT_BASE)
    # raced for it between the free-port check and master's bind
    base = next_port_base()
    root = Path(tempfile.mkdtemp(prefix="cyrushelper-e-", dir="/tmp"))
    root.chmod(0o755)
    p = CyrusPair(root, port_base=base).create()
    yield p
    p.stop_all(timeout=10)
    ours = [line for line in syslog_sink.lines() if f"-{p.port_base}/" in line]
    print("\n".join(ours[-150:]))
    if not os.environ.get("CYRUSHELPER_KEEP_LAB"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def notify():
    with tempfile.TemporaryDirectory(prefix="cyhn-", dir="/tmp") as d:
        n = NotifySocket(Path(d))
        yield n
        n.close()


def cli(*args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "cyrushelper", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def conf_args(pair):
    return ["-C", str(pair.primary_imapd_conf), "-M", str(pair.primary_cyrus_conf), "--instance", "primary"]


class Run:
    def __init__(self, pair, notify, *extra):
        env = {**os.environ, "NOTIFY_SOCKET": notify.path}
        env.pop("INVOCATION_ID", None)
        self.t0 = time.time()
        self.p = subprocess.Popen([sys.executable, "-m", "cyrushelper", "run", *conf_args(pair), *extra],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout=60):
        code = self.p.wait(timeout=timeout)
        self.output = self.p.stdout.read()
        return code

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def runs():
    started = []

    def start(*a):
        r = Run(*a)
        started.append(r)
        return r
    yield start
    for r in started:
        r.kill()


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_ready_fence_and_clean_stop_with_one_sigterm(pair, notify, runs, syslog_sink):
    # the journal/syslog probe for a double SIGTERM must be able to match, or its silence proves nothing
    require_syslog_capture(syslog_sink)
    run = runs(pair, notify)
    t_ready, fields = notify.wait_for("READY", "1", timeout=30)
    master = proc.running_master(pair.pid_file("primary"))
    [idle] = [p for p in proc.session_members(master) if proc.comm(p) == "lmtpd"]  # READY's probe left it
    proc.signal_pids([idle], signal.SIGTERM)  # from us, not from master: Cyrus must say so
    assert syslog_sink.wait_for(f"{UNEXPECTED} {os.getpid()} ", timeout=10), "the probe cannot match"
    mark = syslog_sink.mark()
    # READY means serving: the IMAP greeting is there at once
    with socket.create_connection(("127.0.0.1", pair.ports.primary_imap), timeout=2) as s:
        assert read_until(s, b"\r\n", 2).startswith(b"* OK")
    assert "backlog default=0" in fields["STATUS"]
    assert not notify.has("STOPPING")
    print(f"start -> READY {t_ready - run.t0:.2f}s")

    # a logged-in IMAP user and an LMTP client in the middle of a session
    imap = socket.create_connection(("127.0.0.1", pair.ports.primary_imap), timeout=10)
    read_until(imap, b"\r\n")
    imap.sendall(b"a1 LOGIN alice alicepass\r\n")
    assert b"a1 OK" in read_until(imap, b"a1 ")
    lmtp = socket.create_connection(("127.0.0.1", pair.ports.primary_lmtp), timeout=10)
    assert read_until(lmtp, b"\r\n").startswith(b"220")
    lmtp.sendall(b"LHLO test\r\n")
    read_until(lmtp, b"250 ")

    stop = subprocess.Popen([sys.executable, "-m", "cyrushelper", "stop", *conf_args(pair), "--grace", "8",
                             "--message", "Maintenance by helper E"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fence = pair.config_dir("primary") / "msg" / "shutdown"
    end = time.time() + 10
    while not fence.exists() and time.time() < end:
        time.sleep(0.02)
    # imapd looks for the fence before it blocks reading the next command: a client idle since
    # before the fence gets its next answer, then the BYE
    imap.sendall(b"a2 NOOP\r\n")
    bye = read_until(imap, b"* BYE")
    bye += read_until(imap, b"\r\n") if not bye.endswith(b"\r\n") else b""
    assert b"a2 OK" in bye and b"* BYE [ALERT] Maintenance by helper E\r\n" in bye, bye
    lmtp.sendall(b"MAIL FROM:<x@example.org>\r\n")
    refused = read_until(lmtp, b"\r\n")
    assert refused.startswith(b"421 4.3.2 Maintenance by helper E"), refused
    imap.close()
    lmtp.close()
    t_fence = time.time()
    out, _ = stop.communicate(timeout=30)
    assert stop.returncode == 0, out
    assert time.time() - t_fence < 8 / 2, "the grace (8 s) did not end early once no session was left"
    assert not notify.has("STOPPING"), "the fence must not arm systemd's stop timer"

    assert proc.running_master(pair.pid_file("primary")) == master
    run.p.send_signal(signal.SIGTERM)
    assert run.wait() == exitcodes.OK, run.output
    notify.wait_for("STOPPING", "1")
    assert not proc.alive(master) and proc.session_members(master) == []
    assert not fence.exists(), "the fence is removed once nothing of the instance runs"
    time.sleep(0.5)  # syslog datagrams of the last exiting children
    assert syslog_sink.grep(UNEXPECTED, mark) == [], "a child saw a SIGTERM that did not come from master"
    r = cli("status", "--json", *conf_args(pair))
    assert r.returncode == 3
    report = json.loads(r.stdout)
    assert report["last_stop"]["result"] == "clean" and report["unclean_stop"] is None
    print(f"clean stop took {report['last_stop']['seconds']}s")


def test_stuck_daemon_gives_bounded_unclean_stop_then_auto_reconcile(pair, notify, runs, syslog_sink):
    # a DAEMON entry that ignores SIGTERM, like a child stuck in a long operation
    stuck = pair.root / "stuck.sh"
    stuck.write_text("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 1; done\n")
    stuck.chmod(0o755)
    conf = pair.primary_cyrus_conf
    conf.write_text(conf.read_text() + f'\nDAEMON {{\n  stuck cmd="{stuck}"\n}}\n')
    run = runs(pair, notify, "--stop-timeout", "3")
    notify.wait_for("READY", "1", timeout=30)
    master = proc.running_master(pair.pid_file("primary"))
    t0 = time.monotonic()
    run.p.send_signal(signal.SIGTERM)
    assert run.wait() == exitcodes.UNCLEAN_STOP, run.output
    took = time.monotonic() - t0
    print(f"bounded stop took {took:.2f}s")
    assert 2.9 < took < 10
    assert proc.session_members(master) == []
    statuses = [f.get("STATUS", "") for _, f in notify.drain()]
    assert any("children left" in s for s in statuses), statuses
    r = cli("status", "--json", *conf_args(pair))
    report = json.loads(r.stdout)
    assert r.returncode == 3
    assert master in report["unclean_stop"]["killed_pids"]
    assert report["last_stop"]["result"] == "unclean"
    r = cli("status", *conf_args(pair))
    assert "UNCLEAN STOP" in r.stdout

    # the next start with --reconcile=auto runs sync_client -A against the replica and clears it
    conf.write_text(conf.read_text().replace(f'  stuck cmd="{stuck}"\n', ""))
    pair.start("replica")
    notify.drain().clear()
    run2 = runs(pair, notify, "--reconcile", "auto", "--stop-timeout", "10")
    notify.wait_for("READY", "1", timeout=30)
    marker = pair.config_dir("primary") / "cyrushelper" / "unclean-stop.json"
    end = time.time() + 60
    while marker.exists() and time.time() < end:
        time.sleep(0.1)
    assert not marker.exists(), "reconcile did not clear the marker"
    run2.p.send_signal(signal.SIGTERM)
    assert run2.wait() == exitcodes.OK, run2.output
    assert "every channel re-synced" in run2.output


def _lmtp_in_flight(address, rcpt: str, tag: str) -> tuple[smtplib.LMTP, bytes]:
    """An LMTP transaction inside its body: MAIL, RCPT and DATA accepted, half the message sent.
    Returns the connection and the rest of the message (with the end of data)."""
    conn = smtplib.LMTP(*address) if isinstance(address, tuple) else smtplib.LMTP(address)
    assert conn.ehlo()[0] == 250
    assert conn.docmd("MAIL FROM:<sender@lab.test>")[0] == 250
    assert conn.docmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert conn.docmd("DATA")[0] == 354
    _, body = message(tag, 0, rcpt)
    half = body.index(b"\r\n", len(body) // 2) + 2
    conn.send(body[:half])
    return conn, body[half:] + b".\r\n"


def test_stop_lets_lmtp_deliveries_in_flight_finish(pair):
    """lmtpd registers no session: the grace must still wait for a delivery inside its body, on a
    TCP and on a UNIX listener, and end once they finished; what the fence refuses gets 421."""
    socket_path = pair.config_dir("primary") / "socket" / "lmtp"
    conf = pair.primary_cyrus_conf
    conf.write_text(conf.read_text().replace("SERVICES {\n", "SERVICES {\n  lmtpunix cmd=\"lmtpd -C "
                                             f"{pair.primary_imapd_conf} -a\" listen=\"{socket_path}\"\n"))
    pair.start("primary")
    tcp, tcp_rest = _lmtp_in_flight(("127.0.0.1", pair.ports.primary_lmtp), "alice", "fence-tcp")
    unix, unix_rest = _lmtp_in_flight(str(socket_path), "bob", "fence-unix")
    idle = smtplib.LMTP("127.0.0.1", pair.ports.primary_lmtp)
    assert idle.ehlo()[0] == 250            # connected, no transaction

    with stop_in_background(*conf_args(pair), "--grace", "60") as stop:
        said = stop.stderr.readline()
        assert "0 session(s) and 3 LMTP connection(s) open" in said, said
        with pytest.raises(subprocess.TimeoutExpired):
            stop.wait(timeout=1.5)
        assert idle.docmd("MAIL FROM:<sender@lab.test>")[0] == 421   # the fence: no new transaction
        tcp.send(tcp_rest)
        assert tcp.getreply()[0] == 250                                # finished, not cut
        assert tcp.docmd("MAIL FROM:<sender@lab.test>")[0] == 421
        with pytest.raises(subprocess.TimeoutExpired):
            stop.wait(timeout=1.5)                                     # the UNIX one is still open
        unix.send(unix_rest)
        assert unix.getreply()[0] == 250
        assert unix.docmd("QUIT")[0] == 221
        assert_ends_once_nothing_is_left(stop)
    for conn in (tcp, unix, idle):
        conn.close()
    (pair.config_dir("primary") / "msg" / "shutdown").unlink()
    assert "<fence-tcp-0@lab.test>" in message_ids(pair.ports.primary_imap, "alice")
    assert "<fence-unix-0@lab.test>" in message_ids(pair.ports.primary_imap, "bob")

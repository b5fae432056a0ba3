"""probe.Prober: READY on Cyrus 3.6 from probes run in the event loop, woken by what happens."""

from __future__ import annotations

import select
import socket
import time

import pytest

from cyrushelper import probe, proc
from cyrushelper.config import Instance
from tests.unit.test_supervisor_fakes import free_port

HANG_GUARD = 30.0   # only against a hang: each step here takes milliseconds


def instance(tmp_path, services: str) -> Instance:
    imapd = tmp_path / "imapd.conf"
    imapd.write_text(f"configdirectory: {tmp_path / 'config'}\n")
    cyrus = tmp_path / "cyrus.conf"
    cyrus.write_text("SERVICES {\n" + services + "}\n")
    return Instance.load(imapd, cyrus, "probe")


def listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(8)
    return s


def run_until(loop: proc.Loop, prober: probe.Prober, condition) -> None:
    """Turn the loop as run does until `condition` (which the test's own server may make true:
    hence short polls)."""
    end = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < end, "condition never reached"
        due = prober.step()
        loop.poll(0.01 if due is None else min(0.01, max(0.0, due - prober.clock())))


@pytest.fixture
def loop():
    with proc.Loop() as loop:
        yield loop


def test_a_refused_listener_is_tried_again_until_it_greets(tmp_path, loop):
    port = free_port()
    prober = probe.Prober(instance(tmp_path, f'  imap cmd="imapd" listen="127.0.0.1:{port}"\n'), loop.selector)
    name = f"imap 127.0.0.1:{port}"
    run_until(loop, prober, lambda: prober.failures[name] == "Connection refused")
    assert not prober.served
    assert prober.step() is not None   # a retry is due: nothing else would ever wake the loop for it
    server = listener(port)  # master binds: the next retry connects, then waits for the greeting
    try:
        run_until(loop, prober, lambda: select.select([server], [], [], 0)[0])
        conn, _ = server.accept()
        for _ in range(5):   # connected, no greeting yet: not served, however often we look
            loop.poll(0.01)
            prober.step()
        assert not prober.served
        conn.sendall(b"* OK ready\r\n")  # a child of the running loop greets
        run_until(loop, prober, lambda: prober.served)
        assert prober.failures == {} and prober.step() is None
        conn.close()
    finally:
        server.close()
        prober.close()


def test_a_service_that_does_not_speak_first_is_served_once_it_accepts(tmp_path, loop):
    port = free_port()
    inst = instance(tmp_path, f'  syncserver cmd="sync_server" listen="127.0.0.1:{port}"\n')
    server = listener(port)
    prober = probe.Prober(inst, loop.selector)
    try:
        run_until(loop, prober, lambda: prober.served)
    finally:
        server.close()
        prober.close()


def test_a_listener_closing_without_greeting_is_not_served(tmp_path, loop):
    port = free_port()
    server = listener(port)
    prober = probe.Prober(instance(tmp_path, f'  lmtp cmd="lmtpd" listen="127.0.0.1:{port}"\n'), loop.selector)
    try:
        prober.step()
        conn, _ = server.accept()
        conn.close()
        run_until(loop, prober, lambda: prober.failures.get(f"lmtp 127.0.0.1:{port}") == "closed without greeting")
        assert not prober.served
    finally:
        server.close()
        prober.close()

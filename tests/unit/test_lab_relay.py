"""testbed.relay: the throttling relay that makes a drain slow by construction (lower bound
bytes/rate), forwarding every byte both ways."""

from __future__ import annotations

import socket
import threading
import time

from testbed.relay import ThrottlingRelay, read_record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_relay_forwards_both_ways_and_takes_at_least_bytes_over_rate(tmp_path):
    upstream = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def echo_once():
        conn, _ = upstream.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)
            conn.sendall(b"bye")

    threading.Thread(target=echo_once, daemon=True).start()
    rate, payload = 200_000.0, b"x" * 100_000
    relay = ThrottlingRelay(_free_port(), upstream.getsockname()[1], rate, tmp_path / "record")
    threading.Thread(target=relay.serve, daemon=True).start()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", relay.listen_port)) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := c.recv(100):
            answer += chunk
    elapsed = time.monotonic() - t0
    relay.stop()
    assert bytes(received) == payload and answer == b"bye"
    # the lower bound is the relay's own construction: every chunk costs len/rate seconds
    assert elapsed >= len(payload) / rate
    assert read_record(tmp_path / "record") == {"up": len(payload), "down": 3}

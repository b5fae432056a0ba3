"""A throttling TCP relay: makes replication slow on purpose, whatever the machine's speed.

    python -m testbed relay ROOT --port-base N --rate 100000 --record FILE

listens on the pair's relay port (the primary's sync_port when the pair was created with
--sync-relay) and forwards to the replica's sync_server. Every chunk going towards the replica is
followed by a sleep of len(chunk)/rate seconds before the next one is read, so moving B bytes
takes at least B/rate seconds: a lower bound by construction, not a hope about the CPU. The record
file holds the bytes forwarded so far ({"up": N, "down": M}), rewritten after every chunk.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

CHUNK = 4096


class ThrottlingRelay:
    def __init__(self, listen_port: int, target_port: int, rate: float, record: Path,
                 host: str = "127.0.0.1"):
        if rate <= 0:
            raise ValueError("rate must be > 0 bytes/s")
        self.listen_port, self.target_port, self.rate, self.host = listen_port, target_port, rate, host
        self.record = Path(record)
        self.bytes = {"up": 0, "down": 0}
        self._lock = threading.Lock()
        self._server = socket.create_server((host, listen_port), reuse_port=False)
        self._stopped = threading.Event()

    def serve(self) -> None:
        self._write_record()
        self._server.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._connection, args=(client,), daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self._server.close()
        self._write_record()

    def _connection(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((self.host, self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        down = threading.Thread(target=self._pump, args=(upstream, client, "down", False), daemon=True)
        down.start()
        self._pump(client, upstream, "up", True)
        down.join()
        client.close()
        upstream.close()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, throttle: bool) -> None:
        how = socket.SHUT_WR   # EOF: pass the half-close on, the other direction goes on
        try:
            while data := src.recv(CHUNK):
                dst.sendall(data)
                with self._lock:
                    self.bytes[direction] += len(data)
                self._write_record()
                if throttle:
                    time.sleep(len(data) / self.rate)
        except OSError:
            how = socket.SHUT_RDWR   # a reset: end both directions
        for sock, flag in ((dst, how), (src, socket.SHUT_RDWR if how == socket.SHUT_RDWR else None)):
            if flag is not None:
                try:
                    sock.shutdown(flag)
                except OSError:
                    pass

    def _write_record(self) -> None:
        with self._lock:
            tmp = self.record.with_name(self.record.name + ".tmp")
            tmp.write_text(json.dumps(self.bytes))
            os.replace(tmp, self.record)


def read_record(record: Path) -> dict[str, int]:
    try:
        return json.loads(Path(record).read_text())
    except (OSError, ValueError):
        return {"up": 0, "down": 0}

"""What a unit says and does, and when, seen from inside a throwaway container (for the benchmarks).

    python -m testbed.observe OUT --tap SOCKET [--watch DIR ...]       until SIGTERM
    python -m testbed.observe OUT --probe HOST:PORT ... [--timeout S]   until every listener greets
    python -m testbed.observe OUT --knock HOST:PORT --after FILE [--seconds S]

Each record is one JSON line in OUT; `t` is CLOCK_MONOTONIC in seconds, the same clock on the host
and in the container (the container has no time namespace), so the host can compare it with
`systemctl show -p …TimestampMonotonic` and with its own clock.

- tap: a datagram socket for the unit's NOTIFY_SOCKET (pointed here by a benchmark's drop-in).
  Every sd_notify datagram is recorded with its sender's PID and relayed to systemd's own socket
  with the sender's credentials (root may name another process in SCM_CREDENTIALS), so systemd
  treats it exactly as if the unit's process had sent it: READY=1 still starts the unit.
- watch: inotify on directories: every close of a file opened for writing (Cyrus opens, appends,
  fsyncs and closes the sync log for each line: imap/sync_log.c) and every file created (Cyrus
  3.10's master.ready).
- probe: connects to each listener every millisecond until it accepts and greets: the moment Cyrus
  serves, as a client sees it. A probe that connects but gets no greeting waits for it (no retry).
- knock: once FILE exists (bench_stop.py: one its DAEMON child creates at master's SIGTERM), opens a connection to a listener
  every 10 ms for S seconds (at most 500) and keeps it open without a word, like clients that keep connecting
  during a stop. Connections queued on a listen socket of a master in shutdown are what makes
  Cyrus < 3.12 hang after its last child (#5309: pselect returns at once, SIGCHLD is never seen).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from testbed.container import CONTAINER_ENV

SYSTEMD_NOTIFY = "/run/systemd/notify"
IN_CLOSE_WRITE, IN_CREATE, IN_MOVED_TO = 0x8, 0x100, 0x80
_EVENT = struct.Struct("iIII")
_CREDS = struct.Struct("3i")


class Recorder:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1, encoding="utf-8")

    def __call__(self, kind: str, **fields) -> None:
        self.f.write(json.dumps({"t": round(time.monotonic(), 6), "kind": kind, **fields}) + "\n")


def tap_socket(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s.bind(path)
    os.chmod(path, 0o666)
    return s


def relay_one(tap: socket.socket, out: socket.socket, record: Recorder) -> None:
    data, ancillary, _, _ = tap.recvmsg(65536, socket.CMSG_SPACE(_CREDS.size))
    pid = uid = gid = 0
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, uid, gid = _CREDS.unpack(payload[:_CREDS.size])
    text = data.decode("utf-8", "replace")
    record("notify", pid=pid, fields=dict(line.split("=", 1) for line in text.splitlines() if "=" in line))
    try:
        out.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, _CREDS.pack(pid, uid, gid))],
                   0, SYSTEMD_NOTIFY)
    except OSError as e:
        record("relay-error", error=str(e))


def inotify(directories: list[str]) -> tuple[int, dict[int, str]]:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    wds = {}
    for d in directories:
        wd = libc.inotify_add_watch(fd, os.fsencode(d), IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")
        wds[wd] = d
    return fd, wds


def read_events(fd: int, wds: dict[int, str], record: Recorder) -> None:
    try:
        buf = os.read(fd, 65536)
    except BlockingIOError:
        return
    pos = 0
    while pos < len(buf):
        wd, mask, _, length = _EVENT.unpack_from(buf, pos)
        name = buf[pos + _EVENT.size:pos + _EVENT.size + length].rstrip(b"\0").decode("utf-8", "replace")
        pos += _EVENT.size + length
        kind = "write" if mask & IN_CLOSE_WRITE else "created"
        record(kind, dir=wds.get(wd, "?"), name=name)


def tap_and_watch(record: Recorder, tap_path: str | None, directories: list[str]) -> int:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    tap = tap_socket(tap_path) if tap_path else None
    out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fd, wds = inotify(directories) if directories else (None, {})
    record("started", tap=tap_path, watch=directories)
    readers = [x for x in (tap, fd) if x is not None]
    while not stop:
        try:
            ready, _, _ = select.select(readers, [], [])
        except InterruptedError:
            continue
        if tap is not None and tap in ready:
            relay_one(tap, out, record)
        if fd is not None and fd in ready:
            read_events(fd, wds, record)
    return 0


def probe_until_served(record: Recorder, targets: list[tuple[str, int]], timeout: float) -> int:
    """Non-blocking connects, one per listener at a time, retried every millisecond while refused."""
    pending: dict[tuple[str, int], socket.socket | None] = {t: None for t in targets}
    record("probing", targets=[f"{h}:{p}" for h, p in targets])
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        for target, s in list(pending.items()):
            if s is None:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                code = s.connect_ex(target)
                if code not in (0, errno.EINPROGRESS):
                    s.close()
                    continue
                pending[target] = s
        sockets = [s for s in pending.values() if s is not None]
        readable, _, _ = select.select(sockets, [], [], 0.001)
        for target, s in list(pending.items()):
            if s is None or s not in readable:
                continue
            try:
                data = s.recv(256)
            except OSError:
                data = b""
            s.close()
            if data:
                record("serving", listener=f"{target[0]}:{target[1]}", greeting=data[:40].decode("ascii", "replace"))
                del pending[target]
            else:
                pending[target] = None   # refused or closed: try again
    for s in pending.values():
        if s is not None:
            s.close()
    return 0 if not pending else 1


def knock(record: Recorder, target: tuple[str, int], after: str, seconds: float) -> int:
    directory, name = os.path.split(after)
    fd, wds = inotify([directory])
    record("waiting", file=after)
    while not os.path.exists(after):
        select.select([fd], [], [], 1.0)
        read_events(fd, wds, lambda *a, **k: None)
    record("knocking", target=f"{target[0]}:{target[1]}")
    held, end = [], time.monotonic() + seconds
    while time.monotonic() < end and len(held) < 500:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(target)
        held.append(s)
        time.sleep(0.01)
    record("knocked", connections=len(held))
    for s in held:
        s.close()
    return 0


class Observer:
    """The host's side: this module run inside a container (all its namespaces, the container's
    Python) writing to `out`, a file the host reads too (the work directory is bound at the same
    path); `records()` reads what it wrote so far."""

    def __init__(self, box, out: Path, *args: str):
        self.out = out
        argv = ["nsenter", "-t", str(box.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--",
                "setpriv", "--pdeathsig", "KILL", "--", box.python, "-m", "testbed.observe", str(out), *args]
        self.p = subprocess.Popen(argv, env={**CONTAINER_ENV, **box.python_env})

    def records(self, kind: str | None = None, since: float = 0.0) -> list[dict]:
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = [json.loads(line) for line in lines if line.strip()]
        return [r for r in found if (kind is None or r["kind"] == kind) and r["t"] >= since]

    def wait_started(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not self.records():  # its first record: it is listening, probing or waiting
            if time.monotonic() > end or self.p.poll() is not None:
                raise RuntimeError(f"observer did not start (exit {self.p.poll()})")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
        self.p.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.observe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--tap", help="datagram socket path to bind for the unit's NOTIFY_SOCKET")
    parser.add_argument("--watch", action="append", default=[], metavar="DIR")
    parser.add_argument("--probe", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--knock", metavar="HOST:PORT")
    parser.add_argument("--after", metavar="FILE", help="with --knock: start once FILE exists")
    parser.add_argument("--seconds", type=float, default=5.0, help="with --knock: for how long")
    args = parser.parse_args(argv)
    record = Recorder(args.out)
    if args.knock:
        host, _, port = args.knock.rpartition(":")
        return knock(record, (host, int(port)), args.after, args.seconds)
    if args.probe:
        targets = [(h, int(p)) for h, _, p in (x.rpartition(":") for x in args.probe)]
        return probe_until_served(record, targets, args.timeout)
    return tap_and_watch(record, args.tap, args.watch)


if __name__ == "__main__":
    sys.exit(main())

"""Fakes for the supervisor tests (no tests here): a fake Cyrus and a fake NOTIFY_SOCKET.

The fake master behaves like master/master.c where the supervisor depends on it: it writes its
pid file, binds every SERVICES `listen=` port (after an optional slow start), greets connections
like imapd, forks children, and on SIGTERM signals each child once and exits when they are gone.
Its children behave like Cyrus's (lib/signals.c, SA_RESETHAND): the first SIGTERM asks them to
exit, a second one kills them on the spot.
Every SIGTERM/SIGHUP it or a child receives is appended to FAKE_LOG with its sender (si_pid, taken
with sigtimedwait: the signals are blocked and collected, as Cyrus's handler reads si_pid), so a
test can count them and tell master's signals from anyone else's.
Modes (FAKE_MASTER_MODE, comma separated): ignore_term, stuck_child, die_after=S, crash_after=S,
slow_start=S, no_listen, ready_file (behave like 3.10: `-V` says 3.10 and master.ready appears
after READY_DELAY=S), version=X.Y.Z (what `-V` says), hang (after SIGTERM, never reap a child
nor exit: the #5309 hang as seen from outside), slow_exit=S (exit S seconds after the last child was reaped),
slow_child (one child exits only once the file FAKE_RELEASE exists after its SIGTERM).
Every connection master accepts is recorded ("master accepted").
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

FAKE_MASTER = r'''#!@PYTHON@
import os, re, select, signal, socket, sys, time

log_path = os.environ["FAKE_LOG"]
modes = dict((m.split("=") + [""])[:2] for m in os.environ.get("FAKE_MASTER_MODE", "").split(",") if m)

def record(what):
    with open(log_path, "a") as f:
        f.write(f"{time.time():.6f} {os.getpid()} {what}\n")

if sys.argv[1:] == ["-V"]:
    version = modes.get("version") or ("3.10.0" if "ready_file" in modes else "3.6.1")
    print(f"cyrus-imapd {version}-fake")
    sys.exit(0)
args = sys.argv[1:]
opts = {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i] in ("-C", "-M", "-p")}
assert "-D" in args, args
record(f"master start sid={os.getsid(0)} pgid={os.getpgid(0)} ppid={os.getppid()} "
       f"notify={os.environ.get('NOTIFY_SOCKET')}")
with open(opts["-p"], "w") as f:
    f.write(f"{os.getpid()}\n")
imapd = open(opts["-C"]).read()
configdir = re.search(r"^configdirectory:\s*(\S+)", imapd, re.M).group(1)
cyrus_conf = open(opts["-M"]).read()
ports = [int(p) for p in re.findall(r'listen="?[0-9.]*:?(\d+)"?', cyrus_conf)]

if "slow_start" in modes:
    time.sleep(float(modes["slow_start"]))
children = []
# a handler is installed (SigCgt, which the helper reads) but the signals are blocked and taken
# with sigtimedwait, which tells who sent them
signal.signal(signal.SIGTERM, lambda *_: None)
signal.signal(signal.SIGHUP, lambda *_: None)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGHUP])

def received(who, wait):
    info = signal.sigtimedwait([signal.SIGTERM, signal.SIGHUP], wait)
    if info is not None:
        record(f"{who} {signal.Signals(info.si_signo).name} from={info.si_pid}")
    return info

def child(behaviour):
    while received("child", 0.2) is None:
        pass
    if behaviour == "stuck":
        while True:
            time.sleep(0.2)
    # SA_RESETHAND: from now on a second SIGTERM kills at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    if behaviour == "slow":
        while not os.path.exists(os.environ["FAKE_RELEASE"]):
            time.sleep(0.02)
        record("child released")
    os._exit(0)

behaviours = ["obey", "stuck" if "stuck_child" in modes else "slow" if "slow_child" in modes else "obey"]
for behaviour in behaviours:
    pid = os.fork()
    if pid == 0:
        child(behaviour)
    children.append(pid)

in_shutdown = False
def on_signal(info):
    global in_shutdown
    if info.si_signo != signal.SIGTERM or "ignore_term" in modes or in_shutdown:
        return
    in_shutdown = True
    for pid in children:
        os.kill(pid, signal.SIGTERM)

sockets = []
if "no_listen" not in modes:
    for port in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(16)
        sockets.append(s)
    record(f"master listening {ports}")
start = time.time()
last_reaped = start
ready_written = False
while True:
    if "ready_file" in modes and not ready_written and time.time() - start >= float(os.environ.get("READY_DELAY", "0")):
        open(os.path.join(configdir, "master.ready"), "w").close()
        record("master ready file")
        ready_written = True
    for flag, how in (("die_after", "exit"), ("crash_after", "crash")):
        if flag in modes and time.time() - start >= float(modes[flag]):
            record(f"master {how}")
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
    info = received("master", 0)
    if info is not None:
        on_signal(info)
    readable, _, _ = select.select(sockets, [], [], 0.05)
    for s in readable:
        conn, _ = s.accept()
        record("master accepted")
        conn.sendall(b"* OK fake Cyrus ready\r\n")
        conn.close()
    if in_shutdown and "hang" in modes:
        continue  # pselect keeps returning, SIGCHLD is never handled: no reaping, no exit
    for pid in list(children):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            children.remove(pid)
            if not children:
                last_reaped = time.time()
    if in_shutdown and not children:
        if time.time() - last_reaped < float(modes.get("slow_exit") or 0):
            continue
        record("master exit 0")
        sys.exit(0)
'''

FAKE_SYNC_CLIENT = r'''#!@PYTHON@
import os, sys, time
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(f"{time.time():.6f} {os.getpid()} sync_client {' '.join(sys.argv[1:])}\n")
sys.exit(int(os.environ.get("FAKE_SYNC_CLIENT_EXIT", "0")))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n different free ports: each is held until all are chosen (two free_port() calls in a row
    can return the same port, and a fake master then fails to bind its second listener)."""
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


class FakeCyrus:
    """A tree with imapd.conf/cyrus.conf, a bin dir with fake master/sync_client, and the log."""

    def __init__(self, root: Path, channels: str | None = None, sync_client_entry: str = ""):
        self.root = root
        self.config = root / "config"
        for d in ("proc", "sync", "msg"):
            (self.config / d).mkdir(parents=True, exist_ok=True)
        self.bindir = root / "bin"
        self.bindir.mkdir(exist_ok=True)
        for name, text in (("master", FAKE_MASTER), ("sync_client", FAKE_SYNC_CLIENT)):
            path = self.bindir / name
            path.write_text(text.replace("@PYTHON@", sys.executable))
            path.chmod(0o755)
        self.log = root / "fake.log"
        self.log.touch()
        self.imap_port, self.lmtp_port, sync_port = free_ports(3)
        self.imapd_conf = root / "imapd.conf"
        lines = [f"configdirectory: {self.config}", "sync_log: 1", "sync_host: 127.0.0.1",
                 f"sync_port: {sync_port}", f"proc_path: {self.config / 'proc'}",
                 f"partition-default: {root / 'spool'}"]
        if channels is not None:
            lines.append(f"sync_log_channels: {channels}")
        self.imapd_conf.write_text("\n".join(lines) + "\n")
        self.cyrus_conf = root / "cyrus.conf"
        c = f"-C {self.imapd_conf}"
        self.cyrus_conf.write_text(
            "SERVICES {\n"
            f'  imap cmd="imapd {c}" listen="127.0.0.1:{self.imap_port}"\n'
            f'  lmtp cmd="lmtpd {c}" listen="127.0.0.1:{self.lmtp_port}"\n'
            "}\n" + (f"DAEMON {{\n  {sync_client_entry}\n}}\n" if sync_client_entry else ""))

    @property
    def pid_file(self) -> Path:
        return self.config / "master.pid"

    def args(self) -> list[str]:
        return ["-C", str(self.imapd_conf), "-M", str(self.cyrus_conf)]

    def env(self, mode: str = "", **extra) -> dict:
        env = {**os.environ, "CYRUSHELPER_CYRUS_BINDIR": str(self.bindir), "FAKE_LOG": str(self.log),
               "FAKE_MASTER_MODE": mode, **extra}
        env.pop("INVOCATION_ID", None)
        env.pop("JOURNAL_STREAM", None)
        return env

    def _lines(self) -> list[tuple[float, int, str, int | None]]:
        result = []
        for line in self.log.read_text().splitlines():
            t, pid, what = line.split(" ", 2)
            what, _, sender = what.partition(" from=")
            result.append((float(t), int(pid), what, int(sender) if sender else None))
        return result

    def events(self) -> list[tuple[float, int, str]]:
        """(time, PID, what) of every line; a received signal is 'master SIGTERM', 'child SIGHUP' …"""
        return [(t, pid, what) for t, pid, what, _ in self._lines()]

    def count(self, what: str) -> int:
        return sum(1 for _, _, w in self.events() if w == what)

    def senders(self, what: str) -> list[int]:
        """Who sent each signal logged as `what` (e.g. 'child SIGTERM'), in order."""
        return [sender for _, _, w, sender in self._lines() if w == what]

    def first(self, prefix: str) -> tuple[float, int, str] | None:
        return next((e for e in self.events() if e[2].startswith(prefix)), None)


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET; keeps what arrives."""

    def __init__(self, directory: Path):
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict]] = []

    def drain(self) -> list[tuple[float, dict]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.time(), fields))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0,
                 predicate=None) -> tuple[float, dict]:
        end = time.time() + timeout
        seen = 0
        while time.time() < end:
            self.drain()
            for t, fields in self.messages[seen:]:
                if key in fields and (value is None or fields[key] == value) \
                        and (predicate is None or predicate(fields[key])):
                    return t, fields
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got {self.messages}")

    def has(self, key: str, value: str | None = None) -> bool:
        self.drain()
        return any(key in f and (value is None or f[key] == value) for _, f in self.messages)

    def close(self) -> None:
        self.sock.close()

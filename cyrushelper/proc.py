"""Processes: what /proc says about them, signals by PID, ending a child, and waiting for signals.

Cyrus master runs in a session of its own (its PID is the session id), and every service child,
daemon and forked `sync_client -r` stays in that session, so "the session" is the set of processes
a stop must wait for. Every child cyrushelper starts gets a session of its own for the same reason.
Nothing here ever selects a process by name.

- /proc: info, alive, catches, cmdline, children, session_members, pids, unit_of, start_time
- signals by PID: signal_pids, kill_session; ending a child: terminate (SIGTERM, grace, SIGKILL)
- Loop: a selector woken by file descriptors, signals and other threads, for every command that
  waits (run's supervisor, the drain, `watch`)
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    comm: str
    state: str   # R, S, D, Z, T …
    ppid: int
    pgid: int
    sid: int

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def info(pid: int) -> ProcInfo | None:
    """Parse /proc/PID/stat (comm may hold spaces and parentheses: split at the last ')')."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    open_paren, close_paren = raw.find("("), raw.rfind(")")
    if open_paren < 0 or close_paren < 0:
        return None
    fields = raw[close_paren + 2:].split()
    try:
        return ProcInfo(pid=pid, comm=raw[open_paren + 1:close_paren], state=fields[0],
                        ppid=int(fields[1]), pgid=int(fields[2]), sid=int(fields[3]))
    except (IndexError, ValueError):
        return None


def pids() -> list[int]:
    """Every PID visible in /proc (this PID namespace)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def all_processes() -> list[ProcInfo]:
    return [p for p in map(info, pids()) if p is not None]


def alive(pid: int) -> bool:
    """True while PID exists and is not a zombie (a zombie has finished its work)."""
    p = info(pid)
    return p is not None and not p.zombie


def catches(pid: int, sig: int) -> bool:
    """Whether PID has a handler installed for `sig` (SigCgt in /proc/PID/status). Cyrus children
    install theirs with SA_RESETHAND: once a SIGTERM was delivered the bit is gone, and a second
    SIGTERM would kill them at once instead of at the next safe point."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def cmdline(pid: int) -> list[str]:
    """argv of PID ([] if it vanished, is a zombie or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def children(pid: int) -> list[int]:
    return sorted(p.pid for p in all_processes() if p.ppid == pid)


def session_members(sid: int, include_zombies: bool = False) -> list[int]:
    """Every process of session `sid` (the leader included while it exists)."""
    return sorted(p.pid for p in all_processes()
                  if p.sid == sid and (include_zombies or not p.zombie))


def unit_of(pid: int) -> str | None:
    """The systemd unit whose cgroup holds PID (the last component of its cgroup v2 path, when
    that names a .service), None if it vanished or is not in a service's cgroup."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("0::"):
                    name = line.rstrip("\n").rsplit("/", 1)[-1]
                    return name if name.endswith(".service") else None
    except OSError:
        pass
    return None


def unit_members(units: set[str] | frozenset[str]) -> dict[int, str]:
    """{pid: unit} of every live process in the cgroup of one of `units` (socket mode's workers)."""
    found = {}
    for p in all_processes():
        if not p.zombie:
            unit = unit_of(p.pid)
            if unit in units:
                found[p.pid] = unit
    return found


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the PID,
    it names one process for good, where a PID alone may be reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
        return int(raw[raw.rfind(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def signal_pids(pids: list[int], sig: int) -> list[int]:
    """Send `sig` to each PID; return the PIDs that received it (vanished ones are skipped)."""
    hit = []
    for pid in pids:
        if pid <= 1 or pid == os.getpid():
            continue  # never ourselves, never init, never a process group by accident
        try:
            os.kill(pid, sig)
            hit.append(pid)
        except ProcessLookupError:
            pass
    return hit


def kill_session(sid: int) -> list[int]:
    """SIGKILL every live member of session `sid`, by PID. Repeats a few rounds so that a process
    forked between listing and killing is caught too; returns every PID killed."""
    killed: list[int] = []
    for _ in range(5):
        pids = [p for p in session_members(sid) if p not in killed]
        if not pids:
            break
        # the leader (master) first: a live master would fork replacements for killed children
        pids.sort(key=lambda p: p != sid)
        killed += signal_pids(pids, signal.SIGKILL)
    return killed


def terminate(child: subprocess.Popen, grace: float) -> None:
    """End a child started with start_new_session=True: one SIGTERM to it (it ends what it started
    itself, e.g. a drain its sync_clients), then, if it is still running after `grace` seconds,
    SIGKILL to its whole session; returns once it is reaped and its session is empty (or 5 s later). Only the caller reaps `child`, so
    while it is unreaped its PID (= its session id) cannot have been reused."""
    if child.poll() is not None:
        return
    signal_pids([child.pid], signal.SIGTERM)
    try:
        child.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    kill_session(child.pid)
    child.wait()
    # SIGKILL is delivered at once but a process exits a moment later (later still in D state):
    # return only when the session is empty, so no grandchild outlives us holding a lock
    for _ in range(50):
        if not session_members(child.pid):
            break
        time.sleep(0.1)


def comm(pid: int) -> str | None:
    p = info(pid)
    return p.comm if p else None


def read_pid_file(path: os.PathLike | str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64).strip()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def running_master(pid_file: os.PathLike | str) -> int | None:
    """PID of the Cyrus master named by `pid_file` if it is alive and really a master
    (master leaves its pid file behind on exit, and the PID may have been reused since)."""
    pid = read_pid_file(pid_file)
    if pid is None:
        return None
    p = info(pid)
    if p is None or p.zombie or p.comm != "master":
        return None
    return pid


class Loop:
    """A selector woken by file descriptors (`add_reader`), other threads (`wake()`) and, once
    `handle_signals()` was called (main thread only), signals: they arrive through the wakeup fd,
    so a signal can never slip in between a check and the sleep."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._old_wakeup: int | None = None
        self._old_handlers: dict[int, object] = {}
        self.selector.register(self._rsock, selectors.EVENT_READ, None)

    def handle_signals(self, *signums: int) -> None:
        # A Python-level handler must be installed for the wakeup fd to receive the signal number;
        # exec() resets caught signals to default, so children do not inherit anything.
        if self._old_wakeup is None:
            self._old_wakeup = signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        for signum in signums:
            self._old_handlers[signum] = signal.signal(signum, lambda *_: None)

    def add_reader(self, fileobj, callback) -> None:
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj) -> None:
        self.selector.unregister(fileobj)

    def wake(self) -> None:
        try:
            self._wsock.send(b"\0")  # 0 is no signal number: a plain wake-up
        except (BlockingIOError, OSError):
            pass

    def poll(self, timeout: float | None) -> list[int]:
        """Wait up to `timeout` (None: until woken); run ready callbacks; return the signals received."""
        signums: list[int] = []
        for key, _ in self.selector.select(timeout if timeout is None else max(0.0, timeout)):
            if key.data is None:
                try:
                    while chunk := self._rsock.recv(512):
                        signums += [b for b in chunk if b]
                except BlockingIOError:
                    pass
            else:
                key.data()
        return signums

    def close(self, restore_handlers: bool = True) -> None:
        """Stop listening. restore_handlers=False: the process is about to exit with an exit code
        that must not be replaced by death-by-signal, so stop signals are ignored from now on.
        SIG_IGN, not a Python handler: interpreter finalization (_PySignal_Fini) resets Python
        handlers to SIG_DFL, and a repeated SIGTERM landing then would turn exit 70 into a
        'killed by SIGTERM' that systemd counts as a clean stop (measured: 40 of 40 runs)."""
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
        for signum, handler in self._old_handlers.items():
            if restore_handlers:
                signal.signal(signum, handler)
            elif signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
        self.selector.close()
        self._rsock.close()
        self._wsock.close()

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Processes seen through /proc: children of a PID, members of a session, signals by PID list.

Cyrus master runs in a session of its own (its PID is the session id), and every service child,
daemon and forked `sync_client -r` stays in that session, so "the session" is the set of processes
a stop must wait for. Nothing here ever selects a process by name.
"""

from __future__ import annotations

import os
import signal
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


def all_processes() -> list[ProcInfo]:
    result = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = info(int(name))
            if p is not None:
                result.append(p)
    return result


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

"""`cyrushelper worker` (ExecStart of a socket-mode worker unit): hand systemd's listening socket to
a Cyrus service the way master hands it over, then become that service.

What a Cyrus service expects from master (master/service.c, 3.6.1 and 3.10.2 alike): its listener
on fd 4 (LISTEN_FD), a pipe to master on fd 3 (STATUS_FD), CYRUS_SERVICE (its cyrus.conf name,
also the suffix of its own fence file msg/shutdown.<name>) and CYRUS_ID (with the name, its accept
lock {configdirectory}/socket/<service>-<id>.lock, shared by the workers of one socket). Started
that way, without -X, it runs its own accept loop: one connection at a time, up to 250 (-U), exit
0 after 60-120 s idle, after the current connection on SIGHUP, before accepting when its program
file changed (a package upgrade); exit 75 at the next safe point on SIGTERM.

systemd hands the socket over as fd 3 (LISTEN_FDS=1, LISTEN_PID). So, before exec:
- fd 4 := the socket; fd 3 := this slot's status file, opened for appending: the 8-byte messages
  Cyrus writes for master (struct notify_message: AVAILABLE 1, UNAVAILABLE 2, CONNECTION 3, then
  its PID) land there, which is how `status` tells busy from idle workers and counts connections.
  A regular file never blocks a write, where a pipe whose reader died would stall the service.
- the previous process's messages are added to the slot's counter (`<slot>.served`) and the file
  starts over with one AVAILABLE record carrying our PID, which exec keeps.
- CYRUS_SERVICE and CYRUS_ID are set; LISTEN_*, NOTIFY_SOCKET and WATCHDOG_* are removed, so
  nothing the service runs mistakes systemd's protocol for its own.
It runs at every worker (re)start, so it imports nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

from cyrushelper import exitcodes

# struct notify_message { int message; pid_t service_pid; } (master/service.h)
RECORD = struct.Struct("@ii")
AVAILABLE, UNAVAILABLE, CONNECTION = 1, 2, 3
LISTEN_FD, STATUS_FD = 4, 3
SD_LISTEN_FDS_START = 3
STRIPPED_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")


class WorkerError(Exception):
    """The worker cannot hand the socket over (exit 78: a restart would not help)."""


def read_records(path: os.PathLike | str) -> list[tuple[int, int]]:
    """(message, pid) records of a status file; [] if it does not exist."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    usable = len(data) - len(data) % RECORD.size
    return [RECORD.unpack_from(data, i) for i in range(0, usable, RECORD.size)]


def read_served(path: os.PathLike | str) -> int:
    try:
        with open(f"{path}.served", encoding="ascii") as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def open_status(path: str) -> int:
    """Fold the previous process's records into the counter and start the file anew for us."""
    served = read_served(path) + sum(1 for message, _ in read_records(path) if message == CONNECTION)
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    tmp = f"{path}.served.{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:  # a statistic: no fsync
        f.write(f"{served}\n")
    os.replace(tmp, f"{path}.served")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o640)
    os.write(fd, RECORD.pack(AVAILABLE, os.getpid()))
    return fd


def listen_fd(environ: dict[str, str]) -> int:
    if environ.get("LISTEN_PID") != str(os.getpid()) or environ.get("LISTEN_FDS") != "1":
        raise WorkerError("expected exactly one socket from systemd (LISTEN_FDS=1 for this PID, got "
                          f"LISTEN_FDS={environ.get('LISTEN_FDS')!r}): start it through its .socket unit")
    return SD_LISTEN_FDS_START


def hand_over(status_path: str, environ: dict[str, str]) -> None:
    """Arrange fds 3 and 4 as master would (see above)."""
    sock = os.dup(listen_fd(environ))   # out of the way: fd 4 may be taken by the status file
    status = open_status(status_path)
    for source, target in ((sock, LISTEN_FD), (status, STATUS_FD)):
        if source != target:
            os.dup2(source, target)
            os.close(source)
        os.set_inheritable(target, True)  # os.dup() made it close-on-exec; Cyrus sets that itself


def service_env(environ: dict[str, str], service: str, cyrus_id: int) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in STRIPPED_ENV}
    env["CYRUS_SERVICE"] = service
    env["CYRUS_ID"] = str(cyrus_id)
    return env


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--service", required=True, metavar="NAME", help="the cyrus.conf SERVICES entry name")
    parser.add_argument("--id", type=int, default=0, metavar="N",
                        help="CYRUS_ID: the index of this socket among the entry's addresses (default 0)")
    parser.add_argument("--status", required=True, metavar="FILE",
                        help="this worker slot's status file (Cyrus's messages to master)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS",
                        help="the Cyrus service and its arguments, program path absolute")


def main(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or not os.path.isabs(command[0]):
        print("cyrushelper worker: give the Cyrus program by absolute path after --", file=sys.stderr)
        return exitcodes.USAGE
    try:
        hand_over(args.status, dict(os.environ))
        os.execve(command[0], command, service_env(dict(os.environ), args.service, args.id))
    except WorkerError as e:
        print(f"cyrushelper worker: {e}", file=sys.stderr)
    except OSError as e:
        print(f"cyrushelper worker: {command[0]}: {e}", file=sys.stderr)
    return exitcodes.CONFIG

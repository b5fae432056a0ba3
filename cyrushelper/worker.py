"""`cyrushelper worker` (ExecStart of a socket-mode worker unit): hand systemd's listening socket to
a Cyrus service the way master hands it over, then become that service.

What a Cyrus service expects from master (master/service.c, 3.6.1 and 3.10.2 alike): its listener
on fd 4 (LISTEN_FD), a pipe to master on fd 3 (STATUS_FD), CYRUS_SERVICE (its cyrus.conf name,
also the suffix of its own fence file msg/shutdown.<name>) and CYRUS_ID (with the name, its accept
lock {configdirectory}/socket/<service>-<id>.lock, shared by the workers of one socket). Started
that way, without -X, it runs its own accept loop: one connection at a time, up to 250 (-U), exit
0 after 60-120 s idle, after the current connection on SIGHUP, before accepting when its program
file changed (a package upgrade); exit 75 at the next safe point on SIGTERM.

systemd hands the socket over as fd 3 (LISTEN_FDS=1, LISTEN_PID). So, once per unit start:
- fd 4 := the socket; fd 3 := this slot's status file, opened for appending: the 8-byte messages
  Cyrus writes for master (struct notify_message: AVAILABLE 1, UNAVAILABLE 2, CONNECTION 3, then
  its PID) land there, which is how `status` tells busy from idle workers and counts connections.
  A regular file never blocks a write, where a pipe whose reader died would stall the service.
- CYRUS_SERVICE and CYRUS_ID are set; LISTEN_*, NOTIFY_SOCKET and WATCHDOG_* are removed, so
  nothing the service runs mistakes systemd's protocol for its own.
- then the worker becomes RESPAWN_LOOP, a few lines of sh that run the service again each time it
  exits 0 by design (250 connections, idle, a new program file after an upgrade) -- as master
  forks a new child -- and end with anything else: a stop (SIGHUP, SIGTERM), a crash, exit 70
  (the 3.6 stage./ race), which systemd then handles (Restart=always, SuccessExitStatus=75).
  Measured: a systemd restart of a worker unit costs 29 ms more than a bare one just to set up
  its sandbox (ProtectSystem=, PrivateTmp=, ProtectKernel*= ...), and this wrapper 10-30 ms of
  Python; with a restart every 250 connections that took the pool to 0.56-0.86x master's
  connections/s. The loop keeps the sandbox and the fds and costs a fork, an exec and the fold.
- before each run the loop adds the last run's CONNECTION messages to the slot's counter
  (`<slot>.served`) and empties the status file (fd 3 appends, so it writes at the new end).
The units start this module as `PYTHON -I -m cyrushelper.worker`, which imports nothing else: 15
ms to the loop, against 41 ms through the `cyrushelper worker` command and its CLI.
"""

from __future__ import annotations

import os
import signal
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


# $1: the status file (also fd 3); the rest: the Cyrus command. Signals reach every process of the
# unit (systemd's KillMode=control-group, `systemctl kill`): the service acts on its own copy, the
# loop only stops looping -- a trap runs once the foreground service has exited (POSIX), and never
# forwards: a second SIGTERM would kill a Cyrus process mid-write.
RESPAWN_LOOP = """\
status=$1; shift
stop=
trap 'stop=1' HUP TERM INT
while :; do
    n=$(od -An -v -tu4 -w8 "$status" | awk '$1 == 3 { n++ } END { print n + 0 }')
    if [ "$n" -gt 0 ]; then
        echo $(( $(cat "$status.served" 2>/dev/null || echo 0) + n )) > "$status.served.new" &&
            mv -f "$status.served.new" "$status.served"
    fi
    : > "$status"
    [ -z "$stop" ] || exit 0
    "$@"
    code=$?
    [ "$code" -eq 0 ] || exit "$code"
done
"""
SH = "/bin/sh"


def read_served(path: os.PathLike | str) -> int:
    try:
        with open(f"{path}.served", encoding="ascii") as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def open_status(path: str) -> int:
    """The slot's status file, for appending (the loop folds and empties it before each run)."""
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)


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


def serve(service: str, cyrus_id: int, status: str, command: list[str]) -> int:
    """Hand the socket over and exec `command`; returns only on failure (the exit code)."""
    if not command or not os.path.isabs(command[0]):
        print("cyrushelper worker: give the Cyrus program by absolute path after --", file=sys.stderr)
        return exitcodes.USAGE
    try:
        hand_over(status, dict(os.environ))
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            # a signal ignored when sh starts cannot be trapped (POSIX): the loop must see them
            signal.signal(signum, signal.SIG_DFL)
        if not os.access(command[0], os.X_OK):
            raise OSError("not an executable file")
        os.execve(SH, ["sh", "-c", RESPAWN_LOOP, f"cyrushelper-worker:{service}", status, *command],
                  service_env(dict(os.environ), service, cyrus_id))
    except WorkerError as e:
        print(f"cyrushelper worker: {e}", file=sys.stderr)
    except OSError as e:
        print(f"cyrushelper worker: {command[0]}: {e}", file=sys.stderr)
    return exitcodes.CONFIG


def run(argv: list[str]) -> int:
    """`python -m cyrushelper.worker --service NAME [--id N] --status FILE -- PROGRAM ARGS...`:
    the same as the `worker` command, read without argparse."""
    options = {"--service": None, "--id": "0", "--status": None}
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] not in options or i + 1 >= len(argv):
            print(f"usage: python -m cyrushelper.worker --service NAME [--id N] --status FILE -- PROGRAM ARGS "
                  f"(at {argv[i]!r})", file=sys.stderr)
            return exitcodes.USAGE
        options[argv[i]] = argv[i + 1]
        i += 2
    if options["--service"] is None or options["--status"] is None or not options["--id"].isdigit():
        print("cyrushelper worker: --service, --status and a numeric --id are required", file=sys.stderr)
        return exitcodes.USAGE
    return serve(options["--service"], int(options["--id"]), options["--status"], argv[i + 1:])


# --------------------------------------------------------------------------- CLI

# Not importing argparse here (6 of this module's 7 ms at every worker start): cli.py hands us its
# parser and its Namespace.

def add_arguments(parser, name: str) -> None:
    parser.add_argument("--service", required=True, metavar="NAME", help="the cyrus.conf SERVICES entry name")
    parser.add_argument("--id", type=int, default=0, metavar="N",
                        help="CYRUS_ID: the index of this socket among the entry's addresses (default 0)")
    parser.add_argument("--status", required=True, metavar="FILE",
                        help="this worker slot's status file (Cyrus's messages to master)")
    parser.add_argument("command", nargs="...", metavar="-- PROGRAM ARGS",  # "..." is argparse.REMAINDER
                        help="the Cyrus service and its arguments, program path absolute")


def main(args) -> int:
    return serve(args.service, args.id, args.status, args.command[1:] if args.command[:1] == ["--"] else args.command)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

"""`cyrushelper stop` (the unit's ExecStop): fence new work, give open sessions a grace period.

The fence is Cyrus's own `{configdirectory}/msg/shutdown` (imap/global.c shutdown_file): while it
exists a logged-in IMAP user gets `* BYE [ALERT] <first line>` right after the answer to their
next command (imapd looks before it blocks reading a command; measured on 3.6.1), POP3 alike, and LMTP refuses every transaction command with
`421 4.3.2 <first line>` so the MTA keeps the message queued. Admins are not fenced by imapd.

Then we wait at most `--grace` seconds for serving processes to finish: Cyrus 3.6 keeps one file
per process that serves a session in `proc_path` (imap/proc.c proc_register; the file is named by
PID and removed at session end; lmtpd does not register), so the grace ends early when no file
names a live process. A process killed hard leaves its file behind: liveness is checked by PID.

Replication is not a user session and is not waited for: a sync_server serving the primary's
rolling sync_client registers there too (imap/sync_server.c: proc_register(config_ident, …)), and
Cyrus ≥ 3.10 also registers the rolling sync_client itself. Neither ends because of the fence, so
waiting for them only made every replica stop wait the whole grace (5.3 s measured under load,
issue 13). master's SIGTERM ends them at a safe point; the primary's client reconnects later and
replays its `log-run` from the start, so nothing is lost.

Nothing here needs master: a socket-activated instance fences and waits the same way.

"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cyrushelper import arguments, exitcodes, proc
from cyrushelper.atomic import write_atomic
from cyrushelper.config import Instance
from cyrushelper.syncwatch import DirWatch

log = logging.getLogger("cyrushelper.fence")

DEFAULT_MESSAGE = "This server is restarting for maintenance; please reconnect in a few minutes"
DEFAULT_GRACE = 5.0


REPLICATION_PROGRAMS = ("sync_server", "sync_client")


@dataclass(frozen=True)
class Session:
    pid: int
    service: str
    client: str
    user: str
    program: str = ""   # the Cyrus program serving it (from cyrus.conf, else the process's comm)

    @property
    def replication(self) -> bool:
        return self.program in REPLICATION_PROGRAMS


def check_message(text: str) -> str:
    """Cyrus sends only the first line, and imapd strips leading '[' (it would break BYE [ALERT])."""
    text = text.strip().lstrip("[").strip()
    if not text:
        raise ValueError("the fence message is empty")
    if "\n" in text or "\r" in text:
        raise ValueError("the fence message must be one line (Cyrus sends only the first)")
    if not text.isprintable():
        raise ValueError("the fence message holds control characters")
    if len(text) > 400:
        raise ValueError("the fence message is longer than 400 characters")
    return text


def write_fence(instance: Instance, message: str = DEFAULT_MESSAGE) -> Path:
    path = instance.fence_file
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_atomic(path, check_message(message) + "\n", mode=0o644)
    return path


def remove_fence(instance: Instance) -> bool:
    """Remove our fence (a stale one would BYE every user of the next start); True if it existed."""
    try:
        os.unlink(instance.fence_file)
        return True
    except FileNotFoundError:
        return False


def fence_present(instance: Instance) -> bool:
    return instance.fence_file.exists()


def _program(instance: Instance, service: str, pid: int) -> str:
    """The program behind a proc_path entry: its service name is the cyrus.conf entry name
    (config_ident), or the program's own name for a process started outside master (3.10's
    rolling sync_client registers as "sync_client"); else the process's comm."""
    for entry in instance.cyrus.entries:
        if entry.name == service:
            return entry.program
    if service in REPLICATION_PROGRAMS:
        return service
    return proc.comm(pid) or ""


def sessions(instance: Instance, replication: bool = False) -> list[Session]:
    """Live serving processes according to proc_path (stale files of dead PIDs are skipped).
    Replication processes (sync_server, a registered sync_client) only with `replication=True`."""
    directory = instance.imapd.proc_path
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    result = []
    for name in names:
        if not name.isdigit():
            continue  # `<pid>.new` is a file being replaced
        pid = int(name)
        if not proc.alive(pid):
            continue
        try:
            with open(directory / name, encoding="utf-8", errors="replace") as f:
                fields = f.readline().rstrip("\n").split("\t")
        except FileNotFoundError:
            continue  # the session ended meanwhile
        fields += [""] * 3
        session = Session(pid, fields[0], fields[1], fields[2], _program(instance, fields[0], pid))
        if replication or not session.replication:
            result.append(session)
    return sorted(result, key=lambda s: s.pid)


def wait_for_sessions(instance: Instance, grace: float, clock=time.monotonic) -> list[Session]:
    """Wait until no session is left or `grace` seconds passed; the sessions left.

    inotify on proc_path wakes us when a session ends; a short re-check interval also covers
    processes that died without removing their file."""
    deadline = clock() + grace
    left = sessions(instance)
    if not left or grace <= 0:
        return left
    with DirWatch() as watch:
        watch.add("proc", instance.imapd.proc_path, lambda name: name.isdigit())
        while True:
            left = sessions(instance)
            remaining = deadline - clock()
            if not left or remaining <= 0:
                return left
            watch.wait(min(remaining, 0.5))


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    arguments.add_instance_arguments(parser)
    parser.add_argument("--grace", type=arguments.seconds, default=DEFAULT_GRACE, metavar="SECONDS",
                        help=f"how long open sessions may finish after the fence (default {DEFAULT_GRACE:g}); "
                             "ends early when no session process is left")
    parser.add_argument("--message", default=DEFAULT_MESSAGE, metavar="TEXT",
                        help="one line shown to users: IMAP `* BYE [ALERT] TEXT`, LMTP `421 4.3.2 TEXT`")
    parser.add_argument("--force", action="store_true",
                        help="write the fence even when no master is running")


def main(args: argparse.Namespace) -> int:
    instance = arguments.load_instance(args)
    try:
        check_message(args.message)
    except ValueError as e:
        log.error("--message: %s", e)
        return exitcodes.USAGE
    master = proc.running_master(instance.pid_file)
    if master is None and not args.force:
        log.info("no master running for %s (pid file %s): nothing to fence", instance.name, instance.pid_file)
        return exitcodes.OK
    path = write_fence(instance, args.message)
    before = sessions(instance)
    replicating = [s for s in sessions(instance, replication=True) if s.replication]
    log.info("fence written (%s); %d session(s) open, grace %.1fs%s", path, len(before), args.grace,
             f"; not waiting for {len(replicating)} replication process(es) "
             f"({', '.join(f'{s.service}[{s.pid}]' for s in replicating[:5])})" if replicating else "")
    t0 = time.monotonic()
    left = wait_for_sessions(instance, args.grace)
    waited = time.monotonic() - t0
    if left:
        log.info("grace over after %.1fs with %d session(s) still open (master's SIGTERM ends them): %s",
                 waited, len(left), ", ".join(f"{s.service}[{s.pid}] {s.user}".strip() for s in left[:10]))
    else:
        log.info("no session left after %.1fs", waited)
    return exitcodes.OK

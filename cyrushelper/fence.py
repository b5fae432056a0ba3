"""`cyrushelper stop` (the unit's ExecStop): fence new work, give open sessions a grace period.

The fence is Cyrus's own `{configdirectory}/msg/shutdown` (imap/global.c shutdown_file): while it
exists a logged-in IMAP user gets `* BYE [ALERT] <first line>` right after the answer to their
next command (imapd looks before it blocks reading a command; measured on 3.6.1), POP3 alike, and LMTP refuses every transaction command with
`421 4.3.2 <first line>` so the MTA keeps the message queued. Admins are not fenced by imapd.

Then we wait at most `--grace` seconds for serving processes to finish: Cyrus 3.6 keeps one file
per process that serves a session in `proc_path` (imap/proc.c proc_register; the file is named by
PID and removed at session end; lmtpd does not register), so the grace ends early when no file
names a live process. A process killed hard leaves its file behind: liveness is checked by PID.

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


@dataclass(frozen=True)
class Session:
    pid: int
    service: str
    client: str
    user: str


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


def sessions(instance: Instance) -> list[Session]:
    """Live serving processes according to proc_path (stale files of dead PIDs are skipped)."""
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
        result.append(Session(pid, fields[0], fields[1], fields[2]))
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
    log.info("fence written (%s); %d session(s) open, grace %.1fs", path, len(before), args.grace)
    t0 = time.monotonic()
    left = wait_for_sessions(instance, args.grace)
    waited = time.monotonic() - t0
    if left:
        log.info("grace over after %.1fs with %d session(s) still open (master's SIGTERM ends them): %s",
                 waited, len(left), ", ".join(f"{s.service}[{s.pid}] {s.user}".strip() for s in left[:10]))
    else:
        log.info("no session left after %.1fs", waited)
    return exitcodes.OK

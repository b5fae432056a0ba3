"""The fence: stop new work, give open sessions a grace period. `run` does it when the unit stops,
right before master's SIGTERM (`fence_and_wait`); `cyrushelper stop` does the same by hand.

It was the unit's ExecStop until issue 11: a Python start of its own (0.09 s of every stop on a
quiet machine, up to 0.25 s under load, measured with benchmarks/bench_stop.py --overhead), for
work that `run`, already running, does in milliseconds. An older unit that still has ExecStop
fences twice: the second finds the sessions gone and ends at once.

The fence is Cyrus's own `{configdirectory}/msg/shutdown` (imap/global.c shutdown_file): while it
exists a logged-in IMAP user gets `* BYE [ALERT] <first line>` right after the answer to their
next command (imapd looks before it blocks reading a command; measured on 3.6.1), POP3 alike, and
lmtpd answers every command but LHLO/NOOP/QUIT with `421 4.3.2 <first line>` and exits
(imap/lmtpengine.c), so the MTA keeps the message queued.

Then we wait at most `--grace` seconds for work in flight to finish:
- sessions: Cyrus 3.6 keeps one file per process that serves a session in `proc_path`
  (imap/proc.c proc_register; named by PID, removed at session end). A process killed hard leaves
  its file behind: liveness is checked by PID.
- deliveries: lmtpd registers no session, so we take the LMTP connections open when the fence
  went up from the kernel's socket tables (connections.py). No transaction can start after the
  fence (MAIL gets 421); one open at that moment ends with its next command (421 to RCPT/DATA,
  or the final reply once lmtpd has read the whole message, which it does without looking at the
  fence) and lmtpd then exits, closing the connection. Waiting for those connections to close is
  what keeps master's SIGTERM from cutting a delivery after DATA (which the MTA would retry, and
  which Cyrus may already have delivered: a duplicate). SIGHUP is no help here: it interrupts the
  child's wait for the next command (`421 4.4.1 bye Interrupted system call`, measured on 3.6.1).
The grace ends as soon as neither is left.

Replication is not a user session and is not waited for: a sync_server serving the primary's
rolling sync_client registers there too (imap/sync_server.c: proc_register(config_ident, …)), and
Cyrus ≥ 3.10 also registers the rolling sync_client itself. Neither ends because of the fence, so
waiting for them only made every replica stop wait the whole grace (5.3 s measured under load,
issue 13). master's SIGTERM ends them at a safe point; the primary's client reconnects later and
replays its `log-run` from the start, so nothing is lost.

Nor are master's DAEMON and EVENTS children: Cyrus >= 3.10's master registers them in proc_path
too (master/master.c: "we only register DAEMONs -- SERVICEs register themselves", and each event
it forks), without client or user. They do not end because of the fence either (measured on
3.10.2: a DAEMON entry made every stop wait the whole grace); master's SIGTERM ends them.

Nothing here needs master: a socket-activated instance fences and waits the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cyrushelper import arguments, connections, exitcodes, proc
from cyrushelper.atomic import write_atomic
from cyrushelper.config import Instance, Listen
from cyrushelper.syncwatch import DirWatch

log = logging.getLogger("cyrushelper.fence")

DEFAULT_MESSAGE = "This server is restarting for maintenance; please reconnect in a few minutes"
DEFAULT_GRACE = 5.0
DELIVERY_PROGRAMS = ("lmtpd", "lmtpproxyd")
DELIVERY_POLL = 0.05   # seconds between looks at the socket tables (no inotify for sockets)
# the journal's words for how the grace ended (tests and bench_stop.py read the wait from them)
ALL_CLEAR = "no session and no LMTP delivery left after"
GRACE_OVER = "grace over after"
REPLICATION_PROGRAMS = ("sync_server", "sync_client")
MASTER_REGISTERED_SECTIONS = ("DAEMON", "EVENTS")   # registered by 3.10+'s master, not sessions


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
    not_sessions = {e.name for e in instance.cyrus.entries if e.section in MASTER_REGISTERED_SECTIONS}
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
        if fields[0] in not_sessions:
            continue
        session = Session(pid, fields[0], fields[1], fields[2], _program(instance, fields[0], pid))
        if replication or not session.replication:
            result.append(session)
    return sorted(result, key=lambda s: s.pid)


def delivery_listeners(instance: Instance) -> list[Listen]:
    """The SERVICES listeners of LMTP (lmtpd, lmtpproxyd)."""
    return [listen for entry, listen in instance.listeners if entry.program in DELIVERY_PROGRAMS]


class Deliveries:
    """LMTP connections that were open when the fence went up (create it right after writing the
    fence): each may be inside a transaction. `left()` is those still open."""

    def __init__(self, instance: Instance):
        self._watcher = connections.Watcher(delivery_listeners(instance))
        self.at_fence = self._watcher.held()
        self._open = set(self.at_fence)

    def left(self) -> set[int]:
        if self._open:
            self._open &= self._watcher.held()
        return set(self._open)


def wait_for_sessions(instance: Instance, grace: float, clock=time.monotonic,
                      deliveries: Deliveries | None = None,
                      tick: Callable[[int, int], None] | None = None) -> list[Session]:
    """Wait until no session is left and no delivery of `deliveries` is open, or `grace` seconds
    passed; the sessions left (`deliveries.left()` tells the deliveries left). `tick(sessions,
    deliveries)` is called at least every 0.5 s while waiting (run's EXTEND_TIMEOUT pulse).

    inotify on proc_path wakes us when a session ends; a short re-check interval also covers
    processes that died without removing their file. Open deliveries are looked at every
    DELIVERY_POLL seconds: a transaction ends within milliseconds of its next command."""
    deadline = clock() + grace
    left = sessions(instance)
    if (not left and not (deliveries and deliveries.left())) or grace <= 0:
        return left
    with DirWatch() as watch:
        watch.add("proc", instance.imapd.proc_path, lambda name: name.isdigit())
        while True:
            left = sessions(instance)
            delivering = deliveries.left() if deliveries is not None else set()
            remaining = deadline - clock()
            if (not left and not delivering) or remaining <= 0:
                return left
            if tick is not None:
                tick(len(left), len(delivering))
            watch.wait(min(remaining, DELIVERY_POLL if delivering else 0.5))


def fence_and_wait(instance: Instance, grace: float, message: str = DEFAULT_MESSAGE,
                   tick: Callable[[int, int], None] | None = None) -> float:
    """Write the fence, then wait (wait_for_sessions) for the sessions and LMTP deliveries open at
    that moment, at most `grace` seconds; log how it ended. The seconds waited."""
    path = write_fence(instance, message)
    deliveries = Deliveries(instance)
    registered = sessions(instance, replication=True)
    before = [s for s in registered if not s.replication]
    replicating = [s for s in registered if s.replication]
    log.info("fence written (%s); %d session(s) and %d LMTP connection(s) open, grace %.1fs%s",
             path, len(before), len(deliveries.at_fence), grace,
             f"; not waiting for {len(replicating)} replication process(es) "
             f"({', '.join(f'{s.service}[{s.pid}]' for s in replicating[:5])})" if replicating else "")
    t0 = time.monotonic()
    left = wait_for_sessions(instance, grace, deliveries=deliveries, tick=tick)
    waited = time.monotonic() - t0
    delivering = deliveries.left()
    if delivering:
        log.warning(GRACE_OVER + " %.1fs with %d LMTP connection(s) open since the fence: master's "
                    "SIGTERM may cut a delivery in flight (the MTA retries it; raise --grace for slow "
                    "senders)", waited, len(delivering))
    if left:
        log.info(GRACE_OVER + " %.1fs with %d session(s) still open (master's SIGTERM ends them): %s",
                 waited, len(left), ", ".join(f"{s.service}[{s.pid}] {s.user}".strip() for s in left[:10]))
    if not left and not delivering:
        log.info(ALL_CLEAR + " %.2fs", waited)
    return waited


# --------------------------------------------------------------------------- CLI

def fence_message(text: str) -> str:
    """argparse type of --message: refused on the command line, before anything runs."""
    try:
        return check_message(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_fence_arguments(parser: argparse.ArgumentParser) -> None:
    """--grace and --message: `stop` by hand, and `run` at every stop of the unit."""
    parser.add_argument("--grace", type=arguments.seconds, default=DEFAULT_GRACE, metavar="SECONDS",
                        help="at a stop, how long open sessions and LMTP deliveries in flight may finish "
                             "after the fence (socket mode: after the SIGHUP that lets each worker finish "
                             f"its connection) before the SIGTERM (default {DEFAULT_GRACE:g}); ends early "
                             "when none is left")
    parser.add_argument("--message", type=fence_message, default=DEFAULT_MESSAGE, metavar="TEXT",
                        help="the fence's one line shown to users: IMAP `* BYE [ALERT] TEXT`, LMTP "
                             "`421 4.3.2 TEXT`")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    arguments.add_instance_arguments(parser)
    add_fence_arguments(parser)
    parser.add_argument("--force", action="store_true",
                        help="write the fence even when no master is running")


def main(args: argparse.Namespace) -> int:
    instance = arguments.load_instance(args)
    master = proc.running_master(instance.pid_file)
    if master is None and not args.force:
        log.info("no master running for %s (pid file %s): nothing to fence", instance.name, instance.pid_file)
        return exitcodes.OK
    fence_and_wait(instance, args.grace, args.message)
    return exitcodes.OK

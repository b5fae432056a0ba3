"""`cyrushelper run`: Cyrus master as a Type=notify service, with a stop that is bounded and honest.

Start: a running master for the instance makes us refuse; a stale fence (msg/shutdown) is removed;
`master -C IMAPD -M CYRUS -p PIDFILE -D` starts in a session of its own (master's shutdown does
kill(0, SIGTERM) on its process group, which must not include us) without NOTIFY_SOCKET.
READY=1 is sent when Cyrus can serve. Cyrus ≥ 3.10 says so itself: master creates master.ready
just before its accept loop, after binding every SERVICES socket (cyrus.py knows which masters do),
and READY follows the file's creation (inotify) at once. Older masters bind the SERVICES sockets
only after every START entry finished (e.g. `ctl_cyrusdb -r`), then start `wait=y` daemons, then
enter their accept loop; so we require every SERVICES listener to accept a connection and every
service that speaks first (imapd, pop3d, lmtpd, timsieved, nntpd without -s) to send its
greeting, which only a child forked by the running loop can do. The probes run in our event loop
(probe.Prober): a greeting wakes us, a refused listener is tried again every 10 ms.

Running: STATUS= shows each channel's replication backlog, woken by inotify on the sync
directories (one event per appended line, syncwatch.py). One delivery writes a line per channel
and event, ~2 ms apart, so a change is sent once the sync logs have been quiet for STATUS_SETTLE
(judged by the files' modification times): looked at STATUS_FIRST_LOOK after the first write,
then every STATUS_BUSY_LOOK while they keep being written, and sent at least every
--status-interval meanwhile; within --status-interval of the last STATUS the quiet must last
STATUS_QUIET_AFTER_SEND (a slow burst: one STATUS per interval, and the final count). While a
STATUS is pending the watch is not read, so a burst of mail costs a wake-up per
STATUS_BUSY_LOOK or STATUS_QUIET_AFTER_SEND, not one per line.
Counts are kept between updates (synclog.LineCounter): an update reads what was appended since
the last one. SIGHUP goes to master (it re-reads cyrus.conf). Master exiting on its own ends us
with exit 1: the unit fails.

Lost events (issue 10): Cyrus acknowledges mail whose sync log line it could not write (lmtpd
answers 250 and only logs "write() to …/sync/log failed: No space left on device"). What `run`
watches, and what it can and cannot see:
- the journal of this invocation (cyruslog.Watcher, and once more after master is gone): every
  failed sync log write Cyrus reports, and journald's "Suppressed N messages" for this unit (a
  failure may have been among them). Asked when journald wrote something (inotify on the journal
  files, cyruslog.journal_directories), at most every JOURNAL_INTERVAL seconds: a failure is in
  the marker and STATUS within JOURNAL_INTERVAL of journald storing it, and a journal nobody
  writes to costs no wake-up at all. Where the journal files cannot be watched, it is asked every
  JOURNAL_INTERVAL seconds. Not available outside systemd (said once at start); a journal that
  cannot store (its own disk full) loses lines, which the next check covers.
- statvfs of every sync file system, with each STATUS update after sync log writes and with each
  journal check: below --space-warn percent free, STATUS warns; full (no block or inode left for
  the cyrus user) or read-only while master runs counts as a failure, since Cyrus's next append
  fails. A disk that fills up while neither Cyrus nor anything else writes (no event) is seen at
  the next sync log write or journal entry -- Cyrus's own failed write is always one of them.
- the drain (ExecStopPost) finds what a failed write left in the file: a cut-off line.
Any of these records the sync-log-failure marker (state.py): status reports it, the drain refuses a
clean result until a reconcile (`sync_client -A`) succeeded, --reconcile=auto runs it at the next
start. Sync log directories that sync_log_channels no longer names but hold events are reported.

Stop (SIGTERM or SIGINT): STOPPING=1, then exactly one SIGTERM to master (the unit's
KillMode=mixed keeps systemd from signalling the children too; a second SIGTERM would kill a
Cyrus child at once). We wait for master and every process of its session until --stop-timeout,
woken by each exit (pidfds, proc.Exits; master is our child: SIGCHLD), resending
EXTEND_TIMEOUT_USEC and STATUS=stopping: N children left. A master left alone that does not reap
its exited children for --master-alone-grace is the shutdown hang of Cyrus < 3.12 (cyrus.py):
master alone is SIGKILLed and the stop stays clean. Past the deadline the whole session is
SIGKILLed (master first) and, if a child was still running, the stop is recorded as unclean
(state.py) and we exit 70. The next start reports the marker and, with --reconcile=auto, runs
`sync_client -A` per channel.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cyrushelper import arguments, cyrus, cyruslog, exitcodes, fence, proc, role, state, synclog
from cyrushelper.channels import replication_channels, rolling_channels
from cyrushelper.config import Instance, parse_imapd_conf
from cyrushelper.notify import Notifier, Pulse, strip_notify_env
from cyrushelper.probe import Prober
from cyrushelper.syncwatch import MODIFICATIONS, DirWatch

log = logging.getLogger("cyrushelper.run")

RECONCILE_CHOICES = ("auto", "recommend", "off")
# A STATUS waits until the sync logs were not written for STATUS_SETTLE (more than the 4 ms an
# mtime can lag behind the clock), looking STATUS_FIRST_LOOK after a first write and then every
# STATUS_BUSY_LOOK while they are being written: the right count is sent at most
# STATUS_BUSY_LOOK + STATUS_SETTLE after the last write (issue 11: within 100 ms).
STATUS_SETTLE = 0.01
STATUS_FIRST_LOOK = 0.03
STATUS_BUSY_LOOK = 0.07
# Within --status-interval of the last STATUS datagram the next one waits for a longer quiet: a
# burst whose deliveries come 10-60 ms apart (Cyrus slowed by other work) then sends one STATUS
# per --status-interval plus the final count, not one per gap (measured 4-7 datagrams/s, and
# helper CPU rising with them to 2-4 % of Cyrus's). The next look is due exactly when the quiet
# would be long enough (last write + STATUS_QUIET_AFTER_SEND, at least STATUS_MIN_LOOK ahead), so
# the final count goes out STATUS_QUIET_AFTER_SEND after the last write, and a fast burst costs
# about one wake-up per STATUS_QUIET_AFTER_SEND (a slow one more: its gaps shorten each wait). A
# wake-up costs 0.2-0.3 ms of CPU on the 2-core lab VM (a bare C epoll_wait return: 0.13 ms), so
# their number is the helper's CPU in a burst (benchmarks/bench_latency.py, issue 11): 25/s with a
# 40 ms quiet looked at every 40 ms, 14/s now.
STATUS_QUIET_AFTER_SEND = 0.07
STATUS_MIN_LOOK = 0.01
JOURNAL_INTERVAL = 5.0         # at most one journal check per interval (and none without news)
FAILURE_LOG_INTERVAL = 60.0    # at most one journal line per minute about continuing failures
# how READY=1 was decided, in the journal line that says Cyrus serves (tests read it to tell the
# Cyrus 3.10+ master.ready path from the 3.6 one)
READY_BY_FILE = "master.ready"
READY_BY_PROBES = "every listener accepts"


# --------------------------------------------------------------------------- background jobs

JOB_TERM_GRACE = 8.0


@dataclass
class Job:
    """Commands run one after another in a thread, each in a session of its own, under one
    deadline; `cancel()` ends them (SIGTERM once to the current command, SIGKILL its session
    after a few seconds). The loop is woken when the job ends."""

    name: str
    commands: list[list[str]]
    deadline: float            # seconds for all commands together
    loop: proc.Loop
    ok_codes: tuple[int, ...] = (0,)
    results: list[tuple[list[str], int | None]] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False

    def start(self) -> None:
        self._lock = threading.Lock()
        self._current: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def succeeded(self) -> bool:
        return self.done and not self.cancelled and len(self.results) == len(self.commands) and \
            all(code in self.ok_codes for _, code in self.results)

    def _run(self) -> None:
        end = time.monotonic() + self.deadline
        try:
            for cmd in self.commands:
                with self._lock:
                    if self.cancelled:
                        break
                    log.info("%s: %s", self.name, " ".join(cmd))
                    self._current = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL,
                                                     env=strip_notify_env(os.environ))
                try:
                    code = self._current.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s: deadline of %.0fs reached, ending %s", self.name, self.deadline, cmd[0])
                    self._end_current()
                    code = None
                self.results.append((cmd, code))
                if code not in self.ok_codes:
                    break
        finally:
            self.done = True
            self.loop.wake()

    def _end_current(self) -> None:
        p = self._current
        if p is not None:
            # the grace is longer than a drain needs to end its own sync_clients (SIGTERM, then
            # SIGKILL after 2 s each): killed earlier, it would orphan a sync_client holding the lock
            proc.terminate(p, JOB_TERM_GRACE)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
        self._end_current()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------- the supervisor

class StartRefused(Exception):
    """`run` cannot start master (missing binary, a master already runs): exit 1 with the reason."""


@dataclass
class Options:
    start_timeout: float = 120.0
    stop_timeout: float = 30.0
    master_alone_grace: float = 0.1
    status_interval: float = 0.5
    extend_interval: float = 5.0
    reconcile: str = "recommend"
    reconcile_timeout: float = 600.0
    leftover_drain: bool = True
    drain_timeout: float = 300.0
    space_warn: float = synclog.DEFAULT_SPACE_WARN
    grace: float = fence.DEFAULT_GRACE          # for open sessions, before the SIGTERM (both modes)
    message: str = fence.DEFAULT_MESSAGE


class Supervisor:
    def __init__(self, instance: Instance, options: Options, notifier: Notifier | None = None):
        self.instance = instance
        self.channels = instance.channels   # (computed from the configuration at each access)
        # what a change of the sync logs touches: each channel's log and directory (mtime)
        self._written_paths = [str(p) for c in self.channels for p in (c.log, c.sync_dir)]
        self.options = options
        self.notifier = notifier or Notifier()
        self.master: subprocess.Popen | None = None
        self.loop: proc.Loop | None = None
        self.watch: DirWatch | None = None
        self.version: cyrus.Version | None = None
        self.jobs: dict[str, Job] = {}
        self.leftover_channels: set[str] = set()
        self.notes: dict[str, str] = {}       # extra STATUS fragments by topic
        self._status_due: float | None = None  # when the pending STATUS is sent (None: none)
        self._status_settle = False            # ... once the sync logs settled (or --status-interval)
        self._status_since = 0.0               # the oldest change the pending STATUS waits to show
        self._last_status_text = None
        self._last_status_sent = -float("inf")  # when the last STATUS datagram went out
        self._backlog_text = ""
        self.counter = synclog.LineCounter()
        self._armed: set = set()               # watches the loop reads (not paused)
        self.repeated_stop_signals = 0
        self.journal: cyruslog.Watcher | None = None
        self.journal_watch: DirWatch | None = None
        self._journal_due: float | None = None
        self._journal_checked = -JOURNAL_INTERVAL
        self.unit = cyruslog.own_unit()
        self.sync_failures = 0                 # failed sync log writes seen in this run
        self._failure_logged: dict[str, float] = {}
        self._full: set[str] = set()           # sync file systems seen full (one marker per episode)

    # -- helpers
    @property
    def master_pid(self) -> int:
        return self.master.pid

    def master_exit(self):
        """The master's exit as (code, signal) without reaping it (so its PID, the session id,
        cannot be reused while we still signal the session); None while it runs."""
        try:
            info = os.waitid(os.P_PID, self.master_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return (self.master.returncode, None)
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return (info.si_status, None)
        return (None, info.si_status)

    def session_left(self) -> list[int]:
        return [p for p in proc.session_members(self.master_pid) if p != self.master_pid]

    def _describe(self, pids: list[int]) -> str:
        parts = [f"{proc.comm(p) or '?'}[{p}]" for p in pids[:8]]
        return ", ".join(parts) + (" …" if len(pids) > 8 else "")

    def _arm(self, watch, callback, armed: bool) -> None:
        """Have the loop read `watch` (armed), or leave its events queued in the kernel (paused)."""
        if armed and watch not in self._armed:
            self.loop.add_reader(watch, callback)
            self._armed.add(watch)
        elif not armed and watch in self._armed:
            self.loop.remove_reader(watch)
            self._armed.discard(watch)

    # -- status
    def _refresh_backlog(self) -> None:
        self._backlog_text = synclog.format_backlog([self.counter.backlog(c) for c in self.channels])

    def status_text(self) -> str:
        parts = [self._backlog_text] + [v for _, v in sorted(self.notes.items())]
        return "; ".join(p for p in parts if p)

    def send_status(self, force: bool = False, now: float | None = None) -> None:
        text = self.status_text()
        if force or text != self._last_status_text:
            self.notifier.status(text)
            self._last_status_text = text
            self._last_status_sent = time.monotonic() if now is None else now
        self._status_due = None

    def request_status(self) -> None:
        """Something other than the backlog changed: send STATUS at the next turn of the loop."""
        self._status_due, self._status_settle = time.monotonic(), False

    def _read_sync_watch(self) -> bool:
        changed = self.watch.read()
        for channel in self.channels:
            if channel.label in self.watch.restructured:
                self.counter.forget(channel.sync_dir)
        return bool(changed)

    def _on_sync_change(self) -> None:
        """The sync logs were written (the watch is armed only while no STATUS is pending)."""
        if not self._read_sync_watch():
            return
        now = time.monotonic()
        if self._status_due is None:
            self._status_due, self._status_settle, self._status_since = now + STATUS_FIRST_LOOK, True, now
        # no wake-up per appended line while a STATUS is pending: its due time reads the queue
        self._arm(self.watch, self._on_sync_change, False)

    def last_write_age(self) -> float:
        """Seconds since the sync logs were last written (appended to, or a file created, renamed
        or removed), from the modification times of each channel's log and directory."""
        latest = 0
        for path in self._written_paths:
            try:
                latest = max(latest, os.stat(path).st_mtime_ns)
            except OSError:
                pass
        return max(0.0, time.time() - latest / 1e9)

    def _status_turn(self, now: float) -> None:
        """The pending STATUS is due: send it, unless the sync logs are still being written and
        the oldest unsent change is younger than --status-interval: then look again later."""
        recent = now - self._last_status_sent < self.options.status_interval
        settle = STATUS_QUIET_AFTER_SEND if recent else STATUS_SETTLE
        age = self.last_write_age() if self._status_settle else settle
        busy = age < settle
        if busy and now - self._status_since < self.options.status_interval:
            # look again later (the watch's queue is read when sending)
            self._status_due = now + (max(settle - age, STATUS_MIN_LOOK) if recent else STATUS_BUSY_LOOK)
            return
        written = self._read_sync_watch()
        self._refresh_backlog()
        if written or self._status_settle:
            self.check_space()  # Cyrus is writing: the room left
        self.send_status(now=now)
        if busy:  # --status-interval passed while the writes go on: the next STATUS is pending already
            self._status_due, self._status_settle, self._status_since = now + STATUS_BUSY_LOOK, True, now
        else:
            self._arm(self.watch, self._on_sync_change, True)

    # -- lost events: the journal and the sync file systems
    def _open_journal(self) -> None:
        invocation = cyruslog.invocation_id()
        if not cyruslog.available() or invocation is None:
            log.warning("no journal to read (not started by systemd): failed sync log writes are "
                        "detected only as a full or read-only sync file system, and by the drain")
            return
        reader = cyruslog.sd_journal()
        if reader is None:
            log.info("libsystemd could not be loaded: the journal is read through journalctl")
        self.journal = cyruslog.Watcher(invocation, self.unit, reader=reader)
        directories = cyruslog.journal_directories()
        if not directories:
            log.warning("no journal directory to watch (%s): the journal is asked every %.0fs instead",
                        " or ".join(cyruslog.JOURNAL_BASES), JOURNAL_INTERVAL)
            return
        self.journal_watch = DirWatch(MODIFICATIONS)
        for directory in directories:
            self.journal_watch.add(str(directory), directory, cyruslog.is_journal_file)
        self.journal_watch.read()

    def _on_journal_activity(self) -> None:
        """journald wrote something: look within JOURNAL_INTERVAL of the last look, and meanwhile
        leave further news queued in the kernel (no wake-up per journal write)."""
        self.journal_watch.read()
        self._arm(self.journal_watch, self._on_journal_activity, False)
        if self._journal_due is None:
            self._journal_due = max(time.monotonic(), self._journal_checked + JOURNAL_INTERVAL)

    def _journal_turn(self, now: float) -> None:
        self.check_journal()
        self.check_space()
        self._journal_checked = now
        if self.journal_watch is None or self.journal_watch.read():
            self._journal_due = now + JOURNAL_INTERVAL  # no watch, or written meanwhile: look again
        else:
            self._journal_due = None
            self._arm(self.journal_watch, self._on_journal_activity, True)

    def check_journal(self, sync: bool = False) -> None:
        """What Cyrus (or journald) said since the last look; `sync` first flushes journald."""
        if self.journal is None:
            return
        reading_in_process = self.journal.reader is not None
        entries = self.journal.poll(sync=sync)
        if reading_in_process and self.journal.reader is None:
            log.warning("reading the journal through libsystemd failed (%s): journalctl from now on",
                        self.journal.reader_failure)
        if entries is None:
            log.warning("could not read the journal: a failed sync log write would be seen only as a "
                        "full or read-only sync file system, and by the drain")
            return
        self._judge_entries(entries)

    def _judge_entries(self, entries: list[cyruslog.Entry]) -> None:
        failed = [e for e in entries if e.sync_log_failure]
        dropped = sum(e.suppressed(self.unit) for e in entries) if self.unit else 0
        if failed:
            self._sync_log_failed(len(failed), f"Cyrus reported a failed sync log write: {failed[-1]}",
                                  {"first": str(failed[0]), "last": str(failed[-1]), "lines": len(failed)})
        if dropped:
            self._sync_log_failed(0, f"journald suppressed {dropped} messages of {self.unit}: a failed sync "
                                     "log write may have been among them", {"suppressed": dropped},
                                  kind="dropped")

    def _sync_log_failed(self, lines: int, reason: str, evidence: dict, kind: str = "journal") -> None:
        """Record a (possible) lost replication event: marker, STATUS, and the journal -- at once for
        the first of each kind (Cyrus's own report, a full file system, journald's drops), then at
        most once per FAILURE_LOG_INTERVAL."""
        self.sync_failures += lines
        try:
            marker = state.record_sync_log_failure(self.instance, reason, evidence)
        except OSError as e:  # the state directory may sit on the full file system itself
            marker = None
            log.error("could not record the sync-log-failure marker (%s): reconcile with sync_client -A", e)
        if "synclog" not in self.notes:
            self._failing_since = time.strftime("%H:%M:%S")
        seen = f"{self.sync_failures} failed writes reported by Cyrus" if self.sync_failures else reason.split(" (")[0]
        self.notes["synclog"] = (f"SYNC LOG WRITE FAILED since {self._failing_since} ({seen}): events missing, "
                                 "reconcile needed")
        now = time.monotonic()
        if now - self._failure_logged.get(kind, -FAILURE_LOG_INTERVAL) >= FAILURE_LOG_INTERVAL:
            self._failure_logged[kind] = now
            consequence = (f"mail was acknowledged without a replication event ({self.sync_failures} failed "
                           "writes so far)" if kind == "journal" else "replication events may be lost")
            log.error("%s; %s: marked for a reconcile in %s (sync_client -A; the drain refuses a clean "
                      "result until then)", reason, consequence, marker)
        self.request_status()

    def check_space(self) -> None:
        """statvfs of each sync file system: a STATUS warning below --space-warn percent free, and a
        failure while master runs once nothing is left (Cyrus's next append fails)."""
        low, seen = [], set()
        for channel in self.channels:
            room = synclog.room(channel.sync_dir)
            if room is None or channel.sync_dir in seen:
                continue
            seen.add(channel.sync_dir)
            key = str(channel.label)
            if room.full:
                if key not in self._full and self.master is not None and self.master_exit() is None:
                    self._full.add(key)
                    self._sync_log_failed(0, f"sync file system full while Cyrus runs ({room.describe()}): "
                                             "its next sync log append fails", {"room": room.describe()},
                                          kind="space")
                low.append(f"{channel.label} FULL")
            else:
                self._full.discard(key)
                if room.percent_free < self.options.space_warn:
                    low.append(f"{channel.label} {room.percent_free:.0f}% free")
        text = ("sync file system low: " + ", ".join(low)) if low else None
        if text != self.notes.get("space"):
            if text:
                self.notes["space"] = text
                log.warning("%s (warning below %g%%)", text, self.options.space_warn)
            else:
                self.notes.pop("space", None)
            self.request_status()

    def final_journal_check(self) -> None:
        """After master is gone: what its children logged during the stop."""
        self.check_journal(sync=True)

    def report_orphans(self) -> None:
        orphans = synclog.orphaned_channels(self.instance)
        if not orphans:
            self.notes.pop("orphans", None)
            return
        what = " ".join(f"{o.label}={o.lines}" for o in orphans)
        self.notes["orphans"] = f"orphaned sync log channels (not in sync_log_channels): {what}"
        log.error("sync log events of channels that sync_log_channels no longer names, nothing replays "
                  "them: %s (%s); add the channel back and drain, or remove the directory if that "
                  "replica is gone", what, ", ".join(str(o.sync_dir) for o in orphans))

    # -- start
    def preflight(self) -> Path:
        master = cyrus.program("master")
        if not os.access(master, os.X_OK):
            raise StartRefused(f"{master} is not an executable file (set CYRUSHELPER_CYRUS_BINDIR?)")
        other = proc.running_master(self.instance.pid_file)
        if other is not None:
            raise StartRefused(f"a master (PID {other}) already runs for {self.instance.pid_file}")
        return master

    def start_master(self, master: Path) -> None:
        cmd = [str(master), "-C", str(self.instance.imapd.path), "-M", str(self.instance.cyrus.path),
               "-p", str(self.instance.pid_file), "-D"]
        log.info("starting %s", " ".join(cmd))
        self.master = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL,
                                       env=strip_notify_env(os.environ))
        state.record_run(self.instance, self.master.pid)

    def wait_ready(self, use_ready_file: bool) -> str:
        """'ready', 'stop' (a stop signal arrived), 'died' or 'timeout'."""
        deadline = time.monotonic() + self.options.start_timeout
        prober = None if use_ready_file else Prober(self.instance, self.loop.selector)
        try:
            while True:
                if self.master_exit() is not None:
                    return "died"
                if prober is None:  # the watch wakes us when master creates the file
                    if self.instance.ready_file.exists():
                        return "ready"
                    self.notes["start"] = f"starting: waiting for {self.instance.ready_file}"
                    next_try = None
                else:
                    next_try = prober.step()
                    if prober.served:
                        return "ready"
                    self.notes["start"] = "starting: waiting for " + ", ".join(sorted(prober.failures))
                self.send_status()  # (only when the text changed)
                now = time.monotonic()
                if now >= deadline:
                    return "timeout"
                timeout = deadline - now if next_try is None else min(deadline - now, max(0.0, next_try - now))
                if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.loop.poll(timeout)):
                    return "stop"
        finally:
            if prober is not None:
                prober.close()

    # -- after READY
    def start_background_work(self) -> None:
        markers = state.reconcile_markers(self.instance)
        if markers:
            described = "; ".join(state.describe_marker(n, m) for n, m in sorted(markers.items()))
            what = ", ".join(f"{'unclean stop' if n == state.UNCLEAN_STOP else 'sync log write failed'} "
                             f"{m.get('time', '?')}" for n, m in sorted(markers.items()))
            if self.instance.is_replica:
                # sync_client -A here would push the replica's state over its primary's
                self.notes["unclean"] = f"{what}: reconciled from the primary, not from here"
                log.warning("%s; this instance is a replica: the primary's reconcile (or a switchover "
                            "proof) covers it, a replica never pushes", described)
            elif self.options.reconcile == "auto":
                self.start_reconcile()
            elif self.options.reconcile == "recommend":
                self.notes["unclean"] = f"{what}: reconcile with sync_client -A (or run with --reconcile=auto)"
                log.warning("%s: replication events may be missing that no log replay recovers; cleared "
                            "by %s (here: `sync_client -C %s -A` per channel)", described,
                            state.UNCLEAN_CLEARED_BY, self.instance.imapd.path)
        self.report_orphans()
        self.check_leftovers()

    def start_reconcile(self) -> None:
        sync_client = str(cyrus.program("sync_client"))
        commands = []
        for ch in replication_channels(self.instance):
            cmd = [sync_client, "-C", str(self.instance.imapd.path)]
            if ch.name:
                cmd += ["-n", ch.name]
            commands.append(cmd + ["-A"])
        if not commands:
            self.notes["unclean"] = "reconcile needed; no channel with sync_host to reconcile"
            return
        job = Job("reconcile", commands, self.options.reconcile_timeout, self.loop)
        self.jobs["reconcile"] = job
        self.notes["unclean"] = "reconcile (sync_client -A) running: events may be missing"
        job.start()

    def snapshot_leftovers(self) -> None:
        """Channels holding events from before this start (read before master runs, so events
        the new master writes are not mistaken for leftovers)."""
        rolling = rolling_channels(self.instance)
        self.leftover_channels = {b.channel for b in (synclog.backlog(c) for c in
                                                     replication_channels(self.instance))
                                  if not b.empty and b.channel not in rolling}

    def check_leftovers(self) -> None:
        orphans = [b for b in (synclog.backlog(c) for c in replication_channels(self.instance))
                   if b.channel in self.leftover_channels and not b.empty]
        if not orphans:
            return
        what = " ".join(f"{b.channel}={b.lines}" for b in orphans)
        log.warning("sync log events left from before this start and no rolling sync_client to replay "
                    "them: %s", what)
        if not self.options.leftover_drain:
            self.notes["leftover"] = f"leftover events {what}: run `cyrushelper drain`"
            return
        cmd = [sys.executable, "-m", "cyrushelper", "drain", "-C", str(self.instance.imapd.path),
               "-M", str(self.instance.cyrus.path), "--instance", self.instance.name,
               "--deadline", str(self.options.drain_timeout)]
        for b in orphans:
            cmd += ["--channel", b.channel]
        # the drain keeps its own deadline; ours is only the backstop
        job = Job("drain", [cmd], self.options.drain_timeout + 30, self.loop)
        self.jobs["drain"] = job
        self.notes["leftover"] = f"draining leftover events {what}"
        job.start()

    def _job_finished(self, name: str, job: Job) -> None:
        codes = [code for _, code in job.results]
        if name == "reconcile":
            if job.succeeded and self.sync_failures == 0:
                markers = state.reconcile_markers(self.instance)
                state.clear_reconcile_markers(self.instance, by="reconcile at start: sync_client -A succeeded "
                                                                f"on every channel ({len(job.commands)})")
                self.notes.pop("unclean", None)
                names = " and ".join(n.replace(".json", "") + " marker" for n in sorted(markers, reverse=True))
                log.info("reconcile finished: every channel re-synced, %s cleared (%s)", names or "no marker",
                         "; ".join(state.describe_marker(n, m) for n, m in sorted(markers.items()))
                         or "already gone")
            elif job.succeeded:
                self.notes["unclean"] = "reconcile done, but sync log writes failed meanwhile: marker kept"
                log.error("reconcile finished, but Cyrus failed to write sync log lines meanwhile: the "
                          "marker stays")
            else:
                self.notes["unclean"] = f"reconcile FAILED (exit {codes}): marker kept"
                log.error("reconcile failed (exit codes %s); the reconcile marker stays", codes)
        elif name == "drain":
            if job.succeeded:
                self.notes.pop("leftover", None)
                log.info("leftover events drained")
            else:
                self.notes["leftover"] = f"leftover drain incomplete (exit {codes}): run `cyrushelper drain`"
                log.warning("leftover drain ended with %s; events kept for the next drain", codes)

    # -- the running phase
    def gone(self) -> bool:
        """Whether what we supervise ended on its own (master exited)."""
        return self.master_exit() is not None

    def reload(self) -> None:
        log.info("SIGHUP: asking master to re-read its configuration")
        proc.signal_pids([self.master_pid], signal.SIGHUP)

    def serve(self) -> tuple[str, int | None]:
        """Run until a stop signal ('stop', signum) or master's own exit ('died', None). Woken only
        by events: a signal (SIGCHLD when master exits), a job ending, the sync logs being
        written, journald writing; and by the timers those events set (a STATUS due, a journal
        check due). Nothing happening means no wake-up."""
        self.loop.remove_reader(self.watch)  # read and discarded while starting
        self._arm(self.watch, self._on_sync_change, True)
        if self.journal is not None:
            self._journal_due = time.monotonic()  # what was logged while Cyrus started
        while True:
            if self.gone():
                return "died", None
            for name, job in list(self.jobs.items()):
                if job.done:
                    del self.jobs[name]
                    self._job_finished(name, job)
                    self.request_status()
            now = time.monotonic()
            if self._journal_due is not None and now >= self._journal_due:
                self._journal_turn(now)
            if self._status_due is not None and now >= self._status_due:
                self._status_turn(now)
            dues = [d for d in (self._journal_due, self._status_due) if d is not None]
            signums = self.loop.poll(max(0.0, min(dues) - time.monotonic()) if dues else None)
            for signum in signums:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    return "stop", signum
                if signum == signal.SIGHUP:
                    self.reload()

    # -- stop
    def stop(self, reason: str) -> dict:
        """The fence and its grace, then exactly one SIGTERM to master, a bounded wait, SIGKILL past
        the deadline (--stop-timeout counts from the SIGTERM)."""
        opts = self.options
        self.notifier.stopping(f"stopping: {reason}")
        for watch in list(self._armed):  # no backlog or journal news while stopping
            self._arm(watch, None, False)
        for job in list(self.jobs.values()):
            job.cancel()
        self.jobs.clear()
        # extend systemd's timer past our own deadline so that our escalation, not systemd's, acts
        pulse = Pulse(self.notifier, extend=opts.extend_interval * 2 + 5, interval=opts.extend_interval)
        if self.master_exit() is None:  # new sessions get BYE, new deliveries 421; open ones finish
            fence.fence_and_wait(self.instance, opts.grace, opts.message, tick=lambda sessions, deliveries: pulse(
                f"stopping: fence up, waiting for {sessions} sessions and {deliveries} LMTP deliveries"))
        t0 = time.monotonic()
        deadline = t0 + opts.stop_timeout
        if self.master_exit() is None:
            proc.signal_pids([self.master_pid], signal.SIGTERM)
            log.info("SIGTERM sent to master %d (%s)", self.master_pid, reason)
        result = self.wait_session(deadline, pulse, t0)
        result["reason"] = reason
        return result

    def wait_session(self, deadline: float, pulse: Pulse, t0: float) -> dict:
        """Wait for master and every process of its session, woken by each exit (pidfds; master,
        our child, by SIGCHLD) and by the timers: EXTEND pulses, the alone grace, the deadline."""
        exits = proc.Exits(self.loop, self.master_pid)
        alone_since = None
        try:
            while True:
                exited = self.master_exit()
                left = self.session_left()
                if exited is not None and not left:
                    result = {"result": "clean", "seconds": round(time.monotonic() - t0, 3),
                              "master_exit": list(exited)}
                    if alone_since is not None:  # what a master's grace is measured against
                        result["master_after_last_child"] = round(time.monotonic() - alone_since, 4)
                    return result
                if not exits.track(left):
                    continue  # one of them exited while we listed them: list again
                now = time.monotonic()
                wake = [deadline, pulse.due()]
                if exited is None and not left:
                    alone_since = alone_since or now
                    if cyrus.has_shutdown_hang(self.version):
                        hang_due = alone_since + self.options.master_alone_grace
                        if now >= hang_due:
                            unreaped = self.unreaped_children()
                            if unreaped:
                                return self.kill_lone_master(t0, self._hang_reason(now - alone_since, unreaped))
                        else:
                            wake.append(hang_due)
                else:
                    alone_since = None
                if now >= deadline:
                    return self.escalate(exited, left, t0)
                n = len(left)
                pulse(f"stopping: {'master and ' if exited is None else ''}{n} children left")
                if not exits.complete:
                    wake.append(now + proc.FALLBACK_POLL)
                timeout = max(0.0, min(w for w in wake if w is not None) - time.monotonic())
                for signum in self.loop.poll(timeout):
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        self.repeated_stop_signals += 1
                        if self.repeated_stop_signals == 1:  # once: a flood must not flood the journal
                            log.info("signal %d while stopping: ignored, like any repeat (master gets "
                                     "exactly one SIGTERM)", signum)
        finally:
            exits.close()

    def unreaped_children(self) -> list[int]:
        """Master's exited children it has not reaped (zombies): a master that is alive but does
        not reap is not handling SIGCHLD (the #5309 hang), a healthy one reaps within milliseconds."""
        return sorted(p.pid for p in proc.all_processes() if p.ppid == self.master_pid and p.zombie)

    def _hang_reason(self, alone: float, unreaped: list[int]) -> str:
        return (f"master {self.master_pid} has not reaped its {len(unreaped)} exited children "
                f"{alone:.2f}s after the last one exited (Cyrus shutdown hang, cyrus-imapd #5309, fixed in "
                "3.12.0, 3.10.2 and 3.8.6)")

    def kill_lone_master(self, t0: float, why: str) -> dict:
        """Every child has exited, but master does not: SIGKILL to master alone. Master writes no
        replication events itself and all its children finished their work, so this loses
        nothing: the stop stays clean."""
        log.warning("%s: SIGKILL to master; all children had exited, nothing is lost", why)
        proc.signal_pids([self.master_pid], signal.SIGKILL)
        proc.wait_gone([self.master_pid], proc.KILL_SETTLE)
        return {"result": "clean", "seconds": round(time.monotonic() - t0, 3),
                "master_exit": list(self.master_exit() or (None, signal.SIGKILL)),
                "master_hung_after_children": True}

    def escalate(self, exited, left: list[int], t0: float) -> dict:
        if exited is None and not left:
            return self.kill_lone_master(t0, f"stop deadline of {self.options.stop_timeout:g}s passed with "
                                             f"master {self.master_pid} alone")
        who = ("master and " if exited is None else "") + (self._describe(left) or "no children")
        log.error("stop deadline of %.0fs passed, still running: %s; sending SIGKILL",
                  self.options.stop_timeout, who)
        self.notifier.status(f"stopping: deadline passed, SIGKILL to {len(left) + (exited is None)} processes")
        killed = proc.kill_session(self.master_pid)
        proc.wait_gone(killed, proc.KILL_SETTLE)  # SIGKILL is not instantaneous for a process in D state
        marker = state.record_unclean_stop(self.instance, f"stop deadline of {self.options.stop_timeout:g}s "
                                           f"passed; SIGKILLed {who}", killed, self.master_pid)
        log.error("stop recorded as unclean in %s: replication events may be missing, reconcile with "
                  "sync_client -A", marker)
        return {"result": "unclean", "seconds": round(time.monotonic() - t0, 3), "killed_pids": killed}

    def after_master_died(self) -> dict:
        code, sig = self.master_exit()
        how = f"exit status {code}" if sig is None else f"signal {sig}"
        log.error("master %d exited unexpectedly (%s): the unit fails", self.master_pid, how)
        self.notifier.status(f"master exited unexpectedly ({how})")
        for job in list(self.jobs.values()):
            job.cancel()
        self.jobs.clear()
        left = self.session_left()
        result = {"result": "master died", "master_exit": [code, sig]}
        if left:
            # Master exits 0 only at the end of its graceful shutdown, after its children (and
            # then a second SIGTERM would kill a straggler at once). Killed by a signal or exiting
            # through fatal() (non-zero), it never told its children to stop: we do, once.
            # Only to those still catching SIGTERM: a child whose handler is gone already got
            # master's SIGTERM (SA_RESETHAND) and a second one would kill it mid-write.
            untold = [p for p in left if proc.catches(p, signal.SIGTERM)]
            if code != 0 and untold:
                log.warning("master left %d processes: SIGTERM to %s", len(left), self._describe(untold))
                proc.signal_pids(untold, signal.SIGTERM)
            t0 = time.monotonic()
            pulse = Pulse(self.notifier, extend=self.options.extend_interval * 2 + 5,
                          interval=self.options.extend_interval)
            sub = self.wait_session(t0 + self.options.stop_timeout, pulse, t0)
            if sub["result"] == "unclean":
                result["killed_pids"] = sub["killed_pids"]
                result["unclean"] = True
        return result

    # -- whole life
    def run(self) -> int:
        opts = self.options
        master = self.preflight()
        self.snapshot_leftovers()
        marker = state.unclean_stop(self.instance)
        if marker is not None:
            log.warning("unclean-stop marker present: %s", state.describe_unclean(marker))
        if fence.remove_fence(self.instance):
            log.info("removed a stale fence %s (left by an earlier stop)", self.instance.fence_file)
        state.clear_listeners(self.instance)  # master mode now, whatever ran before
        self.version = cyrus.master_version(master)
        use_ready_file = cyrus.has_ready_file(self.version)
        if use_ready_file:
            try:
                os.unlink(self.instance.ready_file)  # stale: master is not running (checked above)
            except FileNotFoundError:
                pass
        self.loop = proc.Loop()
        self.loop.handle_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        try:
            self._open_watch(use_ready_file)
            self._open_journal()
            self.start_master(master)
            outcome = self.wait_ready(use_ready_file)
            if outcome == "ready":
                self.notes.pop("start", None)
                self._refresh_backlog()
                log.info("Cyrus serves (master %d; ready: %s): %s", self.master_pid,
                         READY_BY_FILE if use_ready_file else READY_BY_PROBES, self._backlog_text)
                self.check_space()
                self.notifier.ready(self.status_text())
                self._last_status_text = self.status_text()
                self.start_background_work()
                self.send_status()
                outcome, signum = self.serve()
                reason = f"signal {signal.Signals(signum).name}" if outcome == "stop" else ""
            elif outcome == "stop":
                reason = "stop requested during start"
            elif outcome == "timeout":
                log.error("Cyrus did not become ready within %.0fs: %s", opts.start_timeout,
                          self.notes.get("start", ""))
                reason = "start timeout"
            else:
                reason = ""
            if outcome == "died":
                result = self.after_master_died()
                code = exitcodes.FAILURE
            else:
                result = self.stop(reason)
                code = exitcodes.UNCLEAN_STOP if result["result"] == "unclean" else exitcodes.OK
                if outcome == "timeout" and code == exitcodes.OK:
                    code = exitcodes.FAILURE
            self.master.wait()
            self.final_journal_check()
            if self.sync_failures:
                result["sync_log_failures"] = self.sync_failures
            if fence.remove_fence(self.instance):
                log.info("fence removed: nothing of this instance runs any more")
            state.record_last_stop(self.instance, {"instance": self.instance.name, **result})
            if outcome != "died":
                log.info("stopped: %s after %.2fs", result["result"], result.get("seconds", 0))
            return code
        finally:
            if self.master is not None and self.master.poll() is None:
                # we are leaving on an exception: never leave a master without its supervisor
                proc.kill_session(self.master.pid)
                self.master.wait()
            for watch in (self.watch, self.journal_watch):
                if watch is not None:
                    watch.close()
            # keep ignoring a late SIGTERM (a repeated stop) until the process has exited
            self.loop.close(restore_handlers=False)

    def _open_watch(self, use_ready_file: bool) -> None:
        self.watch = DirWatch()
        for channel in self.channels:
            self.watch.add_channel(channel)
        if use_ready_file:
            self.watch.add_file("master.ready", self.instance.ready_file)
        self.loop.add_reader(self.watch, self.watch.read)  # until READY: see wait_ready, serve


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    arguments.add_instance_arguments(parser)
    d = Options()
    parser.add_argument("--start-timeout", type=arguments.seconds, default=d.start_timeout, metavar="SECONDS",
                        help=f"give up (stop master, exit 1) if Cyrus cannot serve after this long "
                             f"(default {d.start_timeout:g})")
    parser.add_argument("--stop-timeout", type=arguments.seconds, default=d.stop_timeout, metavar="SECONDS",
                        help=f"after master's SIGTERM, SIGKILL what is left after this long and record "
                             f"the stop as unclean (default {d.stop_timeout:g})")
    parser.add_argument("--master-alone-grace", type=arguments.seconds, default=d.master_alone_grace, metavar="SECONDS",
                        help="when every child has exited but master has not reaped them after this long "
                             "(the shutdown hang of Cyrus before 3.12.0/3.10.2/3.8.6, cyrus-imapd #5309), "
                             "SIGKILL master alone; the stop stays clean because no child was cut short "
                             f"(default {d.master_alone_grace:g}; a master without the hang exits within "
                             "milliseconds of its last child and reaps at once)")
    parser.add_argument("--status-interval", type=arguments.seconds, default=d.status_interval, metavar="SECONDS",
                        help="STATUS= shows the backlog once the sync logs were not written for "
                             f"{STATUS_SETTLE * 1000:.0f} ms ({STATUS_QUIET_AFTER_SEND * 1000:.0f} ms within "
                             "SECONDS of the last STATUS), and at least every SECONDS while they keep "
                             f"being written (default {d.status_interval:g})")
    parser.add_argument("--reconcile", choices=RECONCILE_CHOICES, default=d.reconcile,
                        help="after an unclean stop: auto = run `sync_client -A` per channel after READY "
                             "and clear the marker on success; recommend = say so in STATUS and the "
                             "journal; off = only `status` reports it (default recommend)")
    parser.add_argument("--reconcile-timeout", type=arguments.seconds, default=d.reconcile_timeout, metavar="SECONDS",
                        help=f"deadline for the whole reconcile (default {d.reconcile_timeout:g})")
    parser.add_argument("--leftover-drain", choices=("auto", "off"), default="auto",
                        help="sync log events found at start on a channel without a rolling sync_client: "
                             "auto = run `cyrushelper drain` in the background after READY; off = only "
                             "report them in STATUS (default auto)")
    parser.add_argument("--drain-timeout", type=arguments.seconds, default=d.drain_timeout, metavar="SECONDS",
                        help=f"deadline for that background drain (default {d.drain_timeout:g})")
    parser.add_argument("--space-warn", type=arguments.percent, default=d.space_warn, metavar="PERCENT",
                        help="warn in STATUS and the journal when a sync file system has less than this "
                             "much space (or inodes) left for the cyrus user; when nothing is left while "
                             "Cyrus runs, the instance is marked for a reconcile "
                             f"(default {d.space_warn:g})")
    fence.add_fence_arguments(parser)
    parser.add_argument("--role", choices=role.ROLES,
                        help="a switchable instance: start only in this role; refused when its recorded "
                             "role differs (split-brain guard, exit 77)")
    parser.add_argument("--force", action="store_true",
                        help="with --role: start in that role even against the record (loudly), and "
                             "record it")


def options_from(args: argparse.Namespace) -> Options:
    return Options(start_timeout=args.start_timeout, stop_timeout=args.stop_timeout,
                   master_alone_grace=args.master_alone_grace,
                   status_interval=args.status_interval, reconcile=args.reconcile,
                   reconcile_timeout=args.reconcile_timeout,
                   leftover_drain=args.leftover_drain == "auto", drain_timeout=args.drain_timeout,
                   space_warn=args.space_warn, grace=args.grace, message=args.message)


def main(args: argparse.Namespace) -> int:
    files = arguments.instance_files(args)
    if files.switchable:
        try:
            configdirectory = parse_imapd_conf(files.imapd_conf).configdirectory
            chosen = role.start_role(files, configdirectory, args.role, args.force)
        except role.RoleRefused as e:
            log.error("%s", e)
            return exitcodes.REFUSED
        instance = arguments.load_instance(args, warn=True, role=chosen)
        for warning in role.check_switchable(instance):
            log.warning("%s", warning)
        log.info("instance %s starts as %s (master runs %s)", instance.name, chosen, instance.cyrus.path)
    elif args.role is not None:
        log.error("--role: instance %s is not switchable (its unit names one cyrus.conf)", files.name)
        return exitcodes.USAGE
    else:
        instance = arguments.load_instance(args, warn=True)
    options = options_from(args)
    try:
        return Supervisor(instance, options).run()
    except StartRefused as e:
        log.error("%s", e)
        return exitcodes.FAILURE

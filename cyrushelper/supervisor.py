"""`cyrushelper run`: Cyrus master as a Type=notify service, with a stop that is bounded and honest.

Start: a running master for the instance makes us refuse; a stale fence (msg/shutdown) is removed;
`master -C IMAPD -M CYRUS -p PIDFILE -D` starts in a session of its own (master's shutdown does
kill(0, SIGTERM) on its process group, which must not include us) without NOTIFY_SOCKET.
READY=1 is sent when Cyrus can serve. master.c binds the SERVICES sockets only after every START
entry finished (e.g. `ctl_cyrusdb -r`), then starts `wait=y` daemons, then enters its accept loop;
so we require every SERVICES listener to accept a connection and every service that speaks first
(imapd, pop3d, lmtpd, timsieved, nntpd without -s) to send its greeting, which only a child forked
by the running loop can do (probe.py). Cyrus ≥ 3.10 also creates master.ready just before that
loop: when the installed master is that new (cyrus.py) we first wait for the file (inotify), then
probe the listeners.

Running: STATUS= shows each channel's replication backlog, refreshed from inotify events on the
sync directories (at most every --status-interval seconds). SIGHUP goes to master (it re-reads
cyrus.conf). Master exiting on its own ends us with exit 1: the unit fails.

Lost events (issue 10): Cyrus acknowledges mail whose sync log line it could not write (lmtpd
answers 250 and only logs "write() to …/sync/log failed: No space left on device"). What `run`
watches, and what it can and cannot see:
- the journal of this invocation (cyruslog.Watcher, asked every SPACE_CHECK_INTERVAL seconds and
  once more after master is gone): every failed sync log write Cyrus reports, and journald's
  "Suppressed N messages" for this unit (a failure may have been among them). Not available
  outside systemd (said once at start); a journal that cannot store (its own disk full) loses
  lines, which the next check covers.
- statvfs of every sync file system, on each sync log change and every SPACE_CHECK_INTERVAL
  seconds: below --space-warn percent free, STATUS warns; full (no block or inode left for the
  cyrus user) or read-only while master runs counts as a failure, since Cyrus's next append fails.
  A disk full for less than the interval between two checks is seen only through the journal.
- the drain (ExecStopPost) finds what a failed write left in the file: a cut-off line.
Any of these records the sync-log-failure marker (state.py): status reports it, the drain refuses a
clean result until a reconcile (`sync_client -A`) succeeded, --reconcile=auto runs it at the next
start. Sync log directories that sync_log_channels no longer names but hold events are reported.

Stop (SIGTERM or SIGINT): STOPPING=1, then exactly one SIGTERM to master (the unit's
KillMode=mixed keeps systemd from signalling the children too; a second SIGTERM would kill a
Cyrus child at once). We wait for master and every process of its session until --stop-timeout,
resending EXTEND_TIMEOUT_USEC and STATUS=stopping: N children left. Past the deadline the whole
session is SIGKILLed (master first), the stop is recorded as unclean (state.py) and we exit 70.
The next start reports the marker and, with --reconcile=auto, runs `sync_client -A` per channel.
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
from cyrushelper.probe import probe_all
from cyrushelper.syncwatch import DirWatch

log = logging.getLogger("cyrushelper.run")

RECONCILE_CHOICES = ("auto", "recommend", "off")
SPACE_CHECK_INTERVAL = 5.0
FAILURE_LOG_INTERVAL = 60.0    # at most one journal line per minute about continuing failures
# how READY=1 was decided, in the journal line that says Cyrus serves (tests read it to tell the
# Cyrus 3.10+ master.ready path from the 3.6 one)
READY_BY_FILE = "master.ready, then every listener accepts"
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
    master_alone_grace: float = 1.0
    status_interval: float = 0.5
    extend_interval: float = 5.0
    reconcile: str = "recommend"
    reconcile_timeout: float = 600.0
    leftover_drain: bool = True
    drain_timeout: float = 300.0
    space_warn: float = synclog.DEFAULT_SPACE_WARN


class Supervisor:
    def __init__(self, instance: Instance, options: Options, notifier: Notifier | None = None):
        self.instance = instance
        self.options = options
        self.notifier = notifier or Notifier()
        self.master: subprocess.Popen | None = None
        self.loop: proc.Loop | None = None
        self.watch = None
        self.jobs: dict[str, Job] = {}
        self.leftover_channels: set[str] = set()
        self.notes: dict[str, str] = {}       # extra STATUS fragments by topic
        self._status_due: float | None = None
        self._last_status = 0.0
        self._last_status_text = None
        self._backlog_text = ""
        self.repeated_stop_signals = 0
        self.journal: cyruslog.Watcher | None = None
        self.unit = cyruslog.own_unit()
        self.sync_failures = 0                 # failed sync log writes seen in this run
        self._failure_logged: dict[str, float] = {}
        self._full: set[str] = set()           # sync file systems seen full (one marker per episode)
        self._space_due = self._space_checked = 0.0

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

    # -- status
    def _refresh_backlog(self) -> None:
        self._backlog_text = synclog.format_backlog([synclog.backlog(c) for c in self.instance.channels])

    def status_text(self) -> str:
        parts = [self._backlog_text] + [v for _, v in sorted(self.notes.items())]
        return "; ".join(p for p in parts if p)

    def send_status(self, force: bool = False) -> None:
        text = self.status_text()
        if force or text != self._last_status_text:
            self.notifier.status(text)
            self._last_status_text = text
        self._last_status = time.monotonic()
        self._status_due = None

    def _on_sync_change(self) -> None:
        changed = self.watch.read()
        if changed and time.monotonic() - self._space_checked >= self.options.status_interval:
            self.check_space()  # Cyrus is writing: look at the room left (at most every status interval)
        if changed:
            # coalesce: Cyrus appends once per message, STATUS needs no more than a few per second
            due = self._last_status + self.options.status_interval
            if self._status_due is None:
                self._status_due = due

    # -- lost events: the journal and the sync file systems
    def _open_journal(self) -> None:
        invocation = cyruslog.invocation_id()
        if not cyruslog.available() or invocation is None:
            log.warning("no journal to read (not started by systemd): failed sync log writes are "
                        "detected only as a full or read-only sync file system, and by the drain")
            return
        self.journal = cyruslog.Watcher(invocation, self.unit)

    def check_journal(self, sync: bool = False) -> None:
        """What Cyrus (or journald) said since the last look; `sync` first flushes journald."""
        if self.journal is None:
            return
        entries = self.journal.poll(sync=sync)
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
        self._status_due = time.monotonic()

    def check_space(self) -> None:
        """statvfs of each sync file system: a STATUS warning below --space-warn percent free, and a
        failure while master runs once nothing is left (Cyrus's next append fails)."""
        self._space_checked = time.monotonic()
        self._space_due = self._space_checked + SPACE_CHECK_INTERVAL
        low, seen = [], set()
        for channel in self.instance.channels:
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
            self._status_due = time.monotonic()

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
        ready_file_seen = not use_ready_file
        delay = 0.05
        while True:
            if self.master_exit() is not None:
                return "died"
            if not ready_file_seen:
                ready_file_seen = self.instance.ready_file.exists()
            if ready_file_seen:
                failures = {k: v for k, v in probe_all(self.instance).items() if v}
                if not failures:
                    return "ready"
                self.notes["start"] = "starting: waiting for " + ", ".join(sorted(failures))
                self.send_status()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            # Listeners are probed with a growing interval (a connect is all Cyrus 3.6 offers);
            # the ready file, SIGCHLD and stop signals wake us at once.
            signums = self.loop.poll(min(delay, remaining) if ready_file_seen else min(1.0, remaining))
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in signums):
                return "stop"
            delay = min(delay * 2, 0.5)

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
        """Run until a stop signal ('stop', signum) or master's own exit ('died', None)."""
        while True:
            if self.gone():
                return "died", None
            for name, job in list(self.jobs.items()):
                if job.done:
                    del self.jobs[name]
                    self._job_finished(name, job)
                    self._status_due = time.monotonic()
            now = time.monotonic()
            if now >= self._space_due:
                self.check_space()
                self.check_journal()
            if self._status_due is not None and now >= self._status_due:
                self._refresh_backlog()
                self.send_status()
            # The one timer: a disk filled by someone else shows no sync log event, and Cyrus's
            # failed writes are only in the journal. A lost SIGCHLD is covered by the same wake-ups.
            due = self._space_due if self._status_due is None else min(self._space_due, self._status_due)
            signums = self.loop.poll(max(0.0, due - time.monotonic()))
            for signum in signums:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    return "stop", signum
                if signum == signal.SIGHUP:
                    self.reload()

    # -- stop
    def stop(self, reason: str) -> dict:
        """Exactly one SIGTERM to master, a bounded wait, SIGKILL past the deadline."""
        opts = self.options
        self.notifier.stopping(f"stopping: {reason}")
        for job in list(self.jobs.values()):
            job.cancel()
        self.jobs.clear()
        t0 = time.monotonic()
        deadline = t0 + opts.stop_timeout
        # extend systemd's timer past our own deadline so that our escalation, not systemd's, acts
        pulse = Pulse(self.notifier, extend=opts.extend_interval * 2 + 5, interval=opts.extend_interval)
        if self.master_exit() is None:
            proc.signal_pids([self.master_pid], signal.SIGTERM)
            log.info("SIGTERM sent to master %d (%s)", self.master_pid, reason)
        result = self.wait_session(deadline, pulse, t0)
        result["reason"] = reason
        return result

    def wait_session(self, deadline: float, pulse: Pulse, t0: float) -> dict:
        alone_since = None
        while True:
            exited = self.master_exit()
            left = self.session_left()
            if exited is not None and not left:
                return {"result": "clean", "seconds": round(time.monotonic() - t0, 3),
                        "master_exit": list(exited)}
            now = time.monotonic()
            if exited is None and not left:
                alone_since = alone_since or now
                if now - alone_since >= self.options.master_alone_grace:
                    return self.kill_hung_master(t0)
            else:
                alone_since = None
            remaining = deadline - now
            if remaining <= 0:
                return self.escalate(exited, left, t0)
            n = len(left)
            pulse(f"stopping: {'master and ' if exited is None else ''}{n} children left")
            # short polls: children exit within milliseconds of master's SIGTERM, and each
            # tick here delays the drain that the stop is waiting for
            for signum in self.loop.poll(min(remaining, 0.1)):
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.repeated_stop_signals += 1
                    if self.repeated_stop_signals == 1:  # once: a flood must not flood the journal
                        log.info("signal %d while stopping: ignored, like any repeat (master gets "
                                 "exactly one SIGTERM)", signum)

    def kill_hung_master(self, t0: float) -> dict:
        """Every child has exited, but master does not: Cyrus ≤ 3.12 can spin at shutdown while
        connections wait on its listen sockets (pselect never delivers the pending SIGCHLD,
        cyrus-imapd #5309). Master writes no replication events itself and all its children
        finished their work, so SIGKILL to master alone loses nothing: the stop stays clean."""
        log.warning("master %d still running %.0fs after its last child exited (Cyrus shutdown hang, "
                    "cyrus-imapd #5309): SIGKILL to master; all children had exited, nothing is lost",
                    self.master_pid, self.options.master_alone_grace)
        proc.signal_pids([self.master_pid], signal.SIGKILL)
        for _ in range(50):
            if self.master_exit() is not None:
                break
            time.sleep(0.1)
        return {"result": "clean", "seconds": round(time.monotonic() - t0, 3),
                "master_exit": list(self.master_exit() or (None, signal.SIGKILL)),
                "master_hung_after_children": True}

    def escalate(self, exited, left: list[int], t0: float) -> dict:
        who = ("master and " if exited is None else "") + (self._describe(left) or "no children")
        log.error("stop deadline of %.0fs passed, still running: %s; sending SIGKILL",
                  self.options.stop_timeout, who)
        self.notifier.status(f"stopping: deadline passed, SIGKILL to {len(left) + (exited is None)} processes")
        killed = proc.kill_session(self.master_pid)
        for _ in range(50):  # SIGKILL is not instantaneous for a process in D state
            if not self.session_left():
                break
            time.sleep(0.1)
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
        use_ready_file = cyrus.has_ready_file(cyrus.master_version(master))
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
            if self.watch is not None:
                self.watch.close()
            # keep ignoring a late SIGTERM (a repeated stop) until the process has exited
            self.loop.close(restore_handlers=False)

    def _open_watch(self, use_ready_file: bool) -> None:
        self.watch = DirWatch()
        for channel in self.instance.channels:
            self.watch.add_channel(channel)
        if use_ready_file:
            self.watch.add_file("master.ready", self.instance.ready_file)
        self.loop.add_reader(self.watch, self._on_sync_change)


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
                        help="when every child has exited but master has not after this long (Cyrus "
                             "shutdown hang, cyrus-imapd #5309), SIGKILL master alone; the stop stays "
                             f"clean because no child was cut short (default {d.master_alone_grace:g})")
    parser.add_argument("--status-interval", type=arguments.seconds, default=d.status_interval, metavar="SECONDS",
                        help=f"at most one STATUS= update per interval (default {d.status_interval:g})")
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
                   space_warn=args.space_warn)


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

"""`cyrushelper drain`: replicate every pending sync log of every channel, then stop.

How Cyrus 3.6 reads a channel (imap/sync_client.c, imap/sync_log.c; checked by experiment):
- `sync_client -C CONF [-n CHAN] -R -1` first connects to the replica, *then* takes one file:
  `log-run` if it exists, else renames `log` to `log-run`; it replays it and unlinks it only on
  success. So each call removes at most one file, and a failed batch leaves `log-run` behind.
- Its exit code says nothing: 0 after a failed batch, 0 with nothing done. We judge by the files:
  a run made progress when the file it took is gone.
- With the replica down it never returns: it prints "Can not connect to server 'HOST', retrying
  in 15 seconds" on stderr and sleeps (also when nothing is pending, and `-o` changes nothing).
  That line is our "replica unreachable" signal: seen ~30 ms after start for a refused connection,
  10 s for a replica that accepts but never greets. The run is killed; nothing was touched yet
  (the rename only happens after the connection).
- A present sync_shutdown_file makes the run exit at once, doing nothing, and deletes the file:
  we pass `-F` with a path that can never exist, so the drain neither obeys nor eats it.
- Cyrus's reader holds no lock while replaying, and two readers of one channel can unlink each
  other's `log-run`: one drainer per channel (cyrushelper.locks) and no Cyrus rolling client on
  the channel (we look in /proc and refuse with LOCKED while one runs).
- Legacy `log-<pid>` files (Cyrus ≤ 2.4) are never read by a modern sync_client. `sync_client
  -r -f FILE` replays one but never removes it, and its exit status is the error code modulo 256
  (IMAP_INTERNAL is 0 then), so removing it afterwards would trust the exit code. Instead, when no
  `log-run` exists, we rename the legacy file to `log-run` (link + unlink: never overwrites) and
  let Cyrus's own reader replay it and remove it after success, as for any other file.

Draining while master runs is safe (writers append to a fresh `log`), only slower to finish:
the drain chases new events until its deadline. The stop path runs it after master is gone.

No false all-clear (issue 10). Besides the files being gone, exit 0 needs:
- every pending file is a regular file (a `log` that is a directory or a FIFO: Cyrus could not
  append to it, and reading a FIFO would hang) -> "damaged", nothing touched;
- no line that Cyrus's reader would drop (a cut-off last line, a malformed one): it is replayed
  with the rest, but the file is first copied aside into the state directory and the lines named
  -> "damaged";
- no channel directory with events that sync_log_channels no longer names -> "orphaned";
- no reconcile marker (state.py: an unclean stop, or sync log lines Cyrus failed to write, which
  `run` saw in the journal and this drain double-checks for its own invocation) ->
  "reconcile_needed", unless `--reconcile auto` runs `sync_client -A` on every channel and it
  succeeds. Damaged lines and unreadable files set that marker too.
When a run fails, what that sync_client logged (syslog, found in the journal by its PID) is quoted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cyrushelper import arguments, cyrus, cyruslog, exitcodes, proc, state, synclog
from cyrushelper.atomic import give_to_owner_of
from cyrushelper.channels import find_sync_readers, not_replicated_reason, replication_channels, select_channels
from cyrushelper.config import Channel, Instance
from cyrushelper.journal import channel_field
from cyrushelper.locks import ChannelLock, LockBusy, channel_lock_path
from cyrushelper.notify import Notifier, Pulse, strip_notify_env

log = logging.getLogger("cyrushelper.drain")

DEFAULT_DEADLINE = 300.0
DEFAULT_LOCK_WAIT = 10.0
MAX_FAILED_RUNS = 3            # runs in a row that answered but removed nothing -> SYNC_FAILED
UNREACHABLE_MARKER = "Can not connect to server"
# stat() of a path below /dev/null fails with ENOTDIR: a sync_shutdown_file that can never exist
NO_SHUTDOWN_FILE = "/dev/null/cyrushelper-drain-ignores-sync_shutdown_file"
KILL_GRACE = 2.0               # SIGTERM -> SIGKILL of a sync_client we give up on
STATUS_INTERVAL = 0.5
# Past the deadline plus the kill grace, a channel thread still running means a sync_client that
# survived SIGKILL (D state: hung disk or NFS). Stop the EXTEND pulses then, so systemd's
# TimeoutStopSec becomes the backstop, and stop waiting for the thread a little later.
OVERDUE_MARGIN = 10.0
OUTPUT_LINES_KEPT = 50         # of one sync_client run, for messages

# what a channel ended as -> exit code; with several channels failing, the first of
# PRECEDENCE present is the command's exit code
RESULT_CODES = {
    "drained": exitcodes.OK,
    "skipped": exitcodes.OK,
    "unreachable": exitcodes.REPLICA_UNREACHABLE,
    "sync_failed": exitcodes.SYNC_FAILED,
    "locked": exitcodes.LOCKED,
    "deadline": exitcodes.DEADLINE,
    "interrupted": exitcodes.DEADLINE,
    "config": exitcodes.CONFIG,
    "orphaned": exitcodes.CONFIG,
    "error": exitcodes.FAILURE,
    "damaged": exitcodes.RECONCILE_NEEDED,
    "reconcile_needed": exitcodes.RECONCILE_NEEDED,
}
PRECEDENCE = ("config", "orphaned", "error", "unreachable", "sync_failed", "locked", "deadline",
              "interrupted", "damaged")
KEPT_DIR = "kept"              # in the state directory: copies of damaged sync log files


@dataclass
class ChannelResult:
    channel: str
    sync_dir: str
    replica: str
    result: str = "drained"
    lines_before: int = 0
    lines_after: int = 0
    files_after: list[str] = field(default_factory=list)
    seconds: float = 0.0
    runs: int = 0
    message: str = ""
    damage: list[str] = field(default_factory=list)   # lines Cyrus's reader drops, file:line: why
    kept: list[str] = field(default_factory=list)     # copies of damaged files, for the operator

    @property
    def exit_code(self) -> int:
        return RESULT_CODES[self.result]


@dataclass
class DrainReport:
    instance: str
    started: str
    seconds: float
    exit_code: int
    channels: list[ChannelResult]
    service: dict | None = None
    master_pid: int | None = None
    reconcile: dict = field(default_factory=dict)   # markers left, or what the reconcile did

    @property
    def result(self) -> str:
        for name in PRECEDENCE:
            if any(c.result == name for c in self.channels):
                return name
        if self.reconcile.get("needed"):
            return "reconcile_needed"
        return "drained"

    def to_json(self) -> dict:
        data = asdict(self)
        data["result"] = self.result
        for c, d in zip(self.channels, data["channels"]):
            d["exit_code"] = c.exit_code
        return data


# --------------------------------------------------------------------------- files

def adopt_legacy_log(channel: Channel) -> Path | None:
    """Turn the oldest legacy `log-<pid>` into `log-run`, if no `log-run` exists. Never overwrites."""
    legacy = synclog.legacy_logs(channel.sync_dir)
    if not legacy or channel.log_run.exists():
        return None
    source = legacy[0]
    try:
        os.link(source, channel.log_run)  # fails with EEXIST instead of replacing a log-run
    except FileExistsError:
        return None
    give_to_owner_of(channel.log_run, channel.sync_dir)  # sync_client (as cyrus) opens it read-write
    # a crash between link and unlink leaves both names: the events are replayed twice, harmlessly
    os.unlink(source)
    log.info("channel %s: replaying legacy %s as %s", channel.label, source.name, channel.log_run.name)
    return source


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _tcp_probe(host: str | None, port: str | None, timeout: float = 1.0) -> bool | None:
    """Can we open a TCP connection to the replica? None when the port is not known."""
    if not host or not port:
        return None
    try:
        number = int(port) if port.isdigit() else socket.getservbyname(port, "tcp")
    except OSError:
        return None
    try:
        with socket.create_connection((host, number), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- one sync_client run

@dataclass
class RunOutcome:
    how: str                 # exited | unreachable | timeout | interrupted
    returncode: int | None
    output: list[str]
    pid: int = 0
    started: float = 0.0     # epoch seconds

    def last_words(self, n: int = 3) -> str:
        return " | ".join(line for line in self.output[-n:] if line) or "(no output)"

    def cyrus_said(self, n: int = 3) -> str:
        """What this sync_client wrote on stdout/stderr, else what it logged (Cyrus logs through
        syslog: the journal has it by PID), else where to look."""
        if any(self.output):
            return self.last_words(n)
        said = cyruslog.said_by(self.pid, self.started, n) if self.pid else []
        if said:
            return f"sync_client[{self.pid}] logged: " + " | ".join(said)
        return f"no output; see syslog for sync_client[{self.pid}]"


def run_sync_client(cmd: list[str], timeout: float, stop: threading.Event,
                    pass_fds: tuple[int, ...] = ()) -> RunOutcome:
    """Run one sync_client in its own session (NOTIFY_SOCKET stripped) under our own timeout."""
    started = time.time()
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=strip_notify_env(dict(os.environ)),
                             start_new_session=True, pass_fds=pass_fds)
    output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
    wake = threading.Event()
    flags = {"unreachable": False, "eof": False}

    def read_output():
        for raw in child.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            output.append(line)
            if UNREACHABLE_MARKER in line:
                flags["unreachable"] = True
                wake.set()
        flags["eof"] = True
        wake.set()

    reader = threading.Thread(target=read_output, name="sync_client-output", daemon=True)
    reader.start()
    end = time.monotonic() + timeout
    how = "exited"
    try:
        while True:
            if flags["unreachable"]:
                how = "unreachable"
                break
            if flags["eof"] or child.poll() is not None:
                break
            if stop.is_set():
                how = "interrupted"
                break
            remaining = end - time.monotonic()
            if remaining <= 0:
                how = "timeout"
                break
            # output EOF wakes us at once; the tick only bounds how late a stop request is seen
            wake.wait(min(remaining, 0.2))
            wake.clear()
    finally:
        if how != "exited":
            proc.terminate(child, KILL_GRACE)
        child.wait()
        reader.join(timeout=1.0)
        child.stdout.close()
    return RunOutcome(how, child.returncode, list(output), child.pid, started)


# --------------------------------------------------------------------------- one channel

class _ChannelDrainer:
    def __init__(self, instance: Instance, channel: Channel, sync_client: Path, end: float,
                 per_run_timeout: float | None, lock_wait: float, stop: threading.Event):
        self.instance, self.channel, self.sync_client = instance, channel, sync_client
        self.end, self.per_run_timeout, self.lock_wait, self.stop = end, per_run_timeout, lock_wait, stop
        self.result = ChannelResult(channel.label, str(channel.sync_dir), channel.replica_address)
        self._scanned: set[int] = set()   # inodes of files already checked for damaged lines

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def command(self) -> list[str]:
        cmd = [str(self.sync_client), "-C", str(self.instance.imapd.path)]
        if self.channel.name is not None:
            cmd += ["-n", self.channel.name]
        return cmd + ["-F", NO_SHUTDOWN_FILE, "-R", "-1"]

    def run(self) -> ChannelResult:
        t0 = time.monotonic()
        res = self.result
        res.lines_before = synclog.backlog(self.channel).lines
        try:
            self._drain()
        except Exception as e:  # noqa: BLE001 -- a bug must still leave a clear result line
            log.exception("channel %s: unexpected error", self.channel.label)
            res.result, res.message = "error", f"unexpected error: {e}"
        after = synclog.backlog(self.channel)
        res.lines_after, res.files_after = after.lines, list(after.files)
        if res.damage and res.result == "drained":
            res.result = "damaged"
            res.message = (f"{len(res.damage)} line(s) Cyrus's reader drops (events possibly lost; the "
                           f"file was copied to {', '.join(res.kept) or 'nowhere: copy failed'}): "
                           + "; ".join(res.damage[:3]))
        res.seconds = round(time.monotonic() - t0, 3)
        return res

    def _set(self, result: str, message: str) -> None:
        self.result.result, self.result.message = result, message

    def _drain(self) -> None:
        ch = self.channel
        if not synclog.pending_files(ch):
            return
        irregular = synclog.irregular_files(ch)
        if irregular:
            self._set("damaged", "; ".join(f"{path} is {kind}, not a regular file" for path, kind in irregular)
                      + ": Cyrus cannot append to it (events it tried to log are lost) and no reader can "
                        "replay it; nothing touched: move it aside, then reconcile")
            self.result.damage = [f"{path}: {kind}" for path, kind in irregular]
            return
        reason = not_replicated_reason(self.instance, ch)
        if reason:
            self._set("skipped", reason)
            return
        if not ch.host:
            # Events are pending and nobody may drop them: a missing (or misspelled)
            # <channel>_sync_host is a configuration error, never a silent success.
            key = f"{ch.name}_sync_host" if ch.name else "sync_host"
            self._set("config", f"{ch.label} has pending events but no {key} in "
                                f"{self.instance.imapd.path}; events kept")
            return
        if not os.access(self.sync_client, os.X_OK):
            self._set("config", f"{self.sync_client} not found or not executable "
                                "(install Cyrus's replication package or set CYRUSHELPER_CYRUS_BINDIR)")
            return
        lock = ChannelLock(channel_lock_path(self.instance.imapd.configdirectory, ch.name))
        try:
            lock.acquire(wait=max(0.0, min(self.lock_wait, self.remaining())))
        except LockBusy as e:
            self._set("locked", f"another drainer holds the channel lock ({e})")
            return
        # what is left now is ours to drain: a drainer we waited for may have replayed the rest
        self.result.lines_before = synclog.backlog(ch).lines
        try:
            self._loop(lock)
        finally:
            lock.release()

    def _wait_for_other_readers(self) -> bool:
        deadline = time.monotonic() + max(0.0, min(self.lock_wait, self.remaining()))
        while True:
            readers = find_sync_readers(self.instance.imapd.path, self.channel.name)
            if not readers:
                return True
            if time.monotonic() >= deadline or self.stop.is_set():
                pid, cmd = readers[0]
                self._set("locked", f"a rolling sync_client reads this channel (PID {pid}: {cmd}); "
                                    "stop it (or master) first")
                return False
            time.sleep(0.2)

    def _loop(self, lock: ChannelLock) -> None:
        ch = self.channel
        failed_runs = 0
        answered = False  # has the replica answered a run of this drain?
        while True:
            if answered:  # only then touch a legacy file: with the replica down all stays as it was
                adopt_legacy_log(ch)  # it becomes log-run whenever no log-run exists
            has_work = ch.log_run.exists() or ch.log.exists()
            if not has_work and not synclog.legacy_logs(ch.sync_dir):
                return  # drained
            if self.stop.is_set():
                self._set("interrupted", "interrupted by a signal; events kept for the next drain")
                return
            remaining = self.remaining()
            if remaining <= 0:
                self._give_up_at_deadline(None)
                return
            if not self._wait_for_other_readers():
                return
            # with only legacy files left, this run finds nothing to take: it just proves the
            # replica answers (sync_client -R -1 connects before looking at the files)
            target = (ch.log_run if ch.log_run.exists() else ch.log) if has_work else None
            target_inode = _inode(target) if target else None
            if target_inode is not None and target_inode not in self._scanned:
                self._scanned.add(target_inode)
                self._check_lines(target)
            timeout = remaining if self.per_run_timeout is None else min(self.per_run_timeout, remaining)
            self.result.runs += 1
            outcome = run_sync_client(self.command(), timeout, self.stop, pass_fds=(lock.fd,))
            log.debug("channel %s: run %d %s rc=%s: %s", ch.label, self.result.runs, outcome.how,
                      outcome.returncode, outcome.last_words())
            if outcome.how == "unreachable":
                self._set("unreachable", f"sync_client: {outcome.last_words(1)}")
                return
            if outcome.how == "exited" and outcome.returncode == 0:
                answered = True
            if target is not None and self._progressed(target, target_inode):
                failed_runs = 0
                continue
            if outcome.how == "interrupted":
                self._set("interrupted", "interrupted by a signal; events kept for the next drain")
                return
            if outcome.how == "timeout" and self.remaining() <= 0:
                self._give_up_at_deadline(outcome)
                return
            if outcome.how == "exited" and outcome.returncode == 78:  # EX_CONFIG: Cyrus refused it
                self._set("config", f"sync_client refused the configuration: {outcome.cyrus_said()}")
                return
            if target is None and answered:
                continue  # the probe run: legacy files are adopted next
            failed_runs += 1  # answered but removed nothing, or a per-run timeout
            if failed_runs >= MAX_FAILED_RUNS:
                self._set("sync_failed", f"{failed_runs} runs in a row removed nothing (last exit "
                                         f"{outcome.returncode}, {outcome.how}; {outcome.cyrus_said()})")
                return
            time.sleep(min(0.5 * failed_runs, max(0.0, self.remaining())))

    def _check_lines(self, path: Path) -> None:
        """Before a file is replayed: lines Cyrus's reader would drop are named, and the file is
        copied aside (the replay removes it), so the operator can see what was lost."""
        damage = synclog.scan(path)
        if not damage:
            return
        self.result.damage += [str(d) for d in damage]
        log.error("channel %s: %d line(s) of %s would be dropped by Cyrus's reader: %s",
                  self.channel.label, len(damage), path, "; ".join(str(d) for d in damage[:3]),
                  extra=channel_field(self.channel.label))
        try:
            kept = state.ensure_state_dir(self.instance) / KEPT_DIR
            kept.mkdir(mode=0o750, exist_ok=True)
            copy = kept / f"{self.channel.label}-{datetime.now().strftime('%Y%m%dT%H%M%S')}-{path.name}"
            shutil.copyfile(path, copy)
            self.result.kept.append(str(copy))
        except OSError as e:  # e.g. the disk is still full: the lines are named in the result anyway
            log.error("channel %s: could not copy %s aside: %s", self.channel.label, path, e)

    def _progressed(self, target: Path, target_inode: int | None) -> bool:
        """Did the run replay and remove the file it took? (log-run first, else log renamed to it)"""
        if target_inode is None:
            return True  # the file vanished before the run: someone else replayed it
        return _inode(self.channel.log_run) != target_inode and _inode(target) != target_inode

    def _give_up_at_deadline(self, outcome: RunOutcome | None) -> None:
        reachable = _tcp_probe(self.channel.host, self.channel.port)
        if reachable is False:
            self._set("unreachable", "no TCP connection to the replica before the deadline")
        else:
            said = f" (sync_client: {outcome.last_words(1)})" if outcome and outcome.output else ""
            self._set("deadline", f"deadline reached with work left{said}")


# --------------------------------------------------------------------------- the whole drain

def _status_line(channels: list[Channel]) -> str:
    parts = [f"{c.label}={synclog.backlog(c).lines}" for c in channels]
    return "drain: " + " ".join(parts) + " lines left"


def drain(instance: Instance, deadline: float = DEFAULT_DEADLINE, per_run_timeout: float | None = None,
          progress=None, channels: list[str] | None = None, bindir: os.PathLike | str | None = None,
          lock_wait: float = DEFAULT_LOCK_WAIT, stop: threading.Event | None = None,
          service: dict | None = None, record: bool = True, loop: proc.Loop | None = None,
          reconcile: str = "off") -> DrainReport:
    """Drain every channel (in parallel, one thread each) within `deadline` seconds.

    `progress(status_text)` is called every STATUS_INTERVAL while work remains (e.g. a
    notify.Pulse: STATUS= plus EXTEND_TIMEOUT_USEC=). `stop` (an Event) interrupts early, and so
    does any signal that `loop` (a proc.Loop handling e.g. SIGTERM) receives meanwhile.
    With `reconcile="auto"` and a reconcile marker present, a successful drain is followed by
    `sync_client -A` on every replication channel, which clears the markers when all succeed.
    Raises ConfigError for a channel name not in sync_log_channels.
    """
    chosen = select_channels(instance, channels)
    sync_client = Path(bindir) / "sync_client" if bindir else cyrus.program("sync_client")
    stop = stop or threading.Event()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    end = t0 + deadline
    mpid = proc.running_master(instance.pid_file)
    if mpid:
        log.warning("master (PID %d) is running: the drain may chase new events until its deadline", mpid)
    drainers = [_ChannelDrainer(instance, ch, sync_client, end, per_run_timeout, lock_wait, stop)
                for ch in chosen]
    results: list[ChannelResult | None] = [None] * len(drainers)

    own_loop = loop is None
    loop = loop or proc.Loop()
    _in_threads([(f"drain-{d.channel.label}", lambda i=i: results.__setitem__(i, drainers[i].run()))
                 for i, d in enumerate(drainers)], loop, stop, progress, lambda: _status_line(chosen), end)
    for i, r in enumerate(results):
        if r is None:  # its thread is stuck waiting for an unkillable sync_client
            ch = drainers[i].channel
            left = synclog.backlog(ch)
            results[i] = ChannelResult(ch.label, str(ch.sync_dir), ch.replica_address, result="error",
                                       lines_after=left.lines, files_after=list(left.files),
                                       seconds=round(time.monotonic() - t0, 3),
                                       message="sync_client did not exit after SIGKILL; events kept")
    final = [r for r in results if r is not None]
    if not channels:  # the whole instance: its forgotten channels count too
        final += [_orphan_result(instance, o) for o in synclog.orphaned_channels(instance)]
    _mark_damage(instance, final)
    report = DrainReport(instance.name, started, round(time.monotonic() - t0, 3), exitcodes.OK, final,
                         service=service, master_pid=mpid)
    # a reconcile runs only after a complete drain; otherwise the markers are reported as they are
    report.reconcile = _reconcile_markers(instance, sync_client, reconcile if report.result == "drained" else "off",
                                          end, stop, loop, progress)
    if own_loop:
        loop.close()
    report.exit_code = RESULT_CODES[report.result]
    if progress is not None:
        outcome = "done" if report.result == "drained" else report.result.replace("_", " ")
        progress(_status_line(chosen).replace("drain:", f"drain {outcome}:"))
    _log_results(report)
    if record:
        try:
            state.record_last_drain(instance, report.to_json())
        except OSError as e:
            log.warning("could not record the drain result: %s", e)
    return report


def _in_threads(work: list[tuple[str, object]], loop: proc.Loop, stop: threading.Event, progress,
                status, end: float) -> None:
    """Run each (name, callable) in a thread of its own and wait for all of them, pulsing
    `progress` with `status()` meanwhile; a signal the loop receives sets `stop`. Past `end` plus
    the kill grace, threads still running are given up on (a sync_client that survived SIGKILL)."""
    def run(fn) -> None:
        try:
            fn()
        finally:
            loop.wake()

    threads = [threading.Thread(target=run, args=(fn,), name=name, daemon=True) for name, fn in work]
    for t in threads:
        t.start()
    last_status = None
    overdue_at = end + 3 * KILL_GRACE + OVERDUE_MARGIN
    while [t for t in threads if t.is_alive()]:
        now = time.monotonic()
        if now > overdue_at + OVERDUE_MARGIN:
            break
        if now > overdue_at:
            if progress is not None:
                log.error("drain overdue: a sync_client did not exit after SIGKILL (stuck in the kernel?); "
                          "no more EXTEND_TIMEOUT_USEC, TimeoutStopSec applies")
                progress = None
        elif progress is not None:
            text = status()
            progress(text if text != last_status else None)  # None: only the EXTEND pulse
            last_status = text
        if loop.poll(STATUS_INTERVAL):  # a stop signal: every channel keeps its events
            stop.set()


def _orphan_result(instance: Instance, orphan: synclog.Orphan) -> ChannelResult:
    path, line = instance.imapd.where("sync_log_channels")
    where = f"{path}:{line}" if line else path
    return ChannelResult(orphan.label, str(orphan.sync_dir), "(not configured)", result="orphaned",
                         lines_before=orphan.lines, lines_after=orphan.lines, files_after=list(orphan.files),
                         message=f"events of channel {orphan.label!r}, which sync_log_channels ({where}) "
                                 "does not name: nothing replays them. Add the channel back and drain, "
                                 f"or, if that replica is gone for good, remove {orphan.sync_dir} "
                                 "(and reconcile the replica that remains)")


def _mark_damage(instance: Instance, results: list[ChannelResult]) -> None:
    """Damaged lines or unreadable files: a change may have no usable sync log line."""
    damaged = [r for r in results if r.result == "damaged" or (r.damage and r.result != "orphaned")]
    if not damaged:
        return
    try:
        path = state.record_sync_log_failure(
            instance, "the drain found sync log lines Cyrus's reader drops, or a sync log that is not a "
                      "regular file", {"channels": {r.channel: {"damage": r.damage[:20], "kept": r.kept}
                                                    for r in damaged}})
        log.error("instance marked for a reconcile in %s", path)
    except OSError as e:
        log.error("could not record the reconcile marker (%s): reconcile every channel with "
                  "sync_client -A", e)


def _reconcile_markers(instance: Instance, sync_client: Path, mode: str, end: float, stop: threading.Event,
                       loop: proc.Loop, progress) -> dict:
    """After a complete drain: a reconcile marker refuses the clean result, unless `mode` is auto
    and `sync_client -A` succeeds on every replication channel (then the markers are cleared)."""
    markers = state.reconcile_markers(instance)
    if not markers:
        return {}
    described = [state.describe_marker(name, m) for name, m in sorted(markers.items())]
    if mode != "auto":
        return {"needed": described, "ran": False}
    commands = []
    for ch in replication_channels(instance):
        cmd = [str(sync_client), "-C", str(instance.imapd.path)]
        commands.append((ch.label, cmd + (["-n", ch.name] if ch.name else []) + ["-A"]))
    outcomes: dict[str, RunOutcome] = {}

    def reconcile_all() -> None:
        for label, cmd in commands:
            if stop.is_set() or end - time.monotonic() <= 0:
                return
            log.info("reconcile: %s", " ".join(cmd))
            outcomes[label] = run_sync_client(cmd, end - time.monotonic(), stop)

    _in_threads([("reconcile", reconcile_all)], loop, stop, progress, lambda: "drain done; reconcile "
                "(sync_client -A) running", end)
    failed = {label: (o.how if o.how != "exited" else f"exit {o.returncode}") + f": {o.cyrus_said(1)}"
              for label, o in outcomes.items() if not (o.how == "exited" and o.returncode == 0)}
    failed.update({label: "not run (deadline or signal)" for label, _ in commands if label not in outcomes})
    if commands and not failed:
        state.clear_reconcile_markers(instance, by=f"drain --reconcile=auto: sync_client -A succeeded on "
                                                   f"{', '.join(label for label, _ in commands)}")
        log.info("reconcile succeeded on every channel: markers cleared (%s)", "; ".join(described))
        return {"ran": True, "cleared": described}
    return {"needed": described, "ran": True, "failed": failed or {"-": "no replication channel"}}


def _log_results(report: DrainReport) -> None:
    for r in report.channels:
        tag = channel_field(r.channel)
        if r.result == "drained":
            if r.lines_before:
                log.info("channel %s: drained %d lines to %s in %.2f s (%d runs)",
                         r.channel, r.lines_before, r.replica, r.seconds, r.runs, extra=tag)
        elif r.result == "skipped":
            log.warning("channel %s: %d lines left in %s, not drained: %s", r.channel, r.lines_after,
                        r.sync_dir, r.message, extra=tag)
        elif r.result == "damaged" and not r.files_after:
            log.error("channel %s: replayed %d lines to %s, but events may be lost: %s", r.channel,
                      r.lines_before, r.replica, r.message, extra=tag)
        elif r.result == "orphaned":
            log.error("channel %s: %d lines in %s (%s) and nothing replays them: %s", r.channel, r.lines_after,
                      r.sync_dir, " ".join(r.files_after), r.message, extra=tag)
        elif r.result == "unreachable":
            log.error("channel %s: replica %s unreachable, %d lines kept in %s (%s); the next start "
                      "or `cyrushelper drain` replays them: %s", r.channel, r.replica, r.lines_after,
                      r.sync_dir, " ".join(r.files_after), r.message, extra=tag)
        else:
            log.error("channel %s: %s, %d lines kept in %s (%s) for replica %s: %s", r.channel,
                      r.result.replace("_", " "), r.lines_after, r.sync_dir, " ".join(r.files_after),
                      r.replica, r.message, extra=tag)
    needed = report.reconcile.get("needed")
    if needed:
        tried = ("the reconcile failed: " + "; ".join(f"{k}: {v}" for k, v in report.reconcile["failed"].items())
                 if report.reconcile.get("ran") else "run `cyrushelper drain --reconcile auto`, or "
                 "sync_client -A per channel and then `cyrushelper status --ack-unclean`")
        replayed = "every sync log is replayed, but " if report.result in ("drained", "reconcile_needed") else ""
        log.error("%sevents may be missing that no log replay recovers (%s); not a clean drain until a "
                  "reconcile succeeds: %s", replayed, "; ".join(needed), tried)


# --------------------------------------------------------------------------- command line

EPILOG_EXTRA = """
drain decides by the files, never by sync_client's exit code: 0 means every channel's log and
log-run (and legacy log-<pid>) files are gone, no line was damaged, no channel directory is
orphaned and no reconcile marker is left (see `cyrushelper status`). Failing channels keep every
event. With several channels failing differently the exit code is the first of 78, 1, 69, 76, 73,
75, 66 that applies.
A channel lock held by another drainer is waited for up to --lock-wait seconds, then 73.
The result is also written to {configdirectory}/cyrushelper/last-drain.json.
"""


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    arguments.add_instance_arguments(parser)
    parser.epilog = (parser.epilog or "") + "\n" + EPILOG_EXTRA
    parser.add_argument("--deadline", type=arguments.positive_seconds, default=DEFAULT_DEADLINE,
                        metavar="SECONDS",
                        help=f"give up (exit 75, events kept) after this long (default {DEFAULT_DEADLINE:g})")
    parser.add_argument("--per-run-timeout", type=arguments.positive_seconds, default=None, metavar="SECONDS",
                        help="bound one sync_client run (default: the rest of the deadline)")
    parser.add_argument("--lock-wait", type=arguments.seconds, default=DEFAULT_LOCK_WAIT, metavar="SECONDS",
                        help="wait this long for another drainer or rolling sync_client "
                             f"of a channel to finish, then exit 73 (default {DEFAULT_LOCK_WAIT:g})")
    parser.add_argument("--channel", action="append", metavar="NAME",
                        help="drain only this channel ('default' for the unnamed one); repeatable")
    parser.add_argument("--reconcile", choices=("auto", "off"), default="off",
                        help="when a reconcile marker says events may be missing that no log replay "
                             "recovers (Cyrus failed to write its sync log, a damaged line, an unclean "
                             "stop): auto = after a complete drain run `sync_client -A` on every channel "
                             "within the deadline and clear the markers if all succeed; off = exit 66 "
                             "(default off)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("--from-systemd", action="store_true",
                        help="running as the unit's ExecStopPost: log $SERVICE_RESULT/$EXIT_CODE/"
                             "$EXIT_STATUS and warn when the main process did not stop cleanly")


def service_outcome(environ: Mapping[str, str] = os.environ) -> dict:
    return {"result": environ.get("SERVICE_RESULT"), "exit_code": environ.get("EXIT_CODE"),
            "exit_status": environ.get("EXIT_STATUS")}


# The main process itself was killed or timed out: systemd then SIGKILLs the whole cgroup, so
# Cyrus children may have died between a mailbox commit and its sync log line.
KILLED_RESULTS = ("timeout", "signal", "core-dump", "watchdog")


def _record_if_killed(instance: Instance, service: dict) -> None:
    """Record an unclean stop when systemd killed the unit while Cyrus was running (its processes
    then got SIGKILL, see state.py). Not when Cyrus had stopped cleanly within this invocation
    (run wrote a clean last-stop.json first), nor when no master ran."""
    if service["result"] not in KILLED_RESULTS:
        return
    invocation = state.invocation_id()
    last = state.last_stop(instance) or {}
    run = state.last_run(instance) or {}
    outcome = (f"SERVICE_RESULT={service['result']} EXIT_CODE={service['exit_code']} "
               f"EXIT_STATUS={service['exit_status']}")
    if invocation and last.get("invocation_id") == invocation and last.get("result") == "clean":
        log.warning("the main process ended with %s, but Cyrus had stopped cleanly before (%s at %s): "
                    "no replication event can be missing, not an unclean stop", outcome,
                    last.get("by", "cyrushelper run"), last.get("time"))
        return
    marker = state.unclean_stop(instance) or {}
    if invocation and marker.get("invocation_id") == invocation:
        return  # run already recorded this start's unclean stop, with more detail
    if invocation and run.get("invocation_id") != invocation:
        log.warning("the main process ended with %s before it started master: no Cyrus process ran, "
                    "not an unclean stop", outcome)
        return
    master = run.get("master_pid")
    evidence = {"service": service, "invocation_id": invocation, "run": run or None,
                "last_stop_of_this_start": last if last.get("invocation_id") == invocation else None}
    path = state.record_unclean_stop(
        instance, f"systemd ended the unit ({outcome}) while master {master} ran: systemd SIGKILLs "
                  "whatever is left of a unit whose main process died", [], master, evidence)
    log.error("stop recorded as unclean in %s: the next start recommends (or runs) a sync_client -A "
              "reconcile", path)


def _report_service(service: dict) -> None:
    if service["result"] is None:
        log.warning("--from-systemd but $SERVICE_RESULT is not set: not run as ExecStopPost?")
        return
    log.info("main process ended: SERVICE_RESULT=%s EXIT_CODE=%s EXIT_STATUS=%s",
             service["result"], service["exit_code"], service["exit_status"])
    if service["result"] != "success":
        log.warning("the service did not stop cleanly (%s): events of the last moments may be missing "
                    "from the sync log; reconcile with `sync_client -A` once the replica is reachable",
                    service["result"])


def _catch_up_journal(instance: Instance, service: dict) -> None:
    """The main process did not end normally, so it may not have read the journal to the end:
    look for sync log write failures of this invocation ourselves."""
    invocation = cyruslog.invocation_id()
    if service["result"] in (None, "success") or not invocation or not cyruslog.available():
        return
    found = cyruslog.failures(invocation, cyruslog.own_unit())
    if not found:
        return
    path = state.record_sync_log_failure(instance, f"Cyrus reported {len(found)} failed sync log write(s) "
                                                   "(found by the drain)", {"first": str(found[0]),
                                                                            "last": str(found[-1])})
    log.error("Cyrus failed to write %d sync log line(s) in this run (%s): marked for a reconcile in %s",
              len(found), found[-1], path)


def main(args: argparse.Namespace) -> int:
    instance = arguments.load_instance(args)
    service = service_outcome() if args.from_systemd else None
    if service is not None:
        _report_service(service)
        _record_if_killed(instance, service)
        _catch_up_journal(instance, service)
    notifier = Notifier()
    pulse = Pulse(notifier, extend=30.0, interval=5.0) if notifier.enabled else None
    with proc.Loop() as loop:
        loop.handle_signals(signal.SIGTERM, signal.SIGINT)
        report = drain(instance, deadline=args.deadline, per_run_timeout=args.per_run_timeout,
                       progress=pulse, channels=args.channel, lock_wait=args.lock_wait,
                       service=service, loop=loop, reconcile=args.reconcile)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    return report.exit_code

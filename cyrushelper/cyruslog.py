"""What Cyrus itself says: its syslog lines, which under systemd land in the journal.

Cyrus logs only through syslog(3) (never on master's stdout/stderr), so the journal is the one
place where it says that it could not do something. Two uses:

- A sync log write that failed. lmtpd and imapd acknowledge the change anyway (LMTP 250) and only
  log it (imap/sync_log.c sync_log_base): "write() to F failed: E", "sync_log(): Unable to write
  to log file F: E", "sync_log(): Failed to lock F for …". `Watcher` asks the journal for them,
  restricted to the running unit's invocation (journald tags every line of the unit's processes
  with its _SYSTEMD_INVOCATION_ID); `failures()` asks the same for a whole invocation. journald's
  own "Suppressed N messages from …/cyrus@NAME.service" (rate limiting) counts too: a failure may
  have been among the dropped lines.
- Why a sync_client run failed: `said_by(pid)` quotes what that one process logged.

journalctl is used as a program (no library): it is where systemd is, and outside systemd there is
no journal to read; callers then say that this source is missing instead of pretending.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from cyrushelper.notify import strip_notify_env

JOURNALCTL = "journalctl"
# systemd's catalog id of journald's "Suppressed N messages from UNIT" (SD_MESSAGE_JOURNAL_DROPPED)
JOURNAL_DROPPED = "a596d6fe7bfa4994828e72309e95d61e"
# the file is a channel's log: {configdirectory}/sync/log or …/sync/CHANNEL/log
SYNC_LOG_FAILURE_RE = re.compile(r"write\(\) to \S*/sync/(?:[^/\s]+/)?log failed: |sync_log\(\): (?:Unable to "
                                 r"write to log file|Failed to lock) \S*/sync/")
# journalctl --grep (PCRE2) keeps the rest of Cyrus's chatter (every login) out of our pipe
GREP = r"write\(\) to \S+ failed|sync_log\(\): |Suppressed \d+ messages"
QUERY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Entry:
    message: str
    pid: int | None
    identifier: str
    cursor: str
    usec: int

    @property
    def sync_log_failure(self) -> bool:
        return SYNC_LOG_FAILURE_RE.search(self.message) is not None

    def suppressed(self, unit: str) -> int:
        """How many messages of `unit` journald dropped, per this entry (0 if it is not that)."""
        m = re.match(r"Suppressed (\d+) messages from (\S+)", self.message)
        if m and m.group(2).rstrip(".").endswith("/" + unit):
            return int(m.group(1))
        return 0

    def __str__(self) -> str:
        who = f"{self.identifier}[{self.pid}]" if self.pid else self.identifier
        return f"{who}: {self.message}"


def available() -> bool:
    """A journal to read: journalctl exists and this process runs under systemd."""
    return shutil.which(JOURNALCTL) is not None and bool(os.environ.get("INVOCATION_ID"))


def invocation_id() -> str | None:
    return os.environ.get("INVOCATION_ID") or None


def own_unit() -> str | None:
    """The unit this process runs in, from its cgroup (e.g. cyrus@primary.service)."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                name = line.rstrip("\n").rsplit("/", 1)[-1]
                if name.endswith(".service"):
                    return name
    except OSError:
        pass
    return None


def parse(line: bytes | str) -> Entry | None:
    """One line of `journalctl -o json`; None for anything else."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    message = data.get("MESSAGE", "")
    if isinstance(message, list):  # non-UTF-8 messages come as byte arrays
        message = bytes(b & 0xFF for b in message if isinstance(b, int)).decode("utf-8", "replace")
    pid = data.get("_PID") or data.get("SYSLOG_PID")
    try:
        usec = int(data.get("__REALTIME_TIMESTAMP", 0))
    except (TypeError, ValueError):
        usec = 0
    return Entry(str(message), int(pid) if str(pid or "").isdigit() else None,
                 str(data.get("SYSLOG_IDENTIFIER", "?")), str(data.get("__CURSOR", "")), usec)


def invocation_matches(invocation: str) -> list[str]:
    # journalctl ORs match groups separated by "+": this invocation's lines, or journald's drops
    return [f"_SYSTEMD_INVOCATION_ID={invocation}", "+", f"MESSAGE_ID={JOURNAL_DROPPED}"]


def sync_journal() -> None:
    """Ask journald to store what it received so far (lines logged before this call are then
    readable: `journalctl --sync`); harmless where it cannot."""
    try:
        subprocess.run([JOURNALCTL, "--sync"], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=QUERY_TIMEOUT, env=strip_notify_env(dict(os.environ)))
    except (OSError, subprocess.TimeoutExpired):
        pass


def query(*args: str) -> list[Entry] | None:
    """Entries of `journalctl -o json ARGS`; None when the journal could not be read."""
    try:
        out = subprocess.run([JOURNALCTL, "--no-pager", "-q", "-o", "json", *args], stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=QUERY_TIMEOUT, env=strip_notify_env(dict(os.environ)))
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 and not out.stdout and out.stderr.strip():
        return None  # (with --grep, no match at all is exit 1 with nothing said: an empty answer)
    return [e for e in map(parse, out.stdout.splitlines()) if e is not None]


def said_by(pid: int, since: float, limit: int = 5) -> list[str]:
    """What process `pid` logged since `since` (epoch seconds): its last `limit` messages."""
    if shutil.which(JOURNALCTL) is None:
        return []
    sync_journal()
    entries = query(f"_PID={pid}", f"--since=@{since - 1:.0f}") or []
    return [e.message for e in entries][-limit:]


def failures(invocation: str, unit: str | None, after_cursor: str | None = None) -> list[Entry] | None:
    """Sync log write failures (and journald drops of `unit`) logged by this invocation after
    `after_cursor` (or since it began); None when the journal could not be read."""
    sync_journal()
    args = [f"--grep={GREP}", *invocation_matches(invocation)]
    if after_cursor:
        args.append(f"--after-cursor={after_cursor}")
    entries = query(*args)
    if entries is None:
        return None
    return [e for e in entries if e.sync_log_failure or (unit and e.suppressed(unit))]


class Watcher:
    """New sync log failures of one invocation, asked for every few seconds (`poll()`).

    Not `journalctl --follow`: measured under systemd 252 in a container, a follower saw 3 of 5
    fresh entries within 5 s and the rest only later, while a query saw all of them at once. Each
    poll asks for the entries since the previous poll began (minus an overlap, journald stamps an
    entry when it receives it) through the realtime index, so it reads only the new stretch of the
    journal; entries seen twice are recognised by their cursor."""

    OVERLAP = 5.0
    SEEN_KEPT = 10000

    def __init__(self, invocation: str, unit: str | None, since: float | None = None):
        self.invocation, self.unit = invocation, unit
        self.since = time.time() if since is None else since
        self._seen: dict[str, None] = {}   # cursors, oldest first

    def poll(self, sync: bool = False) -> list[Entry] | None:
        """Failures not seen before; None when the journal could not be read."""
        started = time.time()
        if sync:
            sync_journal()
        entries = query(f"--grep={GREP}", f"--since=@{self.since - self.OVERLAP:.0f}",
                        *invocation_matches(self.invocation))
        if entries is None:
            return None
        self.since = started
        fresh = [e for e in entries if e.cursor not in self._seen]
        for e in fresh:
            self._seen[e.cursor] = None
        while len(self._seen) > self.SEEN_KEPT:
            del self._seen[next(iter(self._seen))]
        return [e for e in fresh if e.sync_log_failure or (self.unit and e.suppressed(self.unit))]

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

`run`'s Watcher reads the journal in-process through libsystemd's sd-journal API (ctypes, like
syncwatch.py's inotify: no build, no extra package): no process to start, where a journalctl
process cost 6-11 ms of CPU (perf stat on the lab VM), and `run` asks at most every 5 s while
journald writes, which on a busy server is always: the journalctl processes were a third of the
helper's CPU during a burst of mail (issue 11). Where libsystemd cannot be loaded, or a call of it
fails, the Watcher falls back to journalctl for good. Everything else (the drain's one-off
questions, `journalctl --sync`) runs journalctl as a program. Outside systemd there is no journal
to read; callers then say that this source is missing instead of pretending.

When to ask: `journal_directories()` are where journald keeps this machine's journal files. It
writes them through mmap and then truncates each to its own size, at most every 250 ms, so that
inotify watchers see IN_MODIFY (systemd's journal_file_post_change()): that is the event `run`
waits for, instead of asking on a timer while nothing is logged at all.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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
JOURNAL_BASES = ("/run/log/journal", "/var/log/journal")   # volatile and persistent storage


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


def journal_directories(bases=JOURNAL_BASES, machine_id_file: str = "/etc/machine-id") -> list[Path]:
    """Where journald writes this machine's journal files ({base}/{machine-id}) for each storage
    base that exists (the machine-id directory may appear later, e.g. at the flush to /var)."""
    try:
        with open(machine_id_file, encoding="ascii") as f:
            machine = f.read().strip()
    except OSError:
        return []
    if not re.fullmatch(r"[0-9a-f]{32}", machine):
        return []
    return [Path(base) / machine for base in bases if os.path.isdir(base)]


def is_journal_file(name: str) -> bool:
    return name.endswith((".journal", ".journal~"))


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
    """This invocation's lines at LOG_ERR or worse (Cyrus logs every failed sync log write with
    LOG_ERR, imap/sync_log.c), or journald's drops. journalctl ANDs different fields, ORs values
    of one field and groups separated by "+": the priority match lets the journal's index skip
    Cyrus's chatter (measured: a query after 2,000 deliveries 10.8 -> 3.4 ms of CPU)."""
    return [f"_SYSTEMD_INVOCATION_ID={invocation}", *(f"PRIORITY={p}" for p in range(4)),
            "+", f"MESSAGE_ID={JOURNAL_DROPPED}"]


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


class SdJournal:
    """The few sd-journal calls a query needs (sd-journal(3)), through ctypes. `query(matches,
    since_usec)` opens the local journal, adds the matches ("+" between groups, as journalctl
    takes them), reads every entry from `since_usec` on and closes it again (a journal kept open
    would miss files journald creates later unless we ran its own inotify loop too)."""

    LOCAL_ONLY = 1  # SD_JOURNAL_LOCAL_ONLY

    def __init__(self, library: str = "libsystemd.so.0"):
        lib = ctypes.CDLL(library, use_errno=True)
        libc = ctypes.CDLL(None)
        handle, size = ctypes.c_void_p, ctypes.c_size_t
        signatures = {
            "sd_journal_open": [ctypes.POINTER(handle), ctypes.c_int],
            "sd_journal_add_match": [handle, ctypes.c_char_p, size],
            "sd_journal_add_disjunction": [handle],
            "sd_journal_seek_realtime_usec": [handle, ctypes.c_uint64],
            "sd_journal_next": [handle],
            "sd_journal_get_data": [handle, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(size)],
            "sd_journal_get_cursor": [handle, ctypes.POINTER(ctypes.c_void_p)],
            "sd_journal_get_realtime_usec": [handle, ctypes.POINTER(ctypes.c_uint64)],
        }
        for name, argtypes in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        lib.sd_journal_close.argtypes, lib.sd_journal_close.restype = [handle], None
        libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
        self.lib, self.libc = lib, libc

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            raise OSError(-result, f"{what}: {os.strerror(-result)}")
        return result

    def _field(self, j, name: bytes) -> str | None:
        data, length = ctypes.c_void_p(), ctypes.c_size_t()
        if self.lib.sd_journal_get_data(j, name, ctypes.byref(data), ctypes.byref(length)) < 0:
            return None  # -ENOENT: the entry has no such field
        raw = ctypes.string_at(data, length.value)
        return raw[len(name) + 1:].decode("utf-8", "replace")  # "FIELD=value"

    def _cursor(self, j) -> str:
        pointer = ctypes.c_void_p()
        self._check(self.lib.sd_journal_get_cursor(j, ctypes.byref(pointer)), "sd_journal_get_cursor")
        try:
            return ctypes.string_at(pointer).decode("ascii", "replace")
        finally:
            self.libc.free(pointer)

    def query(self, matches: list[str], since_usec: int) -> list[Entry]:
        """Entries matching `matches` from `since_usec` (epoch µs) on; OSError when the journal
        cannot be read."""
        j = ctypes.c_void_p()
        self._check(self.lib.sd_journal_open(ctypes.byref(j), self.LOCAL_ONLY), "sd_journal_open")
        try:
            for match in matches:
                if match == "+":
                    self._check(self.lib.sd_journal_add_disjunction(j), "sd_journal_add_disjunction")
                else:
                    data = match.encode()
                    self._check(self.lib.sd_journal_add_match(j, data, len(data)), "sd_journal_add_match")
            self._check(self.lib.sd_journal_seek_realtime_usec(j, max(0, since_usec)), "sd_journal_seek_realtime_usec")
            entries = []
            while self._check(self.lib.sd_journal_next(j), "sd_journal_next") > 0:
                usec = ctypes.c_uint64()
                self._check(self.lib.sd_journal_get_realtime_usec(j, ctypes.byref(usec)), "sd_journal_get_realtime_usec")
                pid = self._field(j, b"_PID") or self._field(j, b"SYSLOG_PID") or ""
                entries.append(Entry(self._field(j, b"MESSAGE") or "", int(pid) if pid.isdigit() else None,
                                     self._field(j, b"SYSLOG_IDENTIFIER") or "?", self._cursor(j), usec.value))
            return entries
        finally:
            self.lib.sd_journal_close(j)


GREP_RE = re.compile(GREP)   # what journalctl --grep keeps, for entries read in-process


def sd_journal() -> SdJournal | None:
    """libsystemd's sd-journal, None where it cannot be loaded."""
    try:
        return SdJournal()
    except (OSError, AttributeError):
        return None


class Watcher:
    """New sync log failures of one invocation, asked for every few seconds (`poll()`).

    Not `journalctl --follow`: measured under systemd 252 in a container, a follower saw 3 of 5
    fresh entries within 5 s and the rest only later, while a query saw all of them at once. Each
    poll asks for the entries since the previous poll began (minus an overlap, journald stamps an
    entry when it receives it) through the realtime index, so it reads only the new stretch of the
    journal; entries seen twice are recognised by their cursor."""

    OVERLAP = 5.0
    SEEN_KEPT = 10000

    def __init__(self, invocation: str, unit: str | None, since: float | None = None,
                 reader: SdJournal | None = None):
        self.invocation, self.unit = invocation, unit
        self.since = time.time() if since is None else since
        self._seen: dict[str, None] = {}   # cursors, oldest first
        self.reader = reader                # None: journalctl
        self.reader_failure: str | None = None

    def _read(self) -> list[Entry] | None:
        since = self.since - self.OVERLAP
        if self.reader is not None:
            try:
                entries = self.reader.query(invocation_matches(self.invocation), int(since * 1_000_000))
                return [e for e in entries if GREP_RE.search(e.message)]
            except OSError as e:
                self.reader, self.reader_failure = None, str(e)  # journalctl from now on
        return query(f"--grep={GREP}", f"--since=@{since:.0f}", *invocation_matches(self.invocation))

    def poll(self, sync: bool = False) -> list[Entry] | None:
        """Failures not seen before; None when the journal could not be read."""
        started = time.time()
        if sync:
            sync_journal()
        entries = self._read()
        if entries is None:
            return None
        self.since = started
        fresh = [e for e in entries if e.cursor not in self._seen]
        for e in fresh:
            self._seen[e.cursor] = None
        while len(self._seen) > self.SEEN_KEPT:
            del self._seen[next(iter(self._seen))]
        return [e for e in fresh if e.sync_log_failure or (self.unit and e.suppressed(self.unit))]

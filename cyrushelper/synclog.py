"""The on-disk sync log of one channel: which files are pending, how many lines they hold, whether
Cyrus's reader would drop a line, orphaned channel directories, and the room left on the sync
file system.

Layout (imap/sync_log.c): writers append to `log`; a reader renames it to `log-run`, replays it,
then unlinks it, so a leftover `log-run` is older than `log` and must be replayed first.
Files `log-<pid>` were left by Cyrus ≤ 2.4 and are never picked up by a modern sync_client.
A pending file that is not a regular file (a directory, a FIFO) is never opened for reading: a
FIFO would block the reader forever.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cyrushelper.config import Channel, Instance

_LEGACY_RE = re.compile(r"log-\d+")
PENDING_NAMES = ("log", "log-run")


@dataclass(frozen=True)
class Backlog:
    channel: str
    log_run: int   # lines in log-run (being replayed, or left by an interrupted reader)
    log: int       # lines in log (appended by Cyrus since the last rename)
    legacy: int    # lines in legacy log-<pid> files
    files: tuple[str, ...]

    @property
    def lines(self) -> int:
        return self.log_run + self.log + self.legacy

    @property
    def empty(self) -> bool:
        return not self.files


def open_regular(path: os.PathLike | str) -> int | None:
    """A read-only descriptor of `path` if it is a regular file, None if it is missing or not a
    regular file. O_NONBLOCK: opening a FIFO must not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return fd


def count_lines(path: os.PathLike | str) -> int:
    """Newline count of a file, 0 if it vanished meanwhile (a reader may unlink it any time) or is
    not a regular file (see irregular_files)."""
    fd = open_regular(path)
    if fd is None:
        return 0
    with open(fd, "rb") as f:
        n = 0
        while chunk := f.read(1 << 16):
            n += chunk.count(b"\n")
        return n


def file_kind(path: os.PathLike | str) -> str | None:
    """None for a missing path or a regular file, else what it is ('a directory', 'a FIFO' …)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def irregular_files(channel: Channel) -> list[tuple[Path, str]]:
    """Pending names (log, log-run, legacy) that exist but are not regular files: neither Cyrus
    nor a drain can use them, and whatever Cyrus tried to log there is lost."""
    found = []
    for path in (*legacy_logs(channel.sync_dir), channel.log_run, channel.log):
        kind = file_kind(path)
        if kind is not None:
            found.append((path, kind))
    return found


def legacy_logs(sync_dir: Path) -> list[Path]:
    try:
        names = os.listdir(sync_dir)
    except FileNotFoundError:
        return []
    return sorted(sync_dir / n for n in names if _LEGACY_RE.fullmatch(n))


def pending_files(channel: Channel) -> list[Path]:
    """Files still holding events, in replay order: legacy, log-run, log."""
    files = legacy_logs(channel.sync_dir)
    files += [p for p in (channel.log_run, channel.log) if p.exists()]
    return files


def backlog(channel: Channel) -> Backlog:
    legacy = legacy_logs(channel.sync_dir)
    return Backlog(
        channel=channel.label,
        log_run=count_lines(channel.log_run),
        log=count_lines(channel.log),
        legacy=sum(count_lines(p) for p in legacy),
        files=tuple(p.name for p in pending_files(channel)),
    )


# --------------------------------------------------------------------------- lines Cyrus would drop

# What Cyrus 3.6 writes (imap/sync_log.h) and sync_do_reader() acts on (imap/sync_support.c), with
# the number of arguments each takes. APPEND/MAILBOX/DOUBLEMAILBOX take a second name (a copy).
LINE_ARGUMENTS = {
    "USER": (1,), "UNUSER": (1,), "META": (1,), "SIEVE": (1,), "APPEND": (1, 2), "MAILBOX": (1, 2),
    "DOUBLEMAILBOX": (1, 2), "UNMAILBOX": (1,), "QUOTA": (1,), "ANNOTATION": (1,), "RENAME": (2,),
    "SEEN": (2,), "SUB": (2,), "UNSUB": (2,),
}
# A word ends at whitespace, '(', ')' or '"' (imap/imapparse.c getword/getxstring); a quoted
# name escapes '\\' and '"' with a backslash (sync_log.c sync_quote_name).
_ATOM_RE = re.compile(rb'[^\s()"]+')
_QUOTED_RE = re.compile(rb'"(?:[^"\\\r\n]|\\.)*"')


@dataclass(frozen=True)
class Damage:
    """A line of a sync log file that Cyrus's reader would skip, or take for a different event."""

    file: str
    line: int
    text: str       # as read, invalid bytes escaped
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.text!r}"


def _arguments(rest: bytes) -> list[bytes] | None:
    """The astrings of `rest` (after 'TYPE '), separated by single spaces; None if malformed."""
    args, pos = [], 0
    while True:
        m = (_QUOTED_RE if rest[pos:pos + 1] == b'"' else _ATOM_RE).match(rest, pos)
        if m is None or rest[pos:pos + 1] == b"{":  # a literal: Cyrus never writes one here
            return None
        args.append(m.group(0))
        pos = m.end()
        if pos == len(rest):
            return args
        if rest[pos:pos + 1] != b" " or pos + 1 == len(rest):
            return None
        pos += 1


def line_problem(raw: bytes) -> str | None:
    """Why Cyrus's reader would drop or misread this line (without its newline), None if fine."""
    text = raw[:-1] if raw.endswith(b"\r") else raw
    if not text:
        return None  # blank lines are skipped on purpose
    word, sep, rest = text.partition(b" ")
    kind = word.decode("ascii", "replace").upper()
    if not sep or not rest:
        return "no argument"
    if kind not in LINE_ARGUMENTS:
        return f"unknown event type {kind[:20]!r}"
    args = _arguments(rest)
    if args is None:
        return "malformed name"
    if len(args) not in LINE_ARGUMENTS[kind]:
        return f"{kind} with {len(args)} names"
    return None


def _locked_read(path: os.PathLike | str, tail: int | None = None) -> bytes | None:
    """The file's bytes (its last `tail` bytes), read under a shared fcntl lock; None if it is
    missing or not a regular file."""
    fd = open_regular(path)
    if fd is None:
        return None
    with open(fd, "rb") as f:
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_SH)
        except OSError:
            pass  # not lockable (e.g. some network file systems): read anyway
        if tail is not None:
            f.seek(max(0, os.fstat(f.fileno()).st_size - tail))
        return f.read()


def cut_off_end(path: os.PathLike | str) -> Damage | None:
    """The cut-off last line, if the file does not end with a newline: a cheap check (the last
    4 KiB) for `status`; `scan` reads the whole file."""
    data = _locked_read(path, tail=4096)
    if not data or data.endswith(b"\n"):
        return None
    fragment = data.rsplit(b"\n", 1)[-1]
    return Damage(str(path), count_lines(path) + 1, fragment.decode("utf-8", "backslashreplace"),
                  "cut off (no newline at the end of the file)")


def scan(path: os.PathLike | str, limit: int = 100) -> list[Damage]:
    """Lines of `path` that Cyrus's reader would drop: a last line without its newline (what a
    write cut short by a full disk leaves, sync_log.c retry_write), or a malformed one. Read under
    a shared fcntl lock, the kind Cyrus's writers take exclusively while appending, so a line
    being written is never mistaken for a cut-off one. At most `limit` findings."""
    data = _locked_read(path)
    if data is None:
        return []
    found: list[Damage] = []
    lines = data.split(b"\n")
    last = len(lines)
    for number, raw in enumerate(lines, 1):
        if number == last:
            if raw:
                found.append(Damage(str(path), number, raw.decode("utf-8", "backslashreplace"),
                                    "cut off (no newline at the end of the file)"))
            break
        reason = line_problem(raw)
        if reason:
            found.append(Damage(str(path), number, raw.decode("utf-8", "backslashreplace"), reason))
        if len(found) >= limit:
            break
    return found


# --------------------------------------------------------------------------- channels nobody drains

@dataclass(frozen=True)
class Orphan:
    """A channel directory holding events that sync_log_channels no longer names."""

    label: str
    sync_dir: Path
    files: tuple[str, ...]
    lines: int


def orphaned_channels(instance: Instance) -> list[Orphan]:
    """Sync log files of channels the configuration does not write (any more): `sync/NAME/` not in
    sync_log_channels, or the default channel's own files once sync_log_channels lists only named
    channels. Nothing replays them: they must be reported, never skipped in silence."""
    imapd = instance.imapd
    known = {c.name for c in imapd.channels} if imapd.sync_log else set()
    found = []
    candidates: list[tuple[str | None, Path]] = [(None, imapd.sync_dir)]
    try:
        candidates += [(name, imapd.sync_dir / name) for name in sorted(os.listdir(imapd.sync_dir))
                       if name not in PENDING_NAMES and not _LEGACY_RE.fullmatch(name)
                       and (imapd.sync_dir / name).is_dir()]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    for name, directory in candidates:
        if name in known:
            continue
        channel = Channel(name, directory, None, None, None)
        files = pending_files(channel)
        if files:
            found.append(Orphan(channel.label, directory, tuple(p.name for p in files),
                                backlog(channel).lines))
    return found


# --------------------------------------------------------------------------- room on the file system

# Warn below this much free space (or inodes) on a sync file system, in percent. Cyrus appends a
# sync log line per change, and mail, indexes and the log usually share that file system: 10% is
# where common disk monitoring warns too, early enough to act at any realistic size (the issue's
# 16 KiB tmpfs filled after 600 deliveries; on a real spool, hours of mail). `run --space-warn`.
DEFAULT_SPACE_WARN = 10.0


@dataclass(frozen=True)
class Room:
    """What statvfs says about a sync directory's file system, as the cyrus user sees it (f_bavail,
    f_favail: blocks root keeps in reserve do not count)."""

    path: str
    free_bytes: int
    total_bytes: int
    free_inodes: int
    total_inodes: int
    read_only: bool

    @property
    def percent_free(self) -> float:
        """The scarcer of space and inodes, in percent (file systems without inode counts: space)."""
        space = 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 100.0
        inodes = 100.0 * self.free_inodes / self.total_inodes if self.total_inodes else 100.0
        return min(space, inodes)

    @property
    def full(self) -> bool:
        """Cyrus cannot be sure to append: no block (or no inode) left, or read-only."""
        return self.read_only or self.free_bytes == 0 or (self.total_inodes > 0 and self.free_inodes == 0)

    def describe(self) -> str:
        if self.read_only:
            return f"{self.path} is on a read-only file system"
        return (f"{self.path}: {_size(self.free_bytes)} of {_size(self.total_bytes)} free "
                f"({self.percent_free:.1f}%, {self.free_inodes} inodes)")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def room(directory: os.PathLike | str) -> Room | None:
    """statvfs of `directory`, or of its nearest existing parent (Cyrus creates channel
    directories on their first event); None if nothing can be asked."""
    path = Path(directory)
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
        return Room(str(path), st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, st.f_favail,
                    st.f_files, bool(st.f_flag & os.ST_RDONLY))
    return None


def format_backlog(backlogs: list[Backlog]) -> str:
    """One-line summary for STATUS=: 'backlog default=12 repl2=0'."""
    if not backlogs:
        return "no sync channels"
    return "backlog " + " ".join(f"{b.channel}={b.lines}" for b in backlogs)

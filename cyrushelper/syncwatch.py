"""inotify watches on directories, for event loops that must not poll.

inotify(7) is used through libc with ctypes (the only inotify user): three calls, and the events
are parsed here from the descriptor. No library: pyinotify looked for libc with `ldconfig -p` at
every start, needed asyncore (gone from Python 3.12) and built two Python objects per event,
where a burst of mail is thousands of events.

A `DirWatch` follows a set of named targets, each a directory plus a file-name filter, e.g. a
channel's sync directory with `log`, `log-run`, `log-<pid>`, or configdirectory with
`master.ready`. A target whose directory does not exist yet (Cyrus creates `sync/<channel>/` at
the first event) is watched through its nearest existing ancestor and picked up when it appears.

What counts as a change is the watch's `mask`:
- WRITES (the default): a file closed after writing, and files appearing, disappearing or renamed.
  Cyrus opens, locks, appends one line, fsyncs and closes the sync log for every event
  (imap/sync_log.c sync_log_base), so that is one inotify event per line -- also when the write
  failed (the file was opened). Adding IN_MODIFY and IN_ATTRIB made it 2.4 events per line.
- MODIFICATIONS: for files written in place and never closed (journald's journal files; journald
  truncates them to their size after writing, so that watchers get IN_MODIFY).

Use it from a selector: register `fileno()`, call `read()` when readable; `read()` returns the
names of the targets that changed since the last call (a burst of appends is one change), and
`restructured` the targets whose files appeared, vanished or were renamed (a cached line count
of theirs may belong to another file now).
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cyrushelper.config import Channel

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED = 0x4000, 0x8000
IN_ONLYDIR = 0x01000000

STRUCTURE = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
WRITES = IN_CLOSE_WRITE | STRUCTURE
MODIFICATIONS = IN_MODIFY | STRUCTURE
_GONE = IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
_DIR_APPEARS = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF

_EVENT = struct.Struct("iIII")   # struct inotify_event: wd, mask, cookie, len; then len bytes of name
_READ_SIZE = 1 << 16
_SYNC_LOG_RE = re.compile(r"log(-run|-\d+)?")

_libc = None


def _lib():
    """libc, already loaded into this process (no search for the library file)."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = libc
    return _libc


def is_sync_log_name(name: str) -> bool:
    return bool(_SYNC_LOG_RE.fullmatch(name))


@dataclass
class Target:
    key: str
    directory: Path
    wants: Callable[[str], bool]
    watched: Path | None = None   # the directory actually watched (itself or an ancestor)


class DirWatch:
    def __init__(self, mask: int = WRITES):
        self.mask = mask | IN_ONLYDIR
        fd = _lib().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._changed: set[str] = set()
        self._restructured: set[str] = set()
        self.restructured: set[str] = set()   # of the last read()
        self._targets: list[Target] = []
        self._wds: dict[Path, int] = {}
        self._paths: dict[int, Path] = {}

    # -- setup
    def add(self, key: str, directory: Path, wants: Callable[[str], bool]) -> None:
        target = Target(key, Path(directory), wants)
        self._targets.append(target)
        self._attach(target)

    def add_channel(self, channel: Channel) -> None:
        self.add(channel.label, channel.sync_dir, is_sync_log_name)

    def add_file(self, key: str, path: Path) -> None:
        name = Path(path).name
        self.add(key, Path(path).parent, lambda n: n == name)

    def _watch(self, directory: Path) -> bool:
        if directory in self._wds:
            return True
        wd = _lib().inotify_add_watch(self._fd, os.fsencode(directory), self.mask)
        if wd < 0:
            return False
        self._wds[directory] = wd
        self._paths[wd] = directory
        return True

    def _attach(self, target: Target) -> None:
        """Watch the directory itself, or its nearest existing ancestor until it appears."""
        if target.directory.is_dir() and self._watch(target.directory):
            if target.watched != target.directory:
                target.watched = target.directory
                self._changed.add(target.key)  # it may already hold files
                self._restructured.add(target.key)
            return
        for ancestor in target.directory.parents:
            if ancestor.is_dir() and self._watch(ancestor):
                target.watched = ancestor
                return
        target.watched = None

    # -- events
    def _on_event(self, path: Path | None, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:  # events were lost: anything may have changed
            self._changed.update(t.key for t in self._targets)
            self._restructured.update(t.key for t in self._targets)
            return
        if path is None:
            return
        if mask & _GONE:
            wd = self._wds.pop(path, None)
            self._paths.pop(wd, None)
        for target in self._targets:
            if path == target.directory:
                if not name or target.wants(name):
                    self._changed.add(target.key)
                    if mask & STRUCTURE:
                        self._restructured.add(target.key)
                if mask & _GONE:
                    target.watched = None
                    self._attach(target)
            elif target.watched != target.directory and mask & _DIR_APPEARS:
                self._attach(target)  # maybe a missing ancestor (or the directory) appeared

    def fileno(self) -> int:
        return self._fd

    def _consume(self) -> None:
        while True:
            try:
                buf = os.read(self._fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            pos = 0
            while pos < len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                start = pos + _EVENT.size
                pos = start + length
                name = os.fsdecode(buf[start:pos].split(b"\0", 1)[0]) if length else ""
                self._on_event(self._paths.get(wd), mask, name)

    def read(self) -> set[str]:
        """Consume pending events (non-blocking); names of the targets that changed since the
        last call. `restructured` then names those among them whose files appeared, vanished or
        were renamed."""
        self._consume()
        changed, self._changed = self._changed, set()
        self.restructured, self._restructured = self._restructured, set()
        return changed

    def wait(self, timeout: float) -> set[str]:
        """Block up to `timeout` seconds for a change; the changed targets (maybe none)."""
        deadline = time.monotonic() + timeout
        while True:
            changed = self.read()
            remaining = deadline - time.monotonic()
            if changed or remaining <= 0:
                return changed
            select.select([self._fd], [], [], remaining)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

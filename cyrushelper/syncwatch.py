"""inotify watches on directories, for event loops that must not poll (the only pyinotify user).

A `DirWatch` follows a set of named targets, each a directory plus a file-name filter, e.g. a
channel's sync directory with `log`, `log-run`, `log-<pid>`, or configdirectory with
`master.ready`. A target whose directory does not exist yet (Cyrus creates `sync/<channel>/` at
the first event) is watched through its nearest existing ancestor and picked up when it appears.

Use it from a selector: register `fileno()`, call `read()` when readable; `read()` returns the
names of the targets that changed since the last call (a burst of appends is one change).
"""

from __future__ import annotations

import re
import select
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyinotify

from cyrushelper.config import Channel

_FILE_EVENTS = (pyinotify.IN_CREATE | pyinotify.IN_MODIFY | pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM
                | pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_DELETE_SELF
                | pyinotify.IN_MOVE_SELF | pyinotify.IN_ATTRIB)
_DIR_APPEARS = pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF

_SYNC_LOG_RE = re.compile(r"log(-run|-\d+)?")


def is_sync_log_name(name: str) -> bool:
    return bool(_SYNC_LOG_RE.fullmatch(name))


@dataclass
class Target:
    key: str
    directory: Path
    wants: Callable[[str], bool]
    watched: Path | None = None   # the directory actually watched (itself or an ancestor)
    watched_dirs: set[Path] = field(default_factory=set)


class DirWatch:
    def __init__(self):
        self._wm = pyinotify.WatchManager()
        self._changed: set[str] = set()
        self._targets: list[Target] = []
        self._wds: dict[Path, int] = {}
        self._notifier = pyinotify.Notifier(self._wm, default_proc_fun=self._on_event, timeout=0)

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
        result = self._wm.add_watch(str(directory), _FILE_EVENTS, quiet=True)
        wd = result.get(str(directory), -1)
        if wd < 0:
            return False
        self._wds[directory] = wd
        return True

    def _attach(self, target: Target) -> None:
        """Watch the directory itself, or its nearest existing ancestor until it appears."""
        if target.directory.is_dir() and self._watch(target.directory):
            if target.watched != target.directory:
                target.watched = target.directory
                self._changed.add(target.key)  # it may already hold files
            return
        for ancestor in target.directory.parents:
            if ancestor.is_dir() and self._watch(ancestor):
                target.watched = ancestor
                return
        target.watched = None

    # -- events
    def _on_event(self, event) -> None:
        path = Path(event.path)
        if event.mask & (pyinotify.IN_IGNORED | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF):
            self._wds.pop(path, None)
        name = event.name or ""
        for target in self._targets:
            if path == target.directory:
                if not name or target.wants(name):
                    self._changed.add(target.key)
                if event.mask & (pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_IGNORED):
                    target.watched = None
                    self._attach(target)
            elif target.watched != target.directory and event.mask & _DIR_APPEARS:
                self._attach(target)  # maybe a missing ancestor (or the directory) appeared

    def fileno(self) -> int:
        return self._wm.get_fd()

    def read(self) -> set[str]:
        """Consume pending inotify events (non-blocking); names of targets that changed."""
        if self._notifier.check_events(timeout=0):
            self._notifier.read_events()
            self._notifier.process_events()
        changed, self._changed = self._changed, set()
        return changed

    def wait(self, timeout: float) -> set[str]:
        """Block up to `timeout` seconds for a change; the changed targets (maybe none)."""
        deadline = time.monotonic() + timeout
        while True:
            changed = self.read()
            remaining = deadline - time.monotonic()
            if changed or remaining <= 0:
                return changed
            select.select([self.fileno()], [], [], remaining)

    def close(self) -> None:
        try:
            self._notifier.stop()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

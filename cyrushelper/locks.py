"""One drainer per sync log channel: an flock(2) on `{configdirectory}/cyrushelper/drain[.CHANNEL].lock`.

Cyrus's own log reader takes no lock while it replays `log-run` (imap/sync_log.c locks the file
only for a moment after the rename, to serialise with writers), and two readers of one channel
can unlink each other's `log-run`. So every cyrushelper drainer takes this lock first, and hands
the descriptor to its sync_client child: flock belongs to the open file, so the lock stays held
until the last of us and our child is gone, even if cyrushelper itself is killed first.
A Cyrus rolling sync_client does not know this lock; `drain` looks for those separately.

The lock file lives in the state directory (state.py), outside the sync directories, where Cyrus
never looks. It holds the PID of the current holder, for error messages only (the flock is the truth).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from cyrushelper import state
from cyrushelper.atomic import give_to_owner_of


def channel_lock_path(configdirectory: os.PathLike | str, channel: str | None) -> Path:
    """drain.lock for the default channel, drain.NAME.lock for a named one (names never hold '/')."""
    name = "drain.lock" if channel is None else f"drain.{channel}.lock"
    return state.ensure_directory(configdirectory) / name


class LockBusy(Exception):
    def __init__(self, path: Path, holder: int | None):
        self.path, self.holder = path, holder
        who = f"PID {holder}" if holder else "another process"
        super().__init__(f"{path} is held by {who}")


class ChannelLock:
    """flock on a file; `acquire(wait)` tries at once, then retries until `wait` seconds passed."""

    POLL = 0.05

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self.fd: int | None = None

    def holder(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def acquire(self, wait: float = 0.0, clock=time.monotonic, sleep=time.sleep) -> None:
        """Raise LockBusy if the lock is still held after `wait` seconds."""
        if self.fd is not None:
            raise RuntimeError(f"{self.path} already acquired")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            if os.fstat(fd).st_size == 0:
                give_to_owner_of(self.path, self.path.parent)
            writable = True
        except PermissionError:  # created by root earlier, we are cyrus now: locking needs no write
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            writable = False
        end = clock() + max(0.0, wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if clock() >= end:
                    os.close(fd)
                    raise LockBusy(self.path, self.holder()) from None
                sleep(min(self.POLL, max(0.0, end - clock())))
        self.fd = fd
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing our descriptor drops the flock unless a child still holds it

    def __enter__(self) -> ChannelLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

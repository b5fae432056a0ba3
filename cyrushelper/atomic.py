"""Atomic file writes: a reader (or systemd, or a crash) sees the old file or the new one, never half.

The text goes to a temporary file in the same directory, is fsynced, renamed over the target, and
the directory is fsynced so the rename itself survives a power cut. Files that root writes where
Cyrus (running as cyrus_user) must use them too are handed to the owner of a reference path.

`install_all` does the same for a set of files: all of them or none (see there).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol


def write_atomic(path: os.PathLike | str, text: str, mode: int = 0o644) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)  # mkstemp creates 0600 whatever the umask
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(directory)


def symlink_atomic(target: str, path: os.PathLike | str) -> None:
    """Make `path` a symlink to `target`, replacing whatever `path` was in one rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    _unlink_quietly(tmp)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: os.PathLike | str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def give_to_owner_of(path: os.PathLike | str, reference: os.PathLike | str) -> None:
    """As root, chown `path` like `reference`, so a later run as the cyrus user can use it too."""
    if os.geteuid() == 0:
        st = os.stat(reference)
        os.chown(path, st.st_uid, st.st_gid)


# --------------------------------------------------------------------------- a set of files, all or none

STAGING_PREFIX = ".cyrushelper-staging."


class Item(Protocol):
    relpath: str              # below the directory, '/'-separated, no '..'
    text: str | None          # a regular file with this text ...
    link_target: str | None   # ... or a symlink to this
    mode: int


class InstallError(OSError):
    """Writing failed and every change was undone (`rolled_back`), or undoing failed too."""

    def __init__(self, cause: OSError, rolled_back: bool, undo_failures: list[str]):
        self.cause, self.rolled_back, self.undo_failures = cause, rolled_back, undo_failures
        super().__init__(cause.errno, cause.strerror or str(cause), cause.filename)


def install_all(directory: os.PathLike | str, items: Sequence[Item]) -> None:
    """Write every item below `directory`, or leave the directory as it was.

    1. Stage: every file and symlink is written (and fsynced) into a fresh staging directory
       inside `directory` (same file system, so the renames below are atomic). A full disk, a
       read-only or unwritable directory fails here, before anything visible changed.
    2. Swap: each target is renamed into place; whatever stood there (a previous file, or with
       the caller's consent a file where a directory must be) is first renamed aside into the
       staging directory. Any failure undoes every step so far in reverse order.
    3. The staging directory (with the replaced entries) is removed.
    A crash (power cut, SIGKILL) during step 2 can leave some targets new and some old, each one
    whole; a later run removes the staging directory it left behind.
    Raises InstallError (an OSError) on failure."""
    directory = Path(directory)
    created = _make_directories(directory)
    staging: Path | None = None
    try:
        remove_stale_staging(directory)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}.", dir=directory))
        new, old = staging / "new", staging / "old"
        for item in items:
            _stage(new, item)
        _swap(directory, new, old, items)
    except OSError as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        if isinstance(e, InstallError):
            raise
        raise InstallError(e, rolled_back=True, undo_failures=[]) from e
    shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(directory)


def remove_stale_staging(directory: Path) -> None:
    """Staging directories of an install_all that was killed (its PID no longer exists)."""
    for entry in os.listdir(directory):
        if not entry.startswith(STAGING_PREFIX):
            continue
        pid = entry[len(STAGING_PREFIX):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(directory / entry, ignore_errors=True)


def _make_directories(directory: Path) -> list[Path]:
    """Create `directory` and missing parents; the ones created, deepest first."""
    missing = []
    for path in (directory, *directory.parents):
        if os.path.isdir(path):
            break
        missing.append(path)
    created = []
    try:
        for path in reversed(missing):
            os.mkdir(path, 0o755)
            created.insert(0, path)
    except OSError as e:
        _remove_created(created)
        raise InstallError(e, rolled_back=True, undo_failures=[]) from e
    return created


def _remove_created(created: list[Path]) -> None:
    for path in created:
        try:
            os.rmdir(path)
        except OSError:
            pass


def _stage(root: Path, item: Item) -> None:
    target = root / item.relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    if item.link_target is not None:
        os.symlink(item.link_target, target)
        return
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(item.text)
        f.flush()
        os.fchmod(f.fileno(), item.mode)
        os.fsync(f.fileno())


def _swap(directory: Path, new: Path, old: Path, items: Sequence[Item]) -> None:
    undo: list[Callable[[], None]] = []
    touched: set[Path] = set()

    def aside(path: Path) -> None:
        """Rename `path` into the old/ area (kept until the end, for the undo)."""
        keep = old / path.relative_to(directory)
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, keep)
        undo.append(lambda: os.rename(keep, path))

    try:
        for item in items:
            target = directory / item.relpath
            for parent in reversed(target.relative_to(directory).parents[:-1]):
                path = directory / parent
                if os.path.isdir(path):
                    continue
                if os.path.lexists(path):
                    aside(path)
                os.mkdir(path, 0o755)
                undo.append(lambda p=path: os.rmdir(p))
            if os.path.lexists(target):
                aside(target)
            staged = new / item.relpath
            os.rename(staged, target)
            undo.append(lambda s=staged, t=target: os.rename(t, s))
            touched.add(target.parent)
    except OSError as e:
        failures = []
        for step in reversed(undo):
            try:
                step()
            except OSError as undo_error:
                failures.append(str(undo_error))
        raise InstallError(e, rolled_back=not failures, undo_failures=failures) from e
    for path in touched:
        fsync_dir(path)

"""Atomic file writes: a reader (or systemd, or a crash) sees the old file or the new one, never half.

The text goes to a temporary file in the same directory, is fsynced, renamed over the target, and
the directory is fsynced so the rename itself survives a power cut. Files that root writes where
Cyrus (running as cyrus_user) must use them too are handed to the owner of a reference path.
"""

from __future__ import annotations

import os
import tempfile


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

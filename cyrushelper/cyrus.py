"""The installed Cyrus: where its programs are, which version it is, and what that version does
differently. Everything version-specific that cyrushelper relies on is decided here, from the
version `master -V` reports, never assumed.

- `master.ready` (option master_ready_file): master creates it just before its accept loop since
  3.10; older masters never do, so readiness is then judged by probing the listeners (probe.py).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from cyrushelper.notify import strip_notify_env

# Where distributions install the Cyrus service binaries (Debian, Fedora/RHEL, upstream default).
BIN_DIRS = ("/usr/lib/cyrus/bin", "/usr/libexec/cyrus-imapd", "/usr/lib/cyrus-imapd",
            "/usr/local/libexec/cyrus-imapd")

Version = tuple[int, int]


def bin_dir() -> Path:
    """The directory holding master, sync_client … ($CYRUSHELPER_CYRUS_BINDIR overrides)."""
    override = os.environ.get("CYRUSHELPER_CYRUS_BINDIR")
    if override:
        return Path(override)
    for candidate in BIN_DIRS:
        if os.path.isfile(os.path.join(candidate, "master")):
            return Path(candidate)
    return Path(BIN_DIRS[0])


def program(name: str) -> Path:
    """A Cyrus program by name (`master`, `sync_client`, `ctl_mboxlist` …)."""
    return bin_dir() / name


def master_version(master: os.PathLike | str | None = None) -> Version | None:
    """(major, minor) from `master -V` ('cyrus-imapd 3.6.1-Debian-…'), None if unknown."""
    try:
        out = subprocess.run([str(master or program("master")), "-V"], capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL, env=strip_notify_env(os.environ))
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"cyrus-imapd[ -](\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else None


def has_ready_file(version: Version | None) -> bool:
    """master.ready (option master_ready_file, created before the accept loop) exists since 3.10."""
    return version is not None and version >= (3, 10)

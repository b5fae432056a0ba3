"""The installed Cyrus: where its programs are, which version it is, and what that version does
differently. Everything version-specific that cyrushelper relies on is decided here, from the
version `master -V` reports, never assumed.

- `master.ready` (option master_ready_file): master creates it just before its accept loop since
  3.10; older masters never do, so readiness is then judged by probing the listeners (probe.py).
- Which program a cyrus.conf command runs (`resolve_command`): master runs a relative name from
  its binary directory; Debian's `/usr/sbin/cyrus NAME` wrapper runs NAME, cyr_NAME or ctl_NAME
  from there (and `check` is chk_cyrus), so Debian's `cyrus expire` is cyr_expire.
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


DEBIAN_WRAPPER = "cyrus"


def resolve_command(words: list[str], bindir: Path | None = None) -> tuple[str, ...]:
    """The command as the program that really runs, by absolute path, and its arguments;
    LookupError naming what was looked for when no such executable exists."""
    directory = bindir or bin_dir()
    if len(words) > 1 and os.path.basename(words[0]) == DEBIAN_WRAPPER:
        name, rest = words[1], words[2:]
        candidates = [directory / name, directory / f"cyr_{name}", directory / f"ctl_{name}"]
        if name == "check":
            candidates.append(directory / "chk_cyrus")
    else:
        name, rest = words[0], words[1:]
        candidates = [Path(name) if name.startswith("/") else directory / name]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return (str(candidate), *rest)
    raise LookupError(" nor ".join(str(c) for c in candidates))

"""The installed Cyrus: where its programs are, which version it is, and what that version does
differently. Everything version-specific that cyrushelper relies on is decided here, from the
version `master -V` reports, never assumed.

- `master.ready` (option master_ready_file): master creates it just before its accept loop since
  3.10; older masters never do, so readiness is then judged by probing the listeners (probe.py).
- The shutdown hang (cyrus-imapd #5309): pselect() does not deliver a pending SIGCHLD while one of
  master's listen sockets has a connection waiting, and in shutdown master never accepts it, so
  master spins without reaping its exited children and never exits. Fixed by commit 07b2ca5
  (2025-03, "Pending SIGCHLD signals … can be ignored by pselect"), released in 3.12.0 and
  backported to 3.10.2 and 3.8.6 (the 3.6 branch has no fix; Debian 12 ships 3.6.1, Debian 13
  3.10.2).
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

Version = tuple[int, int, int]   # (major, minor, patch)


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


def parse_version(text: str) -> Version | None:
    """(major, minor, patch) from what `master -V` prints ('cyrus-imapd 3.6.1-Debian-3.6.1-4+deb12u5')."""
    m = re.search(r"cyrus-imapd[ -](\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def master_version(master: os.PathLike | str | None = None) -> Version | None:
    """The installed master's version (`master -V`), None if unknown."""
    try:
        out = subprocess.run([str(master or program("master")), "-V"], capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL, env=strip_notify_env(os.environ))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(out.stdout + out.stderr)


def has_ready_file(version: Version | None) -> bool:
    """master.ready (option master_ready_file, created before the accept loop) exists since 3.10."""
    return version is not None and version >= (3, 10)


# #5309 is fixed from 3.12.0 on, and from these releases in the branches the fix reached
# (git tag --contains of the fix's commit on each branch: 3.8 and 3.10 backports, 3.13 development)
SHUTDOWN_HANG_FIXED = {(3, 8): (3, 8, 6), (3, 10): (3, 10, 2), (3, 13): (3, 13, 1)}


def has_shutdown_hang(version: Version | None) -> bool:
    """Whether this master can hang at shutdown after its last child exited (#5309, above). An
    unknown version counts as affected: the workaround only ends a master that is already alone,
    so applying it needlessly costs nothing."""
    if version is None:
        return True
    fixed = SHUTDOWN_HANG_FIXED.get(version[:2], (3, 12, 0))
    return version < fixed


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

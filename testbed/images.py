"""Debian root file systems for the throwaway systemd containers: the host's own release is the
host's `/` (overlaid, as ever); another release is a debootstrapped root, built once and cached.

    root = images.root("trixie")      # /var/cache/cyrushelper-lab/roots/trixie, built if missing
    SystemdContainer(workdir, root=root)

A root holds systemd, Cyrus from that release's packages and Debian's Python with the libraries the
product needs, so tests run that release's Cyrus, systemd and Python — nothing of the host. It is
rebuilt when missing or when its recipe (the package list below) changed; the build happens in a
temporary directory renamed into place, under a lock, so a crash or a parallel test run never sees
half a root. Measured here: debootstrap ≈ 25 s, the packages ≈ 30 s.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("CYRUSHELPER_ROOTS", "/var/cache/cyrushelper-lab/roots"))
MIRROR = os.environ.get("CYRUSHELPER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Debian release codename -> version, for the releases the project supports.
RELEASES = {"bookworm": "12", "trixie": "13"}
# Each release's /usr/bin/python3 (the product's venv is made with it).
PYTHON = {"bookworm": "3.11", "trixie": "3.13"}
# cyrus-common depends on a mail transport; trixie's default (exim4) fails in a chroot ("user mail
# was not found"): msmtp-mta satisfies the dependency and is installed first.
FIRST = ["msmtp-mta"]
PACKAGES = ["systemd", "systemd-sysv", "dbus", "procps",
            "cyrus-imapd", "cyrus-common", "cyrus-replication", "cyrus-admin", "cyrus-clients",
            "sasl2-bin", "python3", "python3-venv",
            # what the product imports (its wheel installs them into its venv as well) and the test
            # bed, which runs with this release's /usr/bin/python3
            "python3-jinja2", "python3-sdnotify", "python3-pyinotify",
            # building the Debian package with this release's tools (tests/system/test_packaging_deb.py)
            "build-essential", "debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all", "python3-setuptools",
            "python3-packaging", "python3-pytest", "python3-hypothesis", "dpkg-dev", "lintian", "pkgconf"]
# systemd.pc, which the package build reads, moved from systemd to systemd-dev in Debian 13
EXTRA_PACKAGES = {"bookworm": [], "trixie": ["systemd-dev"]}
# Kept as .deb files in the root's /var/cache/apt/archives: the package test removes them inside the
# container and `apt-get install ./cyrushelper_*.deb` must bring them back from an offline repository.
_RUNTIME = ["python3-jinja2", "python3-markupsafe", "python3-pyinotify", "python3-sdnotify"]
# trixie's python3-pyinotify needs python3-pyasyncore (asyncore left Python's library in 3.12)
KEEP_DEBS = {"bookworm": _RUNTIME, "trixie": _RUNTIME + ["python3-pyasyncore"]}
STAMP = ".cyrushelper-root.json"


class ImageError(RuntimeError):
    pass


def os_release(root: os.PathLike | str = "/") -> dict[str, str]:
    text = Path(root, "etc/os-release").read_text()
    return {k: v.strip('"') for k, v in re.findall(r"^(\w+)=(.*)$", text, re.M)}


def host_release() -> str:
    """The host's Debian codename (bookworm, trixie)."""
    return os_release().get("VERSION_CODENAME", "")


def recipe(release: str) -> dict:
    return {"release": release, "mirror": MIRROR, "first": FIRST,
            "packages": PACKAGES + EXTRA_PACKAGES[release], "keep": KEEP_DEBS[release]}


def recipe_id(release: str) -> str:
    return hashlib.sha256(json.dumps(recipe(release), sort_keys=True).encode()).hexdigest()[:16]


def root(release: str) -> Path:
    """The cached root of `release`, built (≈1 min) when missing or stale."""
    if release not in RELEASES:
        raise ImageError(f"unknown release {release!r} (known: {', '.join(RELEASES)})")
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / release
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _current(target, release):
            return target
        _build(release, target)
    return target


def _current(target: Path, release: str) -> bool:
    try:
        return json.loads((target / STAMP).read_text()).get("id") == recipe_id(release)
    except (OSError, ValueError):
        return False


def _run(argv: list[str], what: str, timeout: float = 900) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                            "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:
        raise ImageError(f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _build(release: str, target: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap not found (package debootstrap, see scripts/bootstrap.sh)")
    work = CACHE / f".{release}.build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        _run(["debootstrap", "--variant=minbase", release, str(work), MIRROR], f"debootstrap {release}")
        (work / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")  # nothing starts in the chroot
        (work / "usr/sbin/policy-rc.d").chmod(0o755)
        shutil.copy("/etc/resolv.conf", work / "etc/resolv.conf")
        apt = "apt-get install -y -q --no-install-recommends"
        packages = " ".join(recipe(release)["packages"])
        script = (f"apt-get update -q && {apt} {' '.join(FIRST)} && {apt} {packages} "
                  f"&& apt-get clean && apt-get install -y -q --reinstall --download-only "
                  f"{' '.join(KEEP_DEBS[release])}")
        # a private mount namespace: /proc for the chroot goes away with it, whatever happens
        _run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'mount -t proc proc "$1/proc" && exec chroot "$1" sh -c "$2"', "_", str(work), script],
             f"installing Cyrus and Python into the {release} root")
        (work / "usr/sbin/policy-rc.d").unlink()
        (work / STAMP).write_text(json.dumps({"id": recipe_id(release), **recipe(release)}, indent=2))
        if target.exists():
            old = CACHE / f".{release}.old-{os.getpid()}"
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def releases_under_test() -> list[str]:
    """The host's release first, then every other supported one ($CYRUSHELPER_RELEASES, comma
    separated, narrows it: e.g. `bookworm` for a quick run on the host's release only)."""
    wanted = [r for r in os.environ.get("CYRUSHELPER_RELEASES", "").split(",") if r]
    host = host_release()
    ordered = [host] + [r for r in RELEASES if r != host] if host in RELEASES else list(RELEASES)
    return [r for r in ordered if not wanted or r in wanted]


def container_root(release: str) -> Path | None:
    """What SystemdContainer(root=…) takes for `release`: None (the host's `/`) for the host's own."""
    return None if release == host_release() else root(release)

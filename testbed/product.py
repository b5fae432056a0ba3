"""cyrushelper the way users get it, for the end-to-end tests: a wheel of this checkout installed
into a fresh venv under /opt with Debian's own /usr/bin/python3, inside each throwaway container.

    house = build_wheelhouse(scratch)        # once per test session, on the host
    helper = install(container, house)       # in each container: /opt/cyrushelper/bin/cyrushelper

The wheel is built from a clean copy of the files git would commit (never a stale build/ or the
checkout's .venv), with pip's isolated build and the newest setuptools, the way `pip install .`
builds it. The containers have no network (--private-network), so the host also fetches every
dependency's wheel (and setuptools, for an isolated `pip install .` inside) into the wheelhouse;
pip inside installs from there only (--no-index). Nothing of the development venv, no bind mount
and no drop-in reaches the units: they run the product and the sandbox exactly as shipped.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from testbed import images

REPOSITORY = Path(__file__).resolve().parents[1]
PRODUCT_VENV = "/opt/cyrushelper"
SYSTEM_PYTHON = "/usr/bin/python3"   # Debian's, as CONTRACTS.md and the README install it
# What setuptools or pip would say about our own metadata or package layout.
METADATA_NOISE = re.compile(r"deprecat|BetaConfiguration|BuildBackendWarning|SetuptoolsWarning|"
                            r"absent from the `packages`|outside of `pyproject.toml`|overwritten by", re.I)


class WheelhouseError(RuntimeError):
    pass


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path      # cyrushelper-*.whl, its dependencies' wheels, setuptools
    source: Path         # the clean copy of the checkout the wheel was built from
    build_output: str    # pip's (and setuptools') output while building

    @property
    def wheel(self) -> Path:
        (found,) = self.directory.glob("cyrushelper-*.whl")
        return found

    def metadata_warnings(self) -> list[str]:
        return [line.strip() for line in self.build_output.splitlines() if METADATA_NOISE.search(line)]


def committable_files(repo: Path = REPOSITORY) -> list[str]:
    """What a commit of the work tree would hold: tracked files (minus deleted ones) plus new files
    that are not ignored."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and ((repo / f).exists() or (repo / f).is_symlink())})


def source_tree(dest: Path, repo: Path = REPOSITORY) -> Path:
    """A clean copy of the checkout at `dest` (symlinks kept)."""
    for name in committable_files(repo):
        src, dst = repo / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


def _pip(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise WheelhouseError(f"pip {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def requirements_for(wheel: Path, python: str) -> list[str]:
    """The wheel's runtime requirements whose markers hold on Python `python` (e.g. "3.13"): pip
    download evaluates python_version markers with the interpreter running it, not the target."""
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(metadata).decode().splitlines()
    environment = {"python_version": python, "python_full_version": f"{python}.0", "extra": ""}
    wanted = []
    for line in lines:
        if line.startswith("Requires-Dist: "):
            req = Requirement(line.split(": ", 1)[1])
            if req.marker is None or req.marker.evaluate(environment):
                wanted.append(f"{req.name}{req.specifier}")
    return wanted


def build_wheelhouse(scratch: Path, pythons: tuple[str, ...] = tuple(sorted(set(images.PYTHON.values())))
                     ) -> Wheelhouse:
    """Build the wheel of this checkout and gather every wheel an offline install needs, for each
    Debian release's Python (compiled ones, e.g. MarkupSafe, differ per Python version)."""
    source = source_tree(scratch / "src")
    directory = scratch / "wheels"
    # -v: setuptools' own warnings are shown only in verbose mode
    built = _pip("wheel", "-v", "--wheel-dir", str(directory), str(source))
    house = Wheelhouse(directory, source, built.stdout + built.stderr)
    for python in pythons:
        tag = python.replace(".", "")
        # pure wheels built above (sdnotify ships no wheel) are found in the wheelhouse
        _pip("download", "--only-binary", ":all:", "--python-version", python, "--implementation", "cp",
             "--abi", f"cp{tag}", "--platform", f"manylinux2014_{platform.machine()}", "--find-links",
             str(directory), "--dest", str(directory), *requirements_for(house.wheel, python), "setuptools")
    return house


def install(container, house_inside: str | Path, venv: str = PRODUCT_VENV) -> str:
    """`python3 -m venv VENV && VENV/bin/pip install cyrushelper` inside `container`, offline from the
    wheelhouse at `house_inside` (a path the container sees). Returns VENV/bin/cyrushelper."""
    container.run(SYSTEM_PYTHON, "-m", "venv", venv, timeout=120)
    container.run(f"{venv}/bin/pip", "install", "-q", "cyrushelper", timeout=300,
                  env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(house_inside), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return f"{venv}/bin/cyrushelper"


# run by the product's own Python inside the container: the modules whose bytecode is not there
_WITHOUT_BYTECODE = ("import importlib.util, json, pathlib, cyrushelper\n"
                     "package = pathlib.Path(cyrushelper.__file__).parent\n"
                     "print(json.dumps(sorted(str(p.relative_to(package)) for p in package.rglob('*.py')\n"
                     "                        if not pathlib.Path(importlib.util.cache_from_source(str(p))).exists())))\n")


def modules_without_bytecode(container, python: str) -> list[str]:
    """The installed package's modules without a .pyc for `python`. Every hook of the unit runs
    with the file system read-only (ProtectSystem=strict), where Python cannot write __pycache__:
    a module without bytecode is compiled again at every start (issue 11). pip compiles at
    install, Debian's package in its postinst (py3compile), the RPM at build time."""
    return json.loads(container.run(python, "-I", "-c", _WITHOUT_BYTECODE).stdout)  # -I: not the cwd's copy


def copy_wheels(house: Wheelhouse, dest: Path) -> Path:
    """The wheelhouse copied where a container sees it (e.g. its bound work directory)."""
    shutil.copytree(house.directory, dest)
    return dest

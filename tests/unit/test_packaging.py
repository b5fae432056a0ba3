"""packaging/: the Debian and RPM packages stay in step with the code they package.

Versions match cyrushelper.__version__, every file the packages install exists, the templates travel
inside the Python package only, and the packages' dependencies cover pyproject.toml's.
"""

from __future__ import annotations

import glob
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import cyrushelper
from cyrushelper import render

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "packaging" / "debian"
SPEC = ROOT / "packaging" / "rpm" / "cyrushelper.spec"

# PyPI name -> binary package name. A new dependency in pyproject.toml fails the tests below until
# it is added here and to both packages.
DEBIAN_NAMES = {"jinja2": "python3-jinja2", "sdnotify": "python3-sdnotify",
                "pyinotify": "python3-pyinotify", "pyasyncore": "python3-pyasyncore",
                "systemd-python": "python3-systemd"}
FEDORA_NAMES = {"jinja2": "python3-jinja2", "sdnotify": "python3-sdnotify",
                "pyinotify": "python3-inotify", "pyasyncore": "python3-pyasyncore",
                "systemd-python": "python3-systemd"}
# Where a distribution's floor is deliberately lower than pyproject.toml's, and why.
DEBIAN_FLOORS: dict[str, str] = {}  # where Debian's floor is deliberately lower than pyproject's
# The Python of the Debian release the package targets (bookworm), for environment markers.
DEBIAN_PYTHON = "3.11"
# The paths the spec's macros stand for on Fedora.
RPM_MACROS = {"%{_unitdir}": "/usr/lib/systemd/system", "%{_datadir}": "/usr/share",
              "%{_bindir}": "/usr/bin"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(optional: str | None = None) -> list[Requirement]:
    project = pyproject()["project"]
    specs = project["optional-dependencies"][optional] if optional else project["dependencies"]
    return [Requirement(s) for s in specs]


def floor(req: Requirement) -> str | None:
    lower = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    return lower[0] if lower else None


# --------------------------------------------------------------------------- Debian

def control_field(name: str, paragraph: int) -> str:
    """One field of debian/control (comment lines dropped, continuation lines joined)."""
    text = "\n".join(line for line in (DEBIAN / "control").read_text().splitlines()
                     if not line.startswith("#"))
    block = re.split(r"\n\s*\n", text.strip())[paragraph]
    match = re.search(rf"^{name}:(.*(?:\n[ \t].*)*)", block, re.MULTILINE)
    assert match, f"debian/control paragraph {paragraph} has no {name}:"
    return " ".join(match.group(1).split())


def relations(field: str) -> dict[str, str | None]:
    """'a (>= 1), b | c' -> {'a': '1', 'b': None, 'c': None} (the >= floor; each alternative listed)."""
    result = {}
    for item in filter(None, (i.strip() for part in field.split(",") for i in part.split("|"))):
        m = re.fullmatch(r"([a-z0-9][a-z0-9+.-]*|\$\{[^}]+\})\s*(?:\(\s*(<<|<=|=|>=|>>)\s*([^)\s]+)\s*\))?"
                         r"(?:\s*<[^>]*>)?", item)
        assert m, f"cannot parse relation {item!r}"
        result[m.group(1)] = m.group(3) if m.group(2) == ">=" else None
    return result


def debian_changelog_version() -> str:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    m = re.match(r"cyrushelper \(([^)]+)\) ", first)
    assert m, f"debian/changelog: first line {first!r} is not 'cyrushelper (VERSION) ...'"
    return m.group(1)


def test_debian_changelog_version_is_the_package_version():
    # source/format is 3.0 (native): the version carries no Debian revision
    assert (DEBIAN / "source" / "format").read_text().strip() == "3.0 (native)"
    assert debian_changelog_version() == cyrushelper.__version__


def debian_install_lines() -> list[tuple[list[str], str]]:
    lines = []
    for line in (DEBIAN / "cyrushelper.install").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            *sources, dest = line.split()
            assert sources, f"cyrushelper.install: {line!r} needs SOURCE... DEST"
            lines.append((sources, dest))
    return lines


def test_every_file_the_deb_installs_exists():
    for sources, _ in debian_install_lines():
        for pattern in sources:
            assert glob.glob(str(ROOT / pattern)), f"cyrushelper.install: {pattern} matches nothing"


def test_deb_installs_the_shared_units_only():
    """units/ has exactly the shared units, and debian/rules installs both into the unit directory
    systemd's pkg-config file names (not a fixed /lib or /usr/lib: Debian 12's dh_installsystemd looks
    only under /lib, Debian 13's lintian refuses it); nothing else installs units."""
    assert sorted(p.name for p in (ROOT / "units").glob("*.service")) == ["cyrus.service", "cyrus@.service"]
    rules = (DEBIAN / "rules").read_text()
    assert "UNITDIR := $(shell pkg-config --variable=systemdsystemunitdir systemd)" in rules
    for name in ("cyrus@.service", "cyrus.service"):
        assert f"install -D -m 0644 units/{name} debian/cyrushelper$(UNITDIR)/{name}" in rules
    assert not [s for sources, _ in debian_install_lines() for s in sources if s.startswith("units/")]


def test_templates_are_installed_with_the_module_only():
    # one mechanism: setup.cfg maps templates/ into the package cyrushelper.templates, which every
    # install carries; the packages must not ship a second copy somewhere else
    assert not any(s.startswith("templates/") for sources, _ in debian_install_lines() for s in sources)
    assert "templates/" not in spec_section("install") and "templates" not in spec_section("files")
    setup_cfg = (ROOT / "setup.cfg").read_text()
    assert re.search(r"^\s*cyrushelper\.templates = templates$", setup_cfg, re.M)
    assert re.search(r"^cyrushelper\.templates = \*\.j2$", setup_cfg, re.M)


def test_templates_render_uses_are_in_templates_dir():
    used = set(re.findall(r'"([\w@.-]+\.j2)"', Path(render.__file__).read_text()))
    assert used and used == set(render.TEMPLATES), "render.py names a template outside TEMPLATES"
    for name in used:
        assert (ROOT / "templates" / name).is_file(), f"render.py uses {name}, templates/ lacks it"


def test_debian_depends_cover_pyproject_dependencies():
    depends = relations(control_field("Depends", 1))
    assert {"${python3:Depends}", "${misc:Depends}"} <= depends.keys()
    build_depends = relations(control_field("Build-Depends", 0))
    for req in requirements():
        if req.marker and not req.marker.evaluate({"python_version": DEBIAN_PYTHON}):
            continue
        assert req.name in DEBIAN_NAMES, f"add {req.name} to DEBIAN_NAMES and debian/control"
        package = DEBIAN_NAMES[req.name]
        expected = DEBIAN_FLOORS.get(req.name, floor(req))
        for field, found in (("Depends", depends), ("Build-Depends", build_depends)):
            assert package in found, f"debian/control {field} lacks {package} ({req})"
            assert found[package] == expected, \
                f"debian/control {field}: {package} (>= {found[package]}), expected >= {expected} ({req})"


def test_debian_recommends_the_journal_extra():
    recommends = relations(control_field("Recommends", 1))
    for req in requirements("journal"):
        assert DEBIAN_NAMES[req.name] in recommends


@pytest.mark.parametrize("script", ["cyrushelper.postinst", "cyrushelper.prerm"])
def test_maintainer_scripts_keep_the_debhelper_token(script):
    text = (DEBIAN / script).read_text()
    assert text.startswith("#!/bin/sh\nset -e\n") and "#DEBHELPER#" in text


# --------------------------------------------------------------------------- RPM

def spec_text() -> str:
    return SPEC.read_text()


def spec_section(name: str) -> str:
    m = re.search(rf"^%{name}\b.*?\n(.*?)(?=^%(?:prep|generate_buildrequires|build|install|check|"
                  rf"files|post|preun|postun|changelog|description)\b|\Z)", spec_text(), re.M | re.S)
    assert m, f"the spec has no %{name} section"
    return m.group(1)


def spec_tag(tag: str) -> list[str]:
    return re.findall(rf"^{tag}:\s*(.+?)\s*$", spec_text(), re.M)


def test_spec_version_is_the_package_version():
    assert spec_tag("Version") == [cyrushelper.__version__]


def test_every_file_the_spec_installs_exists():
    sources = re.findall(r"(?<![\w/])((?:units|templates)/[^\s]+)", spec_section("install"))
    assert sources, "the spec's %install names no units/ or templates/ file"
    for pattern in sources:
        assert glob.glob(str(ROOT / pattern)), f"spec %install: {pattern} matches nothing"
    assert {Path(s).name for s in sources if s.startswith("units/")} == {"cyrus@.service", "cyrus.service"}


def expand(path: str) -> str:
    for macro, value in RPM_MACROS.items():
        path = path.replace(macro, value)
    return path


def test_spec_files_hold_the_units_and_the_command():
    files = {expand(line.split()[-1]) for line in spec_section("files").splitlines()
             if line.strip() and not line.startswith("%license") and not line.startswith("%doc")}
    assert {"/usr/lib/systemd/system/cyrus@.service", "/usr/lib/systemd/system/cyrus.service",
            "/usr/bin/cyrushelper"} <= files


def test_spec_requires_cover_pyproject_dependencies():
    requires = " ".join(spec_tag("Requires"))
    for req in requirements():
        assert req.name in FEDORA_NAMES, f"add {req.name} to FEDORA_NAMES and the spec"
        package = FEDORA_NAMES[req.name]
        version = floor(req)
        wanted = f"{package} >= {version}" if version else package
        if req.marker:  # only python_version markers are used: a rich dependency on python3
            (marker,) = re.findall(r"python_version\s*>=\s*['\"]([\d.]+)['\"]", str(req.marker))
            wanted = f"({wanted} if python3 >= {marker})"
        assert wanted in requires, f"spec: no 'Requires: {wanted}' for {req}"
    assert "cyrus-imapd" in spec_tag("Requires")


def test_spec_recommends_the_journal_extra():
    for req in requirements("journal"):
        assert any(r.startswith(FEDORA_NAMES[req.name]) for r in spec_tag("Recommends"))


def test_spec_uses_the_systemd_scriptlets_for_the_umbrella():
    assert "%systemd_post cyrus.service" in spec_section("post")
    assert "%systemd_preun cyrus.service" in spec_section("preun")
    assert "%systemd_postun" in spec_section("postun")

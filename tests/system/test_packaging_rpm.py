"""The Fedora package, built from this checkout with rpmbuild -bb (packaging/build-rpm.sh: Debian's
rpm with packaging/rpm/macros.substitutes standing in for Fedora's macros), then inspected:
files, scriptlets, dependencies, the units it ships, and rpmlint with nothing left to say."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("rpmbuild", "rpm", "rpmlint")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        reason = f"RPM tools missing: {' '.join(missing)} (scripts/bootstrap.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} -- CI must run every system test, refusing to skip", pytrace=False)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("rpm")
    r = subprocess.run(["sh", str(ROOT / "packaging" / "build-rpm.sh"), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"build-rpm.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    (rpm,) = out.glob("cyrushelper-*.noarch.rpm")
    return rpm, r.stdout + r.stderr


def rpm_query(rpm: Path, *args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True, check=True).stdout


def test_rpm_holds_the_command_units_templates_manual_and_instances_script(built):
    rpm, _ = built
    files = set(rpm_query(rpm, "-l").split())
    site = next(f for f in files if re.fullmatch(r"/usr/lib/python3\.\d+/site-packages/cyrushelper", f))
    assert {"/usr/bin/cyrushelper", "/usr/lib/systemd/system/cyrus@.service",
            "/usr/lib/systemd/system/cyrus.service", "/usr/libexec/cyrushelper/instances",
            "/usr/share/man/man8/cyrushelper.8.gz", f"{site}/templates/cyrus@.service.j2",
            f"{site}/templates/cyrushelper.conf.j2", f"{site}/render.py"} <= files
    assert not any(f.startswith("/usr/share/cyrushelper") for f in files), "templates belong in the module only"


def test_rpm_units_are_the_committed_rendering(built):
    rpm, _ = built
    digests = {line.split()[0]: line.split()[3] for line in rpm_query(rpm, "--dump").splitlines()}
    for name in ("cyrus@.service", "cyrus.service"):
        assert digests[f"/usr/lib/systemd/system/{name}"] == hashlib.sha256((ROOT / "units" / name).read_bytes()).hexdigest()


def test_rpm_scriptlets_restart_and_stop_instances_one_at_a_time(built):
    rpm, _ = built
    scripts = rpm_query(rpm, "--scripts")
    sections = dict(re.findall(r"^(\w+) scriptlet.*?:\n(.*?)(?=^\w+ scriptlet|\Z)", scripts, re.M | re.S))
    assert "/usr/libexec/cyrushelper/instances restart" in sections["postuninstall"]
    assert "/usr/libexec/cyrushelper/instances stop" in sections["preuninstall"]
    assert "cyrus@*" not in scripts, "a glob enqueues one job per unit: replica and primary may stop at once"
    assert "systemctl daemon-reload" in sections["postuninstall"]


def test_rpm_requires_the_runtime_dependencies(built):
    rpm, _ = built
    requires = rpm_query(rpm, "-R")
    for wanted in ("python3-jinja2 >= 3.0", "python3-sdnotify >= 0.3.1", "python3-inotify >= 0.9.6",
                   "cyrus-imapd", "(python3-pyasyncore >= 1.0 if python3 >= 3.12)"):
        assert wanted in requires, f"no Requires: {wanted}\n{requires}"


def test_rpmlint_has_nothing_to_say(built):
    _, output = built
    summary = re.search(r"(\d+) errors, (\d+) warnings", output)
    assert summary and summary.groups() == ("0", "0"), output[-3000:]

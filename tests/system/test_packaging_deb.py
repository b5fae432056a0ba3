"""The Debian package, built from this checkout with each supported release's own tools and
installed with dpkg inside a throwaway systemd of that release (Debian 12 and 13: PID 1 in a
container whose root is an overlay: nothing reaches the host).

What the maintainer scripts promise (packaging/debian/README.Debian):
- the build is clean (no setuptools warning about our metadata; lintian --pedantic: no E/W/P);
- `apt-get install ./cyrushelper_*.deb` pulls every runtime dependency;
- installing starts nothing; the packaged cyrus@.service is what `cyrushelper generate` renders,
  so the admin copies only the per-instance drop-in;
- an upgrade restarts every running instance through its stop path, one at a time, the local
  replica first: the primary's drain succeeds and nothing is lost;
- removal stops -- and drains -- every running instance while the helper still exists, the
  primary before its replica.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from testbed import images
from testbed.container import SystemdContainer
from testbed.product import METADATA_NOISE, SYSTEM_PYTHON, modules_without_bytecode, source_tree
from testbed.scenario import LabSystem, new_workdir
from tests.conftest import require_container_host, require_root_and_cyrus

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PRIMARY, REPLICA = "cyrus@primary.service", "cyrus@replica.service"
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3")
# What `Depends` must pull in, per release (cyrus-common/-replication stay: the lab pair needs them
# installed): the images keep these packages' .deb files for the offline install. They also keep
# python3-pyinotify (+ pyasyncore on trixie), which the package no longer depends on (syncwatch.py
# calls libc): left in the image recipe so that the shared root cache is not rebuilt for it.
NOT_DEPENDED_ON = ("python3-pyinotify", "python3-pyasyncore")
RUNTIME_DEPENDENCIES = {release: [p for p in keep if p not in NOT_DEPENDED_ON]
                        for release, keep in images.KEEP_DEBS.items()}
DEBIAN_PYTHON_PACKAGES = ("python3-jinja2", "python3-sdnotify",
                          "pybuild-plugin-pyproject", "python3-pytest", "python3-hypothesis",
                          "python3-packaging")


def require_debian_build_tools() -> None:
    missing = [t for t in BUILD_TOOLS if not shutil.which(t)]
    for package in DEBIAN_PYTHON_PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        if "ok installed" not in r.stdout:
            missing.append(package)
    if not missing:
        return
    reason = f"Debian build tools missing: {' '.join(missing)} (see packaging/README.md)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} -- CI must run every system test, refusing to skip", pytrace=False)
    pytest.skip(reason)


def check_build_output(output: str) -> None:
    """No setuptools warning about our metadata (Debian 12's setuptools 66), and lintian --pedantic
    with no E:/W:/P: line; every remaining I: tag justified in packaging/README.md."""
    noise = [line for line in output.splitlines() if METADATA_NOISE.search(line)]
    assert noise == [], "the Debian build warns about our metadata:\n" + "\n".join(noise)
    assert "lintian --pedantic: Lintian v" in output, \
        "lintian did not run (install lintian: scripts/bootstrap.sh)\n" + output[-2000:]
    tags = re.findall(r"^([EWPIXO]): cyrushelper[^:]*: (\S+)", output, re.M)
    assert [t for t in tags if t[0] in "EWP"] == [], tags
    justified = (ROOT / "packaging" / "README.md").read_text()
    for _, tag in tags:
        assert tag in justified, f"lintian {tag}: say in packaging/README.md why it stays"


def build_debs(out: Path, box: SystemdContainer | None = None) -> tuple[Path, Path]:
    """(the package, the same package as version VERSION+upgrade1) built from this checkout: on the
    host, or inside `box` (another release, with its own debhelper/pybuild/lintian) from a clean
    copy of the checkout."""
    if box is None:
        r = subprocess.run(["sh", str(ROOT / "packaging" / "build-deb.sh"), str(out)],
                           capture_output=True, text=True, timeout=600)
    else:
        source = source_tree(out.parent / "source")
        r = box.run("sh", str(source / "packaging" / "build-deb.sh"), str(out), check=False, timeout=600,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert r.returncode == 0, f"build-deb.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    check_build_output(r.stdout + r.stderr)
    (deb,) = out.glob("cyrushelper_*_all.deb")
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = next(line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("Version: "))
    control.write_text(text.replace(f"Version: {version}\n", f"Version: {version}+upgrade1\n"))
    upgrade = out / f"cyrushelper_{version}+upgrade1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(upgrade)],
                   check=True, capture_output=True)
    return deb, upgrade


@pytest.fixture(scope="session")
def built_debs():
    """(the package, its +upgrade1 rebuild), built once per test session."""
    require_root_and_cyrus()
    require_debian_build_tools()
    out = new_workdir("debs")
    yield build_debs(out / "debs")
    if not os.environ.get("CYRUSHELPER_KEEP_LAB"):
        shutil.rmtree(out, ignore_errors=True)


def invocation(box: SystemdContainer, unit: str) -> str:
    return box.show(unit, "InvocationID")["InvocationID"]


def monotonic(box: SystemdContainer, unit: str, prop: str) -> int:
    return int(box.show(unit, prop)[prop])


def local_repository(directory: Path, packages: list[str], root: Path | None) -> Path:
    """A flat apt repository of these packages, in the versions installed in `root` (None: the host):
    from that root's apt cache (the release images keep them), else downloaded on the host (the
    container has no network)."""
    directory.mkdir(parents=True)
    base = root or Path("/")
    for package in packages:
        version = subprocess.run(["dpkg-query", f"--admindir={base}/var/lib/dpkg", "-W", "-f=${Version}",
                                  package], capture_output=True, text=True, check=True).stdout.strip()
        cached = list((base / "var/cache/apt/archives").glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
        if cached:
            shutil.copy(cached[0], directory)
        elif root is None:
            subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=directory, check=True,
                           capture_output=True, timeout=300)
        else:
            raise AssertionError(f"{package} {version} is not kept in {root} (testbed.images.KEEP_DEBS)")
    index = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=directory, capture_output=True,
                           text=True, check=True).stdout
    (directory / "Packages").write_text(index)
    return directory


def apt_install_offline(box: SystemdContainer, repo: Path, deb: Path) -> str:
    """`apt-get install ./cyrushelper_*.deb` with only `repo` as package source."""
    (repo / "local.list").write_text(f"deb [trusted=yes] file:{repo} ./\n")
    options = ["-o", f"Dir::Etc::SourceList={repo}/local.list", "-o", "Dir::Etc::SourceParts=/nonexistent",
               "-o", f"Dir::State::Lists={repo}/lists"]
    (repo / "lists" / "partial").mkdir(parents=True)
    box.run("apt-get", *options, "update", timeout=120)
    r = box.run("apt-get", *options, "install", "-y", "--no-install-recommends", str(deb), timeout=300,
                env={"DEBIAN_FRONTEND": "noninteractive"})
    return r.stdout


@pytest.mark.parametrize("release", images.releases_under_test())
def test_deb_install_upgrade_remove_under_real_systemd(release, request):
    require_root_and_cyrus()
    require_container_host()
    require_debian_build_tools()
    workdir = new_workdir(f"packaging-deb-{release}")
    dependencies = RUNTIME_DEPENDENCIES[release]
    try:
        root = images.container_root(release)
        with SystemdContainer(workdir, root=root) as box:
            # The host's release reuses the session's build (socket mode's upgrade test needs it too);
            # the other release builds inside its own container, with its own tools.
            deb, upgrade = (request.getfixturevalue("built_debs") if root is None
                            else build_debs(workdir / "debs", box))
            lab = LabSystem(box, workdir, rolling=True).create()
            # The host's policy-rc.d (if any) would veto the postinst's restart; the overlay
            # keeps this removal inside the container.
            box.run("rm", "-f", "/usr/sbin/policy-rc.d")
            # The container is an overlay of this host, which has the Python dependencies: remove
            # them inside, then `apt-get install ./deb` must bring every one back.
            box.run("apt-get", "remove", "-y", *dependencies, timeout=300,
                    env={"DEBIAN_FRONTEND": "noninteractive"})
            assert box.run(SYSTEM_PYTHON, "-c", "import jinja2", check=False).returncode != 0
            repo = local_repository(workdir / "repo", dependencies, root)
            t0 = time.monotonic()
            apt_output = apt_install_offline(box, repo, deb)
            install_seconds = time.monotonic() - t0
            for package in dependencies:
                status = box.run("dpkg-query", "-W", "-f=${Status}", package, check=False).stdout
                assert status == "install ok installed", f"{package} not pulled in:\n{apt_output}"
            assert box.run("/usr/bin/cyrushelper", "--version").stdout.startswith("cyrushelper ")
            assert modules_without_bytecode(box, SYSTEM_PYTHON) == []  # postinst's py3compile
            assert box.show("cyrus.service", "ActiveState")["ActiveState"] == "inactive"
            assert box.systemctl("is-enabled", "cyrus.service", check=False).stdout.strip() == "disabled"

            # README.Debian's workflow: generate with the installed helper, copy only the drop-in.
            for which in ("replica", "primary"):
                out = workdir / f"units-{which}"
                extra = ["--replica-instance", "replica"] if which == "primary" else []
                box.run("/usr/bin/cyrushelper", "generate", "--instance", which,
                        "--imapd-conf", str(lab.pair.imapd_conf(which)),
                        "--cyrus-conf", str(lab.pair.cyrus_conf(which)), "--output", str(out), *extra)
                packaged = box.run("cat", "/usr/lib/systemd/system/cyrus@.service").stdout
                assert (out / "cyrus@.service").read_text() == packaged, \
                    "the packaged cyrus@.service differs from what generate renders for /usr/bin/cyrushelper"
                box.copy_in(out / f"cyrus@{which}.service.d", f"/etc/systemd/system/cyrus@{which}.service.d")
            box.systemctl("daemon-reload")
            box.systemctl("enable", PRIMARY, REPLICA)
            lab.start(REPLICA, PRIMARY)
            before = {u: invocation(box, u) for u in (PRIMARY, REPLICA)}
            assert lab.state_file("last-drain.json") is None
            first = lab.deliver(50, user="alice", tag="before-upgrade")

            t0 = time.monotonic()
            r = box.run("dpkg", "-i", str(upgrade), timeout=600)
            upgrade_seconds = time.monotonic() - t0
            for unit in (PRIMARY, REPLICA):
                props = box.show(unit, "ActiveState", "InvocationID")
                assert props["ActiveState"] == "active", f"{unit} after upgrade\n{r.stderr}\n{box.journal(unit)[-3000:]}"
                assert props["InvocationID"] != before[unit], f"{unit} was not restarted by the upgrade"
            # one at a time, replica first: it was serving again before the primary began to stop
            assert monotonic(box, REPLICA, "ActiveEnterTimestampMonotonic") <= \
                monotonic(box, PRIMARY, "ActiveExitTimestampMonotonic"), "replica and primary restarted together"
            drain = lab.state_file("last-drain.json")
            assert drain is not None and drain["result"] == "drained", \
                f"the upgrade's restart did not go through a successful drain: {drain}"
            second = lab.deliver(50, user="bob", tag="after-upgrade")

            t0 = time.monotonic()
            r = box.run("dpkg", "-r", "cyrushelper", timeout=600)
            remove_seconds = time.monotonic() - t0
            assert monotonic(box, PRIMARY, "InactiveEnterTimestampMonotonic") <= \
                monotonic(box, REPLICA, "ActiveExitTimestampMonotonic"), "the replica stopped before the primary drained"
            for unit in (PRIMARY, REPLICA):
                props = box.show(unit, "ActiveState", "Result")
                assert (props["ActiveState"], props["Result"]) == ("inactive", "success"), \
                    f"{unit} after removal: {props}\n{r.stderr}\n{box.journal(unit)[-3000:]}"
            assert lab.pending_files() == {"default": []}, "removal left unreplicated sync log events"
            assert lab.state_file("last-drain.json") != drain, "the removal's stop did not drain"
            assert box.run("test", "-e", "/usr/bin/cyrushelper", check=False).returncode != 0

            # Every message acknowledged before and after the upgrade is on the replica: started
            # again for the check as a plain unit (cyrus@.service left with the package).
            name = "cyrus-lab-replica.service"
            box.run("sh", "-c", f"cat > /etc/systemd/system/{name}", input=lab.pair.plain_unit_texts()[name])
            box.systemctl("daemon-reload")
            lab.start(name)
            report = lab.verify(first, second)
            assert report["missing"] == 0, report
            print(f"{release}: deb install {install_seconds:.1f}s, upgrade (restart incl. drain) "
                  f"{upgrade_seconds:.1f}s, remove (stop incl. drain) {remove_seconds:.1f}s; "
                  f"{report.get('summary', report)}")
    finally:
        if not os.environ.get("CYRUSHELPER_KEEP_LAB"):
            shutil.rmtree(workdir, ignore_errors=True)

"""Socket mode end to end (`generate --listeners systemd`): real Cyrus from Debian, run by the
generated units under a real systemd (PID 1 of a throwaway container), what an MTA meets.

- `systemctl restart cyrus@primary` five times under continuous LMTP load, one connection per
  message: no connection refused, reset or cut, nothing acknowledged is missing on the replica;
  master mode measured beside it in the same run (printed), and `status --json` per service;
- a package upgrade (the .deb's postinst try-restarts every instance) under the same load;
- Debian's default cyrus.conf: the units verify silently, on the host's release and, with the
  packages that release lacks refused by file:line, on Debian 13 (systemd 257) with its own
  systemd-analyze, exposure at most 3.0.
The lossless stop itself runs in both modes in test_lossless_stop.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from testbed import images
from testbed.container import SystemdContainer
from testbed.scenario import LabSystem, new_workdir
from tests.conftest import require_container_host, require_root_and_cyrus
from tests.system.test_packaging_deb import built_debs  # noqa: F401 (a fixture, built once per session)

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PRIMARY, REPLICA = "cyrus@primary.service", "cyrus@replica.service"
RESTARTS = 5
# what a client met, beyond 250s: none of these may happen in socket mode during restarts
NEVER_IN_SOCKET_MODE = ("connection_refused", "lost_before_greeting", "dropped_outside_transaction",
                        "cut_in_transaction", "cut_after_end_of_data")   # testbed.mail.OUTCOMES
DISTRIBUTION_UNIT_DIRS = ("/usr/lib/systemd/system/", "/lib/systemd/system/")


@pytest.fixture
def workdirs():
    require_root_and_cyrus()
    require_container_host()
    made: list[Path] = []

    def make(tag: str) -> Path:
        made.append(new_workdir(tag))
        return made[-1]

    yield make
    if not os.environ.get("CYRUSHELPER_KEEP_LAB"):
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def status_json(lab: LabSystem, which: str = "primary") -> dict:
    r = lab.cyrushelper("status", "--instance", which, "--imapd-conf", str(lab.pair.imapd_conf(which)),
                        "--cyrus-conf", str(lab.pair.cyrus_conf(which)), "--json")
    return json.loads(r.stdout)


def restarts_under_load(workdir: Path, mode: str, wheelhouse, release: str) -> dict:
    """Start the pair in `mode` (cyrushelper installed from the wheel), put LMTP load on the primary
    (a connection per message), restart it RESTARTS times, each once deliveries went on after the
    previous one; stop; verify."""
    with SystemdContainer(workdir, root=images.container_root(release)) as box:
        lab = LabSystem(box, workdir, wheelhouse=wheelhouse, rolling=True).create()
        lab.install_cyrushelper_units(listeners=mode)
        lab.start(REPLICA, PRIMARY)
        before = status_json(lab)
        load, record = lab.start_load(seconds=600, connection_per_message=True)
        acked = lab.wait_acknowledged(record, 100, timeout=120)
        assert acked >= 100, "load did not get going"
        seconds = []
        for _ in range(RESTARTS):
            t0 = time.monotonic()
            r = box.systemctl("restart", PRIMARY, check=False, timeout=300)
            seconds.append(round(time.monotonic() - t0, 2))
            assert r.returncode == 0, f"{r.stderr}\n{lab.journal(PRIMARY)[-4000:]}"
            # Counted from the restart's end: acknowledgements before it came from the old workers,
            # whose counts the restart reset. A few the old workers served may still be written to
            # the record after it (the client's own latency), hence 60 waited for, 50 asserted.
            since_restart = lab.wait_acknowledged(record, 0)
            acked = lab.wait_acknowledged(record, since_restart + 60, timeout=120)
            assert acked >= since_restart + 60, f"no deliveries after restart {len(seconds)}"
        during = status_json(lab)
        lab.stop_load(load)
        stats = lab.load_stats(record)
        stop = lab.stop(PRIMARY)
        report = lab.verify(record)
        drain = lab.state_file("last-drain.json")
        return {"mode": mode, "restart_seconds": seconds, "outcomes": stats["outcomes"],
                "max_greeting_wait": stats["max_greeting_wait"], "stop": stop, "report": report,
                "drain": drain, "status_before": before, "status_during": during,
                "journal": lab.journal(PRIMARY)}


# What a restart does differs by systemd (252: Debian 12, 257: Debian 13) in exactly what socket
# mode relies on (which dependencies close or restart a socket), so this runs on both.
@pytest.mark.parametrize("release", images.releases_under_test())
def test_restarts_under_lmtp_load_refuse_no_connection_in_socket_mode(workdirs, wheelhouse, release):
    sockets = restarts_under_load(workdirs(f"restart-systemd-{release}"), "systemd", wheelhouse, release)
    master = restarts_under_load(workdirs(f"restart-master-{release}"), "master", wheelhouse, release)
    for run in (sockets, master):
        print(f"{release} {run['mode']:>7}: {RESTARTS} restarts {run['restart_seconds']} s; client outcomes "
              f"{run['outcomes']}; longest connect-to-greeting {run['max_greeting_wait']} s; "
              f"{run['report']['summary']}")

    for run in (sockets, master):  # both lossless: every acknowledged message is on the replica
        assert run["report"]["missing"] == 0, run["report"]
        assert (run["stop"].result, run["stop"].total_left) == ("success", 0), run["journal"][-3000:]
    outcomes = sockets["outcomes"]
    assert {k: outcomes[k] for k in NEVER_IN_SOCKET_MODE} == {k: 0 for k in NEVER_IN_SOCKET_MODE}, \
        f"socket mode: {outcomes}\n{sockets['journal'][-4000:]}"
    assert outcomes["acknowledged"] == sockets["report"]["acknowledged"]
    assert sockets["journal"].count("restarting: the sockets stay open") == RESTARTS

    # status --json: socket mode per service (the contract), the workers, the connections served
    status = sockets["status_during"]
    assert (status["mode"], status["state"], status["exit_code"]) == ("systemd", "running", 0), status
    services = {s["service"]: s for s in status["services"]}
    assert set(services) == {"imap", "lmtp"}
    lmtp = services["lmtp"]
    assert lmtp["socket"] == "cyrus-primary-lmtp.socket" and lmtp["serves"] == "ok"
    assert lmtp["workers"]["total"] == 10 and lmtp["workers"]["down"] == 0
    assert lmtp["connections_served"] >= 50  # since the last restart (60 acknowledged since)
    fresh = {s["service"]: s["workers"] for s in sockets["status_before"]["services"]}["lmtp"]
    assert fresh["busy"] + fresh["idle"] == 10


def test_package_upgrade_in_socket_mode_refuses_no_connection(workdirs, built_debs):
    """The .deb's upgrade try-restarts every running cyrus@*.service: in socket mode the sockets
    stay open through it (README.Debian's socket-mode steps, with the packaged shared units)."""
    deb, upgrade = built_debs
    workdir = workdirs("upgrade-systemd")
    with SystemdContainer(workdir) as box:
        lab = LabSystem(box, workdir, rolling=True).create()
        box.run("rm", "-f", "/usr/sbin/policy-rc.d")  # the host's would veto the postinst's restart
        box.run("dpkg", "-i", str(deb), timeout=120)
        for which in ("replica", "primary"):
            out = workdir / f"units-{which}"
            extra = ["--replica-instance", "replica"] if which == "primary" else []
            box.run("/usr/bin/cyrushelper", "generate", "--listeners", "systemd", "--instance", which,
                    "--imapd-conf", str(lab.pair.imapd_conf(which)), "--cyrus-conf",
                    str(lab.pair.cyrus_conf(which)), "--output", str(out), *extra, timeout=60)
            # README.Debian: the instance's drop-in and its parts, not the packaged shared units
            box.copy_in(out / f"cyrus@{which}.service.d", f"/etc/systemd/system/cyrus@{which}.service.d")
            for part in sorted(out.glob(f"cyrus-{which}-*")):
                box.copy_in(part, f"/etc/systemd/system/{part.name}")
        box.systemctl("daemon-reload")
        lab.start(REPLICA, PRIMARY)
        before = box.show(PRIMARY, "InvocationID")["InvocationID"]
        load, record = lab.start_load(seconds=600, connection_per_message=True)
        acked = lab.wait_acknowledged(record, 100, timeout=120)
        assert acked >= 100, "load did not get going"

        t0 = time.monotonic()
        r = box.run("dpkg", "-i", str(upgrade), timeout=600)
        upgrade_seconds = time.monotonic() - t0
        assert box.show(PRIMARY, "InvocationID")["InvocationID"] != before, \
            f"the upgrade did not restart the instance\n{r.stdout}\n{r.stderr}"
        assert lab.wait_acknowledged(record, acked + 50, timeout=120) >= acked + 50, "no delivery after"
        lab.stop_load(load)
        stats = lab.load_stats(record)
        stop = lab.stop(PRIMARY)
        report = lab.verify(record)
        journal = lab.journal(PRIMARY)
    print(f"upgrade (restart of both instances in socket mode) {upgrade_seconds:.1f}s; client outcomes "
          f"{stats['outcomes']}; {report['summary']}")
    assert {k: stats["outcomes"][k] for k in NEVER_IN_SOCKET_MODE} == {k: 0 for k in NEVER_IN_SOCKET_MODE}, \
        f"{stats}\n{journal[-4000:]}"
    assert "restarting: the sockets stay open" in journal
    assert report["missing"] == 0 and (stop.result, stop.total_left) == ("success", 0), (report, stop)


def _lint_inside(box: SystemdContainer, directory: Path) -> tuple[str, dict[str, float]]:
    """systemd-analyze verify (all output) and the exposure of each kind of unit, run by the
    container's own systemd (252 on Debian 12, 257 on Debian 13)."""
    units = ["cyrus.service", *sorted(p.name for p in directory.glob("cyrus@*.service"))]
    units += sorted(p.name.replace("@.", "@1.") for p in directory.glob("cyrus-*"))
    r = box.run("sh", "-c", f'cd "$1" && shift && systemd-analyze verify --man=no --generators=no "$@" 2>&1',
                "_", str(directory), *units, check=False)
    # verify also loads what our units order against; a distribution unit's own complaint (Debian
    # 13's saslauthd.service: "PIDFile= references a path below legacy directory /var/run/") is
    # not about ours: shown, not counted
    theirs = [line for line in r.stdout.splitlines() if line.startswith(DISTRIBUTION_UNIT_DIRS)]
    if theirs:
        print("distribution units:", *theirs, sep="\n  ")
    output = "\n".join(line for line in r.stdout.splitlines() if line not in theirs)
    exposure = {}
    for unit in units:
        if unit.endswith(".service") and unit != "cyrus.service":
            s = box.run("sh", "-c", f'cd "$1" && systemd-analyze security --offline=true "$2"', "_",
                        str(directory), unit, check=False)
            m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", s.stdout)
            exposure[unit] = float(m.group(1)) if m else float("nan")
    return output.strip() + ("" if r.returncode == 0 else f" (rc={r.returncode})"), exposure


@pytest.mark.parametrize("release", images.releases_under_test())
def test_debian_default_configuration_in_socket_mode(workdirs, release):
    """The release's own /etc/imapd.conf and /etc/cyrus.conf, with that release's Cyrus packages:
    every entry whose program is installed maps to units that verify silently with the release's
    systemd-analyze and expose at most 3.0; an entry whose package is missing is refused by
    file:line (Debian 13 ships no pop3d, nntpd, httpd in this image)."""
    workdir = workdirs(f"debian-default-{release}")
    # the checkout's cyrushelper run by the release's python3, with the checkout's templates: only
    # generate and the lint run here (the product's install is the other tests' business; the
    # wheelhouse holds the host Python's wheels, not Debian 13's)
    launcher = workdir / "cyrushelper"
    launcher.write_text(f"#!/usr/bin/python3 -I\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                        "from cyrushelper.cli import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    templates = ("--templates", str(ROOT / "templates"))
    with SystemdContainer(workdir, root=images.container_root(release)) as box:
        conf = workdir / "cyrus.conf"
        box.run("cp", "/etc/cyrus.conf", str(conf))
        r = box.run(str(launcher), "generate", "--listeners", "systemd", "--output", str(workdir / "all"),
                    "--helper", str(launcher), *templates, check=False, timeout=60)
        refused = re.findall(r"/etc/cyrus\.conf:(\d+): SERVICES entry '(\w+)': no executable", r.stderr)
        if r.returncode != 0:
            assert r.returncode == 78 and refused, r.stderr
            assert not (workdir / "all").exists(), "a refusal must write nothing"
            lines = conf.read_text().splitlines(keepends=True)
            for number, _ in refused:  # the admin's fix: drop the entries of packages not installed
                lines[int(number) - 1] = "#" + lines[int(number) - 1]
            conf.write_text("".join(lines))
        out = workdir / "units"
        r = box.run(str(launcher), "generate", "--listeners", "systemd", "--cyrus-conf", str(conf),
                    "--unit-cyrus-conf", "/etc/cyrus.conf", "--output", str(out), "--helper", str(launcher),
                    *templates, check=False, timeout=60)
        assert r.returncode == 0, r.stderr
        lint, exposure = _lint_inside(box, out)
        version = box.run("systemctl", "--version").stdout.split("\n")[0]
    print(f"{release} ({version}): refused {[name for _, name in refused] or 'nothing'}; "
          f"{len(list(out.glob('cyrus-*')))} part units; exposure {sorted(set(exposure.values()))}")
    assert lint == "", lint
    assert exposure and max(exposure.values()) <= 3.0, exposure
    if release == images.host_release():
        assert refused == [], "bootstrap installs every package Debian's default cyrus.conf names"

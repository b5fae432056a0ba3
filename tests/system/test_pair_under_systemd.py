"""Foundation: the lab pair runs under a real systemd (PID 1 in a throwaway container) as plain
units, and a message delivered on the primary arrives on the replica — on the host's Debian release
and on the other supported one (a debootstrapped root, testbed/images.py). Nothing of cyrushelper's
stop path is involved: this proves the test bed itself."""

from __future__ import annotations

import shutil
import time

import pytest

from testbed import images
from testbed.container import SystemdContainer
from testbed.scenario import LabSystem, new_workdir
from tests.conftest import require_container_host, require_root_and_cyrus

pytestmark = pytest.mark.system


@pytest.mark.parametrize("release", images.releases_under_test())
def test_pair_as_plain_units_replicates_under_real_systemd(release):
    require_root_and_cyrus()
    require_container_host()
    workdir = new_workdir(f"foundation-{release}")
    try:
        with SystemdContainer(workdir, root=images.container_root(release)) as box:
            assert images.os_release(box.root or "/")["VERSION_CODENAME"] == release
            lab = LabSystem(box, workdir, rolling=True).create()
            units = lab.pair.plain_unit_texts()
            for name, text in units.items():
                box.run("sh", "-c", f"cat > /etc/systemd/system/{name}", input=text)
            box.systemctl("daemon-reload")
            lab.start(*units)
            for name in units:
                assert box.show(name, "ActiveState")["ActiveState"] == "active", box.journal(name)

            record = lab.deliver(20, user="alice", tag="foundation")
            deadline = time.monotonic() + 30
            report = lab.verify(record)
            while report["missing"] and time.monotonic() < deadline:  # the rolling client's ~1 s cycle
                time.sleep(0.5)
                report = lab.verify(record)
            assert (report["acknowledged"], report["present"], report["missing"]) == (20, 20, 0), report
            journal = box.journal("cyrus-lab-primary.service")
            assert "Delivered:" in journal, "Cyrus's syslog lines do not reach the journal"
            version = box.run("/usr/lib/cyrus/bin/master", "-V", check=False).stdout.strip()
            print(f"{release}: container boot {box.boot_seconds:.2f}s, {version}; {report['summary']}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

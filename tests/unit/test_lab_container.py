"""The host-inspection helpers of the systemd container test bed (no root, no container)."""

import os

import pytest

from testbed import container
from testbed.container import (cgroup2_mount, host_enabled_units, needs_bind, parse_bind,
                                       parse_mountinfo, parse_show)

HYBRID = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
25 22 0:21 / /sys/fs/cgroup ro shared:4 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/unified rw shared:5 - cgroup2 cgroup2 rw
27 25 0:23 / /sys/fs/cgroup/systemd rw shared:6 - cgroup cgroup rw,name=systemd
40 22 0:40 / /srv/ci\\040builds rw shared:9 - ext4 /dev/vdb rw
41 22 0:41 / /tmp rw shared:10 - tmpfs tmpfs rw
"""
UNIFIED = "30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup2_mount_hybrid_and_unified():
    assert str(cgroup2_mount(HYBRID)) == "/sys/fs/cgroup/unified"
    assert str(cgroup2_mount(UNIFIED)) == "/sys/fs/cgroup"
    assert cgroup2_mount("22 1 254:0 / / rw - ext4 /dev/vda rw\n") is None


def test_mountinfo_unescapes_spaces():
    assert ("/srv/ci builds", "ext4") in parse_mountinfo(HYBRID)


@pytest.mark.parametrize("path,expected", [
    ("/work/main", False),                 # on the root file system: the overlay shows it
    ("/root/.pyenv/versions/3.11.7", False),
    ("/srv/ci builds/repo", True),         # another mount: invisible in an overlay of /
    ("/tmp/ci/repo", True),                # nspawn mounts its own /tmp
    ("/run/user/0/x", True),
    ("/", False),
])
def test_needs_bind(path, expected):
    mount_points = [mp for mp, _ in parse_mountinfo(HYBRID)]
    assert needs_bind(path, mount_points) is expected


def test_needs_bind_does_not_match_prefix_of_a_longer_name():
    assert needs_bind("/tmpfoo/repo", ["/", "/tmp"]) is False
    assert needs_bind("/srv/cix/repo", ["/", "/srv/ci"]) is False


@pytest.mark.parametrize("spec,expected", [
    ("/a", ("/a", "/a", False)),
    ("/a:/b", ("/a", "/b", False)),
    ("/a:/b:ro", ("/a", "/b", True)),
    ("/a:ro", ("/a", "/a", True)),
    ("/a:/b:rw", ("/a", "/b", False)),
])
def test_parse_bind(spec, expected):
    assert parse_bind(spec) == expected


@pytest.mark.parametrize("spec", ["", "a:/b", "/a:b", "/a:/b:/c", ":ro"])
def test_parse_bind_rejects(spec):
    with pytest.raises(ValueError):
        parse_bind(spec)


def test_parse_show_keeps_equals_in_values():
    assert parse_show("StatusText=a=b\nActiveState=active\n\n") == {
        "StatusText": "a=b", "ActiveState": "active"}


def test_host_enabled_units(tmp_path):
    etc = tmp_path / "etc"
    wants = etc / "systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    for name in ("cyrus-imapd.service", "remote-fs.target", "postgresql.service"):
        (wants / name).symlink_to(f"/lib/systemd/system/{name}")
    timers = etc / "systemd/system/timers.target.wants"
    timers.mkdir()
    (timers / "apt-daily.timer").symlink_to("/lib/systemd/system/apt-daily.timer")
    (tmp_path / "lib/systemd/system").mkdir(parents=True)
    (tmp_path / "lib/systemd/system/dbus.service").write_text("[Service]\n")
    rc3 = etc / "rc3.d"
    rc3.mkdir()
    for name in ("S01exim4", "S01dbus", "K01saslauthd"):
        (rc3 / name).symlink_to(f"../init.d/{name[3:]}")
    # targets are not masked; an rc link is only a unit when no native unit of that name exists
    assert host_enabled_units(str(tmp_path)) == [
        "apt-daily.timer", "cyrus-imapd.service", "exim4.service", "postgresql.service"]


def test_unavailable_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in container.unavailable_reason()

"""The throwaway real systemd test bed (testbed.container): it boots, runs Type=notify
units that use the project's own Notifier, and leaves nothing behind however the test ends."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from testbed.container import SystemdContainer, repository_root

pytestmark = pytest.mark.system

NOTIFY_DEMO = textwrap.dedent('''\
    """A service that drains for DRAIN seconds after SIGTERM, optionally extending the stop timeout."""
    import signal, sys, time
    from cyrushelper.notify import Notifier

    mode, drain = sys.argv[1], float(sys.argv[2])
    notifier = Notifier()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print(f"demo: notify enabled={notifier.enabled}", flush=True)
    notifier.ready(status="serving: 42 messages")
    while not stop:
        time.sleep(0.05)
    print("demo: SIGTERM, draining", flush=True)
    notifier.stopping(status="draining")
    start = time.monotonic()
    while time.monotonic() - start < drain:
        if mode == "extend":
            notifier.extend_timeout(1.5)
        notifier.status(f"draining: {time.monotonic() - start:.1f}s")
        time.sleep(0.5)
    print(f"demo: drained in {time.monotonic() - start:.1f}s", flush=True)
''')

TIMEOUT_STOP = 1.5
DRAIN = 4.0


def notify_unit(python: str, script: Path, mode: str) -> str:
    return textwrap.dedent(f"""\
        [Unit]
        Description=notify demo ({mode})

        [Service]
        Type=notify
        ExecStart={python} {script} {mode} {DRAIN}
        TimeoutStopSec={TIMEOUT_STOP}
        """)


def pid_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def processes_in_pid_namespaces(namespaces: set[str], zombies: bool = True) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns/pid") in namespaces and (zombies or _alive(int(entry.name))):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def namespaces_of(box: SystemdContainer) -> set[str]:
    """The container's PID namespace and the sandbox's one around it."""
    sandbox_init = int(Path(f"/proc/{box.nspawn_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return {pid_namespace(box.leader), pid_namespace(sandbox_init)}


def assert_gone(cgroup: Path, namespaces: set[str], keeper_pid: int | None = None,
                timeout: float = 15) -> float:
    """Wait until the cgroup is removed and no process is left in the namespaces; return seconds."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        left = processes_in_pid_namespaces(namespaces)
        keeper_alive = keeper_pid is not None and _alive(keeper_pid)
        if not cgroup.exists() and not left and not keeper_alive:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"after {timeout}s: cgroup exists={cgroup.exists()}, processes {left} "
                         f"in {namespaces}, keeper alive={keeper_alive}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def assert_host_dev_null_intact():
    st = os.stat("/dev/null")
    assert stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666, oct(st.st_mode)


def test_boots_real_systemd_sees_repo_and_venv_and_cleans_up(tmp_path, container_host):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "hello").write_text("hello from the host\n")
    with SystemdContainer(tmp_path / "box", binds=[f"{tmp_path / 'ro'}:/srv/ro:ro"]) as box:
        cgroup, namespaces = box.cgroup, namespaces_of(box)
        assert box.boot_state == "running", box.failed_units
        assert box.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
        assert box.cgroup.is_dir() and "populated 1" in (box.cgroup / "cgroup.events").read_text()
        # the host's enabled daemons were masked, not started
        assert box.show("cyrus-imapd.service", "LoadState")["LoadState"] == "masked"
        assert box.run("systemctl", "is-active", "cyrus-imapd.service", check=False).stdout.strip() \
            == "inactive"
        # repository and venv at the same paths; the work directory is shared read-write
        probe = box.run(box.python, "-c", "import sys, cyrushelper; print(cyrushelper.__file__); "
                        "print(sys.prefix)").stdout.split()
        assert probe == [str(repository_root() / "cyrushelper" / "__init__.py"), sys.prefix]
        box.run("sh", "-c", f"echo from-inside > {box.workdir}/inside.txt")
        assert (box.workdir / "inside.txt").read_text() == "from-inside\n"
        assert box.run("cat", "/srv/ro/hello").stdout == "hello from the host\n"
        assert box.run("touch", "/srv/ro/x", check=False).returncode != 0
        # writes elsewhere land in the throwaway overlay, not on the host
        box.run("sh", "-c", "echo scratch > /etc/cyrushelper-lab-probe")
        assert not Path("/etc/cyrushelper-lab-probe").exists()
        assert box.run("ls", "-l", "/dev/null").stdout.startswith("crw-rw-rw-")
        # a command that outlives its timeout is killed inside the container as well
        with pytest.raises(subprocess.TimeoutExpired):
            box.run("sleep", "30", timeout=0.5)
        for _ in range(100):   # SIGKILLed at once; systemd reaps the orphan shortly after
            if box.run("ps", "-C", "sleep", "-o", "stat=", check=False).stdout.strip() == "":
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the timed-out command is still running inside")
    print(f"\nMEASURED boot {box.boot_seconds:.2f}s, shutdown {box.shutdown_seconds:.2f}s")
    assert box.halted is True, box.log_tail()   # systemd halted by itself: the keeper killed nothing
    assert_gone(cgroup, namespaces, timeout=0.1)   # already gone when the with block returns
    assert_host_dev_null_intact()


def test_notify_unit_ready_status_and_extended_stop(systemd_container):
    box = systemd_container
    script = box.workdir / "notify_demo.py"
    script.write_text(NOTIFY_DEMO)
    units = box.workdir / "units"
    units.mkdir()
    for mode in ("extend", "plain"):
        (units / f"demo-{mode}.service").write_text(notify_unit(box.python, script, mode))
    assert box.install_units(units) == ["demo-extend.service", "demo-plain.service"]

    for mode in ("extend", "plain"):
        box.systemctl("start", f"demo-{mode}.service")   # returns once READY=1 arrived
        props = box.show(f"demo-{mode}.service", "ActiveState", "SubState", "StatusText", "Type")
        assert props == {"ActiveState": "active", "SubState": "running",
                         "StatusText": "serving: 42 messages", "Type": "notify"}

    stop_seconds, results = {}, {}
    for mode in ("extend", "plain"):
        start = time.monotonic()
        box.systemctl("stop", f"demo-{mode}.service", check=False)
        stop_seconds[mode] = time.monotonic() - start
        results[mode] = box.show(f"demo-{mode}.service", "Result", "ActiveState")
    print(f"\nMEASURED stop with EXTEND_TIMEOUT_USEC {stop_seconds['extend']:.2f}s, without "
          f"{stop_seconds['plain']:.2f}s (TimeoutStopSec={TIMEOUT_STOP}, drain {DRAIN}s)")
    # extended: the whole drain ran, well past TimeoutStopSec, and ended cleanly
    assert stop_seconds["extend"] >= DRAIN
    assert results["extend"] == {"Result": "success", "ActiveState": "inactive"}
    # control: the same service without the extension is killed at TimeoutStopSec
    assert TIMEOUT_STOP <= stop_seconds["plain"] < DRAIN
    assert results["plain"]["Result"] == "timeout"

    extend_log = box.journal("demo-extend.service", output="cat")
    plain_log = box.journal("demo-plain.service", output="cat")
    assert "demo: notify enabled=True" in extend_log
    assert "demo: SIGTERM, draining" in extend_log
    assert "demo: drained in" in extend_log
    assert "demo: SIGTERM, draining" in plain_log and "demo: drained in" not in plain_log
    assert "timed out" in box.journal("demo-plain.service")


def test_install_units_keeps_symlinks_and_dropins_and_copy_in(systemd_container, tmp_path):
    box = systemd_container
    units = tmp_path / "units"
    (units / "lab-a.service.d").mkdir(parents=True)
    (units / "multi-user.target.wants").mkdir()
    (units / "lab-a.service").write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n"
                                         "RemainAfterExit=yes\n")
    (units / "lab-a.service.d" / "override.conf").write_text("[Unit]\nDescription=from drop-in\n")
    (units / "lab-alias.service").symlink_to("lab-a.service")
    (units / "multi-user.target.wants" / "lab-a.service").symlink_to("../lab-a.service")
    (units / "lab-masked.service").symlink_to("/dev/null")
    box.install_units(units)
    assert box.run("readlink", "/etc/systemd/system/lab-alias.service").stdout.strip() == "lab-a.service"
    assert box.show("lab-alias.service", "Id", "Description") == {
        "Id": "lab-a.service", "Description": "from drop-in"}
    assert box.show("lab-masked.service", "LoadState")["LoadState"] == "masked"
    assert "lab-a.service" in box.systemctl("list-dependencies", "--plain", "multi-user.target").stdout
    box.systemctl("start", "lab-alias.service")
    assert box.wait_state("lab-a.service", ["active", "failed"], timeout=10) == "active"

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("payload")
    (tree / "link").symlink_to("sub/f.txt")
    box.copy_in(tree, "/opt/lab/tree")
    box.copy_in(tree / "sub" / "f.txt", "/opt/lab/single.txt")
    assert box.run("cat", "/opt/lab/tree/link", "/opt/lab/single.txt").stdout == "payloadpayload"
    assert box.run("readlink", "/opt/lab/tree/link").stdout.strip() == "sub/f.txt"


def test_cleanup_when_with_block_raises(tmp_path, container_host):
    with pytest.raises(RuntimeError, match="test failure inside"):
        with SystemdContainer(tmp_path / "box") as box:
            cgroup, namespaces = box.cgroup, namespaces_of(box)
            keeper_pid = box.keeper.pid
            raise RuntimeError("test failure inside the with block")
    assert_gone(cgroup, namespaces, keeper_pid, timeout=0.1)
    assert_host_dev_null_intact()


OWNER = textwrap.dedent('''\
    import json, os, sys, time
    from pathlib import Path
    from testbed.container import SystemdContainer
    box = SystemdContainer(Path(sys.argv[1]))
    box.__enter__()
    sandbox_init = int(Path(f"/proc/{box.nspawn_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    info = {"cgroup": str(box.cgroup), "keeper": box.keeper.pid,
            "namespaces": [os.readlink(f"/proc/{p}/ns/pid") for p in (box.leader, sandbox_init)]}
    Path(sys.argv[2]).write_text(json.dumps(info))
    time.sleep(120)
''')


@pytest.mark.parametrize("sig,target", [
    ("SIGTERM", "process"),     # default handler: Python dies without running __exit__
    ("SIGKILL", "process"),
    ("SIGTERM", "group"),       # what timeout(1) or a CI runner's cancel sends
    ("SIGKILL", "group"),
])
def test_cleanup_when_owner_process_is_killed(tmp_path, sig, target, container_host):
    info_file = tmp_path / "info.json"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "box"), str(info_file)],
                             start_new_session=True, cwd=repository_root())
    try:
        deadline = time.monotonic() + 30
        while not info_file.exists():
            assert owner.poll() is None, f"owner died before booting: {owner.returncode}"
            assert time.monotonic() < deadline, "owner did not boot a container in 30 s"
            time.sleep(0.05)
        info = json.loads(info_file.read_text())
        namespaces = set(info["namespaces"])
        assert processes_in_pid_namespaces(namespaces), "container is not running"
        signum = getattr(signal, sig)
        if target == "group":
            os.killpg(owner.pid, signum)
        else:
            os.kill(owner.pid, signum)
        assert owner.wait(timeout=10) == -signum
        seconds = assert_gone(Path(info["cgroup"]), namespaces, info["keeper"])
        print(f"\nMEASURED cleanup after {sig} to the owner's {target}: {seconds:.2f}s")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert_host_dev_null_intact()


def test_sandbox_dies_with_its_keeper(tmp_path, container_host):
    """Even if the keeper itself is SIGKILLed, the sandbox's PID 1 gets a parent-death SIGKILL and
    the kernel takes down its whole PID namespace; the owner then removes the empty cgroup."""
    with SystemdContainer(tmp_path / "box") as box:
        cgroup, namespaces = box.cgroup, namespaces_of(box)
        os.kill(box.keeper.pid, signal.SIGKILL)
        start = time.monotonic()
        # with the keeper gone nobody but the host's init reaps the sandbox's PID 1: a zombie for
        # a moment, holding nothing; what matters is that nothing runs
        while processes_in_pid_namespaces(namespaces, zombies=False) and time.monotonic() - start < 10:
            time.sleep(0.02)
        assert not processes_in_pid_namespaces(namespaces, zombies=False)
        print(f"\nMEASURED sandbox gone {time.monotonic() - start:.2f}s after SIGKILL to the keeper")
        assert cgroup.exists()   # nobody removed it yet: that is left to stop()
        box.stop(quiet=True)
    assert not cgroup.exists()

"""Shared fixtures: a real Cyrus primary + replica per test, a syslog sink, and the root/Cyrus gate.

System tests need root and the Cyrus packages. Without them they skip LOUDLY on a developer
machine, but FAIL when $CI is set: CI must never pass by skipping.

Port bases: every pair gets its own base (ports base+24/143/243/292), starting at
$CYRUSHELPER_TEST_PORT_BASE (default 20000) and stepping by 1000; pytest-xdist workers interleave,
and a base whose ports are busy (another run on this machine) is passed over.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest

from cyrushelper.cyrus import bin_dir as cyrus_bin_dir
from testbed.pair import CyrusPair, Ports, SyslogSink, port_free

PORT_STEP = 1000
PORT_TOP = 65535 - 300


def require_root_and_cyrus() -> None:
    """Skip (loudly) unless running as root with Cyrus installed; fail instead when $CI is set."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    if not (cyrus_bin_dir() / "master").exists():
        problems.append(f"Cyrus not installed (no {cyrus_bin_dir() / 'master'})")
    if not shutil.which("saslpasswd2") and not os.path.exists("/usr/sbin/saslpasswd2"):
        problems.append("saslpasswd2 missing (package sasl2-bin)")
    try:
        pwd.getpwnam("cyrus")
    except KeyError:
        problems.append("user 'cyrus' missing (package cyrus-common)")
    if not problems:
        return
    skip_loudly_or_fail_in_ci("system test needs root + Cyrus: " + "; ".join(problems))


def skip_loudly_or_fail_in_ci(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} -- CI must run every system test, refusing to skip", pytrace=False)
    print(f"\nWARNING: SKIPPING: {reason}", file=sys.stderr)
    warnings.warn(f"SKIPPED system test: {reason}", stacklevel=3)
    pytest.skip(reason)


def require_syslog_capture(sink: SyslogSink) -> None:
    """For a test that asserts the ABSENCE of a Cyrus log line: without capture it would pass blindly."""
    if not sink.capturing:
        skip_loudly_or_fail_in_ci("another process owns /dev/log: Cyrus's log lines are not visible, "
                                  "a probe for a line that must not appear would pass blindly")


@pytest.fixture
def root_and_cyrus() -> None:
    require_root_and_cyrus()


class PortAllocator:
    """Hands out port bases that no other pair of this run (or xdist worker) uses."""

    def __init__(self, start: int, worker: int = 0, workers: int = 1):
        if not 1024 <= start <= PORT_TOP - PORT_STEP:
            raise ValueError(f"port base start {start} out of range")
        self.start = start
        self.worker = worker
        self.workers = max(1, workers)
        self.slots = (PORT_TOP - start) // PORT_STEP + 1
        self.used = 0
        self._lock = threading.Lock()

    def _next_candidate(self) -> int:
        slot = (self.used * self.workers + self.worker) % self.slots
        self.used += 1
        return self.start + slot * PORT_STEP

    def allocate(self) -> int:
        with self._lock:
            for _ in range(self.slots // self.workers + 1):
                base = self._next_candidate()
                if all(port_free(p) for p in Ports.from_base(base).all()):
                    return base
        raise RuntimeError(f"no free port base from {self.start} in steps of {PORT_STEP}")


def _xdist_worker() -> tuple[int, int]:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0
    return index, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


_ports = PortAllocator(int(os.environ.get("CYRUSHELPER_TEST_PORT_BASE", "20000")), *_xdist_worker())


def next_port_base() -> int:
    return _ports.allocate()


@pytest.fixture(scope="session")
def syslog_sink(tmp_path_factory):
    """Cyrus's syslog lines (binds /dev/log unless something already listens there)."""
    require_root_and_cyrus()
    sink = SyslogSink("/dev/log", tmp_path_factory.mktemp("syslog") / "syslog.log").start()
    if not sink.capturing:
        print("\nWARNING: another process owns /dev/log; Cyrus log lines are not visible to tests",
              file=sys.stderr)
    yield sink
    sink.stop()


@pytest.fixture
def cyrus_pair_factory(syslog_sink, request):
    """make(rolling=False, channels=None) -> a freshly created (not started) CyrusPair.

    Every pair gets its own directory and port base; teardown stops every master it started (by
    PID, SIGKILL after a deadline) even when the test failed, then removes the directory (kept
    when $CYRUSHELPER_KEEP_LAB is set).
    """
    pairs: list[CyrusPair] = []
    mark = syslog_sink.mark()

    def make(rolling: bool = False, channels: list[str] | None = None) -> CyrusPair:
        root = Path(tempfile.mkdtemp(prefix="cyrushelper-lab-", dir=os.environ.get("CYRUSHELPER_LAB_DIR")))
        root.chmod(0o755)  # Cyrus runs as user cyrus and must traverse it
        pair = CyrusPair(root, port_base=next_port_base(), rolling=rolling, channels=channels)
        pairs.append(pair)
        return pair.create()

    yield make

    errors = []
    for pair in pairs:
        try:
            for result in pair.stop_all(timeout=10):
                if result.killed:
                    errors.append(f"{pair.root}: {result.which} needed SIGKILL for {result.killed}")
        except Exception as e:  # keep tearing down the others
            errors.append(f"{pair.root}: {e}")
    for pair in pairs:
        # shown by pytest only for failing tests: the pair's own Cyrus log lines
        ours = [line for line in syslog_sink.lines(mark)
                if f"-{pair.port_base}/" in line]
        if ours:
            print(f"--- Cyrus syslog of pair {pair.root} (port base {pair.port_base}) ---")
            print("\n".join(ours[-200:]))
        if not os.environ.get("CYRUSHELPER_KEEP_LAB"):
            shutil.rmtree(pair.root, ignore_errors=True)
    if errors:
        pytest.fail("teardown: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def cyrus_pair(cyrus_pair_factory) -> CyrusPair:
    """A created, not yet started, non-rolling pair (default channel only)."""
    return cyrus_pair_factory()


# ---- throwaway systemd container (helper B) ----

from testbed import images  # noqa: E402
from testbed.container import SystemdContainer, unavailable_reason  # noqa: E402
from testbed.scenario import LabSystem, new_workdir  # noqa: E402


def require_container_host() -> None:
    """Skip (loudly) when not root; fail when $CI is set, or when root but the host lacks a piece."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.geteuid() != 0 and not os.environ.get("CI"):
        print(f"\nWARNING: SKIPPING: systemd container {reason}", file=sys.stderr)
        warnings.warn(f"SKIPPED system test: systemd container {reason}", stacklevel=2)
        pytest.skip(f"systemd container {reason}")
    pytest.fail(f"cannot boot a systemd container: {reason}", pytrace=False)


@pytest.fixture
def container_host() -> None:
    """For tests that build their own SystemdContainer (binds, masks, kill tests)."""
    require_container_host()


@pytest.fixture
def systemd_container(tmp_path):
    """A booted SystemdContainer (real systemd as PID 1; see testbed/container.py), halted
    and its cgroup removed afterwards. Its journal is printed at teardown (pytest shows it for
    failing tests)."""
    require_container_host()
    with SystemdContainer(tmp_path / "container") as box:
        yield box
        try:
            journal = box.journal()[-20000:]
        except Exception as e:  # the container may be what the test broke
            journal = f"(no journal: {e})"
        print(f"--- container journal (boot {box.boot_seconds:.2f}s) ---\n{journal}")


# ---- the product as users install it (testbed/product.py) ----

@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory):
    """The wheel of this checkout plus every dependency's wheel, built once per session on the host
    (containers have no network); LabSystem installs it into a fresh venv under /opt per container."""
    require_root_and_cyrus()
    from testbed.product import build_wheelhouse
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


# ---- the pair under cyrushelper's units in a throwaway systemd (testbed.scenario) ----

PRIMARY = "cyrus@primary.service"
REPLICA = "cyrus@replica.service"


@pytest.fixture
def release(request) -> str:
    """The Debian release a container boots: the host's own, unless a test is parametrized with
    `pytest.mark.parametrize("release", images.releases_under_test(), indirect=True)`."""
    return getattr(request, "param", images.host_release())


@pytest.fixture
def lab_factory(request, wheelhouse, release):
    """make(rolling=True, ...) -> a LabSystem (pair created, cyrushelper installed from the wheel
    into /opt/cyrushelper) in a freshly booted container of `release` (testbed.scenario: the pair run
    by systemd units, the end-to-end tests' test bed)."""
    require_root_and_cyrus()
    require_container_host()
    made = []

    def make(rolling: bool = True, **kwargs) -> LabSystem:
        workdir = new_workdir(request.node.name[:40].replace("[", "-").replace("]", ""))
        container = SystemdContainer(workdir, root=images.container_root(release)).__enter__()
        made.append((workdir, container))
        return LabSystem(container, workdir, wheelhouse=wheelhouse, rolling=rolling, **kwargs).create()

    yield make
    for workdir, container in made:
        try:
            print(f"--- journal of {workdir} ---\n{container.journal()[-15000:]}")
        except Exception as e:  # the container may be what broke
            print(f"(no journal: {e})")
        container.__exit__(None, None, None)
        if not os.environ.get("CYRUSHELPER_KEEP_LAB"):
            shutil.rmtree(workdir, ignore_errors=True)


def started(lab: LabSystem, **kwargs) -> LabSystem:
    """cyrushelper's units installed, replica and primary started."""
    lab.install_cyrushelper_units(**kwargs)
    lab.start(REPLICA, PRIMARY)
    return lab


def until(condition, timeout: float, what: str):
    """Poll `condition()` until it returns something true (returned) or fail after `timeout`
    seconds, naming `what` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}", pytrace=False)
        time.sleep(0.1)


# ---- a Cyrus binary directory of do-nothing programs (socket mode's plan and units) ----

FAKE_CYRUS_PROGRAMS = ("imapd", "lmtpd", "pop3d", "nntpd", "httpd", "timsieved", "notifyd", "sync_client",
                       "sync_server", "ctl_cyrusdb", "cyr_expire", "tls_prune", "idled", "squatter")


@pytest.fixture
def fake_cyrus_bindir(tmp_path, monkeypatch) -> Path:
    """Every program Debian's and the lab's cyrus.conf name, as executables that do nothing (the
    plan resolves them, systemd-analyze verify wants them to exist), found through
    $CYRUSHELPER_CYRUS_BINDIR."""
    d = tmp_path / "cyrusbin"
    d.mkdir()
    for name in FAKE_CYRUS_PROGRAMS:
        (d / name).write_text("#!/bin/sh\n")
        (d / name).chmod(0o755)
    monkeypatch.setenv("CYRUSHELPER_CYRUS_BINDIR", str(d))
    return d

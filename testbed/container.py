"""A throwaway real systemd (PID 1 in a systemd-nspawn container) for system tests.

    with SystemdContainer(tmp_path) as box:
        box.install_units(units_dir)
        box.systemctl("start", "foo.service")
        box.wait_state("foo.service", "active")
        print(box.journal("foo.service"))

Layout:

    test process ──pipe──> keeper (this module run as a script; own session, outside the
                           │        cgroup, child subreaper: cleans up on pipe EOF)
                           └─ unshare: private mount + cgroup + PID namespaces, in a fresh
                              cgroup-v2 child CGROUP of the host's cgroup2 mount
                                └─ PID 1: testbed/sandbox.sh init -- cgroup2 on /sys/fs/cgroup,
                                   tmpfs /run, overlay(lower=/ or ROOT, upper=tmpfs)
                                     └─ systemd-nspawn --boot  ─>  systemd (the container)

The container sees the host's whole root file system through the overlay (Cyrus, the venv, the
repository) and nothing it writes persists. Paths the overlay cannot show -- other mounts, or
/tmp, /run, /dev where nspawn mounts its own file systems -- are bound at the same path: the
work directory read-write, the repository and the Python installation read-only.

Cleanup is the keeper's job, so it also happens when the test process dies without running any
Python code (SIGKILL, or SIGTERM with the default handler): the keeper sees EOF on its pipe, writes
1 to CGROUP/cgroup.kill, reaps what it killed and removes CGROUP. The owner starts the keeper in a
session of its own, so signals sent to the owner's process group (timeout(1), a CI cancel) do not
reach it; SIGTERM/SIGINT/SIGHUP sent to the keeper itself also clean up. Should the keeper be
SIGKILLed, parent-death signals take down the sandbox's PID 1 and with it the whole PID namespace;
only an empty cgroup directory is left, which stop() or the next container start removes.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

SANDBOX_SCRIPT = Path(__file__).with_name("sandbox.sh")
CGROUP_PREFIX = "cyrushelper-lab."
SYSTEMD_UNIT_DIR = "/etc/systemd/system"

# Host daemons that must not start in a container booted from the host's root, whatever the
# host has enabled (discovered ones are added by host_enabled_units()).
ALWAYS_MASKED = (
    "cyrus-imapd.service", "exim4.service", "postgresql.service", "postgresql@.service",
    "saslauthd.service", "rsync.service",
    # a getty on nspawn's console pipe would respawn forever
    "console-getty.service",
)
MASKABLE_SUFFIXES = (".service", ".socket", ".timer", ".path")
HALT_DEADLINE = 15   # seconds stop() waits for systemd to halt before the keeper kills the rest

# Directories nspawn replaces with its own file systems: host files there are invisible inside.
NSPAWN_OWN_MOUNTS = ("/tmp", "/run", "/dev", "/proc", "/sys")

CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
}


class ContainerError(RuntimeError):
    pass


class ContainerCommandError(subprocess.CalledProcessError):
    """A command in the container failed; unlike CalledProcessError its text shows the output."""

    def __str__(self) -> str:
        text = super().__str__()
        for name, out in (("stdout", self.stdout), ("stderr", self.stderr)):
            if out and out.strip():
                text += f"\n--- {name} ---\n{out.strip()[-3000:]}"
        return text


# ---------------------------------------------------------------- host inspection (pure, testable)

def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) for each line of /proc/PID/mountinfo."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 = space
        mounts.append((mount_point, right.split()[0]))
    return mounts


def cgroup2_mount(mountinfo: str | None = None) -> Path | None:
    """The host's cgroup-v2 mount: /sys/fs/cgroup on a pure-unified host, /sys/fs/cgroup/unified
    on a hybrid one."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    points = [mp for mp, fstype in parse_mountinfo(mountinfo) if fstype == "cgroup2"]
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in points:
            return Path(preferred)
    return Path(points[0]) if points else None


def mount_point_of(path: str, mount_points: Iterable[str]) -> str:
    """The longest mount point that is `path` or one of its parents."""
    best = "/"
    for mp in mount_points:
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
            best = mp
    return best


def needs_bind(path: str, mount_points: Iterable[str]) -> bool:
    """True when the container cannot see `path` through the overlay of the host's root file
    system: it lives on another mount, or under a directory nspawn mounts its own file system on."""
    path = os.path.realpath(path)
    if path == "/":
        return False
    if any(path == d or path.startswith(d + "/") for d in NSPAWN_OWN_MOUNTS):
        return True
    return mount_point_of(path, mount_points) != "/"


def host_enabled_units(root: str = "/") -> list[str]:
    """Units the host's administrator enabled (/etc/systemd/system/*.wants, SysV rc links):
    booting the host's root would start them, so the container masks them."""
    found = set()
    etc = Path(root, "etc")
    for wants in (etc / "systemd/system").glob("*.wants"):
        for entry in wants.iterdir():
            if entry.name.endswith(MASKABLE_SUFFIXES):
                found.add(entry.name)
    # systemd-sysv-generator turns an rc link into a wanted unit only if no native unit exists
    unit_dirs = [Path(root, d) for d in ("etc/systemd/system", "lib/systemd/system",
                                         "usr/lib/systemd/system")]
    for rc in etc.glob("rc[2345S].d"):
        for link in rc.iterdir():
            m = re.match(r"S\d\d(.+)$", link.name)
            if m and not any((d / f"{m.group(1)}.service").exists() for d in unit_dirs):
                found.add(m.group(1) + ".service")
    return sorted(found)


def parse_bind(spec: str) -> tuple[str, str, bool]:
    """'SRC[:DST][:ro]' -> (src, dst, read_only)."""
    parts = spec.split(":")
    read_only = parts[-1] == "ro"
    if read_only or parts[-1] == "rw":
        parts = parts[:-1]
    if not parts or len(parts) > 2 or not parts[0]:
        raise ValueError(f"bind spec {spec!r}: expected SRC[:DST][:ro]")
    src = parts[0]
    dst = parts[1] if len(parts) == 2 and parts[1] else src
    if not (src.startswith("/") and dst.startswith("/")):
        raise ValueError(f"bind spec {spec!r}: paths must be absolute")
    return src, dst, read_only


def parse_show(text: str) -> dict[str, str]:
    props = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return props


def repository_root() -> Path:
    """The checkout (or installation) this package runs from."""
    return Path(__file__).resolve().parents[1]


def unavailable_reason() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    for tool in ("systemd-nspawn", "nsenter", "unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} not found (systemd-nspawn: package systemd-container, see scripts/bootstrap.sh)"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed (/lib/systemd/systemd)"
    cg = cgroup2_mount()
    if cg is None:
        return "no cgroup2 file system mounted"
    if tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) < (5, 14):
        return f"kernel {os.uname().release} has no cgroup.kill (needs Linux >= 5.14)"
    return None


# ---------------------------------------------------------------- the container

class SystemdContainer:
    """A real systemd as PID 1 in a throwaway container; use as a context manager.

    workdir       host directory for the container's log (container.log); bound read-write at
                  the same path inside, so tests can exchange files through it
    binds         extra bind mounts, 'SRC[:DST][:ro]'
    mask          extra units to mask at boot (the host's enabled units are always masked)
    boot_timeout  seconds for systemd to reach running/degraded
    network_namespace  a network namespace file to join instead of a private loopback-only network

    After boot: leader (host PID of the container's PID 1), cgroup (host path of the sandbox
    cgroup), boot_seconds, boot_state, failed_units, python (the interpreter to use inside),
    masked; after exit: shutdown_seconds.
    """

    def __init__(self, workdir: Path, binds: Iterable[str] = (), mask: Iterable[str] = (),
                 boot_timeout: float = 60, root: str | Path | None = None,
                 network_namespace: Path | None = None):
        self.workdir = Path(workdir).resolve()
        self.extra_binds = list(binds)
        self.extra_mask = list(mask)
        self.boot_timeout = boot_timeout
        # None: a private network with only loopback; else join this network namespace (a file
        # made by testbed.network), so that containers can talk over a link of their own
        self.network_namespace = network_namespace
        # the container's root: an overlay of the host's `/` (None), or of another Debian release's
        # root file system (testbed.images), which sees nothing of the host but what is bound in
        self.root = Path(root).resolve() if root is not None and Path(root).resolve() != Path("/") else None
        # the interpreter for test-bed commands inside (python -m testbed …) and its environment
        if self.root is None:
            self.python, self.python_env = sys.executable, {}
        else:
            self.python, self.python_env = "/usr/bin/python3", {"PYTHONPATH": str(repository_root())}
        self.log_path = self.workdir / "container.log"
        self.cgroup: Path | None = None
        self.leader: int | None = None
        self.nspawn_pid: int | None = None
        self.keeper: subprocess.Popen | None = None
        self.boot_seconds: float | None = None
        self.shutdown_seconds: float | None = None
        self.halted: bool | None = None   # stop(): systemd emptied its cgroup within HALT_DEADLINE
        self.boot_state: str | None = None
        self.failed_units: list[str] = []
        self.masked: list[str] = []
        self.binds: list[tuple[str, str, bool]] = []
        self._pipe_w: int | None = None
        self._log_file = None

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> SystemdContainer:
        try:
            self.start()
        except BaseException:
            self.stop(quiet=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(quiet=exc_type is not None)

    def start(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise ContainerError(f"cannot boot a systemd container: {reason}")
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cg_root = cgroup2_mount()
        remove_stale_cgroups(cg_root)
        self.cgroup = cg_root / f"{CGROUP_PREFIX}{os.getpid()}.{secrets.token_hex(3)}"
        self.binds = self._all_binds()
        self.masked = sorted({*ALWAYS_MASKED, *host_enabled_units(str(self.root or "/")), *self.extra_mask})
        nspawn_args = self._nspawn_args()
        self._log_file = open(self.log_path, "ab")
        read_end, self._pipe_w = os.pipe()   # both ends close-on-exec; only the keeper gets read_end
        try:
            self.keeper = subprocess.Popen(
                [sys.executable, "-S", __file__, "keeper", str(self.cgroup), str(self.root or "/"),
                 *nspawn_args],
                stdin=read_end, stdout=self._log_file, stderr=self._log_file,
                start_new_session=True)
        finally:
            os.close(read_end)
        deadline = t0 + self.boot_timeout
        self.leader = self._wait_for_leader(deadline)
        self.nspawn_pid = _ppid(self.leader)
        while not Path(f"/proc/{self.leader}/root/run/systemd/private").exists():
            self._check_alive("booting")
            if time.monotonic() > deadline:
                raise ContainerError(f"systemd did not open its private bus\n{self.log_tail()}")
            time.sleep(0.02)
        remaining = max(1.0, deadline - time.monotonic())
        r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=remaining)
        self.boot_state = r.stdout.strip()
        self.boot_seconds = time.monotonic() - t0
        if self.boot_state not in ("running", "degraded"):
            raise ContainerError(f"container boot ended in state {self.boot_state!r} "
                                 f"{r.stderr.strip()}\n{self.log_tail()}")
        if self.boot_state == "degraded":
            failed = self.systemctl("list-units", "--failed", "--plain", "--no-legend", check=False)
            self.failed_units = [line.split()[0] for line in failed.stdout.splitlines() if line.split()]

    def stop(self, quiet: bool = False) -> None:
        """Halt systemd (SIGTERM to nspawn = SIGRTMIN+3 to the container), then let the keeper kill
        whatever is left in the cgroup and remove it. Idempotent; raises ContainerError when the
        cgroup could not be removed (unless `quiet`)."""
        t0 = time.monotonic()
        if self.nspawn_pid and self.cgroup and _populated(self.cgroup):
            _signal(self.nspawn_pid, signal.SIGTERM)
            deadline = t0 + HALT_DEADLINE
            while _populated(self.cgroup) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.shutdown_seconds = time.monotonic() - t0
            self.halted = not _populated(self.cgroup)   # else the keeper kills what is left
        if self._pipe_w is not None:
            os.close(self._pipe_w)   # the keeper's cue
            self._pipe_w = None
        problem = None
        if self.keeper is not None:
            try:
                self.keeper.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait()
            if self.keeper.returncode != 0:
                problem = f"keeper exited with {self.keeper.returncode}"
            self.keeper = None
        if self.cgroup is not None and self.cgroup.exists():
            _kill_and_remove_cgroup(self.cgroup)   # keeper failed: do its job here
            if self.cgroup.exists():
                problem = f"could not remove cgroup {self.cgroup}"
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.leader = None
        if problem and not quiet:
            raise ContainerError(f"container cleanup: {problem}\n{self.log_tail()}")

    # -------------------------------------------------------------- talking to the container

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            input: str | bytes | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run `cmd` inside the container (all its namespaces, a clean environment plus `env`).
        stdout/stderr are text. On timeout the command is killed and TimeoutExpired raised."""
        if self.leader is None:
            raise ContainerError("container is not running")
        argv = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--",
                # the command dies with nsenter, so a timeout here leaves nothing running inside
                "setpriv", "--pdeathsig", "KILL", "--", *[str(c) for c in cmd]]
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**CONTAINER_ENV, **(env or {})})
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(list(cmd), timeout, _text(out), _text(err)) from None
        result = subprocess.CompletedProcess(list(cmd), proc.returncode, _text(out), _text(err))
        if check and result.returncode != 0:
            raise ContainerCommandError(result.returncode, list(cmd), result.stdout, result.stderr)
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def journal(self, unit: str | None = None, since_boot: bool = True,
                output: str = "short-precise") -> str:
        """journalctl text (everything journald received so far: it is synced first)."""
        self.run("journalctl", "--sync", check=False)
        args = ["journalctl", "--no-pager", "-q", "-o", output]
        if since_boot:
            args.append("-b")
        if unit:
            args += ["-u", unit]
        return self.run(*args, check=False).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p PROP…` as a dict (all properties when none are named)."""
        args = ["show", unit]
        if props:
            args += ["-p", ",".join(props)]
        return parse_show(self.systemctl(*args).stdout)

    def wait_state(self, unit: str, states: str | Iterable[str], timeout: float = 30,
                   interval: float = 0.05) -> str:
        """Wait until the unit's ActiveState or SubState is one of `states`; return it."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            props = self.show(unit, "ActiveState", "SubState")
            for value in (props.get("ActiveState"), props.get("SubState")):
                if value in wanted:
                    return value
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{unit}: still {props.get('ActiveState')}/{props.get('SubState')} after "
                    f"{timeout}s, wanted {sorted(wanted)}\n{self.journal(unit)[-3000:]}")
            time.sleep(interval)

    def copy_in(self, src: str | Path, dst: str | Path) -> None:
        """Copy a file, symlink or directory tree from the host to path `dst` in the container
        (parents created; symlinks stay symlinks; owner root)."""
        dst = Path(dst)
        self._untar_inside(_tar_of([(Path(src), dst.name)]), str(dst.parent))

    def install_units(self, paths_or_dir: str | Path | Iterable[str | Path]) -> list[str]:
        """Copy unit files into /etc/systemd/system -- with symlinks (aliases, *.wants entries,
        masks) kept as symlinks and drop-in/*.wants directories as trees -- then daemon-reload.
        Takes a directory (its entries are installed) or a list of paths. Returns the names."""
        if isinstance(paths_or_dir, (str, Path)) and Path(paths_or_dir).is_dir() \
                and not Path(paths_or_dir).name.endswith((".d", ".wants", ".requires")):
            paths = sorted(Path(paths_or_dir).iterdir())
        elif isinstance(paths_or_dir, (str, Path)):
            paths = [Path(paths_or_dir)]
        else:
            paths = [Path(p) for p in paths_or_dir]
        self._untar_inside(_tar_of([(p, p.name) for p in paths]), SYSTEMD_UNIT_DIR)
        self.systemctl("daemon-reload")
        return [p.name for p in paths]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return "--- container.log ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -------------------------------------------------------------- internals

    def _untar_inside(self, archive: bytes, directory: str) -> None:
        self.run("sh", "-c", 'mkdir -p "$1" && exec tar -x --overwrite -C "$1" -f -', "_", directory,
                 input=archive)

    def _all_binds(self) -> list[tuple[str, str, bool]]:
        mount_points = [mp for mp, _ in parse_mountinfo(Path("/proc/self/mountinfo").read_text())]
        binds = [(str(self.workdir), str(self.workdir), False)]
        if self.root is not None:  # another release: only the test bed's source is needed inside
            binds.append((str(repository_root()), str(repository_root()), True))
            return binds + [parse_bind(spec) for spec in self.extra_binds]
        # what a test runs inside: this repository and the Python installation behind sys.executable
        for path in (repository_root(), Path(sys.prefix), Path(sys.base_prefix),
                     Path(sys.executable).resolve().parent):
            real = str(path.resolve())
            if needs_bind(real, mount_points) and not any(real == d or real.startswith(d + "/")
                                                          for _, d, _ in binds):
                binds.append((real, real, True))
        binds += [parse_bind(spec) for spec in self.extra_binds]
        return binds

    def _nspawn_args(self) -> list[str]:
        network = (f"--network-namespace-path={self.network_namespace}" if self.network_namespace
                   else "--private-network")
        args = ["--quiet", "--register=no", "--keep-unit", network,
                "--console=pipe", "--link-journal=no", "--machine=cyrushelper-lab",
                # the host's persistent journal stays out; the container's own is thrown away
                "--tmpfs=/var/log/journal"]
        for src, dst, read_only in self.binds:
            args.append(f"--bind{'-ro' if read_only else ''}={src}:{dst}")
        args.append("--boot")
        args += [f"systemd.mask={unit}" for unit in self.masked]
        return args

    def _wait_for_leader(self, deadline: float) -> int:
        while True:
            self._check_alive("starting")
            for pid in _cgroup_pids(self.cgroup):
                if _is_container_init(pid):
                    return pid
            if time.monotonic() > deadline:
                raise ContainerError(f"systemd did not start in the container\n{self.log_tail()}")
            time.sleep(0.01)

    def _check_alive(self, phase: str) -> None:
        if self.keeper is not None and self.keeper.poll() is not None:
            raise ContainerError(f"container sandbox exited ({self.keeper.returncode}) while "
                                 f"{phase}\n{self.log_tail()}")
        if self.leader is not None and not Path(f"/proc/{self.leader}").exists():
            raise ContainerError(f"container systemd died while {phase}\n{self.log_tail()}")


# ---------------------------------------------------------------- cgroup and /proc helpers

def _text(data: bytes | None) -> str:
    return (data or b"").decode(errors="replace")


def _tar_of(entries: list[tuple[Path, str]]) -> bytes:
    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, name in entries:
            if not path.exists() and not path.is_symlink():
                raise FileNotFoundError(path)
            tar.add(str(path), arcname=name, recursive=True, filter=as_root)  # symlinks not followed
    return buf.getvalue()


def _cgroup_pids(cgroup: Path) -> list[int]:
    pids = []
    for procs in cgroup.glob("**/cgroup.procs"):
        try:
            pids += [int(p) for p in procs.read_text().split()]
        except OSError:
            pass
    return pids


def _is_container_init(pid: int) -> bool:
    """systemd as PID 1 of a PID namespace nested two levels below ours (sandbox, container)."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "systemd":
            return False
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    m = re.search(r"^NSpid:\s*(.+)$", status, re.M)
    nspids = m.group(1).split() if m else []
    return len(nspids) >= 3 and nspids[-1] == "1"


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _populated(cgroup: Path) -> bool:
    try:
        return "populated 1" in (cgroup / "cgroup.events").read_text()
    except OSError:
        return False


def _kill_and_remove_cgroup(cgroup: Path, timeout: float = 10, reap: bool = False) -> None:
    try:
        (cgroup / "cgroup.kill").write_text("1")
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    while _populated(cgroup) and time.monotonic() < deadline:
        time.sleep(0.01)
    while reap:   # zombies leave the cgroup at exit; their parent (us, as subreaper) reaps them
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    for d in sorted((p for p in cgroup.glob("**/") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            d.rmdir()
        except OSError:
            pass


def remove_stale_cgroups(cg_root: Path) -> list[Path]:
    """Remove empty sandbox cgroups whose owner process is gone (left when a keeper was SIGKILLed)."""
    removed = []
    for cg in cg_root.glob(CGROUP_PREFIX + "*"):
        m = re.match(re.escape(CGROUP_PREFIX) + r"(\d+)\.", cg.name)
        if not m or Path(f"/proc/{m.group(1)}").exists() or _populated(cg):
            continue
        _kill_and_remove_cgroup(cg, timeout=1)
        if not cg.exists():
            removed.append(cg)
    return removed


# ---------------------------------------------------------------- the keeper process

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


class _Stop(Exception):
    pass


def keeper_main(cgroup: Path, lower: str, nspawn_args: list[str]) -> int:
    """Start the sandbox in `cgroup`, wait for EOF on stdin, then kill, reap and remove it all."""
    def stop(signum, frame):
        raise _Stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    # orphans of the sandbox (its PID 1 once unshare is gone) are reparented to us, and reaped
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    cgroup.mkdir()

    def enter_sandbox_cgroup():   # in the child, before exec (the keeper is single-threaded)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        (cgroup / "cgroup.procs").write_text("0")

    try:
        subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--cgroup", "--pid", "--fork",
             "--kill-child=KILL", "--mount-proc",
             "bash", str(SANDBOX_SCRIPT), "init", str(cgroup), lower, *nspawn_args],
            stdin=subprocess.DEVNULL, preexec_fn=enter_sandbox_cgroup)
        while os.read(0, 4096):   # EOF: the owner closed the pipe, or died
            pass
    except _Stop:
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)   # finish the cleanup whatever comes now
        _kill_and_remove_cgroup(cgroup, reap=True)
    if cgroup.exists():
        print(f"keeper: could not remove {cgroup}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "keeper":
        sys.exit("usage: container.py keeper CGROUP LOWERDIR NSPAWN-ARGS...")
    sys.exit(keeper_main(Path(sys.argv[2]), sys.argv[3], sys.argv[4:]))

"""A real Cyrus primary + replica on loopback, built from scratch: the project's own test bed.

`CyrusPair(root, port_base)` renders the config templates shipped in `testbed/pair/`
(placeholders `@NAME@`) into `root/primary` and `root/replica`, adds the SASL users and hands the
trees to `cyrus:mail`. It can run both masters directly on the host (own session each, stopped by
PID with a deadline), drain the primary with a bare `sync_client -R -1` loop (the baseline the
product is measured against) and render two plain systemd units for a throwaway container.

Cyrus logs only to syslog: `SyslogSink` listens on /dev/log when nobody else does, so tests can
grep Cyrus's own lines.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cyrushelper import cyrus
from cyrushelper.config import Channel, Instance
from cyrushelper.proc import alive, cmdline, session_members
from cyrushelper.synclog import Backlog, backlog, pending_files

WHICH = ("primary", "replica")
USERS = {"admin": "adminpass", "alice": "alicepass", "bob": "bobpass", "repl": "replpass"}
CYRUS_USER = "cyrus"
CYRUS_GROUP = "mail"
REALMS = {"primary": "primary.test", "replica": "replica.test"}
LOOPBACK = "127.0.0.1"

_PLACEHOLDER_RE = re.compile(r"@[A-Z_]+@")
_CHANNEL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


class LabError(Exception):
    """The test bed could not be built, started or stopped as asked."""


@dataclass(frozen=True)
class Ports:
    primary_imap: int
    primary_lmtp: int
    replica_imap: int
    replica_sync: int
    sync_relay: int      # a throttling relay to replica_sync (testbed.relay), when the pair uses one

    @classmethod
    def from_base(cls, base: int) -> Ports:
        return cls(primary_imap=base + 143, primary_lmtp=base + 24,
                   replica_imap=base + 243, replica_sync=base + 292, sync_relay=base + 293)

    def all(self) -> list[int]:
        return [self.primary_imap, self.primary_lmtp, self.replica_imap, self.replica_sync, self.sync_relay]


@dataclass(frozen=True)
class StopResult:
    which: str
    pid: int | None
    seconds: float
    clean: bool                     # master and its whole session exited on their own in time
    killed: tuple[int, ...] = ()    # PIDs that needed SIGKILL after the deadline
    was_running: bool = True


@dataclass(frozen=True)
class DrainResult:
    rounds: int
    seconds: float
    complete: bool                            # no log / log-run left on any channel
    left: dict[str, tuple[str, ...]] = field(default_factory=dict)  # channel label -> files left
    timed_out: bool = False


# --------------------------------------------------------------------------- rendering

def template_text(name: str) -> str:
    """A shipped config template (package data in testbed/pair/)."""
    return resources.files("testbed").joinpath("pair", name).read_text(encoding="utf-8")


def fill(template: str, values: dict[str, str], name: str = "template") -> str:
    """Replace every `@KEY@`; a placeholder without a value is an error, not a silent leftover."""
    def replace(m: re.Match) -> str:
        key = m.group(0)[1:-1]
        if key not in values:
            raise LabError(f"{name}: no value for placeholder {m.group(0)}")
        return values[key]
    return _PLACEHOLDER_RE.sub(replace, template)


def _check_channels(channels: list[str] | None) -> list[str] | None:
    if channels is None:
        return None
    if not channels:
        raise LabError("channels must name at least one channel (use \"\" for the default one)")
    if len(set(channels)) != len(channels):
        raise LabError(f"duplicate channel in {channels!r}")
    for name in channels:
        if name and not _CHANNEL_NAME_RE.fullmatch(name):
            raise LabError(f"bad channel name {name!r} (letters, digits, _ . - only)")
    return list(channels)


LAB_CONFIG_FILES = {
    # file name: (which, kind, rolling)
    "primary-imapd.conf": ("primary", "imapd", False),
    "primary-cyrus.conf": ("primary", "cyrus", False),
    "primary-cyrus-rolling.conf": ("primary", "cyrus", True),
    "replica-imapd.conf": ("replica", "imapd", False),
    "replica-cyrus.conf": ("replica", "cyrus", False),
}


def write_lab_configs(directory: os.PathLike | str, root: str = "/srv/cyrus-lab",
                      port_base: int = 11000) -> Path:
    """The pair's configuration files for `root`, rendered exactly as create() would, into
    `directory` (named as in LAB_CONFIG_FILES) for tests that only parse them. Returns directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rendered = {rolling: CyrusPair(root, port_base=port_base, rolling=rolling).render()
                for rolling in (False, True)}
    for name, (which, kind, rolling) in LAB_CONFIG_FILES.items():
        (directory / name).write_text(rendered[rolling][f"{which}/{kind}.conf"], encoding="utf-8")
    return directory


# --------------------------------------------------------------------------- processes

def port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_greeting(port: int, prefix: bytes, timeout: float, host: str = LOOPBACK,
                      still_running=lambda: True) -> float:
    """Seconds until a server on `port` greets with `prefix`; LabError after `timeout`."""
    start = time.monotonic()
    last = "no attempt"
    while True:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                greeting = s.recv(200)
            if greeting.startswith(prefix):
                return time.monotonic() - start
            last = f"unexpected greeting {greeting[:60]!r}"
        except OSError as e:
            last = str(e)
        if not still_running():
            raise LabError(f"server for port {port} exited before greeting ({last})")
        if time.monotonic() - start > timeout:
            raise LabError(f"no {prefix.decode()!r} greeting on {host}:{port} within {timeout}s ({last})")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the pair

class CyrusPair:
    """Primary + replica Cyrus 3.6 instances under `root`, on loopback ports derived from port_base."""

    def __init__(self, root: os.PathLike | str, port_base: int = 11000, rolling: bool = False,
                 channels: list[str] | None = None, sync_relay: bool = False):
        """sync_relay: the primary replicates through ports.sync_relay (start testbed.relay there)."""
        self.root = Path(root).absolute()
        self.sync_relay = sync_relay
        self.port_base = int(port_base)
        if not 1024 <= self.port_base <= 65535 - 300:
            raise LabError(f"port_base {port_base} out of range (1024..65235)")
        self.rolling = rolling
        self.channels = _check_channels(channels)
        self.ports = Ports.from_base(self.port_base)
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, object] = {}

    # -- paths
    def dir(self, which: str) -> Path:
        if which not in WHICH:
            raise LabError(f"which must be one of {WHICH}, not {which!r}")
        return self.root / which

    @property
    def primary_imapd_conf(self) -> Path:
        return self.root / "primary" / "imapd.conf"

    @property
    def primary_cyrus_conf(self) -> Path:
        return self.root / "primary" / "cyrus.conf"

    @property
    def replica_imapd_conf(self) -> Path:
        return self.root / "replica" / "imapd.conf"

    @property
    def replica_cyrus_conf(self) -> Path:
        return self.root / "replica" / "cyrus.conf"

    def imapd_conf(self, which: str) -> Path:
        return self.dir(which) / "imapd.conf"

    def cyrus_conf(self, which: str) -> Path:
        return self.dir(which) / "cyrus.conf"

    def config_dir(self, which: str) -> Path:
        return self.dir(which) / "config"

    def pid_file(self, which: str) -> Path:
        # where cyrushelper.config expects it (Cyrus 3.6 has no master_pid_file: we pass -p)
        return self.config_dir(which) / "master.pid"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def syslog_prefix(self, which: str) -> str:
        """Cyrus's syslog ident prefix, unique per pair: lines look like `primary-11000/imapd[..]`."""
        self.dir(which)
        return f"{which}-{self.port_base}"

    def imap_port(self, which: str) -> int:
        return self.ports.primary_imap if self.dir(which).name == "primary" else self.ports.replica_imap

    def instance(self, which: str) -> Instance:
        return Instance.load(self.imapd_conf(which), self.cyrus_conf(which), name=f"lab-{which}")

    @property
    def primary_channels(self) -> list[Channel]:
        return self.instance("primary").channels

    def sync_backlog(self) -> list[Backlog]:
        """Pending sync log lines of every primary channel."""
        return [backlog(c) for c in self.primary_channels]

    # -- rendering
    def _channel_options(self) -> str:
        if self.channels is None:
            return ""
        shown = " ".join('""' if c == "" else c for c in self.channels)
        lines = [f"sync_log_channels: {shown}"]
        for name in self.channels:
            if name:
                lines += [f"{name}_sync_host: {LOOPBACK}",
                          f"{name}_sync_port: {self.primary_sync_port}",
                          f"{name}_sync_shutdown_file: {self.root}/primary/config/sync/{name}/shutdown"]
        return "\n".join(lines)

    @property
    def primary_sync_port(self) -> int:
        """Where the primary's sync_client connects: the replica's sync_server, or the relay."""
        return self.ports.sync_relay if self.sync_relay else self.ports.replica_sync

    def _daemon_section(self) -> str:
        if not self.rolling:
            return ""
        conf = self.primary_imapd_conf
        entries = []
        for name in (self.channels if self.channels is not None else [""]):
            if name:
                label = "syncclient" + re.sub(r"[^A-Za-z0-9]", "", name)
                entries.append(f'  {label:<13} cmd="sync_client -C {conf} -n {name} -r"')
            else:
                entries.append(f'  {"syncclient":<13} cmd="sync_client -C {conf} -r"')
        return "DAEMON {\n" + "\n".join(entries) + "\n}"

    def render(self) -> dict[str, str]:
        """Rendered config texts keyed by path relative to root (no file system access)."""
        common = {"ROOT": str(self.root)}
        primary = dict(common, SYSLOG_PREFIX=self.syslog_prefix("primary"),
                       IMAP_PORT=str(self.ports.primary_imap), LMTP_PORT=str(self.ports.primary_lmtp),
                       SYNC_PORT=str(self.primary_sync_port), CHANNEL_OPTIONS=self._channel_options(),
                       DAEMON_SECTION=self._daemon_section())
        replica = dict(common, SYSLOG_PREFIX=self.syslog_prefix("replica"),
                       IMAP_PORT=str(self.ports.replica_imap), SYNC_PORT=str(self.ports.replica_sync))
        texts = {}
        for which, values in (("primary", primary), ("replica", replica)):
            for kind in ("imapd", "cyrus"):
                name = f"{which}-{kind}.conf"
                texts[f"{which}/{kind}.conf"] = fill(template_text(name), values, name)
        return texts

    # -- building
    def create(self) -> CyrusPair:
        """(Re)create both trees from scratch; stops masters of this pair that are still running."""
        for which in WHICH:
            if self.master_pid(which) is not None:
                self.stop(which)
        texts = self.render()
        prepare_root(self.root)
        self.log_dir.mkdir(exist_ok=True)
        for which in WHICH:
            extra = [f"config/sync/{n}" for n in (self.channels or []) if n] if which == "primary" else []
            build_tree(self.dir(which), {f"{kind}.conf": texts[f"{which}/{kind}.conf"] for kind in ("imapd", "cyrus")},
                       REALMS[which], extra_dirs=extra)
        return self

    # -- running masters on the host
    def master_pid(self, which: str) -> int | None:
        """PID of this tree's running master (our child, or from its pid file if it runs our config)."""
        proc = self._procs.get(which)
        if proc is not None:
            if proc.poll() is None:
                return proc.pid
            self._procs.pop(which, None)
        try:
            pid = int(self.pid_file(which).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if alive(pid) and str(self.imapd_conf(which)) in cmdline(pid):
            return pid
        return None

    def running(self, which: str) -> bool:
        return self.master_pid(which) is not None

    def master_command(self, which: str) -> list[str]:
        return [str(cyrus.program("master")), "-C", str(self.imapd_conf(which)),
                "-M", str(self.cyrus_conf(which)), "-p", str(self.pid_file(which)), "-D"]

    def start(self, which: str, timeout: float = 15.0) -> int:
        """Start a master in its own session; return its PID once its IMAP port greets."""
        if self.running(which):
            raise LabError(f"{which} master already running (pid {self.master_pid(which)})")
        if not self.imapd_conf(which).exists():
            raise LabError(f"{self.imapd_conf(which)} missing: call create() first")
        ports = ([self.ports.primary_imap, self.ports.primary_lmtp] if which == "primary"
                 else [self.ports.replica_imap, self.ports.replica_sync])
        busy = [p for p in ports if not port_free(p)]
        if busy:
            raise LabError(f"cannot start {which}: port(s) {busy} already in use on {LOOPBACK}")
        self.pid_file(which).unlink(missing_ok=True)  # master leaves a stale one behind
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{which}-master.log", "ab")
        try:
            # own session: master's shutdown does kill(0, SIGTERM) on its whole process group
            proc = subprocess.Popen(self.master_command(which), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self._procs[which] = proc
        try:
            wait_for_greeting(self.imap_port(which), b"* OK", timeout, still_running=lambda: proc.poll() is None)
            if which == "primary":
                wait_for_greeting(self.ports.primary_lmtp, b"220", timeout,
                                  still_running=lambda: proc.poll() is None)
        except LabError as e:
            self.stop(which, timeout=5)
            tail = (self.log_dir / f"{which}-master.log").read_text(errors="replace")[-2000:]
            raise LabError(f"{which} master did not become ready: {e}\n{tail}") from None
        return proc.pid

    def stop(self, which: str, timeout: float = 15.0, sig: int = signal.SIGTERM) -> StopResult:
        """Signal the master by PID; after `timeout` SIGKILL whatever is left of its session."""
        pid = self.master_pid(which)
        proc = self._procs.get(which)
        start = time.monotonic()
        if pid is None:
            return StopResult(which, None, 0.0, clean=True, was_running=False)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        deadline = start + timeout
        killed: list[int] = []
        while True:
            master_gone = (proc.poll() is not None) if proc is not None else not alive(pid)
            members = [p for p in session_members(pid) if p != pid]
            if master_gone and not members:
                break
            if time.monotonic() >= deadline:
                for victim in ([pid] if not master_gone else []) + members:
                    try:
                        os.kill(victim, signal.SIGKILL)
                        killed.append(victim)
                    except ProcessLookupError:
                        pass
                if proc is not None:
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                break
            time.sleep(0.01)
        self._procs.pop(which, None)
        return StopResult(which, pid, time.monotonic() - start, clean=not killed, killed=tuple(killed))

    def stop_all(self, timeout: float = 15.0) -> list[StopResult]:
        """Primary first (it feeds the replica), then the replica."""
        return [self.stop(which, timeout) for which in WHICH]

    def __enter__(self) -> CyrusPair:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # -- the baseline drain
    def drain_with_sync_client(self, timeout: float = 60.0, max_rounds: int = 200) -> DrainResult:
        """Replay every pending primary sync log with bare `sync_client -R -1` runs, judged by files.

        The replica must be up. Exit codes of sync_client are not trusted (0 after a failed batch):
        a channel is done only when neither `log` nor `log-run` exists. Bounded by `timeout` overall.
        """
        start = time.monotonic()
        deadline = start + timeout
        channels = self.primary_channels
        rounds = 0
        timed_out = False
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for channel in channels:
            while pending_files(channel) and not timed_out and rounds < max_rounds:
                rounds += 1
                cmd = [str(cyrus.program("sync_client")), "-C", str(self.primary_imapd_conf)]
                if channel.name:
                    cmd += ["-n", channel.name]
                cmd += ["-R", "-1"]
                with open(self.log_dir / "drain-sync_client.log", "ab") as log:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    # with the replica unreachable it retries forever (15 s, 30 s, ...)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    timed_out = True
        left = {c.label: tuple(p.name for p in pending_files(c)) for c in channels}
        left = {k: v for k, v in left.items() if v}
        return DrainResult(rounds=rounds, seconds=time.monotonic() - start, complete=not left,
                           left=left, timed_out=timed_out)

    # -- systemd
    def plain_unit_texts(self) -> dict[str, str]:
        """Two plain Type=simple units running each master in the foreground (KillMode=mixed)."""
        units = {}
        for which in WHICH:
            order = "After=cyrus-lab-replica.service\n" if which == "primary" else ""
            units[f"cyrus-lab-{which}.service"] = (
                "[Unit]\n"
                f"Description=Cyrus lab {which} (cyrushelper test bed, {self.root})\n"
                f"{order}"
                "\n[Service]\n"
                "Type=simple\n"
                f"ExecStartPre=/bin/rm -f {self.pid_file(which)}\n"
                f"ExecStart={' '.join(self.master_command(which))}\n"
                "# SIGTERM to master only: master itself signals its children once\n"
                "KillMode=mixed\n"
                "TimeoutStopSec=30\n"
                "\n[Install]\n"
                "WantedBy=multi-user.target\n")
        return units


TREE_DIRS = ("spool", "sieve", *(f"config/{d}" for d in ("db", "proc", "socket", "log", "msg", "user", "quota",
                                                          "lock", "sync")))


def _cyrus_ids() -> tuple[int, int]:
    try:
        return pwd.getpwnam(CYRUS_USER).pw_uid, grp.getgrnam(CYRUS_GROUP).gr_gid
    except KeyError as e:
        raise LabError(f"user/group missing: {e} (install cyrus-common)") from None


def prepare_root(root: Path) -> None:
    """Create `root`; every ancestor must let user cyrus through."""
    uid, gid = _cyrus_ids()
    root.mkdir(parents=True, exist_ok=True)
    cyrus_gid = pwd.getpwnam(CYRUS_USER).pw_gid
    _check_traversable(root, uid, {gid, cyrus_gid, *os.getgrouplist(CYRUS_USER, cyrus_gid)})


def build_tree(tree: Path, files: dict[str, str], realm: str, extra_dirs: list[str] = ()) -> None:
    """One instance's tree from scratch: directories, config files, the SASL users, owner cyrus:mail."""
    uid, gid = _cyrus_ids()
    saslpasswd2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"
    if not os.path.exists(saslpasswd2):
        raise LabError("saslpasswd2 not found (install sasl2-bin)")
    if tree.exists():
        shutil.rmtree(tree)
    for sub in (*TREE_DIRS, *extra_dirs):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tree / name).write_text(text, encoding="utf-8")
    sasldb = tree / "sasldb2"
    for user, password in USERS.items():
        result = subprocess.run([saslpasswd2, "-p", "-c", "-f", str(sasldb), "-u", realm, user],
                                input=password + "\n", text=True, capture_output=True, timeout=30)
        if result.returncode != 0:
            raise LabError(f"saslpasswd2 for {user} failed: {result.stderr.strip()}")
    sasldb.chmod(0o640)
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
            os.chown(name, uid, gid)
    tree.chmod(0o750)


def _check_traversable(path: Path, uid: int, gids: set[int]) -> None:
    """Cyrus drops to user cyrus: every ancestor of the lab root must let it through."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in gids:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            raise LabError(f"user {CYRUS_USER} cannot traverse {directory} (mode "
                           f"{st.st_mode & 0o777:o}): put the lab root under a world-searchable directory")


# --------------------------------------------------------------------------- syslog

_SINK_POINTER = Path("/run/cyrushelper-lab-syslog.json")


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class SyslogSink:
    """Receives syslog datagrams on `path` (/dev/log) and appends them, time-stamped, to `logfile`.

    Binds only if nothing listens there yet. If another sink already does, this one reuses it: when
    that sink is a SyslogSink it left a pointer to its log file (in /run), and `logfile` follows
    it; otherwise `capturing` is False and Cyrus's lines go wherever the other listener writes them.
    """

    def __init__(self, path: str = "/dev/log", logfile: os.PathLike | str = "syslog.log"):
        self.path = path
        self.logfile = Path(logfile)
        self.owner = False
        self.capturing = False
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SyslogSink:
        if _listening(self.path):
            self._adopt_existing()
            return self
        try:
            os.unlink(self.path)  # a stale socket file nobody listens on
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            if _listening(self.path):  # lost a race with another sink: reuse it
                self._adopt_existing()
                return self
            raise
        os.chmod(self.path, 0o666)
        sock.settimeout(0.2)
        self._sock = sock
        self._inode = os.stat(self.path).st_ino
        self.owner = self.capturing = True
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile.touch()
        self._write_pointer()
        self._thread = threading.Thread(target=self._run, name="syslog-sink", daemon=True)
        self._thread.start()
        return self

    def _write_pointer(self) -> None:
        if self.path != "/dev/log" or not _SINK_POINTER.parent.is_dir():
            return
        tmp = _SINK_POINTER.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "inode": self._inode,
                                   "logfile": str(self.logfile.absolute())}))
        os.replace(tmp, _SINK_POINTER)

    def _adopt_existing(self) -> None:
        self.owner = False
        try:
            info = json.loads(_SINK_POINTER.read_text())
            if (self.path == "/dev/log" and alive(int(info["pid"]))
                    and os.stat(self.path).st_ino == info["inode"]):
                self.logfile = Path(info["logfile"])
                self.capturing = True
        except (OSError, ValueError, KeyError, TypeError):
            self.capturing = False

    def _run(self) -> None:
        with open(self.logfile, "a", buffering=1, encoding="utf-8") as out:
            while not self._stop.is_set():
                try:
                    data = self._sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                now = time.time()
                stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
                out.write(f"{stamp} {data.decode('utf-8', 'replace').rstrip(chr(10)).rstrip(chr(0))}\n")

    def mark(self) -> int:
        """Current end of the log: pass it to lines()/grep() to see only what came after."""
        try:
            return self.logfile.stat().st_size
        except FileNotFoundError:
            return 0

    def lines(self, since: int = 0) -> list[str]:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return []

    def grep(self, pattern: str, since: int = 0) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.lines(since) if rx.search(line)]

    def wait_for(self, pattern: str, timeout: float = 5.0, since: int = 0) -> list[str]:
        """Lines matching `pattern` once at least one arrived, [] after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.grep(pattern, since)
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def stop(self) -> None:
        if not self.owner:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            info = json.loads(_SINK_POINTER.read_text())
            if info.get("pid") == os.getpid():
                _SINK_POINTER.unlink()
        except (OSError, ValueError):
            pass
        if self._sock is not None:
            self._sock.close()
        self.owner = self.capturing = False

    def __enter__(self) -> SyslogSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- a switchable pair

SWITCHABLE = ("a", "b")
SWITCHABLE_FILES = {"imapd.conf": "switchable-imapd.conf", "cyrus.conf": "switchable-cyrus.conf",
                    "cyrus-replica.conf": "switchable-cyrus-replica.conf"}


@dataclass(frozen=True)
class SwitchablePorts:
    imap: int
    lmtp: int
    sync: int          # this side's sync_server (replica role)


class SwitchablePair:
    """Two instances `a` and `b` set up as the README's switchable-pair recipe says: a symmetric
    imapd.conf (each names the other as sync_host) and one cyrus.conf per role; roles are given
    by the units (`generate --initial-role`) and swapped by `cyrushelper switchover`."""

    def __init__(self, root: os.PathLike | str, port_base: int = 12000, names: tuple[str, str] = SWITCHABLE,
                 peer_host: dict[str, str] | None = None, listen_host: dict[str, str] | None = None):
        self.root = Path(root).absolute()
        self.port_base = int(port_base)
        self.names = names
        # two hosts: each side listens on its own address and names the other's as sync_host
        self.listen_host = listen_host or {n: LOOPBACK for n in names}
        self.peer_host = peer_host or {n: LOOPBACK for n in names}

    def ports(self, name: str) -> SwitchablePorts:
        i = self.names.index(name)
        return SwitchablePorts(imap=self.port_base + 143 + 100 * i, lmtp=self.port_base + 24 + i,
                               sync=self.port_base + 292 + i)

    def peer(self, name: str) -> str:
        return self.names[1 - self.names.index(name)]

    def dir(self, name: str) -> Path:
        return self.root / name

    def imapd_conf(self, name: str) -> Path:
        return self.dir(name) / "imapd.conf"

    def cyrus_conf(self, name: str) -> Path:
        return self.dir(name) / "cyrus.conf"

    def replica_cyrus_conf(self, name: str) -> Path:
        return self.dir(name) / "cyrus-replica.conf"

    def config_dir(self, name: str) -> Path:
        return self.dir(name) / "config"

    def values(self, name: str) -> dict[str, str]:
        mine, theirs = self.ports(name), self.ports(self.peer(name))
        return {"ROOT": str(self.root), "NAME": name, "HOST": self.listen_host[name],
                "IMAP_PORT": str(mine.imap), "LMTP_PORT": str(mine.lmtp), "SYNC_PORT": str(mine.sync),
                "PEER_HOST": self.peer_host[name], "PEER_SYNC_PORT": str(theirs.sync)}

    def render(self, name: str) -> dict[str, str]:
        values = self.values(name)
        return {target: fill(template_text(source), values, source) for target, source in SWITCHABLE_FILES.items()}

    def create(self, only: str | None = None) -> SwitchablePair:
        prepare_root(self.root)
        for name in self.names if only is None else [only]:
            build_tree(self.dir(name), self.render(name), f"{name}.test")
        return self

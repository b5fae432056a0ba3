"""A switchable Cyrus pair set up exactly as the README recipe says, under real systemd: both
instances in one throwaway container (local), or one per container on a private link with sshd
between them (two hosts, `switchover --to b@198.18.0.2`). Used by the switchover tests and
benchmarks/bench_switchover.py.

Mail comes from an LMTP load that behaves like an MTA with two LMTP hosts: a refused connection or a
421 moves it to the other one, with back-off; every acknowledged message is recorded.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from testbed import images
from testbed.container import SystemdContainer
from testbed.network import PrivateLink
from testbed.pair import LOOPBACK, SwitchablePair
from testbed import product
from testbed.product import Wheelhouse
from testbed.scenario import new_workdir

NAMES = ("a", "b")
INITIAL_ROLES = {"a": "primary", "b": "replica"}


class SwitchLab:
    def __init__(self, containers: dict[str, SystemdContainer], workdirs: dict[str, Path], port_base: int,
                 wheelhouse: Wheelhouse, addresses: dict[str, str] | None = None):
        self.containers = containers
        self.workdirs = workdirs
        self.port_base = port_base
        self.addresses = addresses or {n: LOOPBACK for n in NAMES}
        self.two_hosts = containers["a"] is not containers["b"]
        peers = {n: self.addresses[NAMES[1 - NAMES.index(n)]] for n in NAMES}
        self.pairs = {n: SwitchablePair(workdirs[n] / "lab", port_base, listen_host=dict(self.addresses),
                                        peer_host=peers) for n in NAMES}
        self.wheelhouse = wheelhouse
        self.helper: str | None = None   # cyrushelper as users install it, on each host (create())
        self._loads = 0

    # ------------------------------------------------------------------ helpers
    def c(self, name: str) -> SystemdContainer:
        return self.containers[name]

    def target(self, name: str) -> str:
        """How the other side's host names this instance for `switchover --to`."""
        return f"{name}@{self.addresses[name]}" if self.two_hosts else name

    def cyrushelper(self, name: str, *args: str, timeout: float = 600, env: dict | None = None):
        """Run cyrushelper on `name`'s host."""
        return self.c(name).run(self.helper, *args, timeout=timeout, check=False, env=env)

    def lab(self, name: str, command: str, *args: str, timeout: float = 300, check: bool = True):
        pair = self.pairs[name]
        return self.c(name).run(self.c(name).python, "-m", "testbed", command, str(pair.root),
                                "--port-base", str(self.port_base), *args, timeout=timeout, check=check,
                                env=self.c(name).python_env)

    def lmtp(self, name: str) -> str:
        return f"{self.addresses[name]}:{self.pairs[name].ports(name).lmtp}"

    def imap(self, name: str) -> str:
        return f"{self.addresses[name]}:{self.pairs[name].ports(name).imap}"

    def unit(self, name: str) -> str:
        return f"cyrus@{name}.service"

    # ------------------------------------------------------------------ building
    def create(self) -> SwitchLab:
        for name in NAMES:
            self.workdirs[name].mkdir(parents=True, exist_ok=True)
            self.workdirs[name].chmod(0o755)
            listen = [f"--listen={n}={self.addresses[n]}" for n in NAMES]
            peer = [f"--peer={n}={self.addresses[NAMES[1 - NAMES.index(n)]]}" for n in NAMES]
            self.lab(name, "create-switchable", "--only", name, *listen, *peer)
        for name in NAMES if self.two_hosts else NAMES[:1]:   # the wheel in a venv under /opt, per host
            house = product.copy_wheels(self.wheelhouse, self.workdirs[name] / "wheels")
            self.helper = product.install(self.c(name), house)
        return self

    def install(self, extra_dropin: dict[str, str] | None = None) -> None:
        """README recipe: `cyrushelper generate` per instance, its output copied to /etc/systemd/system."""
        for name in NAMES:
            pair, out = self.pairs[name], self.workdirs[name] / f"units-{name}"
            r = self.cyrushelper(name, "generate", "--imapd-conf", str(pair.imapd_conf(name)),
                                 "--cyrus-conf", str(pair.cyrus_conf(name)),
                                 "--replica-cyrus-conf", str(pair.replica_cyrus_conf(name)),
                                 "--initial-role", INITIAL_ROLES[name], "--instance", name,
                                 "--output", str(out), timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"generate {name} failed ({r.returncode}): {r.stderr}")
            self.c(name).install_units(out)
        for name, text in (extra_dropin or {}).items():   # tuning, as `systemctl edit cyrus@NAME` writes it
            self.c(name).run("sh", "-c", f"mkdir -p /etc/systemd/system/cyrus@{name}.service.d && "
                                         f"cat > /etc/systemd/system/cyrus@{name}.service.d/tuning.conf", input=text)
            self.c(name).systemctl("daemon-reload")

    def start(self, *names: str) -> None:
        for name in names:
            r = self.c(name).systemctl("start", self.unit(name), check=False, timeout=180)
            if r.returncode != 0:
                raise RuntimeError(f"start {name} failed: {r.stderr}\n{self.c(name).journal(self.unit(name))[-3000:]}")

    # ------------------------------------------------------------------ mail
    def start_load(self, seconds: float = 600, pause: float = 0.0) -> tuple[str, Path]:
        """Continuous LMTP load from a's host, trying a's then b's LMTP (like an MTA)."""
        self._loads += 1
        unit, record = f"lab-load-{self._loads}.service", self.workdirs["a"] / f"load-{self._loads}.record"
        c = self.c("a")
        c.run("systemd-run", f"--unit={unit}", "--quiet", "--property=KillMode=mixed",
              f"--property=StandardOutput=file:{record}.json",
              *[f"--setenv={k}={v}" for k, v in c.python_env.items()], c.python, "-m", "testbed", "load",
              str(self.pairs["a"].root), "--port-base", str(self.port_base), "--record", str(record),
              "--seconds", str(seconds), "--pause", str(pause), "--lmtp", self.lmtp("a"), "--lmtp", self.lmtp("b"))
        return unit, record

    def stop_load(self, unit: str, record: Path) -> dict:
        self.c("a").systemctl("stop", unit, check=False, timeout=60)
        try:
            return json.loads(Path(f"{record}.json").read_text())
        except (OSError, ValueError):
            return {}

    def acknowledged(self, record: Path) -> int:
        try:
            return record.read_text().count("\n")
        except FileNotFoundError:
            return 0

    def wait_acknowledged(self, record: Path, count: int, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.acknowledged(record) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.acknowledged(record)

    def verify(self, record: Path, name: str) -> dict:
        r = self.lab("a", "verify", "--record", str(record), "--imap", self.imap(name), check=False)
        if r.returncode not in (0, 1):
            raise RuntimeError(f"verify on {name} failed: {r.stderr}")
        return json.loads(r.stdout)

    # ------------------------------------------------------------------ the product
    def status(self, name: str) -> dict:
        return json.loads(self.cyrushelper(name, "status", "--instance", name, "--json", "--no-probe").stdout)

    def mailboxes(self, name: str) -> dict:
        return json.loads(self.cyrushelper(name, "mailboxes", "--instance", name, "--json").stdout)["mailboxes"]

    def switchover(self, source: str, dest: str, *extra: str, env: dict | None = None):
        """`cyrushelper switchover --from SOURCE --to DEST` on SOURCE's host, as the README says."""
        return self.cyrushelper(source, "switchover", "--from", source, "--to", self.target(dest), *extra,
                                timeout=900, env=env)

    def primary(self) -> str:
        roles = {n: self.status(n)["role"] for n in NAMES}
        return next(n for n, r in roles.items() if r == "primary")

    def settled(self, timeout: float = 120) -> bool:
        """Wait until the primary's sync log is empty (its rolling sync_client caught up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(self.primary())
            if all(ch["lines"] == 0 for ch in st["channels"]):
                return True
            time.sleep(0.2)
        return False


class SwitchLabFactory:
    """Boots the containers (one, or two on a private link) and tears everything down."""

    def __init__(self, tag: str, wheelhouse: Wheelhouse, release: str | None = None):
        """`release`: the Debian release the containers run (None: the host's own)."""
        self.tag = tag
        self.wheelhouse = wheelhouse
        self.root = images.container_root(release) if release else None
        self.made: list[tuple[Path, SystemdContainer]] = []
        self.links: list[PrivateLink] = []

    def local(self, port_base: int) -> SwitchLab:
        workdir = new_workdir(self.tag)
        box = SystemdContainer(workdir, root=self.root).__enter__()
        self.made.append((workdir, box))
        return SwitchLab({"a": box, "b": box}, {"a": workdir, "b": workdir}, port_base, self.wheelhouse).create()

    def two_hosts(self, port_base: int) -> SwitchLab:
        base = new_workdir(self.tag)
        link = PrivateLink(base / "net").start()
        self.links.append(link)
        boxes, workdirs = {}, {}
        for name in NAMES:
            workdirs[name] = base / name
            workdirs[name].mkdir()
            boxes[name] = SystemdContainer(workdirs[name], network_namespace=link.namespace(name),
                                           root=self.root).__enter__()
            self.made.append((workdirs[name], boxes[name]))
        lab = SwitchLab(boxes, workdirs, port_base, self.wheelhouse, addresses={n: link.address(n) for n in NAMES})
        setup_ssh(lab)
        return lab.create()

    def journals(self) -> str:
        parts = []
        for workdir, box in self.made:
            try:
                parts.append(f"--- journal of {workdir} ---\n{box.journal()[-20000:]}")
            except Exception as e:  # the container may be what broke
                parts.append(f"(no journal of {workdir}: {e})")
        return "\n".join(parts)

    def close(self, keep: bool = False) -> None:
        for workdir, box in reversed(self.made):
            box.__exit__(None, None, None)
        for link in self.links:
            link.stop()
        if not keep:
            for workdir, _ in self.made:
                shutil.rmtree(workdir.parent if workdir.name in NAMES else workdir, ignore_errors=True)


def setup_ssh(lab: SwitchLab) -> None:
    """sshd (Debian's openssh-server) on each host with a host key made here, and root's client key
    and known_hosts on each, as an operator's ~/.ssh would have them: keys made for this test only,
    kept in each container's own work directory."""
    keys = {name: lab.workdirs[name] / "ssh" for name in NAMES}
    for name in NAMES:
        keys[name].mkdir(mode=0o700)
        for kind in ("host", "client"):
            lab.c(name).run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{kind}-{name}",
                            "-f", str(keys[name] / kind))
    for name in NAMES:
        c, other = lab.c(name), NAMES[1 - NAMES.index(name)]
        (keys[name] / "authorized_keys").write_text((keys[other] / "client.pub").read_text())
        (keys[name] / "authorized_keys").chmod(0o600)
        kind, key = (keys[other] / "host.pub").read_text().split()[:2]
        (keys[name] / "known_hosts").write_text(f"{lab.addresses[other]} {kind} {key}\n")
        c.run("mkdir", "-p", "-m", "0755", "/run/sshd")
        c.run("systemd-run", "--unit=lab-sshd.service", "--quiet", "/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null",
              "-h", str(keys[name] / "host"), "-o", f"ListenAddress={lab.addresses[name]}",
              "-o", "PermitRootLogin=prohibit-password", "-o", f"AuthorizedKeysFile={keys[name] / 'authorized_keys'}",
              "-o", "PasswordAuthentication=no", "-o", "PidFile=none")
        c.run("sh", "-c", "mkdir -p -m 0700 /root/.ssh && cat > /root/.ssh/config && chmod 600 /root/.ssh/config",
              input=(f"Host {lab.addresses[other]}\n  IdentityFile {keys[name] / 'client'}\n"
                     f"  UserKnownHostsFile {keys[name] / 'known_hosts'}\n  StrictHostKeyChecking yes\n"))
    for name in NAMES:
        other = NAMES[1 - NAMES.index(name)]
        deadline = time.monotonic() + 30
        while True:
            r = lab.c(name).run("ssh", "-o", "BatchMode=yes", f"root@{lab.addresses[other]}", "true", check=False)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"ssh from {name} to {other} does not work: {r.stderr}")
            time.sleep(0.2)

"""A real Cyrus primary+replica run by systemd units inside a throwaway systemd container.

The end-to-end tests and the README demo share this: build the pair (`python -m testbed
create` inside the container, whose private loopback holds the pair's ports), install either
cyrushelper's generated units (`cyrus@primary`, `cyrus@replica`, umbrella `cyrus`) or a stock
Debian-style unit for comparison, put LMTP load on the primary, stop, and measure: how long the
stop took, its Result, what was left in the sync logs, and whether every acknowledged message is
on the replica.

The work directory is bound into the container at the same path, so the host reads sync logs,
state files and load records directly. It must not live under /tmp: the units use PrivateTmp=.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cyrushelper import state
from cyrushelper.config import Instance
from testbed.container import SystemdContainer
from testbed.pair import CyrusPair
from cyrushelper.synclog import backlog, count_lines

LAB_PARENT = Path(os.environ.get("CYRUSHELPER_LAB_PARENT", "/var/lib/cyrushelper-lab"))
STOCK_UNIT = "cyrus-stock-primary.service"


@dataclass
class StopMeasure:
    unit: str
    seconds: float
    result: str
    active_state: str
    exit_status: str
    lines_left: dict[str, int]
    files_left: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total_left(self) -> int:
        return sum(self.lines_left.values())


def helper_path() -> str:
    """The cyrushelper console script of the running interpreter's environment."""
    candidate = Path(sys.prefix) / "bin" / "cyrushelper"
    if not candidate.exists():
        raise FileNotFoundError(f"{candidate} missing: install the package (pip install -e .)")
    return str(candidate)


HIDDEN_FROM_UNITS = ("/tmp/", "/var/tmp/", "/root/", "/home/")  # PrivateTmp=, ProtectHome=


def hidden_paths() -> list[str]:
    """Where this checkout and its interpreter live, if the unit's sandbox would hide them."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [str(repo), str(Path(sys.prefix).resolve()), str(Path(sys.base_prefix).resolve())]
    hidden = []
    for path in candidates:
        if (path + "/").startswith(HIDDEN_FROM_UNITS) and path not in hidden:
            hidden.append(path)
    return hidden


def install_lab_dropins(container: SystemdContainer, instances: tuple[str, ...],
                        extra: dict[str, str] | None = None) -> None:
    """A test-bed adaptation, not product: this checkout or its Python lives where the unit's
    PrivateTmp=/ProtectHome= hide it (CI may clone anywhere); bind it back read-only. (ProtectHome=yes
    hides /root and /home beneath binds too: relax it to read-only.) Then daemon-reload."""
    lab_dropin = ""
    hidden = hidden_paths()
    if hidden:
        lab_dropin += "[Service]\n" + "".join(
            "ProtectHome=read-only\n" if p.startswith(("/root/", "/home/")) else f"BindReadOnlyPaths={p}\n"
            for p in hidden)
    for name in instances:
        text = lab_dropin + (extra or {}).get(name, "")
        if text:
            container.run("sh", "-c", f"mkdir -p /etc/systemd/system/cyrus@{name}.service.d && "
                                      f"cat > /etc/systemd/system/cyrus@{name}.service.d/lab.conf", input=text)
    container.systemctl("daemon-reload")


class LabSystem:
    """The pair plus its units inside `container`; paths are identical on host and inside."""

    def __init__(self, container: SystemdContainer, workdir: Path, *, rolling: bool = True,
                 port_base: int = 11000, channels: list[str] | None = None):
        self.c = container
        self.workdir = Path(workdir)
        self.pair = CyrusPair(self.workdir / "lab", port_base=port_base, rolling=rolling, channels=channels)
        self.python = container.python
        self.helper = helper_path()
        self._loads = 0

    # ------------------------------------------------------------------ helpers
    def lab(self, command: str, *args: str, timeout: float = 120, check: bool = True):
        return self.c.run(self.python, "-m", "testbed", command, str(self.pair.root),
                          "--port-base", str(self.pair.port_base), *args, timeout=timeout, check=check,
                          env=self.c.python_env)

    def cyrushelper(self, *args: str, timeout: float = 300, check: bool = False):
        return self.c.run(self.helper, *args, timeout=timeout, check=check)

    def instance(self, which: str = "primary") -> Instance:
        return self.pair.instance(which)

    def backlog(self, which: str = "primary") -> dict[str, int]:
        return {b.channel: b.lines for b in (backlog(ch) for ch in self.instance(which).channels)}

    def pending_files(self, which: str = "primary") -> dict[str, list[str]]:
        return {b.channel: list(b.files) for b in (backlog(ch) for ch in self.instance(which).channels)}

    def state_file(self, name: str, which: str = "primary") -> dict | None:
        path = state.directory(self.pair.config_dir(which)) / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ building
    def create(self) -> LabSystem:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.lab("create", *(["--rolling"] if self.pair.rolling else []),
                 *(["--channels", ",".join(self.pair.channels)] if self.pair.channels else []))
        return self

    def install_cyrushelper_units(self, *, replica_local: bool = True,
                                  extra_dropin: dict[str, str] | None = None) -> None:
        """Generate and install cyrus@primary + cyrus@replica (+ the umbrella cyrus.service)."""
        for which in ("replica", "primary"):
            out = self.workdir / f"units-{which}"
            args = ["generate", "--imapd-conf", str(self.pair.imapd_conf(which)),
                    "--cyrus-conf", str(self.pair.cyrus_conf(which)), "--instance", which,
                    "--output", str(out), "--helper", self.helper]
            if which == "primary" and replica_local:
                args += ["--replica-instance", "replica"]
            r = self.cyrushelper(*args, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"cyrushelper generate failed ({r.returncode}): {r.stderr}")
            self.c.install_units(out)
        install_lab_dropins(self.c, ("primary", "replica"), extra_dropin)

    def install_stock_unit(self) -> str:
        """The primary as Debian 12 ships cyrus-imapd.service: Type=simple, no ExecStop, default
        KillMode=control-group, nothing drains. Replica stays under cyrus@replica."""
        pid = self.pair.pid_file("primary")
        text = ("[Unit]\nDescription=Cyrus primary, stock Debian-style unit (for comparison)\n"
                "After=cyrus@replica.service\n\n[Service]\nType=simple\n"
                f"ExecStartPre=/bin/rm -f {pid}\n"
                f"ExecStart={shlex.join(self.pair.master_command('primary'))}\n"
                "PrivateTmp=yes\n")
        self.c.run("sh", "-c", f"cat > /etc/systemd/system/{STOCK_UNIT}", input=text)
        self.c.systemctl("daemon-reload")
        return STOCK_UNIT

    # ------------------------------------------------------------------ running
    def start(self, *units: str, timeout: float = 120) -> None:
        r = self.c.systemctl("start", *units, check=False, timeout=timeout)
        if r.returncode != 0:
            journal = "\n".join(self.c.journal(u)[-3000:] for u in units)
            raise RuntimeError(f"systemctl start {' '.join(units)} failed: {r.stderr}\n{journal}")

    def start_load(self, seconds: float = 60, users: str = "alice,bob", pause: float = 0.0,
                   hold_user: str | None = None) -> tuple[str, Path]:
        """LMTP load on the primary as a transient unit; returns (unit, record file). The load
        retries like an MTA and counts every attempt (load_stats() once stopped). `hold_user` adds
        a slow sender whose body is still arriving when the primary's fence goes up (it goes on
        1 s later; `record.holding` exists once it waits)."""
        self._loads += 1
        unit = f"lab-load-{self._loads}.service"
        record = self.workdir / f"load-{self._loads}.record"
        hold = ["--hold-user", hold_user, "--hold-until", str(self.instance().fence_file)] if hold_user else []
        self.c.run("systemd-run", f"--unit={unit}", "--quiet", "--property=KillMode=mixed",
                   *[f"--setenv={k}={v}" for k, v in self.c.python_env.items()],
                   self.python, "-m", "testbed", "load", str(self.pair.root),
                   "--port-base", str(self.pair.port_base), "--record", str(record),
                   "--stats", str(self._stats_path(record)), "--seconds", str(seconds), "--users", users,
                   "--pause", str(pause), *hold)
        return unit, record

    @staticmethod
    def _stats_path(record: Path) -> Path:
        return record.with_name(record.name + ".stats.json")

    def load_stats(self, record: Path) -> dict:
        """What the stopped load saw: testbed.mail.LoadStats.as_dict()."""
        return json.loads(self._stats_path(record).read_text())

    def wait_acknowledged(self, record: Path, count: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = count_lines(record)
            if n >= count or time.monotonic() > deadline:
                return n
            time.sleep(0.1)

    def stop_load(self, unit: str) -> None:
        self.c.systemctl("stop", unit, check=False, timeout=60)

    def deliver(self, count: int, user: str = "alice", tag: str = "backlog") -> Path:
        record = self.workdir / f"deliver-{tag}.record"
        self.lab("deliver", "--record", str(record), "--count", str(count), "--user", user, "--tag", tag,
                 timeout=600)
        return record

    def verify(self, *records: Path, storage: bool = False) -> dict:
        args = [a for r in records for a in ("--record", str(r))]
        r = self.lab("verify", *args, *(["--storage"] if storage else []), timeout=300, check=False)
        if r.returncode not in (0, 1):
            raise RuntimeError(f"verify failed: {r.stderr}")
        return json.loads(r.stdout)

    def stop(self, unit: str, timeout: float = 300, verb: str = "stop") -> StopMeasure:
        t0 = time.monotonic()
        self.c.systemctl(verb, unit, check=False, timeout=timeout)
        seconds = time.monotonic() - t0
        props = self.c.show(unit, "Result", "ActiveState", "ExecMainStatus")
        return StopMeasure(unit=unit, seconds=seconds, result=props.get("Result", "?"),
                           active_state=props.get("ActiveState", "?"),
                           exit_status=props.get("ExecMainStatus", "?"),
                           lines_left=self.backlog(), files_left=self.pending_files())

    def journal(self, unit: str | None = None) -> str:
        return self.c.journal(unit)

    def unexpected_sigterm_lines(self) -> list[str]:
        """Cyrus children that got SIGTERM from someone other than master (a double SIGTERM)."""
        return [line for line in self.c.journal().splitlines()
                if "graceful shutdown initiated by unexpected process" in line]


def new_workdir(tag: str) -> Path:
    """A fresh work directory outside /tmp (PrivateTmp= would hide /tmp from the units)."""
    LAB_PARENT.mkdir(parents=True, exist_ok=True)
    LAB_PARENT.chmod(0o755)
    path = LAB_PARENT / f"{tag}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    path.mkdir()
    path.chmod(0o755)
    return path

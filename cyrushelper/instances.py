"""Instance name → its files, and the Instance of the role it has: the one place that knows which
configuration `cyrus@NAME` runs with, so that `status --instance X`, `switchover --from A --to B`
and the other commands need nothing but the name.

`cyrushelper generate` writes the paths into the instance's drop-in
(`cyrus@NAME.service.d/cyrushelper.conf`: `Environment=CYRUS_IMAPD_CONF=… CYRUS_CONF=…`, for a
switchable instance also `CYRUS_REPLICA_CONF=…` and `CYRUSHELPER_INITIAL_ROLE=…`). systemd merges
every drop-in, so `systemctl show -p Environment cyrus@NAME` reports what the unit really runs
with, an operator's `systemctl edit` included; the same query over ssh finds a remote instance's
files, and ExecStart names the cyrushelper the unit runs (the one to call on that host).
Paths given on the command line win; without them and without such a unit, Debian's defaults.

A switchable instance has one cyrus.conf per role (role.py explains the design): `load()` reads
the role record in the state directory and gives the Instance the cyrus.conf of that role.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cyrushelper import state
from cyrushelper.config import (DEFAULT_CYRUS_CONF, DEFAULT_IMAPD_CONF, ConfigError, Instance,
                                parse_cyrus_conf, parse_imapd_conf)

ROLES = ("primary", "replica")
UNIT = "cyrus@{}.service"
# What `systemctl show` must report about an instance (one call, local or over ssh).
SHOW_PROPERTIES = ("LoadState", "Environment", "ExecStart")
SHOW_TIMEOUT = 30.0


@dataclass(frozen=True)
class InstanceFiles:
    name: str
    imapd_conf: Path
    cyrus_conf: Path                       # the only cyrus.conf, or the primary role's
    replica_cyrus_conf: Path | None = None  # a switchable instance: the replica role's cyrus.conf
    initial_role: str | None = None        # the role before any role record exists
    helper: str | None = None              # the cyrushelper the unit runs (ExecStart's program)
    source: str = "command line"

    @property
    def switchable(self) -> bool:
        return self.replica_cyrus_conf is not None

    def cyrus_conf_for(self, role: str | None) -> Path:
        if role == "replica" and self.replica_cyrus_conf is not None:
            return self.replica_cyrus_conf
        return self.cyrus_conf

    def to_json(self) -> dict:
        return {"name": self.name, "imapd_conf": str(self.imapd_conf), "cyrus_conf": str(self.cyrus_conf),
                "replica_cyrus_conf": str(self.replica_cyrus_conf) if self.replica_cyrus_conf else None,
                "initial_role": self.initial_role, "helper": self.helper, "source": self.source}


def unit_name(name: str) -> str:
    return UNIT.format(name)


def show_command(name: str) -> list[str]:
    return ["systemctl", "show", *[f"--property={p}" for p in SHOW_PROPERTIES], unit_name(name)]


def parse_show(name: str, text: str) -> InstanceFiles | None:
    """The files of `name` from `systemctl show` output; None if the unit is not one of ours."""
    props = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    if props.get("LoadState") != "loaded":
        return None
    env = {}
    for word in shlex.split(props.get("Environment", "")):
        key, sep, value = word.partition("=")
        if sep:
            env[key] = value
    if not env.get("CYRUS_IMAPD_CONF") or not env.get("CYRUS_CONF"):
        return None
    m = re.search(r"\bpath=(\S+)", props.get("ExecStart", ""))
    role = env.get("CYRUSHELPER_INITIAL_ROLE") or None
    return InstanceFiles(name=name, imapd_conf=Path(env["CYRUS_IMAPD_CONF"]), cyrus_conf=Path(env["CYRUS_CONF"]),
                         replica_cyrus_conf=Path(env["CYRUS_REPLICA_CONF"]) if env.get("CYRUS_REPLICA_CONF")
                         else None, initial_role=role if role in ROLES else None,
                         helper=m.group(1) if m else None, source=f"unit {unit_name(name)}")


def from_systemd(name: str) -> InstanceFiles | None:
    """Ask the local systemd; None when there is no such unit (or no systemd at all)."""
    try:
        r = subprocess.run(show_command(name), capture_output=True, text=True, timeout=SHOW_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_show(name, r.stdout) if r.returncode == 0 else None


def resolve(name: str, imapd_conf: str | None = None, cyrus_conf: str | None = None,
            replica_cyrus_conf: str | None = None, initial_role: str | None = None) -> InstanceFiles:
    """Paths given win; an instance named without paths is looked up in its unit; else defaults."""
    if imapd_conf is None and cyrus_conf is None and replica_cyrus_conf is None:
        found = from_systemd(name)
        if found is not None:
            return found
    return InstanceFiles(name=name, imapd_conf=Path(imapd_conf or DEFAULT_IMAPD_CONF),
                         cyrus_conf=Path(cyrus_conf or DEFAULT_CYRUS_CONF),
                         replica_cyrus_conf=Path(replica_cyrus_conf) if replica_cyrus_conf else None,
                         initial_role=initial_role or None,
                         source="command line" if imapd_conf or cyrus_conf else "defaults")


def recorded_role(configdirectory: os.PathLike | str) -> str | None:
    record = state.read_role(configdirectory)
    role = record.get("role") if record else None
    return role if role in ROLES else None


def load(files: InstanceFiles, role: str | None = None) -> Instance:
    """The Instance with the cyrus.conf of `role` (default: the recorded role, else the initial
    one). Both cyrus.conf files of a switchable instance are parsed, so a broken one is refused
    now (file:line), not at the next switchover."""
    imapd = parse_imapd_conf(files.imapd_conf)
    if not files.switchable:
        inst = Instance(imapd, parse_cyrus_conf(files.cyrus_conf), files.name)
        inst.check_children_config()
        return inst
    by_role = {"primary": parse_cyrus_conf(files.cyrus_conf),
               "replica": parse_cyrus_conf(files.replica_cyrus_conf)}
    role = role or recorded_role(imapd.configdirectory) or files.initial_role
    if role is None:
        raise ConfigError(files.imapd_conf, None, f"instance {files.name} is switchable (two cyrus.conf) "
                                                  "but has no role yet: give it one with `generate --role` "
                                                  "(CYRUSHELPER_INITIAL_ROLE) or `cyrushelper role --set`")
    inst = Instance(imapd, by_role[role], files.name, role=role, cyrus_by_role=by_role)
    inst.check_children_config()
    return inst

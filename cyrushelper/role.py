"""`cyrushelper role`: the roles of a switchable pair (issue 8), what a role is, how it is recorded,
and the split-brain guard.

Design, from the roles switched by hand first (KNOWLEDGE.md, "switching a Cyrus 3.6 pair's roles by
hand": 0 of ~7,000 messages lost in 5 of 5 runs with a drain, 21-154 lost without):
- Both instances have a symmetric imapd.conf: each names the other as sync_host, `sync_log: 1`
  on both, `sync_log_chain` off. A replica's sync_server does not log what it applies
  (imap/sync_server.c calls sync_log_suppress() unless sync_log_chain is set; measured: 0 lines
  after 1,468-2,796 replicated messages), so one imapd.conf serves both roles.
- A role is then only which services master runs. The operator writes one cyrus.conf per role:
  the primary's (imap, lmtp, the rolling `sync_client -r` in DAEMON: master respawns it and
  stops it before the drain) and the replica's (imap, sync_server; no lmtp, since nothing may
  deliver to a replica, and no rolling sync_client, since a replica must not replicate).
  `generate --replica-cyrus-conf` puts both paths into the unit, `run` starts master with the one
  of the instance's role. No file of the operator's is ever rewritten, and both go through the
  config model like any cyrus.conf (check_switchable adds the role rules below).
  Not chosen: one cyrus.conf with `run` supervising a rolling sync_client per channel. Master's
  DAEMON section already respawns the client and stops it in the right order, and the replica
  would still run lmtpd (fenced by msg/shutdown.<service> at best).
- The role is a record, `{configdirectory}/cyrushelper/role.json` (state.py), read by `run` at
  every start: it survives reboots and re-deployed units. Before any record exists an instance
  starts in the role its unit was generated with (`generate --initial-role`), and that start
  records it. Afterwards only `switchover` changes it, or `cyrushelper role --set R --force`,
  the operator's tool for a hard failover (the other side is gone for good).
- Split-brain guard: a start that asks for a role (`run --role R`, e.g. an old
  `CYRUSHELPER_RUN_OPTS=--role primary` left in a drop-in) other than the recorded one is refused
  with exit 77 (systemd does not restart it) unless `--force`, which logs loudly and records the
  new role.
- A replica never pushes: its drain skips every channel and `run` starts no leftover drain. Events
  its own users caused stay in its sync log and are replayed, harmlessly (a log line names what
  changed, not the data), once it is primary again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cyrushelper import arguments, channels, exitcodes, instances, proc, state
from cyrushelper.config import ConfigError, Instance

log = logging.getLogger("cyrushelper.role")

ROLES = instances.ROLES


class RoleRefused(Exception):
    """The split-brain guard (or a role change that is not allowed now) refused: nothing changed."""


def check_switchable(inst: Instance) -> list[str]:
    """Raise ConfigError (file:line) for what breaks a switchover; return warnings."""
    imapd = inst.imapd
    where = imapd.where("sync_log")
    if not imapd.sync_log:
        raise ConfigError(*where, "a switchable instance needs `sync_log: 1` in both roles (the imapd.conf "
                                  "is shared by the two roles)")
    if imapd.get_bool("sync_log_chain"):
        raise ConfigError(*imapd.where("sync_log_chain"), "sync_log_chain must be off on a switchable pair: "
                          "a replica would log what it receives and drain it back towards a stopped primary")
    for channel in channels.replication_channels(inst):
        if not channel.host:
            raise ConfigError(*where, f"channel {channel.label} has no sync_host: each side must name the "
                                      "other as its replica")
    replica = inst.cyrus_by_role["replica"]
    for entry in replica.sync_clients:
        command = channels.sync_client_command(entry.argv)
        if command is not None and command.reads_log:
            raise ConfigError(entry.path, entry.line, f"the replica role's cyrus.conf runs a rolling "
                                                      f"sync_client ({entry.name!r}): a replica must not replicate")
    if not replica.sync_servers:
        raise ConfigError(replica.path, None, "the replica role's cyrus.conf has no sync_server in SERVICES")
    warnings = [f"{e.path}:{e.line}: the replica role runs {e.program} ({e.name!r}): deliveries to a replica "
                "are not replicated back" for e in replica.services if e.program == "lmtpd"]
    primary = inst.cyrus_by_role["primary"]
    probe = Instance(imapd, primary, inst.name)
    missing = [c.label for c in channels.replication_channels(probe)
               if c.label not in channels.rolling_channels(probe)]
    if missing:
        warnings.append(f"{primary.path}: no rolling sync_client for channel(s) {', '.join(missing)}: as "
                        "primary, their events wait for the drain at stop")
    return warnings


def start_role(files: instances.InstanceFiles, configdirectory, asked: str | None, force: bool) -> str:
    """The role `run` starts in. Records it when none is recorded yet; raises RoleRefused when
    `asked` contradicts the record (without --force)."""
    record = state.read_role(configdirectory)
    recorded = instances.recorded_role(configdirectory)
    if record is not None and recorded is None:
        raise RoleRefused(f"{state.directory(configdirectory) / state.ROLE} is damaged ({record}): "
                          "set the role with `cyrushelper role --set primary|replica --force`")
    if recorded is None:
        role = asked or files.initial_role
        if role is None:
            raise RoleRefused(f"instance {files.name} has two cyrus.conf but no role: generate its unit with "
                              "--initial-role, or `cyrushelper role --instance NAME --set R --force`")
        state.write_role(configdirectory, role, by="first start" + (" (run --role)" if asked else
                                                                   " (the unit's initial role)"))
        log.info("no role recorded yet: starting as %s and recording it", role)
        return role
    if asked is None or asked == recorded:
        return recorded
    what = (f"instance {files.name} is recorded as {recorded} since {record.get('since', '?')} "
            f"({record.get('by', '?')}), but this start asks for {asked}")
    if not force:
        hint = " (`cyrushelper switchover` makes it primary again, with the proof)" if asked == "primary" else ""
        raise RoleRefused(f"{what}: refused, a second primary would take writes the other side never "
                          f"sees (split brain){hint}; --force overrides")
    log.critical("%s: --force given, starting as %s and recording it. If the other side still runs as "
                 "primary, both now take writes (split brain).", what, asked)
    state.write_role(configdirectory, asked, by="run --role --force", previous=record)
    return asked


def set_role(inst: Instance, role: str, by: str, **extra) -> dict:
    """Change the recorded role of a stopped instance."""
    master = proc.running_master(inst.pid_file)
    if master is not None:
        raise RoleRefused(f"master {master} of {inst.name} is running: a role changes only while the "
                          "instance is stopped (the running master keeps the services of its role)")
    previous = state.read_role(inst.imapd.configdirectory)
    return state.write_role(inst.imapd.configdirectory, role, by=by, previous=previous, **extra)


def describe(inst: Instance) -> dict:
    record = state.read_role(inst.imapd.configdirectory) if inst.switchable else None
    return {"instance": inst.name, "role": inst.role or ("replica" if inst.is_replica else "primary"),
            "switchable": inst.switchable, "record": record,
            "cyrus_conf": str(inst.cyrus.path),
            "cyrus_conf_by_role": {r: str(c.path) for r, c in inst.cyrus_by_role.items()}}


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    arguments.add_instance_arguments(parser)
    parser.add_argument("--set", choices=ROLES, metavar="ROLE",
                        help="record a new role (primary|replica) for the stopped instance; needs --force "
                             "unless --switchover names the switchover doing it")
    parser.add_argument("--force", action="store_true",
                        help="with --set: change the role by hand (a hard failover: the other side is gone)")
    parser.add_argument("--switchover", metavar="ID", help="with --set: the switchover this change belongs to")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    inst = arguments.load_instance(args)
    if args.set:
        if not inst.switchable:
            log.error("instance %s has one cyrus.conf: generate its unit with --replica-cyrus-conf to make it "
                      "switchable", inst.name)
            return exitcodes.CONFIG
        if not (args.force or args.switchover):
            log.error("refusing to change the role of %s by hand without --force (use `cyrushelper "
                      "switchover`, which proves the replica caught up first)", inst.name)
            return exitcodes.REFUSED
        try:
            check_switchable(inst)
            record = set_role(inst, args.set, by=f"switchover {args.switchover}" if args.switchover
                              else "cyrushelper role --set --force", switchover=args.switchover)
        except RoleRefused as e:
            log.error("%s", e)
            return exitcodes.REFUSED
        if args.force and not args.switchover:
            log.critical("role of %s set to %s by hand: make sure the other side is not primary too",
                         inst.name, args.set)
        inst = instances.load(arguments.instance_files(args), record["role"])
    report = describe(inst)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        rec = report["record"] or {}
        print(f"instance {inst.name}: {report['role']}"
              + (f" (since {rec.get('since')}, {rec.get('by')})" if rec else "")
              + (f"; runs {report['cyrus_conf']}" if inst.switchable else " (not switchable)"))
    sys.stdout.flush()
    return exitcodes.OK

"""`cyrushelper status` (one report) and `cyrushelper watch` (live backlog, inotify driven).

status exit codes (LSB-like, for scripts and monitoring):
  0  master runs, every SERVICES listener accepts, no problem
  1  master runs but needs attention: a listener does not accept, or a problem below
  3  master is not running (the report still shows backlog, last stop, markers and problems)
 78  configuration error

In socket mode (an instance whose `run --listeners systemd` recorded itself in the state
directory, state.py) "master" is that process, and `services` shows per SERVICES address its
socket, whether it serves, its workers (busy, idle, down: from the messages Cyrus writes to each
worker's status file, worker.py) and the connections they served since the instance started.
Problems (`problems` in --json, a PROBLEM line each in the text), whether master runs or not: the
sync-log-failure marker (the unclean-stop marker has its own UNCLEAN STOP lines), a sync file system that is full, read-only
or below --space-warn, a channel directory with events that sync_log_channels no longer names, a
sync log that is not a regular file or ends in a cut-off line (the drain checks every line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from cyrushelper import arguments, channels, exitcodes, fence, listeners, proc, role, state, synclog, worker
from cyrushelper.channels import rolling_channels
from cyrushelper.config import ConfigError, Instance
from cyrushelper.probe import probe_address, probe_all
from cyrushelper.syncwatch import DirWatch

log = logging.getLogger("cyrushelper.status")

RUNNING = 0
DEGRADED = 1
NOT_RUNNING = 3

STATUS_EPILOG = """status exit codes:
    0  master runs, every SERVICES listener accepts, no problem
    1  master runs but needs attention: a listener does not accept, or a PROBLEM line
    3  master is not running (backlog, last stop, markers and PROBLEM lines are still reported)
   78  configuration error
"""


def problems(instance: Instance, space_warn: float = synclog.DEFAULT_SPACE_WARN) -> list[str]:
    """Every real problem of the instance's replication, one line each (see the module doc)."""
    # the unclean-stop marker has its own report field and UNCLEAN STOP lines; its sibling is here
    found = [f"{state.describe_marker(name, m)}: reconcile needed (sync_client -A, or `cyrushelper drain "
             "--reconcile auto`)" for name, m in sorted(state.reconcile_markers(instance).items())
             if name != state.UNCLEAN_STOP]
    for channel in instance.channels:
        found += [f"channel {channel.label}: {path} is {kind}, not a regular file (Cyrus cannot append to it)"
                  for path, kind in synclog.irregular_files(channel)]
        for path in (channel.log_run, channel.log):  # the drain reads whole files; status the ends
            cut = synclog.cut_off_end(path)
            if cut is not None:
                found.append(f"channel {channel.label}: {cut}")
    seen = set()
    for channel in instance.channels:
        room = synclog.room(channel.sync_dir)
        if room is None or (room.total_bytes, room.free_bytes) in seen:
            continue
        seen.add((room.total_bytes, room.free_bytes))
        if room.full:
            found.append(f"sync file system FULL: {room.describe()}: Cyrus's sync log writes fail")
        elif room.percent_free < space_warn:
            found.append(f"sync file system low: {room.describe()} (warning below {space_warn:g}%)")
    found += [f"orphaned channel {o.label}: {o.lines} lines in {o.sync_dir} ({', '.join(o.files)}), which "
              "sync_log_channels no longer names: nothing replays them" for o in synclog.orphaned_channels(instance)]
    return found


def collect(instance: Instance, probe: bool = True) -> dict:
    sockets = state.listeners(instance)
    if sockets is not None and sockets.get("mode") == "systemd":
        return _finish(instance, _socket_mode(instance, sockets, probe))
    pid = proc.running_master(instance.pid_file)
    report: dict = {
        "instance": instance.name,
        "mode": "master",
        "master": {
            "pid_file": str(instance.pid_file),
            "pid": pid if pid is not None else proc.read_pid_file(instance.pid_file),
            "running": pid is not None,
            "processes": len(proc.session_members(pid)) if pid is not None else 0,
        },
        **_common(instance),
        "sessions": len(fence.sessions(instance)) if pid is not None else 0,
    }
    if pid is not None and probe:
        report["listeners"] = {name: ("ok" if err is None else err)
                               for name, err in probe_all(instance, timeout=1.0).items()}
    return _finish(instance, report)


def _common(instance: Instance) -> dict:
    return {
        "listeners": {},
        "channels": [],
        "fence": {"path": str(instance.fence_file), "present": fence.fence_present(instance)},
        "unclean_stop": state.unclean_stop(instance),
        "sync_log_failure": state.sync_log_failure(instance),
        "last_reconcile": state.last_reconcile(instance),
        "last_stop": state.last_stop(instance),
        "last_drain": state.last_drain(instance),
        "state_dir": str(state.state_dir(instance)),
        "imapd_conf": str(instance.imapd.path),
        "cyrus_conf": str(instance.cyrus.path),
        "partitions": sorted(instance.imapd.partitions),
        "sync_server_ports": sorted({li.port_number for e, li in instance.listeners
                                     if e.program == "sync_server" and li.port_number}),
        # where each channel replicates to when this instance is primary (whatever its role now)
        "sync_targets": [{"name": c.label, "host": c.host, "port": c.port, "replica": c.replica_address}
                         for c in instance.channels if c.name not in channels.squatter_channels(instance)],
        "switchover": state.read_switchover(instance.imapd.configdirectory),
        "last_switchover": state.last_switchover(instance.imapd.configdirectory),
        **role_report(instance),
    }


def _socket_mode(instance: Instance, recorded: dict, probe: bool) -> dict:
    pid = recorded.get("pid")
    running = isinstance(pid, int) and proc.alive(pid) and proc.start_time(pid) == recorded.get("start_time")
    report = {
        "instance": instance.name,
        "mode": "systemd",
        "master": {"pid": pid, "running": running, "unit": recorded.get("unit"),
                   "what": "run --listeners systemd (no Cyrus master in socket mode)"},
        **_common(instance),
        "sessions": len(fence.sessions(instance)) if running else 0,
        "services": [],
    }
    pools = recorded.get("pools", [])
    running_units = set(proc.unit_members(frozenset(u for p in pools for u in p.get("workers", []))).values())
    for pool in pools:
        slots = [slot_state(path, unit in running_units)
                 for path, unit in zip(pool.get("status_files", []), pool.get("workers", []))]
        entry = {
            "service": pool.get("service"), "socket": pool.get("socket"), "listen": pool.get("listen"),
            "serves": None,
            "workers": {"total": len(slots), **{k: sum(1 for s in slots if s["state"] == k)
                                                 for k in ("busy", "idle", "down")}},
            "connections_served": sum(s["served"] for s in slots),
        }
        if running and probe and pool.get("stream"):
            error = probe_address(*_connect_address(pool.get("listen", "")), pool.get("greets", False), 1.0)
            entry["serves"] = "ok" if error is None else error
            report["listeners"][f"{entry['service']} {entry['listen']}"] = entry["serves"]
        report["services"].append(entry)
    return report


def slot_state(path: str, unit_running: bool) -> dict:
    """One worker slot: busy (in a connection), idle, or down (its unit runs no process), from the
    messages its Cyrus process wrote to the status file (empty until its first connection)."""
    records = worker.read_records(path)
    served = worker.read_served(path) + sum(1 for message, _ in records if message == worker.CONNECTION)
    last_alive = bool(records) and proc.alive(records[-1][1])
    if not (unit_running or last_alive):
        return {"state": "down", "served": served}
    # UNAVAILABLE last: between accept() and CONNECTION, or on its way out: not free either
    busy = last_alive and records[-1][0] != worker.AVAILABLE
    return {"state": "busy" if busy else "idle", "served": served}


def _connect_address(listen: str) -> tuple[int, object]:
    return listeners.Address("ListenStream", listen).connect_address()


def _finish(instance: Instance, report: dict) -> dict:
    rolling = rolling_channels(instance)
    for channel in instance.channels:
        b = synclog.backlog(channel)
        report["channels"].append({
            "name": b.channel, "replica": channel.replica_address, "lines": b.lines,
            "log": b.log, "log_run": b.log_run, "legacy": b.legacy, "files": list(b.files),
            "rolling_sync_client": b.channel in rolling,
        })
    report["problems"] = problems(instance)
    report["exit_code"] = health(report)
    report["state"] = {RUNNING: "running", DEGRADED: "degraded", NOT_RUNNING: "not running"}[report["exit_code"]]
    return report


def role_report(instance: Instance) -> dict:
    """"role" (primary|replica), "switchable", the role record and what the pair rules say."""
    found = role.describe(instance)
    problems, warnings = [], []
    if instance.switchable:
        try:
            warnings = role.check_switchable(instance)
        except ConfigError as e:
            problems.append(str(e))
    return {"role": found["role"], "switchable": found["switchable"], "role_record": found["record"],
            "cyrus_conf_by_role": found["cyrus_conf_by_role"], "switchable_problems": problems,
            "switchable_warnings": warnings}


def health(report: dict) -> int:
    if not report["master"]["running"]:
        return NOT_RUNNING
    if report["unclean_stop"] is not None or report["problems"] \
            or any(v != "ok" for v in report["listeners"].values()):
        return DEGRADED
    return RUNNING


def format_text(report: dict) -> str:
    m = report["master"]
    lines = [f"instance {report['instance']}: {report['state']}, {report['role']}"
             + (" (switchable)" if report["switchable"] else "")]
    for problem in report["switchable_problems"]:
        lines.append(f"  NOT SWITCHABLE: {problem}")
    so = report.get("switchover")
    if so:
        lines.append(f"  UNFINISHED SWITCHOVER {so.get('id', '?')} to {so.get('to', {}).get('target', '?')}: "
                     f"last step {so.get('step', '?')} ({so.get('state', '?')}); run "
                     "`cyrushelper switchover --resume` or `--abort`")
    if report.get("mode") == "systemd":
        state_text = f"PID {m['pid']}" if m["running"] else "not running"
        lines.append(f"  socket mode (systemd holds the sockets, no master): {m['unit']} {state_text}, "
                     f"{report['sessions']} client sessions")
    elif m["running"]:
        lines.append(f"  master: PID {m['pid']}, {m['processes']} processes in its session, "
                     f"{report['sessions']} client sessions")
    else:
        stale = f" (stale PID {m['pid']} in {m['pid_file']})" if m["pid"] else ""
        lines.append(f"  master: not running{stale}")
    for s in report.get("services", []):
        w = s["workers"]
        serves = f", {s['serves']}" if s["serves"] not in (None, "ok") else ""
        lines.append(f"  service {s['service']} on {s['listen']} ({s['socket']}{serves}): workers {w['busy']} busy, "
                     f"{w['idle']} idle, {w['down']} down of {w['total']}; {s['connections_served']} "
                     "connections served")
    for name, result in report["listeners"].items():
        if "services" not in report:
            lines.append(f"  listener {name}: {result}")
    if not report["channels"]:
        lines.append("  replication: no sync channel (sync_log off)")
    for c in report["channels"]:
        files = ", ".join(c["files"]) or "empty"
        roll = "rolling sync_client" if c["rolling_sync_client"] else "no rolling sync_client"
        lines.append(f"  channel {c['name']} -> {c['replica']}: {c['lines']} lines pending ({files}); {roll}")
    if report["fence"]["present"]:
        lines.append(f"  fence present: {report['fence']['path']} (users get BYE, LMTP 421)")
    u = report["unclean_stop"]
    if u is not None:
        lines.append(f"  UNCLEAN STOP: {state.describe_unclean(u)}")
        lines.append(f"    meaning: {state.UNCLEAN_MEANING}")
        lines.append(f"    cleared by: {state.UNCLEAN_CLEARED_BY}")
    elif report.get("last_reconcile") and report.get("sync_log_failure") is None:
        r = report["last_reconcile"]
        lines.append(f"  no unclean stop pending (the last one was cleared {r.get('time', '?')} by "
                     f"{r.get('by', '?')})")
    for problem in report["problems"]:
        lines.append(f"  PROBLEM: {problem}")
    s = report["last_stop"]
    if s is not None:
        lines.append(f"  last stop {s.get('time', '?')}: {s.get('result', s.get('error', '?'))}"
                     + (f" after {s['seconds']}s" if "seconds" in s else ""))
    d = report["last_drain"]
    if d is not None:
        summary = {k: v for k, v in d.items() if not isinstance(v, (dict, list))}
        lines.append("  last drain: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.items())))
    return "\n".join(lines)


# --------------------------------------------------------------------------- watch

def watch(instance: Instance, as_json: bool, interval: float, duration: float, out=sys.stdout) -> int:
    """Print the backlog whenever it changes (at most once per `interval`) and when master exits.
    Woken only by inotify, master's pidfd and signals; ends after `duration` (0: never)."""
    master = {"pid": None, "pidfd": None}
    pending = {"flag": True}

    def emit():
        backlogs = [synclog.backlog(c) for c in instance.channels]
        if as_json:
            out.write(json.dumps({"time": time.time(), "master_pid": master["pid"],
                                  "channels": {b.channel: b.lines for b in backlogs}}) + "\n")
        else:
            who = f"master {master['pid']}" if master["pid"] else "master not running"
            out.write(f"{time.strftime('%H:%M:%S')} {who}; {synclog.format_backlog(backlogs)}\n")
        out.flush()

    def forget_master():
        if master["pidfd"] is not None:
            loop.remove_reader(master["pidfd"])
            os.close(master["pidfd"])
        master["pid"] = master["pidfd"] = None
        pending["flag"] = True

    def follow_master():
        forget_master()
        pid = proc.running_master(instance.pid_file)
        master["pid"] = pid
        if pid is not None:
            try:
                master["pidfd"] = os.pidfd_open(pid)
                loop.add_reader(master["pidfd"], forget_master)  # readable once master exits
            except OSError:
                pass

    def on_change():
        changed = dw.read()
        if "pid" in changed:
            follow_master()  # a new master wrote its pid file
        if changed:
            pending["flag"] = True

    end = time.monotonic() + duration if duration > 0 else None
    with proc.Loop() as loop, DirWatch() as dw:
        loop.handle_signals(signal.SIGINT, signal.SIGTERM)
        for channel in instance.channels:
            dw.add_channel(channel)
        dw.add_file("pid", instance.pid_file)
        dw.read()
        follow_master()
        loop.add_reader(dw, on_change)
        last = None
        while True:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            if pending["flag"] and (last is None or now - last >= interval):
                emit()
                last, pending["flag"] = now, False
            timeout = None if end is None else end - now
            if pending["flag"]:
                due = last + interval - now
                timeout = due if timeout is None else min(timeout, due)
            if loop.poll(timeout):
                break  # SIGINT / SIGTERM
        forget_master()
    return exitcodes.OK


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    arguments.add_instance_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output"
                        + (" (one JSON object per line)" if name == "watch" else ""))
    if name == "status":
        parser.epilog = STATUS_EPILOG + "\n" + (parser.epilog or "")
        parser.add_argument("--no-probe", action="store_true",
                            help="do not connect to the listeners (a probe starts a Cyrus process each)")
        parser.add_argument("--ack-unclean", action="store_true",
                            help="remove the reconcile markers (unclean stop, failed sync log writes) "
                                 "after you reconciled by hand with sync_client -A")
    else:
        parser.add_argument("--interval", type=arguments.seconds, default=0.25, metavar="SECONDS",
                            help="at most one line per interval (default 0.25)")
        parser.add_argument("--duration", type=arguments.seconds, default=0, metavar="SECONDS",
                            help="stop after this long (default: until Ctrl-C / SIGTERM)")


def main(args: argparse.Namespace) -> int:
    instance = arguments.load_instance(args)
    if args.command == "watch":
        return watch(instance, args.json, args.interval, args.duration)
    if args.ack_unclean:
        cleared = state.clear_reconcile_markers(instance, by="cyrushelper status --ack-unclean")
        if cleared:
            log.info("reconcile markers removed from %s: %s", state.state_dir(instance), ", ".join(cleared))
        else:
            log.info("no reconcile marker to remove")
    report = collect(instance, probe=not args.no_probe)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_text(report))
    return report["exit_code"]

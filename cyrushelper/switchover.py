"""`cyrushelper switchover --from A --to B`: soft failover in one command (issue 8), demote before
promote, with proof that the replica has every event before the roles change.

Run as root on A's host. A and B are instances of units made by `cyrushelper generate` with two
cyrus.conf files (role.py explains the roles); `--to NAME@HOST` reaches B over ssh as root and runs
`systemctl` and B's own cyrushelper there (remote.py). The steps, each persisted in A's
`{configdirectory}/cyrushelper/switchover.json` when it starts and when it ends, each logged as one
journal line with its duration:

  preflight          nothing changes. Refused (exit 77) unless: both units exist and are
                     switchable, A runs as primary and B as replica, A's channels replicate to B's
                     sync_server and B's to A's, B's sync_server answers, both configs pass the
                     config model and the pair rules, same partitions, no unclean-stop marker on A
                     (--force: the proof then reconciles it), every channel's backlog under
                     --max-backlog, no other switchover of either.  --dry-run stops here.
  stop_old_primary   `systemctl stop cyrus@A`: fence, one SIGTERM, drain of every channel (the
                     ordinary lossless stop). Done only when the unit is inactive and no event is
                     left in any channel's sync log (judged by the files).
  proof              A stopped (its files read offline), B running as replica: every mailbox of
                     both compared (mailboxes.py: UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, count, the
                     (UID, GUID) and (UID, MODSEQ, flags) digests). Differences are repaired from A
                     without copyback (`sync_client -O -u USER…`, `-O -A` when a shared mailbox
                     differs: A's state wins, nothing of B's flows back into A) within
                     --repair-timeout and compared again; still unequal → abort. The comparison is
                     written per mailbox, both sides' values, to proof-<id>.json in A's state
                     directory; stdout gets the summary. Success clears A's unclean-stop marker.
  stop_old_replica   `systemctl stop cyrus@B`.
  demote             A's role record := replica.
  promote            B's role record := primary.                  ← the point of no return
  start_new_replica  `systemctl start cyrus@A` (as replica). First: a sync_client that cannot
                     connect backs off 15 s, 30 s … (KNOWLEDGE.md).
  start_new_primary  `systemctl start cyrus@B` (as primary; READY once its listeners serve).
  verify             a canary delivered by LMTP to B must show up on A, same UID and GUID, within
                     --canary-timeout (a deadline this command enforces). Exit 0 only now.

A failure before `promote` has completed rolls back: A's role back to primary, B started as
replica, A started (its start removes the fence; events a failed drain kept are replayed), exit
65. After `promote` the only way is forward: the command, or `--resume`, finishes the starts and the
canary; switching back is another switchover. `--resume` after a crash or SIGKILL continues from
the last completed step (each step can safely run again) or finishes a rollback that was under
way; `--abort` rolls back by hand (refused past the point of no return). `status` shows an
unfinished switchover.

Test hook: with CYRUSHELPER_SWITCHOVER_KILL_AFTER=STEP the command SIGKILLs itself right after
persisting STEP's end (tests prove --resume from every step with it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cyrushelper import (arguments, canary, channels, cyrus, exitcodes, instances, journal, mailboxes, role,
                         state, synclog)
from cyrushelper.config import ConfigError, Instance
from cyrushelper.locks import ChannelLock, LockBusy
from cyrushelper.remote import Host, RemoteError, parse_target

log = logging.getLogger("cyrushelper.switchover")

STEPS = ("preflight", "stop_old_primary", "proof", "stop_old_replica", "demote", "promote",
         "start_new_replica", "start_new_primary", "verify")
NO_RETURN = "promote"
KILL_HOOK = "CYRUSHELPER_SWITCHOVER_KILL_AFTER"
LOCK_NAME = "switchover.lock"
QUERY_TIMEOUT = 120.0


class StepFailed(Exception):
    """A step could not be completed; the message says why (and what was kept)."""


class Refused(Exception):
    """A pre-flight check (or the command line) refused: nothing changed."""


# --------------------------------------------------------------------------- the two sides

class Side:
    """One instance of the pair: where it lives, its files (from its unit), and how to drive it."""

    def __init__(self, name: str, host: Host, timeout: float = QUERY_TIMEOUT):
        self.name, self.host, self.timeout = name, host, timeout
        r = host.run(instances.show_command(name), timeout)
        files = instances.parse_show(name, r.stdout) if r.returncode == 0 else None
        if files is None:
            raise Refused(f"{self.target}: no unit {instances.unit_name(name)} made by `cyrushelper generate` "
                          f"on {host} ({(r.stderr or r.stdout).strip()[-200:] or 'not loaded'})")
        self.files = files
        self.unit = instances.unit_name(name)

    @property
    def target(self) -> str:
        return self.name if self.host.local else f"{self.name}@{self.host.address}"

    def helper(self, *args: str) -> list[str]:
        if not self.files.helper:
            raise Refused(f"{self.target}: the unit's ExecStart names no program")
        return [self.files.helper, *args, "--instance", self.name]

    def status(self) -> dict:
        return self.host.json(self.helper("status", "--json", "--no-probe"), self.timeout, ok_codes=(0, 1, 3))

    def probe(self) -> dict:
        return self.host.json(self.helper("status", "--json"), self.timeout, ok_codes=(0, 1, 3))

    def facts(self) -> dict[str, mailboxes.Facts]:
        data = self.host.json(self.helper("mailboxes", "--json"), self.timeout * 5, ok_codes=(0, 1))
        return {name: mailboxes.Facts.from_json(f) for name, f in data.get("mailboxes", {}).items()}

    def unit_state(self) -> dict:
        r = self.host.run(["systemctl", "show", "--property=ActiveState,SubState,Result", self.unit], self.timeout)
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def systemctl(self, verb: str, timeout: float) -> subprocess.CompletedProcess:
        return self.host.run(["systemctl", verb, self.unit], timeout)

    def set_role(self, new_role: str, switchover_id: str) -> None:
        self.host.run(self.helper("role", "--set", new_role, "--switchover", switchover_id, "--json"),
                      self.timeout, check=True)

    def canary(self, tag: str, rcpt: str) -> dict:
        return self.host.json(self.helper("canary", "--json", "--tag", tag, "--rcpt", rcpt), self.timeout)


# --------------------------------------------------------------------------- the state machine

class Switchover:
    def __init__(self, args: argparse.Namespace, a: Side, b: Side):
        self.args, self.a, self.b = args, a, b
        self.a_files = a.files
        self.configdirectory = instances.load(a.files).imapd.configdirectory
        self.record: dict = {}
        self.out = sys.stdout

    # -- records
    def instance_a(self, as_role: str | None = None) -> Instance:
        return instances.load(self.a_files, as_role)

    def save(self) -> None:
        state.write_switchover(self.configdirectory, self.record)

    def say(self, text: str) -> None:
        if not self.args.json:
            print(text, file=self.out, flush=True)

    def new_record(self) -> dict:
        now = time.strftime("%Y%m%dT%H%M%S")
        return {"id": f"{now}-{self.a_files.name}-{self.b.name}", "started": state.now_iso(),
                "from": {"instance": self.a_files.name, "host": None, "target": self.a_files.name,
                         "files": self.a_files.to_json()},
                "to": {"instance": self.b.name, "host": self.b.host.address, "target": self.b.target,
                       "files": self.b.files.to_json()},
                "state": "running", "step": None, "current": None, "steps": []}

    def run_step(self, name: str, func) -> dict:
        t0 = time.monotonic()
        self.record["current"] = name
        self.record.setdefault("timeline", {})[f"{name}_start"] = time.time()
        self.save()
        ok, detail = True, ""
        try:
            detail = func() or ""
        except (StepFailed, RemoteError, ConfigError, mailboxes.MailboxError, canary.CanaryError) as e:
            ok, detail = False, str(e)
        seconds = round(time.monotonic() - t0, 3)
        entry = {"step": name, "ok": ok, "seconds": seconds, "detail": detail, "ended": state.now_iso()}
        self.record["steps"].append(entry)
        self.record["timeline"][f"{name}_end"] = time.time()
        self.record["current"] = None
        if ok:
            self.record["step"] = name
        self.save()
        (log.info if ok else log.error)("switchover %s: step %s %s in %.2fs%s", self.record["id"], name,
                                        "done" if ok else "FAILED", seconds, f": {detail}" if detail else "")
        self.say(f"[{'ok' if ok else 'FAILED'}] {name} {seconds:.2f}s{': ' + detail if detail else ''}")
        if ok:
            kill_hook(name)
        if not ok:
            raise StepFailed(f"{name}: {detail}")
        return entry

    def passed(self, step: str) -> bool:
        done = self.record.get("step")
        return done is not None and done in STEPS and STEPS.index(done) >= STEPS.index(step)

    # -- pre-flight
    def preflight(self) -> str:
        problems: list[str] = []
        a_inst = self.instance_a()
        if not a_inst.switchable:
            problems.append(f"{self.a_files.name}: not switchable (generate its unit with --replica-cyrus-conf)")
        elif a_inst.role != "primary":
            problems.append(f"{self.a_files.name} is recorded as {a_inst.role}, not primary")
        if a_inst.switchable:
            try:
                for warning in role.check_switchable(a_inst):
                    log.warning("%s", warning)
            except ConfigError as e:
                problems.append(str(e))
        a_unit = self.a.unit_state()
        if a_unit.get("ActiveState") != "active":
            problems.append(f"{self.a.unit} is {a_unit.get('ActiveState')}, not active: start it first")
        marker = state.unclean_stop(a_inst)
        if marker is not None:
            text = f"{self.a_files.name}: {state.describe_unclean(marker)}"
            if self.args.force:
                log.critical("%s: going on (--force); the proof compares every mailbox and repairs", text)
            else:
                problems.append(text + " (reconcile first, or --force: the proof reconciles)")
        for b in (synclog.backlog(c) for c in channels.replication_channels(a_inst)):
            if b.lines > self.args.max_backlog:
                problems.append(f"{self.a_files.name}: channel {b.channel} holds {b.lines} lines, more than "
                                f"--max-backlog {self.args.max_backlog}: let replication catch up first")
        b_status = self.b.probe()
        if not b_status.get("switchable"):
            problems.append(f"{self.b.target}: not switchable (generate its unit with --replica-cyrus-conf)")
        elif b_status.get("role") != "replica":
            problems.append(f"{self.b.target} is {b_status.get('role')}, not replica")
        problems += [f"{self.b.target}: {p}" for p in b_status.get("switchable_problems", [])]
        if not b_status.get("master", {}).get("running"):
            problems.append(f"{self.b.target}: master is not running (the replica must be up)")
        bad = {k: v for k, v in b_status.get("listeners", {}).items() if v != "ok"}
        if bad:
            problems.append(f"{self.b.target}: listeners not answering: {bad}")
        if b_status.get("switchover"):
            problems.append(f"{self.b.target}: has an unfinished switchover of its own")
        if sorted(a_inst.imapd.partitions) != b_status.get("partitions"):
            problems.append(f"partitions differ: {self.a_files.name} {sorted(a_inst.imapd.partitions)}, "
                            f"{self.b.target} {b_status.get('partitions')}")
        problems += self.check_directions(a_inst, b_status)
        if problems:
            raise Refused("; ".join(problems))
        return (f"{self.a_files.name} primary -> {self.b.target} replica; backlog "
                + " ".join(f"{c['name']}={c['lines']}" for c in self.status_a_channels(a_inst)))

    def status_a_channels(self, inst: Instance) -> list[dict]:
        return [{"name": b.channel, "lines": b.lines}
                for b in (synclog.backlog(c) for c in channels.replication_channels(inst))]

    def check_directions(self, a_inst: Instance, b_status: dict) -> list[str]:
        """A's channels must reach B's sync_server, and B's channels (as primary) A's replica role's."""
        problems = []
        b_ports = set(b_status.get("sync_server_ports", []))
        for ch in channels.replication_channels(a_inst):
            if ch.port is None or not str(ch.port).isdigit() or int(ch.port) not in b_ports:
                problems.append(f"{self.a_files.name}: channel {ch.label} replicates to {ch.replica_address}, "
                                f"but {self.b.target}'s sync_server listens on port(s) {sorted(b_ports)}")
            elif not self.b.host.local and ch.host not in (self.b.host.address, None):
                log.warning("%s: channel %s replicates to host %s; --to names %s (assuming the same host)",
                            self.a_files.name, ch.label, ch.host, self.b.host.address)
        a_replica = self.instance_a("replica")
        a_ports = {li.port_number for e, li in a_replica.listeners if e.program == "sync_server"}
        for ch in b_status.get("sync_targets", []):
            if not str(ch.get("port", "")).isdigit() or int(ch["port"]) not in a_ports:
                problems.append(f"{self.b.target}: channel {ch.get('name')} replicates to "
                                f"{ch.get('replica')}, but {self.a_files.name}'s replica role listens with "
                                f"sync_server on port(s) {sorted(p for p in a_ports if p)}")
        try:
            b_server = next(iter(sorted(b_ports)))
            host = next((c.host for c in channels.replication_channels(a_inst) if c.host), "127.0.0.1")
            with socket.create_connection((host, b_server), timeout=10) as s:
                s.settimeout(10)
                if not s.recv(200):
                    problems.append(f"{self.b.target}: sync_server at {host}:{b_server} closed without a banner")
        except StopIteration:
            problems.append(f"{self.b.target}: runs no sync_server")
        except OSError as e:
            problems.append(f"{self.b.target}: sync_server does not answer: {e}")
        return problems

    # -- the steps
    def stop_old_primary(self) -> str:
        self.a.systemctl("stop", self.args.stop_timeout)
        unit = self.a.unit_state()
        inst = self.instance_a()
        left = [synclog.backlog(c) for c in channels.replication_channels(inst)]
        pending = {b.channel: b.lines for b in left if not b.empty}
        drain = state.last_drain(inst) or {}
        if unit.get("ActiveState") not in ("inactive", "failed"):
            raise StepFailed(f"{self.a.unit} is {unit.get('ActiveState')} after `systemctl stop`")
        if pending:
            raise StepFailed(f"the drain left events in {pending} (unit {unit.get('Result')}, drain exit "
                             f"{drain.get('exit_code')}): kept for the next start")
        if unit.get("ActiveState") == "failed":
            log.warning("%s ended failed (%s) but every channel is empty", self.a.unit, unit.get("Result"))
        lines = sum(c.get("lines_before", 0) for c in drain.get("channels", []))
        return f"{self.a.unit} stopped ({unit.get('Result')}); drained {lines} lines, 0 left"

    def proof(self) -> str:
        a_inst = self.instance_a()
        rounds = []
        t_end = time.monotonic() + self.args.repair_timeout
        for attempt in (1, 2):
            t0 = time.monotonic()
            a_facts = mailboxes.collect(a_inst)
            b_facts = self.b.facts()
            diffs = compare(a_facts, b_facts)
            rounds.append({"attempt": attempt, "seconds": round(time.monotonic() - t0, 3),
                           "mailboxes": len(set(a_facts) | set(b_facts)), "differing": len(diffs)})
            report = self.write_report(a_facts, b_facts, diffs, rounds)
            if not diffs:
                break
            if attempt == 2:
                raise StepFailed(f"{len(diffs)} mailbox(es) still differ after the repair (e.g. "
                                 f"{describe_diff(diffs[0])}): a difference sync_client cannot push without "
                                 "copying the replica's own changes back, e.g. a change made on the replica; "
                                 f"report {report}")
            self.say(f"proof: {len(diffs)} mailbox(es) differ, repairing from {self.a_files.name}: "
                     + "; ".join(describe_diff(d) for d in diffs[:5]))
            self.repair(a_inst, diffs, max(1.0, t_end - time.monotonic()))
        messages = sum(f.messages or 0 for f in a_facts.values())
        summary = (f"{len(a_facts)} mailboxes, {messages} messages equal on both sides"
                   + (f" after repairing {rounds[0]['differing']}" if len(rounds) > 1 else "")
                   + f" ({rounds[-1]['seconds']:.2f}s); report {report}")
        self.record["proof"] = {"rounds": rounds, "report": str(report), "mailboxes": len(a_facts),
                                "messages": messages}
        if state.clear_unclean_stop(a_inst, by=f"switchover proof {self.record['id']}: every mailbox equal on "
                                               f"{self.b.target}"):
            summary += "; unclean-stop marker cleared"
        return summary

    def repair(self, a_inst: Instance, diffs: list[dict], timeout: float) -> None:
        users = sorted({u for d in diffs if (u := mailboxes.owner(d["name"]))})
        shared = [d["name"] for d in diffs if mailboxes.owner(d["name"]) is None]
        sync_client = str(cyrus.bin_dir() / "sync_client")
        commands = []
        for ch in channels.replication_channels(a_inst):
            # -O: no copyback. By default sync_client copies a change the replica holds with a higher
            # MODSEQ back to the primary (measured: a message expunged on the replica then vanished
            # from the primary too). The proof repairs towards A only; what -O cannot push (such a
            # replica-side change) stays unequal, and the switchover aborts.
            base = [sync_client, "-C", str(a_inst.imapd.path), "-O"] + (["-n", ch.name] if ch.name else [])
            if users:
                commands.append(base + ["-u", *users])
            if shared:
                commands.append(base + ["-A"])
        end = time.monotonic() + timeout
        for cmd in commands:
            log.info("proof repair: %s", shlex.join(cmd))
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                   timeout=max(1.0, end - time.monotonic()), start_new_session=True)
            except subprocess.TimeoutExpired:
                raise StepFailed(f"repair `{shlex.join(cmd)}` did not finish within --repair-timeout") from None
            if r.returncode != 0:
                log.warning("repair %s exited %d: %s", cmd[-1], r.returncode, (r.stderr or r.stdout).strip()[-300:])

    def write_report(self, a_facts, b_facts, diffs, rounds) -> Path:
        path = state.ensure_directory(self.configdirectory) / f"proof-{self.record['id']}.json"
        names = sorted(set(a_facts) | set(b_facts))
        differing = {d["name"]: d["fields"] for d in diffs}
        state.write_json_atomic(path, {
            "switchover": self.record["id"], "time": state.now_iso(), "rounds": rounds,
            "from": self.a_files.name, "to": self.b.target,
            "summary": {"mailboxes": len(names), "differing": len(diffs),
                        "messages_from": sum(f.messages or 0 for f in a_facts.values()),
                        "messages_to": sum(f.messages or 0 for f in b_facts.values())},
            "mailboxes": [{"name": n, "equal": n not in differing, "differs": differing.get(n, []),
                           self.a_files.name: a_facts[n].to_json() if n in a_facts else None,
                           self.b.target: b_facts[n].to_json() if n in b_facts else None} for n in names],
        })
        return path

    def stop_old_replica(self) -> str:
        self.b.systemctl("stop", self.args.stop_timeout)
        unit = self.b.unit_state()
        if unit.get("ActiveState") not in ("inactive", "failed"):
            raise StepFailed(f"{self.b.unit} on {self.b.host} is {unit.get('ActiveState')} after `systemctl stop`")
        return f"{self.b.target} stopped ({unit.get('Result')})"

    def demote(self) -> str:
        role.set_role(self.instance_a(), "replica", by=f"switchover {self.record['id']}",
                      switchover=self.record["id"])
        return f"{self.a_files.name} recorded as replica"

    def promote(self) -> str:
        self.b.set_role("primary", self.record["id"])
        return f"{self.b.target} recorded as primary"

    def start(self, side: Side, want_role: str) -> str:
        r = side.systemctl("start", self.args.start_timeout)
        unit = side.unit_state()
        if unit.get("ActiveState") != "active":
            raise StepFailed(f"`systemctl start {side.unit}` on {side.host} failed ({r.returncode}, "
                             f"{unit.get('ActiveState')}/{unit.get('Result')}): {r.stderr.strip()[-300:]}")
        got = side.status()
        if got.get("role") != want_role or got.get("cyrus_conf") != got.get("cyrus_conf_by_role", {}).get(want_role):
            raise StepFailed(f"{side.target} started as {got.get('role')}, not {want_role}")
        return f"{side.target} serves as {want_role}"

    def verify(self) -> str:
        t0 = time.monotonic()
        sent = self.b.canary(self.record["id"], self.args.canary_rcpt)
        self.record["canary"] = sent
        deadline = t0 + self.args.canary_timeout
        a_replica = self.instance_a("replica")
        while True:
            if canary.arrived(a_replica, sent):
                seconds = time.monotonic() - t0
                self.record["canary"]["arrived_after"] = round(seconds, 3)
                return (f"canary UID {sent['uid']} in {sent['mailbox']} delivered to {self.b.target}, on "
                        f"{self.a_files.name} after {seconds:.2f}s")
            if time.monotonic() >= deadline:
                raise StepFailed(f"canary UID {sent['uid']} ({sent['message_id']}) delivered to {self.b.target} "
                                 f"did not reach {self.a_files.name} within {self.args.canary_timeout:g}s")
            time.sleep(0.2)

    # -- whole runs
    def forward(self) -> int:
        actions = {"stop_old_primary": self.stop_old_primary, "proof": self.proof,
                   "stop_old_replica": self.stop_old_replica, "demote": self.demote, "promote": self.promote,
                   "start_new_replica": lambda: self.start(self.a, "replica"),
                   "start_new_primary": lambda: self.start(self.b, "primary"), "verify": self.verify}
        for step in STEPS[1:]:
            if self.passed(step):
                continue
            try:
                self.run_step(step, actions[step])
            except StepFailed as e:
                if not self.passed(NO_RETURN):
                    self.say(f"switchover failed before the roles were swapped ({e}): rolling back")
                    return self.rollback(str(e))
                # past the point of no return: keep the record, --resume finishes (or retries the canary)
                outcome = "unverified" if step == "verify" else "failed"
                return self.finish(outcome, exitcodes.UNVERIFIED if step == "verify" else exitcodes.UNFINISHED,
                                   str(e), keep=True)
        return self.finish("done", exitcodes.OK, f"{self.b.target} is primary, {self.a_files.name} its replica; "
                                                 "new direction verified")

    def rollback(self, reason: str) -> int:
        self.record["state"] = "rolling back"
        self.record["rollback_reason"] = reason
        self.save()

        def restore() -> str:
            notes = []
            if instances.recorded_role(self.configdirectory) != "primary":
                role.set_role(self.instance_a(), "primary", by=f"switchover {self.record['id']} rolled back",
                              switchover=self.record["id"])
            try:   # B is best effort: a dead replica must not keep A from serving again
                b_status = self.b.status()
                if b_status.get("role") != "replica" and not b_status.get("master", {}).get("running"):
                    self.b.set_role("replica", self.record["id"])
                if self.b.unit_state().get("ActiveState") != "active":
                    r = self.b.systemctl("start", self.args.start_timeout)
                    if r.returncode != 0:
                        raise RemoteError(f"`systemctl start {self.b.unit}` failed: {r.stderr.strip()[-200:]}")
            except RemoteError as e:
                notes.append(f"{self.b.target} not restored ({e}); A's events stay in its sync log until "
                             "the replica is back")
            r = self.a.systemctl("start", self.args.start_timeout)
            if self.a.unit_state().get("ActiveState") != "active":
                raise StepFailed(f"`systemctl start {self.a.unit}` failed ({r.returncode}): {r.stderr.strip()[-300:]}")
            return "; ".join([f"{self.a_files.name} serves as primary again (fence removed)"] + notes)

        try:
            self.run_step("rollback", restore)
        except StepFailed as e:
            return self.finish("rollback failed", exitcodes.UNFINISHED, f"{reason}; rollback: {e}", keep=True)
        return self.finish("rolled back", exitcodes.ROLLED_BACK, reason)

    def finish(self, outcome: str, code: int, detail: str, keep: bool = False) -> int:
        self.record.update(state=outcome, outcome=outcome, exit_code=code, detail=detail, ended=state.now_iso())
        timeline = self.record.get("timeline", {})
        if "stop_old_primary_start" in timeline and "start_new_primary_end" in timeline:
            self.record["write_outage_bound"] = round(timeline["start_new_primary_end"]
                                                      - timeline["stop_old_primary_start"], 3)
        if keep:
            self.save()
        else:
            state.finish_switchover(self.configdirectory, self.record)
        (log.info if code == 0 else log.error)("switchover %s: %s (exit %d): %s", self.record["id"], outcome,
                                               code, detail)
        if self.args.json:
            print(json.dumps(self.record, indent=2, sort_keys=True))
        else:
            self.say(f"switchover {self.record['id']}: {outcome}: {detail}")
        return code


def kill_hook(step: str) -> None:
    """The test hook: SIGKILL ourselves right after `step`'s end was persisted."""
    if os.environ.get(KILL_HOOK) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def compare(a: dict[str, mailboxes.Facts], b: dict[str, mailboxes.Facts]) -> list[dict]:
    diffs = []
    for name in sorted(set(a) | set(b)):
        fa, fb = a.get(name), b.get(name)
        if fa is None or fb is None:
            diffs.append({"name": name, "fields": ["missing on " + ("from" if fa is None else "to")]})
            continue
        fields = fa.differences(fb)
        if fields:
            diffs.append({"name": name, "fields": fields,
                          "from": {f: getattr(fa, f) for f in fields}, "to": {f: getattr(fb, f) for f in fields}})
    return diffs


def describe_diff(diff: dict) -> str:
    if "from" not in diff:
        return f"{diff['name']} {diff['fields'][0]}"
    parts = [f"{f} {diff['from'][f]}≠{diff['to'][f]}" if f not in ("content", "state")
             else f"{f} digest" for f in diff["fields"]]
    return f"{diff['name']}: " + ", ".join(parts)


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="A",
                        help="the primary instance on this host (cyrus@A)")
    parser.add_argument("--to", dest="target", required=True, metavar="B[@HOST]",
                        help="its replica: an instance on this host, or NAME@HOST reached as root over ssh")
    parser.add_argument("--dry-run", action="store_true", help="run the pre-flight checks, print the plan, "
                                                               "change nothing")
    parser.add_argument("--resume", action="store_true",
                        help="continue an unfinished switchover (after a crash or kill) from its last step, "
                             "or finish its rollback")
    parser.add_argument("--abort", action="store_true",
                        help="roll an unfinished switchover back (refused once B was promoted)")
    parser.add_argument("--json", action="store_true", help="print the final record as JSON on stdout")
    parser.add_argument("--force", action="store_true",
                        help="go on despite an unclean-stop marker on A (logged loudly; the proof then "
                             "compares and repairs every mailbox)")
    parser.add_argument("--max-backlog", type=int, default=50000, metavar="LINES",
                        help="refuse when a channel of A holds more sync log lines (default 50000)")
    parser.add_argument("--stop-timeout", type=arguments.positive_seconds, default=600.0, metavar="SECONDS",
                        help="bound of each `systemctl stop` (A's includes its drain; default 600)")
    parser.add_argument("--start-timeout", type=arguments.positive_seconds, default=300.0, metavar="SECONDS",
                        help="bound of each `systemctl start` (default 300)")
    parser.add_argument("--repair-timeout", type=arguments.positive_seconds, default=600.0, metavar="SECONDS",
                        help="bound of the proof's repair with sync_client (default 600)")
    parser.add_argument("--canary-timeout", type=arguments.positive_seconds, default=60.0, metavar="SECONDS",
                        help="the canary must reach the new replica within this long (default 60)")
    parser.add_argument("--canary-rcpt", default=canary.DEFAULT_RCPT, metavar="ADDRESS",
                        help=f"recipient of the canary on the new primary (default {canary.DEFAULT_RCPT})")


def main(args: argparse.Namespace) -> int:
    if journal.logs_to_stderr():
        journal.also_to_syslog("cyrushelper-switchover")
    if args.resume and args.abort:
        log.error("--resume and --abort exclude each other")
        return exitcodes.USAGE
    try:
        b_name, b_host = parse_target(args.target)
    except ValueError as e:
        log.error("--to: %s", e)
        return exitcodes.USAGE
    if b_host.local and b_name == args.source:
        log.error("--from and --to name the same instance")
        return exitcodes.USAGE
    try:
        a = Side(args.source, Host(None))
        configdirectory = instances.load(a.files).imapd.configdirectory
    except (Refused, RemoteError, ConfigError) as e:
        log.error("refused: %s", e)
        return exitcodes.REFUSED
    lock = ChannelLock(state.ensure_directory(configdirectory) / LOCK_NAME)
    try:
        lock.acquire(0)
    except LockBusy as e:
        log.error("refused: another switchover of %s is running (%s)", args.source, e)
        return exitcodes.REFUSED
    try:
        return _main(args, a, b_name, b_host, configdirectory)
    finally:
        lock.release()


def _main(args, a: Side, b_name: str, b_host: Host, configdirectory) -> int:
    existing = state.read_switchover(configdirectory)
    if (args.resume or args.abort) and existing is None:
        log.error("refused: no unfinished switchover of %s to resume or abort", args.source)
        return exitcodes.REFUSED
    if existing is not None and not (args.resume or args.abort or args.dry_run):
        log.error("refused: switchover %s of %s is unfinished (last step %s, %s): --resume or --abort",
                  existing.get("id"), args.source, existing.get("step"), existing.get("state"))
        return exitcodes.REFUSED
    if existing is not None and existing.get("to", {}).get("target") != (b_name if b_host.local else args.target):
        log.error("refused: the unfinished switchover goes to %s, not %s", existing.get("to", {}).get("target"),
                  args.target)
        return exitcodes.REFUSED
    try:
        b = Side(b_name, b_host)
        so = Switchover(args, a, b)
    except (Refused, RemoteError, ConfigError) as e:
        log.error("refused: %s", e)
        return exitcodes.REFUSED
    if args.resume or args.abort:
        so.record = existing
        log.info("switchover %s: %s after step %s (%s)", existing["id"], "resuming" if args.resume else "aborting",
                 existing.get("step"), existing.get("state"))
        if args.abort or existing.get("state") in ("rolling back", "rollback failed"):
            if so.passed(NO_RETURN):
                log.error("refused: switchover %s is past the point of no return (%s is primary): finish it with "
                          "--resume, then switch back", existing["id"], b.target)
                return exitcodes.REFUSED
            return so.rollback(existing.get("rollback_reason") or "aborted by --abort")
        so.record["state"] = "running"
        return so.forward()
    so.record = so.new_record()
    try:
        plan = so.preflight()
    except (Refused, RemoteError, ConfigError, mailboxes.MailboxError) as e:
        log.error("refused, nothing changed: %s", e)
        so.say(f"[REFUSED] preflight: {e}")
        if args.json:
            print(json.dumps({"outcome": "refused", "exit_code": exitcodes.REFUSED, "detail": str(e)}))
        return exitcodes.REFUSED
    so.say(f"[ok] preflight: {plan}")
    if args.dry_run:
        so.say("plan: " + " -> ".join(STEPS[1:]) + f" (dry run: nothing changed; point of no return: {NO_RETURN})")
        return exitcodes.OK
    so.record["steps"].append({"step": "preflight", "ok": True, "seconds": 0, "detail": plan,
                               "ended": state.now_iso()})
    so.record["step"] = "preflight"
    so.save()
    log.info("switchover %s: step preflight done: %s", so.record["id"], plan)
    kill_hook("preflight")
    return so.forward()

"""`cyrushelper run --listeners systemd`: the instance's main process in socket mode.

systemd holds the listening sockets and runs every Cyrus service as a pool of worker units
(listeners.py names them, worker.py hands each its socket); no master runs. The instance unit is
ordered after the sockets and workers, so systemd starts it last and stops it first: this process
is the one that can act on the workers while they still run.

Start: the workers start before us. READY=1 once every socket is served: a connect alone proves
nothing (the kernel accepts into the backlog while no worker runs), so each socket whose service
speaks first must greet, which only a worker's accept loop can do (probe.py). Then, as in master
mode: STATUS= with the replication backlog, the leftover drain and reconcile after READY.

Stop or restart (SIGTERM): systemd does not tell a service which of the two it is, so we ask
(systemctl.job_type). Then:
1. stop only: the socket units get a stop job (`--no-block`: it runs after ours). From now on a
   new connection is closed at once and, once the sockets are closed, refused. A restart leaves
   them listening: new connections wait in the backlog for the next workers.
2. SIGHUP to every worker, once (every signal goes through systemd, so that it comes from the
   process's parent, as under master): an idle worker exits at once, a busy one after its connection
   (master/service.c; measured: SIGTERM instead cut LMTP transactions at DATA or end-of-data).
   SIGTERM to a running EVENTS job (Cyrus ends it at its next safe point); SIGTERM to the DAEMON
   processes (the rolling sync_client) once no worker or job is left, as master stops its
   daemons after its services. All these units are ordered before ours and their own stop or
   restart jobs are pending, so systemd restarts none of them (measured, 252 and 257: they wait
   in auto-restart until our stop has finished).
3. --fence-after seconds later, for sessions still open (an IMAP client stays for hours): the
   fence msg/shutdown, so users get `* BYE [ALERT]` and LMTP `421` at their next command.
   LMTP deliveries in flight are the exception to 2 and 3: SIGHUP interrupts lmtpd's read of the
   message body too (lib/prot.c treats a read interrupted with SIGHUP pending as an error;
   measured with a slow sender on 3.6 and 3.10: the transaction was cut after DATA, which the MTA
   retries and Cyrus may already have stored: a duplicate). So when an LMTP connection is open at
   the stop (fence.Deliveries, from the kernel's socket tables), the fence goes up at once -- no
   transaction can start, one in flight finishes and lmtpd exits after its next command -- and
   the LMTP workers get their SIGHUP only once those connections are closed or the grace is over,
   exactly as master mode's grace waits for them before master's SIGTERM.
4. --grace seconds after the SIGHUP: one SIGTERM to each worker left (Cyrus ends at its next
   safe point, exit 75), and to the daemons if they are still waiting for their turn.
5. --stop-timeout seconds after the SIGHUP: SIGKILL, the stop is recorded as unclean (a
   replication event may be missing) and we exit 70, as in master mode.
5 is the deadline for everything of the instance, daemons and jobs included. Then the fence is
removed (nothing of Cyrus runs) and ExecStopPost drains every channel; on a restart the workers
and daemons start again only after that. The EVENTS timers are ordered after the instance, so
systemd has stopped them before our stop began: no job starts meanwhile.

SIGHUP while running (`systemctl kill -s HUP`): every worker finishes its connection and is
started again by systemd, re-reading imapd.conf: a rolling reload of the services.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

from cyrushelper import arguments, exitcodes, fence, listeners, proc, state, systemctl
from cyrushelper.config import Instance
from cyrushelper.notify import Notifier, Pulse
from cyrushelper.probe import probe_address, speaks_first
from cyrushelper.supervisor import Options, StartRefused, Supervisor

log = logging.getLogger("cyrushelper.run")

DEFAULT_FENCE_AFTER = 1.0
# sync_server speaks first too (its capabilities, then `* OK`): in socket mode a greeting is the
# only proof that a worker serves, so it is probed like the services probe.py lists.
GREETS = ("sync_server",)


class SocketSupervisor(Supervisor):
    def __init__(self, instance: Instance, plan: listeners.Plan, options: Options,
                 fence_after: float = DEFAULT_FENCE_AFTER,
                 notifier: Notifier | None = None, systemd=systemctl):
        super().__init__(instance, options, notifier)
        self.plan = plan
        self.fence_after = fence_after
        self.systemd = systemd
        self.unit = f"cyrus@{instance.name}.service"
        self.worker_units = frozenset(plan.worker_units)
        self.event_units = frozenset(plan.event_units)
        self.process_units = frozenset(plan.process_units)
        self.delivery_units = frozenset(unit for pool in plan.pools if pool.entry.program in fence.DELIVERY_PROGRAMS
                                        for unit in pool.worker_units)

    # -- what we supervise
    def gone(self) -> bool:
        return False  # the workers are systemd's to restart; nothing of ours can end on its own

    def processes(self) -> dict[int, str]:
        """{pid: unit} of every live Cyrus process of the instance: workers, daemons, event jobs."""
        return proc.unit_members(self.process_units)

    def reload(self) -> None:
        left = self.processes()
        units = sorted({u for u in left.values() if u in self.worker_units})
        log.info("SIGHUP: %d workers finish their connection and start again with a fresh configuration",
                 len(units))
        self.signal_units(units, signal.SIGHUP, left)

    # -- start
    def preflight(self) -> None:
        other = proc.running_master(self.instance.pid_file)
        if other is not None:
            raise StartRefused(f"a Cyrus master (PID {other}) runs for {self.instance.pid_file}: "
                               "two Cyrus instances must never share one spool")

    def probe(self) -> dict[str, str]:
        """{'service address': why it does not serve} for every socket that should greet."""
        failures = {}
        for pool in self.plan.pools:
            if not pool.address.stream:
                continue
            error = probe_address(*pool.address.connect_address(), self.greets(pool), timeout=2.0)
            if error is not None:
                failures[f"{pool.service} {pool.address.value}"] = error
        return failures

    @staticmethod
    def greets(pool: listeners.Pool) -> bool:
        return pool.program in GREETS or speaks_first(pool.entry)

    def wait_ready(self, use_ready_file: bool = False) -> str:
        """'ready', 'stop' (a stop signal arrived) or 'timeout'."""
        deadline = time.monotonic() + self.options.start_timeout
        delay = 0.05
        while True:
            failures = self.probe()
            if not failures:
                return "ready"
            self.notes["start"] = "starting: waiting for workers of " + ", ".join(sorted(failures))
            self.send_status()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("no worker served within %.0fs: %s", self.options.start_timeout,
                          "; ".join(f"{k}: {v}" for k, v in sorted(failures.items())))
                return "timeout"
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.loop.poll(min(delay, remaining))):
                return "stop"
            delay = min(delay * 2, 0.5)

    # -- stop
    def stop_kind(self) -> str:
        """'stop' or 'restart', from the job systemd runs for our unit."""
        try:
            job = self.systemd.job_type(self.unit)
        except systemctl.SystemctlError as e:
            log.warning("cannot tell a stop from a restart (%s): stopping, sockets included", e)
            return "stop"
        if job is None:
            # SIGTERM without a job (kill, `systemctl kill`): make it a proper stop of the whole
            # instance, so its parts stop too and the unit's state says what happened
            log.warning("SIGTERM without a stop job for %s: queueing one", self.unit)
            self._stop_units([self.unit])
            return "stop"
        return "restart" if "restart" in job else "stop"

    def _stop_units(self, units: list[str]) -> None:
        try:
            self.systemd.stop_no_block(units)
        except systemctl.SystemctlError as e:
            log.error("%s", e)

    def stop(self, reason: str) -> dict:
        kind = self.stop_kind()
        self.notifier.stopping(f"{'restarting' if kind == 'restart' else 'stopping'}: {reason}")
        for job in list(self.jobs.values()):
            job.cancel()
        self.jobs.clear()
        if kind == "stop":
            self._stop_units(self.plan.socket_units)
            log.info("stopping: the sockets close once the workers are gone (%s)",
                     " ".join(self.plan.socket_units))
        else:
            log.info("restarting: the sockets stay open, new connections wait for the next workers")
        result = self.stop_processes()
        result.update(reason=reason, kind=kind)
        return result

    def stop_processes(self) -> dict:
        """SIGHUP, fence, SIGTERM, SIGKILL: each once per unit, at its time (module docstring).
        Event jobs get SIGTERM at once; daemons (the rolling sync_client) once no worker or job is
        left, so replication keeps up meanwhile, or at the grace."""
        opts = self.options
        t0 = time.monotonic()
        pulse = Pulse(self.notifier, extend=opts.extend_interval * 2 + 5, interval=opts.extend_interval)
        told: dict[str, int] = {}     # unit -> the last signal we had systemd send it
        deliveries = fence.Deliveries(self.instance)
        fenced = bool(deliveries.at_fence)
        if fenced:
            fence.write_fence(self.instance, self.options.message)
            log.info("fence written at once: %d LMTP connection(s) open, their workers get SIGHUP once "
                     "those are closed (a delivery in flight finishes)", len(deliveries.at_fence))
        while True:
            left = self.processes()
            now = time.monotonic() - t0
            units = set(left.values())
            writers = {u for u in units if u in self.worker_units or u in self.event_units}
            delivering = now < self.options.grace and bool(deliveries.left())
            for signum in (signal.SIGHUP, signal.SIGTERM):
                due = sorted(u for u in units - set(told) if self._first_signal(u, writers, now) == signum
                             and not (delivering and u in self.delivery_units))
                if signum == signal.SIGTERM and now >= self.options.grace:  # workers still serving: once
                    due += sorted(u for u in units if told.get(u) == signal.SIGHUP)
                self.signal_units(due, signum, left)
                told.update({u: signum for u in due})
            if not left:
                return {"result": "clean", "seconds": round(now, 3), "units": len(told)}
            serving = sorted(u for u in units if u in self.worker_units)
            if serving and not fenced and now >= self.fence_after:
                fence.write_fence(self.instance, self.options.message)
                fenced = True
                log.info("fence written after %.1fs: %d worker(s) still serving a session", now, len(serving))
            if now >= opts.stop_timeout:
                return self.kill_processes(left, t0)
            pulse(f"stopping: {len(serving)} workers finishing their connection, {len(left)} processes left")
            for signum in self.loop.poll(fence.DELIVERY_POLL if delivering else 0.1):
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.repeated_stop_signals += 1
                    if self.repeated_stop_signals == 1:
                        log.info("signal %d while stopping: ignored, like any repeat", signum)

    def _first_signal(self, unit: str, writers: set[str], now: float) -> int | None:
        if unit in self.worker_units:
            return signal.SIGHUP
        if unit in self.event_units or not writers or now >= self.options.grace:
            return signal.SIGTERM
        return None  # a daemon, while workers or jobs still write

    def signal_units(self, units: list[str], signum: int, left: dict[int, str]) -> None:
        """Through systemd (PID 1 is their parent: Cyrus then logs no "unexpected process"), else
        by PID."""
        if not units:
            return
        if signum == signal.SIGTERM and any(u in self.worker_units for u in units):
            log.warning("grace of %.0fs over: SIGTERM to %s", self.options.grace, ", ".join(units[:8]))
        try:
            self.systemd.kill(units, signum)
        except systemctl.SystemctlError as e:
            log.warning("%s: signalling by PID instead", e)
            proc.signal_pids([p for p, u in left.items() if u in units], signum)

    def _describe(self, pids: list[int], units: dict[int, str]) -> str:
        text = ", ".join(f"{units.get(p, '?')}[{p}]" for p in pids[:8])
        return text + (" …" if len(pids) > 8 else "")

    def kill_processes(self, left: dict[int, str], t0: float) -> dict:
        who = self._describe(list(left), left)
        log.error("stop deadline of %.0fs passed, still running: %s; sending SIGKILL",
                  self.options.stop_timeout, who)
        self.notifier.status(f"stopping: deadline passed, SIGKILL to {len(left)} processes")
        killed = proc.signal_pids(list(left), signal.SIGKILL)
        for _ in range(50):  # SIGKILL is not instantaneous for a process in D state
            if not self.processes():
                break
            time.sleep(0.1)
        marker = state.record_unclean_stop(self.instance, f"stop deadline of {self.options.stop_timeout:g}s "
                                           f"passed; SIGKILLed {who}", killed)
        log.error("stop recorded as unclean in %s: replication events may be missing, reconcile with "
                  "sync_client -A", marker)
        return {"result": "unclean", "seconds": round(time.monotonic() - t0, 3), "killed_pids": killed}

    # -- whole life
    def record(self) -> None:
        state.record_listeners(self.instance, {
            "mode": "systemd", "instance": self.instance.name, "unit": self.unit,
            "pid": os.getpid(), "start_time": proc.start_time(os.getpid()),
            "pools": [{"service": p.service, "socket": p.socket_unit, "listen": p.address.value,
                       "stream": p.address.stream, "greets": self.greets(p), "workers": p.worker_units,
                       "status_files": [str(state.workers_dir(self.instance.imapd.configdirectory)
                                            / f"{p.slot_stem}@{slot}") for slot in range(1, p.size + 1)]}
                      for p in self.plan.pools],
        })

    def run(self) -> int:
        self.preflight()
        self.snapshot_leftovers()
        marker = state.unclean_stop(self.instance)
        if marker is not None:
            log.warning("unclean-stop marker present (%s: %s)", marker.get("time"), marker.get("reason"))
        self.record()
        self.loop = proc.Loop()
        self.loop.handle_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        try:
            self._open_watch(False)
            outcome = self.wait_ready()
            if outcome == "ready":
                self.notes.pop("start", None)
                self._refresh_backlog()
                log.info("Cyrus serves (%d sockets, %d workers): %s", len(self.plan.pools),
                         len(self.worker_units), self._backlog_text)
                self.notifier.ready(self.status_text())
                self._last_status_text = self.status_text()
                self.start_background_work()
                self.send_status()
                _, signum = self.serve()
                reason = f"signal {signal.Signals(signum).name}"
            else:
                reason = "stop requested during start" if outcome == "stop" else "start timeout"
            result = self.stop(reason)
            code = exitcodes.UNCLEAN_STOP if result["result"] == "unclean" else exitcodes.OK
            if outcome == "timeout" and code == exitcodes.OK:
                code = exitcodes.FAILURE
            if fence.remove_fence(self.instance):
                log.info("fence removed: no Cyrus process of this instance runs any more")
            state.record_last_stop(self.instance, {"instance": self.instance.name, **result})
            log.info("%s: %s after %.2fs", "restart: stopped" if result["kind"] == "restart" else "stopped",
                     result["result"], result.get("seconds", 0))
            return code
        finally:
            if self.watch is not None:
                self.watch.close()
            self.loop.close(restore_handlers=False)


# --------------------------------------------------------------------------- CLI (through run.py)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", action="append", metavar="SERVICE=N",
                        help="socket mode: the size of a service's worker pool, as generated (repeatable)")
    parser.add_argument("--fence-after", type=arguments.seconds, default=DEFAULT_FENCE_AFTER, metavar="SECONDS",
                        help="socket mode: write the fence (BYE, LMTP 421) for sessions still open this long "
                             f"after the SIGHUP (default {DEFAULT_FENCE_AFTER:g})")


def main(args: argparse.Namespace, options: Options) -> int:
    instance = arguments.load_instance(args, warn=True)
    try:
        workers = listeners.parse_workers(args.workers)
    except ValueError as e:
        log.error("%s", e)
        return exitcodes.USAGE
    plan = listeners.plan(instance, workers)
    try:
        return SocketSupervisor(instance, plan, options, fence_after=args.fence_after).run()
    except StartRefused as e:
        log.error("%s", e)
        return exitcodes.FAILURE

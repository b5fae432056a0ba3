#!/usr/bin/env python3
"""Drain speed: `cyrushelper drain` vs a bare `sync_client -R -1` loop, on the same real backlog.

Needs root and Cyrus 3.6 (builds a primary + replica pair on loopback with testbed.pair).
For each backlog size it delivers mail by LMTP with the primary's rolling client off, stops the
primary and saves its sync log and the (stopped) replica's whole tree. Every trial then restores
both, so each contestant replays exactly the same events into exactly the same replica state;
contestants alternate (A B A B ...) so machine noise hits both alike. Medians are compared.

Contestants:
  bare   CyrusPair.drain_with_sync_client(): `sync_client -R -1` until no log/log-run (in-process)
  api    cyrushelper.drain.drain() in-process: the same loop plus lock, reader check, unreachable
         detection, progress (STATUS line counts) and the state file: the overhead the target
         (ratio <= 1.05) is about. Wall time is noisy on a shared machine; CPU time (drainer +
         its sync_client children) is the steadier measure of that overhead
  cli    `python -m cyrushelper drain` as the unit runs it (adds interpreter start-up, ~0.2 s)

Usage: .venv/bin/python benchmarks/bench_drain.py [--events 1000 10000] [--trials 5] [--port-base 13000]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyrushelper import drain as drain_mod  # noqa: E402
from testbed.mail import deliver_lmtp  # noqa: E402
from testbed.pair import CyrusPair  # noqa: E402
from cyrushelper.notify import Notifier, Pulse  # noqa: E402
from cyrushelper.synclog import count_lines  # noqa: E402

USERS = ("alice", "bob")


def build_backlog(pair: CyrusPair, events: int, work: Path) -> tuple[bytes, int]:
    """Deliver until the primary's sync log holds >= `events` lines; return (log bytes, lines)."""
    pair.start("replica")
    pair.start("primary")
    log = pair.config_dir("primary") / "sync" / "log"
    record = work / f"record-{events}.txt"
    batch, round_no = 250, 0
    while count_lines(log) < events:
        for user in USERS:
            deliver_lmtp(pair.ports.primary_lmtp, user, batch, f"b{events}-{round_no}-{user}", record)
        round_no += 1
    pair.stop("primary")
    pair.stop("replica")
    data = log.read_bytes()
    log.unlink()
    return data, data.count(b"\n")


class Trial:
    def __init__(self, pair: CyrusPair, log_bytes: bytes, replica_snapshot: Path):
        self.pair, self.log_bytes, self.snapshot = pair, log_bytes, replica_snapshot
        self.sync_dir = pair.config_dir("primary") / "sync"

    def reset(self) -> None:
        """Replica back to its pre-backlog state, primary's sync log back in place."""
        self.pair.stop("replica")
        replica = self.pair.dir("replica")
        shutil.rmtree(replica)
        subprocess.run(["cp", "-a", str(self.snapshot), str(replica)], check=True)
        self.pair.start("replica")
        for name in ("log", "log-run"):
            (self.sync_dir / name).unlink(missing_ok=True)
        log = self.sync_dir / "log"
        log.write_bytes(self.log_bytes)
        st = os.stat(self.sync_dir)
        os.chown(log, st.st_uid, st.st_gid)
        log.chmod(0o600)

    def drained(self) -> bool:
        return not any((self.sync_dir / n).exists() for n in ("log", "log-run"))


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measured(fn, pair: CyrusPair) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process + every child reaped meanwhile).

    The replica's sync_server is not our child, so CPU counts only the primary side: the
    drainer and its sync_client runs. CPU time hardly depends on what else loads the machine.
    """
    cpu0 = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn(pair)
    wall = time.perf_counter() - t0
    return wall, _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - cpu0


def run_bare(pair: CyrusPair) -> None:
    result = pair.drain_with_sync_client(timeout=300)
    assert result.complete, result


def run_api(pair: CyrusPair) -> None:
    # progress as under systemd (STATUS= line counts every 0.5 s), minus the socket
    report = drain_mod.drain(pair.instance("primary"), deadline=300, record=True,
                             progress=Pulse(Notifier(), extend=30, interval=5))
    assert report.exit_code == 0, report


def run_cli(pair: CyrusPair) -> None:
    cmd = [sys.executable, "-m", "cyrushelper", "drain", "-C", str(pair.primary_imapd_conf),
           "-M", str(pair.primary_cyrus_conf), "--deadline", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr


CONTESTANTS = {"bare": run_bare, "api": run_api, "cli": run_cli}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--port-base", type=int, default=13000)
    ap.add_argument("--keep", action="store_true", help="keep the lab directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_drain: needs root (Cyrus drops to user cyrus)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    work.chmod(0o755)
    rows = []
    t_start = time.monotonic()
    try:
        for events in args.events:
            pair = CyrusPair(work / f"pair-{events}", port_base=args.port_base).create()
            try:
                log_bytes, lines = build_backlog(pair, events, work)
                snapshot = work / f"replica-{events}"
                subprocess.run(["cp", "-a", str(pair.dir("replica")), str(snapshot)], check=True)
                trial = Trial(pair, log_bytes, snapshot)
                times: dict[str, list[float]] = {name: [] for name in CONTESTANTS}
                cpu: dict[str, list[float]] = {name: [] for name in CONTESTANTS}
                for _ in range(args.trials):
                    for name, run in CONTESTANTS.items():
                        trial.reset()
                        wall, used = measured(run, pair)
                        times[name].append(wall)
                        cpu[name].append(used)
                        assert trial.drained(), f"{name} left files"
                rows.append((events, lines, times, cpu))
            finally:
                pair.stop_all()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    print(f"\ndrain benchmark: median of {args.trials} trials, same backlog + replica state per trial "
          f"(total {time.monotonic() - t_start:.0f} s)")
    print("wall = elapsed seconds (noisy on a shared machine); cpu = CPU seconds of drainer + sync_client")
    print(f"{'events':>7} {'lines':>6} {'bare wall':>9} {'api wall':>9} {'cli wall':>9} {'api/bare':>8} "
          f"{'cli/bare':>8} | {'bare cpu':>8} {'api cpu':>8} {'cli cpu':>8} {'api/bare':>8}")
    worst_wall = worst_cpu = 0.0
    for events, lines, times, cpu in rows:
        w = {n: med(v) for n, v in times.items()}
        c = {n: med(v) for n, v in cpu.items()}
        worst_wall = max(worst_wall, w["api"] / w["bare"])
        worst_cpu = max(worst_cpu, c["api"] / c["bare"])
        print(f"{events:>7} {lines:>6} {w['bare']:>9.3f} {w['api']:>9.3f} {w['cli']:>9.3f} "
              f"{w['api'] / w['bare']:>8.3f} {w['cli'] / w['bare']:>8.3f} | {c['bare']:>8.3f} "
              f"{c['api']:>8.3f} {c['cli']:>8.3f} {c['api'] / c['bare']:>8.3f}")
    for events, _, times, cpu in rows:
        for label, data in (("wall", times), ("cpu", cpu)):
            print(f"  raw {label} {events}: " + "  ".join(
                f"{n}=" + ",".join(f"{t:.3f}" for t in v) for n, v in data.items()))
    print(f"target api/bare <= 1.05: wall {worst_wall:.3f} ({'met' if worst_wall <= 1.05 else 'NOT met'}), "
          f"cpu {worst_cpu:.3f} ({'met' if worst_cpu <= 1.05 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

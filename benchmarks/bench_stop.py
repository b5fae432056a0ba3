#!/usr/bin/env python3
"""`systemctl stop` under LMTP load: a primary with cyrushelper's unit vs a stock Debian-style unit,
and a replica (cyrushelper's unit) while the primary replicates to it.

Each trial boots a fresh throwaway systemd container, builds the lab pair (rolling sync_client
under master, as most replicated sites run it), puts continuous LMTP load on the primary (two
users), waits for --warmup acknowledged messages, then times `systemctl stop` of the primary and
reads what the stop left behind: lines in the sync log, and acknowledged messages missing on the
replica (what a replica promoted at that moment would not have). The load retries like an MTA and
classifies every attempt (testbed.mail.OUTCOMES): LMTP transactions cut mid-way, 421s, refused or
dropped connections, and messages stored twice on the replica. --slow-sender adds a sender whose
body is still arriving when the stop begins. Both contestants run in the same invocation,
alternating, so the table compares them on the same machine state.

    python benchmarks/bench_stop.py [--trials 3] [--warmup 300] [--slow-sender] [--only KIND]
Needs root, Cyrus and systemd-container (scripts/bootstrap.sh installs them).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.container import SystemdContainer  # noqa: E402
from testbed.product import Wheelhouse, build_wheelhouse  # noqa: E402
from testbed.scenario import LabSystem, new_workdir  # noqa: E402

CONTESTANTS = ("cyrushelper", "stock", "replica")


def trial(kind: str, warmup: int, house: Wheelhouse, slow_sender: bool) -> dict:
    workdir = new_workdir(f"bench-{kind}")
    try:
        with SystemdContainer(workdir) as box:
            lab = LabSystem(box, workdir, wheelhouse=house, rolling=True).create()
            lab.install_cyrushelper_units()
            if kind == "stock":
                unit = lab.install_stock_unit()
                primary = unit
            else:
                primary = "cyrus@primary.service"
                unit = "cyrus@replica.service" if kind == "replica" else primary
            lab.start("cyrus@replica.service", primary)
            load, record = lab.start_load(seconds=300, hold_user="bob" if slow_sender else None)
            lab.wait_acknowledged(record, warmup, timeout=120)
            stop = lab.stop(unit)
            extra = {}
            if kind == "replica":
                lab.start("cyrus@replica.service")
                lab.wait_acknowledged(record, warmup + 100, timeout=120)
                lab.stop(primary)
                extra["primary_result"] = lab.c.show(primary, "Result")["Result"]
            lab.stop_load(load)
            report = lab.verify(record, storage=kind == "replica")
            if kind == "replica":
                extra["storage_identical"] = report["storage_identical"]
            outcomes = lab.load_stats(record)["outcomes"]
            return {"seconds": stop.seconds, "result": stop.result, "lines_left": stop.total_left,
                    "acknowledged": report["acknowledged"], "missing": report["missing"],
                    "double_sigterm": len(lab.unexpected_sigterm_lines()),
                    "cut": outcomes["cut_in_transaction"] + outcomes["cut_after_end_of_data"],
                    "got_421": outcomes["refused_421"],
                    "refused_or_dropped": outcomes["connection_refused"] + outcomes["lost_before_greeting"]
                    + outcomes["dropped_outside_transaction"],
                    "duplicated": report["duplicated"], **extra}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=300, help="acknowledged messages before the stop")
    parser.add_argument("--slow-sender", action="store_true",
                        help="add a sender whose message body is still arriving when the stop begins")
    parser.add_argument("--only", choices=CONTESTANTS, action="append",
                        help="run only this contestant (repeatable; default: all)")
    args = parser.parse_args()
    chosen = [k for k in CONTESTANTS if not args.only or k in args.only]
    runs: dict[str, list[dict]] = {k: [] for k in chosen}
    scratch = new_workdir("bench-wheel")
    house = build_wheelhouse(scratch / "build")   # the product as users install it
    for i in range(args.trials):
        for kind in chosen if i % 2 == 0 else list(reversed(chosen)):
            r = trial(kind, args.warmup, house, args.slow_sender)
            runs[kind].append(r)
            print(f"trial {i + 1} {kind:11}: stop {r['seconds']:.2f}s " +
                  " ".join(f"{k}={v}" for k, v in r.items() if k != "seconds"), flush=True)
    print()
    print("| unit | trials | stop s (median) | stop s (max) | result | sync-log lines left (median/max) "
          "| acknowledged (median) | missing on replica (median/max) | children SIGTERMed twice (max) "
          "| LMTP cut mid-way (median/max) | LMTP 421 (median) | refused/dropped (median) "
          "| stored twice (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in chosen:
        rs = runs[kind]

        def med(key: str) -> str:
            return f"{statistics.median(r[key] for r in rs):g}"
        secs = [r["seconds"] for r in rs]
        results = ",".join(sorted({r["result"] for r in rs}))
        print(f"| {kind} | {len(rs)} | {statistics.median(secs):.2f} | {max(secs):.2f} | {results} | "
              f"{med('lines_left')}/{max(r['lines_left'] for r in rs)} | {med('acknowledged')} | "
              f"{med('missing')}/{max(r['missing'] for r in rs)} | {max(r['double_sigterm'] for r in rs)} | "
              f"{med('cut')}/{max(r['cut'] for r in rs)} | {med('got_421')} | {med('refused_or_dropped')} | "
              f"{max(r['duplicated'] for r in rs)} |")
    if "cyrushelper" in runs and "stock" in runs:
        ours = statistics.median(r["seconds"] for r in runs["cyrushelper"])
        stock = statistics.median(r["seconds"] for r in runs["stock"])
        print(f"\nstop time ratio cyrushelper/stock (medians): {ours / stock:.2f}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

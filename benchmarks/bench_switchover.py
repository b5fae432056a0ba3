#!/usr/bin/env python3
"""`cyrushelper switchover` on a local switchable pair (the README recipe, real Cyrus under a real
systemd in a throwaway container, fresh per trial): end-to-end time idle and under LMTP load, and
the write outage an MTA saw, broken down per step; then the cost of the proof's mailbox reading at
100,000 messages, cyrus.index (ours) against Cyrus's own mbexamine, for few and many mailboxes.

    python benchmarks/bench_switchover.py [--trials 5] [--proof-messages 100000] [--skip-e2e|--skip-proof]

The write outage is what the load client (an MTA-like LMTP client trying a's LMTP then b's, with
back-off from 50 ms to 1 s) experienced: the longest time between two acknowledged deliveries,
its own back-off included; each step's share is that gap's overlap with the step.
The bound it is compared with is fence -> new primary READY (stop_old_primary start -> start_new_primary end).
Needs root, Cyrus and systemd-container (scripts/bootstrap.sh installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyrushelper import cyrus, mailboxes  # noqa: E402
from cyrushelper.config import Instance  # noqa: E402
from cyrushelper.switchover import STEPS  # noqa: E402
from testbed.mail import parse_mbexamine  # noqa: E402
from testbed.pair import CyrusPair  # noqa: E402
from benchlib import product_wheelhouse  # noqa: E402
from testbed.product import Wheelhouse  # noqa: E402
from testbed.switchlab import SwitchLabFactory  # noqa: E402

PORT_BASE = int(os.environ.get("CYRUSHELPER_TEST_PORT_BASE", "20000")) + 500


def e2e_trial(loaded: bool, house: Wheelhouse) -> dict:
    factory = SwitchLabFactory("bench-switchover", house)
    try:
        lab = factory.local(PORT_BASE)
        lab.install()
        lab.start("b", "a")
        if loaded:
            load, record = lab.start_load()
            lab.wait_acknowledged(record, 300)
        t0 = time.time()
        r = lab.switchover("a", "b", "--json")
        seconds = time.time() - t0
        if r.returncode != 0:
            raise RuntimeError(f"switchover failed ({r.returncode}): {r.stdout}\n{r.stderr}")
        rec = json.loads(r.stdout)
        result = {"seconds": seconds, "steps": {s["step"]: s["seconds"] for s in rec["steps"]},
                  "bound": rec["write_outage_bound"]}
        if loaded:
            lab.wait_acknowledged(record, lab.acknowledged(record) + 200)
            stats = lab.stop_load(load, record)
            lo, hi = stats["longest_gap"]
            timeline = rec["timeline"]
            result["outage"] = hi - lo
            result["outage_by_step"] = {
                step: max(0.0, min(hi, timeline[f"{step}_end"]) - max(lo, timeline[f"{step}_start"]))
                for step in STEPS[1:] if f"{step}_start" in timeline}
            result["outage_in_window"] = lo >= timeline["stop_old_primary_start"] - 1.0
            assert lab.settled()
            missing = [lab.verify(record, n)["missing"] for n in ("a", "b")]
            result["missing"] = max(missing)
            result["acknowledged"] = lab.acknowledged(record)
        return result
    finally:
        factory.close()


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def e2e(trials: int) -> None:
    with product_wheelhouse() as house:
        for loaded in (False, True):
            runs = []
            for i in range(trials):
                r = e2e_trial(loaded, house)
                runs.append(r)
                print(f"{'load' if loaded else 'idle'} trial {i + 1}: {r['seconds']:.2f}s end to end, bound "
                      f"{r['bound']:.2f}s" + (f", outage {r['outage']:.2f}s, missing {r['missing']} of "
                                              f"{r['acknowledged']}" if loaded else ""), flush=True)
            print(f"\n{'under load' if loaded else 'idle'}: {trials} trials, medians (max)")
            print("| step | seconds |" + (" write outage s |" if loaded else ""))
            print("|---|---|" + ("---|" if loaded else ""))
            for step in STEPS:
                cells = f"{median(r['steps'][step] for r in runs):.2f} ({max(r['steps'][step] for r in runs):.2f})"
                if loaded:
                    out = [r["outage_by_step"].get(step, 0.0) for r in runs]
                    cells += f" | {median(out):.2f}"
                print(f"| {step} | {cells} |")
            total = f"{median(r['seconds'] for r in runs):.2f} ({max(r['seconds'] for r in runs):.2f})"
            bound = f"{median(r['bound'] for r in runs):.2f}"
            if loaded:
                print(f"| **end to end** | {total} | {median(r['outage'] for r in runs):.2f} "
                      f"({max(r['outage'] for r in runs):.2f}) |")
                print(f"| fence -> new primary READY (bound) | {bound} | |")
                print(f"\nmissing after the switchover (max over trials, either side): {max(r['missing'] for r in runs)}")
            else:
                print(f"| **end to end** | {total} |")
                print(f"| fence -> new primary READY | {bound} |")
            print()


# --------------------------------------------------------------------------- the proof's cost

def deliver_bulk(port: int, users: list[str], per_user: int) -> None:
    """per_user messages into each user's INBOX: one LMTP transaction per message number with every
    user as a recipient (Cyrus stores one file per copy, as for separate deliveries)."""
    import smtplib
    from testbed.mail import message
    conn = smtplib.LMTP("127.0.0.1", port, timeout=120)
    for i in range(per_user):
        for start in range(0, len(users), 500):
            batch = users[start:start + 500]
            _, body = message("bulk", i, "many")
            conn.mail("sender@lab.test")
            for rcpt in batch:
                conn.rcpt(rcpt)
            replies = [conn.data(body)] + [conn.getreply() for _ in batch[1:]]   # LMTP: one per recipient
            bad = [r for r in replies if r[0] != 250]
            if bad:
                raise RuntimeError(f"LMTP refused: {bad[:3]}")
    conn.quit()


def proof_cost(messages: int, layouts: list[int]) -> None:
    print(f"proof cost at {messages} messages (one side, instance stopped, as in the proof):")
    print("| mailboxes | messages | cyrus.index (ours) s | `cyrushelper mailboxes --json` s | mbexamine s | mbexamine/ours |")
    print("|---|---|---|---|---|---|")
    for count in layouts:
        root = Path(tempfile.mkdtemp(prefix="bench-proof-", dir="/var/tmp"))
        root.chmod(0o755)
        pair = CyrusPair(root / "lab", port_base=PORT_BASE + 100).create()
        try:
            pair.start("primary")
            users = [f"user{i:05d}" for i in range(count)]
            t0 = time.monotonic()
            deliver_bulk(pair.ports.primary_lmtp, users, messages // count)
            fill = time.monotonic() - t0
            pair.stop("primary")
            inst = Instance.load(pair.primary_imapd_conf, pair.primary_cyrus_conf)
            t0 = time.monotonic()
            facts = mailboxes.collect(inst)
            ours = time.monotonic() - t0
            assert sum(f.messages for f in facts.values()) == messages, "delivery incomplete"
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "cyrushelper", "mailboxes", "-C", str(pair.primary_imapd_conf),
                            "-M", str(pair.primary_cyrus_conf), "--json"], check=True, capture_output=True)
            cli = time.monotonic() - t0
            t0 = time.monotonic()
            out = subprocess.run([str(cyrus.bin_dir() / "mbexamine"), "-C", str(pair.primary_imapd_conf)],
                                 capture_output=True, text=True).stdout
            records = parse_mbexamine(out)
            mbex = time.monotonic() - t0
            assert len(records) == messages, (len(records), messages)
            print(f"| {count} | {messages} | {ours:.2f} | {cli:.2f} | {mbex:.2f} | {mbex / ours:.1f} |"
                  f" <!-- fill {fill:.0f}s, mbexamine printed {len(out) / 1e6:.0f} MB -->", flush=True)
        finally:
            pair.stop_all()
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--proof-messages", type=int, default=100000)
    parser.add_argument("--proof-mailboxes", default="10,1000", help="comma-separated mailbox counts")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-proof", action="store_true")
    args = parser.parse_args()
    if not args.skip_e2e:
        e2e(args.trials)
    if not args.skip_proof:
        proof_cost(args.proof_messages, [int(x) for x in args.proof_mailboxes.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())

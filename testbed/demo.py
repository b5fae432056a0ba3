"""The README's main-job demo: a real Cyrus primary+replica under a real (throwaway) systemd,
mail load, `systemctl stop`, the drain, and the proof - then the same with a stock unit.

    python -m testbed.demo [--load-seconds 4] [--keep]

Needs root, Cyrus and systemd-container (scripts/demo.sh installs them). Nothing on the host
changes: the container's root is an overlay on tmpfs, the pair lives in a scratch directory.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time

from testbed import images
from testbed.container import SystemdContainer
from testbed.product import PRODUCT_VENV, build_wheelhouse
from testbed.scenario import LabSystem, StopMeasure, new_workdir

PRIMARY = "cyrus@primary.service"
REPLICA = "cyrus@replica.service"


def say(text: str = "") -> None:
    print(text, flush=True)


def watch_stop(lab: LabSystem, unit: str) -> tuple[StopMeasure, list[str]]:
    """`systemctl stop unit` while recording every distinct StatusText/SubState the unit shows."""
    seen: list[str] = []
    done = threading.Event()
    result: dict = {}

    def stopper():
        result["stop"] = lab.stop(unit)
        done.set()

    threading.Thread(target=stopper, daemon=True).start()
    t0 = time.monotonic()
    while not done.is_set():
        try:
            props = lab.c.show(unit, "SubState", "StatusText")
        except Exception:  # the unit may be reloading for an instant
            continue
        line = f"{props.get('SubState', '?'):>14}  {props.get('StatusText', '')}"
        if not seen or seen[-1].split("] ", 1)[-1] != line:
            seen.append(f"[{time.monotonic() - t0:5.2f}s] {line}")
        done.wait(0.02)
    return result["stop"], seen


def act(lab: LabSystem, unit: str, load_seconds: float) -> dict:
    load, record = lab.start_load(seconds=300)
    lab.wait_acknowledged(record, 50, timeout=60)
    time.sleep(load_seconds)
    say(f"  {unit}: {lab.c.show(unit, 'StatusText')['StatusText'] or '(no status: Type=simple)'}")
    say(f"  $ systemctl stop {unit}    (LMTP load still running)")
    stop, seen = watch_stop(lab, unit)
    lab.stop_load(load)
    for line in seen:
        say(f"    {line}")
    say(f"  -> stop took {stop.seconds:.2f}s, Result={stop.result}, "
        f"sync log lines left on the primary: {stop.total_left}")
    return {"stop": stop, "record": record}


def run(load_seconds: float, keep: bool, release: str) -> int:
    workdir = new_workdir(f"demo-{release}")
    say(f"cyrushelper demo - scratch directory {workdir}")
    try:
        house = build_wheelhouse(workdir / "build")
        say(f"built the wheel {house.wheel.name}: installed in the container as a user would "
            f"(python3 -m venv {PRODUCT_VENV} && pip install)")
        with SystemdContainer(workdir, root=images.container_root(release)) as box:
            systemd = box.run("systemctl", "--version").stdout.split()[1]
            cyrus_version = box.run("/usr/lib/cyrus/bin/master", "-V", check=False).stdout.split()[1]
            say(f"booted a throwaway systemd {systemd} ({release}) as PID 1 in {box.boot_seconds:.2f}s")
            lab = LabSystem(box, workdir, wheelhouse=house, rolling=True).create()
            lab.install_cyrushelper_units()
            lab.start(REPLICA, PRIMARY)
            say(f"real Cyrus {cyrus_version} pair up: primary (rolling sync_client under master) -> replica\n")

            say("1) cyrushelper's unit (Type=notify, fence, one SIGTERM, drain in ExecStopPost)")
            ours = act(lab, PRIMARY, load_seconds)
            status = box.systemctl("status", "--no-pager", "-n", "6", PRIMARY, check=False).stdout
            say("  $ systemctl status cyrus@primary")
            for line in status.splitlines():
                say(f"    {line}")
            report = lab.verify(ours["record"])
            lost_ours = report["missing"]
            say(f"  PROOF: acknowledged {report['acknowledged']}, on replica {report['present']}, "
                f"lost {lost_ours}\n")

            say("2) stock Debian-style unit (Type=simple, no ExecStop, nothing drains), same load")
            stock_unit = lab.install_stock_unit()
            lab.start(stock_unit)
            stock = act(lab, stock_unit, load_seconds)
            report_stock = lab.verify(stock["record"])
            say(f"  acknowledged {report_stock['acknowledged']}, on replica {report_stock['present']}, "
                f"lost {report_stock['missing']} (a replica promoted now would not have them)")
            double = len(lab.unexpected_sigterm_lines())
            say(f"  Cyrus children SIGTERMed twice (KillMode=control-group): {double}\n")

            say("| unit | stop s | Result | sync log lines left | acknowledged | lost on replica |")
            say("|---|---|---|---|---|---|")
            for name, r, rep in (("cyrushelper", ours["stop"], report),
                                 ("stock", stock["stop"], report_stock)):
                say(f"| {name} | {r.seconds:.2f} | {r.result} | {r.total_left} | {rep['acknowledged']} | "
                    f"{rep['missing']} |")
            return 0 if lost_ours == 0 and ours["stop"].result == "success" else 1
    finally:
        if keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-seconds", type=float, default=4.0,
                        help="seconds of LMTP load before each stop (default 4)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--release", choices=list(images.RELEASES), default=images.host_release(),
                        help="the Debian release the container runs: the host's own (default) or another "
                             "one's root, debootstrapped and cached on first use (testbed/images.py)")
    args = parser.parse_args(argv)
    return run(args.load_seconds, args.keep, args.release)


if __name__ == "__main__":
    sys.exit(main())

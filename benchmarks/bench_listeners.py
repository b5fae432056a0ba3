#!/usr/bin/env python3
"""Who holds Cyrus's listening socket: master (prefork), socket mode's worker pool, or systemd
spawning one `imapd -X` per connection (Accept=yes, inetd style) -- connections per second,
greeting latency and the memory an idle worker holds, in the same run on the same machine.

Each trial boots a throwaway systemd container with the lab pair's primary (Cyrus from Debian),
its IMAP service limited to --workers concurrent processes in every contestant (master: prefork =
maxchild = N; pool: N worker units; -X: MaxConnections=N), and --concurrency clients that connect,
read the greeting and hang up, for --seconds, against each contestant in turn (the order
alternates between trials). Idle memory is read from /proc/PID/smaps_rollup of an idle serving
process after the run (RSS, and PSS: its share of pages it has in common with the others), and
for the pool also of the sh loop each worker keeps to respawn the service (worker.py).

    python benchmarks/bench_listeners.py [--trials 3] [--seconds 8] [--workers 4] [--concurrency 4]
Needs root, Cyrus and systemd-container (scripts/bootstrap.sh installs them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.container import SystemdContainer  # noqa: E402
from testbed.scenario import LabSystem, new_workdir  # noqa: E402

CONTESTANTS = ("master", "pool", "inetd")
PORT = 11500
HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------- the client (in the container)

def client(port: int, seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run():
        mine, failed = [], 0
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    data = b""
                    while b"\r\n" not in data:
                        chunk = s.recv(512)
                        if not chunk:
                            raise ConnectionError("closed before the greeting")
                        data += chunk
                mine.append(time.monotonic() - t0)
            except OSError:
                failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    latencies.sort()
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000) if latencies else (lambda q: 0)
    return {"connections": len(latencies), "errors": errors[0], "per_second": len(latencies) / elapsed,
            "p50_ms": pick(0.50), "p99_ms": pick(0.99)}


# --------------------------------------------------------------------------- the contestants (on the host)

def bench_conf(lab: LabSystem, workers: int) -> Path:
    """The primary's cyrus.conf with only IMAP, at most `workers` processes, on PORT."""
    imapd = lab.pair.imapd_conf("primary")
    path = lab.pair.dir("primary") / "bench-cyrus.conf"
    path.write_text(f'START {{\n  recover cmd="ctl_cyrusdb -C {imapd} -r"\n}}\n'
                    f'SERVICES {{\n  imap cmd="imapd -C {imapd}" listen="127.0.0.1:{PORT}" '
                    f'prefork={workers} maxchild={workers}\n}}\n')
    return path


def install_inetd(box: SystemdContainer, lab: LabSystem, workers: int) -> str:
    imapd = lab.pair.imapd_conf("primary")
    units = {
        "bench-x.socket": f"[Socket]\nListenStream=127.0.0.1:{PORT}\nAccept=yes\nMaxConnections=64\n",
        "bench-x@.service": ("[Service]\nExecStart=/usr/lib/cyrus/bin/imapd -C " + str(imapd) + " -X\n"
                             "StandardInput=socket\nStandardError=journal\nUser=cyrus\n"
                             "Environment=CYRUS_SERVICE=imap CYRUS_ID=0\n"),
    }
    for name, text in units.items():
        box.run("sh", "-c", f"cat > /etc/systemd/system/{name}", input=text)
    box.systemctl("daemon-reload")
    return "bench-x.socket"


def generate(box: SystemdContainer, lab: LabSystem, conf: Path, instance: str, listeners: str) -> str:
    out = lab.workdir / f"units-{instance}"
    r = lab.cyrushelper("generate", "--imapd-conf", str(lab.pair.imapd_conf("primary")), "--cyrus-conf",
                        str(conf), "--instance", instance, "--output", str(out), "--helper", lab.helper,
                        "--listeners", listeners, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    box.install_units(out)
    return f"cyrus@{instance}.service"


# (RSS, PSS) in kB of the first process matching: an idle imapd (fd 0 not a connection), or the
# socket-mode worker's respawn loop (sh, $0 cyrushelper-worker:SERVICE)
MEMORY = """\
import os, sys
want = sys.argv[1]
for p in os.listdir('/proc'):
    if not p.isdigit():
        continue
    try:
        comm = open(f'/proc/{p}/comm').read().strip()
        args = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\0')
        fd0 = os.path.realpath(f'/proc/{p}/fd/0')
    except OSError:
        continue
    if (want == 'imapd' and comm == 'imapd' and not fd0.startswith('socket')) or \\
            (want == 'loop' and comm == 'sh' and any(a.startswith(b'cyrushelper-worker:') for a in args)):
        r = dict(line.split(':', 1) for line in open(f'/proc/{p}/smaps_rollup').read().splitlines()[1:])
        print(int(r['Rss'].split()[0]), int(r['Pss'].split()[0]))
        break
"""


def memory(box: SystemdContainer, what: str) -> tuple[int, int]:
    out = box.run(box.python, "-c", MEMORY, what, check=False).stdout.split()
    return (int(out[0]), int(out[1])) if len(out) == 2 else (0, 0)


def idle_memory(box: SystemdContainer, contestant: str) -> tuple[int, int, int]:
    """(RSS, PSS) of one idle serving process, and the PSS of what else a worker keeps (socket
    mode's respawn loop); zeros when nothing stays around between connections (-X)."""
    if contestant == "inetd":
        return 0, 0, 0
    rss, pss = memory(box, "imapd")
    return rss, pss, memory(box, "loop")[1] if contestant == "pool" else 0


def measure(box: SystemdContainer, seconds: float, concurrency: int) -> dict:
    r = box.run(box.python, str(HERE), "client", "--seconds", str(seconds), "--concurrency", str(concurrency),
                timeout=seconds + 120, env=box.python_env)
    return json.loads(r.stdout)


def trial(order: tuple[str, ...], args) -> dict[str, dict]:
    workdir = new_workdir("bench-listeners")
    results = {}
    try:
        with SystemdContainer(workdir) as box:
            lab = LabSystem(box, workdir, rolling=False).create()
            conf = bench_conf(lab, args.workers)
            units = {"master": generate(box, lab, conf, "benchmaster", "master"),
                     "pool": generate(box, lab, conf, "benchpool", "systemd"),
                     "inetd": install_inetd(box, lab, args.workers)}
            for contestant in order:
                unit = units[contestant]
                box.systemctl("start", unit, timeout=180)
                measure(box, 1.0, args.concurrency)  # warm-up: caches, first logins of the workers
                result = measure(box, args.seconds, args.concurrency)
                time.sleep(0.5)  # the workers go back to idle
                result["rss_kb"], result["pss_kb"], result["loop_pss_kb"] = idle_memory(box, contestant)
                box.systemctl("stop", unit, timeout=180)
                results[contestant] = result
                print(f"  {contestant:>6}: {result['per_second']:7.1f} conn/s, p50 {result['p50_ms']:.1f} ms, "
                      f"p99 {result['p99_ms']:.1f} ms, errors {result['errors']}, idle worker RSS "
                      f"{result['rss_kb']} kB PSS {result['pss_kb']} kB (+ loop PSS {result['loop_pss_kb']} kB)",
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    c = sub.add_parser("client", help="(inside the container) connect, read the greeting, hang up")
    c.add_argument("--port", type=int, default=PORT)
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per contestant and trial")
    parser.add_argument("--workers", type=int, default=4, help="processes per contestant (prefork = maxchild = pool)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients connecting at the same time")
    args = parser.parse_args()
    if args.command == "client":
        print(json.dumps(client(args.port, args.seconds, args.concurrency)))
        return 0
    runs: dict[str, list[dict]] = {k: [] for k in CONTESTANTS}
    for i in range(args.trials):
        order = CONTESTANTS if i % 2 == 0 else tuple(reversed(CONTESTANTS))
        print(f"trial {i + 1} ({', '.join(order)}):", flush=True)
        for contestant, result in trial(order, args).items():
            runs[contestant].append(result)
    fields = ("per_second", "p50_ms", "p99_ms", "rss_kb", "pss_kb", "loop_pss_kb")
    med = {k: {f: statistics.median(r[f] for r in rs) for f in fields} for k, rs in runs.items()}
    print(f"\n{args.trials} trials, {args.seconds:g} s each, {args.workers} processes, {args.concurrency} clients; medians:\n")
    print("| who holds the socket | conn/s | ratio to master | greeting p50 ms | p99 ms | idle worker RSS kB "
          "| PSS kB | + respawn loop PSS kB |")
    print("|---|---|---|---|---|---|---|---|")
    names = {"master": "master, prefork", "pool": "systemd, worker pool (socket mode)",
             "inetd": "systemd, Accept=yes + imapd -X"}
    for k in CONTESTANTS:
        m = med[k]
        print(f"| {names[k]} | {m['per_second']:.0f} | {m['per_second'] / med['master']['per_second']:.2f} | "
              f"{m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['rss_kb']:.0f} | {m['pss_kb']:.0f} | {m['loop_pss_kb']:.0f} |")
    ratios = [p["per_second"] / m["per_second"] for p, m in zip(runs["pool"], runs["master"])]
    print(f"\npool/master conn/s per trial: {', '.join(f'{r:.2f}' for r in ratios)} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

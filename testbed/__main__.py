"""`python -m testbed COMMAND`: the test bed's steps as commands, so a scenario can run
them inside a throwaway systemd container (where the pair's loopback network lives).

  create ROOT [--port-base N] [--rolling] [--channels a,b]   build a primary+replica pair
  load ROOT --record FILE [--seconds S] [--users alice,bob]  LMTP load until SIGTERM or S seconds,
       [--stats FILE] [--hold-user U --hold-until PATH]    like an MTA (retries); every attempt counted
  deliver ROOT --record FILE --count N [--user alice]         N messages on one LMTP connection
  verify ROOT --record FILE [...]                              acknowledged vs present on the replica (JSON)
  relay ROOT --record FILE --rate BYTES_PER_S                  throttling relay primary -> replica sync_server
  expunge ROOT --imap HOST:PORT [--user alice] [--count 1]    expunge the last messages of INBOX as the user
  create-switchable ROOT [--port-base N] [--only a|b] [--listen a=ADDR] [--peer a=ADDR]
                                                               a switchable pair (README recipe)
For a switchable pair, load/deliver take --lmtp HOST:PORT (repeatable: tried in turn, like an MTA)
and verify takes --imap HOST:PORT (the side to check).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from cyrushelper.atomic import write_atomic
from testbed.mail import (LOOPBACK, Hold, LmtpLoad, compare_storage, deliver_lmtp, expunge_last,
                          verify_on_replica)
from testbed.pair import CyrusPair, SwitchablePair
from testbed.relay import ThrottlingRelay


def _pair(args) -> CyrusPair:
    channels = args.channels.split(",") if getattr(args, "channels", None) else None
    return CyrusPair(args.root, port_base=args.port_base, rolling=getattr(args, "rolling", False),
                     channels=channels, sync_relay=getattr(args, "sync_relay", False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("create", "load", "deliver", "verify", "create-switchable", "expunge", "relay"):
        p = sub.add_parser(name)
        p.add_argument("root")
        p.add_argument("--port-base", type=int, default=11000)
        if name == "create-switchable":
            p.add_argument("--only", choices=("a", "b"))
            p.add_argument("--listen", action="append", default=[], metavar="NAME=ADDR")
            p.add_argument("--peer", action="append", default=[], metavar="NAME=ADDR")
        if name in ("load", "deliver"):
            p.add_argument("--lmtp", action="append", default=[], metavar="HOST:PORT")
        if name == "verify":
            p.add_argument("--imap", metavar="HOST:PORT", help="check this side (default: the pair's replica)")
        if name == "expunge":
            p.add_argument("--imap", metavar="HOST:PORT", required=True)
            p.add_argument("--user", default="alice")
            p.add_argument("--count", type=int, default=1)
        if name == "create":
            p.add_argument("--rolling", action="store_true")
            p.add_argument("--channels", help="comma-separated sync_log_channels ('\"\"' = default)")
            p.add_argument("--sync-relay", action="store_true",
                           help="the primary replicates through the relay port (start `relay` there)")
        if name in ("load", "deliver", "verify", "relay"):
            p.add_argument("--record", action="append", required=True)
        if name == "load":
            p.add_argument("--seconds", type=float, default=60)
            p.add_argument("--users", default="alice,bob")
            p.add_argument("--pause", type=float, default=0.0, help="seconds between messages per user")
            p.add_argument("--stats", help="write the final statistics (JSON) to this file")
            p.add_argument("--connection-per-message", action="store_true",
                           help="a new LMTP connection for every message (an MTA without caching)")
            p.add_argument("--hold-user", help="add a slow sender to this user: one message whose body "
                                               "stops half-way until --hold-until exists")
            p.add_argument("--hold-until", help="file whose appearance lets the held body go on")
            p.add_argument("--hold-extra", type=float, default=1.0,
                           help="seconds the held body waits after that file appeared (default 1)")
        if name == "deliver":
            p.add_argument("--count", type=int, required=True)
            p.add_argument("--user", default="alice")
            p.add_argument("--tag", default="backlog")
        if name == "relay":
            p.add_argument("--rate", type=float, required=True, help="bytes per second towards the replica")
        if name == "verify":
            p.add_argument("--storage", action="store_true", help="also compare UID+GUID per mailbox")
    args = parser.parse_args(argv)
    if args.command == "create-switchable":
        pair = SwitchablePair(args.root, args.port_base,
                              listen_host=dict(x.split("=", 1) for x in args.listen) or None,
                              peer_host=dict(x.split("=", 1) for x in args.peer) or None)
        if pair.listen_host.keys() != set(pair.names) or pair.peer_host.keys() != set(pair.names):
            parser.error("--listen and --peer need both a= and b= (or neither)")
        pair.create(args.only)
        print(json.dumps({"root": str(pair.root)}))
        return 0
    if args.command == "expunge":
        host, _, port = args.imap.rpartition(":")
        print(json.dumps({"expunged": expunge_last(int(port), args.user, args.count, host=host)}))
        return 0
    pair = _pair(args)
    endpoints = [(h, int(p)) for h, _, p in (x.rpartition(":") for x in getattr(args, "lmtp", []))]

    if args.command == "create":
        pair.create()
        print(json.dumps({"root": str(pair.root), "primary_imapd_conf": str(pair.primary_imapd_conf),
                          "replica_imapd_conf": str(pair.replica_imapd_conf)}))
        return 0

    if args.command == "deliver":
        host, port = endpoints[0] if endpoints else (LOOPBACK, pair.ports.primary_lmtp)
        n = deliver_lmtp(port, args.user, args.count, args.tag, args.record[0], host=host)
        print(json.dumps({"acknowledged": n}))
        return 0

    if args.command == "load":
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *a: stopped.set())
        hold = None
        if args.hold_user:
            if not args.hold_until:
                parser.error("--hold-user needs --hold-until")
            hold = Hold(args.hold_user, Path(args.hold_until), args.hold_extra,
                        marker=Path(args.record[0] + ".holding"))
        load = LmtpLoad(pair.ports.primary_lmtp, args.users.split(","), args.record[0],
                        max_seconds=args.seconds, max_messages=10**7, pause=args.pause, hold=hold,
                        endpoints=endpoints or None, connection_per_message=args.connection_per_message).start()
        while load.running and not stopped.wait(0.2):
            pass
        stats = json.dumps({**load.stop().as_dict(), "refusals": [t for t, _ in load.refusals],
                            "longest_gap": list(load.longest_gap())})
        if args.stats:
            write_atomic(args.stats, stats + "\n", mode=0o644)
        print(stats, flush=True)
        return 0

    if args.command == "relay":
        relay = ThrottlingRelay(pair.ports.sync_relay, pair.ports.replica_sync, args.rate, args.record[0])
        signal.signal(signal.SIGTERM, lambda *a: relay.stop())
        relay.serve()
        return 0

    if args.command == "verify":
        host, port = (args.imap.rpartition(":")[0], int(args.imap.rpartition(":")[2])) if args.imap \
            else (LOOPBACK, pair.ports.replica_imap)
        report = verify_on_replica(port, args.record, host=host)
        result = {"acknowledged": report.acknowledged, "present": report.present,
                  "missing": len(report.missing), "missing_sample": report.missing[:10],
                  "duplicated": len(report.duplicates), "duplicated_sample": report.duplicates[:10],
                  "summary": report.summary()}
        if args.storage:
            storage = compare_storage(pair.primary_imapd_conf, pair.replica_imapd_conf)
            result["storage_identical"] = storage.identical
            result["storage_summary"] = storage.summary()
        print(json.dumps(result))
        return 0 if report.ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""`cyrushelper run`: the instance unit's main process, in the mode its units were generated for:
master mode (supervisor.py: Cyrus master binds the sockets) or socket mode (`--listeners systemd`,
sockets.py: systemd holds them and runs the services as worker units)."""

from __future__ import annotations

import argparse

import logging

from cyrushelper import exitcodes, listeners, sockets, supervisor

log = logging.getLogger("cyrushelper.run")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    supervisor.add_arguments(parser, name)
    parser.add_argument("--listeners", choices=listeners.MODES, default="master",
                        help="master = run Cyrus master (default); systemd = socket mode, as generated "
                             "by `generate --listeners systemd`")
    sockets.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if args.listeners == "master":
        if args.workers:
            log.error("--workers sizes socket mode's pools: add --listeners systemd")
            return exitcodes.USAGE
        return supervisor.main(args)
    return sockets.main(args, supervisor.options_from(args))

"""Command line: `cyrushelper SUBCOMMAND …` (also `python -m cyrushelper`).

Each subcommand's work lives in its own module (add_arguments(parser, name) and main(args));
this file only builds the parser, sets up logging and maps errors to the documented exit codes
(cyrushelper/exitcodes.py). Nothing imports this module back: shared options are in arguments.py.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cyrushelper import __version__, exitcodes, journal
from cyrushelper.config import ConfigError

log = logging.getLogger("cyrushelper")

# name -> (module implementing it, one-line help). The module exposes add_arguments(parser) and
# main(args) -> exit code; a module that does not exist yet makes the subcommand refuse with exit 2.
SUBCOMMANDS = {
    "generate": ("cyrushelper.render", "render systemd units for an instance from imapd.conf/cyrus.conf"),
    "run": ("cyrushelper.run", "run the instance as a Type=notify service: Cyrus master, or socket mode's workers (the unit's ExecStart)"),
    "stop": ("cyrushelper.fence", "fence new sessions and give open ones a grace period, as run does at every stop of the unit"),
    "drain": ("cyrushelper.drain", "replicate every pending sync log of every channel (ExecStopPost)"),
    "status": ("cyrushelper.status", "show master, replication backlog and last stop of an instance"),
    "watch": ("cyrushelper.status", "follow the replication backlog live (inotify)"),
    "switchover": ("cyrushelper.switchover", "soft failover: drain the primary, prove the replica caught up, "
                                             "swap the roles, verify the new direction"),
    "role": ("cyrushelper.role", "show (or, stopped, set) the role of a switchable instance"),
    "canary": ("cyrushelper.canary", "deliver one canary message by LMTP and say where it landed (UID, GUID)"),
    "mailboxes": ("cyrushelper.mailboxes", "per-mailbox facts of an instance, read from its index files "
                                           "(what the switchover proof compares)"),
    "worker": ("cyrushelper.worker", "run a Cyrus service on a socket systemd holds (socket mode's worker units)"),
}


def build_parser(load: set[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; `load` limits which subcommand modules are imported (None = all)."""
    parser = argparse.ArgumentParser(
        prog="cyrushelper",
        description="Lossless stops and soft failover for Cyrus IMAP replication under systemd.",
        epilog=exitcodes.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cyrushelper {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=exitcodes.epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(module=module_name, command=name)
        module = _load(module_name) if load is None or name in load else None
        if module is not None:
            module.add_arguments(p, name)
    return parser


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen subcommand's module: a drain in ExecStopPost should not pay for
    # jinja2 and every other module (0.2-0.3 s measured when all were imported).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load={chosen} if chosen in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    journal.setup_logging(verbose=args.verbose, instance=getattr(args, "instance", None))
    if not args.command:
        parser.print_help()
        return exitcodes.USAGE
    module = _load(args.module)
    if module is None:
        print(f"cyrushelper {args.command}: not implemented yet", file=sys.stderr)
        return exitcodes.USAGE
    try:
        return module.main(args)
    except ConfigError as e:
        log.error("%s", e)
        return exitcodes.CONFIG
    except KeyboardInterrupt:
        return exitcodes.FAILURE

"""Command-line pieces every subcommand shares: the instance options, number types that argparse
checks (a bad value is a one-line usage error, exit 2, before anything runs), and loading the
instance with its warnings. cli.py builds the parser from these; subcommand modules use them in
their add_arguments()/main() and never import cli.
"""

from __future__ import annotations

import argparse
import logging
import math

from cyrushelper import channels, instances
from cyrushelper.config import DEFAULT_CYRUS_CONF, DEFAULT_IMAPD_CONF, Instance

log = logging.getLogger("cyrushelper")


def add_instance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--imapd-conf", "-C", default=None, metavar="PATH",
                        help="the instance's imapd.conf (default: the one its unit cyrus@NAME runs "
                             f"with, else {DEFAULT_IMAPD_CONF})")
    parser.add_argument("--cyrus-conf", "-M", default=None, metavar="PATH",
                        help="the instance's cyrus.conf; for a switchable instance the primary "
                             f"role's (default: from its unit, else {DEFAULT_CYRUS_CONF})")
    parser.add_argument("--replica-cyrus-conf", default=None, metavar="PATH",
                        help="a switchable instance: the replica role's cyrus.conf (empty: none; "
                             "default: from its unit)")
    parser.add_argument("--initial-role", choices=(*instances.ROLES, ""), default=None,
                        help="a switchable instance: its role before any is recorded (default: from its "
                             "unit)")
    parser.add_argument("--instance", default="default", metavar="NAME",
                        help="instance name (the %%i of cyrus@NAME.service); alone, it finds the "
                             "instance's files in its unit")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds")
    return value


def seconds(text: str) -> float:
    """A duration that may be 0 (e.g. no grace at all)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    return value


def positive_seconds(text: str) -> float:
    """A duration that must be > 0 (a deadline of 0 could never succeed)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be greater than 0")
    return value


def percent(text: str) -> float:
    """A share in percent, 0 to 100."""
    value = _number(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: must be between 0 and 100")
    return value


def nonempty(text: str) -> str:
    """A path argument that must not be empty (an empty --output would mean the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def instance_files(args: argparse.Namespace) -> instances.InstanceFiles:
    return instances.resolve(args.instance, args.imapd_conf, args.cyrus_conf,
                             args.replica_cyrus_conf or None, args.initial_role or None)


def load_instance(args: argparse.Namespace, warn: bool = False, role: str | None = None) -> Instance:
    """The instance the command line names (with the cyrus.conf of its role); with `warn`, its
    configuration warnings are logged."""
    instance = instances.load(instance_files(args), role)
    if warn:
        hostless = [channels.hostless_message(c, where) for c, where in channels.hostless_channels(instance)]
        for warning in instance.warnings + channels.warnings(instance) + hostless:
            log.warning("%s", warning)
    return instance

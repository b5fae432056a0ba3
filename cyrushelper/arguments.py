"""Command-line pieces every subcommand shares: the instance options, number types that argparse
checks (a bad value is a one-line usage error, exit 2, before anything runs), and loading the
instance with its warnings. cli.py builds the parser from these; subcommand modules use them in
their add_arguments()/main() and never import cli.
"""

from __future__ import annotations

import argparse
import logging
import math

from cyrushelper import channels
from cyrushelper.config import DEFAULT_CYRUS_CONF, DEFAULT_IMAPD_CONF, Instance

log = logging.getLogger("cyrushelper")


def add_instance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--imapd-conf", "-C", default=str(DEFAULT_IMAPD_CONF), metavar="PATH",
                        help=f"the instance's imapd.conf (default {DEFAULT_IMAPD_CONF})")
    parser.add_argument("--cyrus-conf", "-M", default=str(DEFAULT_CYRUS_CONF), metavar="PATH",
                        help=f"the instance's cyrus.conf (default {DEFAULT_CYRUS_CONF})")
    parser.add_argument("--instance", default="default", metavar="NAME",
                        help="instance name (the %%i of cyrus@NAME.service)")


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


def load_instance(args: argparse.Namespace, warn: bool = False) -> Instance:
    """The instance the command line names; with `warn`, its configuration warnings are logged."""
    instance = Instance.load(args.imapd_conf, args.cyrus_conf, args.instance)
    if warn:
        for warning in instance.warnings + channels.warnings(instance):
            log.warning("%s", warning)
    return instance

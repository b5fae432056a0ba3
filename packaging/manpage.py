"""cyrushelper(8), generated from the argparse definitions so the manual cannot drift from --help.

    python3 packaging/manpage.py [--output FILE]

The Debian and Fedora builds run this at build time, from the source tree they package, and install
the result; tests/unit/test_manpage.py renders it with groff and checks that every subcommand and
option is in it. It lives beside the packaging, not in the package: it reads the whole command line
(cyrushelper.cli), which no module of the package may import.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the source tree being packaged

from cyrushelper import __version__, cli, exitcodes  # noqa: E402

SEE_ALSO = "systemd.service(5), systemd.kill(5), systemctl(1), master(8), sync_client(8), imapd.conf(5), cyrus.conf(5)"


def _escape(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line starting with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines())


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        text = text % dict(vars(action), prog=prog)
    return " ".join(text.split())


def _option_heading(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_escape(o)}\\fR" for o in action.option_strings)
    if action.option_strings and action.nargs != 0:
        metavar = action.metavar or action.dest.upper()
        names += f" \\fI{_escape(str(metavar))}\\fR"
    elif not action.option_strings:
        names = f"\\fI{_escape(str(action.metavar or action.dest))}\\fR"
    return names


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        lines += [".TP", _option_heading(action), _escape(_help(action, parser.prog))]
    return lines


def _date() -> str:
    # reproducible builds: dpkg-buildpackage and rpmbuild set SOURCE_DATE_EPOCH
    stamp = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    return time.strftime("%Y-%m-%d", time.gmtime(stamp))


def render() -> str:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [f'.TH CYRUSHELPER 8 "{_date()}" "cyrushelper {__version__}" "System Administration"',
           ".SH NAME", "cyrushelper \\- " + _escape(parser.description.rstrip(".")),
           ".SH SYNOPSIS", ".B cyrushelper", "[\\fB\\-v\\fR] \\fISUBCOMMAND\\fR [\\fIOPTION\\fR]...",
           ".SH DESCRIPTION",
           _escape("cyrushelper runs a Cyrus IMAP instance as a systemd service (cyrus@NAME.service) whose "
                   "stop never loses a replication event: the main process fences new sessions, gives open "
                   "ones a grace period, sends exactly one SIGTERM to master, and ExecStopPost drains every sync log channel "
                   "to the replica before the unit is inactive. The generate command renders those units "
                   "from an instance's imapd.conf and cyrus.conf."),
           ".SH OPTIONS", *_options(parser), ".SH COMMANDS"]
    for name, subparser in sub.choices.items():
        out += [f'.SS "cyrushelper {name}"', _escape(subparser.description or ""), *_options(subparser)]
    out += [".SH EXIT STATUS", _escape("All commands; status has its own 0/1/3, see cyrushelper status --help.")]
    for code, text in sorted(exitcodes.DESCRIPTIONS.items()):
        out += [".TP", f"\\fB{code}\\fR", _escape(text)]
    out += [".SH SEE ALSO", _escape(SEE_ALSO)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packaging/manpage.py", description=__doc__.splitlines()[0])
    parser.add_argument("--output", "-o", metavar="FILE", help="write here (default: standard output)")
    args = parser.parse_args(argv)
    text = render()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""cyrushelper(8) is generated from the argparse definitions: every subcommand and option is in it,
and groff formats it without a warning."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from cyrushelper import cli, exitcodes

ROOT = Path(__file__).resolve().parents[2]
# packaging/ is not a Python package (its name would shadow the `packaging` library): load by path
_spec = importlib.util.spec_from_file_location("cyrushelper_manpage", ROOT / "packaging" / "manpage.py")
manpage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(manpage)


def test_every_subcommand_and_option_is_in_the_manual():
    page = manpage.render().replace("\\-", "-")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        assert f'.SS "cyrushelper {name}"' in page, name
        section = page.split(f'.SS "cyrushelper {name}"', 1)[1].split(".SS ", 1)[0]
        for action in subparser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in section, f"{name} {option} missing from cyrushelper(8)"
    for code in exitcodes.DESCRIPTIONS:
        assert f"\\fB{code}\\fR" in page


def test_roff_is_escaped():
    assert manpage._escape(".starts with a dot\n'quote\nback\\slash-dash") == \
        "\\&.starts with a dot\n\\&'quote\nback\\eslash\\-dash"


@pytest.mark.skipif(shutil.which("groff") is None, reason="no groff")
def test_groff_formats_it_without_warnings(tmp_path):
    page = tmp_path / "cyrushelper.8"
    assert manpage.main(["--output", str(page)]) == 0
    r = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_date_is_reproducible(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1795737600")
    assert manpage.render().splitlines()[0].startswith('.TH CYRUSHELPER 8 "2026-11-27"')

"""README, --help, CI and the rendered units must stay true to the code."""

import re
from pathlib import Path

from cyrushelper import cli, exitcodes

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_demo_and_the_test_command():
    commands = [line.split("#")[0].strip() for line in README.splitlines() if line.startswith("    ")][:2]
    assert commands == ["sh scripts/demo.sh", "sh scripts/test.sh"]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        text = (ROOT / script).read_text()
        assert "sh scripts/bootstrap.sh" in text, f"{script} must install what it needs itself"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec sh scripts/test\.sh\s*$", ci, re.M), ci


def test_readme_exit_code_table_matches_the_code():
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", README, re.M))
    assert {int(k): v for k, v in table.items()} == exitcodes.DESCRIPTIONS


def test_readme_lists_every_subcommand():
    for name in cli.SUBCOMMANDS:
        assert f"`cyrushelper {name}`" in README, name


def test_readme_tuning_variables_exist_in_the_unit_template():
    template = (ROOT / "templates" / "cyrus@.service.j2").read_text()
    for var in re.findall(r"CYRUSHELPER_[A-Z]+_OPTS", README):
        assert f"${var}" in template, var


def test_options_named_in_readme_exist():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command, option in re.findall(r"`cyrushelper (\w+) [^`]*?(--[a-z-]+)", README):
        options = {o for a in sub.choices[command]._actions for o in a.option_strings}
        assert option in options, f"README names {command} {option}, which does not exist"

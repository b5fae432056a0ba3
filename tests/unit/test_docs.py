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


def test_readme_commands_table_has_one_row_per_subcommand():
    """One row each, exactly the subcommands the code has (a stale row once said switchover was
    not implemented yet, next to the row describing it)."""
    rows = re.findall(r"^\| `cyrushelper (\w+)` \|", README, re.M)
    assert sorted(rows) == sorted(cli.SUBCOMMANDS), rows


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


def recipe_blocks() -> list[str]:
    """The shell blocks of the README's switchable-pair recipe, in order."""
    section = README[README.index("### A switchable pair, step by step"):]
    section = section[:section.index("\n## ")]
    return re.findall(r"^```sh\n(.*?)^```$", section, re.M | re.S)


def test_readme_recipe_writes_the_configs_the_tests_use(tmp_path):
    """The README's write_instance is the test bed's switchable pair, byte for byte."""
    import subprocess
    from testbed.pair import SwitchablePair
    block = recipe_blocks()[0].replace("ROOT=/srv/cyrus", f"ROOT={tmp_path}", 1)
    subprocess.run(["sh", "-ec", block], check=True, timeout=30)
    pair = SwitchablePair(tmp_path, 12000)
    for name in ("a", "b"):
        for target, text in pair.render(name).items():
            assert (tmp_path / name / target).read_text() == text, (name, target)


def test_readme_switchover_contract_options_exist():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    options = {o for a in sub.choices["switchover"]._actions for o in a.option_strings}
    assert {"--from", "--to", "--dry-run", "--resume", "--abort", "--json"} <= options
    for option in re.findall(r"`(--[a-z-]+)", README[README.index("## Soft failover"):README.index("### A switchable")]):
        assert any(option in {o for a in p._actions for o in a.option_strings} for p in sub.choices.values()), option

"""The command line surface: --version, --help listing every planned subcommand, honest refusals."""

import os
import subprocess
import sys

import pytest

from cyrushelper import __version__, cli, exitcodes

PLANNED = ["generate", "run", "stop", "drain", "status", "watch", "switchover"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cyrushelper", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"cyrushelper {__version__}"


def test_help_lists_every_planned_subcommand_and_exit_codes():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in PLANNED:
        assert f"\n    {name} " in r.stdout, name
    for code, text in exitcodes.DESCRIPTIONS.items():
        assert f"{code:>3}  {text}" in r.stdout


@pytest.mark.parametrize("name", PLANNED)
def test_every_subcommand_has_help(name):
    r = run_cli(name, "--help")
    assert r.returncode == 0, r.stderr
    assert name in r.stdout


def test_each_subcommand_is_implemented_or_refuses_with_exit_2():
    """A subcommand either has a module with main() or says 'not implemented yet' and exits 2."""
    for name in PLANNED:
        module = cli._load(cli.SUBCOMMANDS[name][0])
        if module is not None:
            assert callable(module.main) and callable(module.add_arguments), name
            continue
        r = run_cli(name)
        assert r.returncode == exitcodes.USAGE, name
        assert "not implemented yet" in r.stderr, name


def test_no_subcommand_prints_help_and_fails():
    r = run_cli()
    assert r.returncode == exitcodes.USAGE
    assert "SUBCOMMAND" in r.stdout


def test_console_script_entry_point_declared():
    import tomllib
    from pathlib import Path
    data = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert data["project"]["scripts"]["cyrushelper"] == "cyrushelper.cli:main"


@pytest.mark.parametrize("argv, message", [
    (["drain", "--deadline", "nan"], "not a finite number"),
    (["drain", "--deadline", "0"], "must be greater than 0"),
    (["drain", "--per-run-timeout", "inf"], "not a finite number"),
    (["drain", "--lock-wait", "-1"], "must not be negative"),
    (["run", "--stop-timeout", "-1"], "must not be negative"),
    (["run", "--start-timeout", "soon"], "not a number of seconds"),
    (["stop", "--grace", "nan"], "not a finite number"),
    (["run", "--grace", "-1"], "must not be negative"),
    (["run", "--message", "two\nlines"], "must be one line"),
    (["stop", "--message", " [ "], "the fence message is empty"),
    (["watch", "--interval", "-0.5"], "must not be negative"),
])
def test_durations_are_checked_before_anything_runs(argv, message):
    """One set of argument types for every subcommand: a bad duration is a usage error (exit 2)
    with one line naming the option, before any configuration is read."""
    r = run_cli(*argv, "-C", "/nonexistent/imapd.conf")
    assert r.returncode == exitcodes.USAGE, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr

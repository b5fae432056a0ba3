"""Switchable instances: instance name -> files (instances.py), the role rules and the split-brain
guard (role.py), the ssh transport's command lines (remote.py). Real units and real Cyrus are
exercised by tests/system/test_switchover.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cyrushelper import exitcodes, instances, role, state
from cyrushelper.config import ConfigError
from cyrushelper.remote import Host, parse_target
from testbed.pair import SwitchablePair

SHOW = """LoadState=loaded
Environment=CYRUSHELPER_RUN_OPTS= CYRUSHELPER_STOP_OPTS= CYRUSHELPER_DRAIN_OPTS= CYRUS_REPLICA_CONF=/srv/a/cyrus-replica.conf CYRUSHELPER_INITIAL_ROLE=primary CYRUS_IMAPD_CONF=/srv/a/imapd.conf CYRUS_CONF=/srv/a/cyrus.conf "CYRUSHELPER_DRAIN_OPTS=--deadline 20"
ExecStart={ path=/opt/v/bin/cyrushelper ; argv[]=/opt/v/bin/cyrushelper run --instance %i ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }
"""


def test_parse_show_reads_the_units_files_and_helper():
    files = instances.parse_show("a", SHOW)
    assert files == instances.InstanceFiles(
        name="a", imapd_conf=Path("/srv/a/imapd.conf"), cyrus_conf=Path("/srv/a/cyrus.conf"),
        replica_cyrus_conf=Path("/srv/a/cyrus-replica.conf"), initial_role="primary",
        helper="/opt/v/bin/cyrushelper", source="unit cyrus@a.service")
    assert files.cyrus_conf_for("replica") == Path("/srv/a/cyrus-replica.conf")
    assert instances.parse_show("a", SHOW.replace("loaded", "not-found")) is None
    # a unit not made by generate (no CYRUS_IMAPD_CONF) is not ours
    assert instances.parse_show("a", "LoadState=loaded\nEnvironment=FOO=1\n") is None
    plain = instances.parse_show("a", SHOW.replace("CYRUS_REPLICA_CONF=/srv/a/cyrus-replica.conf", "CYRUS_REPLICA_CONF="))
    assert plain.replica_cyrus_conf is None and not plain.switchable


@pytest.fixture
def pair(tmp_path):
    """The README recipe's files for a and b (not a running Cyrus: only parsed here)."""
    p = SwitchablePair(tmp_path / "srv", 12000)
    for name in ("a", "b"):
        p.dir(name).mkdir(parents=True)
        (p.config_dir(name)).mkdir()
        for target, text in p.render(name).items():
            (p.dir(name) / target).write_text(text)
    return p


def files_of(pair, name, initial=None):
    return instances.InstanceFiles(name, pair.imapd_conf(name), pair.cyrus_conf(name),
                                   pair.replica_cyrus_conf(name), initial)


def test_the_recipe_passes_the_pair_rules_and_loads_the_cyrus_conf_of_each_role(pair):
    for name in ("a", "b"):
        for r in role.ROLES:
            inst = instances.load(files_of(pair, name), r)
            assert inst.role == r and inst.switchable
            assert inst.cyrus.path == (pair.cyrus_conf(name) if r == "primary" else pair.replica_cyrus_conf(name))
            assert role.check_switchable(inst) == []


@pytest.mark.parametrize("change,expected", [
    (("imapd.conf", "sync_log: 1\n", "sync_log: 0\n"), "needs `sync_log: 1`"),
    (("imapd.conf", "sync_log: 1\n", "sync_log: 1\nsync_log_chain: 1\n"), "sync_log_chain must be off"),
    (("cyrus-replica.conf", "EVENTS {", 'DAEMON {\n  sc cmd="sync_client -r"\n}\nEVENTS {'), "must not replicate"),
    (("cyrus-replica.conf", "  syncserver", "#  syncserver"), "no sync_server"),
])
def test_pair_rules_refuse_with_file_and_line(pair, change, expected):
    name, old, new = change
    path = pair.dir("a") / name
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(ConfigError, match=expected) as e:
        role.check_switchable(instances.load(files_of(pair, "a"), "primary"))
    assert str(path) in str(e.value) or "imapd.conf" in str(e.value)


def test_a_switchable_instance_without_any_role_is_refused(pair):
    with pytest.raises(ConfigError, match="no role yet"):
        instances.load(files_of(pair, "a"))


def test_first_start_records_the_initial_role_then_the_record_wins(pair):
    files = files_of(pair, "a", initial="primary")
    configdir = pair.config_dir("a")
    assert role.start_role(files, configdir, None, False) == "primary"
    assert state.read_role(configdir)["by"].startswith("first start")
    state.write_role(configdir, "replica", by="switchover X")
    # the unit still says primary (its initial role): the record wins, no refusal
    assert role.start_role(files, configdir, None, False) == "replica"
    assert instances.load(files).role == "replica"


def test_split_brain_guard_refuses_the_old_role_unless_forced(pair, caplog):
    files = files_of(pair, "a", initial="primary")
    configdir = pair.config_dir("a")
    state.write_role(configdir, "replica", by="switchover 20261201-a-b")
    with pytest.raises(role.RoleRefused, match="recorded as replica.*asks for primary.*split brain"):
        role.start_role(files, configdir, "primary", False)
    assert state.read_role(configdir)["role"] == "replica"
    assert role.start_role(files, configdir, "replica", False) == "replica"
    assert role.start_role(files, configdir, "primary", True) == "primary"
    record = state.read_role(configdir)
    assert record["role"] == "primary" and record["previous"]["role"] == "replica"
    assert "split brain" in caplog.text


def test_damaged_role_record_refuses(pair):
    (state.ensure_directory(pair.config_dir("a")) / state.ROLE).write_text("{")
    with pytest.raises(role.RoleRefused, match="damaged"):
        role.start_role(files_of(pair, "a", "primary"), pair.config_dir("a"), None, False)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cyrushelper", *args], capture_output=True, text=True, timeout=60)


def test_role_command_shows_and_sets_only_with_authority(pair):
    conf = ["--instance", "a", "-C", str(pair.imapd_conf("a")), "-M", str(pair.cyrus_conf("a")),
            "--replica-cyrus-conf", str(pair.replica_cyrus_conf("a")), "--initial-role", "primary"]
    r = run_cli("role", *conf, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["role"] == "primary"
    r = run_cli("role", *conf, "--set", "replica")
    assert r.returncode == exitcodes.REFUSED and "without --force" in r.stderr
    r = run_cli("role", *conf, "--set", "replica", "--switchover", "X1", "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["role"] == "replica" and shown["record"]["switchover"] == "X1"
    assert shown["cyrus_conf"] == str(pair.replica_cyrus_conf("a"))


def test_targets_and_ssh_command_lines():
    assert parse_target("b") == ("b", Host(None))
    assert parse_target("b@10.0.0.2") == ("b", Host("10.0.0.2"))
    with pytest.raises(ValueError):
        parse_target("b@")
    argv = Host("h1").argv(["/opt/v/bin/cyrushelper", "status", "--instance", "b x"])
    assert argv[0] == "ssh" and "BatchMode=yes" in argv and argv[-3:] == ["root@h1", "--",
                                                                         "/opt/v/bin/cyrushelper status --instance 'b x'"]
    assert Host(None).argv(["true"]) == ["true"]


def test_switchover_refuses_before_touching_anything():
    """Usage errors exit 2; an instance without a unit (here: no systemd at all) is refused, 77."""
    r = run_cli("switchover", "--from", "a", "--to", "a")
    assert r.returncode == exitcodes.USAGE and "same instance" in r.stderr
    r = run_cli("switchover", "--from", "a", "--to", "b", "--resume", "--abort")
    assert r.returncode == exitcodes.USAGE
    r = run_cli("switchover", "--from", "nonexistent-instance", "--to", "b")
    assert r.returncode == exitcodes.REFUSED and "no unit cyrus@nonexistent-instance.service" in r.stderr


def test_switchover_help_lists_every_option():
    r = run_cli("switchover", "--help")
    for option in ("--from", "--to", "--dry-run", "--resume", "--abort", "--json", "--force", "--max-backlog",
                   "--stop-timeout", "--start-timeout", "--repair-timeout", "--canary-timeout", "--canary-rcpt"):
        assert option in r.stdout, option
    for code in (exitcodes.ROLLED_BACK, exitcodes.UNFINISHED, exitcodes.UNVERIFIED, exitcodes.REFUSED):
        assert f"{code:>3}  " in r.stdout

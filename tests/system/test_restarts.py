"""Restarts under a real systemd (issue 12, item 1): manual restarts never lock the operator out,
a crash loop still ends in a visible `failed` instead of restarting forever.

cyrus@.service keeps StartLimitIntervalSec=10min/StartLimitBurst=5, but its ExecStartPre resets the
count at every start that is not an automatic restart (NRestarts == 0), so only consecutive
automatic restarts after crashes are counted."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.system

PRIMARY = "cyrus@primary.service"
REPLICA = "cyrus@replica.service"


def test_ten_manual_restarts_under_load_all_succeed_and_lose_nothing(lab_factory):
    lab = lab_factory(rolling=True)
    lab.install_cyrushelper_units()
    lab.start(REPLICA, PRIMARY)
    load, record = lab.start_load(seconds=600)
    assert lab.wait_acknowledged(record, 100, timeout=60) >= 100, "load did not get going"

    invocations = [lab.c.show(PRIMARY, "InvocationID")["InvocationID"]]
    for i in range(10):
        r = lab.c.systemctl("restart", PRIMARY, check=False, timeout=300)
        props = lab.c.show(PRIMARY, "ActiveState", "Result", "InvocationID")
        assert r.returncode == 0 and props["ActiveState"] == "active", \
            (f"restart {i + 1} of 10 failed: {r.stderr.strip()} {props}", lab.journal(PRIMARY)[-3000:])
        invocations.append(props["InvocationID"])
        drain = lab.state_file("last-drain.json")
        assert drain["exit_code"] == 0, (f"restart {i + 1}: the stop did not drain", drain)
    assert len(set(invocations)) == 11, "a restart did not start a new invocation"
    acked = lab.wait_acknowledged(record, 0)
    assert lab.wait_acknowledged(record, acked + 50, timeout=60) >= acked + 50, "no delivery after the restarts"

    stop = lab.stop(PRIMARY)
    lab.stop_load(load)
    assert (stop.result, stop.total_left) == ("success", 0), stop
    report = lab.verify(record)
    assert report["missing"] == 0, report
    assert lab.unexpected_sigterm_lines() == []
    print(f"10 restarts under load: {report['summary']}")


def test_crash_loop_ends_failed_and_a_manual_start_recovers_after_reset_failed(lab_factory):
    lab = lab_factory(rolling=True)
    conf = lab.pair.primary_cyrus_conf
    good = conf.read_text()
    # master exits at once when a START entry fails: every start of the primary crashes
    assert "START {\n" in good
    conf.write_text(good.replace("START {\n", 'START {\n  crash cmd="/bin/false"\n', 1))
    # RestartSec=: a tuning drop-in, so the loop runs in seconds instead of 5 s per round
    lab.install_cyrushelper_units(extra_dropin={"primary": "[Service]\nRestartSec=100ms\n"})
    lab.start(REPLICA)
    r = lab.c.systemctl("start", PRIMARY, check=False, timeout=120)
    assert r.returncode != 0
    lab.c.wait_state(PRIMARY, "failed", timeout=120)
    # 5 automatic restarts ran; the 6th was refused (systemd 252 keeps Result=exit-code then)
    journal = lab.journal(PRIMARY)
    assert "Start request repeated too quickly" in journal, journal[-3000:]
    props = lab.c.show(PRIMARY, "ActiveState", "SubState", "NRestarts")
    assert props == {"ActiveState": "failed", "SubState": "failed", "NRestarts": "6"}, props

    conf.write_text(good)   # the admin fixes the configuration
    assert lab.c.systemctl("start", PRIMARY, check=False, timeout=120).returncode != 0, \
        "after start-limit-hit systemd refuses until reset-failed (as for any unit)"
    lab.c.systemctl("reset-failed", PRIMARY)
    lab.start(PRIMARY)
    record = lab.deliver(20, tag="after-crash-loop")
    stop = lab.stop(PRIMARY)
    assert (stop.result, stop.total_left) == ("success", 0), stop
    assert lab.verify(record)["missing"] == 0

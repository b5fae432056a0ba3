"""Issue 13 on the real thing: what the unclean-stop marker says through kills, clean stops and a
reconcile, under a real systemd with real Cyrus (one container boot for the whole sequence).

- `systemctl kill --kill-whom=main --signal=SIGKILL` kills the helper, and systemd (252, measured)
  then SIGKILLs master and every child at once, with no fence: a marker, with the evidence;
- a clean stop afterwards keeps the marker and says so at the next start; its drain replays the
  log but refuses the all-clear while the marker is there (issue 10: exit 66, unit failed);
- `systemctl kill --signal=SIGKILL` (everything) makes the marker hold the latest event (2 counted);
- a start with `--reconcile=auto` clears it, and status says by what.
Each step's `status --json` and start log are printed (pytest -s shows them).
"""

from __future__ import annotations

import json

import pytest

from cyrushelper import exitcodes
from tests.conftest import PRIMARY, REPLICA

pytestmark = pytest.mark.system


def _status(lab) -> dict:
    r = lab.cyrushelper("status", "--instance", "primary", "--json")
    return json.loads(r.stdout)


def _new_journal(lab, seen: list[str]) -> str:
    """Lines of cyrus@primary's journal that were not returned before."""
    lines = lab.journal(PRIMARY).splitlines()
    new = lines[len(seen):]
    seen[:] = lines
    return "\n".join(new)


def _killed_and_restarted(lab, *kill_args: str) -> None:
    """`systemctl kill …`, then wait for Restart=on-failure (RestartSec=5s) to have started it anew."""
    before = lab.c.show(PRIMARY, "InvocationID")["InvocationID"]
    lab.c.systemctl("kill", *kill_args, PRIMARY)
    for _ in range(1200):
        props = lab.c.show(PRIMARY, "InvocationID", "SubState")
        if props["InvocationID"] != before and props["SubState"] == "running":
            return
        lab.c.run("sleep", "0.1")
    raise AssertionError(f"{PRIMARY} was not restarted: {props}")


def test_unclean_marker_tells_the_truth_through_kill_stop_kill_reconcile(lab_factory):
    lab = lab_factory(rolling=True)
    lab.install_cyrushelper_units()
    lab.start(REPLICA, PRIMARY)
    lab.deliver(50, tag="before")
    seen: list[str] = []
    _new_journal(lab, seen)

    # 1. the helper is killed: systemd SIGKILLs Cyrus with it; the marker says so, with evidence
    _killed_and_restarted(lab, "--kill-whom=main", "--signal=SIGKILL")
    st = _status(lab)
    log = _new_journal(lab, seen)
    first = st["unclean_stop"]
    print(f"--- step 1: helper killed ---\n{log}\n{json.dumps(first, indent=1)}")
    assert "(master) with signal SIGKILL" in log, "systemd did not SIGKILL master: the marker's premise changed"
    assert first is not None and first["events"] == 1 and "SERVICE_RESULT=signal" in first["reason"]
    assert first["evidence"]["run"]["master_pid"] == first["master_pid"]
    assert f"unclean stop at {first['time']}" in log and "cleared by" in log, log
    assert st["exit_code"] == 1

    # 2. a clean stop and start: the marker stays and the start log says a later stop followed;
    # the stop's drain replays every line but gives no all-clear while the marker is there
    stop = lab.stop(PRIMARY)
    assert (stop.result, stop.total_left) == ("exit-code", 0), stop
    assert lab.state_file("last-drain.json")["exit_code"] == exitcodes.RECONCILE_NEEDED
    lab.start(PRIMARY)
    st = _status(lab)
    log = _new_journal(lab, seen)
    print(f"--- step 2: clean stop + start ---\n{log}\n{json.dumps(st['unclean_stop'], indent=1)}")
    assert st["unclean_stop"]["time"] == first["time"] and st["unclean_stop"]["stops_since"] == 1
    assert "1 later stop(s) did not recover those events" in log, log
    assert st["last_stop"]["result"] == "clean"

    # 3. killed again (everything at once): the marker holds the latest event, both counted
    _killed_and_restarted(lab, "--signal=SIGKILL")
    st = _status(lab)
    log = _new_journal(lab, seen)
    latest = st["unclean_stop"]
    print(f"--- step 3: Cyrus killed again ---\n{log}\n{json.dumps(latest, indent=1)}")
    assert latest["events"] == 2 and latest["time"] != first["time"]
    assert latest["first_time"] == first["time"] and latest["stops_since"] == 0
    assert f"unclean stop at {latest['time']}" in log and "the latest of 2" in log, log

    # 4. reconcile at start: the marker is cleared, status says by what
    lab.c.run("sh", "-c", "mkdir -p /etc/systemd/system/cyrus@primary.service.d && cat > "
                          "/etc/systemd/system/cyrus@primary.service.d/reconcile.conf",
              input='[Service]\nEnvironment="CYRUSHELPER_RUN_OPTS=--reconcile=auto"\n')
    lab.c.systemctl("daemon-reload")
    lab.c.systemctl("restart", PRIMARY, timeout=180)
    deadline_status = None
    for _ in range(600):
        deadline_status = _status(lab)
        if deadline_status["unclean_stop"] is None:
            break
        lab.c.run("sleep", "0.2")
    st = deadline_status
    log = _new_journal(lab, seen)
    print(f"--- step 4: reconcile ---\n{log}\n{json.dumps(st['last_reconcile'], indent=1)}")
    assert st["unclean_stop"] is None, st
    assert st["last_reconcile"]["by"].startswith("reconcile at start")
    assert st["last_reconcile"]["cleared_marker"]["events"] == 2
    assert "unclean-stop marker cleared" in log, log
    assert st["exit_code"] == 0

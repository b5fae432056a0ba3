"""Issue 13 on the real thing: what the unclean-stop marker says through kills, clean stops and a
reconcile, under a real systemd with real Cyrus (one container boot for the whole sequence).

- `systemctl kill --kill-whom=main --signal=SIGKILL` kills only the helper: ExecStop then stops
  the orphaned master cleanly, so no marker (a dead helper is not a lost event);
- `systemctl kill --signal=SIGKILL` kills Cyrus too: marker, with the evidence;
- a clean stop afterwards keeps the marker and says so at the next start;
- a second kill makes the marker hold the latest event (2 events counted);
- a start with `--reconcile=auto` clears it, and status says by what.
Each step's `status --json` and start log are printed (pytest -s shows them).
"""

from __future__ import annotations

import json

import pytest

from tests.system.test_lossless_stop import PRIMARY, REPLICA, lab_factory  # noqa: F401 (fixture)

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


def _restarted(lab, unit: str = PRIMARY) -> None:
    """After a kill, Restart=on-failure brings the unit back (RestartSec=5s)."""
    lab.c.wait_state(unit, "running", timeout=120)


def test_unclean_marker_tells_the_truth_through_kill_stop_kill_reconcile(lab_factory):  # noqa: F811
    lab = lab_factory(rolling=True)
    lab.install_cyrushelper_units()
    lab.start(REPLICA, PRIMARY)
    lab.deliver(50, tag="before")
    seen: list[str] = []
    _new_journal(lab, seen)

    # 1. only the helper is killed: Cyrus is stopped cleanly by ExecStop, no marker
    lab.c.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", PRIMARY)
    _restarted(lab)
    st = _status(lab)
    log = _new_journal(lab, seen)
    print(f"--- step 1: helper killed ---\n{log}\n{json.dumps(st['last_stop'], indent=1)}")
    assert st["unclean_stop"] is None, st["unclean_stop"]
    assert "orphaned master" in log and "not an unclean stop" in log, log
    assert "Killing process" not in log, "systemd had to SIGKILL Cyrus after the helper died"

    # 2. Cyrus itself is SIGKILLed: marker with evidence; the restart says so
    lab.c.systemctl("kill", "--signal=SIGKILL", PRIMARY)
    _restarted(lab)
    st = _status(lab)
    log = _new_journal(lab, seen)
    first = st["unclean_stop"]
    print(f"--- step 2: Cyrus killed ---\n{log}\n{json.dumps(first, indent=1)}")
    assert first is not None and first["events"] == 1 and "SERVICE_RESULT=signal" in first["reason"]
    assert first["evidence"]["run"]["master_pid"] == first["master_pid"]
    assert f"unclean stop at {first['time']}" in log and "cleared by" in log, log
    assert st["exit_code"] == 1

    # 3. a clean stop and start: the marker stays and the start log says a later stop followed
    assert lab.stop(PRIMARY).result == "success"
    lab.start(PRIMARY)
    st = _status(lab)
    log = _new_journal(lab, seen)
    print(f"--- step 3: clean stop + start ---\n{log}\n{json.dumps(st['unclean_stop'], indent=1)}")
    assert st["unclean_stop"]["time"] == first["time"] and st["unclean_stop"]["stops_since"] == 1
    assert "1 later stop(s) did not recover those events" in log, log
    assert st["last_stop"]["result"] == "clean"

    # 4. killed again: the marker holds the latest event, both counted
    lab.c.systemctl("kill", "--signal=SIGKILL", PRIMARY)
    _restarted(lab)
    st = _status(lab)
    log = _new_journal(lab, seen)
    latest = st["unclean_stop"]
    print(f"--- step 4: Cyrus killed again ---\n{log}\n{json.dumps(latest, indent=1)}")
    assert latest["events"] == 2 and latest["time"] != first["time"]
    assert latest["first_time"] == first["time"] and latest["stops_since"] == 0
    assert f"unclean stop at {latest['time']}" in log and "the latest of 2" in log, log

    # 5. reconcile at start: the marker is cleared, status says by what
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
    print(f"--- step 5: reconcile ---\n{log}\n{json.dumps(st['last_reconcile'], indent=1)}")
    assert st["unclean_stop"] is None, st
    assert st["last_reconcile"]["by"].startswith("reconcile at start")
    assert st["last_reconcile"]["cleared_marker"]["events"] == 2
    assert "unclean-stop marker cleared" in log, log
    assert st["exit_code"] == 0

"""`cyrushelper run` as the main process of cyrus@primary under a real systemd 252, with real
Cyrus 3.6 (testbed.scenario): the README's claims about the running and stopping unit.

- a slow stop outlives TimeoutStopSec because run pulses EXTEND_TIMEOUT_USEC, and shows
  `STATUS=stopping: master and N children left` meanwhile;
- master left alone after its last child exited (the Cyrus 3.6 shutdown hang, cyrus-imapd #5309,
  provoked here on purpose) is SIGKILLed after 1 s and the stop stays clean;
- master dying on its own makes run exit 1: the unit fails, its drain runs, Restart= restarts it;
  on each supported Debian release, with READY=1 decided the way its Cyrus allows: listener probes
  on Debian 12 (Cyrus 3.6.1 has no master.ready), master.ready then the probes on Debian 13 (3.10.2).
"""

from __future__ import annotations

import time

import pytest

from cyrushelper import exitcodes, supervisor
from testbed import images
from tests.conftest import PRIMARY, started, until

pytestmark = pytest.mark.system

# A DAEMON child (cyrus.conf) that makes master hang at shutdown, deterministically. On SIGTERM it
# waits for RELEASE (a slow child, so that the stop outlives TimeoutStopSec), then until master has
# no other child left, then connects to the IMAP listener -- which no worker serves any more -- and
# exits. Master (3.6.1 master/master.c) then finds that listener readable at every pselect(), which
# therefore never delivers the pending SIGCHLD: master spins and never reaps us (cyrus-imapd #5309;
# measured: 3 of 3 hangs with the connection, 0 of 2 without).
HANG_MAKER = '''#!/usr/bin/python3
import os, signal, socket, sys, time
release, port = sys.argv[1], int(sys.argv[2])

def siblings():
    me, master, found = os.getpid(), os.getppid(), []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == master:
                found.append(name)
    return found

def on_term(*_):
    while not os.path.exists(release):
        time.sleep(0.05)
    while siblings():
        time.sleep(0.05)
    socket.create_connection(("127.0.0.1", port))
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(1)
'''


def test_slow_stop_outlives_timeout_stop_sec_and_hung_master_is_killed_clean(lab_factory):
    timeout_stop = 2
    lab = lab_factory(rolling=False)
    release = lab.workdir / "release"
    script = lab.workdir / "hang-maker.py"
    script.write_text(HANG_MAKER)
    script.chmod(0o755)
    conf = lab.pair.primary_cyrus_conf
    conf.write_text(conf.read_text() + f'\nDAEMON {{\n  hangmaker cmd="{script} {release} '
                                       f'{lab.pair.ports.primary_imap}"\n}}\n')
    started(lab, extra_dropin={"primary": f"[Service]\nTimeoutStopSec={timeout_stop}s\n"
                                          "Environment=\"CYRUSHELPER_RUN_OPTS=--stop-timeout 20\"\n"})

    t0 = time.monotonic()
    lab.c.systemctl("stop", "--no-block", PRIMARY)
    # the idle imapd/lmtpd exit at once; the slow child stays, and STATUS says so
    until(lambda: lab.c.show(PRIMARY, "StatusText")["StatusText"] == "stopping: master and 1 children left",
          30, "STATUS=stopping: master and 1 children left")
    # held by the slow child: well past TimeoutStopSec, systemd has not killed anything
    time.sleep(2 * timeout_stop)
    props = lab.c.show(PRIMARY, "ActiveState", "SubState")
    assert props == {"ActiveState": "deactivating", "SubState": "stop-sigterm"}, props
    release.touch()
    until(lambda: lab.c.show(PRIMARY, "ActiveState")["ActiveState"] in ("inactive", "failed"), 60,
          "the stop to end")
    seconds = time.monotonic() - t0

    props = lab.c.show(PRIMARY, "Result", "ActiveState", "ExecMainStatus")
    assert props == {"Result": "success", "ActiveState": "inactive", "ExecMainStatus": "0"}, \
        (props, lab.journal(PRIMARY)[-4000:])
    assert seconds > 2 * timeout_stop
    last = lab.state_file("last-stop.json")
    assert last["result"] == "clean" and last.get("master_hung_after_children") is True, last
    assert lab.state_file("unclean-stop.json") is None
    journal = lab.journal(PRIMARY)
    assert "Cyrus shutdown hang" in journal and "SIGKILL to master" in journal
    assert "timed out" not in journal, journal[-3000:]
    print(f"stop took {seconds:.2f}s with TimeoutStopSec={timeout_stop}s; last stop: {last}")


# How run decides READY=1 with each release's Cyrus: master.ready exists since Cyrus 3.10.
READY_PATH = {"bookworm": supervisor.READY_BY_PROBES, "trixie": supervisor.READY_BY_FILE}


@pytest.mark.parametrize("release", images.releases_under_test(), indirect=True)
def test_master_dying_on_its_own_fails_the_unit_and_restart_brings_it_back(lab_factory, release):
    lab = started(lab_factory(rolling=False))
    assert lab.c.show(PRIMARY, "NRestarts")["NRestarts"] == "0"

    lab.c.run("sh", "-c", f"kill -KILL $(cat {lab.pair.pid_file('primary')})")

    until(lambda: lab.c.show(PRIMARY, "NRestarts")["NRestarts"] == "1", 60, "systemd to restart the unit")
    until(lambda: lab.c.show(PRIMARY, "ActiveState")["ActiveState"] == "active", 60, "the restarted unit")
    journal = lab.journal(PRIMARY)
    assert "exited unexpectedly (signal 9): the unit fails" in journal, journal[-4000:]
    assert f"Main process exited, code=exited, status={exitcodes.FAILURE}/FAILURE" in journal, journal[-4000:]
    assert lab.state_file("last-stop.json")["result"] == "master died"
    drain = lab.state_file("last-drain.json")   # ExecStopPost ran after the failure, before the restart
    assert drain["service"]["result"] == "exit-code" and drain["exit_code"] == 0, drain
    assert journal.count(f"ready: {READY_PATH[release]})") == 2, journal[-4000:]   # start and restart

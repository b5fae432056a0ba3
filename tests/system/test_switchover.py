"""`cyrushelper switchover` end to end (issue 8): a switchable pair set up by the README recipe
(testbed.switchlab), real Cyrus 3.6 under a real systemd 252, LMTP load from a client that moves
to the other LMTP host on a refusal or 421 and retries, as an MTA does.

Each container boot serves several checks (CI time): the local round trip also checks --dry-run,
the split-brain guard, status and the journal; the failure test walks refusal, repair, abort and a
dead replica in turn; the kill test SIGKILLs the command after every step in turn and resumes.
"""

from __future__ import annotations

import json
import os

import pytest

from cyrushelper import exitcodes
from cyrushelper.switchover import KILL_HOOK, STEPS
from testbed import images
from testbed.switchlab import SwitchLabFactory
from tests.conftest import next_port_base, require_container_host, require_root_and_cyrus

pytestmark = pytest.mark.system


@pytest.fixture
def factory(request, wheelhouse, release):
    require_root_and_cyrus()
    require_container_host()
    f = SwitchLabFactory(request.node.name[:30], wheelhouse, release)
    yield f
    print(f.journals())
    f.close(keep=bool(os.environ.get("CYRUSHELPER_KEEP_LAB")))


def switched(lab, source: str, dest: str, *extra: str) -> dict:
    """Run a switchover that must succeed; return its final record."""
    r = lab.switchover(source, dest, "--json", *extra)
    assert r.returncode == exitcodes.OK, f"switchover {source}->{dest} exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    record = json.loads(r.stdout)
    assert record["outcome"] == "done" and [s["step"] for s in record["steps"]] == list(STEPS), record
    print(f"switchover {source}->{dest}: " + ", ".join(f"{s['step']} {s['seconds']:.2f}s" for s in record["steps"])
          + f"; write outage bound {record.get('write_outage_bound')}s")
    return record


def roles(lab) -> dict[str, str]:
    return {n: lab.status(n)["role"] for n in ("a", "b")}


def nothing_missing(lab, record_file) -> None:
    assert lab.settled(), "the primary's sync log did not empty"
    for name in ("a", "b"):
        report = lab.verify(record_file, name)
        assert report["missing"] == 0, (name, report)
        print(f"on {name}: {report['summary']}")
    facts = {n: lab.mailboxes(n) for n in ("a", "b")}
    assert facts["a"] == facts["b"], "the two sides' mailboxes differ"


def round_trip(lab) -> None:
    """Under load: a -> b, then b -> a; 0 acknowledged messages missing on either side."""
    load, record_file = lab.start_load()
    assert lab.wait_acknowledged(record_file, 200) >= 200, "load did not get going"
    first = switched(lab, "a", "b")
    assert roles(lab) == {"a": "replica", "b": "primary"}
    assert first["canary"]["arrived_after"] <= first["steps"][-1]["seconds"]
    acked = lab.acknowledged(record_file)
    assert lab.wait_acknowledged(record_file, acked + 200) >= acked + 200, "no delivery to the new primary"
    switched(lab, "b", "a")
    assert roles(lab) == {"a": "primary", "b": "replica"}
    acked = lab.acknowledged(record_file)
    assert lab.wait_acknowledged(record_file, acked + 100) >= acked + 100
    stats = lab.stop_load(load, record_file)
    print(f"load: {stats.get('acknowledged')} acknowledged, {len(stats.get('refusals', []))} refusals")
    nothing_missing(lab, record_file)


# The round trip on each supported release: Cyrus 3.10's cyrus.index (format 19), systemd 257 and
# Python 3.13 on Debian 13; the other switchover tests run on the host's release only (their logic
# does not depend on the release, and CI time is finite).
@pytest.mark.parametrize("release", images.releases_under_test(), indirect=True)
def test_local_round_trip_under_load_with_dry_run_guard_and_journal(factory):
    lab = factory.local(next_port_base())
    lab.install()
    lab.start("b", "a")

    dry = lab.switchover("a", "b", "--dry-run")
    assert dry.returncode == 0 and "[ok] preflight" in dry.stdout and "nothing changed" in dry.stdout, dry
    assert roles(lab) == {"a": "primary", "b": "replica"}
    assert lab.status("a")["switchover"] is None

    round_trip(lab)

    journal = lab.c("a").journal()
    for step in STEPS[1:]:
        assert f"step {step} done in " in journal, step
    last = lab.status("a")["last_switchover"]
    report = json.loads(open(last["proof"]["report"]).read())
    assert report["summary"]["differing"] == 0 and all(m["equal"] for m in report["mailboxes"])

    # split-brain guard: b was the primary before the round trip's second half; asking it to
    # start as primary again (an old CYRUSHELPER_RUN_OPTS) is refused, and systemd does not retry
    c = lab.c("b")
    c.systemctl("stop", "cyrus@b.service")
    c.run("sh", "-c", "mkdir -p /etc/systemd/system/cyrus@b.service.d && cat > "
                      "/etc/systemd/system/cyrus@b.service.d/old-role.conf",
          input='[Service]\nEnvironment="CYRUSHELPER_RUN_OPTS=--role primary"\n')
    c.systemctl("daemon-reload")
    assert c.systemctl("start", "cyrus@b.service", check=False).returncode != 0
    props = c.show("cyrus@b.service", "ActiveState", "ExecMainStatus", "NRestarts")
    assert (props["ActiveState"], props["ExecMainStatus"], props["NRestarts"]) == ("failed", "77", "0"), props
    refusal = [line for line in c.journal("cyrus@b.service").splitlines() if "split brain" in line]
    assert refusal and "recorded as replica" in refusal[-1], refusal
    print(f"guard: {refusal[-1]}")
    assert lab.status("b")["role"] == "replica"
    c.run("rm", "/etc/systemd/system/cyrus@b.service.d/old-role.conf")
    c.systemctl("daemon-reload")
    c.systemctl("reset-failed", "cyrus@b.service")
    lab.start("b")
    assert lab.status("b")["role"] == "replica"


def test_refusal_repair_dead_replica_and_abort(factory):
    lab = factory.local(next_port_base())
    lab.install()
    lab.start("b", "a")
    record_file = lab.workdirs["a"] / "deliver.record"
    lab.lab("a", "deliver", "--record", str(record_file), "--count", "50", "--user", "alice",
            "--lmtp", lab.lmtp("a"), "--tag", "before")
    assert lab.settled()

    # 1. replica down at pre-flight: refused, nothing changed
    lab.c("b").systemctl("stop", "cyrus@b.service")
    r = lab.switchover("a", "b")
    assert r.returncode == exitcodes.REFUSED and "[REFUSED] preflight" in r.stdout, r
    assert "master is not running" in r.stdout and "sync_server does not answer" in r.stdout
    assert roles(lab) == {"a": "primary", "b": "replica"}
    assert lab.c("a").show("cyrus@a.service", "ActiveState")["ActiveState"] == "active"
    assert lab.status("a")["switchover"] is None and not lab.status("a")["fence"]["present"]

    # 2. an event lost (as after a SIGKILL between index commit and sync log line): the message is
    # on a, its log line gone; the proof finds it missing on b and repairs it before the swap
    lab.lab("a", "deliver", "--record", str(record_file), "--count", "1", "--user", "alice",
            "--lmtp", lab.lmtp("a"), "--tag", "lost-event")
    sync_dir = lab.pairs["a"].config_dir("a") / "sync"
    lost = [f for f in sync_dir.iterdir() if f.name.startswith("log")]
    assert lost, "the delivery wrote no sync log line"
    for f in lost:
        f.unlink()
    lab.start("b")
    r = lab.switchover("a", "b", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    rounds = record["proof"]["rounds"]
    assert [x["differing"] for x in rounds] == [1, 0], rounds
    assert lab.verify(record_file, "b")["missing"] == 0
    print(f"repaired before the swap: {rounds}")

    # 3. the replica dies after the pre-flight: the drain fails, the switchover rolls back, the
    # old primary serves again and keeps every event; they reach the replica once it is back
    r = lab.switchover("b", "a", env={KILL_HOOK: "preflight"})
    assert r.returncode in (-9, 137), r
    lab.c("a").systemctl("stop", "cyrus@a.service")
    lab.lab("b", "deliver", "--record", str(record_file), "--count", "20", "--user", "bob",
            "--lmtp", lab.lmtp("b"), "--tag", "kept")          # pending: nothing replicates them now
    broken = "/run/systemd/system/cyrus@a.service.d/dead.conf"    # and it cannot start either
    lab.c("a").run("sh", "-c", f"mkdir -p {os.path.dirname(broken)} && printf '[Service]\\nExecStartPre=/bin/false\\n' > {broken}")
    lab.c("a").systemctl("daemon-reload")
    r = lab.switchover("b", "a", "--resume")
    assert r.returncode == exitcodes.ROLLED_BACK, r
    assert "[FAILED] stop_old_primary" in r.stdout and "a not restored" in r.stdout, r.stdout
    st = lab.status("b")
    assert st["role"] == "primary" and st["master"]["running"] and not st["fence"]["present"]
    assert sum(ch["lines"] for ch in st["channels"]) > 0, "the events were not kept"
    lab.c("a").run("rm", broken)
    lab.c("a").systemctl("daemon-reload")
    lab.c("a").systemctl("reset-failed", "cyrus@a.service")
    lab.start("a")
    lab.c("b").systemctl("restart", "cyrus@b.service", timeout=180)   # its stop drains to a
    nothing_missing(lab, record_file)

    # 4. a message expunged on the replica behind replication's back: the repair never copies a
    # replica's change back (sync_client -O), so the sides stay unequal and the switchover aborts
    # (what Cyrus's own rolling sync_client then does with that change is Cyrus's copyback)
    lab.lab("a", "expunge", "--imap", lab.imap("a"), "--user", "alice", "--count", "1")
    r = lab.switchover("b", "a", "--json")
    assert r.returncode == exitcodes.ROLLED_BACK, r
    record = json.loads(r.stdout)
    assert "still differ after the repair" in record["detail"] and "user.alice" in record["detail"]
    assert "a change made on the replica" in record["detail"], record["detail"]
    assert roles(lab) == {"a": "replica", "b": "primary"}
    for name in ("a", "b"):
        assert lab.c(name).show(f"cyrus@{name}.service", "ActiveState")["ActiveState"] == "active"
    assert not lab.status("b")["fence"]["present"]
    report = json.loads(open(record["proof"]["report"]).read()) if record.get("proof") else \
        json.loads(sorted(lab.pairs["b"].config_dir("b").joinpath("cyrushelper").glob("proof-*-b-a.json"))[-1].read_text())
    alice = next(m for m in report["mailboxes"] if m["name"] == "user.alice")
    assert (alice["b"]["messages"], alice["a"]["messages"]) == (alice["a"]["messages"] + 1, alice["a"]["messages"])
    print(f"aborted: {record['detail']}")


def test_kill_at_every_step_then_resume_under_load(factory):
    lab = factory.local(next_port_base())
    lab.install()
    lab.start("b", "a")
    load, record_file = lab.start_load()
    assert lab.wait_acknowledged(record_file, 100) >= 100
    source, dest = "a", "b"
    for step in STEPS[1:]:
        r = lab.switchover(source, dest, env={KILL_HOOK: step})
        assert r.returncode in (-9, 137), (step, r)
        unfinished = lab.status(source)["switchover"]
        assert unfinished is not None and unfinished["step"] == step, (step, unfinished)
        r = lab.switchover(source, dest, "--resume", "--json")
        assert r.returncode == 0, (step, r.stdout, r.stderr)
        assert json.loads(r.stdout)["outcome"] == "done"
        assert roles(lab) == {source: "replica", dest: "primary"}, step
        print(f"killed after {step}, resumed: {dest} is primary")
        source, dest = dest, source
        acked = lab.acknowledged(record_file)
        assert lab.wait_acknowledged(record_file, acked + 30) >= acked + 30, f"no delivery after {step}"
    lab.stop_load(load, record_file)
    nothing_missing(lab, record_file)


def test_two_hosts_round_trip_under_load(factory):
    lab = factory.two_hosts(next_port_base())
    lab.install()
    lab.start("b", "a")
    st = lab.status("a")
    assert st["channels"][0]["replica"] == f"{lab.addresses['b']}:{lab.pairs['b'].ports('b').sync}"
    round_trip(lab)
    journal = lab.c("a").journal()
    assert "step promote done" in journal and f"b@{lab.addresses['b']}" in journal

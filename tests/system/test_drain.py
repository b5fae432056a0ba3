"""`cyrushelper drain` on REAL Cyrus 3.6: a primary + replica pair on loopback (testbed.pair).

Mail goes in by LMTP with an exact record of every 250 (testbed.mail); the primary is
stopped without a rolling client, so the backlog sits in its sync logs; `cyrushelper drain` (the
command line, as the unit runs it) must leave no sync log behind and every acknowledged message
on the replica — or, when it cannot, keep every byte of every log and say so with its exit code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cyrushelper import drain as drain_mod
from cyrushelper import exitcodes
from testbed.mail import compare_storage, deliver_lmtp, verify_on_replica
from cyrushelper.locks import ChannelLock, channel_lock_path
from tests.bounds import upper

pytestmark = pytest.mark.system


def drain_cli(pair, *args, env=None, timeout=120):
    """Run `cyrushelper drain --json` for the pair's primary; (process, parsed JSON, seconds)."""
    cmd = [sys.executable, "-m", "cyrushelper", "drain", "-C", str(pair.primary_imapd_conf),
           "-M", str(pair.primary_cyrus_conf), "--json", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    seconds = time.monotonic() - t0
    data = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc, data, seconds


def sync_files(pair) -> dict[str, bytes]:
    """Every file under the primary's sync directories (all channels), by relative path."""
    base = pair.config_dir("primary") / "sync"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def pending(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if Path(k).name.startswith("log")}


def backlog_with_primary_stopped(pair, tmp_path, users=("alice", "bob"), n=100, tag="m"):
    """Replica up, primary up without rolling client: deliver, stop primary. Returns the record."""
    record = tmp_path / f"record-{tag}.txt"
    if not pair.running("replica"):
        pair.start("replica")
    pair.start("primary")
    for user in users:
        assert deliver_lmtp(pair.ports.primary_lmtp, user, n, f"{tag}-{user}", record) == n
    assert pair.stop("primary").clean
    return record


def assert_all_on_replica(pair, *records):
    report = verify_on_replica(pair.ports.replica_imap, list(records))
    assert report.ok, report.summary()
    storage = compare_storage(pair.primary_imapd_conf, pair.replica_imapd_conf)
    assert storage.identical, storage.summary()
    return report


def test_backlog_drained_every_acknowledged_message_on_replica(cyrus_pair, tmp_path):
    record = backlog_with_primary_stopped(cyrus_pair, tmp_path, n=150)
    before = sum(b.lines for b in cyrus_pair.sync_backlog())
    assert before >= 300
    proc, data, _ = drain_cli(cyrus_pair)
    assert proc.returncode == exitcodes.OK, proc.stderr
    [ch] = data["channels"]
    assert (ch["result"], ch["lines_before"], ch["lines_after"]) == ("drained", before, 0)
    assert pending(sync_files(cyrus_pair)) == {}
    report = assert_all_on_replica(cyrus_pair, record)
    assert report.acknowledged == 300
    saved = json.loads((cyrus_pair.config_dir("primary") / "cyrushelper" / "last-drain.json").read_text())
    assert saved["exit_code"] == 0 and saved["channels"][0]["lines_before"] == before


def test_replica_down_keeps_every_byte_then_next_drain_replays(cyrus_pair, tmp_path):
    record = backlog_with_primary_stopped(cyrus_pair, tmp_path, n=80)
    # an interrupted earlier reader left a log-run too: both must survive untouched
    sync = cyrus_pair.config_dir("primary") / "sync"
    os.rename(sync / "log", sync / "log-run")
    cyrus_pair.start("primary")
    deliver_lmtp(cyrus_pair.ports.primary_lmtp, "alice", 20, "later", record)
    assert cyrus_pair.stop("primary").clean
    assert cyrus_pair.stop("replica").clean
    before = sync_files(cyrus_pair)
    assert set(pending(before)) == {"log", "log-run"}
    lines = sum(v.count(b"\n") for v in pending(before).values())

    proc, data, seconds = drain_cli(cyrus_pair, "--deadline", "20")
    assert proc.returncode == exitcodes.REPLICA_UNREACHABLE, proc.stderr
    assert seconds < 20 / 2   # did not wait for the deadline
    assert sync_files(cyrus_pair) == before  # byte-identical, nothing renamed
    [ch] = data["channels"]
    assert (ch["result"], ch["lines_before"], ch["lines_after"]) == ("unreachable", lines, lines)
    said = [line for line in proc.stderr.splitlines() if "unreachable" in line]
    assert len(said) == 1, proc.stderr
    assert "channel default" in said[0] and f"{lines} lines kept" in said[0]
    assert f"127.0.0.1:{cyrus_pair.ports.replica_sync}" in said[0]

    cyrus_pair.start("replica")
    proc, data, _ = drain_cli(cyrus_pair)
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert pending(sync_files(cyrus_pair)) == {}
    assert assert_all_on_replica(cyrus_pair, record).acknowledged == 180


def test_replica_refusing_batches_is_76_and_log_run_kept(cyrus_pair, tmp_path):
    """`repl` not an admin on the replica: it logs in, every batch fails, sync_client exits 0."""
    record = backlog_with_primary_stopped(cyrus_pair, tmp_path, users=("alice",), n=25)
    assert cyrus_pair.stop("replica").clean
    conf = cyrus_pair.replica_imapd_conf
    original = conf.read_text()
    assert "\nadmins: admin repl\n" in original
    conf.write_text(original.replace("\nadmins: admin repl\n", "\nadmins: admin\n"))
    cyrus_pair.start("replica")
    events = pending(sync_files(cyrus_pair))["log"]

    proc, data, _ = drain_cli(cyrus_pair, "--deadline", "30")
    assert proc.returncode == exitcodes.SYNC_FAILED, proc.stderr
    assert pending(sync_files(cyrus_pair)) == {"log-run": events}  # Cyrus's rename, every byte kept
    assert data["channels"][0]["runs"] == 3

    assert cyrus_pair.stop("replica").clean
    conf.write_text(original)
    cyrus_pair.start("replica")
    proc, _, _ = drain_cli(cyrus_pair)
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert_all_on_replica(cyrus_pair, record)


def test_hung_replica_stops_at_our_deadline(cyrus_pair, tmp_path):
    """A replica that accepts but never greets: sync_client itself would wait 10 s, then retry."""
    backlog_with_primary_stopped(cyrus_pair, tmp_path, users=("alice",), n=30)
    assert cyrus_pair.stop("replica").clean
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", cyrus_pair.ports.replica_sync))
    silent.listen(5)
    try:
        before = sync_files(cyrus_pair)
        proc, data, seconds = drain_cli(cyrus_pair, "--deadline", "3")
    finally:
        silent.close()
    assert proc.returncode == exitcodes.DEADLINE, proc.stderr
    assert seconds < upper(3 + drain_mod.KILL_GRACE, work=1)  # deadline + SIGTERM grace + start-up
    assert sync_files(cyrus_pair) == before
    assert data["channels"][0]["result"] == "deadline"


def test_legacy_log_pid_file_replayed_and_removed(cyrus_pair, tmp_path):
    record = backlog_with_primary_stopped(cyrus_pair, tmp_path, users=("alice",), n=60, tag="old")
    sync = cyrus_pair.config_dir("primary") / "sync"
    os.rename(sync / "log", sync / "log-31337")  # what Cyrus <= 2.4 left behind
    cyrus_pair.start("primary")
    deliver_lmtp(cyrus_pair.ports.primary_lmtp, "bob", 40, "new", record)
    assert cyrus_pair.stop("primary").clean
    assert set(pending(sync_files(cyrus_pair))) == {"log", "log-31337"}

    proc, data, _ = drain_cli(cyrus_pair)
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert pending(sync_files(cyrus_pair)) == {}
    assert "legacy log-31337" in proc.stderr
    assert assert_all_on_replica(cyrus_pair, record).acknowledged == 100


def test_two_channels_and_channel_filter(cyrus_pair_factory, tmp_path):
    pair = cyrus_pair_factory(channels=["", "repl2"])
    record = backlog_with_primary_stopped(pair, tmp_path, n=50)
    files = pending(sync_files(pair))
    assert set(files) == {"log", "repl2/log"}

    proc, data, _ = drain_cli(pair, "--channel", "repl2")
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert [c["channel"] for c in data["channels"]] == ["repl2"]
    assert pending(sync_files(pair)) == {"log": files["log"]}  # the other channel untouched

    proc, data, _ = drain_cli(pair)
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert {c["channel"]: c["result"] for c in data["channels"]} == {"default": "drained",
                                                                     "repl2": "drained"}
    assert pending(sync_files(pair)) == {}
    assert_all_on_replica(pair, record)


def test_channel_lock_held_by_another_drainer_gives_73(cyrus_pair, tmp_path):
    record = backlog_with_primary_stopped(cyrus_pair, tmp_path, users=("alice",), n=20)
    before = sync_files(cyrus_pair)
    other = ChannelLock(channel_lock_path(cyrus_pair.config_dir("primary"), None))
    other.acquire()
    try:
        proc, data, seconds = drain_cli(cyrus_pair, "--lock-wait", "0.5")
    finally:
        other.release()
    assert proc.returncode == exitcodes.LOCKED, proc.stderr
    assert seconds < upper(0.5, work=1)
    assert sync_files(cyrus_pair) == before
    proc, _, _ = drain_cli(cyrus_pair)
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert_all_on_replica(cyrus_pair, record)


def test_live_rolling_sync_client_under_master_gives_73(cyrus_pair_factory, tmp_path):
    """Cyrus's reader takes no lock: a drain beside a rolling client must refuse, touching nothing."""
    pair = cyrus_pair_factory(rolling=True)
    record = tmp_path / "record.txt"
    pair.start("primary")  # replica down: the rolling client sits in its connect retry loop
    deliver_lmtp(pair.ports.primary_lmtp, "alice", 30, "r", record)
    before = pending(sync_files(pair))
    assert before
    proc, data, _ = drain_cli(pair, "--lock-wait", "1")
    assert proc.returncode == exitcodes.LOCKED, proc.stderr
    assert "rolling sync_client" in data["channels"][0]["message"]
    assert pending(sync_files(pair)) == before
    assert "master" in proc.stderr and "running" in proc.stderr

    assert pair.stop("primary").clean
    pair.start("replica")
    proc, _, _ = drain_cli(pair)
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert pending(sync_files(pair)) == {}
    assert_all_on_replica(pair, record)


def test_from_systemd_reports_the_service_result(cyrus_pair, tmp_path):
    record = backlog_with_primary_stopped(cyrus_pair, tmp_path, users=("alice",), n=10)
    proc, data, _ = drain_cli(cyrus_pair, "--from-systemd",
                              env={"SERVICE_RESULT": "success", "EXIT_CODE": "exited", "EXIT_STATUS": "0"})
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert "SERVICE_RESULT=success EXIT_CODE=exited EXIT_STATUS=0" in proc.stderr
    assert data["service"] == {"result": "success", "exit_code": "exited", "exit_status": "0"}
    assert_all_on_replica(cyrus_pair, record)

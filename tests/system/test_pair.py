"""The test bed itself, on real Cyrus: delivery, replication, and the loss a plain stop leaves behind."""

from __future__ import annotations

import time

import pytest

from testbed.mail import LmtpLoad, compare_storage, deliver_lmtp, verify_on_replica
from cyrushelper.synclog import pending_files

pytestmark = pytest.mark.system


def start_both(pair) -> None:
    pair.start("replica")
    pair.start("primary")


def test_drain_loop_replicates_everything(cyrus_pair, tmp_path):
    record = tmp_path / "acknowledged.txt"
    start_both(cyrus_pair)
    assert deliver_lmtp(cyrus_pair.ports.primary_lmtp, "alice", 50, "drain-a", record) == 50
    assert deliver_lmtp(cyrus_pair.ports.primary_lmtp, "bob", 20, "drain-b", record) == 20

    # nothing replicates without a sync_client: the events wait in sync/log
    (backlog,) = cyrus_pair.sync_backlog()
    assert backlog.log >= 70, backlog
    before = verify_on_replica(cyrus_pair.ports.replica_imap, [record])
    assert (before.acknowledged, before.present) == (70, 0)

    result = cyrus_pair.drain_with_sync_client(timeout=30)
    assert result.complete, result
    assert not pending_files(cyrus_pair.primary_channels[0])

    report = verify_on_replica(cyrus_pair.ports.replica_imap, [record])
    assert report.acknowledged == 70 and report.missing == [], report.summary()
    assert report.per_user == {"alice": (50, 50), "bob": (20, 20)}
    storage = compare_storage(cyrus_pair.primary_imapd_conf, cyrus_pair.replica_imapd_conf)
    assert storage.identical, storage.summary()
    assert [m.name for m in storage.mailboxes] == ["user.alice", "user.bob"]


def test_rolling_client_replicates(cyrus_pair_factory, tmp_path, syslog_sink):
    pair = cyrus_pair_factory(rolling=True)
    record = tmp_path / "acknowledged.txt"
    start_both(pair)
    deliver_lmtp(pair.ports.primary_lmtp, "alice", 30, "rolling-a", record)
    deliver_lmtp(pair.ports.primary_lmtp, "bob", 10, "rolling-b", record)

    deadline = time.monotonic() + 20
    report = verify_on_replica(pair.ports.replica_imap, [record])
    while report.missing and time.monotonic() < deadline:
        time.sleep(0.25)
        report = verify_on_replica(pair.ports.replica_imap, [record])
    assert report.acknowledged == 40 and report.missing == [], report.summary()
    if syslog_sink.capturing:
        assert syslog_sink.grep(rf"{pair.syslog_prefix('primary')}/sync_client\[")


def test_stop_under_load_leaves_events_in_sync_log(cyrus_pair, tmp_path):
    """Documents the problem: with no sync_client running, a stop under load strands every event.

    Non-rolling on purpose: nothing reads the log, so the figure is deterministic (all events
    stay). The drain afterwards shows the record is exact: every 250 reaches the replica.
    """
    record = tmp_path / "acknowledged.txt"
    start_both(cyrus_pair)
    load = LmtpLoad(cyrus_pair.ports.primary_lmtp, ["alice", "bob"], record, max_seconds=20).start()
    try:
        assert load.wait_acknowledged(100, timeout=15), load.stats
        stop = cyrus_pair.stop("primary", timeout=10)
        time.sleep(0.3)  # the load sees refused connections now and must keep going
        stats = load.stop()
    finally:
        load.stop()
    assert stop.clean, stop
    assert stats.outcomes["connection_refused"] > 0, stats  # it kept trying while the primary was down

    (backlog,) = cyrus_pair.sync_backlog()
    print(f"after stop under load: acknowledged={stats.acknowledged} attempts={stats.outcomes} "
          f"sync log lines left={backlog.lines}")
    assert backlog.lines >= stats.acknowledged  # at least one APPEND line per message
    stranded = verify_on_replica(cyrus_pair.ports.replica_imap, [record])
    assert stranded.present == 0 and len(stranded.missing) == stats.acknowledged

    drained = cyrus_pair.drain_with_sync_client(timeout=30)
    assert drained.complete, drained
    report = verify_on_replica(cyrus_pair.ports.replica_imap, [record])
    assert report.missing == [] and report.acknowledged == stats.acknowledged, report.summary()


def test_rolling_client_stop_under_load_figure(cyrus_pair_factory, tmp_path, record_property):
    """With a rolling client the leftover depends on timing: record the figure, assert recovery."""
    pair = cyrus_pair_factory(rolling=True)
    record = tmp_path / "acknowledged.txt"
    start_both(pair)
    with LmtpLoad(pair.ports.primary_lmtp, ["alice", "bob"], record, max_seconds=20) as load:
        assert load.wait_acknowledged(200, timeout=15), load.stats
        stop = pair.stop("primary", timeout=10)
    assert stop.clean, stop
    (backlog,) = pair.sync_backlog()
    record_property("rolling_stop_lines_left", backlog.lines)
    print(f"rolling client, stop under load: {backlog.lines} lines left in {backlog.files}, "
          f"{load.stats.acknowledged} acknowledged")
    drained = pair.drain_with_sync_client(timeout=30)
    assert drained.complete, drained
    report = verify_on_replica(pair.ports.replica_imap, [record])
    assert report.missing == [] and report.acknowledged == load.stats.acknowledged, report.summary()


def test_named_channels_log_separately(cyrus_pair_factory, tmp_path):
    pair = cyrus_pair_factory(channels=["", "second"])
    record = tmp_path / "acknowledged.txt"
    start_both(pair)
    deliver_lmtp(pair.ports.primary_lmtp, "alice", 10, "chan", record)
    by_label = {b.channel: b for b in pair.sync_backlog()}
    assert set(by_label) == {"default", "second"}
    assert by_label["default"].log >= 10 and by_label["second"].log >= 10, by_label

    result = pair.drain_with_sync_client(timeout=30)
    assert result.complete and result.rounds >= 2, result
    report = verify_on_replica(pair.ports.replica_imap, [record])
    assert report.missing == [] and report.acknowledged == 10, report.summary()


def test_start_refuses_busy_port_and_stop_is_by_pid(cyrus_pair):
    pid = cyrus_pair.start("replica")
    assert cyrus_pair.master_pid("replica") == pid
    assert int(cyrus_pair.pid_file("replica").read_text().split()[0]) == pid
    with pytest.raises(Exception, match="already running"):
        cyrus_pair.start("replica")
    result = cyrus_pair.stop("replica")
    assert result.clean and result.pid == pid   # clean: gone within stop()'s deadline, no SIGKILL
    assert not cyrus_pair.running("replica")
    assert cyrus_pair.stop("replica").was_running is False


def test_syslog_sink_sees_cyrus(cyrus_pair, syslog_sink):
    if not syslog_sink.capturing:
        pytest.skip("another, foreign listener owns /dev/log: Cyrus lines are not visible here")
    mark = syslog_sink.mark()
    cyrus_pair.start("replica")
    cyrus_pair.stop("replica")
    lines = syslog_sink.wait_for(rf"{cyrus_pair.syslog_prefix('replica')}/master\[\d+\]: "
                                 r"(process started|All children have exited)", since=mark)
    assert lines

"""run's event handling, in-process and clock-free: when a STATUS goes out after sync log writes,
and when the journal is asked. Times are handed in (`now`) and the sync log's age is set with
os.utime, so nothing here depends on how fast the machine is."""

from __future__ import annotations

import os
import time

import pytest

from cyrushelper import proc, supervisor
from cyrushelper.config import Instance
from cyrushelper.notify import Notifier
from cyrushelper.supervisor import Options, Supervisor
from cyrushelper.syncwatch import MODIFICATIONS, DirWatch
from tests.unit.test_lost_events import instance  # noqa: F401 (the fixture)

HANG_GUARD = 30.0


@pytest.fixture
def sup(instance: Instance):
    s = Supervisor(instance, Options(status_interval=0.5), Notifier())
    s.loop = proc.Loop()
    s.watch = DirWatch()
    for channel in s.channels:
        s.watch.add_channel(channel)
    s.watch.read()
    yield s
    s.watch.close()
    if s.journal_watch is not None:
        s.journal_watch.close()
    s.loop.close()


def append(path, lines: int) -> None:
    for i in range(lines):  # as Cyrus does: open, append one line, close
        with open(path, "a") as f:
            f.write(f'APPEND "user.u{i}"\n')


def age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))
    os.utime(path.parent, (t, t))


def written(s: Supervisor, lines: int) -> float:
    """`lines` appended to the first channel's log, seen by the armed watch; when the pending
    STATUS's oldest change was seen."""
    s._arm(s.watch, s._on_sync_change, True)
    append(s.channels[0].log, lines)
    s.loop.poll(HANG_GUARD)
    return s._status_since


def statuses(s: Supervisor) -> list[str]:
    return [m for m in s.notifier.sent if m.startswith("STATUS=")]


def test_a_status_waits_for_the_writes_to_settle_and_the_watch_is_not_read_meanwhile(sup):
    log = sup.channels[0].log
    sup._arm(sup.watch, sup._on_sync_change, True)
    append(log, 1)
    sup.loop.poll(HANG_GUARD)                       # woken by the first line
    assert sup._status_due is not None and sup.watch not in sup._armed
    append(log, 1)                                  # the delivery's second line: no wake-up
    assert sup.loop.poll(0) == [] and sup.watch not in sup._armed
    now = sup._status_since
    age(log, 0)                                     # just written: still busy, look again later
    sup._status_turn(now + supervisor.STATUS_FIRST_LOOK)
    assert statuses(sup) == [] and sup._status_due > now + supervisor.STATUS_FIRST_LOOK
    age(log, 1)                                     # quiet since: the right count goes out
    sup._status_turn(now + 0.1)
    assert statuses(sup) == ["STATUS=backlog default=2"]
    assert sup._status_due is None and sup.watch in sup._armed


def test_writes_that_go_on_still_give_a_status_every_status_interval(sup):
    log = sup.channels[0].log
    since = written(sup, 3)
    age(log, 0)
    sup._status_turn(since + 0.2)
    assert statuses(sup) == []
    append(log, 2)
    age(log, 0)
    sup._status_turn(since + 0.5)                   # --status-interval: sent although still busy
    assert statuses(sup) == ["STATUS=backlog default=5"]
    assert sup._status_due is not None and sup.watch not in sup._armed  # the next one is pending


def test_soon_after_a_status_the_next_waits_for_a_longer_quiet(sup):
    """Deliveries 10-40 ms apart: one STATUS per --status-interval and the final count, not one
    per gap; the final count still goes out once the logs were quiet STATUS_QUIET_AFTER_SEND."""
    log = sup.channels[0].log
    t0 = written(sup, 2)
    age(log, 1)
    sup._status_turn(t0 + supervisor.STATUS_FIRST_LOOK)
    assert statuses(sup) == ["STATUS=backlog default=2"]
    t1 = written(sup, 2)                            # the next delivery, soon after
    gap = (supervisor.STATUS_SETTLE + supervisor.STATUS_QUIET_AFTER_SEND) / 2
    age(log, gap)                                   # a gap between deliveries: not sent ...
    sup._status_turn(t1 + supervisor.STATUS_FIRST_LOOK)
    assert statuses(sup) == ["STATUS=backlog default=2"]
    due = sup._status_due
    assert due is not None and due - (t1 + supervisor.STATUS_FIRST_LOOK) < supervisor.STATUS_QUIET_AFTER_SEND + 1e-6
    age(log, supervisor.STATUS_QUIET_AFTER_SEND)    # ... the quiet that follows a last delivery is
    sup._status_turn(due)
    assert statuses(sup) == ["STATUS=backlog default=2", "STATUS=backlog default=4"]
    # --status-interval after the last STATUS, a short quiet is enough again
    later = written(sup, 1) + sup.options.status_interval
    age(log, gap)
    sup._status_turn(later)
    assert statuses(sup)[-1] == "STATUS=backlog default=5"


def test_other_news_goes_out_at_once_even_while_the_logs_are_written(sup):
    sup._arm(sup.watch, sup._on_sync_change, True)
    append(sup.channels[0].log, 1)
    sup.loop.poll(HANG_GUARD)                       # a STATUS waits for the writes to settle ...
    age(sup.channels[0].log, 0)
    sup.notes["orphans"] = "orphaned sync log channels (not in sync_log_channels): repl9=3"
    sup.request_status()                            # ... but this news does not wait
    sup._status_turn(sup._status_since + 0.01)
    assert statuses(sup) == ["STATUS=backlog default=1; orphaned sync log channels (not in "
                             "sync_log_channels): repl9=3"]


class CountingJournal:
    reader = None   # (as a Watcher reading through journalctl)

    def __init__(self):
        self.polls = 0

    def poll(self, sync=False):
        self.polls += 1
        return []


def test_the_journal_is_asked_when_journald_wrote_and_at_most_every_interval(sup, tmp_path):
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    journal_file = journal_dir / "system.journal"
    journal_file.write_bytes(b"")
    sup.journal = CountingJournal()
    sup.journal_watch = DirWatch(MODIFICATIONS)
    sup.journal_watch.add("journal", journal_dir, lambda n: n.endswith(".journal"))
    sup.journal_watch.read()

    t0 = time.monotonic() + 1000                    # (a clock far ahead: the test's own pace is moot)
    sup._journal_turn(t0)                           # the first look, nothing written since
    assert sup.journal.polls == 1 and sup._journal_due is None and sup.journal_watch in sup._armed
    with open(journal_file, "ab") as f:             # journald writes
        f.write(b"x")
    sup.loop.poll(HANG_GUARD)
    assert sup.journal_watch not in sup._armed      # no wake-up per further write ...
    assert sup._journal_due == t0 + supervisor.JOURNAL_INTERVAL  # ... one look, an interval on
    with open(journal_file, "ab") as f:
        f.write(b"y")
    assert sup.loop.poll(0) == [] and sup.journal.polls == 1
    sup._journal_turn(sup._journal_due)
    assert sup.journal.polls == 2
    # written while paused: the next look is due an interval later, still without waking meanwhile
    assert sup._journal_due == t0 + 2 * supervisor.JOURNAL_INTERVAL
    sup._journal_turn(sup._journal_due)
    assert sup.journal.polls == 3 and sup._journal_due is None and sup.journal_watch in sup._armed

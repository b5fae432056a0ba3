"""Mail helpers against a fake LMTP server: the record holds exactly the messages that got 250."""

from __future__ import annotations

import smtplib
import socket
import socketserver
import threading
import time

import pytest

from testbed.mail import (Hold, LmtpClient, LmtpLoad, Record, RecordError, Report, deliver_lmtp, login_name,
                          message, parse_mbexamine, parse_record_line, read_records)


class FakeLmtp(socketserver.ThreadingTCPServer):
    """Accepts `accept_per_connection` messages per connection, then answers 421 and hangs up.

    `plan`: what the next connections do, one word each, then they behave normally: "ok",
    "close@greeting" (hang up before 220), "421@mail", "close@rcpt" (hang up on RCPT, after MAIL
    was accepted), "close@end" (store the message, then hang up instead of answering: the client
    cannot know it was delivered)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, accept_per_connection: int | None = None, plan: list[str] | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.accept_per_connection = accept_per_connection
        self.plan = list(plan or [])
        self.acknowledged: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def next_plan(self) -> str:
        with self.lock:
            return self.plan.pop(0) if self.plan else "ok"


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        server: FakeLmtp = self.server
        plan = server.next_plan()
        if plan == "close@greeting":
            return
        accepted = 0
        self.wfile.write(b"220 fake LMTP ready\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"LHLO":
                self.wfile.write(b"250-fake\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL" and plan == "421@mail":
                self.wfile.write(b"421 4.3.2 shutting down\r\n")
                return
            elif verb == b"RCPT" and plan == "close@rcpt":
                return
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                self.wfile.write(b"250 ok\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go\r\n")
                body = b""
                while not body.endswith(b"\r\n.\r\n"):
                    chunk = self.rfile.readline()
                    if not chunk:
                        return
                    body += chunk
                limit = server.accept_per_connection
                if limit is not None and accepted >= limit:
                    self.wfile.write(b"421 4.3.2 shutting down\r\n")
                    return
                accepted += 1
                with server.lock:
                    server.acknowledged.append(body)
                if plan == "close@end":
                    return
                self.wfile.write(b"250 2.1.5 Ok SESSIONID=<x>\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"500 what\r\n")


@pytest.fixture
def fake_lmtp(request):
    param = getattr(request, "param", None)
    server = FakeLmtp(plan=param) if isinstance(param, list) else FakeLmtp(param)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def ids_in(server: FakeLmtp) -> list[str]:
    out = []
    for body in server.acknowledged:
        for line in body.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                out.append(line.split(b":", 1)[1].strip().decode())
    return out


def record_lines(path) -> list[tuple[str, str]]:
    return [parse_record_line(line) for line in path.read_text().splitlines()]


def test_message_is_unique_and_well_formed():
    mid, body = message("t", 3, "alice")
    assert mid == "<t-3@lab.test>"
    assert f"Message-ID: {mid}\r\n".encode() in body and body.endswith(b"\r\n")
    assert message("t", 4, "alice")[0] != mid


def test_deliver_records_every_acknowledged_message(fake_lmtp, tmp_path):
    record = tmp_path / "rec"
    assert deliver_lmtp(fake_lmtp.port, "alice", 5, "d", record) == 5
    assert record_lines(record) == [("alice", f"<d-{i}@lab.test>") for i in range(5)]
    assert ids_in(fake_lmtp) == [f"<d-{i}@lab.test>" for i in range(5)]
    deliver_lmtp(fake_lmtp.port, "bob", 2, "e", record)  # appends
    assert len(record_lines(record)) == 7


@pytest.mark.parametrize("fake_lmtp", [3], indirect=True)
def test_deliver_interrupted_by_421_records_only_the_250s(fake_lmtp, tmp_path):
    record = tmp_path / "rec"
    with pytest.raises(smtplib.SMTPException):
        deliver_lmtp(fake_lmtp.port, "alice", 10, "i", record)
    assert [mid for _, mid in record_lines(record)] == ids_in(fake_lmtp) == [
        "<i-0@lab.test>", "<i-1@lab.test>", "<i-2@lab.test>"]


@pytest.mark.parametrize("fake_lmtp", [4], indirect=True)
def test_load_reconnects_after_421_and_records_exactly(fake_lmtp, tmp_path):
    record = tmp_path / "rec"
    with LmtpLoad(fake_lmtp.port, ["alice", "bob"], record, max_seconds=20) as load:
        assert load.wait_acknowledged(30, timeout=15)
    stats = load.stats
    assert stats.outcomes["refused_421"] > 0
    lines = record_lines(record)
    # a message refused with 421 is retried with its Message-ID: each one reached the server once
    assert len(lines) == stats.acknowledged == len(fake_lmtp.acknowledged) == len(set(ids_in(fake_lmtp)))
    assert sorted(mid for _, mid in lines) == sorted(ids_in(fake_lmtp))
    assert {rcpt for rcpt, _ in lines} == {"alice", "bob"}
    assert sum(stats.per_user.values()) == stats.acknowledged
    assert stats.attempts == stats.acknowledged + stats.outcomes["refused_421"]
    assert stats.messages == stats.acknowledged + stats.queued
    assert stats.cut_mid_way == 0


def test_load_stops_at_max_messages(fake_lmtp, tmp_path):
    load = LmtpLoad(fake_lmtp.port, ["alice", "bob", "carol"], tmp_path / "rec", max_messages=7).start()
    deadline = time.monotonic() + 10
    while load.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not load.running
    assert load.stop().acknowledged == 7 == len(record_lines(tmp_path / "rec"))


def test_load_tolerates_refused_connections_and_stops_promptly(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load = LmtpLoad(port, ["alice"], tmp_path / "rec", max_seconds=30).start()
    time.sleep(0.5)
    started = time.monotonic()
    stats = load.stop()
    assert time.monotonic() - started < 30 / 2   # stopped, not left to run its max_seconds
    assert stats.outcomes["connection_refused"] >= 2 and stats.acknowledged == 0
    assert stats.messages == stats.queued == 1  # one message, retried, still queued
    assert record_lines(tmp_path / "rec") == []


@pytest.mark.parametrize("fake_lmtp", [["close@greeting", "421@mail", "close@rcpt", "close@end", "ok"]],
                         indirect=True)
def test_load_classifies_every_attempt_and_retries_the_same_message(fake_lmtp, tmp_path):
    record = tmp_path / "rec"
    with LmtpLoad(fake_lmtp.port, ["alice"], record, max_messages=2) as load:
        deadline = time.monotonic() + 15
        while load.running and time.monotonic() < deadline:
            time.sleep(0.01)
    stats = load.stats
    assert {k: v for k, v in stats.outcomes.items() if v} == {
        "lost_before_greeting": 1, "refused_421": 1, "cut_in_transaction": 1, "cut_after_end_of_data": 1,
        "acknowledged": 2}
    assert stats.cut_mid_way == 2 and stats.attempts == 6 and stats.messages == 2 and stats.queued == 0
    ids = ids_in(fake_lmtp)
    # the message cut after its end of data had been stored: the retry stored it again
    assert ids == ["<%s-0@lab.test>" % load.tag] * 2 + ["<%s-1@lab.test>" % load.tag]
    assert [mid for _, mid in record_lines(record)] == ids[1:]
    as_json = stats.as_dict()
    assert as_json["cut_mid_way"] == 2 and as_json["outcomes"]["acknowledged"] == 2


def test_client_outcome_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, body = message("t", 0, "alice")
    assert LmtpClient(port).attempt("alice", body) == "connection_refused"


def test_held_sender_keeps_its_body_open_until_the_file_appears(fake_lmtp, tmp_path):
    until, marker = tmp_path / "fence", tmp_path / "holding"
    hold = Hold("bob", until, extra=0.2, marker=marker)
    with LmtpLoad(fake_lmtp.port, ["alice"], tmp_path / "rec", max_seconds=30, hold=hold) as load:
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists() and load.wait_acknowledged(20)
        assert not any(b"To: bob@" in body for body in fake_lmtp.acknowledged), "held body went through"
        until.touch()
        deadline = time.monotonic() + 10
        while load.stats.held is None and time.monotonic() < deadline:
            time.sleep(0.01)
    assert load.stats.held == "acknowledged" and load.stats.per_user["bob"] == 1
    assert sum(b"To: bob@" in body for body in fake_lmtp.acknowledged) == 1


@pytest.mark.parametrize("fake_lmtp", [2], indirect=True)
def test_load_with_a_connection_per_message_counts_every_outcome(fake_lmtp, tmp_path):
    # 2 messages per connection are accepted, then 421: with a new connection per message, never
    load = LmtpLoad(fake_lmtp.port, ["alice", "bob"], tmp_path / "rec", max_messages=12,
                    connection_per_message=True).start()
    deadline = time.monotonic() + 20
    while load.running and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = load.stop()
    assert stats.outcomes["acknowledged"] == stats.acknowledged == 12 == len(record_lines(tmp_path / "rec"))
    assert sum(stats.outcomes.values()) == 12 and stats.max_greeting_wait > 0


def test_load_with_a_connection_per_message_classifies_refusals(tmp_path):
    with socket.socket() as s:  # nobody listens: refused
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    mute = socket.socket()      # accepts, then closes without a greeting: reset
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    stop = threading.Event()

    def hang_up():
        mute.settimeout(0.1)
        while not stop.is_set():
            try:
                mute.accept()[0].close()
            except OSError:
                pass

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    try:
        for port, outcome in ((closed_port, "connection_refused"), (mute.getsockname()[1], "lost_before_greeting")):
            load = LmtpLoad(port, ["alice"], tmp_path / f"rec-{outcome}", max_messages=3,
                            connection_per_message=True).start()
            deadline = time.monotonic() + 20   # the one message is retried, like an MTA does
            while load.stats.attempts < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            stats = load.stop()
            assert stats.outcomes[outcome] == stats.attempts >= 3, stats.outcomes
            assert stats.acknowledged == 0 and stats.messages == stats.queued == 1
    finally:
        stop.set()
        t.join()
        mute.close()


def test_load_respects_max_seconds(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load = LmtpLoad(port, ["alice"], tmp_path / "rec", max_seconds=0.3).start()
    time.sleep(2)
    assert not load.running
    load.stop()


# --------------------------------------------------------------------------- records

def test_parse_record_line():
    assert parse_record_line("alice <a-1@lab.test>\n") == ("alice", "<a-1@lab.test>")
    assert parse_record_line("  \n") is None
    for bad in ("alice", "alice a-1@lab.test", "alice <a> extra", "<a-1@lab.test>"):
        with pytest.raises(RecordError):
            parse_record_line(bad)


def test_read_records_groups_and_names_bad_lines(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text("alice <a-1@x>\nbob <b-1@x>\n\nalice <a-2@x>\n")
    two.write_text("alice <a-1@x>\nalice+work <c-1@x>\n")
    assert read_records([one, two]) == {"alice": {"<a-1@x>", "<a-2@x>"}, "bob": {"<b-1@x>"},
                                        "alice+work": {"<c-1@x>"}}
    bad = tmp_path / "bad"
    bad.write_text("alice <a-1@x>\nrubbish\nalice <a-2@x>\n")
    with pytest.raises(RecordError, match=rf"{bad}:2"):
        read_records([bad])


def test_read_records_skips_only_a_cut_off_last_line(tmp_path):
    cut = tmp_path / "cut"
    cut.write_text("alice <a-1@x>\nalice <a-2")
    assert read_records([cut]) == {"alice": {"<a-1@x>"}}
    whole = tmp_path / "whole"
    whole.write_text("alice <a-1@x>\nalice <a-2@x>")  # complete, just no newline
    assert read_records([whole]) == {"alice": {"<a-1@x>", "<a-2@x>"}}


def test_record_refuses_what_it_could_not_read_back(tmp_path):
    with Record(tmp_path / "rec") as rec:
        with pytest.raises(RecordError):
            rec.add("al ice", "<a@x>")
        with pytest.raises(RecordError):
            rec.add("alice", "a@x")


def test_login_name():
    assert login_name("alice") == login_name("alice@lab.test") == login_name("alice+box@lab.test") == "alice"


def test_report():
    ok = Report(3, 3, [], {"alice": (3, 3)})
    assert ok.ok and ok.summary() == "acknowledged=3 present=3 missing=0 duplicated=0 (alice=3/3)"
    bad = Report(3, 2, [("alice", "<a@x>")], {"alice": (3, 2)})
    assert not bad.ok and "missing=1" in bad.summary()


MBEXAMINE = """Examining user.alice... Mailbox Header Info:
  Path to mailbox: /lab/primary/spool/uuid/u/q/uq97
  UIDValidity: 1795740156  Last UID: 2

 Message Info:
000001> UID:00000001   INT_DATE:1795740155 SENTDATE:1795737600 SAVEDATE:1795740155 SIZE:422
      > HDRSIZE:412    LASTUPD :1795740155 SYSFLAGS:00000000      > CACHEVER:11 GUID:46876e6e50dcd5cfdaf0f25c5138b1d927185a93 MODSEQ:2  THRID: 0
 Envel>{197}("Fri, 27 Nov 2026 00:42:35 -0000" "UID:99 GUID:ffff" NIL)
 Subjct>{5}"s 0"
000001> UID:00000002   INT_DATE:1795740155 SENTDATE:1795737600 SAVEDATE:1795740155 SIZE:422
      > HDRSIZE:412    LASTUPD :1795740155 SYSFLAGS:00000000      > CACHEVER:11 GUID:f8a3580c5526b7d66f38d3235121411f385b0f46 MODSEQ:3  THRID: 0
"""


def test_parse_mbexamine_ignores_header_text():
    assert parse_mbexamine(MBEXAMINE) == [(1, "46876e6e50dcd5cfdaf0f25c5138b1d927185a93"),
                                          (2, "f8a3580c5526b7d66f38d3235121411f385b0f46")]
    assert parse_mbexamine("Examining user.empty...\n") == []

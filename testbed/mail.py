"""Mail in, mail checked: LMTP delivery with an exact record, and checks against the replica.

The record is the ground truth of a lossless stop: one line `rcpt message-id` per message that got
LMTP 250, appended and flushed right after the 250, so a load cut short by a stop still leaves an
exact list. `verify_on_replica` then asks the replica (as each user) for every recorded Message-ID;
`compare_storage` compares (UID, GUID) lists per mailbox on both sides without IMAP.
"""

from __future__ import annotations

import email.utils
import imaplib
import itertools
import json
import os
import re
import smtplib
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cyrushelper import cyrus

LOOPBACK = "127.0.0.1"
_MID_RE = re.compile(r"<[^<>\s]+>")
_HEADER_MID_RE = re.compile(rb"^message-id:[ \t]*(<[^<>\s]+>)", re.I | re.M)


class RecordError(ValueError):
    """A record file line that is not `rcpt <message-id>`."""


def message(tag: str, i: int, rcpt: str) -> tuple[str, bytes]:
    """A small unique test message: (Message-ID, RFC 5322 bytes)."""
    mid = f"<{tag}-{i}@lab.test>"
    body = (f"From: sender@lab.test\r\nTo: {rcpt}@lab.test\r\nSubject: {tag} {i}\r\n"
            f"Message-ID: {mid}\r\nDate: {email.utils.formatdate()}\r\n\r\nbody {tag} {i}\r\n")
    return mid, body.encode()


def login_name(rcpt: str) -> str:
    """The IMAP user a recipient's mail lands with: `alice+x@dom` -> `alice`."""
    return rcpt.split("@", 1)[0].split("+", 1)[0]


def password_for(user: str) -> str:
    return user + "pass"  # the lab's convention (testbed.pair.USERS)


# --------------------------------------------------------------------------- the record

class Record:
    """Append-only `rcpt message-id` lines, each flushed as soon as its 250 arrived (thread-safe)."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def add(self, rcpt: str, mid: str) -> None:
        if not rcpt or any(c.isspace() for c in rcpt) or not _MID_RE.fullmatch(mid):
            raise RecordError(f"cannot record {rcpt!r} {mid!r}")
        with self._lock:
            self._file.write(f"{rcpt} {mid}\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> Record:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_record_line(line: str, where: str = "record") -> tuple[str, str] | None:
    """(rcpt, message-id) of one record line; None for a blank line; RecordError if malformed."""
    text = line.strip()
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or not _MID_RE.fullmatch(parts[1]):
        raise RecordError(f"{where}: expected 'rcpt <message-id>', got {text[:80]!r}")
    return parts[0], parts[1]


def read_records(paths: list[os.PathLike | str]) -> dict[str, set[str]]:
    """Acknowledged Message-IDs per recipient from record files (errors name file:line).

    A last line without newline was cut off mid-write (its sender was stopped): it is used when it
    is complete, skipped when it is only a fragment.
    """
    wanted: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        lines = text.split("\n")
        for lineno, line in enumerate(lines, 1):
            last_fragment = lineno == len(lines) and line != ""
            try:
                parsed = parse_record_line(line, f"{path}:{lineno}")
            except RecordError:
                if last_fragment:
                    continue
                raise
            if parsed:
                wanted[parsed[0]].add(parsed[1])
    return dict(wanted)


# --------------------------------------------------------------------------- delivery

def deliver_lmtp(port: int, rcpt: str, n: int, tag: str, record: os.PathLike | str | Record,
                 host: str = LOOPBACK, timeout: float = 30.0) -> int:
    """Deliver `n` messages to `rcpt` over ONE LMTP connection, recording each one acknowledged.

    Returns how many got 250. Errors propagate (smtplib / OSError); what was acknowledged before
    the error is already in the record.
    """
    own = not isinstance(record, Record)
    rec = Record(record) if own else record
    acknowledged = 0
    try:
        conn = smtplib.LMTP(host, port, timeout=timeout)
        try:
            for i in range(n):
                mid, body = message(tag, i, login_name(rcpt))
                conn.sendmail("sender@lab.test", [rcpt], body)  # raises unless 250
                rec.add(rcpt, mid)
                acknowledged += 1
            conn.quit()
        finally:
            conn.close()
    finally:
        if own:
            rec.close()
    return acknowledged


# --------------------------------------------------------------------------- what an MTA sees

# Every delivery attempt ends in exactly one of these, judged by where it ended: the client's own
# record of a stop, as an MTA's log would show it.
OUTCOMES = {
    "acknowledged": "250 to the end of data: delivered, recorded",
    "refused_421": "421 to a command (the fence's 4.3.2, or Cyrus shutting down): queued, retried",
    "temporary_failure": "another 4xx reply: queued, retried",
    "rejected": "a 5xx reply: an MTA would bounce the message",
    "connection_refused": "nothing listened: retried",
    "lost_before_greeting": "connected, then closed or reset before the 220 greeting: retried",
    "dropped_outside_transaction": "closed or reset with no transaction open (LHLO, MAIL unanswered)",
    "cut_in_transaction": "closed or reset after MAIL was accepted, before the end of data was sent",
    "cut_after_end_of_data": "closed or reset after the end of data, before its reply: Cyrus may have "
                             "delivered it, the retry can be a duplicate",
}
CUT_MID_WAY = ("cut_in_transaction", "cut_after_end_of_data")
_LOST_AT = {"connect": "lost_before_greeting", "lhlo": "dropped_outside_transaction",
            "mail": "dropped_outside_transaction", "rcpt": "cut_in_transaction",
            "data": "cut_in_transaction", "body": "cut_in_transaction", "end": "cut_after_end_of_data"}
SENDER = "sender@lab.test"


def outcome_of_reply(code: int) -> str:
    if code == 421:
        return "refused_421"
    return "temporary_failure" if 400 <= code < 500 else "rejected"


class LmtpClient:
    """One LMTP connection used the way an MTA uses it: message after message on the same
    connection, a new one after any failure. `attempt()` says how one delivery attempt ended."""

    def __init__(self, port: int, host: str = LOOPBACK, timeout: float = 10.0):
        self.port, self.host, self.timeout = port, host, timeout
        self.conn: smtplib.LMTP | None = None
        self.greeting_wait = 0.0   # connect to 220 greeting, of the current connection

    def attempt(self, rcpt: str, body: bytes, mid_body=None) -> str:
        """Deliver `body` (CRLF lines, no line starting with '.') to `rcpt`; one of OUTCOMES.
        `mid_body()`, if given, runs after the first half of the body was sent (a slow sender)."""
        stage = "connect"
        try:
            if self.conn is None:
                t0 = time.monotonic()
                self.conn = smtplib.LMTP(self.host, self.port, timeout=self.timeout)
                self.greeting_wait = time.monotonic() - t0
                stage = "lhlo"
                code, _ = self.conn.ehlo()  # LHLO for smtplib.LMTP
                if code != 250:
                    return self._refused(code)
            for stage, command in (("mail", f"MAIL FROM:<{SENDER}>"), ("rcpt", f"RCPT TO:<{rcpt}>"),
                                   ("data", "DATA")):
                code, _ = self.conn.docmd(command)
                if code != (354 if stage == "data" else 250):
                    return self._refused(code)
            stage = "body"
            half = body.index(b"\r\n", len(body) // 2) + 2
            self.conn.send(body[:half])
            if mid_body is not None:
                mid_body()
            self.conn.send(body[half:])
            stage = "end"
            self.conn.send(b".\r\n")
            code, _ = self.conn.getreply()  # LMTP: one reply per recipient, we have one
            return "acknowledged" if code == 250 else self._refused(code)
        except smtplib.SMTPConnectError as e:  # a greeting other than 220
            return self._refused(e.smtp_code)
        except ConnectionRefusedError:
            self.close()
            return "connection_refused"
        except (OSError, smtplib.SMTPException):  # closed, reset, timed out, broken pipe
            self.close()
            return _LOST_AT[stage]

    def _refused(self, code: int) -> str:
        self.close()  # after 421 Cyrus hangs up; after any other refusal we start afresh
        return outcome_of_reply(code)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn = None

    def quit(self) -> None:
        if self.conn is not None:
            try:
                self.conn.quit()
            except (OSError, smtplib.SMTPException):
                pass
        self.close()


@dataclass(frozen=True)
class Hold:
    """A slow sender: one message to `user` whose body stops half-way until the file `until`
    exists (e.g. the fence), then `extra` seconds longer -- a body still arriving over a slow link
    when a stop begins. `marker` is created once the message is held."""

    user: str
    until: Path
    extra: float
    marker: Path


@dataclass
class LoadStats:
    messages: int = 0       # distinct messages taken on; each is retried until acknowledged
    acknowledged: int = 0
    queued: int = 0         # taken on but not acknowledged when the load stopped (an MTA's queue)
    outcomes: dict[str, int] = field(default_factory=lambda: {name: 0 for name in OUTCOMES})
    per_user: dict[str, int] = field(default_factory=dict)
    held: str | None = None  # outcome of the held message's first attempt (Hold)
    seconds: float = 0.0
    max_greeting_wait: float = 0.0   # longest connect-to-greeting time of an acknowledged message

    @property
    def attempts(self) -> int:
        return sum(self.outcomes.values())

    @property
    def cut_mid_way(self) -> int:
        return sum(self.outcomes[name] for name in CUT_MID_WAY)

    def as_dict(self) -> dict:
        return {"messages": self.messages, "acknowledged": self.acknowledged, "queued": self.queued,
                "attempts": self.attempts, "cut_mid_way": self.cut_mid_way, "outcomes": dict(self.outcomes),
                "per_user": dict(self.per_user), "held": self.held, "seconds": round(self.seconds, 3),
                "max_greeting_wait": round(self.max_greeting_wait, 3)}


class LmtpLoad:
    """Continuous LMTP delivery for several users (one connection/thread each) until stopped,
    behaving like an MTA: a message that was not acknowledged (421, refused, cut) stays queued and
    is retried with the same Message-ID after a back-off; every attempt is classified (OUTCOMES).

    Bounded by `max_messages` (distinct messages) and `max_seconds`. `hold` adds one slow sender.
    `endpoints`: several LMTP hosts (a switchable pair), tried in turn after a failure.
    """

    def __init__(self, port: int, users: list[str], record: os.PathLike | str, host: str = LOOPBACK,
                 max_messages: int = 20000, max_seconds: float = 60.0, tag: str | None = None,
                 pause: float = 0.0, hold: Hold | None = None,
                 endpoints: list[tuple[str, int]] | None = None, connection_per_message: bool = False):
        if not users:
            raise ValueError("LmtpLoad needs at least one user")
        self.port = port
        # like an MTA with several LMTP hosts: a failed attempt moves to the next one
        self.endpoints = endpoints or [(host, port)]
        self.refusals: list[tuple[float, str]] = []   # (time, what) of every refused attempt
        self.ack_times: list[float] = []               # time.time() of every 250
        self.users = list(users)
        self.record_path = Path(record)
        self.host = host
        self.max_messages = max_messages
        self.max_seconds = max_seconds
        self.tag = tag or f"load{os.getpid()}x{int(time.time() * 1000) % 10**9}"
        self.pause = pause
        self.hold = hold
        self.connection_per_message = connection_per_message
        self.stats = LoadStats(per_user={u: 0 for u in self.users + ([hold.user] if hold else [])})
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._threads: list[threading.Thread] = []
        self._record: Record | None = None
        self._started = 0.0
        self._hold_reached = threading.Event()

    def start(self) -> LmtpLoad:
        self._record = Record(self.record_path)
        self._started = time.monotonic()
        senders = [(user, False) for user in self.users] + ([(self.hold.user, True)] if self.hold else [])
        for user, held in senders:
            t = threading.Thread(target=self._run, args=(user, held), name=f"lmtp-load-{user}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def _take_message(self, user: str) -> tuple[str, bytes] | None:
        with self._lock:
            if self.stats.messages >= self.max_messages:
                return None
            self.stats.messages += 1
            return message(self.tag, next(self._numbers), login_name(user))

    def _held_body(self) -> None:
        self._hold_reached.set()
        self.hold.marker.touch()
        while not self.hold.until.exists() and not self._stop.wait(0.02):
            pass
        self._stop.wait(self.hold.extra)

    def _acknowledge(self, user: str, mid: str, greeting_wait: float) -> None:
        self._record.add(user, mid)
        with self._lock:
            self.ack_times.append(time.time())
            self.stats.acknowledged += 1
            self.stats.per_user[user] += 1
            self.stats.max_greeting_wait = max(self.stats.max_greeting_wait, greeting_wait)

    def _refused(self, what: str) -> None:
        with self._lock:
            self.refusals.append((time.time(), what))

    def _run(self, user: str, held: bool) -> None:
        deadline = self._started + self.max_seconds
        client = LmtpClient(self.port, self.host)
        pending = None  # the message queued for this user, until it is acknowledged
        backoff = 0.05
        endpoint = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            if pending is None:
                pending = self._take_message(user)
                if pending is None:
                    break
            mid, body = pending
            holding = held and not self._hold_reached.is_set()
            client.host, client.port = self.endpoints[endpoint % len(self.endpoints)]
            outcome = client.attempt(user, body, self._held_body if holding else None)
            with self._lock:
                self.stats.outcomes[outcome] += 1
                if holding and self._hold_reached.is_set():
                    self.stats.held = outcome
            if outcome == "acknowledged":
                self._acknowledge(user, mid, client.greeting_wait)
                if self.connection_per_message:
                    client.quit()   # an MTA without connection caching: one message per connection
                pending, backoff = None, 0.05
                if held:
                    break  # the slow sender had one message
                if self.pause:
                    self._stop.wait(self.pause)
                continue
            self._refused(f"{outcome} {client.host}:{client.port}")
            if outcome == "rejected":
                pending = None  # an MTA bounces it; counted, never retried
            # like an MTA with several LMTP hosts: a failure moves to the next one (the client is
            # closed after any failure); refused connections back off once every host refused
            endpoint += 1
            if outcome != "connection_refused" or endpoint % len(self.endpoints) == 0:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
        if pending is not None:
            with self._lock:
                self.stats.queued += 1
        client.quit()

    def longest_gap(self) -> tuple[float, float]:
        """(start, end) of the longest time without an acknowledged delivery: the write outage an
        MTA saw (its own back-off included)."""
        times = sorted(self.ack_times)
        if len(times) < 2:
            return (0.0, 0.0)
        return max(zip(times, times[1:]), key=lambda pair: pair[1] - pair[0])

    def wait_acknowledged(self, count: int, timeout: float = 10.0) -> bool:
        """True once at least `count` messages were acknowledged (False after `timeout`)."""
        deadline = time.monotonic() + timeout
        while self.stats.acknowledged < count:
            if time.monotonic() >= deadline or not self.running:
                return self.stats.acknowledged >= count
            time.sleep(0.01)
        return True

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 15.0) -> LoadStats:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self.running:
            raise RuntimeError(f"LMTP load threads did not stop within {timeout}s")
        if self._record is not None:
            self._record.close()
        self.stats.seconds = time.monotonic() - self._started
        return self.stats

    def __enter__(self) -> LmtpLoad:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- checks on the replica

@dataclass
class Report:
    acknowledged: int
    present: int
    missing: list[tuple[str, str]]                       # (rcpt, message-id)
    per_user: dict[str, tuple[int, int]] = field(default_factory=dict)  # user -> (acknowledged, present)
    duplicates: list[tuple[str, str, int]] = field(default_factory=list)  # (user, message-id, copies)

    @property
    def ok(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        users = " ".join(f"{u}={p}/{a}" for u, (a, p) in sorted(self.per_user.items()))
        return (f"acknowledged={self.acknowledged} present={self.present} missing={len(self.missing)}"
                f" duplicated={len(self.duplicates)} ({users})")


def message_ids(imap_port: int, user: str, password: str | None = None, mailbox: str = "INBOX",
                host: str = LOOPBACK) -> Counter[str] | None:
    """Message-IDs in `mailbox` as `user` sees it, with how many messages carry each (more than
    one: a delivery retried after Cyrus had already stored it); None if the mailbox does not exist."""
    conn = imaplib.IMAP4(host, imap_port, timeout=30)
    try:
        conn.login(user, password if password is not None else password_for(user))
        typ, data = conn.select(mailbox, readonly=True)
        if typ != "OK":
            return None
        found: Counter[str] = Counter()
        if int(data[0]):
            typ, parts = conn.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            for part in parts:
                if isinstance(part, tuple):
                    header = re.sub(rb"\r?\n[ \t]+", b" ", part[1])
                    m = _HEADER_MID_RE.search(header)
                    if m:
                        found[m.group(1).decode("ascii", "replace")] += 1
        return found
    finally:
        try:
            conn.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


def verify_on_replica(imap_port: int, record_files: list[os.PathLike | str],
                      host: str = LOOPBACK) -> Report:
    """Is every acknowledged message (per the records) in its user's INBOX on the replica, and
    is any message of the load there more than once?"""
    wanted = read_records(record_files)
    by_user: dict[str, dict[str, set[str]]] = defaultdict(dict)
    for rcpt, mids in wanted.items():
        by_user[login_name(rcpt)][rcpt] = mids
    missing: list[tuple[str, str]] = []
    duplicates: list[tuple[str, str, int]] = []
    per_user: dict[str, tuple[int, int]] = {}
    acknowledged = present = 0
    for user, rcpts in sorted(by_user.items()):
        have = message_ids(imap_port, user, host=host) or Counter()
        duplicates += [(user, mid, n) for mid, n in sorted(have.items()) if n > 1]
        user_ack = user_present = 0
        for rcpt, mids in sorted(rcpts.items()):
            user_ack += len(mids)
            user_present += len(mids & set(have))
            missing += [(rcpt, mid) for mid in sorted(mids - set(have))]
        per_user[user] = (user_ack, user_present)
        acknowledged += user_ack
        present += user_present
    return Report(acknowledged, present, missing, per_user, duplicates)


# --------------------------------------------------------------------------- storage comparison

@dataclass(frozen=True)
class MailboxComparison:
    name: str
    primary: int | None   # message count, None if mbexamine failed / mailbox absent
    replica: int | None
    same: bool


@dataclass
class StorageComparison:
    primary_only: list[str]
    replica_only: list[str]
    mailboxes: list[MailboxComparison]

    @property
    def identical(self) -> bool:
        return not self.primary_only and not self.replica_only and all(m.same for m in self.mailboxes)

    def summary(self) -> str:
        lines = [f"{m.name:<24} primary={m.primary} replica={m.replica} {'OK' if m.same else 'DIFFERENT'}"
                 for m in self.mailboxes]
        if self.primary_only or self.replica_only:
            lines.append(f"mailbox lists differ: primary-only={self.primary_only} "
                         f"replica-only={self.replica_only}")
        lines.append("IDENTICAL" if self.identical else "NOT IDENTICAL")
        return "\n".join(lines)


def _run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def list_mailboxes(imapd_conf: os.PathLike | str) -> list[str]:
    """Live mailboxes from mailboxes.db (tombstones, left by DELETE/RENAME, are skipped)."""
    result = _run([str(cyrus.program("ctl_mboxlist")), "-C", str(imapd_conf), "-d"])
    if result.returncode != 0:
        raise RuntimeError(f"ctl_mboxlist -d failed for {imapd_conf}: {result.stderr.strip()}")
    entries = json.loads(result.stdout or "{}")
    return sorted(name for name, info in entries.items() if "d" not in info.get("mbtype", ""))


def parse_mbexamine(output: str) -> list[tuple[int, str]]:
    """(UID, GUID) of every message record in mbexamine's output, in file order."""
    # each record starts a line with "NNNNNN> UID:"; anchoring keeps header text from matching
    found = re.findall(r"^\d+> UID:(\d+).*?GUID:([0-9a-f]+)", output, re.S | re.M)
    return [(int(uid), guid) for uid, guid in found]


def mailbox_messages(imapd_conf: os.PathLike | str, mailbox: str) -> list[tuple[int, str]] | None:
    result = _run([str(cyrus.program("mbexamine")), "-C", str(imapd_conf), mailbox])
    return parse_mbexamine(result.stdout) if result.returncode == 0 else None


def compare_storage(primary_conf: os.PathLike | str, replica_conf: os.PathLike | str) -> StorageComparison:
    """Per mailbox, are the (UID, GUID) lists on primary and replica the same?"""
    primary, replica = list_mailboxes(primary_conf), list_mailboxes(replica_conf)
    compared = []
    for name in primary:
        a = mailbox_messages(primary_conf, name)
        b = mailbox_messages(replica_conf, name) if name in replica else None
        compared.append(MailboxComparison(name, len(a) if a is not None else None,
                                          len(b) if b is not None else None,
                                          same=a is not None and a == b))
    return StorageComparison(primary_only=sorted(set(primary) - set(replica)),
                             replica_only=sorted(set(replica) - set(primary)), mailboxes=compared)


def expunge_last(imap_port: int, user: str, count: int = 1, host: str = LOOPBACK) -> list[int]:
    """As `user`, expunge the `count` highest UIDs of INBOX (on a replica: a change behind
    replication's back, which the primary never hears of). Returns the UIDs removed."""
    conn = imaplib.IMAP4(host, imap_port, timeout=30)
    try:
        conn.login(user, password_for(user))
        conn.select("INBOX")
        typ, data = conn.uid("SEARCH", None, "ALL")
        uids = [int(u) for u in data[0].split()][-count:]
        if uids:
            conn.uid("STORE", ",".join(map(str, uids)), "+FLAGS.SILENT", r"(\Deleted)")
            conn.expunge()
        return uids
    finally:
        try:
            conn.logout()
        except (OSError, imaplib.IMAP4.error):
            pass

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
from collections import defaultdict
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


@dataclass
class LoadStats:
    attempted: int = 0
    acknowledged: int = 0
    failed: int = 0          # sent but not acknowledged (421, 4xx, connection lost): not recorded
    connect_failures: int = 0
    per_user: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # what an MTA would have seen, by kind (connection-per-message mode; see LmtpLoad._deliver_once)
    outcomes: dict[str, int] = field(default_factory=dict)
    max_greeting_wait: float = 0.0   # longest connect-to-greeting time of a delivered message


# How a delivery attempt can end, as an MTA sees it (LmtpLoad with connection_per_message):
OUTCOMES = ("acknowledged",   # 250 after DATA: recorded
            "refused",        # connect() refused: nobody listens
            "reset",          # connected, then closed or reset before the greeting
            "tempfail",       # a 4xx answer (421 fence, 451 ...): the MTA keeps the message queued
            "cut",            # connection lost during the transaction, after the greeting
            "other")          # anything else (timeouts, 5xx)


class LmtpLoad:
    """Continuous LMTP delivery for several users (one connection/thread each) until stopped.

    Bounded by `max_messages` (total) and `max_seconds`. Refusals during a stop (421, refused or
    dropped connections) are tolerated: the thread reconnects with back-off; such messages are
    not recorded as acknowledged.
    """

    def __init__(self, port: int, users: list[str], record: os.PathLike | str, host: str = LOOPBACK,
                 max_messages: int = 20000, max_seconds: float = 60.0, tag: str | None = None,
                 pause: float = 0.0, endpoints: list[tuple[str, int]] | None = None,
                 connection_per_message: bool = False):
        if not users:
            raise ValueError("LmtpLoad needs at least one user")
        self.port = port
        # like an MTA with several LMTP hosts: a refused connection or a 421 moves to the next one
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
        self.connection_per_message = connection_per_message
        self.stats = LoadStats(per_user={u: 0 for u in self.users}, outcomes={k: 0 for k in OUTCOMES})
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._threads: list[threading.Thread] = []
        self._record: Record | None = None
        self._started = 0.0

    def start(self) -> LmtpLoad:
        self._record = Record(self.record_path)
        self._started = time.monotonic()
        for user in self.users:
            t = threading.Thread(target=self._run, args=(user,), name=f"lmtp-load-{user}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def _next_number(self) -> int | None:
        with self._lock:
            if self.stats.attempted >= self.max_messages:
                return None
            self.stats.attempted += 1
            return next(self._numbers)

    def _acknowledge(self, user: str, mid: str) -> None:
        self._record.add(user, mid)
        with self._lock:
            self.ack_times.append(time.time())
            self.stats.acknowledged += 1
            self.stats.per_user[user] += 1

    def _deliver_once(self, user: str, number: int) -> str:
        """One message on a connection of its own, as an MTA without connection caching sends it:
        connect, greeting, LHLO, MAIL, RCPT, DATA, QUIT. Returns its outcome (OUTCOMES)."""
        mid, body = message(self.tag, number, login_name(user))
        t0 = time.monotonic()
        try:
            conn = smtplib.LMTP(self.host, self.port, timeout=30)
        except ConnectionRefusedError:
            return "refused"
        except (ConnectionResetError, smtplib.SMTPServerDisconnected, BrokenPipeError):
            return "reset"
        except smtplib.SMTPConnectError as e:
            return "tempfail" if 400 <= e.smtp_code < 500 else "other"
        except (OSError, smtplib.SMTPException):
            return "other"
        with self._lock:
            self.stats.max_greeting_wait = max(self.stats.max_greeting_wait, time.monotonic() - t0)
        try:
            conn.sendmail("sender@lab.test", [user], body)
            self._acknowledge(user, mid)
        except smtplib.SMTPResponseException as e:
            _close(conn)
            return "tempfail" if 400 <= e.smtp_code < 500 else "other"
        except smtplib.SMTPRecipientsRefused as e:
            _close(conn)
            codes = [code for code, _ in e.recipients.values()]
            return "tempfail" if all(400 <= c < 500 for c in codes) else "other"
        except (OSError, smtplib.SMTPServerDisconnected):
            _close(conn)
            return "cut"
        except smtplib.SMTPException:
            _close(conn)
            return "other"
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            pass
        _close(conn)
        return "acknowledged"

    def _run_connection_per_message(self, user: str) -> None:
        deadline = self._started + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            number = self._next_number()
            if number is None:
                break
            outcome = self._deliver_once(user, number)
            with self._lock:
                self.stats.outcomes[outcome] += 1
                if outcome in ("refused", "reset"):
                    self.stats.connect_failures += 1
                elif outcome != "acknowledged":
                    self.stats.failed += 1
            if outcome != "acknowledged":
                self._stop.wait(0.05)  # an MTA would retry much later; a short pause keeps counts readable
            elif self.pause:
                self._stop.wait(self.pause)
    def _refused(self, what: str) -> None:
        with self._lock:
            self.refusals.append((time.time(), what))

    def _run(self, user: str) -> None:
        if self.connection_per_message:
            return self._run_connection_per_message(user)
        deadline = self._started + self.max_seconds
        conn: smtplib.LMTP | None = None
        backoff = 0.05
        endpoint = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            if conn is None:
                host, port = self.endpoints[endpoint % len(self.endpoints)]
                try:
                    conn = smtplib.LMTP(host, port, timeout=10)
                    backoff = 0.05
                except (OSError, smtplib.SMTPException):
                    with self._lock:
                        self.stats.connect_failures += 1
                    self._refused(f"connect {host}:{port}")
                    endpoint += 1
                    if endpoint % len(self.endpoints) == 0:
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2, 1.0)
                    continue
            number = self._next_number()
            if number is None:
                break
            mid, body = message(self.tag, number, login_name(user))
            try:
                conn.sendmail("sender@lab.test", [user], body)
            except (OSError, smtplib.SMTPException) as e:
                with self._lock:
                    self.stats.failed += 1
                self._refused(f"{type(e).__name__} {getattr(e, 'smtp_code', '')}".strip())
                _close(conn)
                conn = None
                endpoint += 1
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            self._acknowledge(user, mid)
            if self.pause:
                self._stop.wait(self.pause)
        if conn is not None:
            try:
                conn.quit()
            except (OSError, smtplib.SMTPException):
                pass
            _close(conn)

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


def _close(conn: smtplib.LMTP) -> None:
    try:
        conn.close()
    except OSError:
        pass


# --------------------------------------------------------------------------- checks on the replica

@dataclass
class Report:
    acknowledged: int
    present: int
    missing: list[tuple[str, str]]                       # (rcpt, message-id)
    per_user: dict[str, tuple[int, int]] = field(default_factory=dict)  # user -> (acknowledged, present)

    @property
    def ok(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        users = " ".join(f"{u}={p}/{a}" for u, (a, p) in sorted(self.per_user.items()))
        return (f"acknowledged={self.acknowledged} present={self.present} missing={len(self.missing)}"
                f" ({users})")


def message_ids(imap_port: int, user: str, password: str | None = None, mailbox: str = "INBOX",
                host: str = LOOPBACK) -> set[str] | None:
    """Message-IDs in `mailbox` as `user` sees it; None if the mailbox does not exist."""
    conn = imaplib.IMAP4(host, imap_port, timeout=30)
    try:
        conn.login(user, password if password is not None else password_for(user))
        typ, data = conn.select(mailbox, readonly=True)
        if typ != "OK":
            return None
        found: set[str] = set()
        if int(data[0]):
            typ, parts = conn.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            for part in parts:
                if isinstance(part, tuple):
                    header = re.sub(rb"\r?\n[ \t]+", b" ", part[1])
                    m = _HEADER_MID_RE.search(header)
                    if m:
                        found.add(m.group(1).decode("ascii", "replace"))
        return found
    finally:
        try:
            conn.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


def verify_on_replica(imap_port: int, record_files: list[os.PathLike | str],
                      host: str = LOOPBACK) -> Report:
    """Is every acknowledged message (per the records) in its user's INBOX on the replica?"""
    wanted = read_records(record_files)
    by_user: dict[str, dict[str, set[str]]] = defaultdict(dict)
    for rcpt, mids in wanted.items():
        by_user[login_name(rcpt)][rcpt] = mids
    missing: list[tuple[str, str]] = []
    per_user: dict[str, tuple[int, int]] = {}
    acknowledged = present = 0
    for user, rcpts in sorted(by_user.items()):
        have = message_ids(imap_port, user, host=host) or set()
        user_ack = user_present = 0
        for rcpt, mids in sorted(rcpts.items()):
            user_ack += len(mids)
            user_present += len(mids & have)
            missing += [(rcpt, mid) for mid in sorted(mids - have)]
        per_user[user] = (user_ack, user_present)
        acknowledged += user_ack
        present += user_present
    return Report(acknowledged, present, missing, per_user)


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

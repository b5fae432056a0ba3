"""The proof's reader of cyrus.index (mailboxes.py) on index files built here byte for byte, in the
layouts of Cyrus 3.6 (minor version 17) and 3.10 (19): what it must catch and what it must ignore.
The real files are read by the system tests (tests/system/test_switchover.py)."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from cyrushelper import mailboxes
from cyrushelper.mailboxes import Facts, MailboxError, external_name, owner, parse_index, read_index_bytes
from cyrushelper.switchover import compare, describe_diff

HEADER_SIZE, RECORD_SIZE = 160, 112


def index(records, version=17, uidvalidity=1234, highestmodseq=None, last_uid=None, exists=None) -> bytes:
    """A cyrus.index: records are (uid, guid bytes, modseq, system_flags, user_flags bytes)."""
    header = bytearray(HEADER_SIZE)
    live = [r for r in records if not r[3] & mailboxes.FLAG_EXPUNGED]
    struct.pack_into(">4I", header, 8, version, HEADER_SIZE, RECORD_SIZE, len(records))
    struct.pack_into(">I", header, 28, last_uid if last_uid is not None else max((r[0] for r in records), default=0))
    struct.pack_into(">I", header, 44, uidvalidity)
    hms = highestmodseq if highestmodseq is not None else max((r[2] for r in records), default=1)
    count = exists if exists is not None else len(live)
    if version == 17:
        struct.pack_into(">Q", header, 68, hms)
        struct.pack_into(">I", header, 84, count)
    else:
        struct.pack_into(">I", header, 60, count)
        struct.pack_into(">Q", header, 72, hms)
    body = bytearray()
    for uid, guid, modseq, system, user in records:
        rec = bytearray(RECORD_SIZE)
        struct.pack_into(">I", rec, 0, uid)
        struct.pack_into(">I", rec, 32, system)
        rec[36:52] = user
        rec[60:80] = guid
        struct.pack_into(">Q", rec, 80, modseq)
        body += rec
    return bytes(header + body)


def msgs(n, flags=0):
    return [(uid, bytes([uid % 256]) * 20, uid + 1, flags, b"\0" * 16) for uid in range(1, n + 1)]


@pytest.mark.parametrize("version", [17, 19])
def test_header_fields_and_counts(version):
    f = parse_index(index(msgs(5), version=version, uidvalidity=77, highestmodseq=99), "user.alice")
    assert (f.index_version, f.uidvalidity, f.last_uid, f.highestmodseq, f.exists, f.messages) == \
        (version, 77, 5, 99, 5, 5)
    assert f.error is None and len(f.content) == len(f.state) == 64


def test_one_missing_or_changed_message_among_many_changes_the_content_digest():
    base = msgs(1000)
    reference = parse_index(index(base), "m")
    missing = base[:500] + base[501:]
    changed = list(base)
    changed[700] = (701, b"\xee" * 20, 702, 0, b"\0" * 16)
    for variant in (missing, changed):
        f = parse_index(index(variant, last_uid=1000, highestmodseq=1001), "m")
        assert f.content != reference.content
    # the same messages in another record order are the same mailbox
    assert parse_index(index(list(reversed(base))), "m").content == reference.content


def test_flag_or_modseq_change_changes_the_state_digest_only():
    base = msgs(10)
    reference = parse_index(index(base), "m")
    seen = list(base)
    seen[3] = (4, base[3][1], base[3][2], 0x10, b"\0" * 16)        # \Seen on one message
    keyword = list(base)
    keyword[5] = (6, base[5][1], base[5][2], 0, b"\x01" + b"\0" * 15)
    for variant in (seen, keyword):
        f = parse_index(index(variant, highestmodseq=reference.highestmodseq), "m")
        assert (f.content, f.state != reference.state) == (reference.content, True)


def test_expunged_records_and_internal_flags_are_ignored():
    base = msgs(4)
    expunged = base + [(5, b"\x55" * 20, 9, mailboxes.FLAG_EXPUNGED, b"\0" * 16)]
    f = parse_index(index(expunged), "m")
    assert f.messages == 4 and f.content == parse_index(index(base), "m").content
    archived = [(u, g, m, 1 << 29, uf) for u, g, m, _, uf in base]     # FLAG_INTERNAL_ARCHIVED
    assert parse_index(index(archived), "m").state == parse_index(index(base), "m").state


def test_guids_on_request():
    f = parse_index(index(msgs(3)), "m", want_guids=True)
    assert f.guids == {1: "01" * 20, 2: "02" * 20, 3: "03" * 20}
    assert Facts.from_json(f.to_json()) == f


def test_unknown_version_and_truncated_files_are_refused_not_guessed():
    with pytest.raises(MailboxError, match="minor version 20"):
        parse_index(index(msgs(2), version=20), "m")
    with pytest.raises(MailboxError, match="does not match its size"):
        parse_index(index(msgs(3))[:-10], "m")
    with pytest.raises(MailboxError, match="too short"):
        parse_index(b"\0" * 8, "m")


def test_read_respects_a_writers_lock(tmp_path):
    """Cyrus writes an index under an exclusive fcntl lock (another process): no read meanwhile."""
    path = tmp_path / "cyrus.index"
    path.write_bytes(index(msgs(2)))
    writer = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys\n"
                               f"fd = os.open({str(path)!r}, os.O_RDWR)\nfcntl.lockf(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\nsys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        with pytest.raises(MailboxError, match="locked by a writer"):
            read_index_bytes(path, lock_wait=0.2)
    finally:
        writer.stdin.close()
        writer.wait()
    assert parse_index(read_index_bytes(path, lock_wait=30), "m").messages == 2


def test_names():
    assert external_name("user.alice", True) == "user/alice"
    assert external_name("user.first^last.Sent", True) == "user/first.last/Sent"
    assert external_name("example.com!user.bob", True) == "user/bob@example.com"
    assert external_name("user.alice.Sent", False) == "user.alice.Sent"
    assert owner("user.alice.Sent") == "alice"
    assert owner("user.first^last") == "first.last"
    assert owner("example.com!user.bob") == "bob@example.com"
    assert owner("shared.news") is None


def test_compare_names_each_difference():
    a = {"user.alice": parse_index(index(msgs(3)), "user.alice"), "user.bob": parse_index(index(msgs(1)), "user.bob")}
    b = {"user.alice": parse_index(index(msgs(2), last_uid=3, highestmodseq=4), "user.alice")}
    for f in (*a.values(), *b.values()):
        f.uniqueid = "u"
    diffs = compare(a, b)
    assert [d["name"] for d in diffs] == ["user.alice", "user.bob"]
    assert set(diffs[0]["fields"]) == {"exists", "messages", "content", "state"}
    assert "exists 3≠2" in describe_diff(diffs[0]) and "content digest" in describe_diff(diffs[0])
    assert describe_diff(diffs[1]) == "user.bob missing on to"
    assert compare(a, dict(a)) == []

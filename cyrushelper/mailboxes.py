"""`cyrushelper mailboxes`: per-mailbox facts of one instance, read from its own files: what the
switchover proof compares on both sides (switchover.py), usable on a stopped instance.

How the facts are read:
- `ctl_mboxlist -d` lists the mailboxes from mailboxes.db (live ones: tombstones of deleted or
  renamed mailboxes, mbtype "d", are skipped) with their uniqueid.
- `mbpath -j NAME…` (batches of MBPATH_BATCH names) gives each one's metadata directory, whatever
  the layout (uuid/ directories since 3.6, hashed legacy paths, metapartitions).
- We read `cyrus.index` ourselves, under a shared fcntl lock as Cyrus's own readers take it
  (imap/mailbox.c mailbox_lock_index → lock_shared), checking afterwards that no repack replaced
  the file meanwhile. From the header: UIDVALIDITY, last UID (UIDNEXT - 1), HIGHESTMODSEQ,
  EXISTS; from every record not expunged: UID, GUID (the SHA-1 of the message file), MODSEQ and
  the IMAP flags (system flags masked to \\Answered \\Flagged \\Deleted \\Draft \\Seen, and the 128
  user-flag bits; Cyrus's internal flags such as "archived" are per-server and left out).
- Two SHA-256 digests per mailbox: `content` over the sorted (UID, GUID) pairs — one missing,
  extra or changed message among 100,000 changes it — and `state` over (UID, MODSEQ, flags) —
  a flag change that did not replicate changes it. Two equal mailboxes have equal facts: sync
  replication copies UID, GUID, MODSEQ and flags (and the header's HIGHESTMODSEQ) verbatim.

Cyrus's own dumper, `mbexamine`, prints every record with its cache (envelope, body structure):
measured ≈1 KB of text per message and a process per call; reading the index is what
benchmarks/bench_switchover.py measures against it (see the README).

Index formats (imap/mailbox.h of each release): minor version 17 (Cyrus 3.6, 3.8) and 19 (3.10,
3.12) share the record layout and differ in the header. Any other version is refused with a clear
error rather than guessed: a proof that misreads both sides alike would pass.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cyrushelper import arguments, cyrus, exitcodes
from cyrushelper.config import Instance

log = logging.getLogger("cyrushelper.mailboxes")

MBPATH_BATCH = 500
TOOL_TIMEOUT = 600.0
LOCK_WAIT = 30.0
FLAGS_SYSTEM = 0x1F          # \Answered \Flagged \Deleted \Draft \Seen (imap/mailbox.h FLAGS_SYSTEM)
FLAG_EXPUNGED = 1 << 31      # FLAG_INTERNAL_EXPUNGED: a record kept only until the next repack


@dataclass(frozen=True)
class IndexLayout:
    last_uid: int
    uidvalidity: int
    highestmodseq: int
    exists: int
    # record offsets (the same in 17 and 19)
    uid: int = 0
    system_flags: int = 32
    user_flags: int = 36        # 4 x 32 bit
    guid: int = 60              # 20 bytes
    modseq: int = 80


LAYOUTS = {
    17: IndexLayout(last_uid=28, uidvalidity=44, highestmodseq=68, exists=84),
    19: IndexLayout(last_uid=28, uidvalidity=44, highestmodseq=72, exists=60),
}
MIN_RECORD_SIZE = 88            # up to the end of MODSEQ


class MailboxError(Exception):
    """A mailbox (or the list of them) could not be read."""


@dataclass
class Facts:
    """What the proof compares for one mailbox (`error` set when it could not be read)."""
    name: str
    uniqueid: str | None = None
    uidvalidity: int | None = None
    last_uid: int | None = None
    highestmodseq: int | None = None
    exists: int | None = None
    messages: int | None = None       # live records counted (must equal exists)
    content: str | None = None        # sha256 of sorted (uid, guid)
    state: str | None = None          # sha256 of sorted (uid, modseq, flags)
    index_version: int | None = None
    error: str | None = None
    guids: dict[int, str] = field(default_factory=dict)   # only when asked for (the canary)

    COMPARED = ("uniqueid", "uidvalidity", "last_uid", "highestmodseq", "exists", "messages", "content",
                "state", "error")

    def differences(self, other: Facts) -> list[str]:
        return [f for f in self.COMPARED if getattr(self, f) != getattr(other, f)]

    def to_json(self) -> dict:
        data = asdict(self)
        if not self.guids:
            data.pop("guids")
        else:
            data["guids"] = {str(k): v for k, v in self.guids.items()}
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> Facts:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["guids"] = {int(k): v for k, v in (data.get("guids") or {}).items()}
        return cls(**known)


# --------------------------------------------------------------------------- cyrus.index

def read_index_bytes(path: Path, lock_wait: float = LOCK_WAIT) -> bytes:
    """The whole cyrus.index under a shared fcntl lock (writers hold an exclusive one)."""
    deadline = time.monotonic() + lock_wait
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        raise MailboxError(f"{path}: still locked by a writer after {lock_wait:g}s") from None
                    time.sleep(0.01)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                continue        # a repack renamed a new index over it: read that one
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)


def parse_index(data: bytes, name: str = "?", want_guids: bool = False) -> Facts:
    if len(data) < 32:
        raise MailboxError(f"{name}: cyrus.index too short ({len(data)} bytes)")
    minor, start, record_size, num_records = struct.unpack_from(">4I", data, 8)
    layout = LAYOUTS.get(minor)
    if layout is None:
        raise MailboxError(f"{name}: cyrus.index minor version {minor} is not one this proof can read "
                           f"(supported: {', '.join(map(str, sorted(LAYOUTS)))}); not guessing")
    if record_size < MIN_RECORD_SIZE or start + record_size * num_records > len(data):
        raise MailboxError(f"{name}: cyrus.index header does not match its size "
                           f"(start {start}, {num_records} records of {record_size} bytes, {len(data)} bytes)")
    facts = Facts(name=name, index_version=minor,
                  last_uid=struct.unpack_from(">I", data, layout.last_uid)[0],
                  uidvalidity=struct.unpack_from(">I", data, layout.uidvalidity)[0],
                  highestmodseq=struct.unpack_from(">Q", data, layout.highestmodseq)[0],
                  exists=struct.unpack_from(">I", data, layout.exists)[0])
    records = []
    for i in range(num_records):
        off = start + i * record_size
        uid, = struct.unpack_from(">I", data, off + layout.uid)
        system, = struct.unpack_from(">I", data, off + layout.system_flags)
        if system & FLAG_EXPUNGED:
            continue
        user = data[off + layout.user_flags:off + layout.user_flags + 16]
        guid = data[off + layout.guid:off + layout.guid + 20]
        modseq, = struct.unpack_from(">Q", data, off + layout.modseq)
        records.append((uid, guid, modseq, system & FLAGS_SYSTEM, user))
    records.sort(key=lambda r: r[0])
    content, state = hashlib.sha256(), hashlib.sha256()
    for uid, guid, modseq, system, user in records:
        content.update(struct.pack(">I", uid) + guid)
        state.update(struct.pack(">IQI", uid, modseq, system) + user)
    facts.messages = len(records)
    facts.content = content.hexdigest()
    facts.state = state.hexdigest()
    if want_guids:
        facts.guids = {uid: guid.hex() for uid, guid, *_ in records}
    return facts


# --------------------------------------------------------------------------- Cyrus's tools

def _tool(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MailboxError(f"{' '.join(args[:3])}: {e}") from None
    if r.returncode != 0 and not r.stdout:
        raise MailboxError(f"{' '.join(args[:3])} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def list_mailboxes(instance: Instance) -> dict[str, str | None]:
    """{internal name: uniqueid} of every live mailbox (ctl_mboxlist -d, offline-capable)."""
    out = _tool([str(cyrus.bin_dir() / "ctl_mboxlist"), "-C", str(instance.imapd.path), "-d"])
    try:
        entries = json.loads(out or "{}")
    except ValueError as e:
        raise MailboxError(f"ctl_mboxlist -d printed no JSON ({e}): {out[:200]!r}") from None
    return {name: info.get("uniqueid") for name, info in entries.items()
            if "d" not in info.get("mbtype", "") and "i" not in info.get("mbtype", "")}


def external_name(intname: str, unixhierarchysep: bool) -> str:
    """What mbpath (in the admin namespace: no altnamespace) reads for an internal name: with
    unixhierarchysep (Cyrus's default) '.' separates levels as '/' and a '^' stands for '.'."""
    domain, sep, rest = intname.rpartition("!")
    if unixhierarchysep:
        rest = "".join("/" if ch == "." else "." if ch == "^" else ch for ch in rest)
    return f"{rest}@{domain}" if sep else rest


def meta_paths(instance: Instance, names: list[str]) -> dict[str, Path]:
    """{internal name: metadata directory} via `mbpath -j` (names Cyrus cannot find are absent)."""
    found: dict[str, Path] = {}
    decoder = json.JSONDecoder()
    unix = instance.imapd.get_bool("unixhierarchysep", True)
    for i in range(0, len(names), MBPATH_BATCH):
        batch = [external_name(n, unix) for n in names[i:i + MBPATH_BATCH]]
        out = _tool([str(cyrus.bin_dir() / "mbpath"), "-C", str(instance.imapd.path), "-q", "-j", *batch])
        pos = 0
        while True:
            while pos < len(out) and out[pos].isspace():
                pos += 1
            if pos >= len(out):
                break
            obj, pos = decoder.raw_decode(out, pos)
            intname = (obj.get("mbname") or {}).get("intname")
            if intname and obj.get("meta"):
                found[intname] = Path(obj["meta"])
    return found


def collect(instance: Instance, only: list[str] | None = None, guids_for: set[str] = frozenset()) -> dict[str, Facts]:
    """Facts of every live mailbox (or of `only`), keyed by internal name."""
    listed = list_mailboxes(instance)
    names = sorted(only if only is not None else listed)
    paths = meta_paths(instance, [n for n in names if n in listed])
    result = {}
    for name in names:
        if name not in listed:
            result[name] = Facts(name=name, error="no such mailbox")
            continue
        path = paths.get(name)
        if path is None:
            result[name] = Facts(name=name, uniqueid=listed[name], error="mbpath found no directory")
            continue
        try:
            facts = parse_index(read_index_bytes(path / "cyrus.index"), name, want_guids=name in guids_for)
        except (OSError, MailboxError) as e:
            facts = Facts(name=name, error=str(e))
        facts.uniqueid = listed[name]
        result[name] = facts
    return result


def owner(name: str) -> str | None:
    """The user owning internal mailbox name `name` (`[domain!]user.LOCALPART[.sub]`), else None
    (a shared mailbox). Cyrus writes a '.' inside a user name as '^'."""
    domain, sep, rest = name.rpartition("!")
    parts = rest.split(".")
    if len(parts) < 2 or parts[0] != "user":
        return None
    user = parts[1].replace("^", ".")
    return f"{user}@{domain}" if sep else user


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    arguments.add_instance_arguments(parser)
    parser.add_argument("--mailbox", action="append", metavar="NAME",
                        help="only this mailbox (internal name, e.g. user.alice); repeatable")
    parser.add_argument("--guids", action="store_true", help="also list UID -> GUID of the named mailboxes")
    parser.add_argument("--json", action="store_true", help="machine-readable output (one object)")


def main(args: argparse.Namespace) -> int:
    inst = arguments.load_instance(args)
    t0 = time.monotonic()
    try:
        facts = collect(inst, args.mailbox, set(args.mailbox or []) if args.guids else frozenset())
    except MailboxError as e:
        log.error("%s", e)
        return exitcodes.FAILURE
    seconds = round(time.monotonic() - t0, 3)
    if args.json:
        print(json.dumps({"instance": inst.name, "seconds": seconds,
                          "mailboxes": {n: f.to_json() for n, f in facts.items()}}, sort_keys=True))
    else:
        for f in facts.values():
            if f.error:
                print(f"{f.name}: ERROR {f.error}")
            else:
                print(f"{f.name}: uidvalidity={f.uidvalidity} uidnext={f.last_uid + 1} "
                      f"highestmodseq={f.highestmodseq} messages={f.messages} content={f.content[:16]} "
                      f"state={f.state[:16]}")
        print(f"{len(facts)} mailboxes in {seconds:.2f}s", file=sys.stderr)
    return exitcodes.FAILURE if any(f.error for f in facts.values()) else exitcodes.OK

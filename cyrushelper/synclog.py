"""The on-disk sync log of one channel: which files are pending and how many lines they hold.

Layout (imap/sync_log.c): writers append to `log`; a reader renames it to `log-run`, replays it,
then unlinks it, so a leftover `log-run` is older than `log` and must be replayed first.
Files `log-<pid>` were left by Cyrus ≤ 2.4 and are never picked up by a modern sync_client.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cyrushelper.config import Channel

_LEGACY_RE = re.compile(r"log-\d+")


@dataclass(frozen=True)
class Backlog:
    channel: str
    log_run: int   # lines in log-run (being replayed, or left by an interrupted reader)
    log: int       # lines in log (appended by Cyrus since the last rename)
    legacy: int    # lines in legacy log-<pid> files
    files: tuple[str, ...]

    @property
    def lines(self) -> int:
        return self.log_run + self.log + self.legacy

    @property
    def empty(self) -> bool:
        return not self.files


def count_lines(path: os.PathLike | str) -> int:
    """Newline count of a file, 0 if it vanished meanwhile (a reader may unlink it any time)."""
    try:
        with open(path, "rb") as f:
            n = 0
            while chunk := f.read(1 << 16):
                n += chunk.count(b"\n")
            return n
    except FileNotFoundError:
        return 0


def legacy_logs(sync_dir: Path) -> list[Path]:
    try:
        names = os.listdir(sync_dir)
    except FileNotFoundError:
        return []
    return sorted(sync_dir / n for n in names if _LEGACY_RE.fullmatch(n))


def pending_files(channel: Channel) -> list[Path]:
    """Files still holding events, in replay order: legacy, log-run, log."""
    files = legacy_logs(channel.sync_dir)
    files += [p for p in (channel.log_run, channel.log) if p.exists()]
    return files


def backlog(channel: Channel) -> Backlog:
    legacy = legacy_logs(channel.sync_dir)
    return Backlog(
        channel=channel.label,
        log_run=count_lines(channel.log_run),
        log=count_lines(channel.log),
        legacy=sum(count_lines(p) for p in legacy),
        files=tuple(p.name for p in pending_files(channel)),
    )


def format_backlog(backlogs: list[Backlog]) -> str:
    """One-line summary for STATUS=: 'backlog default=12 repl2=0'."""
    if not backlogs:
        return "no sync channels"
    return "backlog " + " ".join(f"{b.channel}={b.lines}" for b in backlogs)

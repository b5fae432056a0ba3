"""Replication channel policy: which sync log channels of an instance replicate, which of them a
rolling sync_client reads, and how a sync_client (or squatter) command line is read.

Every channel of `sync_log_channels` gets its own copy of each event (config.py has the layout).
Not every channel is for sync_client: `squatter -R` consumes its own channel ("squatter" unless
`-n` names another) and sync_client must never read it. A channel sync_client reads needs a
`<channel>_sync_host` (or the plain `sync_host`); one with pending events and no host is a
configuration error, never something to skip.

A command line is read the way Cyrus's getopt(3)/getopt_long(3) reads it, with the option letters
of both Cyrus 3.6 and 3.10 (imap/sync_client.c, imap/squatter.c): one reader for the cyrus.conf
entries and for the live processes found in /proc.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cyrushelper import proc
from cyrushelper.config import Channel, ConfigError, Entry, Instance

# Short options of sync_client in 3.6 ("C:vlLS:F:f:w:t:d:n:rRNumsozOAp:1") and 3.10 (which adds -a);
# ':' marks an option that takes a value. Long options exist since 3.10.
SYNC_CLIENT_SHORT = "1AC:F:LNORS:ad:f:lmn:op:rst:uvw:z"
SYNC_CLIENT_LONG = {
    "rolling-once": "1", "all-users": "A", "shutdown-file": "F", "local-only": "L", "skip-locked": "N",
    "no-copyback": "O", "foreground-rolling": "R", "server": "S", "stage-to-archive": "a",
    "delay": "d", "input-file": "f", "verbose-logging": "l", "mailboxes": "m", "channel": "n",
    "connect-once": "o", "dest-partition": "p", "rolling": "r", "sieve-mode": "s", "timeout": "t",
    "userids": "u", "verbose": "v", "delayed-startup": "w", "require-compression": "z",
}
SQUATTER_SHORT = "ABC:DFL:N:PRS:T:UXZade:f:hilmn:oprs:t:uvz:"
SQUATTER_DEFAULT_CHANNEL = "squatter"

Options = dict[str, "str | bool"]


def read_options(words: list[str], short: str, long: dict[str, str] | None = None) -> Options | None:
    """The options of `words` (argv without the program name) as getopt_long(3) reads them: keyed
    by option letter, True for a flag, the value for an option that takes one. Reading stops at
    `--` or the first non-option word. None when a word is not an option this program takes, or
    a value is missing: such a command line is not one we understand."""
    long = long or {}
    takes_value = {short[k]: short[k + 1:k + 2] == ":" for k in range(len(short)) if short[k] != ":"}
    opts: Options = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--" or not word.startswith("-") or word == "-":
            break
        # the word as (letter, value attached to it or None) pairs
        if word.startswith("--"):
            name, has_value, value = word[2:].partition("=")
            if long.get(name) is None or (has_value and not takes_value[long[name]]):
                return None
            pairs = [(long[name], value if has_value else None)]
        else:
            pairs = []
            for j, letter in enumerate(word[1:], 1):
                if letter not in takes_value:
                    return None
                if takes_value[letter]:  # its value is the rest of the word, or the next word
                    pairs.append((letter, word[j + 1:] or None))
                    break
                pairs.append((letter, None))
        for letter, value in pairs:
            if takes_value[letter] and value is None:
                i += 1
                if i >= len(words):
                    return None
                value = words[i]
            opts[letter] = value if takes_value[letter] else True
        i += 1
    return opts


@dataclass(frozen=True)
class SyncClientCommand:
    """What a sync_client command line means for its sync log channel."""

    config: str | None        # -C, None = /etc/imapd.conf
    channel: str | None       # -n, None = the default channel
    rolling: bool             # -r (forks into the background) or -R (foreground): reads the log
    input_file: str | None    # -f FILE: replays that file only, never the channel's log

    @property
    def reads_log(self) -> bool:
        """Whether it renames and replays the channel's `log`/`log-run` (without any lock)."""
        return self.rolling and self.input_file is None


def sync_client_command(argv: list[str]) -> SyncClientCommand | None:
    """Read `argv` (argv[0] is the sync_client word); None if sync_client would refuse it."""
    opts = read_options(argv[1:], SYNC_CLIENT_SHORT, SYNC_CLIENT_LONG)
    if opts is None:
        return None
    return SyncClientCommand(config=_value(opts, "C"), channel=_value(opts, "n"),
                             rolling=bool(opts.get("r") or opts.get("R")), input_file=_value(opts, "f"))


def _value(opts: Options, letter: str) -> str | None:
    value = opts.get(letter)
    return value if isinstance(value, str) else None


def entry_channel(entry: Entry) -> str | None:
    """The channel a cyrus.conf sync_client or squatter entry reads (`-n`); None = its default."""
    short = SQUATTER_SHORT if entry.program == "squatter" else SYNC_CLIENT_SHORT
    opts = read_options(entry.argv[1:], short, SYNC_CLIENT_LONG if entry.program == "sync_client" else None)
    return _value(opts or {}, "n")


# --------------------------------------------------------------------------- an instance's channels

def squatter_channels(instance: Instance) -> set[str]:
    """Channels a rolling squatter consumes (`squatter -R [-n CHAN]`, default channel "squatter")."""
    names = {SQUATTER_DEFAULT_CHANNEL}
    for entry in instance.cyrus.by_program("squatter"):
        channel = entry_channel(entry)
        if channel:
            names.add(channel)
    return names


REPLICA_ROLE_REASON = ("replica role: a replica never pushes to its primary (these are its own users' "
                       "changes, replayed harmlessly once it is primary again)")


def not_replicated_reason(instance: Instance, channel: Channel) -> str | None:
    """Why sync_client must not read this channel, or None if it is a replication channel."""
    if instance.role == "replica":
        return REPLICA_ROLE_REASON
    if channel.name is not None and channel.name in squatter_channels(instance) \
            and not instance.imapd.get(f"{channel.name}_sync_host"):
        return "read by squatter, not by sync_client"
    return None


def replication_channels(instance: Instance) -> list[Channel]:
    """The channels sync_client replays (every channel of sync_log_channels but squatter's)."""
    return [c for c in instance.channels if not_replicated_reason(instance, c) is None]


def hostless_channels(instance: Instance) -> list[tuple[Channel, tuple[str, int | None]]]:
    """Replication channels with neither `<channel>_sync_host` nor `sync_host`, each with the line
    that creates it (sync_log_channels, or sync_log for the default channel alone): their events
    pile up and no drain can ever replay them."""
    key = "sync_log_channels" if instance.imapd.get("sync_log_channels") is not None else "sync_log"
    return [(c, instance.imapd.where(key)) for c in replication_channels(instance) if not c.host]


def rolling_channels(instance: Instance) -> set[str]:
    """Labels of the channels a rolling sync_client (-r / -R) in cyrus.conf replays continuously."""
    labels = set()
    for entry in instance.sync_client_entries:
        command = sync_client_command(entry.argv)
        if command is not None and command.reads_log:
            labels.add(command.channel if command.channel is not None else "default")
    return labels


def select_channels(instance: Instance, wanted: list[str] | None) -> list[Channel]:
    """The channels named in `wanted` ('default' or '""' for the unnamed one), all when empty:
    every channel of sync_log_channels, even with sync_log off (old files still count)."""
    channels = instance.imapd.channels
    if not wanted:
        return channels
    by_label = {c.label: c for c in channels}
    chosen = []
    for name in wanted:
        ch = by_label.get("default" if name in ('""', "") else name)
        if ch is None:
            path, line = instance.imapd.where("sync_log_channels")
            raise ConfigError(path, line, f"no channel {name!r} in sync_log_channels "
                                          f"(have: {', '.join(by_label)})")
        if ch not in chosen:
            chosen.append(ch)
    return chosen


def warnings(instance: Instance) -> list[str]:
    """cyrus.conf sync_client entries that read a channel sync_log_channels does not write."""
    if not instance.imapd.sync_log:
        return []
    written = [c.name for c in instance.imapd.channels]
    return [f"{e.path}:{e.line}: sync_client entry {e.name!r} reads channel "
            f"{entry_channel(e) or 'default'!r}, which sync_log_channels does not write"
            for e in instance.sync_client_entries if entry_channel(e) not in written]


def hostless_message(channel: Channel, where: tuple[str, int | None]) -> str:
    if channel.name:
        what = f"channel {channel.name!r} has no {channel.name}_sync_host and there is no sync_host"
    else:
        what = "sync_log is on for the default channel but there is no sync_host"
    return (f"{where[0]}:{where[1]}: {what}: its events could never be replicated, and every stop "
            "would fail (exit 78) with them kept")


# --------------------------------------------------------------------------- live readers

def find_sync_readers(imapd_conf: os.PathLike | str, channel: str | None,
                      exclude: set[int] = frozenset()) -> list[tuple[int, str]]:
    """Live `sync_client -r/-R` processes (without -f) reading this config's `channel`.

    They replay and unlink `log-run` without any lock, so a drain must not run beside them.
    Best effort: processes in other PID namespaces are invisible.
    """
    mine = os.path.realpath(imapd_conf)
    found = []
    for pid in proc.pids():
        if pid in exclude or pid == os.getpid():
            continue
        argv = proc.cmdline(pid)
        # the first word naming sync_client: also catches wrappers (`cyrus sync_client …`,
        # `flock F sync_client …`, an interpreter running a script called sync_client)
        start = next((i for i, w in enumerate(argv) if os.path.basename(w) == "sync_client"), None)
        if start is None:
            continue
        command = sync_client_command(argv[start:])
        if command is None or not command.reads_log or command.channel != channel:
            continue
        conf = command.config or "/etc/imapd.conf"
        if not os.path.isabs(conf):
            try:
                conf = os.path.join(os.readlink(f"/proc/{pid}/cwd"), conf)
            except OSError:
                continue
        if os.path.realpath(conf) == mine:
            found.append((pid, " ".join(argv)))
    return found

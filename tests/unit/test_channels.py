"""Channel policy (cyrushelper/channels.py): one reader for sync_client/squatter command lines,
with the options of Cyrus 3.6 and 3.10 (long options included), and which channels replicate."""

from __future__ import annotations

from pathlib import Path

import pytest

from cyrushelper import channels
from cyrushelper.config import Instance

BASE = "configdirectory: /var/lib/cyrus-test\npartition-default: /var/spool/cyrus-test\n"


def instance(tmp_path: Path, imapd: str, cyrus: str) -> Instance:
    (tmp_path / "imapd.conf").write_text(BASE + imapd)
    (tmp_path / "cyrus.conf").write_text(cyrus)
    return Instance.load(tmp_path / "imapd.conf", tmp_path / "cyrus.conf")


@pytest.mark.parametrize("argv, expected", [
    # Cyrus 3.6 short options (imap/sync_client.c getopt "C:vlLS:F:f:w:t:d:n:rRNumsozOAp:1")
    (["sync_client", "-C", "/c", "-r"], ("/c", None, True, None)),
    (["sync_client", "-rv", "-nrepl2"], (None, "repl2", True, None)),
    (["sync_client", "-R", "-1", "-n", "ch", "-F", "/x"], (None, "ch", True, None)),
    (["sync_client", "-r", "-f", "/tmp/log-123"], (None, None, True, "/tmp/log-123")),
    (["sync_client", "-A"], (None, None, False, None)),
    # Cyrus 3.10 adds long options and -a
    (["sync_client", "--rolling", "--channel=repl2", "-C", "/c"], ("/c", "repl2", True, None)),
    (["sync_client", "--foreground-rolling", "--channel", "repl2", "-a"], (None, "repl2", True, None)),
    (["sync_client", "--rolling", "--input-file", "/f"], (None, None, True, "/f")),
])
def test_sync_client_command_lines_of_both_versions(argv, expected):
    cmd = channels.sync_client_command(argv)
    assert (cmd.config, cmd.channel, cmd.rolling, cmd.input_file) == expected
    assert cmd.reads_log == (expected[2] and expected[3] is None)


@pytest.mark.parametrize("argv", [
    ["sync_client", "-x"],                 # not a sync_client option: not a command we understand
    ["sync_client", "-n"],                 # value missing
    ["sync_client", "--rolling=yes"],      # a flag given a value
    ["sync_client", "--nonsense"],
    ["sync_client", "--channel"],
])
def test_command_lines_sync_client_would_refuse_are_not_read(argv):
    assert channels.sync_client_command(argv) is None


def test_reading_stops_at_double_dash_and_at_the_first_word():
    assert channels.read_options(["-r", "--", "-n", "x"], channels.SYNC_CLIENT_SHORT) == {"r": True}
    assert channels.read_options(["-r", "word", "-n", "x"], channels.SYNC_CLIENT_SHORT) == {"r": True}


def test_rolling_channels_and_entry_channels_from_cyrus_conf(tmp_path):
    inst = instance(tmp_path, "sync_log: 1\nsync_log_channels: \"\" repl2 repl3 idx\n"
                              "sync_host: a\nrepl2_sync_host: b\nrepl3_sync_host: c\n",
                    "DAEMON {\n"
                    '  s2 cmd="sync_client -C /c --rolling --channel repl2"\n'
                    '  s3 cmd="/usr/sbin/cyrus sync_client -vr -n repl3 -f /x"\n'   # replays a file only
                    '  sq cmd="squatter -R -s 0 -n idx"\n'                           # squatter's -s takes a value
                    "}\n")
    assert channels.rolling_channels(inst) == {"repl2"}
    assert [channels.entry_channel(e) for e in inst.cyrus.entries] == ["repl2", "repl3", "idx"]
    assert channels.squatter_channels(inst) == {"squatter", "idx"}
    assert [c.label for c in channels.replication_channels(inst)] == ["default", "repl2", "repl3"]
    assert channels.not_replicated_reason(inst, inst.channels[3]) == "read by squatter, not by sync_client"

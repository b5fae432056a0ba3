"""The pure parts of the test bed: config rendering, port bases, unit texts, the syslog sink."""

from __future__ import annotations

import os
import socket
import time

import pytest

from cyrushelper.config import Instance
from cyrushelper.channels import entry_channel
from testbed.pair import CyrusPair, LabError, Ports, SyslogSink, fill, port_free, template_text


def write_rendered(pair: CyrusPair) -> None:
    for rel, text in pair.render().items():
        path = pair.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def load(pair: CyrusPair, which: str) -> Instance:
    write_rendered(pair)
    return pair.instance(which)


def test_ports_follow_the_base():
    assert Ports.from_base(11000) == Ports(primary_imap=11143, primary_lmtp=11024,
                                           replica_imap=11243, replica_sync=11292, sync_relay=11293)
    assert CyrusPair("/x", port_base=20000).ports.all() == [20143, 20024, 20243, 20292, 20293]


def test_sync_relay_sends_the_primary_through_the_relay_port():
    direct = CyrusPair("/x", port_base=20000, channels=["", "repl1"]).render()["primary/imapd.conf"]
    relayed = CyrusPair("/x", port_base=20000, channels=["", "repl1"], sync_relay=True).render()["primary/imapd.conf"]
    assert "sync_port: 20292" in direct and "repl1_sync_port: 20292" in direct
    assert "sync_port: 20293" in relayed and "repl1_sync_port: 20293" in relayed
    assert "20292" not in relayed


@pytest.mark.parametrize("base", [80, 65400])
def test_port_base_out_of_range(base):
    with pytest.raises(LabError, match="out of range"):
        CyrusPair("/x", port_base=base)


def test_rendered_configs_leave_no_placeholder_and_parse(tmp_path):
    pair = CyrusPair(tmp_path, port_base=13000)
    texts = pair.render()
    assert set(texts) == {"primary/imapd.conf", "primary/cyrus.conf", "replica/imapd.conf",
                          "replica/cyrus.conf"}
    for rel, text in texts.items():
        assert "@" not in text.replace("sender@", ""), rel
        assert str(tmp_path) in text
    primary, replica = load(pair, "primary"), load(pair, "replica")
    assert primary.warnings == [] and replica.warnings == []  # every command has its own -C
    for inst, conf in ((primary, pair.primary_imapd_conf), (replica, pair.replica_imapd_conf)):
        assert all(e.config_path == conf for e in inst.cyrus.entries)
    assert {e.name: str(li) for e, li in primary.listeners} == {"imap": "127.0.0.1:13143",
                                                                "lmtp": "127.0.0.1:13024"}
    assert {e.name: str(li) for e, li in replica.listeners} == {"imap": "127.0.0.1:13243",
                                                                "syncserver": "127.0.0.1:13292"}
    (channel,) = primary.channels
    assert channel.name is None and channel.replica_address == "127.0.0.1:13292"
    assert channel.sync_dir == tmp_path / "primary" / "config" / "sync"
    assert primary.sync_client_entries == []
    assert replica.channels == [] and replica.is_replica and not primary.is_replica
    assert primary.pid_file == pair.pid_file("primary")
    assert primary.imapd.get("syslog_prefix") == "primary-13000"
    assert replica.imapd.get("admins") == "admin repl"


def test_rolling_adds_one_daemon_sync_client_per_channel(tmp_path):
    pair = CyrusPair(tmp_path, port_base=13000, rolling=True, channels=["", "second"])
    inst = load(pair, "primary")
    entries = inst.sync_client_entries
    assert [(e.section, entry_channel(e)) for e in entries] == [("DAEMON", None), ("DAEMON", "second")]
    assert all("-r" in e.cmd and e.config_path == pair.primary_imapd_conf for e in entries)
    assert inst.warnings == []


def test_named_channels(tmp_path):
    pair = CyrusPair(tmp_path, port_base=13000, channels=["", "second"])
    inst = load(pair, "primary")
    assert [c.label for c in inst.channels] == ["default", "second"]
    second = inst.channels[1]
    assert second.sync_dir == tmp_path / "primary" / "config" / "sync" / "second"
    assert second.replica_address == "127.0.0.1:13292"
    assert second.shutdown_file == second.sync_dir / "shutdown"
    assert inst.sync_client_entries == []  # not rolling


def test_only_named_channel_drops_the_default(tmp_path):
    inst = load(CyrusPair(tmp_path, port_base=13000, channels=["only"]), "primary")
    assert [c.name for c in inst.channels] == ["only"]


@pytest.mark.parametrize("channels, message", [([], "at least one"), (["a", "a"], "duplicate"),
                                               (["bad name"], "bad channel name"),
                                               (["a/b"], "bad channel name")])
def test_bad_channels_are_refused(channels, message):
    with pytest.raises(LabError, match=message):
        CyrusPair("/x", channels=channels)


def test_fill_refuses_unknown_placeholder():
    assert fill("a @X@ b", {"X": "1"}) == "a 1 b"
    with pytest.raises(LabError, match="@Y@"):
        fill("@X@ @Y@", {"X": "1"}, "t.conf")


def test_templates_are_package_data():
    assert "@ROOT@" in template_text("primary-imapd.conf")
    assert "@DAEMON_SECTION@" in template_text("primary-cyrus.conf")


def test_which_is_checked():
    with pytest.raises(LabError, match="which"):
        CyrusPair("/x").dir("secondary")


def test_plain_units(tmp_path):
    pair = CyrusPair(tmp_path, port_base=13000)
    units = pair.plain_unit_texts()
    assert set(units) == {"cyrus-lab-primary.service", "cyrus-lab-replica.service"}
    for which in ("primary", "replica"):
        text = units[f"cyrus-lab-{which}.service"]
        assert "Type=simple" in text and "KillMode=mixed" in text
        exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
        assert exec_start.endswith(" -D")
        assert f"-C {pair.imapd_conf(which)}" in exec_start
        assert f"-M {pair.cyrus_conf(which)}" in exec_start
        assert f"-p {pair.pid_file(which)}" in exec_start
    assert "After=cyrus-lab-replica.service" in units["cyrus-lab-primary.service"]


def test_create_refuses_untraversable_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("create() needs root (chown to cyrus); covered by the system tests")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(LabError, match="cannot traverse"):
        CyrusPair(closed / "lab", port_base=13000).create()


def test_port_free_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not port_free(s.getsockname()[1])


# --------------------------------------------------------------------------- syslog sink

def send(path, text: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), str(path))


def test_sink_captures_and_reuses(tmp_path):
    sock = tmp_path / "log.sock"
    sock.write_text("")  # stale file where the socket goes: replaced
    sock.unlink()
    with SyslogSink(str(sock), tmp_path / "out.log") as sink:
        assert sink.owner and sink.capturing
        mark = sink.mark()
        send(sock, "<22>Nov 27 00:00:00 primary-1/imapd[1]: hello\n")
        assert sink.wait_for(r"primary-1/imapd\[1\]: hello$", timeout=5, since=mark)
        second = SyslogSink(str(sock), tmp_path / "other.log").start()
        assert not second.owner  # something already listens: reuse, never steal
        second.stop()
        assert sock.exists()  # a non-owner leaves the socket alone
        send(sock, "after")
        assert sink.wait_for("after$", timeout=5)
    assert not sock.exists()


def test_sink_replaces_a_stale_socket(tmp_path):
    sock = tmp_path / "log.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(sock))
    dead.close()  # file stays, nobody listens
    with SyslogSink(str(sock), tmp_path / "out.log") as sink:
        assert sink.owner
        send(sock, "x1")
        assert sink.wait_for("x1", timeout=5)
    deadline = time.monotonic() + 1
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sock.exists()

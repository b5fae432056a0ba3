"""Socket mode's plan (cyrushelper/listeners.py): what each cyrus.conf entry becomes, and what is
refused with its file:line. A fake Cyrus binary directory stands in for the installed programs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cyrushelper import cyrus, listeners
from cyrushelper.config import ConfigError, Instance

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "tests" / "data" / "debian"


@pytest.fixture
def bindir(fake_cyrus_bindir) -> Path:
    return fake_cyrus_bindir


def instance(tmp_path: Path, cyrus_conf: str, name: str = "x") -> Instance:
    (tmp_path / "conf").mkdir(exist_ok=True)
    imapd = tmp_path / "imapd.conf"
    imapd.write_text(f"configdirectory: {tmp_path}/conf\npartition-default: {tmp_path}/spool\n")
    conf = tmp_path / "cyrus.conf"
    conf.write_text(cyrus_conf)
    return Instance.load(imapd, conf, name)


def refused(tmp_path: Path, cyrus_conf: str, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        listeners.plan(instance(tmp_path, cyrus_conf), **kwargs)
    return info.value


def test_debian_default_maps_every_entry(bindir):
    inst = Instance.load(DEBIAN / "imapd.conf", DEBIAN / "cyrus.conf", "default")
    plan = listeners.plan(inst)
    pools = {p.service: p for p in plan.pools}
    assert set(pools) == {"imap", "pop3", "nntp", "http", "lmtpunix", "sieve", "notify"}
    # service names resolved through /etc/services; a port alone: one dual-stack socket
    assert pools["imap"].address.value == "143" and pools["pop3"].address.value == "110"
    assert pools["http"].address.value == "8008"
    assert pools["lmtpunix"].address == listeners.Address("ListenStream", "/run/cyrus/socket/lmtp")
    assert pools["notify"].address.directive == "ListenDatagram"
    assert pools["sieve"].address.value.endswith(":4190")  # localhost:sieve
    # pool sizes: maxchild; the datagram service gets one worker, as master gives it
    assert {s: p.size for s, p in pools.items()} == {"imap": 100, "pop3": 50, "nntp": 100, "http": 100,
                                                    "lmtpunix": 20, "sieve": 100, "notify": 1}
    assert pools["imap"].argv == (str(bindir / "imapd"), "-U", "30")
    # Debian's `/usr/sbin/cyrus NAME` wrapper: NAME, cyr_NAME or ctl_NAME in the binary directory
    assert [argv for _, argv in plan.start] == [(str(bindir / "ctl_cyrusdb"), "-r"),
                                                (str(bindir / "cyr_expire"), "-E", "3"),
                                                (str(bindir / "tls_prune"),)]
    events = {e.entry.name: e for e in plan.events}
    assert events["checkpoint"].schedule == ["OnActiveSec=0", "OnUnitActiveSec=30min"]
    assert events["delprune"].schedule == ["OnCalendar=*-*-* 04:01:00"]
    assert plan.daemons == []
    assert plan.worker_units[:2] == ["cyrus-default-imap@1.service", "cyrus-default-imap@2.service"]
    assert len(plan.worker_units) == 471


def test_missing_programs_are_refused_with_file_line_all_at_once(tmp_path, bindir):
    (bindir / "pop3d").unlink()
    (bindir / "nntpd").unlink()
    error = refused(tmp_path, "SERVICES {\n  imap cmd=\"imapd\" listen=\"1143\"\n"
                              "  pop3 cmd=\"pop3d\" listen=\"1110\"\n  nntp cmd=\"nntpd\" listen=\"1119\"\n}\n")
    assert (error.line, "pop3" in error.message, "cyrus-pop3d" in error.message) == (3, True, True)
    assert f"\n{tmp_path}/cyrus.conf:4: SERVICES entry 'nntp': no executable {bindir}/nntpd" in str(error)


@pytest.mark.parametrize("text, line, words", [
    ('DAEMON {\n  idled cmd="idled" wait=y\n}\n', 2, "wait=y"),
    ('START {\n  s cmd="sync_client -r"\n}\n', 2, "move it to DAEMON"),
    ('SERVICES {\n  imap cmd="imapd -X" listen="1143"\n}\n', 2, "-X"),
    ('SERVICES {\n  imap cmd="imapd" listen="1143" maxchild=0\n}\n', 2, "maxchild=0"),
    ('SERVICES {\n  imap cmd="imapd" listen="1143" maxchlid=10\n}\n', 2, "maxchlid="),
    ('EVENTS {\n  c cmd="ctl_cyrusdb -c" listen="1143"\n}\n', 2, "listen="),
    ('SERVICES {\n  imap cmd="imapd" listen="nosuchservice"\n}\n', 2, "/etc/services"),
    ('SERVICES {\n  imap cmd="imapd" listen="no-such-host.invalid:1143"\n}\n', 2, "does not resolve"),
    ('START {\n  r cmd="ctl_cyrusdb -r"\n}\n', None, "no SERVICES entry"),
])
def test_what_cannot_be_mapped_is_refused(tmp_path, bindir, text, line, words):
    error = refused(tmp_path, text)
    assert error.line == line and words in error.message, error


def test_listen_forms(tmp_path, bindir):
    plan = listeners.plan(instance(tmp_path, 'SERVICES {\n'
                                             '  a cmd="imapd" listen="127.0.0.1:1143"\n'
                                             '  b cmd="imapd" listen="[::1]:1144"\n'
                                             '  c cmd="imapd" listen="1145" proto=tcp4\n'
                                             '  d cmd="imapd" listen="1146" proto=tcp6\n'
                                             '  e cmd="imapd" listen="*:1147"\n'
                                             '  f cmd="lmtpd" listen="/run/x/lmtp"\n'
                                             '}\n'))
    got = {p.service: (p.address.value, p.address.ipv6_only, p.address.unix) for p in plan.pools}
    assert got == {"a": ("127.0.0.1:1143", False, False), "b": ("[::1]:1144", False, False),
                   "c": ("0.0.0.0:1145", False, False), "d": ("[::]:1146", True, False),
                   "e": ("1147", False, False), "f": ("/run/x/lmtp", False, True)}


def test_a_name_with_two_addresses_gets_a_socket_and_pool_each(tmp_path, bindir, monkeypatch):
    monkeypatch.setattr(listeners, "_hosts", lambda entry, host: ["127.0.0.1", "::1"])
    plan = listeners.plan(instance(tmp_path, 'SERVICES {\n  sieve cmd="timsieved" listen="localhost:4190" '
                                             'maxchild=3\n}\n'))
    assert [(p.socket_unit, p.cyrus_id, p.address.value, p.size) for p in plan.pools] == [
        ("cyrus-x-sieve.socket", 0, "127.0.0.1:4190", 3), ("cyrus-x-sieve-2.socket", 1, "[::1]:4190", 3)]
    assert plan.pools[1].worker_units == ["cyrus-x-sieve-2@1.service", "cyrus-x-sieve-2@2.service",
                                          "cyrus-x-sieve-2@3.service"]


def test_pool_sizes_and_overrides(tmp_path, bindir):
    conf = ('SERVICES {\n  imap cmd="imapd" listen="1143" prefork=3\n'
            '  lmtp cmd="lmtpd" listen="1024" maxchild=7\n  pop cmd="pop3d" listen="1110" prefork=12\n}\n')
    plan = listeners.plan(instance(tmp_path, conf))
    assert plan.pool_sizes() == {"imap": listeners.DEFAULT_POOL, "lmtp": 7, "pop": 12}
    assert [n for n in plan.notes if "maxchild unset" in n and ":2:" in n]  # generate warns about it
    plan = listeners.plan(instance(tmp_path, conf), workers={"imap": 2, "lmtp": 40})
    assert plan.pool_sizes() == {"imap": 2, "lmtp": 40, "pop": 12}
    assert "no SERVICES entry named nope" in str(refused(tmp_path, conf, workers={"nope": 1}))


def test_parse_workers():
    assert listeners.parse_workers(["imap=4", "lmtp=1"]) == {"imap": 4, "lmtp": 1}
    for bad in ("imap", "imap=0", "imap=x", "=3", f"imap={listeners.MAX_POOL + 1}"):
        with pytest.raises(ValueError):
            listeners.parse_workers([bad])


def test_daemons_and_event_schedules(tmp_path, bindir):
    plan = listeners.plan(instance(tmp_path, 'SERVICES {\n  imap cmd="imapd" listen="1143"\n}\n'
                                             'EVENTS {\n  once cmd="ctl_cyrusdb -c"\n'
                                             '  both cmd="cyr_expire -E 3" period=5 at=130\n}\n'
                                             'DAEMON {\n  sc cmd="sync_client -r -n repl"\n'
                                             '  idle cmd="idled"\n}\n'))
    events = {e.entry.name: e for e in plan.events}
    assert events["once"].schedule == ["OnActiveSec=0"]
    assert events["both"].schedule == ["OnCalendar=*-*-* 01:30:00"]  # master ignores period with at
    daemons = {d.entry.name: d for d in plan.daemons}
    assert daemons["sc"].reads_sync_log and not daemons["idle"].reads_sync_log
    assert plan.process_units == ["cyrus-x-imap@1.service", *(f"cyrus-x-imap@{i}.service" for i in range(2, 11)),
                                  "cyrus-x-sc.service", "cyrus-x-idle.service",
                                  "cyrus-x-event-once.service", "cyrus-x-event-both.service"]
    assert plan.timer_units == ["cyrus-x-event-once.timer", "cyrus-x-event-both.timer"]


def test_resolve_command(tmp_path, bindir):
    assert cyrus.resolve_command(["/usr/sbin/cyrus", "expire", "-E", "3"], bindir) == (
        str(bindir / "cyr_expire"), "-E", "3")
    assert cyrus.resolve_command(["/usr/sbin/cyrus", "ctl_cyrusdb", "-r"], bindir)[0] == str(bindir / "ctl_cyrusdb")
    assert cyrus.resolve_command(["imapd", "-s"], bindir) == (str(bindir / "imapd"), "-s")
    with pytest.raises(LookupError) as info:
        cyrus.resolve_command(["/usr/sbin/cyrus", "nothing"], bindir)
    assert "cyr_nothing" in str(info.value)


def test_connect_address():
    assert listeners.Address("ListenStream", "143").connect_address()[1] == ("127.0.0.1", 143)
    assert listeners.Address("ListenStream", "[::]:1146", ipv6_only=True).connect_address()[1] == ("::1", 1146)
    assert listeners.Address("ListenStream", "/run/x").connect_address()[1] == "/run/x"

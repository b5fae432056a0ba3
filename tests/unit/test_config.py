"""The Cyrus configuration model (cyrushelper/config.py) on real, adapted and hand-broken files.

Data: tests/data/debian (Debian 12's pristine conffiles), the lab pair's files as the test bed
renders them for /srv/cyrus-lab, tests/data/fedora (Fedora's layout), tests/data/broken (one mistake each).
The tests marked `system` ask Cyrus 3.6's own parsers (cyr_info) whether they agree with ours.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cyrushelper import config, exitcodes
from cyrushelper.config import (ConfigError, Instance, parse_cyrus_conf, parse_imapd_conf, parse_listen,
                                parse_switch)
from cyrushelper import channels
from cyrushelper.channels import entry_channel
from testbed.pair import write_lab_configs

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
DEBIAN = DATA / "debian"
# The lab pair's configuration exactly as the test bed renders it (never a hand copy that drifts).
LABDIR = "/srv/cyrus-lab"
_LAB_TMP = tempfile.mkdtemp(prefix="cyrushelper-labconf-")
os.chmod(_LAB_TMP, 0o755)  # cyr_info (system tests below) reads them as user cyrus
atexit.register(shutil.rmtree, _LAB_TMP, True)
LAB = write_lab_configs(Path(_LAB_TMP) / "lab", root=LABDIR)  # "lab/…" in test ids, as before
FEDORA = DATA / "fedora"
BROKEN = DATA / "broken"
CYR_INFO = Path("/usr/lib/cyrus/bin/cyr_info")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def imapd(tmp_path: Path, text: str, name: str = "imapd.conf"):
    return parse_imapd_conf(write(tmp_path / name, text))


def cyrus(tmp_path: Path, text: str, name: str = "cyrus.conf"):
    return parse_cyrus_conf(write(tmp_path / name, text))


def refusal(parse, path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(path)
    return info.value


BASE = "configdirectory: /var/lib/cyrus-test\n"


# --------------------------------------------------------------------------- Debian 12

def test_debian_copy_is_identical_to_the_installed_conffiles():
    for name in ("imapd.conf", "cyrus.conf"):
        installed = Path("/etc") / name
        if not installed.exists():
            pytest.skip(f"{installed} not installed (package cyrus-common)")
        assert (DEBIAN / name).read_bytes() == installed.read_bytes(), name


def test_debian_imapd_conf():
    conf = parse_imapd_conf(DEBIAN / "imapd.conf")
    assert conf.configdirectory == Path("/var/lib/cyrus")
    assert conf.partitions == {"default": Path("/var/spool/cyrus/mail"), "news": Path("/var/spool/cyrus/news")}
    assert conf.sync_log is False
    assert conf.get("SIEVEDIR") == "/var/spool/sieve"
    assert conf.get_bool("hashimapspool") is True  # "true"
    assert conf.get_bool("sieveusehomedir") is False  # "false"
    assert conf.where("configdirectory") == (str(DEBIAN / "imapd.conf"), 5)
    assert conf.proc_path == Path("/run/cyrus/proc")
    assert conf.master_pid_file == Path("/var/lib/cyrus/master.pid")
    assert conf.master_ready_file == Path("/var/lib/cyrus/master.ready")
    assert [(c.name, c.sync_dir, c.host) for c in conf.channels] == [(None, Path("/var/lib/cyrus/sync"), None)]
    assert [w.path for w in conf.writable_paths] == [Path(p) for p in (
        "/var/lib/cyrus", "/var/spool/cyrus/mail", "/var/spool/cyrus/news", "/run/cyrus/proc",
        "/run/cyrus/lock", "/var/spool/sieve", "/run/cyrus/socket")]


def test_debian_cyrus_conf():
    conf = parse_cyrus_conf(DEBIAN / "cyrus.conf")
    assert [e.name for e in conf.section("START")] == ["recover", "delprune", "tlsprune"]
    assert [e.name for e in conf.services] == ["imap", "pop3", "nntp", "http", "lmtpunix", "sieve", "notify"]
    assert [e.name for e in conf.section("EVENTS")] == ["checkpoint", "delprune", "tlsprune", "deleteprune",
                                                        "expungeprune"]
    assert conf.section("DAEMON") == []
    recover = conf.section("START")[0]
    assert (recover.line, recover.program, recover.cmd) == (
        8, "ctl_cyrusdb", ["/usr/sbin/cyrus", "ctl_cyrusdb", "-r"])
    imap = conf.services[0]
    assert (imap.cmd, imap.prefork, imap.maxchild, imap.listen.port) == (["imapd", "-U", "30"], 0, 100, "imap")
    notify = conf.services[-1]
    assert notify.args["proto"] == "udp" and notify.stream is False
    assert conf.section("EVENTS")[1].args == {"cmd": "/usr/sbin/cyrus expire -E 3", "at": "0401"}


def test_debian_instance_summary():
    inst = Instance.load(DEBIAN / "imapd.conf", DEBIAN / "cyrus.conf", "default")
    summary = inst.summary()
    assert summary["configdirectory"] == "/var/lib/cyrus"
    assert summary["pid_file"] == "/var/lib/cyrus/master.pid"
    assert summary["ready_file"] == "/var/lib/cyrus/master.ready"
    assert summary["fence_file"] == "/var/lib/cyrus/msg/shutdown"
    assert summary["sync_log"] is False and summary["channels"] == []
    assert summary["listeners"] == [
        {"service": "imap", "listen": "imap"}, {"service": "pop3", "listen": "pop3"},
        {"service": "nntp", "listen": "nntp"}, {"service": "http", "listen": "8008"},
        {"service": "lmtpunix", "listen": "/run/cyrus/socket/lmtp"},
        {"service": "sieve", "listen": "localhost:sieve"}]  # notify is UDP: nothing to connect to
    assert summary["sync_clients"] == [] and summary["sync_servers"] == []
    assert inst.is_replica is False
    # The copy is not /etc/imapd.conf, and Debian's commands have no -C: every entry gets a warning.
    assert len(inst.warnings) == len(inst.cyrus.entries)
    assert all("has no -C; it will read /etc/imapd.conf" in w for w in inst.warnings)


# --------------------------------------------------------------------------- the lab pair

def test_lab_primary_rolling():
    inst = Instance.load(LAB / "primary-imapd.conf", LAB / "primary-cyrus-rolling.conf", "primary")
    p = Path(LABDIR) / "primary"
    [channel] = inst.channels
    assert (channel.name, channel.label, channel.sync_dir) == (None, "default", p / "config/sync")
    assert (channel.log, channel.log_run) == (p / "config/sync/log", p / "config/sync/log-run")
    assert (channel.host, channel.port, channel.replica_address) == ("127.0.0.1", "11292", "127.0.0.1:11292")
    assert channel.shutdown_file == p / "config/sync/shutdown"
    assert inst.sync_dirs == [p / "config/sync"]
    [client] = inst.sync_client_entries
    assert (client.section, client.name, entry_channel(client)) == ("DAEMON", "syncclient", None)
    assert client.config_path == p / "imapd.conf"
    assert client.cmd == ["sync_client", "-C", str(p / "imapd.conf"), "-r"]
    assert [(e.name, str(li), li.connect_address()) for e, li in inst.listeners] == [
        ("imap", "127.0.0.1:11143", (socket.AF_INET, ("127.0.0.1", 11143))),
        ("lmtp", "127.0.0.1:11024", (socket.AF_INET, ("127.0.0.1", 11024)))]
    assert [w.path for w in inst.imapd.writable_paths] == [p / "config", p / "spool", p / "config/proc", p / "config/lock",
                                         p / "sieve", p / "config/socket", p / "config/sync"]
    assert inst.is_replica is False
    # -C names the deployed path, not this copy: reported, not refused
    assert len(inst.warnings) == len(inst.cyrus.entries)
    assert all(f"uses -C {p / 'imapd.conf'}" in w for w in inst.warnings)


def test_lab_primary_without_rolling_client_and_replica():
    primary = Instance.load(LAB / "primary-imapd.conf", LAB / "primary-cyrus.conf")
    assert primary.sync_client_entries == [] and primary.cyrus.section("DAEMON") == []
    replica = Instance.load(LAB / "replica-imapd.conf", LAB / "replica-cyrus.conf", "replica")
    assert replica.is_replica is True
    assert [e.name for e in replica.sync_server_entries] == ["syncserver"]
    assert replica.channels == []  # sync_log unset: nothing to drain on a replica
    summary = replica.summary()
    assert summary["sync_servers"] == ["syncserver"]
    assert summary["listeners"] == [{"service": "imap", "listen": "127.0.0.1:11243"},
                                    {"service": "syncserver", "listen": "127.0.0.1:11292"}]


def test_warning_for_entry_without_C_only_when_instance_is_not_etc(tmp_path):
    conf = write(tmp_path / "imapd.conf", BASE)
    cc = write(tmp_path / "cyrus.conf", f'SERVICES {{\n  imap cmd="imapd -C {conf}" listen="143"\n'
                                        '  pop3 cmd="pop3d" listen="110"\n}\n')
    inst = Instance.load(conf, cc)
    assert inst.warnings == [f"{cc}:3: SERVICES entry 'pop3' has no -C; it will read /etc/imapd.conf, "
                             f"not {conf}"]


def test_warning_for_sync_client_of_a_channel_nobody_writes(tmp_path):
    conf = write(tmp_path / "imapd.conf", BASE + "sync_log: 1\nsync_log_channels: repl1\n")
    cc = write(tmp_path / "cyrus.conf", f'DAEMON {{\n  sc1 cmd="sync_client -C {conf} -r -n repl1"\n'
                                        f'  sc0 cmd="sync_client -C {conf} -r"\n}}\n')
    inst = Instance.load(conf, cc)
    assert [entry_channel(e) for e in inst.sync_client_entries] == ["repl1", None]
    assert channels.warnings(inst) == [f"{cc}:3: sync_client entry 'sc0' reads channel 'default', "
                                       "which sync_log_channels does not write"]
    assert inst.warnings == []  # channel policy is channels.py's, not the config model's


# --------------------------------------------------------------------------- Fedora layout

def test_fedora_style_instance():
    inst = Instance.load(FEDORA / "imapd.conf", FEDORA / "cyrus.conf", "fedora")
    assert inst.imapd.configdirectory == Path("/var/lib/imap")
    assert inst.imapd.partitions == {"default": Path("/var/spool/imap")}
    assert inst.imapd.get_bool("allowplaintext") is False
    assert [e.name for e in inst.cyrus.services] == ["imap", "imaps", "pop3", "pop3s", "sieve", "lmtpunix",
                                                     "imaplocal6"]
    assert [(e.name, e.program, e.wait) for e in inst.cyrus.section("DAEMON")] == [("idled", "idled", False)]
    assert [e.args.get("at") for e in inst.cyrus.section("EVENTS")] == [None, "0400", "0430", "0445", "0400"]
    by_name = {e.name: (e, li) for e, li in inst.listeners}
    assert by_name["imaps"][1].port_number == socket.getservbyname("imaps", "tcp")
    assert by_name["imaplocal6"][1].connect_address() == (socket.AF_INET6, ("::1", 8143))
    assert by_name["lmtpunix"][1].connect_address() == (socket.AF_UNIX, "/var/lib/imap/socket/lmtp")
    assert [w.path for w in inst.imapd.writable_paths] == [Path(p) for p in (
        "/var/lib/imap", "/var/spool/imap", "/var/lib/imap/proc", "/var/lib/imap/lock", "/var/lib/imap/sieve",
        "/var/lib/imap/socket")]
    assert inst.pid_file == Path("/var/lib/imap/master.pid")


# --------------------------------------------------------------------------- imapd.conf syntax

def test_comments_blank_lines_whitespace_and_case(tmp_path):
    conf = imapd(tmp_path, "# comment\n\n   \t\n  # indented comment\n\tConfigDirectory:   /var/lib/x  \t\r\n"
                           "SYNC_HOST:replica # not a comment: Cyrus keeps it\n"
                           "sync_realm: EXAMPLE\xa0\n")
    assert conf.configdirectory == Path("/var/lib/x")
    assert conf.get("sync_host") == "replica # not a comment: Cyrus keeps it"
    assert conf.where("sync_host")[1] == 6
    assert conf.options["sync_realm"].value == "EXAMPLE\xa0"  # only ASCII whitespace is stripped, as in C


@pytest.mark.parametrize("value,expected", [
    ("1", True), ("yes", True), ("y", True), ("true", True), ("t", True), ("on", True), ("tomato", True),
    ("0", False), ("no", False), ("n", False), ("false", False), ("f", False), ("off", False), ("nope", False),
    ("Yes", None), ("TRUE", None), ("ON", None), ("o", None), ("2", None), ("", None), (" yes", None)])
def test_booleans_as_cyrus_reads_them(value, expected):
    assert parse_switch(value) is expected


def test_bad_boolean_is_refused_with_its_line(tmp_path):
    path = write(tmp_path / "imapd.conf", BASE + "\nallowplaintext: On\n")
    assert str(refusal(parse_imapd_conf, path)).startswith(f"{path}:3: 'allowplaintext' is not a boolean: 'On'")


def test_integers_as_strtol_reads_them(tmp_path):
    for good in ("8192", "0x2000", "020000", "-1", "+5", "0"):
        assert imapd(tmp_path, BASE + f"sync_batchsize: {good}\n").get("sync_batchsize") == good
    for bad in ("08", "1_000", "12k", "0x", "1e3"):
        path = write(tmp_path / "bad.conf", BASE + f"sync_batchsize: {bad}\n")
        assert refusal(parse_imapd_conf, path).line == 2, bad


def test_continuation_lines(tmp_path):
    conf = imapd(tmp_path, BASE + "sync_host: rep\\\nlica.example.\\\norg\n"
                                  "# a comment ending in a backslash swallows the next line \\\n"
                                  "sync_port: 1\n"
                                  "sync_repeat_interval: 1\n")
    assert conf.get("sync_host") == "replica.example.org"
    assert conf.where("sync_host")[1] == 2  # the line the option starts on
    assert conf.get("sync_port") is None  # Cyrus joins first, then sees a comment
    assert conf.where("sync_repeat_interval")[1] == 7


def test_backslash_on_the_last_line_without_newline_is_kept(tmp_path):
    assert imapd(tmp_path, BASE + "sync_password: secret\\").get("sync_password") == "secret\\"


def test_comment_continued_at_the_end_of_the_file_is_harmless(tmp_path):
    assert imapd(tmp_path, BASE + "# the end \\\n").get("configdirectory") == "/var/lib/cyrus-test"


def test_crlf_file(tmp_path):
    conf = imapd(tmp_path, "configdirectory: /var/lib/x\r\nsync_log: 1\r\nsync_host: r\\\r\nsync_port: 1\r\n")
    assert conf.sync_log is True
    assert conf.get("sync_host") == "r\\"  # '\\' before '\r' is no continuation for Cyrus either
    assert conf.get("sync_port") == "1"


def test_duplicate_keys_ignore_case(tmp_path):
    path = write(tmp_path / "imapd.conf", BASE + "sync_host: a\nSync_Host: b\n")
    assert str(refusal(parse_imapd_conf, path)) == (
        f"{path}:3: option 'sync_host' is set twice (first on line 2); Cyrus refuses this")


def test_include_merges_options_and_remembers_where(tmp_path):
    inner = write(tmp_path / "conf.d" / "sync.conf", "# sync\nsync_log: 1\nsync_host: replica\n")
    deeper = write(tmp_path / "conf.d" / "deeper.conf", "sync_port: 2005\n")
    outer = write(tmp_path / "imapd.conf", f"{BASE}@include: {inner}\n@INCLUDE:   {deeper}  \nsync_repeat_interval: 1\n")
    conf = parse_imapd_conf(outer)
    assert conf.sync_log is True
    assert conf.where("sync_host") == (str(inner), 3)
    assert conf.where("sync_port") == (str(deeper), 1)
    assert conf.where("sync_repeat_interval") == (str(outer), 4)
    assert conf.channels[0].replica_address == "replica:2005"


def test_include_errors_name_the_include_line(tmp_path):
    sub = write(tmp_path / "sub.conf", "sync_host: one\n")
    dup = write(tmp_path / "dup.conf", f"{BASE}sync_host: two\n@include: {sub}\n")
    e = refusal(parse_imapd_conf, dup)
    assert (e.path, e.line) == (str(sub), 1) and f"first on {dup}:2" in e.message
    twice = write(tmp_path / "twice.conf", f"{BASE}@include: {sub}\n@include: {sub}\n")
    e = refusal(parse_imapd_conf, twice)
    assert (e.path, e.line) == (str(twice), 3) and "included twice" in e.message
    loop = write(tmp_path / "loop.conf", f"{BASE}@include: {tmp_path / 'loop2.conf'}\n")
    write(tmp_path / "loop2.conf", f"sync_log: 1\n@include: {loop}\n")
    e = refusal(parse_imapd_conf, loop)
    assert (e.path, e.line) == (str(tmp_path / "loop2.conf"), 2) and "included twice" in e.message
    nul = write(tmp_path / "nul.conf", f"{BASE}@include: /tmp/a\0b\n")
    assert refusal(parse_imapd_conf, nul).line == 2


def test_unreadable_file(tmp_path):
    e = refusal(parse_imapd_conf, tmp_path / "missing.conf")
    assert str(e) == f"{tmp_path / 'missing.conf'}: cannot read {tmp_path / 'missing.conf'}: No such file or directory"
    e = refusal(parse_cyrus_conf, tmp_path)
    assert e.line is None and e.message == f"{tmp_path} is a directory, not a regular file"


# Issue 10: reading a configuration never hangs, never runs out of stack or memory; every refusal
# names the file (and the @include line that led to it).

def test_fifo_config_is_refused_without_waiting_for_a_writer(tmp_path):
    """Through the command line, in a child with a timeout: a regression must fail, not hang CI."""
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    imapd = write(tmp_path / "imapd.conf", "configdirectory: /var/lib/cyrus\n")
    outer = write(tmp_path / "outer.conf", f"configdirectory: /var/lib/cyrus\n@include: {fifo}\n")
    for args, where in (([fifo, imapd], f"{fifo}"), ([imapd, fifo], f"{fifo}"), ([outer, imapd], f"{outer}:2")):
        r = subprocess.run([sys.executable, "-m", "cyrushelper", "drain", "--imapd-conf", str(args[0]),
                            "--cyrus-conf", str(args[1])], capture_output=True, text=True, timeout=30)
        # before: blocked in open() forever, waiting for a writer
        assert r.returncode == exitcodes.CONFIG and r.stderr.count("\n") == 1, r.stderr
        assert f"{where}: {fifo} is a FIFO, not a regular file" in r.stderr


def test_include_of_a_device_is_refused(tmp_path):
    conf = write(tmp_path / "imapd.conf", "configdirectory: /var/lib/cyrus\n@include: /dev/zero\n")
    e = refusal(parse_imapd_conf, conf)  # before: MemoryError after reading /dev/zero
    assert str(e) == f"{conf}:2: /dev/zero is a character device, not a regular file"


def test_oversized_config_is_refused(tmp_path):
    big = tmp_path / "imapd.conf"
    with open(big, "w") as f:
        f.write("configdirectory: /var/lib/cyrus\n")
        f.write("# padding\n" * (config.MAX_CONFIG_BYTES // 10 + 1))
    assert "larger than 4 MiB" in refusal(parse_imapd_conf, big).message


def test_include_chain_deeper_than_the_limit_is_refused_at_its_line(tmp_path):
    depth = config.MAX_INCLUDE_DEPTH
    for i in range(depth + 1):
        write(tmp_path / f"inc{i}.conf", f"@include: {tmp_path}/inc{i + 1}.conf\n")
    write(tmp_path / f"inc{depth + 1}.conf", "sievedir: /var/spool/sieve\n")
    top = write(tmp_path / "imapd.conf", f"configdirectory: /var/lib/cyrus\n@include: {tmp_path}/inc0.conf\n")
    e = refusal(parse_imapd_conf, top)  # before: RecursionError at 600 levels
    assert (e.path, e.line) == (str(tmp_path / f"inc{depth - 1}.conf"), 1)
    assert f"nested more than {depth} files deep" in e.message
    # exactly at the limit it is read
    write(tmp_path / f"inc{depth - 1}.conf", "sievedir: /var/spool/sieve\n")
    assert parse_imapd_conf(top).get("sievedir") == "/var/spool/sieve"


# --------------------------------------------------------------------------- channels and derived paths

def test_channels_with_default_and_prefixed_keys(tmp_path):
    conf = imapd(tmp_path, BASE + 'sync_log: yes\nsync_log_channels: ""  repl1 squatter repl1\n'
                                  "sync_host: main.example\nsync_port: 2005\n"
                                  "sync_shutdown_file: {configdirectory}/sync/shutdown\n"
                                  "repl1_sync_host: far.example\nrepl1_sync_port: csync\n"
                                  "repl1_sync_shutdown_file: /run/cyrus/repl1.shutdown\n")
    got = [(c.name, c.label, c.sync_dir, c.host, c.port, c.shutdown_file) for c in conf.channels]
    base = Path("/var/lib/cyrus-test")
    assert got == [
        (None, "default", base / "sync", "main.example", "2005", base / "sync/shutdown"),
        ("repl1", "repl1", base / "sync/repl1", "far.example", "csync", Path("/run/cyrus/repl1.shutdown")),
        ("squatter", "squatter", base / "sync/squatter", "main.example", "2005", base / "sync/shutdown")]


def test_channel_list_without_quotes_drops_the_default_channel(tmp_path):
    conf = imapd(tmp_path, BASE + "sync_log: 1\nsync_log_channels: squatter\n")
    assert [c.name for c in conf.channels] == ["squatter"]  # cyrus-imapd issue #2248
    assert [c.name for c in imapd(tmp_path, BASE + "sync_log: 1\n").channels] == [None]


def test_channel_names_are_split_at_spaces_only(tmp_path):
    path = write(tmp_path / "imapd.conf", BASE + "sync_log_channels: a\tb\n")
    assert "bad channel name 'a\\tb'" in str(refusal(parse_imapd_conf, path))


def test_sync_log_off_means_nothing_to_drain(tmp_path):
    inst = Instance.load(write(tmp_path / "imapd.conf", BASE + "sync_log: off\nsync_log_channels: a b\n"),
                         write(tmp_path / "cyrus.conf", ""))
    assert inst.channels == [] and inst.sync_dirs == []
    assert [c.name for c in inst.imapd.channels] == ["a", "b"]


def test_configdirectory_is_expanded_only_at_the_start(tmp_path):
    conf = imapd(tmp_path, BASE + "proc_path: {ConfigDirectory}/proc2\nsievedir: /srv{configdirectory}\n"
                                  "master_pid_file: {configdirectory}/run/master.pid\n"
                                  "master_ready_file: /run/cyrus/ready\n")
    assert conf.proc_path == Path("/var/lib/cyrus-test/proc2")
    assert Path("/srv{configdirectory}") in [w.path for w in conf.writable_paths]
    assert conf.master_pid_file == Path("/var/lib/cyrus-test/run/master.pid")
    assert conf.master_ready_file == Path("/run/cyrus/ready")


def test_writable_paths_lists_every_directory_cyrus_writes(tmp_path):
    conf = imapd(tmp_path, BASE + "partition-default: /srv/spool\nmetapartition-default: /srv/meta\n"
                                  "archivepartition-default: /srv/archive\ndefaultsearchpartition-default: /srv/xapian\n"
                                  "partition_select_mode: random\n"  # not a partition
                                  "proc_path: /run/cyrus/proc\nmboxname_lockpath: /run/cyrus/lock\n"
                                  "sievedir: /var/spool/sieve\nlmtpsocket: /run/cyrus/socket/lmtp\n"
                                  "idlesocket: /run/cyrus/socket/idle\nnotifysocket: /run/cyrus/notify/sock\n"
                                  "ptloader_sock: /run/cyrus/pts/sock\ntemp_path: /var/tmp/cyrus\n"
                                  "duplicate_db_path: /var/cache/cyrus/deliver.db\n"
                                  "tls_sessions_db_path: /var/cache/cyrus/tls.db\n"
                                  "statuscache_db_path: {configdirectory}/cache/status.db\n"
                                  "search_stopword_path: /usr/share/cyrus/stopwords\n"  # read only
                                  "master_pid_file: /run/cyrus/master.pid\n"
                                  "sync_log: 1\nsync_log_channels: \"\" r1\n"
                                  "r1_sync_shutdown_file: /run/cyrus/r1/stop\n")
    assert [w.path for w in conf.writable_paths] == [Path(p) for p in (
        "/var/lib/cyrus-test", "/srv/spool", "/srv/meta", "/srv/archive", "/srv/xapian", "/run/cyrus/proc",
        "/run/cyrus/lock", "/var/spool/sieve", "/var/tmp/cyrus", "/run/cyrus/socket", "/run/cyrus/notify",
        "/run/cyrus/pts", "/run/cyrus", "/var/cache/cyrus", "/var/lib/cyrus-test/cache", "/run/cyrus/r1")]
    # each path carries the option and the line it comes from (for messages that point at it)
    lines = {key: n for n, key in enumerate((line.split(":")[0] for line in conf.path.read_text().splitlines()), 1)}
    for w in conf.writable_paths:
        assert w.where == (str(conf.path), lines[w.option]), w
    by_path = {w.path: w.option for w in conf.writable_paths}
    assert by_path[Path("/var/lib/cyrus-test/cache")] == "statuscache_db_path"
    assert by_path[Path("/run/cyrus/r1")] == "r1_sync_shutdown_file"


def test_writable_paths_defaults_when_nothing_is_set(tmp_path):
    conf = imapd(tmp_path, BASE)
    c = Path("/var/lib/cyrus-test")
    # Cyrus's own defaults: proc/lock/socket/pid under configdirectory, sievedir /usr/sieve.
    assert [w.path for w in conf.writable_paths] == [c, c / "proc", c / "lock", Path("/usr/sieve"), c / "socket"]
    # a default derived from configdirectory points at configdirectory's line
    assert {w.where for w in conf.writable_paths} == {conf.where("configdirectory")}
    assert [w.option for w in conf.writable_paths] == ["configdirectory", None, None, None, None]


@pytest.mark.parametrize("line", ["proc_path: run/proc", "lmtpsocket: socket/lmtp", "quota_db_path: quota.db",
                                  "sync_shutdown_file: shutdown", "archivepartition-a: archive"])
def test_relative_paths_are_refused_at_their_line(tmp_path, line):
    path = write(tmp_path / "imapd.conf", BASE + "sync_log: 1\n" + line + "\n")
    e = refusal(parse_imapd_conf, path)
    assert e.line == 3 and "must be an absolute path" in e.message


# --------------------------------------------------------------------------- cyrus.conf syntax

def test_cyrus_conf_syntax_master_accepts(tmp_path):
    conf = cyrus(tmp_path, "# top comment\n"
                           "Services {   # capital S is enough for master\n"
                           '  imap\tcmd="imapd -C /etc/a.conf"listen=143 prefork=2\r\n'
                           '\timaps cmd="imapd -s" listen="[::]:993" proto=tcp6 maxchild=-1 # trailing\n'
                           '  two  cmd="x"  listen="/run/a"  proto="udp"\n'
                           "}   # done\n"
                           "EVENTS{\n"
                           '  prune cmd="cyr_expire -E 3" at=0401\n'
                           '  prune cmd="cyr_expire -E 4" period=60\n'  # EVENTS may repeat a name
                           "}\n"
                           "START { }\n"
                           "DAEMON {\n  sc cmd=\"sync_client -nrepl1 -r -C/etc/b.conf\" wait=yes\n}\n")
    imap, imaps, two = conf.services
    assert imap.args == {"cmd": "imapd -C /etc/a.conf", "listen": "143", "prefork": "2"}
    assert (imap.config_path, imap.prefork, imap.maxchild) == (Path("/etc/a.conf"), 2, -1)
    assert (imaps.listen.host, imaps.listen.port, imaps.line) == ("::", "993", 4)
    assert two.stream is False  # proto=udp on a UNIX path: a datagram socket
    assert [e.args for e in conf.section("EVENTS")] == [{"cmd": "cyr_expire -E 3", "at": "0401"},
                                                        {"cmd": "cyr_expire -E 4", "period": "60"}]
    [sc] = conf.sync_clients
    assert (entry_channel(sc), sc.config_path, sc.wait) == ("repl1", Path("/etc/b.conf"), True)


def test_cmd_is_split_at_whitespace_without_shell_quoting(tmp_path):
    [e] = cyrus(tmp_path, "START {\n  x cmd=\"/usr/sbin/cyrus ctl_cyrusdb -C '/etc/a b.conf' \\\\n -r\"\n}\n").entries
    assert e.cmd == ["/usr/sbin/cyrus", "ctl_cyrusdb", "-C", "'/etc/a", "b.conf'", "\\\\n", "-r"]
    assert e.program == "ctl_cyrusdb" and e.config_path == Path("'/etc/a")


def test_entry_limits(tmp_path):
    many = " ".join(f"a{i}=1" for i in range(63))
    assert len(cyrus(tmp_path, f'START {{\n  x cmd="y" {many}\n}}\n').entries[0].args) == 64
    path = write(tmp_path / "many.conf", f'START {{\n  x cmd="y" {many} z=1\n}}\n')
    assert refusal(parse_cyrus_conf, path).line == 2
    long_line = write(tmp_path / "long.conf", f'START {{\n  x cmd="{"y" * 4100}"\n}}\n')
    e = refusal(parse_cyrus_conf, long_line)
    assert e.line == 2 and "longer than 4094 bytes" in e.message


@pytest.mark.parametrize("raw,kind,host,port,path", [
    ("imap", "tcp", None, "imap", None),
    ("143", "tcp", None, "143", None),
    ("127.0.0.1:11143", "tcp", "127.0.0.1", "11143", None),
    ("localhost:sieve", "tcp", "localhost", "sieve", None),
    ("[::1]:143", "tcp", "::1", "143", None),
    ("::1:143", "tcp", "::1", "143", None),  # master splits at the last ':'
    ("*:imap", "tcp", "*", "imap", None),
    ("/run/cyrus/socket/lmtp", "unix", None, None, Path("/run/cyrus/socket/lmtp")),
])
def test_listen_forms(raw, kind, host, port, path):
    li = parse_listen(raw)
    assert (li.kind, li.host, li.port, li.path, str(li)) == (kind, host, port, path, raw)


@pytest.mark.parametrize("raw", ["", "host:", ":143", "[::1]", "[::1]x", "[::1]:", "[::1", "socket/lmtp",
                                 "70000", "0", "127.0.0.1:65536", "im ap", "/" + "s" * 107])
def test_listen_refusals(raw):
    with pytest.raises(ValueError):
        parse_listen(raw)


@pytest.mark.parametrize("raw,address", [
    ("143", (socket.AF_INET, ("127.0.0.1", 143))),
    ("0.0.0.0:143", (socket.AF_INET, ("127.0.0.1", 143))),
    ("*:143", (socket.AF_INET, ("127.0.0.1", 143))),
    ("[::]:143", (socket.AF_INET6, ("::1", 143))),
    ("[fe80::1]:143", (socket.AF_INET6, ("fe80::1", 143))),
    ("192.0.2.7:143", (socket.AF_INET, ("192.0.2.7", 143))),
    ("/run/x.sock", (socket.AF_UNIX, "/run/x.sock")),
])
def test_connect_address(raw, address):
    assert parse_listen(raw).connect_address() == address


# --------------------------------------------------------------------------- broken files

# file -> (line, message start). Each names the line of the mistake and says what to do about it.
BROKEN_IMAPD = {
    "missing-colon.conf": (4, "invalid option name (expected 'name: value')"),
    "space-before-colon.conf": (2, "no space allowed between the option name 'sync_log' and ':'"),
    "equals-sign.conf": (4, "options are written 'name: value', not 'name = value'"),
    "empty-value.conf": (3, "option 'sync_host' has an empty value"),
    "duplicate-key.conf": (5, "option 'sync_host' is set twice (first on line 3)"),
    "switch-capital.conf": (3, "'sync_log' is not a boolean: 'Yes'"),
    "unknown-directive.conf": (2, "invalid directive '@import'"),
    "relative-include.conf": (2, "@include 'sync.conf' must be an absolute path"),
    "include-missing.conf": (3, "cannot read /nonexistent/cyrushelper/sync.conf"),
    "continuation-at-eof.conf": (3, "the last line ends with '\\'"),
    "no-configdirectory.conf": (None, "configdirectory is not set"),
    "bad-channel-name.conf": (3, "bad channel name 'repl/1' in sync_log_channels"),
    "partition-configdirectory.conf": (2, "partition-default must be an absolute path"),
    "bad-integer.conf": (2, "'sync_batchsize' is not an integer: '1_000'"),
    "octal-integer.conf": (2, "'sync_batchsize' is not an integer: '08'"),
    "non-ascii-key.conf": (2, "invalid option name"),
    "channel-port.conf": (5, "repl1_sync_port is neither a port number nor a service name"),
    "defaultpartition-unset.conf": (2, "defaultpartition is 'main' but partition-main is not set"),
    "continued-key.conf": (3, "no space allowed between the option name 'sync_log' and ':'"),
    "channel-shutdown-configdirectory.conf": (4, "Cyrus does not expand {configdirectory} in per-channel"),
}
BROKEN_CYRUS = {
    "brace-on-next-line.conf": (5, "put '{' on the same line as SERVICES: master silently ignores"),
    "lowercase-section.conf": (1, "section 'services' must start with a capital 'S'"),
    "brace-after-entry.conf": (3, "put the '}' closing the section on a line of its own"),
    "hash-in-quotes.conf": (3, "missing closing '\"' in entry 'pop3' ('#' starts a comment even inside quotes)"),
    "entry-over-two-lines.conf": (3, "'listen=' is an argument with no entry name before it: master reads "
                                     "one entry per line"),
    "backslash-continuation.conf": (2, "'\\' at the end of entry 'imap': master reads one entry per line"),
    "underscore-name.conf": (3, "bad character '_' in entry name 'imap_'"),
    "duplicate-service.conf": (5, "entry 'imap' is defined twice (first on line 2)"),
    "service-without-listen.conf": (2, "service 'imap' has no listen="),
    "unknown-section.conf": (4, "unknown section 'SHUTDOWN'"),
    "second-section.conf": (7, "second SERVICES section (the first is on line 1): master reads only the first"),
    "unclosed-section.conf": (4, "section SERVICES is never closed"),
    "relative-unix-socket.conf": (2, "listen='socket/lmtp': a UNIX socket path must be absolute"),
    "port-missing.conf": (2, "bad listen address '127.0.0.1:'"),
    "unquoted-command.conf": (2, "bad character '-' in an argument of entry 'imap'"),
    "text-after-close.conf": (3, "text after '}' closing START: master ignores it"),
    "unbalanced-brace.conf": (2, "unbalanced '{' or '}' in an entry"),
    "prefork-not-number.conf": (2, "prefork='five' in entry 'imap' is not a number"),
    "bad-proto.conf": (2, "proto='sctp' in service 'imap'"),
    "babysit-not-switch.conf": (2, "babysit='maybe' in entry 'imap' is not y/n"),
    "entry-on-header-line.conf": (1, "entries must start on the line after 'SERVICES {'"),
    "event-bad-at.conf": (3, "at='2561' in entry 'expire' is not a time HHMM"),
    "ipv6-without-port.conf": (2, "bad IPv6 listen address '[::1]'"),
    "no-cmd.conf": (2, "entry 'idled' in DAEMON has no cmd="),
}


def test_every_broken_file_is_in_a_table():
    assert sorted(p.name for p in (BROKEN / "imapd").iterdir()) == sorted(BROKEN_IMAPD)
    assert sorted(p.name for p in (BROKEN / "cyrus").iterdir()) == sorted(BROKEN_CYRUS)


def check_refusal(e: ConfigError, path: Path, line: int | None, start: str) -> None:
    assert (e.path, e.line) == (str(path), line), str(e)
    assert e.message.startswith(start), e.message
    assert str(e) == (f"{path}:{line}: " if line else f"{path}: ") + e.message
    assert "\n" not in str(e)
    if line is not None:
        assert 1 <= line <= len(path.read_text().split("\n"))


@pytest.mark.parametrize("name", sorted(BROKEN_IMAPD))
def test_broken_imapd_conf(name):
    path = BROKEN / "imapd" / name
    line, start = BROKEN_IMAPD[name]
    check_refusal(refusal(parse_imapd_conf, path), path, line, start)


@pytest.mark.parametrize("name", sorted(BROKEN_CYRUS))
def test_broken_cyrus_conf(name):
    path = BROKEN / "cyrus" / name
    line, start = BROKEN_CYRUS[name]
    check_refusal(refusal(parse_cyrus_conf, path), path, line, start)


@pytest.mark.parametrize("subcommand", ["generate", "status", "drain", "stop"])
def test_cli_refuses_broken_config_with_exit_78_and_writes_nothing(tmp_path, subcommand):
    out = tmp_path / "out"
    broken = BROKEN / "cyrus" / "brace-on-next-line.conf"
    args = [sys.executable, "-m", "cyrushelper", subcommand, "--imapd-conf", str(DEBIAN / "imapd.conf"),
            "--cyrus-conf", str(broken)]
    if subcommand == "generate":
        args += ["--output", str(out)]
    before = sorted(tmp_path.rglob("*"))
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID")})
    if "not implemented yet" in r.stderr:
        pytest.skip(f"{subcommand} not implemented yet")
    assert r.returncode == exitcodes.CONFIG, r.stderr
    lines = [li for li in r.stderr.splitlines() if li.strip()]
    assert len(lines) == 1 and f"{broken}:5: put '{{' on the same line as SERVICES" in lines[0], r.stderr
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the output directory


# --------------------------------------------------------------------------- Cyrus's own verdict

def cyr_info(*args: str) -> subprocess.CompletedProcess:
    if not CYR_INFO.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CYR_INFO} missing: CI must have Cyrus installed")
        pytest.skip(f"{CYR_INFO} missing (package cyrus-common)")
    return subprocess.run([str(CYR_INFO), *args], capture_output=True, text=True, timeout=30, cwd="/")


# Broken imapd.conf files Cyrus itself refuses (exit 78); the others it accepts and misreads silently.
CYRUS_REFUSES_IMAPD = {"missing-colon.conf", "space-before-colon.conf", "equals-sign.conf", "empty-value.conf",
                       "duplicate-key.conf", "switch-capital.conf", "unknown-directive.conf",
                       "relative-include.conf", "include-missing.conf", "no-configdirectory.conf",
                       "bad-integer.conf", "octal-integer.conf", "non-ascii-key.conf", "continued-key.conf"}


@pytest.mark.system
@pytest.mark.parametrize("path", [DEBIAN / "imapd.conf", FEDORA / "imapd.conf", LAB / "primary-imapd.conf",
                                  LAB / "replica-imapd.conf"] + sorted((BROKEN / "imapd").iterdir()),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cyrus_agrees_on_imapd_conf(path):
    """Every file Cyrus refuses we refuse; the rest Cyrus takes (our refusal is about a silent misreading)."""
    r = cyr_info("-C", str(path), "conf")
    cyrus_refuses = path.name in CYRUS_REFUSES_IMAPD and path.parent.name == "imapd"
    assert r.returncode == (exitcodes.CONFIG if cyrus_refuses else 0), r.stderr
    try:
        parse_imapd_conf(path)
        we_refuse = False
    except ConfigError:
        we_refuse = True
    assert we_refuse == (path.parent.parent == BROKEN)


def master_services(cyrus_conf: Path, candidates: set[str], tmp_path: Path) -> set[str]:
    """The SERVICES names Cyrus's own masterconf.c reads from `cyrus_conf`: `cyr_info conf-lint`
    reports `<name>_allowplaintext` as unknown exactly when <name> is not a service it read."""
    probe = write(tmp_path / "probe-imapd.conf", "configdirectory: /nonexistent/cyrushelper\n"
                  + "".join(f"{n}_allowplaintext: yes\n" for n in sorted(candidates)))
    r = cyr_info("-C", str(probe), "-M", str(cyrus_conf), "conf-lint")
    assert r.returncode == 0, r.stderr
    unknown = {line.split("_allowplaintext:")[0] for line in r.stdout.splitlines()}
    return candidates - unknown


@pytest.mark.system
@pytest.mark.parametrize("path", [DEBIAN / "cyrus.conf", FEDORA / "cyrus.conf", LAB / "primary-cyrus.conf",
                                  LAB / "primary-cyrus-rolling.conf", LAB / "replica-cyrus.conf"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_master_reads_the_same_services_as_we_do(path, tmp_path):
    ours = {e.name for e in parse_cyrus_conf(path).services}
    assert master_services(path, ours | {"recover", "nonexistent"}, tmp_path) == ours


# The services each silently misread file means to define; master reads fewer of them.
MASTER_MISREADS = {
    "brace-on-next-line.conf": {"imap"},
    "lowercase-section.conf": {"imap"},
    "second-section.conf": {"imap", "lmtp"},
    "text-after-close.conf": {"imap"},
    "unbalanced-brace.conf": {"imap"},
    "entry-on-header-line.conf": {"imap", "pop3"},
}
# Syntax master itself refuses (exit 78) while reading SERVICES.
MASTER_REFUSES = ["brace-after-entry.conf", "hash-in-quotes.conf", "entry-over-two-lines.conf",
                  "backslash-continuation.conf", "underscore-name.conf", "unquoted-command.conf"]


@pytest.mark.system
@pytest.mark.parametrize("name", sorted(MASTER_MISREADS))
def test_master_silently_misreads_what_we_refuse(name, tmp_path):
    intended = MASTER_MISREADS[name]
    assert master_services(BROKEN / "cyrus" / name, intended, tmp_path) < intended


@pytest.mark.system
@pytest.mark.parametrize("name", MASTER_REFUSES)
def test_master_refuses_what_we_refuse(name, tmp_path):
    probe = write(tmp_path / "probe-imapd.conf", "configdirectory: /nonexistent/cyrushelper\n")
    r = cyr_info("-C", str(probe), "-M", str(BROKEN / "cyrus" / name), "conf-lint")
    line = BROKEN_CYRUS[name][0]
    assert r.returncode == exitcodes.CONFIG and f"line {line}" in r.stderr, r.stderr


def test_tables_cover_the_system_checks():
    assert CYRUS_REFUSES_IMAPD <= set(BROKEN_IMAPD)
    assert set(MASTER_MISREADS) | set(MASTER_REFUSES) <= set(BROKEN_CYRUS)

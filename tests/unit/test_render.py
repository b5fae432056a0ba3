"""`cyrushelper generate`: rendering, the shared-file contract, safe writes, lint and hardening."""

from __future__ import annotations

import os
import re
import shutil
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cyrushelper import atomic, cli, config, exitcodes, listeners, render
from cyrushelper.config import Instance

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "tests" / "data" / "debian"
UNITS = ROOT / "units"
# verify insists every Exec*= binary exists: render with one that does for the lint tests (not the
# dev venv's cyrushelper: a checkout under /tmp is hidden from units, and generate refuses it)
EXISTING_HELPER = shutil.which("true") or "/bin/true"
DEBIAN_ARGS = ["--imapd-conf", str(DEBIAN / "imapd.conf"), "--cyrus-conf", str(DEBIAN / "cyrus.conf"),
               "--unit-imapd-conf", "/etc/imapd.conf", "--unit-cyrus-conf", "/etc/cyrus.conf",
               "--instance", "default"]
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


def generate(*args: str) -> int:
    return cli.main(["generate", *args])


def make_instance(tmp_path: Path, name: str, port: int, extra: str = "", cyrus_extra: str = "") -> tuple[Path, Path]:
    base = tmp_path / name
    (base / "conf").mkdir(parents=True)
    imapd = base / "imapd.conf"
    imapd.write_text(f"configdirectory: {base}/conf\npartition-default: {base}/spool\n"
                     f"proc_path: /run/cyrus-{name}/proc\nlmtpsocket: /run/cyrus-{name}/socket/lmtp\n"
                     f"sync_log: yes\nsync_host: replica.example\n{extra}")
    cyrus = base / "cyrus.conf"
    cyrus.write_text("SERVICES {\n"
                     f'  imap cmd="imapd -C {imapd}" listen="127.0.0.1:{port}"\n'
                     f'  lmtpunix cmd="lmtpd -C {imapd}" listen="/run/cyrus-{name}/socket/lmtp"\n'
                     f"{cyrus_extra}}}\n")
    return imapd, cyrus


def tree(directory: Path) -> dict[str, str]:
    """relative path -> content (files) or '-> target' (symlinks), README excluded."""
    result = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if rel == "README.md":
            continue
        if path.is_symlink():
            result[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            result[rel] = path.read_text()
    return result


def verify(*unit_files: Path) -> str:
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", *map(str, unit_files)],
                         capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr).strip() + ("" if out.returncode == 0 else f"\n(rc={out.returncode})")


# --------------------------------------------------------------------------- rendering

def test_debian_rendering_has_the_four_outputs_and_valid_checksums(tmp_path):
    assert generate(*DEBIAN_ARGS, "--helper", "/usr/bin/cyrushelper", "--output", str(tmp_path)) == 0
    files = tree(tmp_path)
    assert set(files) == {"cyrus@.service", "cyrus.service", "cyrus@default.service.d/cyrushelper.conf",
                          "cyrus.service.wants/cyrus@default.service"}
    assert files["cyrus.service.wants/cyrus@default.service"] == "-> ../cyrus@.service"
    for rel in ("cyrus@.service", "cyrus.service", "cyrus@default.service.d/cyrushelper.conf"):
        recorded, body = render.split_header(files[rel])
        assert recorded == render.hashlib.sha256(body.encode()).hexdigest(), rel
    unit = files["cyrus@.service"]
    for line in ("Type=notify", "NotifyAccess=exec", "KillMode=mixed", "PartOf=cyrus.service",
                 "ProtectSystem=strict", "WantedBy=cyrus.service",
                 "ExecStart=/usr/bin/cyrushelper run --instance %i --imapd-conf ${CYRUS_IMAPD_CONF} "
                 "--cyrus-conf ${CYRUS_CONF}",
                 "ExecStopPost=/usr/bin/cyrushelper drain --from-systemd --instance %i"):
        assert line in unit
    assert "User=" not in unit.replace("# User=", "")  # root on purpose (see the unit's comment)


def test_debian_dropin_lists_the_paths_the_config_writes(tmp_path):
    generate(*DEBIAN_ARGS, "--helper", "/usr/bin/cyrushelper", "--output", str(tmp_path))
    dropin = (tmp_path / "cyrus@default.service.d/cyrushelper.conf").read_text()
    rw = re.findall(r"^ReadWritePaths=(.*)$", dropin, re.M)
    # configdirectory is required (no '-'); the rest optional; UNIX socket dirs from cyrus.conf too
    assert rw[0] == "/var/lib/cyrus"
    assert set(rw) == {"/var/lib/cyrus", "-/var/spool/cyrus/mail", "-/var/spool/cyrus/news",
                       "-/run/cyrus/proc", "-/run/cyrus/lock", "-/var/spool/sieve", "-/run/cyrus/socket"}
    assert "Environment=CYRUS_IMAPD_CONF=/etc/imapd.conf" in dropin
    assert "Environment=CYRUS_CONF=/etc/cyrus.conf" in dropin
    assert "ExecStartPre=+/bin/mkdir -p /run/cyrus/proc /run/cyrus/lock /run/cyrus/socket" in dropin
    assert "ExecStartPre=+/bin/chown cyrus: /run/cyrus/proc /run/cyrus/lock /run/cyrus/socket" in dropin
    assert "Conflicts=cyrus-imapd.service" in dropin  # same /etc/imapd.conf as Debian's own unit


def test_two_instances_share_identical_common_files(tmp_path):
    a = make_instance(tmp_path, "alpha", 11143)
    b = make_instance(tmp_path, "beta", 11243, extra="cyrus_user: imap\n")
    out_a, out_b = tmp_path / "out-a", tmp_path / "out-b"
    for (imapd, cyrus), name, out in ((a, "alpha", out_a), (b, "beta", out_b)):
        assert generate("-C", str(imapd), "-M", str(cyrus), "--instance", name,
                        "--helper", "/usr/bin/cyrushelper", "--output", str(out)) == 0
    ta, tb = tree(out_a), tree(out_b)
    common = set(ta) & set(tb)
    assert common == {"cyrus@.service", "cyrus.service"}
    for rel in common:
        assert ta[rel] == tb[rel], rel
    assert "/run/cyrus-alpha/socket" in ta["cyrus@alpha.service.d/cyrushelper.conf"]
    assert "/bin/chown imap: " in tb["cyrus@beta.service.d/cyrushelper.conf"]
    assert "Conflicts=" not in ta["cyrus@alpha.service.d/cyrushelper.conf"]
    # installing one output on top of the other conflicts with nothing: generate agrees
    assert generate("-C", str(b[0]), "-M", str(b[1]), "--instance", "beta",
                    "--helper", "/usr/bin/cyrushelper", "--output", str(out_a)) == 0


def test_replica_instance_orders_the_stop(tmp_path):
    imapd, cyrus = make_instance(tmp_path, "primary", 11143)
    generate("-C", str(imapd), "-M", str(cyrus), "--instance", "primary", "--replica-instance", "replica",
             "--helper", "/usr/bin/cyrushelper", "--output", str(tmp_path / "out"))
    dropin = (tmp_path / "out/cyrus@primary.service.d/cyrushelper.conf").read_text()
    assert "After=cyrus@replica.service" in dropin.splitlines()
    assert generate("-C", str(imapd), "-M", str(cyrus), "--instance", "primary", "--replica-instance",
                    "primary", "--output", str(tmp_path / "out2")) == exitcodes.CONFIG


def _running_as(monkeypatch, **attrs) -> None:
    """Pretend the process was started as `attrs` describe its __main__ module."""
    main = types.ModuleType("__main__")
    main.__spec__ = None
    for key, value in attrs.items():
        setattr(main, key, value)
    monkeypatch.setitem(sys.modules, "__main__", main)


def test_default_helper_is_the_console_script_that_runs(monkeypatch):
    # V/bin/cyrushelper run by path, V/bin not on PATH: the script itself, made absolute
    _running_as(monkeypatch, __file__="opt/v/bin/cyrushelper", main=cli.main)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert render.default_helper() == os.path.abspath("opt/v/bin/cyrushelper")


def test_default_helper_is_python_dash_m_when_run_as_a_module(monkeypatch):
    spec = importlib.util.find_spec("cyrushelper.__main__")
    _running_as(monkeypatch, __spec__=spec, __file__=spec.origin)
    # a venv's python is a symlink to the base interpreter: only its own path runs the venv
    monkeypatch.setattr(sys, "executable", "/opt/v/bin/python")
    assert render.default_helper() == "/opt/v/bin/python -m cyrushelper"


def test_without_a_running_program_generate_asks_for_helper(tmp_path, monkeypatch, capsys):
    _running_as(monkeypatch, __file__="/usr/bin/something-else", main=lambda: 0)
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    assert generate("-C", str(imapd), "-M", str(cyrus), "--output", str(tmp_path / "out")) == exitcodes.CONFIG
    assert "--helper" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_python_dash_m_helper_lands_in_every_exec_line(tmp_path, monkeypatch):
    _running_as(monkeypatch, __spec__=importlib.util.find_spec("cyrushelper.__main__"))
    monkeypatch.setattr(sys, "executable", "/opt/v/bin/python")
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    assert generate("-C", str(imapd), "-M", str(cyrus), "--instance", "x", "--output", str(tmp_path / "out")) == 0
    unit = (tmp_path / "out" / "cyrus@.service").read_text()
    for verb in ("run", "drain"):
        assert re.search(rf"^Exec\w+=/opt/v/bin/python -m cyrushelper {verb} ", unit, re.M), verb
    # the fence is run's, at SIGTERM: no ExecStop, and the stop's options reach run
    assert not re.search(r"^ExecStop=", unit, re.M)
    assert re.search(r"^ExecStart=.* run .*\$CYRUSHELPER_RUN_OPTS \$CYRUSHELPER_STOP_OPTS$", unit, re.M)


@pytest.mark.parametrize("helper", ["/tmp/v/bin/cyrushelper", "/var/tmp/v/bin/cyrushelper",
                                    "/root/v/bin/cyrushelper", "/home/op/v/bin/cyrushelper"])
def test_helper_hidden_by_the_sandbox_is_refused(tmp_path, capsys, helper):
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    assert generate("-C", str(imapd), "-M", str(cyrus), "--helper", helper,
                    "--output", str(tmp_path / "out")) == exitcodes.CONFIG
    assert "hides" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_helper_whose_interpreter_is_hidden_is_refused(tmp_path, capsys):
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    script = tmp_path / "cyrushelper"
    script.write_text("#!/root/.pyenv/versions/3.11.7/bin/python\nfrom cyrushelper.cli import main\n")
    with pytest.MonkeyPatch.context() as mp:   # a checkout under /tmp: pretend the script is elsewhere
        mp.setattr(render, "_PRIVATE_TMP_ROOTS", ())
        assert generate("-C", str(imapd), "-M", str(cyrus), "--helper", str(script),
                        "--output", str(tmp_path / "out")) == exitcodes.CONFIG
    assert "/root/.pyenv/versions/3.11.7/bin/python" in capsys.readouterr().err


def test_home_helper_allowed_when_the_unit_may_see_home(tmp_path):
    imapd, cyrus = make_instance(tmp_path, "x", 11143, extra="sieveusehomedir: yes\n")
    assert generate("-C", str(imapd), "-M", str(cyrus), "--helper", "/home/op/v/bin/cyrushelper",
                    "--output", str(tmp_path / "out")) == 0


# --------------------------------------------------------------------------- errors, nothing written

@pytest.mark.parametrize("extra, where", [
    ("sync_batchsize: many\n", "imapd.conf:7"),               # Cyrus refuses the value
    ("partition-other: /srv/mail spool\n", "imapd.conf:7"),   # systemd would split it
    ("sievedir: relative/dir\n", "imapd.conf:7"),             # the unit runs in /
])
def test_config_error_exits_78_with_file_line_and_writes_nothing(tmp_path, capsys, extra, where):
    imapd, cyrus = make_instance(tmp_path, "x", 11143, extra=extra)
    out = tmp_path / "out"
    assert generate("-C", str(imapd), "-M", str(cyrus), "--output", str(out)) == exitcodes.CONFIG
    assert not out.exists()
    assert where in capsys.readouterr().err


def test_bad_instance_name_and_relative_helper_are_refused(tmp_path):
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    for args in (["--instance", "a b"], ["--instance", "../x"], ["--helper", "bin/cyrushelper"],
                 ["--helper", "/usr/bin/python3 -m cyrushelper"]):
        assert generate("-C", str(imapd), "-M", str(cyrus), *args,
                        "--output", str(tmp_path / "out")) == exitcodes.CONFIG
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- overwriting

def test_rerender_replaces_our_files_but_refuses_hand_edits(tmp_path, capsys):
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    out = tmp_path / "out"
    base = ["-C", str(imapd), "-M", str(cyrus), "--instance", "x", "--output", str(out)]
    assert generate(*base, "--helper", "/usr/bin/cyrushelper") == 0
    assert generate(*base, "--helper", "/usr/bin/cyrushelper") == 0
    assert "up to date" in capsys.readouterr().out
    # an unchanged generated file is ours to replace: a new helper path goes everywhere
    assert generate(*base, "--helper", "/opt/bin/cyrushelper") == 0
    unit = out / "cyrus@.service"
    assert "ExecStart=/opt/bin/cyrushelper run" in unit.read_text()
    # the admin edits the unit: refused, and nothing else is written either
    edited = unit.read_text().replace("TimeoutStopSec=90s", "TimeoutStopSec=10min")
    unit.write_text(edited)
    before = tree(out)
    assert generate(*base, "--replica-instance", "r", "--helper", "/usr/bin/cyrushelper") == exitcodes.FAILURE
    err = capsys.readouterr().err
    assert "cyrus@.service" in err and "edited by hand" in err and "--force" in err
    assert tree(out) == before
    assert generate(*base, "--helper", "/usr/bin/cyrushelper", "--force") == 0
    assert "TimeoutStopSec=90s" in unit.read_text()


def test_foreign_files_and_links_are_refused(tmp_path, capsys):
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    out = tmp_path / "out"
    (out / "cyrus.service.wants").mkdir(parents=True)
    (out / "cyrus.service").write_text("[Service]\nExecStart=/bin/true\n")  # no checksum header
    os.symlink("/elsewhere", out / "cyrus.service.wants/cyrus@x.service")
    base = ["-C", str(imapd), "-M", str(cyrus), "--instance", "x", "--output", str(out), "--helper", "/h"]
    assert generate(*base) == exitcodes.FAILURE
    err = capsys.readouterr().err
    assert "not generated by cyrushelper" in err and "symlink to '/elsewhere'" in err
    assert not (out / "cyrus@.service").exists()  # all or nothing
    assert generate(*base, "--force") == 0
    assert os.readlink(out / "cyrus.service.wants/cyrus@x.service") == "../cyrus@.service"


def test_write_atomic_failure_leaves_old_file_and_no_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "unit.service"
    atomic.write_atomic(target, "old\n")
    assert oct(target.stat().st_mode & 0o777) == "0o644"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic.write_atomic(target, "new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["unit.service"]


def test_symlink_atomic_replaces_a_link(tmp_path):
    link = tmp_path / "l"
    atomic.symlink_atomic("a", link)
    atomic.symlink_atomic("b", link)
    assert os.readlink(link) == "b" and os.listdir(tmp_path) == ["l"]


# --------------------------------------------------------------------------- units/ drift

def test_units_dir_is_the_current_debian_rendering(tmp_path):
    assert generate(*DEBIAN_ARGS, "--helper", "/usr/bin/cyrushelper", "--output", str(tmp_path)) == 0
    fresh, committed = tree(tmp_path), tree(UNITS)
    assert fresh == committed, ("units/ drifted from templates/: refresh it with the command in "
                                "units/README.md")


# --------------------------------------------------------------------------- lint and hardening

@needs_analyze
def test_verify_prints_nothing_for_the_rendered_units(tmp_path):
    generate(*DEBIAN_ARGS, "--helper", EXISTING_HELPER, "--output", str(tmp_path))
    imapd, cyrus = make_instance(tmp_path, "replica", 11243)
    generate("-C", str(imapd), "-M", str(cyrus), "--instance", "replica", "--helper", EXISTING_HELPER,
             "--output", str(tmp_path))
    generate(*DEBIAN_ARGS, "--replica-instance", "replica", "--helper", EXISTING_HELPER,
             "--output", str(tmp_path), "--force")
    assert verify(tmp_path / "cyrus@default.service", tmp_path / "cyrus@replica.service",
                  tmp_path / "cyrus.service") == ""


@needs_analyze
def test_verify_catches_a_bad_directive_in_the_dropin(tmp_path):
    # guards the lint above: verify must read our drop-in and complain about it
    generate(*DEBIAN_ARGS, "--helper", EXISTING_HELPER, "--output", str(tmp_path))
    with open(tmp_path / "cyrus@default.service.d/cyrushelper.conf", "a") as f:
        f.write("KillMode=sometimes\n")
    assert "kill mode" in verify(tmp_path / "cyrus@default.service")


# The exposure the shipped unit reaches, pinned so that any loss of hardening shows. Measured with
# `cd units && systemd-analyze security --offline=true cyrus@default.service` under systemd 252.38
# (Debian 12) and 257.13 (Debian 13, in the test bed's trixie root: chroot ROOT systemd-analyze …).
# When you harden the unit further, or systemd's scoring changes (another version: take its figure
# and say which in this comment), put the new figure here.
PINNED_EXPOSURE = {252: 2.9, 257: 2.9}


def systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, timeout=30)
    return int(re.match(r"systemd (\d+)", out.stdout).group(1))


@needs_analyze
def test_instance_unit_exposure_is_pinned(tmp_path):
    unit = UNITS / "cyrus@default.service"  # with its drop-in: analyze reads cyrus@default.service.d/
    # --threshold counts tenths in systemd 252 (exposure 4.0 = 40; "4.0" is refused)
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=40", str(unit)],
                         capture_output=True, text=True, timeout=60, cwd=UNITS)
    m = re.search(r"Overall exposure level for cyrus@default.service: (\d+\.\d+)", out.stdout)
    assert m, out.stdout + out.stderr
    assert out.returncode == 0, out.stdout
    version = systemd_version()
    assert version in PINNED_EXPOSURE, f"no exposure pinned for systemd {version}: measured {m.group(1)}"
    assert float(m.group(1)) == PINNED_EXPOSURE[version], out.stdout


@pytest.mark.system
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root + unshare")
def test_verify_the_committed_units_against_an_installed_helper(tmp_path):
    """units/ itself names /usr/bin/cyrushelper: lint it in an overlay of / where that exists."""
    script = f"""
set -e
L={tmp_path}/ov; mkdir -p $L; mount -t tmpfs tmpfs $L; mkdir $L/u $L/w $L/m
mount -t overlay overlay -o lowerdir=/,upperdir=$L/u,workdir=$L/w $L/m
touch $L/m/usr/bin/cyrushelper && mount --bind {EXISTING_HELPER} $L/m/usr/bin/cyrushelper
cd {UNITS}
systemd-analyze verify --man=no --generators=no --root=$L/m ./cyrus@default.service ./cyrus.service 2>&1
"""
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out


# --------------------------------------------------------------------------- socket mode

@pytest.fixture
def cyrus_bindir(fake_cyrus_bindir) -> Path:
    return fake_cyrus_bindir


def socket_units(directory: Path) -> list[Path]:
    """Every unit of an output to lint: the instance, the parts, one instance of each template."""
    units = [directory / "cyrus.service"]
    units += sorted(p for p in directory.glob("cyrus@*.service"))
    for path in sorted(directory.glob("cyrus-*")):
        units.append(path.with_name(path.name.replace("@.", "@1.")) if "@." in path.name else path)
    return units


def test_socket_mode_debian_rendering(tmp_path, cyrus_bindir):
    out = tmp_path / "out"
    assert generate(*DEBIAN_ARGS, "--listeners", "systemd", "--helper", "/usr/bin/cyrushelper",
                    "--output", str(out)) == 0
    files = tree(out)
    services = ("imap", "pop3", "nntp", "http", "lmtpunix", *sieve_sockets(), "notify")
    events = ("checkpoint", "delprune", "tlsprune", "deleteprune", "expungeprune")
    assert set(files) == {"cyrus@.service", "cyrus.service", "cyrus@default.service.d/cyrushelper.conf",
                          "cyrus.service.wants/cyrus@default.service", "cyrus-default-start.service",
                          *(f"cyrus-default-{s}.socket" for s in services),
                          *(f"cyrus-default-{s}@.service" for s in services),
                          *(f"cyrus-default-event-{e}.{k}" for e in events for k in ("service", "timer"))}
    for rel, text in files.items():
        if not text.startswith("-> "):
            recorded, body = render.split_header(text)
            assert recorded == render.hashlib.sha256(body.encode()).hexdigest(), rel
    # the shared files are the same as in master mode: modes mix on one host
    assert generate(*DEBIAN_ARGS, "--helper", "/usr/bin/cyrushelper", "--output", str(tmp_path / "m")) == 0
    master = tree(tmp_path / "m")
    for rel in ("cyrus@.service", "cyrus.service"):
        assert files[rel] == master[rel], rel
    dropin = files["cyrus@default.service.d/cyrushelper.conf"]
    assert "ExecStart=\nExecStart=/usr/bin/cyrushelper run --listeners systemd --instance %i" in dropin
    assert "--workers imap=100 " in dropin and "--workers notify=1 " in dropin
    assert re.search(r"^ExecStart=.* run --listeners systemd .*\$CYRUSHELPER_RUN_OPTS \$CYRUSHELPER_STOP_OPTS$",
                     dropin, re.M)
    assert "Requires=cyrus-default-lmtpunix.socket" in dropin.splitlines()
    worker = files["cyrus-default-lmtpunix@.service"]
    assert (f"ExecStart=/usr/bin/cyrushelper worker --service lmtpunix --id 0 --status "
            f"/var/lib/cyrus/cyrushelper/workers/lmtpunix@%i -- {cyrus_bindir}/lmtpd") in worker
    for line in ("Sockets=cyrus-default-lmtpunix.socket", "PartOf=cyrus@default.service", "Restart=always",
                 "SuccessExitStatus=75", "KillSignal=SIGHUP", "StartLimitIntervalSec=0", "User=cyrus",
                 "CapabilityBoundingSet="):
        assert line in worker.splitlines(), line
    socket = files["cyrus-default-lmtpunix.socket"]
    assert "ListenStream=/run/cyrus/socket/lmtp" in socket and "SocketMode=0777" in socket
    assert "PartOf=" not in socket.replace("# Deliberately not PartOf=", "")
    assert "ListenDatagram=/run/cyrus/socket/notify" in files["cyrus-default-notify.socket"]
    start = files["cyrus-default-start.service"]
    assert f"ExecStart={cyrus_bindir}/cyr_expire -E 3" in start  # /usr/sbin/cyrus expire
    assert "ExecStartPre=+/bin/rm -f /var/lib/cyrus/msg/shutdown" in start
    assert "OnCalendar=*-*-* 04:30:00" in files["cyrus-default-event-deleteprune.timer"]


def sieve_sockets() -> list[str]:
    """Debian's `sieve listen="localhost:sieve"`: one socket per address this machine resolves
    localhost to, as master binds them (Debian 12's container: 127.0.0.1; Debian 13's: ::1 too)."""
    entry = next(e for e in config.parse_cyrus_conf(DEBIAN / "cyrus.conf").services if e.name == "sieve")
    count = len(listeners._hosts(entry, "localhost"))
    return ["sieve", *(f"sieve-{n}" for n in range(2, count + 1))]


@needs_analyze
def test_socket_mode_units_verify_silently_and_expose_little(tmp_path, cyrus_bindir):
    assert generate(*DEBIAN_ARGS, "--listeners", "systemd", "--helper", EXISTING_HELPER,
                    "--output", str(tmp_path)) == 0
    units = socket_units(tmp_path)
    assert len(units) == 25 + 2 * len(sieve_sockets())
    assert verify(*units) == ""
    for unit in (tmp_path / "cyrus@default.service", tmp_path / "cyrus-default-imap@1.service",
                 tmp_path / "cyrus-default-start.service", tmp_path / "cyrus-default-event-delprune.service"):
        out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=30", unit.name],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
        assert m and float(m.group(1)) <= 3.0 and out.returncode == 0, out.stdout[-2000:]


@needs_analyze
def test_socket_mode_verify_catches_a_bad_directive(tmp_path, cyrus_bindir):
    # guards the lint above: verify must read the parts too and complain about them
    generate(*DEBIAN_ARGS, "--listeners", "systemd", "--helper", EXISTING_HELPER, "--output", str(tmp_path))
    with open(tmp_path / "cyrus-default-imap.socket", "a") as f:
        f.write("Backlog=lots\n")
    assert "lots" in verify(*socket_units(tmp_path))


def test_socket_mode_refusals_write_nothing(tmp_path, cyrus_bindir, capsys):
    (cyrus_bindir / "pop3d").unlink()
    out = tmp_path / "out"
    assert generate(*DEBIAN_ARGS, "--listeners", "systemd", "--output", str(out),
                    "--helper", "/usr/bin/cyrushelper") == exitcodes.CONFIG
    assert "tests/data/debian/cyrus.conf:33: SERVICES entry 'pop3'" in capsys.readouterr().err
    assert not out.exists()
    assert generate(*DEBIAN_ARGS, "--workers", "imap=3", "--output", str(out),
                    "--helper", "/usr/bin/cyrushelper") == exitcodes.CONFIG
    assert "--listeners systemd" in capsys.readouterr().err
    assert not out.exists()


def test_socket_mode_workers_start_the_wrapper_by_module_when_the_helper_is_python(tmp_path):
    script = tmp_path / "cyrushelper"
    script.write_text("#!/opt/ch/bin/python3\nfrom cyrushelper.cli import main\n")
    assert render.worker_command(str(script)) == "/opt/ch/bin/python3 -I -m cyrushelper.worker"
    assert render.worker_command("/usr/bin/python3 -m cyrushelper") == "/usr/bin/python3 -I -m cyrushelper.worker"
    # not a Python script (or unreadable): the worker subcommand of the helper itself
    assert render.worker_command("/usr/bin/cyrushelper-not-there") == "/usr/bin/cyrushelper-not-there worker"
    script.write_text("#!/usr/bin/env python3\n")
    assert render.worker_command(str(script)) == f"{script} worker"


def test_socket_mode_workers_override_reaches_units_and_run(tmp_path, cyrus_bindir):
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    assert generate("-C", str(imapd), "-M", str(cyrus), "--instance", "x", "--listeners", "systemd",
                    "--workers", "imap=3", "--helper", "/usr/bin/cyrushelper", "--output", str(tmp_path / "o")) == 0
    dropin = (tmp_path / "o/cyrus@x.service.d/cyrushelper.conf").read_text()
    wants = [line for line in dropin.splitlines() if line.startswith("Wants=cyrus-x-imap@")]
    assert wants == ["Wants=cyrus-x-imap@1.service cyrus-x-imap@2.service cyrus-x-imap@3.service"]
    assert "--workers imap=3 --workers lmtpunix=10 " in dropin  # lmtpunix: maxchild unset
def test_missing_template_package_is_a_clear_config_error(monkeypatch):
    def not_installed(name):
        raise ModuleNotFoundError(name)
    monkeypatch.setattr(render.resources, "files", not_installed)
    with pytest.raises(render.ConfigError, match="not installed"):
        render.load_templates()


# --------------------------------------------------------------------------- issue 10: all or nothing

def _base(tmp_path: Path, out: Path, extra: str = "") -> list[str]:
    """Arguments for instance x under tmp_path (made on first use) writing into `out`."""
    imapd, cyrus = tmp_path / "x" / "imapd.conf", tmp_path / "x" / "cyrus.conf"
    if not imapd.exists():
        make_instance(tmp_path, "x", 11143, extra=extra)
    return ["-C", str(imapd), "-M", str(cyrus), "--instance", "x", "--output", str(out), "--helper", "/h"]


def snapshot(directory: Path) -> dict[str, str]:
    """Like tree(), with directories, modes and hidden entries: 'nothing changed' means this."""
    result = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        st = path.lstat()
        if path.is_symlink():
            result[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            result[rel] = f"dir {st.st_mode & 0o7777:o}"
        else:
            result[rel] = f"{st.st_mode & 0o7777:o} " + path.read_text()
    return result


def test_output_that_can_never_work_is_refused_before_rendering(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an empty --output used to write (and would, if this regressed)
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere" / "deeper", dangling)
    assert generate(*_base(tmp_path, dangling)) == exitcodes.CONFIG
    assert "is a symlink to" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert generate(*_base(tmp_path / "b", a_file)) == exitcodes.CONFIG
    assert "exists and is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # before: "" wrote the units into the working directory
        generate(*_base(tmp_path / "c", Path("")) [:-2], "--output", "")
    assert e.value.code == exitcodes.USAGE and "--output/-o: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize("blocker", ["cyrus.service.wants", "cyrus@x.service.d"])
def test_a_file_where_a_directory_must_be_is_a_conflict(tmp_path, capsys, blocker):
    out = tmp_path / "out"
    out.mkdir()
    (out / blocker).write_text("not ours\n")
    before = snapshot(out)
    assert generate(*_base(tmp_path, out)) == exitcodes.FAILURE  # before: 2-3 files, then a traceback
    err = capsys.readouterr().err
    assert f"{out / blocker}: exists and is not a directory" in err and "Traceback" not in err
    assert snapshot(out) == before
    assert generate(*_base(tmp_path, out), "--force") == 0
    assert set(tree(out)) == {"cyrus@.service", "cyrus.service", "cyrus@x.service.d/cyrushelper.conf",
                              "cyrus.service.wants/cyrus@x.service"}


@pytest.mark.parametrize("failing_call", [1, 3, 5, 6])
def test_a_failure_while_swapping_undoes_every_step(tmp_path, capsys, monkeypatch, failing_call):
    """ENOSPC (or anything) on the Nth rename of the swap: the previous output stays byte for byte."""
    out = tmp_path / "out"
    assert generate(*_base(tmp_path, out)) == 0
    os.unlink(out / "cyrus.service")
    os.unlink(out / "cyrus.service.wants/cyrus@x.service")
    before = snapshot(out)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    # a new helper and a replica change two files (each: old aside, new in), two are created:
    # six renames
    changed = [*_base(tmp_path, out)[:-1], "/new/helper", "--replica-instance", "r"]
    assert generate(*changed) == exitcodes.IO_ERROR
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert len(calls) > failing_call or failing_call == 1  # the failing rename, then the undo
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing written, the previous output is intact" in err
    assert "Traceback" not in err
    assert snapshot(out) == before  # no staging directory left either
    assert generate(*changed) == 0 and len(tree(out)) == 4


def test_a_failure_while_staging_touches_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "unrelated.service").write_text("[Unit]\n")
    before = snapshot(out)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "fsync", no_space)
    assert generate(*_base(tmp_path, out)) == exitcodes.IO_ERROR
    assert snapshot(out) == before
    # and an output directory it had to create is removed again
    assert generate(*_base(tmp_path, tmp_path / "new" / "out")) == exitcodes.IO_ERROR
    assert not (tmp_path / "new").exists()


def test_a_staging_directory_left_by_a_killed_generate_is_removed(tmp_path):
    out = tmp_path / "out"
    stale = out / f"{atomic.STAGING_PREFIX}999999999.abc"
    (stale / "new").mkdir(parents=True)
    assert generate(*_base(tmp_path, out)) == 0
    assert not stale.exists()


@pytest.mark.parametrize("line", ["configdirectory: /", "sievedir: /etc", "proc_path: /usr/"])
def test_a_whole_system_directory_as_writable_path_is_refused(tmp_path, capsys, line):
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    text = imapd.read_text()
    key = line.split(":")[0]
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(key + ":"))
    imapd.write_text(text + f"\n{line}\n")
    out = tmp_path / "out"
    assert generate("-C", str(imapd), "-M", str(cyrus), "--instance", "x", "--output", str(out),
                    "--helper", "/h") == exitcodes.CONFIG  # before: ReadWritePaths=/ accepted
    err = capsys.readouterr().err
    assert f"imapd.conf:{len(text.splitlines()) + 1}: {key} is " in err and "ProtectSystem=strict" in err
    assert not out.exists()


def test_a_path_component_systemd_would_ignore_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(*_base(tmp_path, out, extra=f"partition-big: /srv/{'a' * 256}\n")) == exitcodes.CONFIG
    assert "256 bytes long: systemd ignores paths with a component over 255 bytes" in capsys.readouterr().err
    assert generate(*_base(tmp_path / "ok", out, extra=f"partition-big: /srv/{'a' * 255}\n")) == 0


def test_a_replication_channel_without_any_host_is_refused(tmp_path, capsys):
    imapd, cyrus = make_instance(tmp_path, "x", 11143)
    text = imapd.read_text().replace("sync_host: replica.example\n", "")
    imapd.write_text(text + "sync_log_channels: squatter repl1 repl2\nrepl1_sync_host: r1.example\n")
    args = ["-C", str(imapd), "-M", str(cyrus), "--instance", "x", "--output", str(tmp_path / "o"),
            "--helper", "/h"]
    assert generate(*args) == exitcodes.CONFIG  # before: accepted, exit 78 at the first stop
    err = capsys.readouterr().err
    line = len(text.splitlines()) + 1
    assert f"imapd.conf:{line}: channel 'repl2' has no repl2_sync_host and there is no sync_host" in err
    assert "squatter" not in err  # squatter's channel is read by squatter, not by sync_client
    imapd.write_text(text + "sync_log_channels: squatter repl1\nrepl1_sync_host: r1.example\n")
    assert generate(*args) == 0


def test_a_broken_template_is_a_file_line_error(tmp_path, capsys):
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    unit = templates / "cyrus.service.j2"
    lines = unit.read_text().splitlines()
    unit.write_text("\n".join(lines[:3] + ["{% if %}"] + lines[3:]) + "\n")
    out = tmp_path / "out"
    assert generate(*_base(tmp_path, out), "--templates", str(templates)) == exitcodes.CONFIG
    err = capsys.readouterr().err
    assert f"{unit}:4: template error: Expected an expression" in err and "Traceback" not in err
    unit.write_text("\n".join(lines) + "\n{{ no_such_variable }}\n")
    assert generate(*_base(tmp_path, out), "--templates", str(templates)) == exitcodes.CONFIG
    assert "'no_such_variable' is undefined" in capsys.readouterr().err
    assert not out.exists()


def test_saslauthd_ordering_only_for_instances_that_use_it():
    """After=saslauthd.service only where sasl_pwcheck_method names it (Fedora's layout does; the
    Debian default and the lab use auxprop)."""
    fedora = ROOT / "tests" / "data" / "fedora"
    for conf, expected in ((fedora, True), (DEBIAN, False)):
        files = {f.relpath: f.text for f in render.render(
            Instance.load(conf / "imapd.conf", conf / "cyrus.conf", "x"), EXISTING_HELPER)}
        assert ("After=saslauthd.service" in files["cyrus@x.service.d/cyrushelper.conf"]) == expected
        assert "saslauthd.service" not in files["cyrus@.service"]  # identical for every instance

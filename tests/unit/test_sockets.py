"""`run --listeners systemd` (cyrushelper/sockets.py) against fake workers and a fake systemd: the
stop that tells stop from restart, SIGHUP first, the late fence, one SIGTERM, SIGKILL and the
unclean marker; READY only once a worker greets. Real Cyrus under real systemd is
tests/system/test_socket_mode.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cyrushelper import exitcodes, listeners, proc, sockets, state
from cyrushelper.config import Instance
from cyrushelper.notify import Notifier
from cyrushelper.supervisor import Options

# A worker: reports each signal in its log; `mode` says what it does with them.
FAKE_WORKER = """\
import os, signal, sys, time
mode, fence, log = sys.argv[1], sys.argv[2], sys.argv[3]
def note(what):
    with open(log, "a") as f:
        f.write(f"{what} fence={'yes' if os.path.exists(fence) else 'no'}\\n")
def on_hup(*_):
    note("HUP")
    if mode == "idle":
        sys.exit(0)
def on_term(*_):
    note("TERM")
    if mode != "stubborn":
        sys.exit(75)
signal.signal(signal.SIGHUP, on_hup if mode != "stubborn" else lambda *_: note("HUP"))
signal.signal(signal.SIGTERM, on_term)
note("up")
while True:
    time.sleep(0.02)
    if mode == "busy" and os.path.exists(fence):  # a session that ends at its next command
        note("session ended by the fence")
        sys.exit(0)
"""


class FakeSystemd:
    def __init__(self, job: str | None, workers: "Workers"):
        self.job = job
        self.workers = workers
        self.stopped: list[list[str]] = []
        self.signals: list[tuple[str, int]] = []

    def kill(self, units: list[str], signum: int) -> None:
        self.signals += [(u, signum) for u in units]
        for pid, unit in self.workers.alive().items():
            if unit in units:
                os.kill(pid, signum)

    def job_type(self, unit: str) -> str | None:
        return self.job

    def stop_no_block(self, units: list[str]) -> None:
        self.stopped.append(list(units))


def lmtp_instance(tmp_path: Path, listen: str, workers: int) -> tuple[Instance, listeners.Plan]:
    """Instance x with one LMTP service on `listen`, and its socket-mode plan."""
    (tmp_path / "conf").mkdir(exist_ok=True)
    imapd = tmp_path / "imapd.conf"
    imapd.write_text(f"configdirectory: {tmp_path}/conf\npartition-default: {tmp_path}/spool\n")
    conf = tmp_path / "cyrus.conf"
    conf.write_text(f'SERVICES {{\n  lmtp cmd="lmtpd" listen="{listen}"\n}}\n')
    inst = Instance.load(imapd, conf, "x")
    return inst, listeners.plan(inst, {"lmtp": workers})


@pytest.fixture
def setup(tmp_path, fake_cyrus_bindir):
    return lmtp_instance(tmp_path, "127.0.0.1:1", 2)


class Workers:
    """Fake worker processes standing in for the pool's units."""

    def __init__(self, tmp_path: Path, inst: Instance):
        self.tmp_path, self.inst = tmp_path, inst
        self.procs: dict[int, tuple[subprocess.Popen, str]] = {}
        self.script = tmp_path / "worker.py"
        self.script.write_text(FAKE_WORKER)

    def start(self, mode: str, unit: str) -> Path:
        log = self.tmp_path / f"{unit}.log"
        p = subprocess.Popen([sys.executable, str(self.script), mode, str(self.inst.fence_file), str(log)])
        self.procs[p.pid] = (p, unit)
        while not (log.exists() and log.read_text().endswith("\n")):  # its handlers are in place
            pass
        return log

    def alive(self) -> dict[int, str]:
        return {pid: unit for pid, (p, unit) in self.procs.items() if p.poll() is None}

    def close(self):
        for p, _ in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def workers(tmp_path, setup):
    w = Workers(tmp_path, setup[0])
    yield w
    w.close()


def supervisor(setup, workers, job, **kwargs) -> tuple[sockets.SocketSupervisor, FakeSystemd]:
    inst, plan = setup
    fake = FakeSystemd(job, workers)
    opts = Options(stop_timeout=kwargs.pop("stop_timeout", 30.0), grace=kwargs.pop("grace", 5.0))
    sup = sockets.SocketSupervisor(inst, plan, opts, notifier=Notifier(), systemd=fake, **kwargs)
    sup.processes = workers.alive
    sup.loop = proc.Loop()
    return sup, fake


def events(log: Path) -> list[str]:
    return log.read_text().splitlines()


def test_stop_closes_the_sockets_and_sighups_every_worker_once(setup, workers):
    logs = [workers.start("idle", u) for u in setup[1].worker_units]
    sup, fake = supervisor(setup, workers, "stop")
    result = sup.stop("signal SIGTERM")
    assert (result["result"], result["kind"], result["units"]) == ("clean", "stop", 2)
    assert fake.stopped == [["cyrus-x-lmtp.socket"]]
    for log in logs:
        assert events(log) == ["up fence=no", "HUP fence=no"]
    assert not setup[0].fence_file.exists()  # nobody was in a session: no fence needed


def test_restart_keeps_the_sockets(setup, workers):
    workers.start("idle", "cyrus-x-lmtp@1.service")
    sup, fake = supervisor(setup, workers, "restart")
    assert sup.stop("signal SIGTERM")["kind"] == "restart"
    assert fake.stopped == []


def test_sigterm_without_a_job_becomes_a_stop_of_the_whole_instance(setup, workers):
    sup, fake = supervisor(setup, workers, None)
    assert sup.stop("signal SIGTERM")["kind"] == "stop"
    assert fake.stopped == [["cyrus@x.service"], ["cyrus-x-lmtp.socket"]]


def test_a_session_gets_the_fence_only_after_the_sighup(setup, workers):
    log = workers.start("busy", "cyrus-x-lmtp@1.service")
    # generous on purpose: the SIGHUP must have been handled long before the fence comes
    sup, _ = supervisor(setup, workers, "restart", fence_after=2.0)
    assert sup.stop("signal SIGTERM")["result"] == "clean"
    assert events(log) == ["up fence=no", "HUP fence=no", "session ended by the fence fence=yes"]


def test_a_worker_still_serving_after_the_grace_gets_one_sigterm(setup, workers):
    log = workers.start("busy-ignoring-fence", "cyrus-x-lmtp@1.service")  # ends only on SIGTERM
    sup, _ = supervisor(setup, workers, "stop", fence_after=0.0, grace=0.3)
    assert sup.stop("signal SIGTERM")["result"] == "clean"
    assert events(log)[1].startswith("HUP") and events(log)[2:] == ["TERM fence=yes"]


def test_past_the_deadline_sigkill_and_an_unclean_marker(setup, workers):
    inst = setup[0]
    log = workers.start("stubborn", "cyrus-x-lmtp@2.service")
    sup, _ = supervisor(setup, workers, "stop", fence_after=0.0, grace=0.2, stop_timeout=0.6)
    result = sup.stop("signal SIGTERM")
    assert result["result"] == "unclean" and len(result["killed_pids"]) == 1
    assert events(log)[1].startswith("HUP") and events(log)[2:] == ["TERM fence=yes"]
    marker = state.unclean_stop(inst)
    assert marker and "cyrus-x-lmtp@2.service" in marker["reason"]
    assert workers.alive() == {}


def test_ready_needs_a_greeting_not_just_a_connect(tmp_path, setup, workers):
    server = socket.socket()  # systemd's socket: the kernel accepts connects, no worker greets yet
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    inst = setup[0]
    inst.cyrus.path.write_text(f'SERVICES {{\n  lmtp cmd="lmtpd" listen="127.0.0.1:{port}"\n}}\n')
    inst = Instance.load(inst.imapd.path, inst.cyrus.path, "x")
    sup, _ = supervisor((inst, listeners.plan(inst, {"lmtp": 1})), workers, "stop")
    assert list(sup.probe()) == [f"lmtp 127.0.0.1:{port}"]  # accepted (backlog), nobody greets

    def greet():  # a worker now: it also takes the connection the first probe left behind
        for _ in range(2):
            conn, _ = server.accept()
            conn.sendall(b"220 lmtp ready\r\n")
            conn.close()

    t = threading.Thread(target=greet)
    t.start()
    assert sup.probe() == {}
    t.join()
    server.close()


@pytest.fixture
def signal_dispositions():
    """run() leaves stop signals ignored until the process exits (proc.Loop.close): not ours."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_run_exit_codes_follow_the_stop(setup, workers, monkeypatch, signal_dispositions):
    """The whole life: READY, a stop that needed SIGKILL ends with 70, like master mode."""
    workers.start("stubborn", "cyrus-x-lmtp@1.service")
    sup, _ = supervisor(setup, workers, "stop", fence_after=0.0, grace=0.1, stop_timeout=0.3)
    monkeypatch.setattr(sup, "probe", lambda: {})
    monkeypatch.setattr(sup, "serve", lambda: ("stop", signal.SIGTERM))
    assert sup.run() == exitcodes.UNCLEAN_STOP
    assert state.last_stop(setup[0])["result"] == "unclean"
    assert state.listeners(setup[0])["pools"][0]["socket"] == "cyrus-x-lmtp.socket"


def test_jobs_get_sigterm_at_once_daemons_only_once_the_workers_are_gone(tmp_path, setup, workers):
    inst = setup[0]
    inst.cyrus.path.write_text('SERVICES {\n  lmtp cmd="lmtpd" listen="127.0.0.1:1"\n}\n'
                               'EVENTS {\n  checkpoint cmd="ctl_cyrusdb -c" period=30\n}\n'
                               'DAEMON {\n  syncclient cmd="sync_client -r"\n}\n')
    inst = Instance.load(inst.imapd.path, inst.cyrus.path, "x")
    plan = listeners.plan(inst, {"lmtp": 1})
    busy = workers.start("busy", "cyrus-x-lmtp@1.service")         # ends at the fence
    job = workers.start("job", "cyrus-x-event-checkpoint.service")  # ends on SIGTERM
    daemon = workers.start("daemon", "cyrus-x-syncclient.service")  # ends on SIGTERM
    sup, fake = supervisor((inst, plan), workers, "stop", fence_after=2.0)
    assert sup.stop("signal SIGTERM")["result"] == "clean"
    assert events(busy)[1:] == ["HUP fence=no", "session ended by the fence fence=yes"]
    assert events(job)[1:] == ["TERM fence=no"]       # at once, long before the fence
    assert events(daemon)[1:] == ["TERM fence=yes"]   # only once the worker had ended
    # one signal of each kind per unit, all through systemd
    assert sorted(fake.signals) == sorted([("cyrus-x-lmtp@1.service", signal.SIGHUP),
                                           ("cyrus-x-event-checkpoint.service", signal.SIGTERM),
                                           ("cyrus-x-syncclient.service", signal.SIGTERM)])


def test_an_lmtp_delivery_in_flight_finishes_before_its_worker_gets_sighup(tmp_path, fake_cyrus_bindir, workers):
    """SIGHUP would cut lmtpd's read of a message body (lib/prot.c): with an LMTP connection open
    at the stop, the fence goes up at once and the LMTP workers get SIGHUP only once it closed."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        inst, plan = lmtp_instance(tmp_path, f"127.0.0.1:{listener.getsockname()[1]}", 1)
        workers.inst = inst
        log = workers.start("idle", plan.worker_units[0])
        client = socket.create_connection(listener.getsockname())
        delivery, _ = listener.accept()   # held by "lmtpd", inside its transaction

        def transaction_done():
            with open(log, "a") as f:
                f.write("delivery closed\n")
            delivery.close()
        threading.Timer(0.3, transaction_done).start()
        sup, _ = supervisor((inst, plan), workers, "restart")
        try:
            assert sup.stop("signal SIGTERM")["result"] == "clean"
        finally:
            client.close()
    assert events(log) == ["up fence=no", "delivery closed", "HUP fence=yes"]

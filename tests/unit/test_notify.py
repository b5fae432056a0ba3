"""notify.Notifier and Pulse against a fake NOTIFY_SOCKET."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from cyrushelper.notify import Notifier, Pulse, strip_notify_env
from tests.unit.test_supervisor_fakes import NotifySocket


@pytest.fixture
def sock(monkeypatch):
    with tempfile.TemporaryDirectory(prefix="cyhn-", dir="/tmp") as d:
        s = NotifySocket(Path(d))
        monkeypatch.setenv("NOTIFY_SOCKET", s.path)
        yield s
        s.close()


def test_messages_reach_the_socket(sock):
    n = Notifier()
    assert n.enabled
    n.ready("serving")
    n.stopping("stopping: 3 children left")
    n.extend_timeout(2.5)
    got = [f for _, f in sock.drain()]
    assert got == [{"READY": "1", "STATUS": "serving"},
                   {"STOPPING": "1", "STATUS": "stopping: 3 children left"},
                   {"EXTEND_TIMEOUT_USEC": "2500000"}]


def test_without_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready()
    assert n.sent == ["READY=1"]


def test_pulse_extends_at_most_once_per_interval(sock):
    now = [0.0]
    p = Pulse(Notifier(), extend=20, interval=5, clock=lambda: now[0])
    for t in (0, 1, 2, 5, 6, 10.5):
        now[0] = t
        p("working")
    extends = [f for _, f in sock.drain() if "EXTEND_TIMEOUT_USEC" in f]
    assert len(extends) == 3 and extends[0]["EXTEND_TIMEOUT_USEC"] == "20000000"
    assert all(f.get("STATUS") == "working" for _, f in sock.messages)


def test_child_environment_has_no_notify_socket():
    env = strip_notify_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}

"""Process control (cyrushelper/proc.py): ending a child, and the one signal/fd/thread wake-up loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from cyrushelper import proc
from tests.bounds import upper

# A child in its own session that records SIGTERM, optionally ignores it, and forks a grandchild.
CHILD = r'''
import os, signal, sys, time
mode = sys.argv[1]
def on_term(*_):
    print("TERM", flush=True)
    if mode != "ignore":
        os._exit(0)
signal.signal(signal.SIGTERM, on_term)
if os.fork() == 0:                      # a grandchild in the same session, ignoring SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.close(1)                         # it must not hold the test's pipe open
    time.sleep(60); os._exit(0)
print("ready", flush=True)
while True:
    time.sleep(0.05)
'''


def start(mode: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    assert child.stdout.readline() == "ready\n"
    return child


def test_terminate_gives_sigterm_first_and_ends_nothing_else_when_the_child_obeys():
    child = start("obey")
    session = child.pid
    proc.terminate(child, grace=30)
    assert child.returncode == 0 and child.stdout.read() == "TERM\n"
    # only the child was told: its grandchild, which would have ignored it anyway, is left alone
    left = proc.session_members(session)
    assert len(left) == 1 and left[0] != child.pid
    proc.kill_session(session)


def test_terminate_kills_the_whole_session_after_the_grace():
    child = start("ignore")
    session = child.pid
    proc.terminate(child, grace=0.2)
    assert child.returncode == -signal.SIGKILL
    assert child.stdout.read() == "TERM\n"          # exactly one SIGTERM before the SIGKILL
    # the grandchild went with it: SIGKILLed already, but a loaded machine may take a moment to end
    # it (it is listed, not yet a zombie, until the kernel has torn it down); it never ignores it
    deadline = time.monotonic() + upper(0)
    while proc.session_members(session) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.session_members(session) == []


def test_loop_wakes_for_threads_readers_and_signals():
    with proc.Loop() as loop:
        loop.handle_signals(signal.SIGUSR1)
        threading.Timer(0.05, loop.wake).start()
        assert loop.poll(60) == []                      # woken by the thread, no signal
        r, w = os.pipe()
        seen = []
        loop.add_reader(r, lambda: seen.append(os.read(r, 10)))
        os.write(w, b"x")
        loop.poll(60)
        assert seen == [b"x"]
        loop.remove_reader(r)
        os.close(r)
        os.close(w)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert loop.poll(60) == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # restored on close


def test_wait_gone_returns_once_they_exited_and_names_the_survivors():
    quick = subprocess.Popen(["true"])
    slow = subprocess.Popen(["sleep", "60"])
    try:
        assert proc.wait_gone([quick.pid], 60) == []   # a zombie counts as gone: nobody reaped it
        assert proc.wait_gone([quick.pid, slow.pid], 0.2) == [slow.pid]
        assert quick.poll() is not None
        slow.kill()
        assert proc.wait_gone([slow.pid], 60) == []
    finally:
        slow.kill()
        slow.wait()
    assert proc.wait_gone([slow.pid], 60) == []  # reaped, even the PID is gone


def test_exits_wakes_the_loop_when_a_member_exits_and_refuses_non_members():
    child = start("obey")
    session = child.pid
    grandchild = next(p for p in proc.session_members(session) if p != child.pid)
    with proc.Loop() as loop:
        exits = proc.Exits(loop, session)
        assert exits.track([child.pid, grandchild]) and exits.complete
        assert not exits.track([os.getpid()])      # not a member of that session
        child.send_signal(signal.SIGTERM)
        loop.poll(60)                              # woken by the exit: no timer involved
        child.wait()
        assert not exits.track([child.pid])        # gone: the caller must list again
        exits.close()
    proc.kill_session(session)

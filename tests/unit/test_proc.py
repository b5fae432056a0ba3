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

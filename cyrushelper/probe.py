"""Can a listener of Cyrus serve? A connect, and the greeting for a service that speaks first.

Cyrus 3.6 master has no readiness signal: it binds the SERVICES sockets only after every START
entry finished, and a greeting can only come from a child forked by its running accept loop. So a
listener that accepts, and greets when its service speaks first (imapd, pop3d, lmtpd, timsieved,
nntpd without -s), proves that Cyrus serves it. Used by `run` for READY=1 (`Prober`, in its event
loop) and by `status` (`probe_all`, blocking).

`Prober` never blocks and never waits longer than it must: every listener is tried at once with a
non-blocking connect; a connected one waits for its greeting in the loop (woken by the data); a
refused one is tried again after PROBE_RETRY. That retry is the one clock here: no kernel event
says that a TCP socket started listening, and master binds all SERVICES sockets right after START
(master/master.c: service_create() for each, then the wait=y daemons, then the accept loop).
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from dataclasses import dataclass

from cyrushelper.config import Entry, Instance, Listen

GREETING_PROGRAMS = ("imapd", "pop3d", "lmtpd", "timsieved", "nntpd")
PROBE_RETRY = 0.01       # a refused listener is tried again after this long
GREETING_TIMEOUT = 2.0   # a connection that got no greeting this long is closed and tried again


def speaks_first(entry: Entry) -> bool:
    return entry.program in GREETING_PROGRAMS and "-s" not in entry.argv[1:]


def probe_listener(listen: Listen, want_greeting: bool, timeout: float = GREETING_TIMEOUT) -> str | None:
    """None if the listener accepts (and greets when expected), else why not."""
    family, address = listen.connect_address()
    if family != socket.AF_UNIX and address[1] is None:
        return f"unknown port {listen.port!r}"
    return probe_address(family, address, want_greeting, timeout)


def probe_address(family: int, address: object, want_greeting: bool, timeout: float = 2.0) -> str | None:
    """None if a connect to `address` succeeds (and a greeting arrives when expected), else why not."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(address)
            if want_greeting:
                data = s.recv(256)
                if not data:
                    return "closed without greeting"
    except (OSError, socket.timeout) as e:
        return str(e) or type(e).__name__
    return None


def probe_all(instance: Instance, timeout: float = GREETING_TIMEOUT) -> dict[str, str | None]:
    """{'service listen': None or the failure} for every SERVICES listener."""
    return {f"{entry.name} {listen}": probe_listener(listen, speaks_first(entry), timeout)
            for entry, listen in instance.listeners}


@dataclass
class _Attempt:
    name: str
    family: int
    address: object
    want_greeting: bool
    sock: socket.socket | None = None
    retry_at: float = 0.0       # when to connect again (while no connection is open)
    give_up_at: float = 0.0     # when an open connection without greeting is closed
    failure: str = "not tried yet"


class Prober:
    """Every SERVICES listener of `instance`, probed from `selector`'s event loop (the caller
    polls it): `step()` starts due attempts and says when it needs to run again; the selector
    calls back when a connect completes or a greeting arrives. `served` once every listener
    accepted (and greeted), `failures` says what the others answered last."""

    def __init__(self, instance: Instance, selector: selectors.BaseSelector, clock=time.monotonic):
        self.selector, self.clock = selector, clock
        self._pending: dict[str, _Attempt] = {}
        self.failures: dict[str, str] = {}
        for entry, listen in instance.listeners:
            name = f"{entry.name} {listen}"
            family, address = listen.connect_address()
            if family != socket.AF_UNIX and address[1] is None:
                self.failures[name] = f"unknown port {listen.port!r}"   # never served
                continue
            self._pending[name] = _Attempt(name, family, address, speaks_first(entry))
        self.failures.update({name: a.failure for name, a in self._pending.items()})

    @property
    def served(self) -> bool:
        return not self.failures

    def step(self) -> float | None:
        """Start the attempts that are due; the time of the next one due (None: only events)."""
        now = self.clock()
        for attempt in list(self._pending.values()):
            if attempt.sock is None and now >= attempt.retry_at:
                self._connect(attempt, now)
            elif attempt.sock is not None and now >= attempt.give_up_at:
                self._failed(attempt, "connected, but no greeting", now)
        times = [a.retry_at if a.sock is None else a.give_up_at for a in self._pending.values()]
        return min(times) if times else None

    def _connect(self, attempt: _Attempt, now: float) -> None:
        s = socket.socket(attempt.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        code = s.connect_ex(attempt.address)
        if code not in (0, errno.EINPROGRESS):  # (EAGAIN: a full UNIX socket backlog, try again)
            s.close()
            self._failed(attempt, os.strerror(code), now)
            return
        attempt.sock, attempt.give_up_at = s, now + GREETING_TIMEOUT
        if code == 0 and not attempt.want_greeting:
            self._served(attempt)
            return
        # a greeting makes it readable; so does a refused connect. Completion of a connect in
        # progress makes it writable, which is all a service that does not speak first shows.
        events = selectors.EVENT_READ if attempt.want_greeting else selectors.EVENT_WRITE
        self.selector.register(s, events, lambda: self._ready(attempt))

    def _ready(self, attempt: _Attempt) -> None:
        s = attempt.sock
        if s is None:
            return
        error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._failed(attempt, os.strerror(error), self.clock())
            return
        if attempt.want_greeting:
            try:
                data = s.recv(256)
            except OSError as e:
                self._failed(attempt, str(e), self.clock())
                return
            if not data:
                self._failed(attempt, "closed without greeting", self.clock())
                return
        self._served(attempt)

    def _close(self, attempt: _Attempt) -> None:
        if attempt.sock is not None:
            try:
                self.selector.unregister(attempt.sock)
            except (KeyError, ValueError):
                pass
            attempt.sock.close()
            attempt.sock = None

    def _failed(self, attempt: _Attempt, why: str, now: float) -> None:
        self._close(attempt)
        attempt.failure = why
        attempt.retry_at = now + PROBE_RETRY
        self.failures[attempt.name] = why

    def _served(self, attempt: _Attempt) -> None:
        self._close(attempt)
        del self._pending[attempt.name]
        self.failures.pop(attempt.name, None)

    def close(self) -> None:
        for attempt in self._pending.values():
            self._close(attempt)

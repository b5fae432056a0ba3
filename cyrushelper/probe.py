"""Can a listener of Cyrus serve? A connect, and the greeting for a service that speaks first.

Cyrus 3.6 master has no readiness signal: it binds the SERVICES sockets only after every START
entry finished, and a greeting can only come from a child forked by its running accept loop. So a
listener that accepts, and greets when its service speaks first (imapd, pop3d, lmtpd, timsieved,
nntpd without -s), proves that Cyrus serves it. Used by `run` for READY=1 and by `status`.
"""

from __future__ import annotations

import socket

from cyrushelper.config import Entry, Instance, Listen

GREETING_PROGRAMS = ("imapd", "pop3d", "lmtpd", "timsieved", "nntpd")


def speaks_first(entry: Entry) -> bool:
    return entry.program in GREETING_PROGRAMS and "-s" not in entry.argv[1:]


def probe_listener(listen: Listen, want_greeting: bool, timeout: float = 2.0) -> str | None:
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


def probe_all(instance: Instance, timeout: float = 2.0) -> dict[str, str | None]:
    """{'service listen': None or the failure} for every SERVICES listener."""
    return {f"{entry.name} {listen}": probe_listener(listen, speaks_first(entry), timeout)
            for entry, listen in instance.listeners}

"""sd_notify(3) messages to systemd, behind one small class (the only user of sdnotify).

Without $NOTIFY_SOCKET (a terminal, a test) every call is a no-op, so callers never check.
`EXTEND_TIMEOUT_USEC` is sent by `Pulse`, which rate-limits it: systemd extends whichever timer
is armed (start, stop, ExecStopPost) to *now + value*, so one message per `interval` keeps a long
drain alive as long as it makes progress and no longer.
"""

from __future__ import annotations

import os
import time

import sdnotify


SEND_TIMEOUT = 2.0


class Notifier:
    def __init__(self):
        # sdnotify reads $NOTIFY_SOCKET itself (and handles abstract '@' sockets)
        self._sd = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None
        if self._sd is not None and self._sd.socket is not None:
            # A datagram socket blocks once the reader's queue (net.unix.max_dgram_qlen, 10) is
            # full: never let a slow reader stall a stop. sdnotify drops what times out.
            self._sd.socket.settimeout(SEND_TIMEOUT)
        self.sent: list[str] = []  # what we said, for `status` and for tests

    @property
    def enabled(self) -> bool:
        return self._sd is not None

    def send(self, *fields: str) -> None:
        message = "\n".join(fields)
        self.sent.append(message)
        if self._sd is not None:
            self._sd.notify(message)

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def mainpid(self, pid: int) -> None:
        self.send(f"MAINPID={pid}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def strip_notify_env(env: dict[str, str]) -> dict[str, str]:
    """Environment for a child (Cyrus master, sync_client): it must never talk to our socket."""
    return {k: v for k, v in env.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")}


class Pulse:
    """Send EXTEND_TIMEOUT_USEC=extend every `interval` seconds while work remains."""

    def __init__(self, notifier: Notifier, extend: float = 30.0, interval: float = 5.0,
                 clock=time.monotonic):
        self.notifier, self.extend, self.interval, self.clock = notifier, extend, interval, clock
        self._last = None
        self._last_status = None

    def due(self) -> float | None:
        """When the next EXTEND_TIMEOUT_USEC is due (clock time), None before the first."""
        return None if self._last is None else self._last + self.interval

    def __call__(self, status: str | None = None) -> None:
        now = self.clock()
        if self._last is None or now - self._last >= self.interval:
            fields = [f"EXTEND_TIMEOUT_USEC={int(self.extend * 1_000_000)}"]
            if status:
                fields.append(f"STATUS={status}")
            self.notifier.send(*fields)
            self._last, self._last_status = now, status
        elif status and status != self._last_status:
            self.notifier.status(status)
            self._last_status = status

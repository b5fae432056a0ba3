"""Where an instance lives: this machine, or another host reached as root over ssh.

`switchover --to NAME@HOST` drives the other side with the same two programs an operator would
use there, `systemctl` and `cyrushelper` (the one its unit runs, named by the unit's ExecStart),
so a remote instance and a local one go through the same commands; only the transport differs.
ssh runs with BatchMode (never a password prompt at 3 a.m.) and a connect timeout; host keys,
identities and ports come from the operator's ssh configuration (~/.ssh/config).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=3")


class RemoteError(Exception):
    """A command on the instance's host could not be run, or answered nonsense."""


@dataclass(frozen=True)
class Host:
    address: str | None = None      # None: this machine

    @property
    def local(self) -> bool:
        return self.address is None

    def __str__(self) -> str:
        return "this host" if self.local else f"root@{self.address}"

    def argv(self, command: list[str]) -> list[str]:
        if self.local:
            return list(command)
        return ["ssh", *SSH_OPTIONS, f"root@{self.address}", "--", shlex.join(command)]

    def run(self, command: list[str], timeout: float, check: bool = False) -> subprocess.CompletedProcess:
        try:
            r = subprocess.run(self.argv(command), capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self}: `{shlex.join(command)}` did not finish within {timeout:g}s") from None
        except OSError as e:
            raise RemoteError(f"{self}: cannot run `{command[0]}`: {e}") from None
        if not self.local and r.returncode == 255:
            raise RemoteError(f"{self}: ssh failed: {r.stderr.strip()[-400:]}")
        if check and r.returncode != 0:
            raise RemoteError(f"{self}: `{shlex.join(command)}` exited {r.returncode}: "
                              f"{(r.stderr or r.stdout).strip()[-400:]}")
        return r

    def json(self, command: list[str], timeout: float, ok_codes: tuple[int, ...] = (0,)) -> dict:
        r = self.run(command, timeout)
        if r.returncode not in ok_codes:
            raise RemoteError(f"{self}: `{shlex.join(command)}` exited {r.returncode}: "
                              f"{(r.stderr or r.stdout).strip()[-400:]}")
        try:
            data = json.loads(r.stdout)
        except ValueError:
            raise RemoteError(f"{self}: `{shlex.join(command)}` printed no JSON: {r.stdout[:200]!r}") from None
        if not isinstance(data, dict):
            raise RemoteError(f"{self}: `{shlex.join(command)}` printed {type(data).__name__}, not an object")
        return data


def parse_target(text: str) -> tuple[str, Host]:
    """'NAME' or 'NAME@HOST' -> (instance name, host)."""
    name, sep, host = text.partition("@")
    if sep and not host:
        raise ValueError(f"{text!r}: empty host after '@'")
    return name, Host(host or None)

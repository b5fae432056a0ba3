"""Asking systemd about units, through systemctl (the only caller of systemctl).

Socket mode needs three things from the service manager at run time (master mode needs none):
- which job a unit has pending: the instance's own stop path must know whether it is stopping
  (close the sockets too) or restarting (keep them listening). systemd tells a service neither in
  its environment nor by signal; `systemctl list-jobs UNIT` shows "ID UNIT TYPE STATE" (measured,
  systemd 252 and 257: "stop" for stop and for `systemctl stop cyrus`, "restart" for restart and
  for try-restart of a running unit, "running" while the unit's own stop is under way);
- stopping units without waiting for them (`--no-block`): the sockets' stop job runs after the
  workers' and the instance's own, which is the job that asks for it;
- signalling a unit's processes from PID 1 (`kill`), so that Cyrus sees its parent signal it;
- unit properties, for `status`.
Every call has a timeout: a stop path must never hang on the manager.
"""

from __future__ import annotations

import os
import signal
import subprocess

from cyrushelper.notify import strip_notify_env

SYSTEMCTL = os.environ.get("CYRUSHELPER_SYSTEMCTL", "systemctl")
TIMEOUT = 10.0


class SystemctlError(Exception):
    pass


def _run(*args: str) -> str:
    try:
        r = subprocess.run([SYSTEMCTL, "--no-pager", *args], capture_output=True, text=True,
                           timeout=TIMEOUT, stdin=subprocess.DEVNULL, env=strip_notify_env(os.environ))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemctlError(f"systemctl {' '.join(args)}: {e}") from None
    if r.returncode != 0:
        raise SystemctlError(f"systemctl {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def job_type(unit: str) -> str | None:
    """The type of the job pending or running for `unit` ("stop", "restart", "start" ...), or None."""
    for line in _run("list-jobs", "--no-legend", "--plain", unit).splitlines():
        words = line.split()
        if len(words) >= 4 and words[1] == unit:
            return words[2]
    return None


def stop_no_block(units: list[str]) -> None:
    """Queue a stop job for each unit and return at once."""
    if units:
        _run("stop", "--no-block", *units)


def kill(units: list[str], signum: int) -> None:
    """Have systemd send `signum` to every process of each unit. Sent by PID 1, the parent of a
    unit's main process: Cyrus logs a plain "graceful shutdown" for it, where a SIGTERM from
    anyone else is "graceful shutdown initiated by unexpected process" (lib/signals.c)."""
    if units:
        _run("kill", f"--signal={signal.Signals(signum).name}", *units)


def show(units: list[str], properties: list[str]) -> dict[str, dict[str, str]]:
    """{unit: {property: value}} for the given units."""
    if not units:
        return {}
    text = _run("show", "--property", ",".join(["Id", *properties]), *units)
    result: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in props:
            result[props["Id"]] = props
    return result

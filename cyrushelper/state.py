"""What cyrushelper remembers between runs: the one owner of `{configdirectory}/cyrushelper/`.

- `unclean-stop.json`: written when a stop needed SIGKILL (a replication event may be missing).
  It stays until a reconcile (`sync_client -A` on every channel) succeeded or an operator
  acknowledged it (`cyrushelper status --ack-unclean`); `run` and `status` report it.
- `sync-log-failure.json`, its sibling with the same meaning and the same clearing rules: a
  mailbox change may have no sync log line, so no log replay can bring it to the replica. Written
  when Cyrus reported a failed sync log write (lmtpd still answers 250: "write() to …/sync/log
  failed: No space left on device"), when the sync file system was seen full or read-only while
  Cyrus ran, or when a drain found a line Cyrus's reader would drop (a cut-off or damaged line).
  It holds the latest event with its evidence, the first one and how many there were.
- `last-reconcile.json`: which markers the last reconcile (or acknowledgement) cleared, and when.
- `last-stop.json`: how the last stop ended (clean/unclean/master died), for `status`.
- `last-drain.json`: how the last `cyrushelper drain` ended, per channel.
- `drain[.CHANNEL].lock`: the drainers' channel locks (locks.py takes them; they live here).

The directory lives outside the sync directories, where Cyrus never looks. Every write is atomic
(cyrushelper.atomic): a crash leaves the old or the new file, never half.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cyrushelper.atomic import give_to_owner_of, write_atomic
from cyrushelper.config import Instance

DIRNAME = "cyrushelper"
UNCLEAN_STOP = "unclean-stop.json"
SYNC_LOG_FAILURE = "sync-log-failure.json"
LAST_STOP = "last-stop.json"
LAST_DRAIN = "last-drain.json"
LAST_RECONCILE = "last-reconcile.json"
# the markers that mean "reconcile before trusting the replica", and what clears them
RECONCILE_MARKERS = (UNCLEAN_STOP, SYNC_LOG_FAILURE)
RECONCILE_CLEARED_BY = ("a reconcile that succeeds on every channel (`run --reconcile=auto` at the next start, "
                        "`drain --reconcile=auto`), or `cyrushelper status --ack-unclean` after "
                        "`sync_client -A` by hand")
SYNC_LOG_FAILURE_MEANING = ("a mailbox change may have no sync log line (Cyrus could not write it, or the "
                            "line is damaged): no log replay recovers it")


def directory(configdirectory: os.PathLike | str) -> Path:
    """`{configdirectory}/cyrushelper` (not created)."""
    return Path(configdirectory) / DIRNAME


def ensure_directory(configdirectory: os.PathLike | str) -> Path:
    """Create the state directory on demand (mode 0750, owned like configdirectory when we are
    root, so that a later run as the cyrus user can use it too)."""
    path = directory(configdirectory)
    if not path.is_dir():
        path.mkdir(mode=0o750, exist_ok=True)
        give_to_owner_of(path, configdirectory)
    return path


def state_dir(instance: Instance) -> Path:
    return directory(instance.imapd.configdirectory)


def ensure_state_dir(instance: Instance) -> Path:
    return ensure_directory(instance.imapd.configdirectory)


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o640)
    give_to_owner_of(path, path.parent)


def read_json(path: Path) -> dict | None:
    """The file's object, None if absent; a damaged file is reported as such, not raised."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"error": f"unreadable {path.name}: {e}"}
    return data if isinstance(data, dict) else {"error": f"unexpected content in {path.name}"}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record_unclean_stop(instance: Instance, reason: str, killed_pids: list[int],
                        master_pid: int | None = None) -> Path:
    path = ensure_state_dir(instance) / UNCLEAN_STOP
    write_json_atomic(path, {
        "time": now_iso(),
        "reason": reason,
        "killed_pids": sorted(killed_pids),
        "master_pid": master_pid,
        "instance": instance.name,
        "advice": "replication events may be missing: reconcile every channel with sync_client -A",
    })
    return path


def unclean_stop(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / UNCLEAN_STOP)


def record_sync_log_failure(instance: Instance, reason: str, evidence: dict | None = None) -> Path:
    """Record the latest event that may have cost a sync log line; earlier ones stay counted."""
    path = ensure_state_dir(instance) / SYNC_LOG_FAILURE
    previous = read_json(path) or {}
    if "error" in previous:
        previous = {}
    now = now_iso()
    write_json_atomic(path, {
        "time": now,
        "reason": reason,
        "evidence": evidence or {},
        "instance": instance.name,
        "events": int(previous.get("events", 0)) + 1,
        "first_time": previous.get("first_time", now),
        "first_reason": previous.get("first_reason", reason),
        "meaning": SYNC_LOG_FAILURE_MEANING,
        "cleared_by": RECONCILE_CLEARED_BY,
    })
    return path


def sync_log_failure(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / SYNC_LOG_FAILURE)


def reconcile_markers(instance: Instance) -> dict[str, dict]:
    """The markers present, by file name: each means a reconcile must run before a clean result."""
    found = {}
    for name in RECONCILE_MARKERS:
        marker = read_json(state_dir(instance) / name)
        if marker is not None:
            found[name] = marker
    return found


def clear_reconcile_markers(instance: Instance, by: str) -> list[str]:
    """Remove every marker after a proof (`by` says which); they go to last-reconcile.json.
    Returns the names cleared."""
    markers = reconcile_markers(instance)
    if not markers:
        return []
    directory = ensure_state_dir(instance)
    write_json_atomic(directory / LAST_RECONCILE, {"time": now_iso(), "by": by, "cleared": markers})
    for name in markers:
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass
    return sorted(markers)


def last_reconcile(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / LAST_RECONCILE)


def describe_marker(name: str, marker: dict) -> str:
    """One line for a reconcile marker: what happened, when, how often."""
    if "error" in marker:
        return marker["error"]
    what = "unclean stop" if name == UNCLEAN_STOP else "sync log events may be missing"
    text = f"{what} at {marker.get('time', '?')}: {marker.get('reason', '?')}"
    events = int(marker.get("events", 1))
    if events > 1:
        first = marker.get("first_reason")
        text += f" (the latest of {events} since {marker.get('first_time', '?')}" + \
            (f"; the first: {first})" if first and first != marker.get("reason") else ")")
    return text


def record_last_stop(instance: Instance, result: dict) -> None:
    path = ensure_state_dir(instance) / LAST_STOP
    write_json_atomic(path, {"time": now_iso(), **result})


def last_stop(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / LAST_STOP)


def record_last_drain(instance: Instance, result: dict) -> Path:
    path = ensure_state_dir(instance) / LAST_DRAIN
    write_json_atomic(path, result)
    return path


def last_drain(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / LAST_DRAIN)

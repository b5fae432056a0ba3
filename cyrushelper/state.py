"""What cyrushelper remembers between runs: the one owner of `{configdirectory}/cyrushelper/`.

- `unclean-stop.json`, the unclean-stop marker. It means exactly this: a Cyrus process that may
  have been writing mailbox data was killed before it reached a safe point (SIGKILL after our stop
  deadline, or systemd's SIGKILL of the unit's processes). Cyrus writes a replication event just
  *after* the mailbox index commit (imap/mailbox.c mailbox_commit), so a change may be on disk
  without its sync log line: replaying the sync log cannot bring it to the replica, only a full
  comparison can (`sync_client -A`, or the switchover proof). It does NOT mean "the helper was
  killed": a `cyrushelper run` killed after Cyrus had stopped cleanly loses nothing, and the
  ExecStopPost drain replays whatever the log holds. But a `run` killed while master runs does
  mean Cyrus was killed: systemd (252, KillMode=mixed; measured) then SIGKILLs
  every process left in the unit at once ("Killing process N (master) with signal SIGKILL"), so
  the drain records it, with this start's master PID (run.json) as evidence.
  The marker holds the *latest* such event with its evidence, the first one since the last
  reconcile, how many there were and how many stops followed (a clean stop after an unclean one
  does not recover anything). It is cleared only by a proof: a reconcile that succeeded on every
  channel (`run --reconcile=auto`), a switchover proof that found both sides equal, or an
  operator's `cyrushelper status --ack-unclean` after reconciling by hand; `last-reconcile.json`
  then says which marker was cleared, when and by what.
- `sync-log-failure.json`, its sibling with the same meaning and the same clearing rules (issue
  10): a mailbox change may have no sync log line. Written when Cyrus reported a failed sync log
  write (lmtpd still answers 250: "write() to …/sync/log failed: No space left on device"), when
  the sync file system was seen full or read-only while Cyrus ran, or when a drain found a line
  Cyrus's reader would drop (a cut-off or damaged line) or a sync log that is not a regular file.
  It holds the latest event with its evidence, the first one and how many there were. Every proof
  that clears the unclean-stop marker clears this one too (`clear_reconcile_markers`).
- `last-stop.json`: how the last stop ended (clean/unclean/master died), with the systemd
  invocation it belongs to, for `status` and for the drain's judgement above.
- `run.json`: the running invocation (master PID, systemd INVOCATION_ID), written at start: the
  evidence the drain needs when systemd killed the main process.
- `last-drain.json`: how the last `cyrushelper drain` ended, per channel.
- `role.json`: the role of a switchable instance (primary or replica), since when and why
  (role.py decides what it means; `run` reads it at every start, so it survives reboots).
- `switchover.json`: an unfinished switchover of which this instance is the old primary (the
  persisted state machine of switchover.py); `last-switchover.json` once it finished.
- `drain[.CHANNEL].lock`: the drainers' channel locks (locks.py takes them; they live here).
- `workers/` (socket mode): one status file per worker slot, written by Cyrus itself through the
  worker wrapper (worker.py has the format), and `listeners.json`: the running socket-mode
  supervisor (PID and start time) and its pools, for `status`.

The directory lives outside the sync directories, where Cyrus never looks. Every write is atomic
(cyrushelper.atomic): a crash leaves the old or the new file, never half.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cyrushelper.atomic import fsync_dir, give_to_owner_of, write_atomic
from cyrushelper.config import Instance

DIRNAME = "cyrushelper"
UNCLEAN_STOP = "unclean-stop.json"
SYNC_LOG_FAILURE = "sync-log-failure.json"
# the markers that mean "reconcile before trusting the replica"; the same proofs clear them all
RECONCILE_MARKERS = (UNCLEAN_STOP, SYNC_LOG_FAILURE)
LAST_STOP = "last-stop.json"
LAST_DRAIN = "last-drain.json"
WORKERS = "workers"
LISTENERS = "listeners.json"
LAST_RECONCILE = "last-reconcile.json"
RUN = "run.json"
ROLE = "role.json"
SWITCHOVER = "switchover.json"
LAST_SWITCHOVER = "last-switchover.json"
UNCLEAN_HISTORY = 10            # events kept in the marker (the latest first)
UNCLEAN_MEANING = ("a Cyrus process was killed before a safe point: a mailbox change may have no sync "
                   "log line, which no log replay recovers")
UNCLEAN_CLEARED_BY = ("a reconcile that succeeds on every channel (`run --reconcile=auto` at the next "
                      "start, `drain --reconcile=auto`), a switchover proof, or `cyrushelper status "
                      "--ack-unclean` after `sync_client -A` by hand")
RECONCILE_CLEARED_BY = UNCLEAN_CLEARED_BY
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


def workers_dir(configdirectory: os.PathLike | str) -> Path:
    return directory(configdirectory) / WORKERS


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


def invocation_id() -> str | None:
    """systemd's id of the current start of the unit (the same for ExecStart and ExecStopPost)."""
    return os.environ.get("INVOCATION_ID") or None


def record_unclean_stop(instance: Instance, reason: str, killed_pids: list[int],
                        master_pid: int | None = None, evidence: dict | None = None) -> Path:
    """Record the latest unclean event; earlier ones since the last reconcile stay counted."""
    path = ensure_state_dir(instance) / UNCLEAN_STOP
    previous = unclean_stop(instance) or {}
    if "error" in previous:
        previous = {}
    event = {"time": now_iso(), "reason": reason, "killed_pids": sorted(killed_pids),
             "master_pid": master_pid, "invocation_id": invocation_id(), "evidence": evidence or {}}
    history = [event] + [e for e in previous.get("history", []) if isinstance(e, dict)]
    write_json_atomic(path, {
        **event,
        "instance": instance.name,
        "events": int(previous.get("events", 0)) + 1,
        "first_time": previous.get("first_time", event["time"]),
        "stops_since": 0,
        "history": history[:UNCLEAN_HISTORY],
        "meaning": UNCLEAN_MEANING,
        "cleared_by": UNCLEAN_CLEARED_BY,
        "advice": "replication events may be missing: reconcile every channel with sync_client -A",
    })
    return path


def unclean_stop(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / UNCLEAN_STOP)


def clear_unclean_stop(instance: Instance, by: str = "cyrushelper status --ack-unclean") -> bool:
    """Remove the marker -- and its sibling sync-log-failure.json, cleared by the same proofs --
    after a proof (`by` says which); the cleared markers go to last-reconcile.json. False if there
    was none."""
    return bool(clear_reconcile_markers(instance, by))


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
        "invocation_id": invocation_id(),
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
    """Remove every reconcile marker after a proof (`by` says which); they go to
    last-reconcile.json (`cleared_marker` is the unclean-stop one, as before). Returns the names."""
    markers = reconcile_markers(instance)
    if not markers:
        return []
    directory = ensure_state_dir(instance)
    write_json_atomic(directory / LAST_RECONCILE, {"time": now_iso(), "by": by, "cleared": markers,
                                                   "cleared_marker": markers.get(UNCLEAN_STOP)})
    for name in markers:
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass
    return sorted(markers)


def last_reconcile(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / LAST_RECONCILE)


def record_run(instance: Instance, master_pid: int) -> None:
    path = ensure_state_dir(instance) / RUN
    write_json_atomic(path, {"time": now_iso(), "instance": instance.name, "master_pid": master_pid,
                             "invocation_id": invocation_id(), "helper_pid": os.getpid()})


def last_run(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / RUN)


def record_last_stop(instance: Instance, result: dict) -> None:
    directory = ensure_state_dir(instance)
    write_json_atomic(directory / LAST_STOP, {"time": now_iso(), "invocation_id": invocation_id(), **result})
    marker = unclean_stop(instance)
    if marker is not None and "error" not in marker and result.get("result") != "unclean" \
            and not result.get("unclean"):
        # a later stop, clean or not, recovers nothing: say how many there were
        marker["stops_since"] = int(marker.get("stops_since", 0)) + 1
        write_json_atomic(directory / UNCLEAN_STOP, marker)


def describe_unclean(marker: dict) -> str:
    """One honest sentence: which stop, how many since the last reconcile, what followed."""
    if "error" in marker:
        return marker["error"]
    events = int(marker.get("events", 1))
    since = int(marker.get("stops_since", 0))
    text = f"unclean stop at {marker.get('time', '?')} ({marker.get('reason', '?')})"
    if events > 1:
        text += f", the latest of {events} since the last reconcile (first {marker.get('first_time', '?')})"
    if since:
        text += f"; {since} later stop(s) did not recover those events"
    return text


def describe_sync_log_failure(marker: dict) -> str:
    if "error" in marker:
        return marker["error"]
    text = f"sync log events may be missing at {marker.get('time', '?')}: {marker.get('reason', '?')}"
    events = int(marker.get("events", 1))
    if events > 1:
        first = marker.get("first_reason")
        text += f" (the latest of {events} since {marker.get('first_time', '?')}" + \
            (f"; the first: {first})" if first and first != marker.get("reason") else ")")
    return text


def describe_marker(name: str, marker: dict) -> str:
    """One line for a reconcile marker: what happened, when, how often."""
    return describe_unclean(marker) if name == UNCLEAN_STOP else describe_sync_log_failure(marker)


def last_stop(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / LAST_STOP)


def record_last_drain(instance: Instance, result: dict) -> Path:
    path = ensure_state_dir(instance) / LAST_DRAIN
    write_json_atomic(path, result)
    return path


def last_drain(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / LAST_DRAIN)


def record_listeners(instance: Instance, data: dict) -> None:
    write_json_atomic(ensure_state_dir(instance) / LISTENERS, {"time": now_iso(), **data})


def listeners(instance: Instance) -> dict | None:
    return read_json(state_dir(instance) / LISTENERS)


def clear_listeners(instance: Instance) -> bool:
    """Forget socket mode (a master-mode start): `status` then reports master again."""
    return _remove(state_dir(instance) / LISTENERS)


def _remove(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
# --------------------------------------------------------------------------- role and switchover

def read_role(configdirectory: os.PathLike | str) -> dict | None:
    return read_json(directory(configdirectory) / ROLE)


def write_role(configdirectory: os.PathLike | str, role: str, by: str, **extra) -> dict:
    record = {"role": role, "since": now_iso(), "by": by, **extra}
    write_json_atomic(ensure_directory(configdirectory) / ROLE, record)
    return record


def read_switchover(configdirectory: os.PathLike | str) -> dict | None:
    return read_json(directory(configdirectory) / SWITCHOVER)


def write_switchover(configdirectory: os.PathLike | str, record: dict) -> None:
    write_json_atomic(ensure_directory(configdirectory) / SWITCHOVER, record)


def finish_switchover(configdirectory: os.PathLike | str, record: dict) -> None:
    """The switchover ended (done, rolled back or aborted): keep it as last-switchover.json."""
    base = ensure_directory(configdirectory)
    write_json_atomic(base / LAST_SWITCHOVER, record)
    try:
        os.unlink(base / SWITCHOVER)
    except FileNotFoundError:
        pass
    fsync_dir(base)


def last_switchover(configdirectory: os.PathLike | str) -> dict | None:
    return read_json(directory(configdirectory) / LAST_SWITCHOVER)

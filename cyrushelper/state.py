"""What cyrushelper remembers between runs: the one owner of `{configdirectory}/cyrushelper/`.

- `unclean-stop.json`: written when a stop needed SIGKILL (a replication event may be missing).
  It stays until a reconcile (`sync_client -A` on every channel) succeeded or an operator
  acknowledged it (`cyrushelper status --ack-unclean`); `run` and `status` report it.
- `last-stop.json`: how the last stop ended (clean/unclean/master died), for `status`.
- `last-drain.json`: how the last `cyrushelper drain` ended, per channel.
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

from cyrushelper.atomic import give_to_owner_of, write_atomic
from cyrushelper.config import Instance

DIRNAME = "cyrushelper"
UNCLEAN_STOP = "unclean-stop.json"
LAST_STOP = "last-stop.json"
LAST_DRAIN = "last-drain.json"
WORKERS = "workers"
LISTENERS = "listeners.json"


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


def clear_unclean_stop(instance: Instance) -> bool:
    try:
        os.unlink(state_dir(instance) / UNCLEAN_STOP)
        return True
    except FileNotFoundError:
        return False


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

"""The Cyrus configuration model: the one place cyrushelper learns paths and settings from.

Two parsers mirror what Cyrus itself reads (lib/libconfig.c config_read_file for imapd.conf,
master/masterconf.c for cyrus.conf, checked against 3.6.1 and 3.13). Whatever Cyrus refuses we
refuse too; where Cyrus silently ignores or misreads something (a section whose '{' is on the next
line, a relative @include, an unbalanced brace) we refuse it as well, because a stop path built on a
misread configuration loses events. Every refusal is a ConfigError whose text is "path:line: message".
`Instance` joins both files and derives what the stop path needs: the sync directory of every
channel, the pid file, the ready signal, the sync_client/sync_server entries and the listeners.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_IMAPD_CONF = Path("/etc/imapd.conf")
DEFAULT_CYRUS_CONF = Path("/etc/cyrus.conf")

SECTIONS = ("START", "SERVICES", "EVENTS", "DAEMON")

# Cyrus's Uisspace(): C isspace() in the C locale. Python's str.strip() would also eat \x85, \xa0 …
SPACE = " \t\n\v\f\r"

_KEY_RE = re.compile(r"@?[A-Za-z0-9_-]*")


class ConfigError(Exception):
    """A configuration problem Cyrus would refuse too (or one that would silently break a stop)."""

    def __init__(self, path: os.PathLike | str, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


def parse_switch(value: str) -> bool | None:
    """Cyrus's boolean reading (config_parse_switch): only the first one or two characters count,
    case-sensitively: "yes", "true", "on", "1", "tomato" are true; "Yes" is an error."""
    if value[:1] in ("0", "n", "f") or value[:2] == "of":
        return False
    if value[:1] in ("1", "y", "t") or value[:2] == "on":
        return True
    return None


# Limits on what we read as a configuration file. Cyrus has neither: it would follow an @include
# chain until its stack ran out (every level holds a 4 KiB line buffer) and read /dev/zero forever.
MAX_CONFIG_BYTES = 4 << 20       # a real imapd.conf or cyrus.conf is a few KiB
MAX_INCLUDE_DEPTH = 32           # nobody writes deeper chains by hand


def _read_lines(path: str, site: tuple[str, int | None] | None = None) -> list[str]:
    """The file's lines split at '\\n' as fgets() sees them (the last item is what follows the last
    newline). `site` is the (file, line) that named this file, for the error message.

    Only a regular file is read: a FIFO would block forever (and a device like /dev/zero never
    end), so the type is checked before opening and again on the opened descriptor (O_NONBLOCK:
    opening a FIFO must not wait for a writer either)."""
    where = site or (path, None)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(*where, f"{path} is {_file_kind(mode)}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(*where, f"{path} is {_file_kind(st.st_mode)}, not a regular file")
            data = f.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a NUL in an @include path
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(*where, f"cannot read {path}: {reason}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(*where, f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a "
                                  "configuration file")
    lines = data.decode("utf-8", errors="surrogateescape").split("\n")
    for number, line in enumerate(lines, 1):
        if "\0" in line:
            # C reads a line only up to a NUL: whatever follows it on the line would be lost.
            raise ConfigError(path, number, "NUL byte in the line (Cyrus would ignore the rest of it)")
    return lines


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


# --------------------------------------------------------------------------- imapd.conf

@dataclass(frozen=True)
class Option:
    key: str
    value: str
    path: str
    line: int


@dataclass(frozen=True)
class SourcedPath:
    """A path the configuration yields, with the option it comes from (for messages that point the
    operator at the right line). `option` is None for a path Cyrus derives from configdirectory."""

    path: Path
    option: str | None
    where: tuple[str, int | None]


@dataclass(frozen=True)
class Channel:
    """One replication channel: `name` is None for the default (unnamed) channel."""

    name: str | None
    sync_dir: Path
    host: str | None
    port: str | None
    shutdown_file: Path | None

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "default"

    @property
    def log(self) -> Path:
        return self.sync_dir / "log"

    @property
    def log_run(self) -> Path:
        return self.sync_dir / "log-run"

    @property
    def replica_address(self) -> str:
        if not self.host:
            return "(no sync_host)"
        return f"{self.host}:{self.port}" if self.port else self.host


# Options naming a directory a running Cyrus writes into, with the default Cyrus uses when unset.
# temp_path (default /tmp) is listed only when set: the unit gives Cyrus a private /tmp.
_WRITABLE_DIRS = {
    "proc_path": "{configdirectory}/proc",
    "mboxname_lockpath": "{configdirectory}/lock",
    "sievedir": "/usr/sieve",
    "temp_path": None,
    "backup_staging_path": None,
    "prometheus_stats_dir": None,
}
# Options naming a socket or file Cyrus creates: their directory must be writable.
_WRITABLE_FILES = {
    "lmtpsocket": "{configdirectory}/socket/lmtp",
    "idlesocket": "{configdirectory}/socket/idle",
    "notifysocket": "{configdirectory}/socket/notify",
    "ptloader_sock": None,
    "master_pid_file": "{configdirectory}/master.pid",
    "master_ready_file": "{configdirectory}/master.ready",
}
# Spool partitions: partition-NAME, metapartition-NAME, archivepartition-NAME, backuppartition-NAME
# and the Xapian tiers TIERsearchpartition-NAME. All are "overflow" options: no {configdirectory}.
_PARTITION_KEY_RE = re.compile(r"(?:meta|archive|backup|[a-z0-9_]*search)?partition-.+")
_CHANNEL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_CONFIGDIR = "{configdirectory}"


class ImapdConf:
    """Parsed imapd.conf: options keyed by lower-case name, each remembering file and line."""

    def __init__(self, path: os.PathLike | str, options: dict[str, Option]):
        self.path = Path(path)
        self.options = options

    # -- raw access
    def get(self, key: str, default: str | None = None) -> str | None:
        opt = self.options.get(key.lower())
        return opt.value if opt else default

    def where(self, key: str) -> tuple[str, int | None]:
        opt = self.options.get(key.lower())
        return (opt.path, opt.line) if opt else (str(self.path), None)

    def get_bool(self, key: str, default: bool = False) -> bool:
        opt = self.options.get(key.lower())
        if opt is None:
            return default
        value = parse_switch(opt.value)
        if value is None:
            raise ConfigError(opt.path, opt.line, f"'{key}' is not a boolean: {opt.value!r} (Cyrus reads "
                                                  "yes/no, true/false, on/off, 1/0, in lower case)")
        return value

    def get_path(self, key: str, default: Path | str | None = None) -> Path | None:
        """An absolute path option; a leading {configdirectory} in it or in `default` is expanded."""
        value = self.get(key)
        if not value:
            return Path(self._expand(str(default))) if default is not None else None
        path = self._expand(value)
        if not os.path.isabs(path):
            raise ConfigError(*self.where(key), f"{key} must be an absolute path, got {value!r}")
        return Path(path)

    def channel_get(self, channel: str | None, key: str) -> str | None:
        """Per-channel options are `<channel>_<key>`, falling back to the plain key."""
        if channel:
            value = self.get(f"{channel}_{key}")
            if value is not None:
                return value
        return self.get(key)

    def _expand(self, value: str) -> str:
        # Cyrus replaces {configdirectory} only at the start of a value (case-insensitively) and
        # only in its known options, never in overflow ones (partition-*, <channel>_*).
        if value[:len(_CONFIGDIR)].lower() == _CONFIGDIR:
            return str(self.configdirectory) + value[len(_CONFIGDIR):]
        return value

    # -- derived facts
    @property
    def configdirectory(self) -> Path:
        value = self.get("configdirectory")
        if not value:
            raise ConfigError(self.path, None, "configdirectory is not set (Cyrus requires it)")
        return Path(value)

    @property
    def partitions(self) -> dict[str, Path]:
        return {k[len("partition-"):]: Path(o.value) for k, o in self.options.items()
                if k.startswith("partition-")}

    @property
    def sync_log(self) -> bool:
        return self.get_bool("sync_log")

    @property
    def channel_names(self) -> list[str | None]:
        """sync_log_channels as Cyrus reads it (split at spaces): `""` is the default channel;
        unset = the default channel only. Listing only named channels drops the default one."""
        raw = self.get("sync_log_channels")
        if raw is None:
            return [None]
        names: list[str | None] = []
        for word in raw.split(" "):
            if not word:
                continue
            name = None if word == '""' else word
            if name is not None and not _CHANNEL_NAME_RE.fullmatch(name):
                path, line = self.where("sync_log_channels")
                raise ConfigError(path, line, f"bad channel name {name!r} in sync_log_channels "
                                              "(letters, digits, '_', '.', '-'; separate names by spaces)")
            if name not in names:
                names.append(name)
        return names

    @property
    def sync_dir(self) -> Path:
        return self.configdirectory / "sync"

    @property
    def channels(self) -> list[Channel]:
        result = []
        for name in self.channel_names:
            port_key = self._channel_key(name, "sync_port")
            port = self.get(port_key)
            if port is not None and not _valid_port(port):
                raise ConfigError(*self.where(port_key),
                                  f"{port_key} is neither a port number nor a service name: {port!r}")
            result.append(Channel(
                name=name,
                sync_dir=self.sync_dir / name if name else self.sync_dir,
                host=self.channel_get(name, "sync_host"),
                port=port,
                shutdown_file=self._shutdown_file(name),
            ))
        return result

    def _channel_key(self, channel: str | None, key: str) -> str:
        """The key sync_client reads for `channel`: `<channel>_<key>` if set, else `<key>`."""
        if channel and self.get(f"{channel}_{key}") is not None:
            return f"{channel}_{key}"
        return key

    def _shutdown_file(self, channel: str | None) -> Path | None:
        key = self._channel_key(channel, "sync_shutdown_file")
        value = self.get(key)
        if value is None:
            return None
        if key != "sync_shutdown_file" and value[:len(_CONFIGDIR)].lower() == _CONFIGDIR:
            raise ConfigError(*self.where(key), f"Cyrus does not expand {_CONFIGDIR} in per-channel "
                                                f"options: write {key} as a full path")
        return self.get_path(key)

    @property
    def master_pid_file(self) -> Path:
        # Option of Cyrus ≥ 3.10; older masters ignore it, so cyrushelper always passes `-p` itself.
        return self.get_path("master_pid_file", _WRITABLE_FILES["master_pid_file"])

    @property
    def master_ready_file(self) -> Path:
        # Cyrus ≥ 3.10 only: older masters never create it.
        return self.get_path("master_ready_file", _WRITABLE_FILES["master_ready_file"])

    @property
    def shutdown_fence_file(self) -> Path:
        return self.configdirectory / "msg" / "shutdown"

    @property
    def proc_path(self) -> Path:
        return self.get_path("proc_path", _WRITABLE_DIRS["proc_path"])

    def _partition_path(self, key: str) -> Path:
        value = self.options[key].value
        if not os.path.isabs(value):
            hint = (f" (Cyrus does not expand {_CONFIGDIR} in partition options)"
                    if value[:len(_CONFIGDIR)].lower() == _CONFIGDIR else "")
            raise ConfigError(*self.where(key), f"{key} must be an absolute path, got {value!r}{hint}")
        return Path(value)

    def sourced_path(self, key: str, default: str | None = None) -> SourcedPath | None:
        """get_path() with where the value comes from: the option's line, or for an unset option
        Cyrus's default (derived from configdirectory: that line)."""
        path = self.get_path(key, default)
        if path is None:
            return None
        if key.lower() in self.options:
            return SourcedPath(path, key, self.where(key))
        return SourcedPath(path, None, self.where("configdirectory"))

    @property
    def writable_paths(self) -> list[SourcedPath]:
        """Every directory a running instance writes to (for the unit's ReadWritePaths=), in a
        stable order without duplicate paths, each with its origin. Directories only: for a socket,
        database or pid file its parent. Paths inside another listed one are kept (the unit may have
        to create them)."""
        found = [SourcedPath(self.configdirectory, "configdirectory", self.where("configdirectory"))]
        found += [SourcedPath(self._partition_path(k), k, self.where(k))
                  for k in self.options if _PARTITION_KEY_RE.fullmatch(k)]
        for key, default in _WRITABLE_DIRS.items():
            found.append(self.sourced_path(key, default))
        file_keys = list(_WRITABLE_FILES.items())
        file_keys += [(k, None) for k in self.options if k.endswith("_db_path")]  # mboxlist, quota …
        for key, default in file_keys:
            item = self.sourced_path(key, default)
            if item is not None:
                found.append(SourcedPath(item.path.parent, item.option, item.where))
        for channel in self.channels:  # sync_client deletes the shutdown file it found
            if channel.shutdown_file is not None:
                key = self._channel_key(channel.name, "sync_shutdown_file")
                found.append(SourcedPath(channel.shutdown_file.parent, key, self.where(key)))
        unique: list[SourcedPath] = []
        for item in found:
            if item is not None and all(u.path != item.path for u in unique):
                unique.append(item)
        return unique


def parse_imapd_conf(path: os.PathLike | str, _seen: set[str] | None = None) -> ImapdConf:
    """Parse imapd.conf as Cyrus's config_read_file does (incl. `@include` and `\\` lines)."""
    path = str(path)
    options: dict[str, Option] = {}
    _read_imapd_file(path, options, _seen if _seen is not None else set(), None)
    conf = ImapdConf(path, options)
    _validate_imapd(conf)
    return conf


def _read_imapd_file(path: str, options: dict[str, Option], seen: set[str],
                     site: tuple[str, int] | None, depth: int = 0) -> None:
    """Add the options of `path` to `options`; `site` is the @include line that named it, `depth`
    how many @include lines lead here."""
    identity = os.path.realpath(path)
    if identity in seen:
        raise ConfigError(*(site or (path, None)), f"{path} is included twice (Cyrus refuses that)")
    if depth > MAX_INCLUDE_DEPTH:
        raise ConfigError(*site, f"@include nested more than {MAX_INCLUDE_DEPTH} files deep: "
                                 "refusing (flatten the chain)")
    seen.add(identity)
    lines = _read_lines(path, site)
    pending: str | None = None
    start = 0
    for number, raw in enumerate(lines, 1):
        newline_ended = number < len(lines)
        if pending is None:
            start, pending = number, raw
        else:
            pending += raw
        if newline_ended and pending.endswith("\\"):  # continuation: joined without the '\'
            pending = pending[:-1]
            continue
        text, pending = pending, None
        if not newline_ended and raw == "" and start < number and not text.lstrip(SPACE).startswith("#"):
            # The file ends right after a '\' line: fgets() hits EOF and Cyrus drops the option.
            raise ConfigError(path, start, "the last line ends with '\\' (continued on the next line) "
                                           "but the file ends there: Cyrus would ignore this option")
        _read_imapd_line(path, start, text, options, seen, depth)


def _read_imapd_line(path: str, lineno: int, text: str,
                     options: dict[str, Option], seen: set[str], depth: int) -> None:
    stripped = text.lstrip(SPACE)
    if not stripped or stripped.startswith("#"):
        return
    m = _KEY_RE.match(stripped)
    key = m.group(0)
    rest = stripped[m.end():]
    if not rest.startswith(":"):
        if key and rest[:1] in tuple(SPACE) and rest.lstrip(SPACE).startswith(":"):
            reason = f"no space allowed between the option name {key!r} and ':'"
        elif key and rest.lstrip(SPACE).startswith("="):
            reason = f"options are written 'name: value', not 'name = value' ({key!r})"
        else:
            reason = f"invalid option name (expected 'name: value'): {stripped[:60]!r}"
        raise ConfigError(path, lineno, reason)
    if key in ("", "@"):
        raise ConfigError(path, lineno, f"option name missing before ':': {stripped[:60]!r}")
    key = key.lower()
    value = rest[1:].strip(SPACE)
    if not value:
        raise ConfigError(path, lineno, f"option '{key}' has an empty value (Cyrus refuses that)")
    if key.startswith("@"):
        if key != "@include":
            raise ConfigError(path, lineno, f"invalid directive '{key}' (Cyrus knows only @include)")
        if not os.path.isabs(value):
            # Cyrus opens it relative to each process's working directory, not to this file.
            raise ConfigError(path, lineno, f"@include {value!r} must be an absolute path (Cyrus resolves "
                                            "a relative one against the working directory)")
        _read_imapd_file(value, options, seen, (path, lineno), depth + 1)
        return
    if key in options:
        first = options[key]
        at = f"line {first.line}" if first.path == path else f"{first.path}:{first.line}"
        raise ConfigError(path, lineno, f"option '{key}' is set twice (first on {at}); Cyrus refuses this")
    options[key] = Option(key, value, path, lineno)


# Options Cyrus types as switches: a bad value there makes every Cyrus process exit at start.
_SWITCH_OPTIONS = ("sync_log", "sync_try_imap", "allowplaintext", "altnamespace", "unixhierarchysep",
                   "sync_log_chain", "hashimapspool", "replicaonly", "sieveusehomedir", "archive_enabled",
                   "allowanonymouslogin", "debug", "master_bind_errors_fatal")
_INT_OPTIONS = ("sync_batchsize", "maxchild", "popminpoll")
# strtol(value, &end, 0) consuming the whole value: decimal, 0x hex, 0 octal.
_C_INT_RE = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _valid_port(port: str) -> bool:
    if port.isascii() and port.isdigit():
        return len(port) <= 5 and 0 < int(port) < 65536
    return re.fullmatch(r"[A-Za-z][A-Za-z0-9_.+-]*", port) is not None


def _validate_imapd(conf: ImapdConf) -> None:
    configdirectory = conf.get("configdirectory")
    if configdirectory is None:
        raise ConfigError(conf.path, None, "configdirectory is not set (Cyrus requires it)")
    if not os.path.isabs(configdirectory):
        raise ConfigError(*conf.where("configdirectory"), "configdirectory must be an absolute path")
    for key in _SWITCH_OPTIONS:
        conf.get_bool(key)
    for key in _INT_OPTIONS:
        value = conf.get(key)
        if value is not None and not _C_INT_RE.fullmatch(value):
            raise ConfigError(*conf.where(key), f"'{key}' is not an integer: {value!r}")
    port = conf.get("sync_port")
    if port is not None and not _valid_port(port):
        raise ConfigError(*conf.where("sync_port"),
                          f"sync_port is neither a port number nor a service name: {port!r}")
    default_partition = conf.get("defaultpartition")
    if default_partition is not None:
        if not (default_partition.isascii() and default_partition.isalnum()):
            raise ConfigError(*conf.where("defaultpartition"),
                              "defaultpartition may contain only letters and digits (Cyrus refuses it)")
        if f"partition-{default_partition.lower()}" not in conf.options:
            raise ConfigError(*conf.where("defaultpartition"),
                              f"defaultpartition is {default_partition!r} but partition-"
                              f"{default_partition.lower()} is not set (every mail service would exit)")
    # Evaluating what the stop path derives reports bad channel names, ports and paths now.
    conf.channels  # noqa: B018
    conf.writable_paths  # noqa: B018


# --------------------------------------------------------------------------- cyrus.conf

@dataclass(frozen=True)
class Listen:
    """A `listen=` value: TCP (host may be None = all addresses) or a UNIX socket path."""

    raw: str
    kind: str  # "tcp" or "unix"
    host: str | None = None
    port: str | None = None
    path: Path | None = None

    @property
    def port_number(self) -> int | None:
        if self.port is None:
            return None
        if self.port.isdigit():
            return int(self.port)
        try:
            return socket.getservbyname(self.port, "tcp")
        except OSError:
            return None

    def connect_address(self) -> tuple[int, object]:
        """(address family, address) a client uses to reach this listener."""
        if self.kind == "unix":
            return socket.AF_UNIX, str(self.path)
        host = self.host or "127.0.0.1"
        if host in ("*", "0.0.0.0"):
            host = "127.0.0.1"
        if host in ("[::]", "::"):
            host = "::1"
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return family, (host, self.port_number)

    def __str__(self) -> str:
        return self.raw


_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def parse_listen(raw: str) -> Listen:
    """Interpret `listen=` like master/master.c: a leading '/' means a UNIX socket; else
    `[v6addr]:port`, `host:port` (split at the last ':') or just a port (number or service name).
    Raises ValueError for what master would refuse or silently disable."""
    if raw.startswith("/"):
        if len(raw.encode("utf-8", "surrogateescape")) > _SUN_PATH_MAX:
            raise ValueError(f"UNIX socket path {raw!r} is longer than {_SUN_PATH_MAX} bytes "
                             "(master disables the service)")
        return Listen(raw, "unix", path=Path(raw))
    if "/" in raw:
        raise ValueError(f"listen={raw!r}: a UNIX socket path must be absolute (start with '/')")
    if raw.startswith("["):
        end = raw.rfind("]")
        if end < 0 or not raw[end + 1:].startswith(":") or not raw[end + 2:]:
            raise ValueError(f"bad IPv6 listen address {raw!r} (expected [addr]:port)")
        host, port = raw[1:end], raw[end + 2:]
    elif ":" in raw:
        host, _, port = raw.rpartition(":")
        if not host or not port:
            raise ValueError(f"bad listen address {raw!r} (expected host:port)")
    else:
        host, port = None, raw
    if not _valid_port(port):
        raise ValueError(f"listen={raw!r}: {port!r} is neither a port number (1-65535) nor a service name")
    return Listen(raw, "tcp", host=host, port=port)


_CMD_SPLIT_RE = re.compile(r"[ \t\r\n]+")  # master splits cmd at these, with no quoting at all


@dataclass(frozen=True)
class Entry:
    section: str
    name: str
    args: dict[str, str]
    path: str
    line: int

    @property
    def cmd(self) -> list[str]:
        return [w for w in _CMD_SPLIT_RE.split(self.args.get("cmd", "")) if w]

    @property
    def argv(self) -> list[str]:
        """The Cyrus program's argv: Debian's `/usr/sbin/cyrus X …` wrapper is skipped."""
        words = self.cmd
        if len(words) > 1 and os.path.basename(words[0]) == "cyrus":
            return words[1:]
        return words

    @property
    def program(self) -> str:
        """The Cyrus program run (basename): `/usr/sbin/cyrus X` counts as X."""
        argv = self.argv
        return os.path.basename(argv[0]) if argv else ""

    @property
    def config_path(self) -> Path | None:
        """`-C FILE` (or `-CFILE`): every Cyrus program takes it, whatever its other options."""
        words = self.argv
        for i, w in enumerate(words[1:], 1):
            if w == "-C" and i + 1 < len(words):
                return Path(words[i + 1])
            if w.startswith("-C") and len(w) > 2:
                return Path(w[2:])
        return None

    @property
    def listen(self) -> Listen | None:
        raw = self.args.get("listen")
        return parse_listen(raw) if raw else None

    @property
    def stream(self) -> bool:
        """Whether the listener accepts connections (TCP, or a UNIX socket with proto=tcp)."""
        proto = self.args.get("proto", "tcp")
        listen = self.listen
        if listen is not None and listen.kind == "unix":
            return proto == "tcp"  # master makes any other proto a datagram socket
        return proto.startswith("tcp")

    def _int(self, key: str, default: int) -> int:
        value = self.args.get(key)
        return int(value) if value is not None else default

    @property
    def prefork(self) -> int:
        return self._int("prefork", 0)

    @property
    def maxchild(self) -> int:
        return self._int("maxchild", -1)

    @property
    def wait(self) -> bool:
        return bool(parse_switch(self.args.get("wait", "n")))


class CyrusConf:
    def __init__(self, path: os.PathLike | str, entries: list[Entry]):
        self.path = Path(path)
        self.entries = entries

    def section(self, name: str) -> list[Entry]:
        return [e for e in self.entries if e.section == name]

    @property
    def services(self) -> list[Entry]:
        return self.section("SERVICES")

    def by_program(self, program: str) -> list[Entry]:
        return [e for e in self.entries if e.program == program]

    @property
    def sync_clients(self) -> list[Entry]:
        return self.by_program("sync_client")

    @property
    def sync_servers(self) -> list[Entry]:
        return [e for e in self.services if e.program == "sync_server"]


_NAME_RE = re.compile(r"[A-Za-z0-9]+")
_ARG_KEY_RE = re.compile(r"[A-Za-z0-9]*")
_MASTER_LINE_MAX = 4094  # master reads lines with fgets(buf, 4096): longer ones are split
_MAXARGS = 64
_INT_ARGS = ("prefork", "maxchild", "maxfds", "maxforkrate", "period")
_SWITCH_ARGS = ("babysit", "wait")
_PROTOS = ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6")
# SERVICES and DAEMON entries (incl. wait=y daemons) share one name space in master.
_SHARED_NAMES = ("SERVICES", "DAEMON")
_ONE_LINE = "master reads one entry per line and has no continuation lines: join it to its entry's line"


def parse_cyrus_conf(path: os.PathLike | str) -> CyrusConf:
    """Parse cyrus.conf as master/masterconf.c does, refusing what it refuses or silently skips."""
    path = str(path)
    lines = _read_lines(path)
    entries: list[Entry] = []
    names: dict[str, int] = {}
    sections_seen: dict[str, int] = {}
    section: str | None = None
    section_line = 0
    for lineno, raw in enumerate(lines, 1):
        if len(raw.encode("utf-8", "surrogateescape")) > _MASTER_LINE_MAX:
            raise ConfigError(path, lineno, f"line longer than {_MASTER_LINE_MAX} bytes "
                                            "(master would read it as two lines)")
        text = raw.lstrip(SPACE)
        comment = text.find("#")
        if comment >= 0:  # '#' starts a comment anywhere, even inside quotes
            text = text[:comment]
        if not text.strip(SPACE):
            continue
        if section is None:
            name, empty = _section_header(path, lineno, text.rstrip(SPACE))
            if name in sections_seen:
                raise ConfigError(path, lineno, f"second {name} section (the first is on line "
                                                f"{sections_seen[name]}): master reads only the first")
            sections_seen[name] = lineno
            if not empty:
                section, section_line = name, lineno
            continue
        if text.startswith("}"):
            if text[1:].strip(SPACE):
                raise ConfigError(path, lineno, f"text after '}}' closing {section}: master ignores it "
                                                "(put it on a line of its own)")
            section = None
            continue
        entries.append(_parse_entry(path, lineno, section, text, cut_at_comment=comment >= 0))
    if section is not None:
        raise ConfigError(path, section_line, f"section {section} is never closed with '}}'")
    # Only now the meaning of each entry: an entry spread over two lines is reported at its
    # continuation line (a syntax error above), not as "imap has no listen=".
    for entry in entries:
        _check_entry(entry)
        if entry.section in _SHARED_NAMES:
            if entry.name in names:
                raise ConfigError(path, entry.line, f"entry {entry.name!r} is defined twice (first on line "
                                                    f"{names[entry.name]}): master refuses duplicate "
                                                    "SERVICES/DAEMON names")
            names[entry.name] = entry.line
    return CyrusConf(path, entries)


def _section_header(path: str, lineno: int, text: str) -> tuple[str, bool]:
    """(section name, whether it is empty `NAME { }`) of a top-level line; refuses anything else."""
    m = re.match(r"[A-Za-z0-9_]*", text)
    word, rest = m.group(0), text[m.end():].strip(SPACE)
    name = word.upper()
    if name not in SECTIONS:
        if rest.startswith("{") and word:
            raise ConfigError(path, lineno, f"unknown section {word!r}: master knows only "
                                            f"{', '.join(SECTIONS)} and silently ignores it")
        if text.startswith("}"):
            raise ConfigError(path, lineno, "'}' closes no section")
        raise ConfigError(path, lineno, f"expected a section header like 'SERVICES {{', got {text[:40]!r}")
    if word[0] != name[0]:
        raise ConfigError(path, lineno, f"section {word!r} must start with a capital {name[0]!r}: master "
                                        f"matches the first letter exactly and silently ignores it")
    if not rest:
        raise ConfigError(path, lineno, f"put '{{' on the same line as {word}: master silently ignores "
                                        "a section whose '{' is on the next line")
    if rest == "{":
        return name, False
    if re.fullmatch(r"\{[ \t\v\f\r]*\}", rest):
        return name, True
    if rest.startswith("{"):
        raise ConfigError(path, lineno, f"entries must start on the line after '{word} {{': master "
                                        "ignores anything else on the header line")
    raise ConfigError(path, lineno, f"expected '{{' after {word}, got {rest[:30]!r}")


def _parse_entry(path: str, lineno: int, section: str, text: str, cut_at_comment: bool) -> Entry:
    text = text.rstrip(SPACE)
    if text.count("{") != text.count("}"):
        if text.endswith("}") and text.count("}") == text.count("{") + 1:
            raise ConfigError(path, lineno, "put the '}' closing the section on a line of its own "
                                            "(master reads it as an argument and refuses the file)")
        raise ConfigError(path, lineno, "unbalanced '{' or '}' in an entry: master counts braces on every "
                                        "line to find sections and would silently skip later ones")
    m = _NAME_RE.match(text)
    if not m:
        if re.match(r'[A-Za-z0-9]*=|"', text):
            raise ConfigError(path, lineno, f"this line has no entry name, it looks like the rest of "
                                            f"the entry above: {_ONE_LINE}")
        raise ConfigError(path, lineno, f"bad entry name in {section}: {text[:40]!r} "
                                        "(letters and digits only)")
    name = m.group(0)
    rest = text[m.end():]
    if rest and rest[0] not in SPACE:
        if rest[0] == "=":
            raise ConfigError(path, lineno, f"'{name}=' is an argument with no entry name before it: "
                                            f"{_ONE_LINE}")
        raise ConfigError(path, lineno, f"bad character {rest[0]!r} in entry name {name + rest[0]!r} "
                                        "(master allows only letters and digits)")
    args: dict[str, str] = {}
    pos = 0
    while True:
        while pos < len(rest) and rest[pos] in SPACE:
            pos += 1
        if pos >= len(rest):
            break
        km = _ARG_KEY_RE.match(rest, pos)
        key, pos = km.group(0), km.end()
        if pos >= len(rest) or rest[pos] != "=":
            if rest[pos:] == "\\":
                raise ConfigError(path, lineno, f"'\\' at the end of entry {name!r}: {_ONE_LINE}")
            if pos >= len(rest):
                raise ConfigError(path, lineno, f"argument {key!r} of entry {name!r} has no '=value'")
            raise ConfigError(path, lineno, f"bad character {rest[pos]!r} in an argument of entry {name!r} "
                                            "(expected key=value)")
        if not key:
            raise ConfigError(path, lineno, f"argument without a name before '=' in entry {name!r}")
        pos += 1
        if rest[pos:pos + 1] == '"':
            close = rest.find('"', pos + 1)
            if close < 0:
                hint = " ('#' starts a comment even inside quotes)" if cut_at_comment else ""
                raise ConfigError(path, lineno, f"missing closing '\"' in entry {name!r}{hint}")
            value, pos = rest[pos + 1:close], close + 1
        else:
            end = pos
            while end < len(rest) and rest[end] not in SPACE:
                end += 1
            value, pos = rest[pos:end], end
        if key in args:
            raise ConfigError(path, lineno, f"argument {key!r} given twice in entry {name!r} "
                                            "(master would use the first)")
        if len(args) == _MAXARGS:
            raise ConfigError(path, lineno, f"more than {_MAXARGS} arguments in entry {name!r}")
        args[key] = value
    return Entry(section, name, args, path, lineno)


def _check_entry(entry: Entry) -> None:
    path, lineno, section, name, args = entry.path, entry.line, entry.section, entry.name, entry.args
    if not _CMD_SPLIT_RE.sub("", args.get("cmd", "")):
        raise ConfigError(path, lineno, f"entry {name!r} in {section} has no cmd=")
    for key in _INT_ARGS:
        if key in args and not re.fullmatch(r"-?[0-9]+", args[key]):
            raise ConfigError(path, lineno, f"{key}={args[key]!r} in entry {name!r} is not a number")
    for key in _SWITCH_ARGS:
        if key in args and parse_switch(args[key]) is None:
            raise ConfigError(path, lineno, f"{key}={args[key]!r} in entry {name!r} is not y/n "
                                            "(master would silently use the default)")
    if "at" in args:
        at = args["at"]
        if not re.fullmatch(r"[0-9]{1,4}", at) or int(at) // 100 > 23 or int(at) % 100 > 59:
            raise ConfigError(path, lineno, f"at={at!r} in entry {name!r} is not a time HHMM")
    if section == "SERVICES":
        if not args.get("listen"):
            raise ConfigError(path, lineno, f"service {name!r} has no listen=")
        proto = args.get("proto", "tcp")
        if proto not in _PROTOS:
            raise ConfigError(path, lineno, f"proto={proto!r} in service {name!r}: master knows "
                                            f"{', '.join(_PROTOS)} and disables the service otherwise")
    if "listen" in args:
        try:
            parse_listen(args["listen"])
        except ValueError as e:
            raise ConfigError(path, lineno, str(e)) from None


# --------------------------------------------------------------------------- the instance

@dataclass
class Instance:
    """One Cyrus instance: its imapd.conf + cyrus.conf and what the stop path derives from them."""

    imapd: ImapdConf
    cyrus: CyrusConf
    name: str = "default"
    warnings: list[str] = field(default_factory=list)
    # A switchable instance (issue 8) has one cyrus.conf per role; `cyrus` is the one of `role`.
    role: str | None = None
    cyrus_by_role: dict[str, CyrusConf] = field(default_factory=dict)

    @property
    def switchable(self) -> bool:
        return bool(self.cyrus_by_role)

    @classmethod
    def load(cls, imapd_conf: os.PathLike | str = DEFAULT_IMAPD_CONF,
             cyrus_conf: os.PathLike | str = DEFAULT_CYRUS_CONF, name: str = "default") -> Instance:
        inst = cls(parse_imapd_conf(imapd_conf), parse_cyrus_conf(cyrus_conf), name)
        inst.check_children_config()
        return inst

    def check_children_config(self) -> None:
        # master does not pass its -C to children: a child without -C reads /etc/imapd.conf.
        mine = os.path.realpath(self.imapd.path)
        for e in self.cyrus.entries:
            cp = e.config_path
            if cp is None and mine != os.path.realpath(DEFAULT_IMAPD_CONF):
                self.warnings.append(f"{e.path}:{e.line}: {e.section} entry {e.name!r} has no -C; it "
                                     f"will read {DEFAULT_IMAPD_CONF}, not {self.imapd.path}")
            elif cp is not None and os.path.realpath(cp) != mine:
                self.warnings.append(f"{e.path}:{e.line}: {e.section} entry {e.name!r} uses -C {cp}, "
                                     f"not {self.imapd.path}")

    # -- facts the stop path needs
    @property
    def channels(self) -> list[Channel]:
        return self.imapd.channels if self.imapd.sync_log else []

    @property
    def sync_dirs(self) -> list[Path]:
        return [c.sync_dir for c in self.channels]

    @property
    def pid_file(self) -> Path:
        return self.imapd.master_pid_file

    @property
    def ready_file(self) -> Path:
        return self.imapd.master_ready_file

    @property
    def fence_file(self) -> Path:
        return self.imapd.shutdown_fence_file

    @property
    def sync_client_entries(self) -> list[Entry]:
        return self.cyrus.sync_clients

    @property
    def sync_server_entries(self) -> list[Entry]:
        return self.cyrus.sync_servers

    @property
    def listeners(self) -> list[tuple[Entry, Listen]]:
        """SERVICES listeners a client can connect to (datagram ones excluded: nothing to accept)."""
        result = []
        for e in self.cyrus.services:
            listen = e.listen
            if listen is not None and e.stream:
                result.append((e, listen))
        return result

    @property
    def is_replica(self) -> bool:
        if self.role is not None:
            return self.role == "replica"
        return bool(self.sync_server_entries) or self.imapd.get_bool("replicaonly")

    def summary(self) -> dict:
        return {
            "instance": self.name,
            "imapd_conf": str(self.imapd.path),
            "cyrus_conf": str(self.cyrus.path),
            "configdirectory": str(self.imapd.configdirectory),
            "pid_file": str(self.pid_file),
            "ready_file": str(self.ready_file),
            "fence_file": str(self.fence_file),
            "sync_log": self.imapd.sync_log,
            "channels": [{"name": c.label, "sync_dir": str(c.sync_dir), "replica": c.replica_address}
                         for c in self.channels],
            "listeners": [{"service": e.name, "listen": str(li)} for e, li in self.listeners],
            "sync_clients": [e.name for e in self.sync_client_entries],
            "sync_servers": [e.name for e in self.sync_server_entries],
            "warnings": self.warnings,
        }

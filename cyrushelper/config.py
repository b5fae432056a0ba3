"""The Cyrus configuration model: the one place cyrushelper learns paths and settings from.

Two parsers mirror what Cyrus itself accepts (lib/libconfig.c for imapd.conf, master/masterconf.c
for cyrus.conf), so a file we accept is a file Cyrus accepts and every refusal names file:line.
`Instance` joins both files and derives what the stop path needs: the sync directory of every
channel, the pid file, the ready signal, the sync_client/sync_server entries and the listeners.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_IMAPD_CONF = Path("/etc/imapd.conf")
DEFAULT_CYRUS_CONF = Path("/etc/cyrus.conf")

# Where distributions install the Cyrus service binaries (Debian, Fedora/RHEL, upstream default).
CYRUS_BIN_DIRS = ("/usr/lib/cyrus/bin", "/usr/libexec/cyrus-imapd", "/usr/lib/cyrus-imapd",
                  "/usr/local/libexec/cyrus-imapd")

SECTIONS = ("START", "SERVICES", "EVENTS", "DAEMON")

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
    """Cyrus's boolean reading (config_parse_switch): only the first one or two characters count."""
    if value[:1] in ("0", "n", "f") or value[:2] == "of":
        return False
    if value[:1] in ("1", "y", "t") or value[:2] == "on":
        return True
    return None


def cyrus_bin_dir() -> Path:
    """The directory holding master, sync_client … ($CYRUSHELPER_CYRUS_BINDIR overrides)."""
    override = os.environ.get("CYRUSHELPER_CYRUS_BINDIR")
    if override:
        return Path(override)
    for candidate in CYRUS_BIN_DIRS:
        if os.path.isfile(os.path.join(candidate, "master")):
            return Path(candidate)
    return Path(CYRUS_BIN_DIRS[0])


# --------------------------------------------------------------------------- imapd.conf

@dataclass(frozen=True)
class Option:
    key: str
    value: str
    path: str
    line: int


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
            raise ConfigError(opt.path, opt.line, f"'{key}' is not a boolean: {opt.value!r}")
        return value

    def get_path(self, key: str, default: Path | None = None) -> Path | None:
        value = self.get(key)
        return Path(self._expand(value)) if value else default

    def channel_get(self, channel: str | None, key: str) -> str | None:
        """Per-channel options are `<channel>_<key>`, falling back to the plain key."""
        if channel:
            value = self.get(f"{channel}_{key}")
            if value is not None:
                return value
        return self.get(key)

    def _expand(self, value: str) -> str:
        # Newer Cyrus defaults use {configdirectory}; accept it in operator values too.
        return value.replace("{configdirectory}", str(self.configdirectory))

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
        """sync_log_channels as Cyrus reads it: `""` is the default channel; unset = default only."""
        raw = self.get("sync_log_channels")
        if raw is None:
            return [None]
        names: list[str | None] = []
        for word in raw.split():
            name = None if word == '""' else word
            if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                path, line = self.where("sync_log_channels")
                raise ConfigError(path, line, f"bad channel name {name!r} in sync_log_channels")
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
            shutdown = self.channel_get(name, "sync_shutdown_file")
            result.append(Channel(
                name=name,
                sync_dir=self.sync_dir / name if name else self.sync_dir,
                host=self.channel_get(name, "sync_host"),
                port=self.channel_get(name, "sync_port"),
                shutdown_file=Path(self._expand(shutdown)) if shutdown else None,
            ))
        return result

    @property
    def master_pid_file(self) -> Path:
        return self.get_path("master_pid_file", self.configdirectory / "master.pid")

    @property
    def master_ready_file(self) -> Path:
        return self.get_path("master_ready_file", self.configdirectory / "master.ready")

    @property
    def shutdown_fence_file(self) -> Path:
        return self.configdirectory / "msg" / "shutdown"

    @property
    def proc_path(self) -> Path:
        return self.get_path("proc_path", self.configdirectory / "proc")

    @property
    def writable_paths(self) -> list[Path]:
        """Every directory a running instance writes to (for the unit's ReadWritePaths=)."""
        paths = [self.configdirectory, *self.partitions.values()]
        for key in ("proc_path", "mboxname_lockpath", "sievedir", "lmtpsocket", "idlesocket",
                    "notifysocket", "tls_sessions_db_path", "duplicate_db_path", "statuscache_db_path",
                    "ptscache_db_path", "tls_sessions_db_path", "metapartition-default"):
            value = self.get(key)
            if value:
                path = Path(self._expand(value))
                paths.append(path.parent if key.endswith("socket") or key.endswith("db_path") else path)
        for key, opt in self.options.items():
            if key.startswith(("metapartition-", "archivepartition-", "backuppartition-")):
                paths.append(Path(opt.value))
        unique: list[Path] = []
        for p in paths:
            if p not in unique:
                unique.append(p)
        return unique


def parse_imapd_conf(path: os.PathLike | str, _seen: set[str] | None = None) -> ImapdConf:
    """Parse imapd.conf exactly as Cyrus's config_read_file does (incl. `@include` and `\\` lines)."""
    path = str(path)
    seen = _seen if _seen is not None else set()
    if path in seen:
        raise ConfigError(path, None, "configuration file included twice")
    seen.add(path)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            raw_lines = f.read().split("\n")
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    options: dict[str, Option] = {}
    lineno = 0
    pending = ""
    for raw in raw_lines:
        lineno += 1
        if raw.endswith("\\"):  # line continuation, joined as Cyrus does
            pending += raw[:-1]
            continue
        text, pending = pending + raw, ""
        stripped = text.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _KEY_RE.match(stripped)
        key = m.group(0)
        rest = stripped[m.end():]
        if not rest.startswith(":") or key in ("", "@"):
            raise ConfigError(path, lineno, f"invalid option name (expected 'key: value'): {stripped[:60]!r}")
        key = key.lower()
        value = rest[1:].strip()
        if not value:
            raise ConfigError(path, lineno, f"option '{key}' has an empty value")
        if key.startswith("@"):
            if key != "@include":
                raise ConfigError(path, lineno, f"invalid directive '{key}'")
            include = value if os.path.isabs(value) else os.path.join(os.path.dirname(path), value)
            included = parse_imapd_conf(include, seen)
            for k, opt in included.options.items():
                if k in options:
                    raise ConfigError(opt.path, opt.line,
                                      f"option '{k}' was specified twice (first at "
                                      f"{options[k].path}:{options[k].line})")
                options[k] = opt
            continue
        if key in options:
            first = options[key]
            raise ConfigError(path, lineno, f"option '{key}' was specified twice "
                                            f"(first at {first.path}:{first.line}); Cyrus refuses this")
        options[key] = Option(key, value, path, lineno)
    conf = ImapdConf(path, options)
    _validate_imapd(conf)
    return conf


# Options Cyrus types as switches: a bad value there makes every Cyrus process exit at start.
_SWITCH_OPTIONS = ("sync_log", "sync_try_imap", "allowplaintext", "altnamespace", "unixhierarchysep",
                   "sync_log_chain", "hashimapspool", "replicaonly")
_INT_OPTIONS = ("sync_batchsize",)


def _validate_imapd(conf: ImapdConf) -> None:
    for key in _SWITCH_OPTIONS:
        conf.get_bool(key)
    for key in _INT_OPTIONS:
        value = conf.get(key)
        if value is not None:
            try:
                int(value, 0)
            except ValueError:
                path, line = conf.where(key)
                raise ConfigError(path, line, f"'{key}' is not an integer: {value!r}") from None
    if conf.get("configdirectory") is None:
        raise ConfigError(conf.path, None, "configdirectory is not set (Cyrus requires it)")
    if not os.path.isabs(conf.get("configdirectory")):
        path, line = conf.where("configdirectory")
        raise ConfigError(path, line, "configdirectory must be an absolute path")
    port = conf.get("sync_port")
    if port is not None and not (port.isdigit() or re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", port)):
        path, line = conf.where("sync_port")
        raise ConfigError(path, line, f"sync_port is neither a number nor a service name: {port!r}")
    conf.channel_names  # noqa: B018 -- validates channel names


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


def parse_listen(raw: str) -> Listen:
    """Interpret `listen=` like master/master.c: a '/' means a UNIX path; else [host:]port."""
    if "/" in raw:
        return Listen(raw, "unix", path=Path(raw))
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or not raw[end + 1:].startswith(":") or not raw[end + 2:]:
            raise ValueError(f"bad IPv6 listen address {raw!r} (expected [addr]:port)")
        return Listen(raw, "tcp", host=raw[1:end], port=raw[end + 2:])
    if ":" in raw:
        host, _, port = raw.rpartition(":")
        if not host or not port:
            raise ValueError(f"bad listen address {raw!r} (expected host:port)")
        return Listen(raw, "tcp", host=host, port=port)
    return Listen(raw, "tcp", port=raw)


@dataclass(frozen=True)
class Entry:
    section: str
    name: str
    args: dict[str, str]
    path: str
    line: int

    @property
    def cmd(self) -> list[str]:
        return shlex.split(self.args.get("cmd", ""))

    @property
    def program(self) -> str:
        """The Cyrus program run: Debian's `/usr/sbin/cyrus X` wrapper counts as X."""
        words = self.cmd
        if not words:
            return ""
        prog = os.path.basename(words[0])
        if prog == "cyrus" and len(words) > 1:
            prog = os.path.basename(words[1])
        return prog

    @property
    def config_path(self) -> Path | None:
        words = self.cmd
        for i, w in enumerate(words):
            if w == "-C" and i + 1 < len(words):
                return Path(words[i + 1])
            if w.startswith("-C") and len(w) > 2:
                return Path(w[2:])
        return None

    @property
    def channel(self) -> str | None:
        """`-n CHANNEL` of a sync_client command, None for the default channel."""
        words = self.cmd
        for i, w in enumerate(words):
            if w == "-n" and i + 1 < len(words):
                return words[i + 1]
        return None

    @property
    def listen(self) -> Listen | None:
        raw = self.args.get("listen")
        return parse_listen(raw) if raw else None

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
_ARG_RE = re.compile(r'\s*([A-Za-z0-9]*)=("([^"]*)("?)|\S*)')
_INT_ARGS = ("prefork", "maxchild", "maxfds", "maxforkrate", "period", "babysit")


def parse_cyrus_conf(path: os.PathLike | str) -> CyrusConf:
    """Parse cyrus.conf as master/masterconf.c does, refusing what it refuses or silently skips."""
    path = str(path)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    entries: list[Entry] = []
    names: dict[tuple[str, str], int] = {}
    section: str | None = None
    section_line = 0
    for lineno, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()  # '#' starts a comment anywhere, even inside quotes
        if not text:
            continue
        if section is None:
            m = re.fullmatch(r"([A-Za-z]+)\s*\{\s*(\}?)", text)
            if not m:
                word = text.split()[0]
                if word.upper() in SECTIONS:
                    raise ConfigError(path, lineno, f"section {word} must open with '{{' on the same "
                                                    "line (master ignores it otherwise)")
                raise ConfigError(path, lineno, f"expected a section header like 'SERVICES {{', got {text[:40]!r}")
            name = m.group(1).upper()
            if name not in SECTIONS:
                raise ConfigError(path, lineno, f"unknown section {m.group(1)!r} (Cyrus knows "
                                                f"{', '.join(SECTIONS)}; master would ignore it)")
            if not m.group(2):
                section, section_line = name, lineno
            continue
        closes = text.endswith("}")
        if closes:
            text = text[:-1].rstrip()
        if text:
            entry = _parse_entry(path, lineno, section, text)
            key = (section, entry.name)
            if key in names:
                raise ConfigError(path, lineno, f"duplicate entry {entry.name!r} in {section} "
                                                f"(first on line {names[key]})")
            names[key] = lineno
            entries.append(entry)
        if closes:
            section = None
    if section is not None:
        raise ConfigError(path, section_line, f"section {section} is never closed with '}}'")
    return CyrusConf(path, entries)


def _parse_entry(path: str, lineno: int, section: str, text: str) -> Entry:
    m = _NAME_RE.match(text)
    if not m:
        raise ConfigError(path, lineno, f"bad entry name in {section}: {text[:40]!r}")
    name = m.group(0)
    rest = text[m.end():]
    if rest and not rest[0].isspace():
        if rest[0] == "=":
            raise ConfigError(path, lineno, "entry has no name (an entry must be on one line: "
                                            "master does not join continuation lines)")
        raise ConfigError(path, lineno, f"bad character {rest[0]!r} in entry name {name!r}")
    args: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        if rest[pos:].strip() == "":
            break
        am = _ARG_RE.match(rest, pos)
        if not am or not am.group(1):
            bad = rest[pos:].strip()[:30]
            raise ConfigError(path, lineno, f"bad argument in entry {name!r}: {bad!r} (expected key=value)")
        if am.group(2).startswith('"') and not am.group(4):
            raise ConfigError(path, lineno, f"missing closing '\"' in entry {name!r}")
        key = am.group(1)
        value = am.group(3) if am.group(2).startswith('"') else am.group(2)
        if key in args:
            raise ConfigError(path, lineno, f"argument {key!r} given twice in entry {name!r}")
        args[key] = value
        pos = am.end()
    if section in ("START", "SERVICES", "EVENTS", "DAEMON") and not args.get("cmd"):
        raise ConfigError(path, lineno, f"entry {name!r} in {section} has no cmd=")
    for key in _INT_ARGS:
        if key in args and not re.fullmatch(r"-?\d+", args[key]):
            raise ConfigError(path, lineno, f"{key}={args[key]!r} in entry {name!r} is not a number")
    if section == "SERVICES" and not args.get("listen"):
        raise ConfigError(path, lineno, f"service {name!r} has no listen=")
    if "listen" in args:
        try:
            parse_listen(args["listen"])
        except ValueError as e:
            raise ConfigError(path, lineno, str(e)) from None
    try:
        shlex.split(args.get("cmd", ""))
    except ValueError as e:
        raise ConfigError(path, lineno, f"cmd of entry {name!r} cannot be split: {e}") from None
    return Entry(section, name, args, path, lineno)


# --------------------------------------------------------------------------- the instance

@dataclass
class Instance:
    """One Cyrus instance: its imapd.conf + cyrus.conf and what the stop path derives from them."""

    imapd: ImapdConf
    cyrus: CyrusConf
    name: str = "default"
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, imapd_conf: os.PathLike | str = DEFAULT_IMAPD_CONF,
             cyrus_conf: os.PathLike | str = DEFAULT_CYRUS_CONF, name: str = "default") -> Instance:
        inst = cls(parse_imapd_conf(imapd_conf), parse_cyrus_conf(cyrus_conf), name)
        inst._check_children_config()
        return inst

    def _check_children_config(self) -> None:
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
        """SERVICES listeners a client can connect to (UDP ones excluded: nothing to accept)."""
        result = []
        for e in self.cyrus.services:
            if e.args.get("proto", "tcp").startswith("udp"):
                continue
            listen = e.listen
            if listen is not None:
                result.append((e, listen))
        return result

    @property
    def is_replica(self) -> bool:
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

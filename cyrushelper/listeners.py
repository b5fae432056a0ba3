"""Socket mode (`generate --listeners systemd`): what an instance's cyrus.conf maps to when systemd,
not Cyrus master, holds the listening sockets. Pure: no systemd, no processes; render.py turns a
`Plan` into units, `run --listeners systemd` (sockets.py) and `status` read the same names.

For instance NAME (unit names never match `cyrus@*.service`, which stays the instance itself):

    cyrus-NAME-start.service        START entries in order (oneshot), before every other part
    cyrus-NAME-SERVICE.socket       one listening socket per SERVICES address (ListenStream=)
    cyrus-NAME-SERVICE@1..N.service its worker pool: `cyrushelper worker` execs the Cyrus service
    cyrus-NAME-DAEMON.service       a DAEMON entry (respawned as master does: Restart=always)
    cyrus-NAME-event-EVENT.timer    an EVENTS entry (`period=` minutes, `at=HHMM`) ...
    cyrus-NAME-event-EVENT.service  ... and the command it runs

How master reads each entry (master/master.c, 3.6.1 and 3.10.2 alike) and what we make of it:
- SERVICES: `listen=` is a UNIX path or [host:]port, resolved by master with getaddrinfo() at each
  start, every address bound on its own (an `associate` with its own CYRUS_ID and children). systemd
  takes numeric addresses only, so names are resolved here, at generate time: one socket (and one
  pool, CYRUS_ID = its index) per address, like master. A port alone listens on every address
  (one dual-stack socket; tcp4/tcp6 narrow it). UNIX sockets are made 0777 as master makes them.
- Pool size: master forks up to `maxchild` children on demand (keeping `prefork` idle); a worker
  serves one connection at a time, so a pool of `maxchild` workers gives the same concurrency.
  Without maxchild (unlimited under master) the pool is max(prefork, DEFAULT_POOL). UDP services
  get one worker, as master gives them. `--workers SERVICE=N` overrides all of this.
- `babysit=` needs nothing (a pool is always up); `maxforkrate=` has nothing to limit (the pool
  does not fork on demand); `maxfds=` becomes LimitNOFILE=.
- DAEMON: a service, restarted whenever it exits (master respawns them); `wait=y` (master's
  ready-pipe handshake before SERVICES) has no equivalent and is refused.
- EVENTS: `period=P` runs at start and every P minutes; `at=HHMM` daily at that local time
  (period then ignored, as master does); neither: once at start.
- Every program is resolved like master does (a relative name lives in Cyrus's binary directory;
  Debian's `/usr/sbin/cyrus X` wrapper is skipped) and must exist: master refuses a SERVICES entry
  whose program is missing, and a unit with a missing program would fail later with less to say.

What cannot be mapped is refused with the entry's file:line (ConfigError), never dropped.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cyrushelper import cyrus
from cyrushelper.channels import sync_client_command
from cyrushelper.config import ConfigError, Entry, Instance

MODES = ("master", "systemd")
DEFAULT_POOL = 10          # workers for a service master would not limit (no maxchild)
MAX_POOL = 1000            # a --workers value beyond this is a typo, not a plan

# The keys master reads per section (master.c add_start/add_service/add_event/add_daemon);
# anything else in an entry is ignored by master and refused here.
KNOWN_ARGS = {
    "START": {"cmd"},
    "SERVICES": {"cmd", "listen", "proto", "prefork", "maxchild", "babysit", "maxforkrate", "maxfds"},
    "EVENTS": {"cmd", "period", "at"},
    "DAEMON": {"cmd", "wait", "maxfds", "maxforkrate"},
}

_WORKERS_RE = re.compile(r"([A-Za-z0-9]+)=([0-9]+)")


@dataclass(frozen=True)
class Address:
    """One listening socket as a .socket unit writes it."""

    directive: str          # ListenStream or ListenDatagram
    value: str              # "127.0.0.1:24", "[::1]:4190", "143", "/run/cyrus/socket/lmtp"
    ipv6_only: bool = False  # BindIPv6Only=ipv6-only (proto=tcp6 on a port alone)
    note: str = ""          # how listen= became this value, when it is not literally the same

    @property
    def unix(self) -> bool:
        return self.value.startswith("/")

    @property
    def stream(self) -> bool:
        return self.directive == "ListenStream"

    def connect_address(self) -> tuple[int, object]:
        """(family, address) a client on this host connects to."""
        if self.unix:
            return socket.AF_UNIX, self.value
        host, _, port = self.value.rpartition(":")
        if not host:
            host = "::1" if self.ipv6_only else "127.0.0.1"
        host = host.strip("[]")
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def _maxfds(entry: Entry) -> int | None:
    """maxfds= (LimitNOFILE=), None when unset or 0 (master's "no limit of its own")."""
    value = entry.args.get("maxfds")
    return int(value) if value is not None and int(value) > 0 else None


@dataclass(frozen=True)
class Pool:
    """One SERVICES entry on one address: its socket unit and its N worker units."""

    instance: str
    entry: Entry
    cyrus_id: int           # CYRUS_ID: one accept lock per socket, as master gives each address
    address: Address
    size: int
    size_reason: str        # e.g. "maxchild=20", "--workers lmtp=4"
    argv: tuple[str, ...]   # the Cyrus program (absolute) and its arguments, without -X

    @property
    def service(self) -> str:
        return self.entry.name

    @property
    def slot_stem(self) -> str:
        """The service and, for its second and later address, their number: `lmtp`, `sieve-2`."""
        return self.service + (f"-{self.cyrus_id + 1}" if self.cyrus_id else "")

    @property
    def unit_stem(self) -> str:
        return f"cyrus-{self.instance}-{self.slot_stem}"

    @property
    def socket_unit(self) -> str:
        return f"{self.unit_stem}.socket"

    @property
    def worker_template(self) -> str:
        return f"{self.unit_stem}@.service"

    @property
    def worker_units(self) -> list[str]:
        return [f"{self.unit_stem}@{slot}.service" for slot in range(1, self.size + 1)]

    @property
    def program(self) -> str:
        return os.path.basename(self.argv[0])

    @property
    def maxfds(self) -> int | None:
        return _maxfds(self.entry)


@dataclass(frozen=True)
class Daemon:
    instance: str
    entry: Entry
    argv: tuple[str, ...]
    reads_sync_log: bool    # a rolling sync_client: its lines are read by the drain afterwards

    @property
    def unit(self) -> str:
        return f"cyrus-{self.instance}-{self.entry.name}.service"

    @property
    def maxfds(self) -> int | None:
        return _maxfds(self.entry)


@dataclass(frozen=True)
class Event:
    instance: str
    entry: Entry
    argv: tuple[str, ...]
    period_minutes: int     # 0: no repetition
    at: tuple[int, int] | None  # (hour, minute), local time

    @property
    def unit(self) -> str:
        return f"cyrus-{self.instance}-event-{self.entry.name}.service"

    @property
    def timer(self) -> str:
        return f"cyrus-{self.instance}-event-{self.entry.name}.timer"

    @property
    def schedule(self) -> list[str]:
        """The timer's [Timer] directives."""
        if self.at is not None:
            return [f"OnCalendar=*-*-* {self.at[0]:02d}:{self.at[1]:02d}:00"]
        lines = ["OnActiveSec=0"]
        if self.period_minutes:
            lines.append(f"OnUnitActiveSec={self.period_minutes}min")
        return lines


@dataclass(frozen=True)
class Plan:
    instance: str
    start: list[tuple[Entry, tuple[str, ...]]]
    pools: list[Pool]
    daemons: list[Daemon]
    events: list[Event]
    notes: list[str] = field(default_factory=list)   # what generate tells the operator

    @property
    def start_unit(self) -> str:
        return f"cyrus-{self.instance}-start.service"

    @property
    def socket_units(self) -> list[str]:
        return [p.socket_unit for p in self.pools]

    @property
    def worker_units(self) -> list[str]:
        return [u for p in self.pools for u in p.worker_units]

    @property
    def daemon_units(self) -> list[str]:
        return [d.unit for d in self.daemons]

    @property
    def event_units(self) -> list[str]:
        return [e.unit for e in self.events]

    @property
    def timer_units(self) -> list[str]:
        return [e.timer for e in self.events]

    @property
    def before_instance(self) -> list[str]:
        """Parts the instance starts after, and so stops before them: its own process stops the
        Cyrus processes among them (event jobs order themselves before it in their unit)."""
        return [self.start_unit, *self.socket_units, *self.worker_units, *self.daemon_units]

    @property
    def process_units(self) -> list[str]:
        """Units whose processes the instance's stop ends, as master ends its children."""
        return [*self.worker_units, *self.daemon_units, *self.event_units]

    def pool_sizes(self) -> dict[str, int]:
        return {p.service: p.size for p in self.pools}


# --------------------------------------------------------------------------- reading the entries

def parse_workers(values: list[str] | None) -> dict[str, int]:
    """`--workers SERVICE=N` options (repeatable) as {service: N}; ValueError when malformed."""
    result: dict[str, int] = {}
    for value in values or []:
        m = _WORKERS_RE.fullmatch(value)
        if not m:
            raise ValueError(f"--workers {value!r}: expected SERVICE=N (the cyrus.conf entry name)")
        n = int(m.group(2))
        if not 1 <= n <= MAX_POOL:
            raise ValueError(f"--workers {value!r}: N must be 1-{MAX_POOL}")
        result[m.group(1)] = n
    return result


def program_path(entry: Entry, bin_dir: Path | None = None) -> tuple[str, ...]:
    """The entry's command with the program that runs by absolute path (cyrus.resolve_command);
    ConfigError when it is not installed."""
    try:
        return cyrus.resolve_command(entry.cmd, bin_dir)
    except LookupError as e:
        raise ConfigError(entry.path, entry.line,
                          f"{entry.section} entry {entry.name!r}: no executable {e} (its package may be "
                          "missing, e.g. cyrus-pop3d, cyrus-nntpd, cyrus-caldav)") from None


def _check_args(entry: Entry) -> None:
    unknown = sorted(set(entry.args) - KNOWN_ARGS[entry.section])
    if unknown:
        raise ConfigError(entry.path, entry.line,
                          f"{entry.section} entry {entry.name!r}: {', '.join(k + '=' for k in unknown)} "
                          "is not read by Cyrus master in this section (it would be ignored)")


def _port(entry: Entry, port: str, proto: str) -> int:
    if port.isdigit():
        return int(port)
    try:
        return socket.getservbyname(port, "udp" if proto.startswith("udp") else "tcp")
    except OSError:
        raise ConfigError(entry.path, entry.line, f"service {entry.name!r}: port name {port!r} is not "
                                                  "in /etc/services (systemd needs a number)") from None


def _hosts(entry: Entry, host: str) -> list[str]:
    """Numeric addresses for listen='s host part, as master's getaddrinfo() would bind them."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(entry.path, entry.line,
                          f"service {entry.name!r}: listen host {host!r} does not resolve ({e})") from None
    found: list[str] = []
    for family, *_, sockaddr in sorted(infos, key=lambda i: i[0] != socket.AF_INET):
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in found:
            found.append(sockaddr[0])
    return found


def addresses(entry: Entry) -> list[Address]:
    """The sockets a SERVICES entry listens on (one per address master would bind)."""
    listen = entry.listen
    proto = entry.args.get("proto", "tcp")
    datagram = not entry.stream
    directive = "ListenDatagram" if datagram else "ListenStream"
    if listen.kind == "unix":
        return [Address(directive, str(listen.path))]
    port = _port(entry, listen.port, proto)
    family = proto[3:] if proto[:3] in ("tcp", "udp") else ""
    host = listen.host
    if host in (None, "*", ""):
        if family == "4":
            return [Address(directive, f"0.0.0.0:{port}", note=_note(listen.raw, proto))]
        if family == "6":
            return [Address(directive, f"[::]:{port}", ipv6_only=True, note=_note(listen.raw, proto))]
        return [Address(directive, str(port), note=_note(listen.raw, proto, dual=True))]
    result = []
    for addr in _hosts(entry, host):
        v6 = ":" in addr
        if (family == "4" and v6) or (family == "6" and not v6):
            continue
        result.append(Address(directive, f"[{addr}]:{port}" if v6 else f"{addr}:{port}",
                              note=_note(listen.raw, proto) if addr != host or str(port) != listen.port else ""))
    if not result:
        raise ConfigError(entry.path, entry.line,
                          f"service {entry.name!r}: {host!r} has no address for proto={proto}")
    return result


def _note(raw: str, proto: str, dual: bool = False) -> str:
    return f"listen=\"{raw}\" proto={proto}" + (" (one dual-stack socket for IPv4 and IPv6)" if dual else "")


def pool_size(entry: Entry, override: int | None) -> tuple[int, str]:
    if override is not None:
        return override, f"--workers {entry.name}={override}"
    if not entry.stream:
        return 1, "a datagram service: one worker, as under master"
    if "maxchild" in entry.args:
        maxchild = entry.maxchild
        if maxchild == 0:
            raise ConfigError(entry.path, entry.line, f"service {entry.name!r}: maxchild=0 lets master "
                                                      "start no child at all: remove the entry")
        if maxchild > 0:
            return maxchild, f"maxchild={maxchild}"
    size = max(entry.prefork, DEFAULT_POOL)
    return size, (f"maxchild unset (unlimited under master): {size} workers; each open session holds "
                  f"one, use --workers {entry.name}=N for more")


def plan(instance: Instance, workers: dict[str, int] | None = None, bin_dir: Path | None = None) -> Plan:
    """The socket-mode parts of `instance`; ConfigError (file:line) for what cannot be mapped.
    Every entry whose program is missing is named at once (one line each): installing packages
    one refusal at a time would be tedious."""
    missing = []
    for entry in instance.cyrus.entries:
        _check_args(entry)
        try:
            program_path(entry, bin_dir)
        except ConfigError as e:
            missing.append(e)
    if missing:
        first = missing[0]
        raise ConfigError(first.path, first.line, first.message + "".join(f"\n{e}" for e in missing[1:]))
    return _plan(instance, dict(workers or {}), bin_dir)


def _plan(instance: Instance, workers: dict[str, int], bin_dir: Path | None) -> Plan:
    name = instance.name
    conf = instance.cyrus
    start, pools, daemons, events, notes = [], [], [], [], []
    for entry in conf.section("START"):
        command = sync_client_command(entry.argv) if entry.program == "sync_client" else None
        if command is not None and command.rolling:
            raise ConfigError(entry.path, entry.line,
                              f"START entry {entry.name!r} runs a rolling sync_client, which forks away "
                              "unsupervised: move it to DAEMON (supervised and restarted in socket mode)")
        start.append((entry, program_path(entry, bin_dir)))
    for entry in conf.services:
        argv = program_path(entry, bin_dir)
        if "-X" in argv[1:]:
            raise ConfigError(entry.path, entry.line, f"service {entry.name!r}: -X serves one connection "
                                                      "on stdin; a socket-mode worker runs the accept loop")
        size, reason = pool_size(entry, workers.pop(entry.name, None))
        if not entry.stream and size != 1:
            raise ConfigError("--workers", None, f"{entry.name} is a datagram service: it takes one worker")
        for cyrus_id, address in enumerate(addresses(entry)):
            pools.append(Pool(name, entry, cyrus_id, address, size, reason, argv))
        if "maxchild unset" in reason:
            notes.append(f"{entry.path}:{entry.line}: service {entry.name!r}: {reason}")
    for entry in conf.section("DAEMON"):
        if entry.wait:
            raise ConfigError(entry.path, entry.line,
                              f"DAEMON entry {entry.name!r} has wait=y: master's ready handshake for it "
                              "has no socket-mode equivalent (remove wait=y, or keep --listeners master)")
        argv = program_path(entry, bin_dir)
        command = sync_client_command(list(argv)) if entry.program == "sync_client" else None
        daemons.append(Daemon(name, entry, argv, command is not None and command.reads_log))
    for entry in conf.section("EVENTS"):
        at = entry.args.get("at")
        events.append(Event(name, entry, program_path(entry, bin_dir),
                            0 if at is not None else int(entry.args.get("period", "0")),
                            (int(at) // 100, int(at) % 100) if at is not None else None))
    if workers:
        raise ConfigError("--workers", None, f"no SERVICES entry named {', '.join(sorted(workers))} in "
                                             f"{conf.path} (have: {', '.join(e.name for e in conf.services)})")
    if not pools:
        raise ConfigError(conf.path, None, "no SERVICES entry: socket mode has nothing to listen on")
    return Plan(name, start, pools, daemons, events, notes)

"""Connections accepted on a Cyrus listener that a process still holds open, from /proc/net.

A stop must not cut a delivery in flight, and lmtpd registers no session in proc_path (3.6 and
3.10 alike), so the fence's grace finds LMTP connections here instead: the kernel's socket tables
of our network namespace, read without any privilege (no /proc/PID/fd, which needs CAP_SYS_PTRACE
for another user's processes; the units do not grant it).

What identifies an accepted connection, measured on Linux 6.1:
- TCP (/proc/net/tcp, tcp6): local address and port are the listener's, state ESTABLISHED or
  CLOSE_WAIT. The inode is 0 while the connection waits in the accept queue (no process holds it
  yet) and again once the last holder closed it, so a non-zero inode means "held open".
- UNIX (/proc/net/unix): the accepted socket shows the listener's path and state 03 (connected;
  the listener itself is 01); the client's end has no path. Inode 0 while queued, as for TCP.

Socket inodes are unique while the socket exists, so a set of inodes taken at one moment can be
followed until every one of them is closed.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from cyrushelper.config import Listen

TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
UNIX_TABLE = "/proc/net/unix"
TCP_HELD_STATES = ("01", "08")   # ESTABLISHED, CLOSE_WAIT (the client hung up, the server has not)
UNIX_CONNECTED = "03"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class TcpSocket:
    local: IPAddress
    port: int
    state: str
    inode: int


@dataclass(frozen=True)
class UnixSocket:
    path: str
    state: str
    inode: int


def _address(hex_address: str) -> IPAddress:
    """An address of /proc/net/tcp{,6}: 32-bit words printed in host byte order."""
    words = [int(hex_address[i:i + 8], 16) for i in range(0, len(hex_address), 8)]
    return _plain(ipaddress.ip_address(b"".join(struct.pack("=I", w) for w in words)))


def _plain(address: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d as a.b.c.d (a v4 client of a dual-stack listener)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_tcp_table(text: str) -> list[TcpSocket]:
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        address, _, port = fields[1].partition(":")
        try:
            sockets.append(TcpSocket(_address(address), int(port, 16), fields[3], int(fields[9])))
        except ValueError:
            continue
    return sockets


def parse_unix_table(text: str) -> list[UnixSocket]:
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split(maxsplit=7)
        if len(fields) < 8:
            continue  # no path: an unnamed socket, e.g. a client's end
        try:
            sockets.append(UnixSocket(fields[7], fields[5], int(fields[6])))
        except ValueError:
            continue
    return sockets


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except FileNotFoundError:  # no IPv6 in this kernel
        return ""


def listen_addresses(listen: Listen) -> set[IPAddress] | None:
    """The local addresses master binds for a TCP `listen=` (getaddrinfo, as master.c does);
    None for every address (no host, or a wildcard). A name that does not resolve also gives None:
    watching more connections than needed only lengthens a bounded wait."""
    host = (listen.host or "").strip("[]")
    if host in ("", "*", "0.0.0.0", "::"):
        return None
    try:
        infos = socket.getaddrinfo(host, listen.port_number, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return {_plain(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos} or None


class Watcher:
    """Reads the socket tables for a fixed set of listeners (addresses resolved once)."""

    def __init__(self, listens: list[Listen]):
        self.tcp: list[tuple[int, set[IPAddress] | None]] = []
        self.unix: set[str] = set()
        for listen in listens:
            if listen.kind == "unix":
                self.unix.add(str(listen.path))
            elif listen.port_number is not None:
                self.tcp.append((listen.port_number, listen_addresses(listen)))

    def held(self) -> set[int]:
        """Inodes of every connection accepted on the listeners and still held by a process."""
        inodes = set()
        if self.tcp:
            for table in TCP_TABLES:
                for s in parse_tcp_table(_read(table)):
                    if s.inode and s.state in TCP_HELD_STATES and self._tcp_match(s):
                        inodes.add(s.inode)
        if self.unix:
            for s in parse_unix_table(_read(UNIX_TABLE)):
                if s.inode and s.state == UNIX_CONNECTED and s.path in self.unix:
                    inodes.add(s.inode)
        return inodes

    def _tcp_match(self, s: TcpSocket) -> bool:
        return any(port == s.port and (addresses is None or s.local in addresses)
                   for port, addresses in self.tcp)

"""Connections accepted on a listener, from the kernel's socket tables (cyrushelper/connections.py),
against real sockets of this process: TCP (v4, v6, dual-stack) and UNIX."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from cyrushelper import connections
from cyrushelper.config import parse_listen


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


class Server:
    """A listener with connections: `queued` (never accepted) and `accepted` ones."""

    def __init__(self, family: int, address):
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(address)
        self.listener.listen(8)
        self.address = self.listener.getsockname()
        self.family = family
        self.clients: list[socket.socket] = []
        self.accepted: list[socket.socket] = []

    def connect(self, accept: bool, connect_to=None) -> None:
        address = connect_to or self.address
        family = socket.AF_INET if self.family != socket.AF_UNIX and "." in address[0] else self.family
        client = socket.socket(family, socket.SOCK_STREAM)
        client.connect(address)
        self.clients.append(client)
        if accept:
            self.accepted.append(self.listener.accept()[0])

    def close(self) -> None:
        for s in self.clients + self.accepted + [self.listener]:
            s.close()


@pytest.fixture
def servers():
    made = []

    def make(*args) -> Server:
        made.append(Server(*args))
        return made[-1]
    yield make
    for s in made:
        s.close()


def test_tcp_counts_accepted_connections_only(servers):
    server = servers(socket.AF_INET, ("127.0.0.1", 0))
    server.connect(accept=True)
    server.connect(accept=False)           # waits in the accept queue: nobody holds it yet
    watcher = connections.Watcher([parse_listen(f"127.0.0.1:{server.address[1]}")])
    assert watcher.held() == {inode(server.accepted[0])}
    server.accepted[0].close()             # the server side closed it: no longer held
    assert watcher.held() == set()


def test_tcp_client_hanging_up_is_held_until_the_server_closes(servers):
    server = servers(socket.AF_INET, ("127.0.0.1", 0))
    server.connect(accept=True)
    watcher = connections.Watcher([parse_listen(str(server.address[1]))])  # port only: every address
    server.clients[0].close()              # CLOSE_WAIT on the server side
    assert watcher.held() == {inode(server.accepted[0])}


def test_tcp_address_must_match_when_the_listener_names_one(servers):
    server = servers(socket.AF_INET, ("127.0.0.1", 0))
    server.connect(accept=True)
    port = server.address[1]
    assert connections.Watcher([parse_listen(f"127.0.0.2:{port}")]).held() == set()
    assert connections.Watcher([parse_listen(f"localhost:{port}")]).held() == {inode(server.accepted[0])}
    assert connections.Watcher([parse_listen(f"127.0.0.1:{port + 1 if port < 65535 else 1}")]).held() == set()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_tcp6_and_a_v4_client_of_a_dual_stack_listener(servers):
    server = servers(socket.AF_INET6, ("::", 0))
    port = server.address[1]
    server.connect(accept=True, connect_to=("::1", port))
    server.connect(accept=True, connect_to=("127.0.0.1", port))  # shows as ::ffff:127.0.0.1
    held = {inode(s) for s in server.accepted}
    assert connections.Watcher([parse_listen(f"[::]:{port}")]).held() == held
    assert connections.Watcher([parse_listen(f"[::1]:{port}")]).held() == {inode(server.accepted[0])}
    assert connections.Watcher([parse_listen(f"127.0.0.1:{port}")]).held() == {inode(server.accepted[1])}


def test_unix_accepted_socket_shows_the_listener_path(servers, tmp_path):
    path = str(tmp_path / "lmtp")
    server = servers(socket.AF_UNIX, path)
    server.connect(accept=True)
    server.connect(accept=False)
    watcher = connections.Watcher([parse_listen(path)])
    assert watcher.held() == {inode(server.accepted[0])}
    assert connections.Watcher([parse_listen(str(tmp_path / "other"))]).held() == set()
    server.accepted[0].close()
    assert watcher.held() == set()


def test_parse_tables():
    tcp = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
           "   0: 0100007F:5DC0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1\n"
           "   1: 0100007F:5DC0 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000   108        0 102 1\n"
           "   2: garbage\n")
    assert connections.parse_tcp_table(tcp) == [
        connections.TcpSocket(ipaddress.ip_address("127.0.0.1"), 24000, "0A", 101),
        connections.TcpSocket(ipaddress.ip_address("127.0.0.1"), 24000, "01", 102)]
    tcp6 = ("  sl  local_address                         remote_address                        st\n"
            "   0: 0000000000000000FFFF00000100007F:5DC0 0000000000000000FFFF00000100007F:D2F0 01 "
            "00000000:00000000 00:00000000 00000000   108        0 103 1\n")
    [mapped] = connections.parse_tcp_table(tcp6)
    assert mapped.local == ipaddress.ip_address("127.0.0.1") and mapped.inode == 103
    unix = ("Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 201 /run/cyrus/socket/lmtp\n"
            "0000000000000000: 00000003 00000000 00000000 0001 03 202 /run/cyrus/socket/lmtp\n"
            "0000000000000000: 00000003 00000000 00000000 0001 03 203\n"
            "0000000000000000: 00000003 00000000 00000000 0001 03 204 /path with space/s\n")
    assert [(s.path, s.state, s.inode) for s in connections.parse_unix_table(unix)] == [
        ("/run/cyrus/socket/lmtp", "01", 201), ("/run/cyrus/socket/lmtp", "03", 202),
        ("/path with space/s", "03", 204)]

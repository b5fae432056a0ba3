"""A private link between two throwaway containers: two network namespaces joined by a veth pair.

    with PrivateLink(workdir) as link:
        a = SystemdContainer(wa, network_namespace=link.namespace("a"))
        b = SystemdContainer(wb, network_namespace=link.namespace("b"))

Each namespace is a file under `workdir` (a bind mount of /proc/self/ns/net kept by `unshare
--net=FILE`), not under /run, which the container sandbox replaces with its own tmpfs. The link
uses 198.18.0.0/15, the range reserved for network benchmark tests (RFC 2544): the addresses
exist only inside these two namespaces, nothing is routed anywhere else.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ADDRESSES = {"a": "198.18.0.1", "b": "198.18.0.2"}
PREFIX = 30


class NetworkError(RuntimeError):
    pass


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise NetworkError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class PrivateLink:
    def __init__(self, workdir: os.PathLike | str):
        self.workdir = Path(workdir)
        self.files: dict[str, Path] = {}

    def namespace(self, name: str) -> Path:
        return self.files[name]

    def address(self, name: str) -> str:
        return ADDRESSES[name]

    def start(self) -> PrivateLink:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for name in ADDRESSES:
                path = self.workdir / f"netns-{name}"
                path.touch()
                _run("unshare", f"--net={path}", "true")
                self.files[name] = path
            a, b = self.files["a"], self.files["b"]
            _run("nsenter", f"--net={a}", "ip", "link", "add", "lab-a", "type", "veth", "peer", "name", "lab-b",
                 "netns", str(b))
            for name, dev in (("a", "lab-a"), ("b", "lab-b")):
                ns = f"--net={self.files[name]}"
                _run("nsenter", ns, "ip", "link", "set", "lo", "up")
                _run("nsenter", ns, "ip", "addr", "add", f"{ADDRESSES[name]}/{PREFIX}", "dev", dev)
                _run("nsenter", ns, "ip", "link", "set", dev, "up")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Unmount the namespace files: the namespaces (and the veth pair) go with their last user."""
        for path in self.files.values():
            subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
            try:
                path.unlink()
            except OSError:
                pass
        self.files.clear()

    def __enter__(self) -> PrivateLink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

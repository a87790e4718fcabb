"""Which local TCP ports are free, and who holds the ones that are not."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from processor.stack.process import ProcessInfo, process_info

LOOPBACK = "127.0.0.1"
_TCP_LISTEN = "0A"


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when a server could bind ``host:port`` now.

    Binding is the honest test: it also fails for a listener on 0.0.0.0 or on the IPv6
    wildcard, which a connection attempt to 127.0.0.1 might miss.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Without SO_REUSEADDR a port in TIME_WAIT from a just-stopped service looks taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def port_accepts_connections(port: int, host: str = LOOPBACK, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _listening_socket_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                continue
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port:
                inodes.add(fields[9])
    return inodes


def port_listener(port: int) -> ProcessInfo | None:
    """The process listening on ``port`` (any address), when the system lets us see it."""
    inodes = _listening_socket_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        return process_info(int(proc.name))
    return None

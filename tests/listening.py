"""Which TCP addresses a live run listens on, read from /proc (Linux): the processes are found by a string in their
command line, their sockets by inode in /proc/PID/fd, and the listening ones in /proc/net/tcp and tcp6."""

from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path

LISTEN = "0A"  # TCP state in /proc/net/tcp


def _address(hex_address: str) -> str:
    """/proc/net/tcp's address (the bytes of each 32-bit word in host order, little-endian here) as text."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def processes_matching(text: str) -> list[int]:
    """Ids of the processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by one of ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        except OSError:
            continue  # the process ended meanwhile
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in inodes:
                hex_address, hex_port = local.split(":")
                found.add((_address(hex_address), int(hex_port, 16)))
    return found


class ListeningWatch:
    """While the block runs, collect every address that processes with ``text`` in their command line listen on
    (polled every 0.2 s): ``watch.addresses``, and ``watch.processes``, how many such processes were seen."""

    def __init__(self, text: str):
        self.text = text
        self.addresses: set[tuple[str, int]] = set()
        self.processes: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            pids = processes_matching(self.text)
            self.processes.update(pids)
            self.addresses |= listening_addresses(pids)

    def __enter__(self) -> ListeningWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

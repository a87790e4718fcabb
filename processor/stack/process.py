"""Looking at and stopping operating-system processes and process groups.

Linux answers most questions through ``/proc``; elsewhere the functions fall back to what
``os.kill(pid, 0)`` can tell, which cannot see zombies or read another process's environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessInfo:
    """A running process: its id and short command name (as ``ps -o comm`` shows it)."""

    pid: int
    name: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.name})" if self.name else f"pid {self.pid}"


@dataclass(frozen=True)
class _Stat:
    name: str
    state: str
    process_group: int


def _read_stat(pid: int) -> _Stat | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name sits in parentheses and may itself hold spaces or parentheses.
    open_paren, close_paren = raw.find("("), raw.rfind(")")
    fields = raw[close_paren + 2 :].split()
    if open_paren < 0 or close_paren < 0 or len(fields) < 3:
        return None
    return _Stat(
        name=raw[open_paren + 1 : close_paren], state=fields[0], process_group=int(fields[2])
    )


def _procfs_available() -> bool:
    return (_PROC / "self" / "stat").exists()


def pid_is_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not _procfs_available():
        return True
    stat = _read_stat(pid)
    return stat is not None and stat.state not in ("Z", "X")


def process_info(pid: int) -> ProcessInfo | None:
    if not pid_is_alive(pid):
        return None
    stat = _read_stat(pid)
    return ProcessInfo(pid=pid, name=stat.name if stat else "")


def read_environment(pid: int) -> dict[str, str] | None:
    """The environment a process started with, or None where it cannot be read."""
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    environment: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            environment[key.decode(errors="replace")] = value.decode(errors="replace")
    return environment


def group_is_alive(group_id: int) -> bool:
    """True while any process of the group is alive (zombies do not count)."""
    if not _procfs_available():
        try:
            os.killpg(group_id, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None and stat.process_group == group_id and stat.state not in ("Z", "X"):
            return True
    return False


def _signal_group(group_id: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group_id, signum)


def terminate_group(
    group_id: int,
    *,
    grace_s: float,
    reap: Callable[[], object] = lambda: None,
) -> bool:
    """SIGTERM a whole process group, SIGKILL it after ``grace_s``; True once it is gone.

    ``reap`` is called while waiting so that a caller who is the parent of the group leader
    can collect it; otherwise the leader would linger as a zombie of ours.
    """
    _signal_group(group_id, signal.SIGTERM)
    if _wait_for_group_exit(group_id, grace_s, reap):
        return True
    _signal_group(group_id, signal.SIGKILL)
    return _wait_for_group_exit(group_id, 5.0, reap)


def kill_group(
    group_id: int, *, timeout_s: float = 10.0, reap: Callable[[], object] = lambda: None
) -> bool:
    """SIGKILL a whole process group at once, as a crash would end it; True once it is gone."""
    _signal_group(group_id, signal.SIGKILL)
    return _wait_for_group_exit(group_id, timeout_s, reap)


def _wait_for_group_exit(group_id: int, timeout_s: float, reap: Callable[[], object]) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        reap()
        if not group_is_alive(group_id):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)

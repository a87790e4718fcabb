"""One service's background process: its pid file, its log file, starting and stopping it.

Every service runs in a session (and process group) of its own, so it outlives the CLI that
started it, and stopping it signals the whole group: Phoenix and MLflow fork workers.

A pid file alone cannot prove that the process behind it is still ours: pids are reused. So
each service is started with marker variables in its environment (service name, state folder,
ports), and a pid only counts as ours when ``/proc/<pid>/environ`` shows them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from processor.errors import StackError
from processor.stack.layout import StackLayout
from processor.stack.process import (
    group_is_alive,
    kill_group,
    pid_is_alive,
    read_environment,
    terminate_group,
)
from processor.stack.service import LaunchSpec

_MARK_SERVICE = "TRACE_PROCESSOR_STACK_SERVICE"
_MARK_DIR = "TRACE_PROCESSOR_STACK_DIR"
_MARK_PORTS = "TRACE_PROCESSOR_STACK_PORTS"
_RUN_HEADER = "--- trace-processor stack: starting"
_TAIL_BYTES = 64 * 1024


class ServiceProcess:
    """The process of one service (or Kafka node) in one state folder, running or not.

    ``name`` is the process's: ``phoenix``, ``kafka``, ``kafka-2``, ... (see layout.py).
    """

    def __init__(self, name: str, layout: StackLayout) -> None:
        self.name = name
        self._layout = layout
        # Set when this object started the process: we are its parent and must reap it.
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._layout.log_path(self.name)

    @property
    def pid_path(self) -> Path:
        return self._layout.pid_path(self.name)

    def recorded_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def running_pid(self) -> int | None:
        """The pid from the pid file when that process is alive and is this service."""
        pid = self.recorded_pid()
        if pid is None or not self._leader_alive(pid):
            return None
        if self._child is not None and self._child.pid == pid:
            # Our own child, not reaped, so its pid cannot have been reused; and until it has
            # exec'd, its environment is still ours, without the markers.
            return pid
        return pid if self._is_ours(pid) else None

    def running_ports(self, pid: int) -> tuple[int, ...] | None:
        """The ports a running service was started with, when its environment is readable."""
        environment = read_environment(pid)
        if environment is None or not environment.get(_MARK_PORTS):
            return None
        return tuple(int(port) for port in environment[_MARK_PORTS].split(","))

    def clean_up_after_crash(self, *, grace_s: float) -> bool:
        """Remove a stale pid file, stopping workers the dead leader left behind.

        True when there was something to clean up.
        """
        pid = self.recorded_pid()
        if pid is None or self.running_pid() is not None:
            return False
        # A pid is never handed out while a process group of that id exists, so live members
        # of group ``pid`` whose leader is gone are orphans of our service, not strangers.
        if not self._leader_alive(pid) and group_is_alive(pid):
            terminate_group(pid, grace_s=grace_s)
        self.pid_path.unlink(missing_ok=True)
        return True

    def spawn(self, launch: LaunchSpec, *, ports: Sequence[int]) -> int:
        """Start the service in a new session, output appended to its log; returns the pid."""
        self._layout.logs_dir.mkdir(parents=True, exist_ok=True)
        self._layout.pids_dir.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ)
        for name in launch.unset_env:
            environment.pop(name, None)
        environment.update(launch.env)
        environment.update(
            {
                # Python services otherwise buffer their output, and a crash log would be empty.
                "PYTHONUNBUFFERED": "1",
                _MARK_SERVICE: self.name,
                _MARK_DIR: str(self._layout.root),
                _MARK_PORTS: ",".join(str(port) for port in ports),
            }
        )
        with self.log_path.open("ab") as log:
            started = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"\n{_RUN_HEADER} {started}: {' '.join(launch.command)}\n".encode())
            log.flush()
            try:
                self._child = subprocess.Popen(
                    list(launch.command), cwd=launch.cwd, env=environment,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise StackError(
                    f"could not start {self.name} ({launch.command[0]}): {exc}"
                ) from exc
        scratch = self.pid_path.with_suffix(".pid.tmp")
        scratch.write_text(f"{self._child.pid}\n")
        scratch.replace(self.pid_path)
        return self._child.pid

    def exit_code(self) -> int | None:
        """The exit code of a process this object started, once it has exited."""
        return None if self._child is None else self._child.poll()

    def stop(self, *, grace_s: float) -> int | None:
        """Stop the service's whole process group; returns the pid that was stopped, if any."""
        pid = self.recorded_pid()
        if pid is None:
            return None
        stopped: int | None = None
        if self.running_pid() == pid or (not self._leader_alive(pid) and group_is_alive(pid)):
            if not terminate_group(pid, grace_s=grace_s, reap=self._reap):
                raise StackError(
                    f"{self.name} (process group {pid}) survived SIGKILL; "
                    f"check `ps -g {pid}` and stop it by hand"
                )
            if self._child is not None and self._child.pid == pid:
                # The group is gone, so the leader has exited: collect it, leave no zombie.
                self._child.wait(timeout=5)
            stopped = pid
        self.pid_path.unlink(missing_ok=True)
        return stopped

    def kill(self) -> int:
        """SIGKILL the running process group, as a crash would: no clean shutdown, and the pid
        file stays behind (the next start cleans it up). Returns the pid that was killed."""
        pid = self.running_pid()
        if pid is None:
            raise StackError(f"{self.name} is not running; nothing to kill")
        if not kill_group(pid, reap=self._reap):
            raise StackError(f"{self.name} (process group {pid}) survived SIGKILL")
        if self._child is not None and self._child.pid == pid:
            self._child.wait(timeout=5)
        return pid

    def log_tail(self, lines: int = 12) -> list[str]:
        """The last lines the current (or latest) run wrote to the log."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - _TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except OSError:
            return []
        run_start = text.rfind(_RUN_HEADER)
        if run_start >= 0:
            text = text[run_start:].partition("\n")[2]
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def _leader_alive(self, pid: int) -> bool:
        if self._child is not None and self._child.pid == pid:
            return self._child.poll() is None
        return pid_is_alive(pid)

    def _is_ours(self, pid: int) -> bool:
        environment = read_environment(pid)
        if environment is None:
            # No /proc (not Linux) or not readable: all that is left is trusting the pid file.
            return not Path("/proc/self/environ").exists()
        return environment.get(_MARK_SERVICE) == self.name and environment.get(_MARK_DIR) == str(
            self._layout.root
        )

    def _reap(self) -> None:
        if self._child is not None:
            with contextlib.suppress(ChildProcessError):
                self._child.poll()

"""Kafka, Phoenix and MLflow as background processes sharing one state folder.

``LocalStack`` is what the CLI (`trace-processor stack up|down|status`) and the integration
test fixtures use. Services start in parallel; each one counts as up only when it answers a
real request. Every failure is a ``StackError`` whose first line says what to do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from processor.errors import StackError
from processor.settings import StackSettings
from processor.stack.kafka import KafkaService
from processor.stack.layout import SERVICE_NAMES, ServiceName, StackLayout, parse_service_names
from processor.stack.mlflow import MlflowService
from processor.stack.phoenix import PhoenixService
from processor.stack.ports import port_is_free, port_listener
from processor.stack.service import Say, StackService
from processor.stack.service_process import ServiceProcess

_STOP_GRACE_S = 20.0
_POLL_INTERVAL_S = 0.5
_PORT_RELEASE_S = 15.0  # a killed JVM can hold its port for seconds on a busy machine


@dataclass(frozen=True)
class StackEndpoints:
    """Where clients reach the stack."""

    kafka_bootstrap: str
    phoenix_url: str
    mlflow_url: str


@dataclass(frozen=True)
class ServiceStatus:
    """One service as `stack status` sees it: ``running`` means our process is alive,
    ``healthy`` that it also answered a request just now."""

    name: ServiceName
    running: bool
    pid: int | None
    url: str
    healthy: bool
    log_path: Path


class LocalStack:
    """Starts, checks and stops the local services of one state folder.

    ``phoenix_env`` and ``mlflow_env`` are added to those services' environments;
    ``mlflow_args`` to `mlflow server`'s command line. ``console`` receives progress lines.
    """

    def __init__(
        self,
        settings: StackSettings,
        *,
        phoenix_env: Mapping[str, str] | None = None,
        mlflow_args: Sequence[str] = (),
        mlflow_env: Mapping[str, str] | None = None,
        console: Console | None = None,
    ) -> None:
        self.settings = settings
        self.layout = StackLayout.at(settings.dir)
        self._console = console if console is not None else Console(quiet=True)
        self._services: dict[ServiceName, StackService] = {
            "kafka": KafkaService(settings, self.layout),
            "phoenix": PhoenixService(settings, self.layout, phoenix_env or {}),
            "mlflow": MlflowService(settings, self.layout, mlflow_args, mlflow_env or {}),
        }
        self._processes = {name: ServiceProcess(name, self.layout) for name in SERVICE_NAMES}
        self._interrupted = threading.Event()
        self._check_ports_distinct()

    @property
    def endpoints(self) -> StackEndpoints:
        return StackEndpoints(
            kafka_bootstrap=self._services["kafka"].address,
            phoenix_url=self._services["phoenix"].address,
            mlflow_url=self._services["mlflow"].address,
        )

    def up(self, services: Iterable[str] = SERVICE_NAMES) -> StackEndpoints:
        """Start the services that are not running and wait until each answers.

        Services already running and healthy are left alone.
        """
        self._for_each(parse_service_names(services), self._bring_up)
        return self.endpoints

    def down(self, services: Iterable[str] = SERVICE_NAMES) -> None:
        """Stop the services (their whole process groups); stopped ones are skipped."""
        self._for_each(parse_service_names(services), self._bring_down)

    def start(self, service: str) -> None:
        """Start one service (if not running) and wait until it answers; its data is kept."""
        self.up((service,))

    def stop(self, service: str) -> None:
        """Stop one service; its data stays for the next start."""
        self.down((service,))

    def status(self) -> dict[str, ServiceStatus]:
        """Every service's state, by name; asks each running service one health question."""
        statuses: dict[str, ServiceStatus] = {}
        for name in SERVICE_NAMES:
            service, process = self._services[name], self._processes[name]
            pid = process.running_pid()
            statuses[name] = ServiceStatus(
                name=name,
                running=pid is not None,
                pid=pid,
                url=service.address,
                healthy=pid is not None and service.is_healthy(),
                log_path=process.log_path,
            )
        return statuses

    def log_path(self, service: str) -> Path:
        (name,) = parse_service_names((service,))
        return self._processes[name].log_path

    def _for_each(
        self, names: tuple[ServiceName, ...], action: Callable[[ServiceName], None]
    ) -> None:
        if not names:
            return
        self._interrupted.clear()
        pool = ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="stack")
        try:
            futures: list[Future[None]] = [pool.submit(action, name) for name in names]
            wait(futures)
        except BaseException:
            # Ctrl-C lands in this thread; the workers see the flag at their next poll, so
            # the process can exit instead of waiting out their timeouts. Services keep
            # starting in the background; `down` stops them.
            self._interrupted.set()
            raise
        finally:
            pool.shutdown(wait=True)
        failures: list[StackError] = []
        for future in futures:
            error = future.exception()
            if isinstance(error, StackError):
                failures.append(error)
            elif error is not None:
                raise error
        if failures:
            raise StackError("\n".join(str(failure) for failure in failures)) from failures[0]

    def _bring_up(self, name: ServiceName) -> None:
        service, process = self._services[name], self._processes[name]
        say = self._sayer(name)
        pid = process.running_pid()
        if pid is not None:
            self._check_same_ports(service, process, pid)
            if service.is_healthy() or self._wait_for_running_service(service, process, pid):
                say(f"already running (pid {pid}) at {service.address}")
                return
            # It exited while we waited (it was dying when we looked): start it afresh.
        if process.clean_up_after_crash(grace_s=_STOP_GRACE_S):
            say("its previous run died; removed the stale pid file and leftover processes")
        # Checked before and after prepare: a fetch can take a minute, and an early "port
        # taken" saves the wait.
        self._check_ports_free(service)
        launch = service.prepare(say)
        self._check_ports_free(service)
        started = time.monotonic()
        pid = process.spawn(launch, ports=list(service.ports.values()))
        say(f"starting (pid {pid}), log {process.log_path}")
        self._wait_until_healthy(service, process)
        say(f"up at {service.address} in {time.monotonic() - started:.1f} s")

    def _bring_down(self, name: ServiceName) -> None:
        say = self._sayer(name)
        pid = self._processes[name].stop(grace_s=_STOP_GRACE_S)
        say(f"stopped (pid {pid})" if pid is not None else "not running")

    def _wait_until_healthy(self, service: StackService, process: ServiceProcess) -> None:
        """Wait for a service this stack just started; stop it if it never answers."""
        timeout_s = self.settings.start_timeout_s
        deadline = time.monotonic() + timeout_s
        while not service.is_healthy():
            exit_code = process.exit_code()
            if exit_code is not None:
                raise self._died_error(service.name, process, exit_code)
            if time.monotonic() >= deadline:
                process.stop(grace_s=_STOP_GRACE_S)
                raise StackError(
                    f"{service.name} did not answer within {timeout_s:.0f} s and was stopped; "
                    f"see {process.log_path}; on a slow machine raise STACK_START_TIMEOUT_S"
                )
            self._pause(service.name)

    def _wait_for_running_service(
        self, service: StackService, process: ServiceProcess, pid: int
    ) -> bool:
        """Wait for a service found running (still starting, or dying): True once it answers,
        False when it exits first."""
        self._sayer(service.name)(f"running (pid {pid}) but not answering yet; waiting")
        timeout_s = self.settings.start_timeout_s
        deadline = time.monotonic() + timeout_s
        while not service.is_healthy():
            if process.running_pid() != pid:
                return False
            if time.monotonic() >= deadline:
                raise StackError(
                    f"{service.name} (pid {pid}) is running but has not answered for "
                    f"{timeout_s:.0f} s; see {process.log_path}; run "
                    f"`trace-processor stack down {service.name}` and retry"
                )
            self._pause(service.name)
        return True

    def _pause(self, name: ServiceName) -> None:
        if self._interrupted.wait(_POLL_INTERVAL_S):
            raise StackError(f"{name}: interrupted while waiting for it to answer")

    @staticmethod
    def _died_error(name: ServiceName, process: ServiceProcess, exit_code: int) -> StackError:
        process.stop(grace_s=_STOP_GRACE_S)  # its workers may outlive it; also drops the pid file
        tail = "".join(f"\n  | {line}" for line in process.log_tail())
        return StackError(
            f"{name} exited with code {exit_code} while starting; see {process.log_path}{tail}"
        )

    def _check_ports_free(self, service: StackService) -> None:
        for setting, port in service.ports.items():
            deadline = time.monotonic() + _PORT_RELEASE_S
            while not port_is_free(port):
                holder = port_listener(port)
                if time.monotonic() < deadline:
                    # Bound, but no one listens, or a process that is going away: the sockets
                    # of a service we just stopped or killed (a JVM takes a while to exit
                    # under load); the kernel frees them in moments.
                    time.sleep(0.2)
                    continue
                by_whom = f" by {holder}" if holder is not None else ""
                raise StackError(
                    f"port {port} for {service.name} is already in use{by_whom}; stop that process "
                    f"or choose another port with STACK_{setting.upper()}"
                )

    @staticmethod
    def _check_same_ports(service: StackService, process: ServiceProcess, pid: int) -> None:
        running_ports = process.running_ports(pid)
        wanted = tuple(service.ports.values())
        if running_ports is not None and running_ports != wanted:
            raise StackError(
                f"{service.name} is already running (pid {pid}) on ports "
                f"{', '.join(map(str, running_ports))}, not {', '.join(map(str, wanted))}; "
                f"run `trace-processor stack down {service.name}` first"
            )

    def _check_ports_distinct(self) -> None:
        owners: dict[int, str] = {}
        for service in self._services.values():
            for setting, port in service.ports.items():
                if port in owners:
                    raise StackError(
                        f"STACK_{owners[port].upper()} and STACK_{setting.upper()} are both "
                        f"{port}; give each its own port"
                    )
                owners[port] = setting

    def _sayer(self, name: ServiceName) -> Say:
        def say(text: str) -> None:
            self._console.print(
                f"[bold]{name:<8}[/bold] {escape(text)}", highlight=False, soft_wrap=True
            )

        return say

"""Kafka, Phoenix and MLflow as background processes sharing one state folder.

``LocalStack`` is what the CLI (`trace-processor stack up|down|status`) and the integration
test fixtures use. Services start in parallel; each one counts as up only when it answers a
real request. Every failure is a ``StackError`` whose first line says what to do.

Kafka is one process, or one per node of a cluster (``STACK_KAFKA_BROKERS``, see
kafka_nodes.py): the service ``kafka`` stands for all of them, and they start in parallel too,
since no node of a cluster answers before a majority of the quorum runs. One node can be killed
and started again (``kill_broker``, ``start_broker``) to see what its loss does.

With ``STACK_KAFKA_SECURE`` Kafka is one secured node (see kafka.py); ``kafka_client_env``
says how a client connects to it, and `up` also writes that to client.env (and
client-mtls.env) in the state folder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from processor.errors import StackError
from processor.settings import KafkaClientSettings, StackSettings
from processor.stack.kafka import KafkaService
from processor.stack.kafka_nodes import (
    SECURE_PROCESS,
    KafkaNode,
    bootstrap_servers,
    kafka_nodes,
    node_id_of,
    node_of_process,
)
from processor.stack.kafka_secure import CLIENT_SECURITY_VARIABLES, env_file_text
from processor.stack.layout import (
    SERVICE_NAMES,
    ServiceName,
    StackLayout,
    parse_service_names,
    write_file,
)
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
    """Where clients reach the stack. ``kafka_bootstrap`` names every Kafka node
    (comma-separated); ``kafka_nodes`` says which node listens where."""

    kafka_bootstrap: str
    phoenix_url: str
    mlflow_url: str
    kafka_nodes: tuple[KafkaNode, ...] = ()


@dataclass(frozen=True)
class ServiceStatus:
    """One process as `stack status` sees it (a service, or one Kafka node of a cluster):
    ``running`` means our process is alive, ``healthy`` that it also answered a request just
    now."""

    name: str
    running: bool
    pid: int | None
    url: str
    healthy: bool
    log_path: Path


@dataclass(frozen=True)
class _Unit:
    """One process of the stack and the service it runs (a Kafka node runs ``kafka``)."""

    service: StackService
    process: ServiceProcess

    @property
    def name(self) -> str:
        return self.process.name


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
        self.kafka_nodes = kafka_nodes(settings)
        services: list[StackService] = [
            *(
                KafkaService(settings, self.layout, node, self.kafka_nodes)
                for node in self.kafka_nodes
            ),
            PhoenixService(settings, self.layout, phoenix_env or {}),
            MlflowService(settings, self.layout, mlflow_args, mlflow_env or {}),
        ]
        self._units: dict[str, _Unit] = {}
        for service in services:
            name = service.process_name if isinstance(service, KafkaService) else service.name
            self._units[name] = _Unit(service, ServiceProcess(name, self.layout))
        self._interrupted = threading.Event()
        self._check_ports_distinct()

    @property
    def endpoints(self) -> StackEndpoints:
        return StackEndpoints(
            kafka_bootstrap=bootstrap_servers(self.kafka_nodes),
            phoenix_url=self._units["phoenix"].service.address,
            mlflow_url=self._units["mlflow"].service.address,
            kafka_nodes=self.kafka_nodes,
        )

    def up(self, services: Iterable[str] = SERVICE_NAMES) -> StackEndpoints:
        """Start the services that are not running and wait until each answers.

        Services already running and healthy are left alone.
        """
        names = parse_service_names(services)
        if "kafka" in names:
            self._check_no_other_kafka()
        self._in_parallel([partial(self._bring_up, unit) for unit in self._units_of(names)])
        if "kafka" in names and self.settings.kafka_secure:
            self._write_kafka_client_env()
        return self.endpoints

    def down(self, services: Iterable[str] = SERVICE_NAMES) -> None:
        """Stop the services (their whole process groups); stopped ones are skipped.

        ``kafka`` stops every Kafka node of the state folder, also those of another
        STACK_KAFKA_BROKERS than this stack's.
        """
        names = parse_service_names(services)
        processes = [unit.process for unit in self._units_of(names)]
        if "kafka" in names:
            processes += self._other_kafka_processes()
        self._in_parallel([partial(self._bring_down, process) for process in processes])

    def start(self, service: str) -> None:
        """Start one service (if not running) and wait until it answers; its data is kept."""
        self.up((service,))

    def stop(self, service: str) -> None:
        """Stop one service; its data stays for the next start."""
        self.down((service,))

    def kill_broker(self, node_id: int) -> int:
        """SIGKILL Kafka node ``node_id`` (a crash: no clean shutdown); returns its pid.

        Its data and stale pid file stay; `start_broker` (or `up`) starts it again."""
        unit = self._kafka_unit(node_id)
        pid = unit.process.kill()
        self._sayer(unit.name)(f"killed (pid {pid})")
        return pid

    def start_broker(self, node_id: int) -> None:
        """Start Kafka node ``node_id`` again (after `kill_broker`) and wait until it answers."""
        self._interrupted.clear()
        self._bring_up(self._kafka_unit(node_id))

    def kafka_client_env(self, *, mutual_tls: bool = False) -> dict[str, str]:
        """The KAFKA_* settings of a client of this stack's Kafka, by variable name, as
        KafkaClientSettings reads them (unused ones are empty).

        Plaintext unless STACK_KAFKA_SECURE; then SASL_SSL with SCRAM-SHA-512 as the stack's
        user, or with ``mutual_tls`` TLS with the client certificate on the mTLS port. The
        secured node must have been started once (StackError otherwise). Holds the password:
        not for logs.
        """
        if self.settings.kafka_secure:
            (node,) = self.kafka_nodes
            service = self._units[node.process_name].service
            assert isinstance(service, KafkaService)
            return service.client_env(mutual_tls=mutual_tls)
        if mutual_tls:
            raise StackError(
                "mutual TLS needs the secured Kafka: `trace-processor stack up --secure`"
            )
        return {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers(self.kafka_nodes),
            **dict.fromkeys(CLIENT_SECURITY_VARIABLES, ""),
            "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        }

    def kafka_client_settings(self, *, mutual_tls: bool = False) -> KafkaClientSettings:
        """`kafka_client_env` as validated settings, with nothing from the environment."""
        return KafkaClientSettings.model_validate(self.kafka_client_env(mutual_tls=mutual_tls))

    def kafka_client_env_path(self, *, mutual_tls: bool = False) -> Path:
        """Where `up` writes `kafka_client_env` for the secured Kafka (mode 0600)."""
        return self.layout.kafka_client_env_path(mutual_tls=mutual_tls)

    def _write_kafka_client_env(self) -> None:
        for mutual_tls in (False, True):
            path = self.kafka_client_env_path(mutual_tls=mutual_tls)
            env = self.kafka_client_env(mutual_tls=mutual_tls)
            write_file(path, env_file_text(env, path=path).encode(), private=True)

    def status(self) -> dict[str, ServiceStatus]:
        """Every process's state, by name; asks each running one a health question.

        Kafka nodes of another STACK_KAFKA_BROKERS than this stack's are listed while they run.
        """
        statuses: dict[str, ServiceStatus] = {}
        for name, unit in self._units.items():
            pid = unit.process.running_pid()
            statuses[name] = ServiceStatus(
                name=name,
                running=pid is not None,
                pid=pid,
                url=unit.service.address,
                healthy=pid is not None and unit.service.is_healthy(),
                log_path=unit.process.log_path,
            )
        for process in self._other_kafka_processes():
            pid = process.running_pid()
            ports = process.running_ports(pid) if pid is not None else None
            node = node_of_process(process.name, ports) if ports is not None else None
            if pid is None or node is None:
                continue
            service = KafkaService(self.settings, self.layout, node, (node,))
            statuses[process.name] = ServiceStatus(
                name=process.name,
                running=True,
                pid=pid,
                url=service.address,
                healthy=service.is_healthy(),
                log_path=process.log_path,
            )
        return statuses

    def log_path(self, name: str) -> Path:
        """The log of a process (``kafka-2``), or of a service's first process (``kafka``)."""
        if name in self._units:
            return self._units[name].process.log_path
        (service,) = parse_service_names((name,))
        return self._units_of((service,))[0].process.log_path

    def _units_of(self, names: Iterable[ServiceName]) -> list[_Unit]:
        wanted = set(names)
        return [unit for unit in self._units.values() if unit.service.name in wanted]

    def _kafka_unit(self, node_id: int) -> _Unit:
        for node in self.kafka_nodes:
            if node.node_id == node_id:
                return self._units[node.process_name]
        raise StackError(
            f"no Kafka node {node_id}: this stack has nodes "
            f"{', '.join(str(node.node_id) for node in self.kafka_nodes)}"
        )

    def _other_kafka_processes(self) -> list[ServiceProcess]:
        """Kafka processes of this state folder that this stack's settings do not name."""
        return [
            ServiceProcess(name, self.layout)
            for name in self.layout.recorded_processes()
            if node_id_of(name) is not None and name not in self._units
        ]

    def _check_no_other_kafka(self) -> None:
        running = {
            process.name: pid
            for process in self._other_kafka_processes()
            if (pid := process.running_pid()) is not None
        }
        if running:
            found = ", ".join(f"{name} (pid {pid})" for name, pid in running.items())
            brokers = self.settings.kafka_brokers
            if self.settings.kafka_secure:
                wanted = "secured node STACK_KAFKA_SECURE asks for"
            else:
                nodes = "node" if brokers == 1 else f"{brokers} nodes"
                wanted = f"{nodes} STACK_KAFKA_BROKERS={brokers} asks for"
            hint = _how_to_match(self.settings, set(running))
            raise StackError(
                f"Kafka of {self.layout.root} is running as {found}, not as the {wanted}; "
                f"{hint}run `trace-processor stack down kafka` first "
                "(each size, and the secured node, keeps its own data)"
            )

    def _in_parallel(self, actions: Sequence[Callable[[], None]]) -> None:
        if not actions:
            return
        self._interrupted.clear()
        pool = ThreadPoolExecutor(max_workers=len(actions), thread_name_prefix="stack")
        try:
            futures: list[Future[None]] = [pool.submit(action) for action in actions]
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

    def _bring_up(self, unit: _Unit) -> None:
        service, process = unit.service, unit.process
        say = self._sayer(unit.name)
        pid = process.running_pid()
        if pid is not None:
            self._check_same_ports(unit, pid)
            if service.is_healthy() or self._wait_for_running_service(unit, pid):
                say(f"already running (pid {pid}) at {service.address}")
                return
            # It exited while we waited (it was dying when we looked): start it afresh.
        if process.clean_up_after_crash(grace_s=_STOP_GRACE_S):
            say("its previous run died; removed the stale pid file and leftover processes")
        # Checked before and after prepare: a fetch can take a minute, and an early "port
        # taken" saves the wait.
        self._check_ports_free(unit)
        launch = service.prepare(say)
        self._check_ports_free(unit)
        started = time.monotonic()
        pid = process.spawn(launch, ports=list(service.ports.values()))
        say(f"starting (pid {pid}), log {process.log_path}")
        self._wait_until_healthy(unit)
        say(f"up at {service.address} in {time.monotonic() - started:.1f} s")

    def _bring_down(self, process: ServiceProcess) -> None:
        pid = process.stop(grace_s=_STOP_GRACE_S)
        self._sayer(process.name)(f"stopped (pid {pid})" if pid is not None else "not running")

    def _wait_until_healthy(self, unit: _Unit) -> None:
        """Wait for a service this stack just started; stop it if it never answers."""
        service, process = unit.service, unit.process
        timeout_s = self.settings.start_timeout_s
        deadline = time.monotonic() + timeout_s
        while not service.is_healthy():
            exit_code = process.exit_code()
            if exit_code is not None:
                raise self._died_error(process, exit_code)
            if time.monotonic() >= deadline:
                process.stop(grace_s=_STOP_GRACE_S)
                raise StackError(
                    f"{unit.name} did not answer within {timeout_s:.0f} s and was stopped; "
                    f"see {process.log_path}; on a slow machine raise STACK_START_TIMEOUT_S"
                )
            self._pause(unit.name)

    def _wait_for_running_service(self, unit: _Unit, pid: int) -> bool:
        """Wait for a service found running (still starting, or dying): True once it answers,
        False when it exits first."""
        service, process = unit.service, unit.process
        self._sayer(unit.name)(f"running (pid {pid}) but not answering yet; waiting")
        timeout_s = self.settings.start_timeout_s
        deadline = time.monotonic() + timeout_s
        while not service.is_healthy():
            if process.running_pid() != pid:
                return False
            if time.monotonic() >= deadline:
                raise StackError(
                    f"{unit.name} (pid {pid}) is running but has not answered for "
                    f"{timeout_s:.0f} s; see {process.log_path}; run "
                    f"`trace-processor stack down {service.name}` and retry"
                )
            self._pause(unit.name)
        return True

    def _pause(self, name: str) -> None:
        if self._interrupted.wait(_POLL_INTERVAL_S):
            raise StackError(f"{name}: interrupted while waiting for it to answer")

    @staticmethod
    def _died_error(process: ServiceProcess, exit_code: int) -> StackError:
        process.stop(grace_s=_STOP_GRACE_S)  # its workers may outlive it; also drops the pid file
        tail = "".join(f"\n  | {line}" for line in process.log_tail())
        return StackError(
            f"{process.name} exited with code {exit_code} while starting; "
            f"see {process.log_path}{tail}"
        )

    def _check_ports_free(self, unit: _Unit) -> None:
        for setting, port in unit.service.ports.items():
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
                    f"port {port} for {unit.name} is already in use{by_whom}; stop that process "
                    f"or choose another port with {_variable(setting)}"
                )

    @staticmethod
    def _check_same_ports(unit: _Unit, pid: int) -> None:
        running_ports = unit.process.running_ports(pid)
        wanted = tuple(unit.service.ports.values())
        if running_ports is not None and running_ports != wanted:
            raise StackError(
                f"{unit.name} is already running (pid {pid}) on ports "
                f"{', '.join(map(str, running_ports))}, not {', '.join(map(str, wanted))}; "
                f"run `trace-processor stack down {unit.service.name}` first"
            )

    def _check_ports_distinct(self) -> None:
        owners: dict[int, str] = {}
        for unit in self._units.values():
            for setting, port in unit.service.ports.items():
                if port in owners:
                    raise StackError(
                        f"{_variable(owners[port])} and {_variable(setting)} are both "
                        f"{port}; give each its own port"
                    )
                owners[port] = setting

    def _sayer(self, name: str) -> Say:
        def say(text: str) -> None:
            self._console.print(
                f"[bold]{name:<8}[/bold] {escape(text)}", highlight=False, soft_wrap=True
            )

        return say


def _how_to_match(settings: StackSettings, running: set[str]) -> str:
    """How to name the Kafka that runs, when it is a whole stack of its own; else nothing."""
    if running == {SECURE_PROCESS}:
        return "use --secure (STACK_KAFKA_SECURE=true), or "
    size = len(running)
    plaintext = settings.model_copy(update={"kafka_brokers": size, "kafka_secure": False})
    if {node.process_name for node in kafka_nodes(plaintext)} != running:
        return ""
    options, variables = [], []
    if settings.kafka_secure:
        options.append("--plaintext")
        variables.append("STACK_KAFKA_SECURE=false")
    if size != settings.kafka_brokers:
        options.append(f"--brokers {size}")
        variables.append(f"STACK_KAFKA_BROKERS={size}")
    return f"use {' '.join(options)} ({' '.join(variables)}), or "


def _variable(setting: str) -> str:
    """The variable that sets a port: ``kafka_port+2`` (node 2's) is STACK_KAFKA_PORT + 2."""
    name, plus, offset = setting.partition("+")
    return f"STACK_{name.upper()}" + (f" + {offset}" if plus else "")

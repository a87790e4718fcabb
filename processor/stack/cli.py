"""`trace-processor stack up | down | status`: the local stack from the command line."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterator
from contextlib import contextmanager

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from processor.errors import ConfigurationError, StackError
from processor.settings import load_stack_settings
from processor.stack.layout import SERVICE_NAMES
from processor.stack.local_stack import LocalStack, StackEndpoints

_services_argument = click.argument(
    "services", nargs=-1, type=click.Choice(SERVICE_NAMES, case_sensitive=False)
)


@contextmanager
def _fail_on_stack_errors(console: Console) -> Iterator[None]:
    try:
        yield
    except (StackError, ConfigurationError) as exc:
        Console(stderr=True).print(
            f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True
        )
        raise SystemExit(1) from exc


@click.group("stack")
def stack_group() -> None:
    """Run Kafka, Phoenix and MLflow locally as background processes (state in STACK_DIR)."""
    # The Kafka health probe meets refused and dropped connections while the broker starts;
    # aiokafka logs each one as an error, which is noise on a terminal.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


@stack_group.command("up")
@_services_argument
@click.option(
    "--brokers",
    type=int,
    default=None,
    help="Kafka nodes (broker and controller each); 3 makes a cluster that survives the loss "
    "of one [default: STACK_KAFKA_BROKERS, else 1].",
)
@click.option(
    "--secure/--plaintext",
    default=None,
    help="Kafka as one node with SASL_SSL (PLAIN, SCRAM) and mutual-TLS listeners, its "
    "certificates and password made in the state folder [default: STACK_KAFKA_SECURE, else "
    "plaintext].",
)
def up(services: tuple[str, ...], brokers: int | None, secure: bool | None) -> None:
    """Start SERVICES (default: all) and wait until they answer; running ones are left alone."""
    console = Console()
    with _fail_on_stack_errors(console):
        overrides: dict[str, object] = {}
        if brokers is not None:
            overrides["kafka_brokers"] = brokers
        if secure is not None:
            overrides["kafka_secure"] = secure
        stack = LocalStack(load_stack_settings(**overrides), console=console)
        endpoints = stack.up(services or SERVICE_NAMES)
        # Once the secured Kafka has been up (not when only Phoenix or MLflow were asked for).
        secured = stack.settings.kafka_secure and stack.kafka_client_env_path().exists()
        kafka = secured_kafka_summary(stack) if secured else None
    _print_endpoints(console, endpoints, kafka)


@stack_group.command("down")
@_services_argument
def down(services: tuple[str, ...]) -> None:
    """Stop SERVICES (default: all; kafka: every node); their data stays in the state folder."""
    console = Console()
    with _fail_on_stack_errors(console):
        LocalStack(load_stack_settings(), console=console).down(services or SERVICE_NAMES)


@stack_group.command("status")
def status() -> None:
    """Show which services (and Kafka nodes) run, whether they answer, and where their logs are."""
    console = Console()
    with _fail_on_stack_errors(console):
        stack = LocalStack(load_stack_settings())
        statuses = stack.status()
    table = Table("service", "state", "pid", "address", "log")
    for entry in statuses.values():
        if entry.healthy:
            state = "[green]running[/green]"
        elif entry.running:
            state = "[yellow]not answering[/yellow]"
        else:
            state = "[dim]stopped[/dim]"
        pid = str(entry.pid) if entry.pid is not None else "-"
        log = entry.log_path.relative_to(stack.layout.root)
        table.add_row(entry.name, state, pid, entry.url, escape(str(log)))
    console.print(table)
    console.print(
        f"state folder: {escape(str(stack.layout.root))}", highlight=False, soft_wrap=True
    )


def _print_endpoints(console: Console, endpoints: StackEndpoints, kafka: str | None) -> None:
    # In the spelling the worker's settings read, ready to paste into a shell or .env.
    console.print(
        f"{kafka or f'KAFKA_BOOTSTRAP_SERVERS={endpoints.kafka_bootstrap}'}\n"
        f"PHOENIX_COLLECTOR_ENDPOINT={endpoints.phoenix_url}\n"
        f"MLFLOW_TRACKING_URI={endpoints.mlflow_url}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def secured_kafka_summary(stack: LocalStack) -> str:
    """What a client of the secured Kafka sets, but for the password: where to find it, and
    the line that sets them all from the stack's client.env."""
    env_path = stack.kafka_client_env_path()
    mtls_path = stack.kafka_client_env_path(mutual_tls=True)
    mtls_bootstrap = stack.kafka_client_env(mutual_tls=True)["KAFKA_BOOTSTRAP_SERVERS"]
    lines = [
        f"{name}={value}"
        for name, value in stack.kafka_client_env().items()
        if value and name != "KAFKA_SASL_PASSWORD"
    ]
    lines += [
        f"KAFKA_SASL_PASSWORD: in {env_path}",
        f"# all of them: set -a; . {shlex.quote(str(env_path))}; set +a",
        f"# mutual TLS on {mtls_bootstrap} instead: set -a; . {shlex.quote(str(mtls_path))}; "
        "set +a",
    ]
    return "\n".join(lines)

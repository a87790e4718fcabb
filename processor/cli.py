"""`trace-processor`: the worker, the local stack, demo traffic and admin commands."""

from __future__ import annotations

import asyncio
import sys

import click
from rich.console import Console
from rich.markup import escape

from processor.config_command import config_command
from processor.demo import demo_command
from processor.errors import ProcessorError
from processor.loadgen.cli import loadgen_command
from processor.stack.cli import stack_group
from processor.status import status_command

console = Console(stderr=True)


@click.group()
@click.version_option(package_name="agent-trace-processor")
def main() -> None:
    """Stream processor for LLM agent traces: Kafka -> Phoenix spans and MLflow rollups."""


@main.command()
@click.option(
    "--roles",
    default=None,
    metavar="ROLE,...",
    help="Roles to run, comma-separated: aggregate, finalize, forward [default: "
    "PROCESSOR_ROLES, else all three].",
)
def worker(roles: str | None) -> None:
    """Run a worker. Start more anywhere: each role's consumer group shares its partitions."""
    from processor.settings import load_worker_settings
    from processor.worker.app import run_worker

    try:
        overrides = {}
        if roles is not None:
            overrides["roles"] = [role.strip() for role in roles.split(",") if role.strip()]
        settings = load_worker_settings(**overrides)
        run_worker(settings)
    except ProcessorError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        sys.exit(1)


@main.group()
def topics() -> None:
    """Manage the processor's Kafka topics."""


@topics.command("create")
def topics_create() -> None:
    """Create the spans, dead-letter and partials topics (checks existing partition counts)."""
    from processor.settings import load_worker_settings
    from processor.worker.topics import ensure_topics

    try:
        counts = asyncio.run(ensure_topics(load_worker_settings()))
    except ProcessorError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        sys.exit(1)
    for name, partitions in sorted(counts.items()):
        click.echo(f"{name}: {partitions} partitions")


main.add_command(stack_group, "stack")
main.add_command(loadgen_command, "loadgen")
main.add_command(demo_command, "demo")
main.add_command(status_command, "status")
main.add_command(config_command, "config")


if __name__ == "__main__":
    main()

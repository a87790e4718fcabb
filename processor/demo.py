"""`trace-processor demo`: the whole product on this machine, with demo traffic.

Starts the local stack, one worker process and the load generator, prints where to look, and
stops the worker (leaving the stack up) when the traffic ends or on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click
from rich.console import Console
from rich.markup import escape

from processor.errors import ProcessorError
from processor.settings import load_stack_settings
from processor.stack import LocalStack

console = Console()


@click.command("demo")
@click.option("--rate", default=5.0, show_default=True, help="Demo traces per second.")
@click.option("--duration", default=600.0, show_default=True, help="Seconds of demo traffic.")
@click.option("--window-size-ms", default=60_000, show_default=True, help="Rollup window size.")
def demo_command(rate: float, duration: float, window_size_ms: int) -> None:
    """Run Kafka, Phoenix, MLflow, a worker and demo traffic locally."""
    try:
        stack_settings = load_stack_settings()
        endpoints = LocalStack(stack_settings, console=console).up()
    except ProcessorError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        sys.exit(1)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
        "MLFLOW_TRACKING_URI": endpoints.mlflow_url,
        "PHOENIX_COLLECTOR_ENDPOINT": endpoints.phoenix_url,
        "PROCESSOR_WINDOW_SIZE_MS": str(window_size_ms),
    }
    log_path = stack_settings.dir / "logs" / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "worker"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    console.print(f"worker started (pid {worker.pid}), log: {log_path}")
    console.print(
        f"[bold]Phoenix[/bold]  {endpoints.phoenix_url}  (project 'default': the raw traces)\n"
        f"[bold]MLflow[/bold]   {endpoints.mlflow_url}  (experiment "
        f"'{os.environ.get('MLFLOW_EXPERIMENT_NAME', 'agent-rollups')}': one run per agent per "
        f"day, a point per {window_size_ms // 1000} s window)\n"
        "First rollups appear about one window after the traffic starts. Ctrl-C stops the demo; "
        "`trace-processor stack down` stops the services."
    )
    try:
        loadgen = subprocess.run(
            [
                sys.executable,
                "-m",
                "processor.cli",
                "loadgen",
                "--bootstrap",
                endpoints.kafka_bootstrap,
                "--rate",
                str(rate),
                "--duration",
                str(duration),
            ],
            env=env,
            check=False,
        )
        if loadgen.returncode != 0:
            console.print(f"[red]loadgen exited with {loadgen.returncode}[/red]")
        # let the last window close and reach MLflow before stopping the worker
        time.sleep(window_size_ms / 1000 + 10)
    except KeyboardInterrupt:
        pass
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
    console.print("demo stopped; the stack is still up (`trace-processor stack down`).")

"""`trace-processor status`: a live view of the workers on this machine (and any others named).

The workers are found in the registry folder (``PROCESSOR_REGISTRY_DIR``), where each worker
notes the URL of its HTTP server when it starts and removes the note when it stops; a note left
by a killed worker is dropped once its process is gone. ``--url`` adds workers of other
machines. Every refresh scrapes each worker's ``/metrics`` (Prometheus text) and ``/status``
(JSON); rates are the difference between two scrapes.

``FleetView`` turns scrapes into rich renderables and holds no I/O, so it can be tested with
recorded scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from processor.errors import ConfigurationError

if TYPE_CHECKING:  # imported when the command runs: every `trace-processor` call loads this
    from processor.worker.observability import WorkerRegistry

PREFIX = "trace_processor_"  # of every series (processor.worker.observability.PREFIX)
SCRAPE_TIMEOUT_S = 2.0
SHOWN_WINDOWS = 8
SHOWN_PROBLEMS = 6

Labels = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Scrape:
    """One worker's ``/metrics`` and ``/status`` at one moment (``error`` when unreachable)."""

    url: str
    taken_at_s: float
    samples: Mapping[str, Sequence[tuple[Labels, float]]] = field(default_factory=dict)
    status: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def worker_id(self) -> str:
        return str(self.status.get("worker_id") or self.url)

    def total(self, name: str, **match: str) -> float:
        return sum(
            value
            for labels, value in self.samples.get(PREFIX + name, ())
            if all(labels.get(k) == v for k, v in match.items())
        )

    def by_label(self, name: str, label: str, **match: str) -> dict[str, float]:
        found: dict[str, float] = {}
        for labels, value in self.samples.get(PREFIX + name, ()):
            if all(labels.get(k) == v for k, v in match.items()) and label in labels:
                found[labels[label]] = found.get(labels[label], 0.0) + value
        return found

    def has(self, name: str) -> bool:
        return bool(self.samples.get(PREFIX + name))


def parse_metrics(text: str) -> dict[str, list[tuple[Labels, float]]]:
    samples: dict[str, list[tuple[Labels, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def scrape(client: httpx.Client, url: str, now_s: float) -> Scrape:
    try:
        metrics = client.get(f"{url}/metrics")
        metrics.raise_for_status()
        status = client.get(f"{url}/status")
        status.raise_for_status()
        return Scrape(url, now_s, parse_metrics(metrics.text), status.json())
    except (httpx.HTTPError, ValueError) as exc:
        return Scrape(url, now_s, error=f"{type(exc).__name__}: {exc}")


def scrape_all(urls: Sequence[str], clock_s: Any = time.time) -> list[Scrape]:
    if not urls:
        return []
    with (
        httpx.Client(timeout=SCRAPE_TIMEOUT_S) as client,
        ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool,
    ):
        return list(pool.map(lambda url: scrape(client, url, clock_s()), urls))


# -- the view ------------------------------------------------------------------------------


def _rate(now: Scrape, before: Scrape | None, name: str, **match: str) -> float | None:
    if before is None or before.error or now.error:
        return None
    elapsed = now.taken_at_s - before.taken_at_s
    if elapsed <= 0:
        return None
    # A restarted worker starts its counters at zero again: no rate across that.
    delta = now.total(name, **match) - before.total(name, **match)
    return delta / elapsed if delta >= 0 else None


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 10_000:
        return f"{value / 1000:,.0f}k{unit}"
    if value != int(value) and abs(value) < 100:
        return f"{value:,.1f}{unit}"
    return f"{value:,.0f}{unit}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")


class FleetView:
    """Renders the fleet from the latest scrape of each worker and the one before."""

    def __init__(self) -> None:
        self._previous: dict[str, Scrape] = {}

    def update(self, scrapes: Sequence[Scrape], *, now_s: float, source: str) -> RenderableType:
        previous = self._previous
        self._previous = {s.url: s for s in scrapes if s.error is None}
        return self.render(scrapes, previous, now_s=now_s, source=source)

    def render(
        self,
        scrapes: Sequence[Scrape],
        previous: Mapping[str, Scrape],
        *,
        now_s: float,
        source: str,
    ) -> RenderableType:
        answering = [s for s in scrapes if s.error is None]
        ready = sum(1 for s in answering if s.status.get("ready"))
        spans_rate = [_rate(s, previous.get(s.url), "spans_in_total") for s in answering]
        known_rates = [r for r in spans_rate if r is not None]
        lag = sum(s.total("consumer_lag") - s.total("forward_lag_messages") for s in answering)
        forward_lag = sum(s.total("forward_lag_messages") for s in answering)
        oldest = max(
            (s.total("forward_oldest_unforwarded_age_seconds") for s in answering), default=0.0
        )
        clock = datetime.fromtimestamp(now_s, UTC).strftime("%H:%M:%S UTC")
        headline = Text.assemble(
            ("agent-trace-processor", "bold"),
            f"  {len(scrapes)} worker(s), ",
            (f"{ready} ready", "green" if ready == len(scrapes) and scrapes else "yellow"),
            f"  spans in {_number(sum(known_rates) if known_rates else None, '/s')}",
            f"  lag {_number(lag)}",
            f"  forwarding lag {_number(forward_lag)} (oldest {_duration(oldest)})",
            f"  {clock}",
            (f"  ({source})", "dim"),
        )
        if not scrapes:
            return Group(
                headline,
                Text(
                    "no worker found; start one with `trace-processor worker`, or name one "
                    "with --url",
                    style="yellow",
                ),
            )
        parts: list[RenderableType] = [headline, self._workers(scrapes, previous)]
        partitions = self._partitions(answering, previous, now_s)
        if partitions.row_count:
            parts.append(partitions)
        parts.append(self._windows(answering))
        alerts = self._alerts(answering)
        if alerts is not None:
            parts.append(alerts)
        parts.append(self._problems(scrapes))
        return Group(*parts)

    def _workers(self, scrapes: Sequence[Scrape], previous: Mapping[str, Scrape]) -> Table:
        table = Table(title="workers", title_justify="left", expand=False)
        for column in (
            "worker",
            "ready",
            "partitions",
            "spans in",
            "to Phoenix",
            "lag",
            "forwarding lag",
        ):
            table.add_column(
                column, justify="right" if column not in ("worker", "ready") else "left"
            )
        for column in ("buffer", "Phoenix pending", "windows", "freshness", "dead letters"):
            table.add_column(column, justify="right")
        table.add_column("retries", justify="right")
        for s in scrapes:
            if s.error is not None:
                table.add_row(s.url, Text("unreachable", style="red"), *["-"] * 11)
                continue
            before = previous.get(s.url)
            assignment = s.status.get("assignment", {})
            topics = s.status.get("topics", {})
            spans_parts = assignment.get(topics.get("spans"), [])
            partial_parts = assignment.get(topics.get("partials"), [])
            sampled_parts = assignment.get(topics.get("sampled"), [])
            roles = ",".join(s.status.get("roles", []))
            retries = s.total("phoenix_retries_total") + s.total("mlflow_write_retries_total")
            forwarding = (
                f"{_number(s.total('forward_lag_messages'))} "
                f"({_duration(s.total('forward_oldest_unforwarded_age_seconds'))})"
                if s.has("forward_lag_messages")
                else "-"
            )
            table.add_row(
                f"{s.worker_id} [{roles}]" if roles else s.worker_id,
                Text("ready", style="green")
                if s.status.get("ready")
                else Text("not ready", style="yellow"),
                f"{_ids(spans_parts)} / {_ids(partial_parts)} / {_ids(sampled_parts)}",
                _number(_rate(s, before, "spans_in_total"), "/s"),
                _number(_rate(s, before, "phoenix_spans_accepted_total"), "/s"),
                _number(s.total("consumer_lag") - s.total("forward_lag_messages")),
                forwarding,
                _number(s.total("trace_buffer_traces")),
                _number(s.total("phoenix_spans_pending"))
                if s.has("phoenix_spans_pending")
                else "-",
                _number(s.total("windows_finalized_total")),
                _duration(s.total("last_window_freshness_seconds"))
                if s.has("last_window_freshness_seconds")
                else "-",
                _number(s.total("dead_letters_total")),
                _number(retries),
            )
        return table

    def _partitions(
        self, scrapes: Sequence[Scrape], previous: Mapping[str, Scrape], now_s: float
    ) -> Table:
        table = Table(title="source partitions", title_justify="left")
        for column in ("partition", "worker", "spans in", "lag", "uncommitted"):
            table.add_column(column, justify="left" if column == "worker" else "right")
        table.add_column("watermark behind", justify="right")
        table.add_column("buffer", justify="right")
        rows: list[tuple[int, list[str]]] = []
        for s in scrapes:
            spans_topic = s.status.get("topics", {}).get("spans")
            before = previous.get(s.url)
            watermarks = s.by_label("watermark_timestamp_seconds", "partition")
            for partition in s.status.get("assignment", {}).get(spans_topic, []):
                p = str(partition)
                watermark = watermarks.get(p)
                rows.append(
                    (
                        int(partition),
                        [
                            p,
                            s.worker_id,
                            _number(_rate(s, before, "spans_in_total", partition=p), "/s"),
                            _number(s.total("consumer_lag", topic=spans_topic, partition=p)),
                            _number(
                                s.total("uncommitted_messages", topic=spans_topic, partition=p)
                            ),
                            _duration(now_s - watermark) if watermark is not None else "-",
                            _number(s.total("trace_buffer_traces", partition=p)),
                        ],
                    )
                )
        for _, row in sorted(rows):
            table.add_row(*row)
        return table

    def _windows(self, scrapes: Sequence[Scrape]) -> Table:
        table = Table(title="last windows written", title_justify="left")
        for column in ("agent", "window (UTC)", "spans", "errors", "freshness", "worker"):
            table.add_column(column, justify="right" if column in ("spans", "errors") else "left")
        windows = [(w, s.worker_id) for s in scrapes for w in s.status.get("recent_windows", [])]
        windows.sort(key=lambda item: (item[0]["written_at_ms"], item[0]["agent"]), reverse=True)
        for window, worker in windows[:SHOWN_WINDOWS]:
            table.add_row(
                str(window["agent"]),
                f"{_utc(window['window_start_ms'])}-{_utc(window['window_end_ms'])}",
                _number(window["spans"]),
                _number(window["errors"]),
                _duration((window["written_at_ms"] - window["window_end_ms"]) / 1000),
                worker,
            )
        if not windows:
            table.add_row("none yet", "", "", "", "", "")
        return table

    def _alerts(self, scrapes: Sequence[Scrape]) -> Table | None:
        firing = [
            (alert, s.worker_id) for s in scrapes for alert in s.status.get("alerts_firing", [])
        ]
        if not firing:
            return None
        table = Table(title="alerts firing", title_justify="left")
        for column in ("rule", "severity", "series", "since (UTC)", "worker"):
            table.add_column(column)
        firing.sort(key=lambda item: (item[0]["since_ms"], item[0]["rule"]))
        for alert, worker in firing:
            style = "red" if alert["severity"] == "critical" else "yellow"
            table.add_row(
                Text(str(alert["rule"]), style=style),
                str(alert["severity"]),
                " ".join(str(part) for part in alert["series"] if part),
                _utc(int(alert["since_ms"])),
                worker,
            )
        return table

    def _problems(self, scrapes: Sequence[Scrape]) -> RenderableType:
        lines: list[Text] = []
        for s in scrapes:
            if s.error is not None:
                lines.append(Text(f"{s.url}: {s.error}", style="red"))
                continue
            for problem in s.status.get("problems", []):
                lines.append(Text(f"{s.worker_id}: not ready: {problem}", style="yellow"))
            for reason, count in sorted(s.by_label("dead_letters_total", "reason").items()):
                if count:
                    lines.append(Text(f"{s.worker_id}: {count:,.0f} dead letters: {reason}"))
            for status, count in sorted(s.by_label("phoenix_retries_total", "status").items()):
                if count:
                    lines.append(Text(f"{s.worker_id}: {count:,.0f} Phoenix retries: {status}"))
        recent = [
            (entry, s.worker_id)
            for s in scrapes
            if s.error is None
            for entry in s.status.get("recent_problems", [])
        ]
        recent.sort(key=lambda item: item[0].get("ts_ms", 0), reverse=True)
        for entry, worker in recent[:SHOWN_PROBLEMS]:
            style = "red" if entry.get("level") in ("error", "critical") else "yellow"
            lines.append(
                Text(
                    f"{_utc(int(entry.get('ts_ms', 0)))} {worker} {entry.get('level')}: "
                    f"{entry.get('message')}",
                    style=style,
                )
            )
        if not lines:
            lines.append(Text("no errors", style="green"))
        return Group(Text("errors", style="italic"), *lines)


def _ids(partitions: Iterable[int]) -> str:
    ids = sorted(partitions)
    return ",".join(str(p) for p in ids) if ids else "-"


# -- the command ---------------------------------------------------------------------------


def _registry_dir() -> Path:
    from processor.settings import WorkerSettings, load_worker_settings

    try:
        return load_worker_settings().registry_dir
    except (ConfigurationError, ValueError):
        # The view must work even while the local configuration is being fixed.
        default = WorkerSettings.model_fields["registry_dir"].default
        return Path(default)


def discover(registry: WorkerRegistry, urls: Sequence[str]) -> list[str]:
    found = [worker.url for worker in registry.workers()]
    return found + [url.rstrip("/") for url in urls if url.rstrip("/") not in found]


@click.command("status")
@click.option(
    "--registry-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Registry of local workers [default: PROCESSOR_REGISTRY_DIR].",
)
@click.option("--url", "urls", multiple=True, help="A worker's HTTP address; repeatable.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one view (after two scrapes) and exit.")
def status_command(
    registry_dir: Path | None, urls: tuple[str, ...], interval: float, once: bool
) -> None:
    """Live view of the local workers: throughput, lag, buffers, windows written, errors."""
    from processor.worker.observability import WorkerRegistry

    registry = WorkerRegistry(registry_dir or _registry_dir())
    source = f"registry {registry.directory}" + (f" + {len(urls)} URL(s)" if urls else "")
    view = FleetView()
    console = Console()

    def refresh() -> RenderableType:
        return view.update(scrape_all(discover(registry, urls)), now_s=time.time(), source=source)

    if once:
        refresh()
        time.sleep(min(interval, 1.0))
        console.print(refresh())
        return
    try:
        with Live(refresh(), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(refresh())
    except KeyboardInterrupt:
        pass

"""Is this worker alive, and is it ready? The rules, and the probes of Phoenix and MLflow.

*Live* means the worker's event loop answers and the faust app has not crashed: a worker that
is not live should be restarted. *Ready* means it does useful work now:

- it has joined the consumer group and no rebalance is under way;
- every partition assigned to it has its state restored (aggregate from the checkpoint in the
  commit metadata, finalize from its finalised-until mark): the worker replays from the
  committed offset from there on;
- what its roles write to answers: Phoenix (the forward role) accepts an empty OTLP request
  with our API key, MLflow (the finalize role) answers ``/health``. The aggregate role writes
  only to Kafka, so Phoenix and MLflow being down never makes it unready. The probes run in
  the background every ``health_check_interval_s``; until the first answer a dependency
  counts as not ready.

A worker with no partition at all (more workers than partitions) is ready: it stands by.
``evaluate_readiness`` is pure; ``DependencyProbes`` does the I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from pydantic import SecretStr

from processor.sinks.phoenix import ExportOutcome, PhoenixExporter

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class DependencyCheck:
    """The latest answer of one dependency."""

    name: str
    ok: bool
    detail: str
    checked_at_s: float  # wall clock


@dataclass(frozen=True, slots=True)
class GroupState:
    """The worker's place in the consumer group, as faust reports it."""

    joined: bool  # has completed at least one rebalance
    rebalancing: bool
    stopping: bool
    assigned: frozenset[tuple[str, int]]  # (topic, partition) of the processor's topics
    restored: frozenset[tuple[str, int]]  # those whose state the stages have taken over


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    ready: bool
    problems: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"ready": self.ready, "problems": list(self.problems)}


def evaluate_readiness(
    group: GroupState,
    dependencies: Mapping[str, DependencyCheck | None],
) -> ReadinessReport:
    """Ready when joined, not rebalancing, every assigned partition restored, dependencies up.

    Every reason not to be ready is listed, one line each, so an operator sees them all.
    """
    problems: list[str] = []
    if group.stopping:
        problems.append("stopping")
    if not group.joined:
        problems.append("joining the consumer group: no partitions assigned yet")
    elif group.rebalancing:
        problems.append("rebalancing: partitions are being reassigned")
    else:
        for topic, partition in sorted(group.assigned - group.restored):
            problems.append(f"{topic}[{partition}]: assigned, state not restored yet")
    for name, check in sorted(dependencies.items()):
        if check is None:
            problems.append(f"{name}: not checked yet")
        elif not check.ok:
            problems.append(f"{name}: {check.detail}")
    return ReadinessReport(not problems, tuple(problems))


class Probe(Protocol):
    name: str

    async def check(self) -> tuple[bool, str]:
        """(answers as it should, what it said)."""
        ...

    async def close(self) -> None: ...


class PhoenixProbe:
    """Sends Phoenix an empty OTLP request: up, and taking our API key (stores nothing)."""

    name = "phoenix"

    def __init__(
        self, *, traces_url: str, api_key: SecretStr | None, timeout_s: float = PROBE_TIMEOUT_S
    ) -> None:
        self._exporter = PhoenixExporter(
            traces_url=traces_url, api_key=api_key, timeout_s=timeout_s, max_connections=1
        )

    async def check(self) -> tuple[bool, str]:
        result = await self._exporter.probe()
        if result.ok:
            return True, f"HTTP {result.status}"
        if result.status is None:
            return False, f"unreachable at {self._exporter.traces_url} ({result.detail})"
        if result.outcome is ExportOutcome.UNAUTHORIZED:
            return False, f"refuses the API key (HTTP {result.status}); check PHOENIX_API_KEY"
        return False, f"HTTP {result.status} from {self._exporter.traces_url}"

    async def close(self) -> None:
        await self._exporter.shutdown()


class MlflowProbe:
    """GET ``<tracking uri>/health``: the MLflow server answers."""

    name = "mlflow"

    def __init__(self, *, tracking_uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self._url = f"{tracking_uri.rstrip('/')}/health"
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def check(self) -> tuple[bool, str]:
        try:
            response = await self._client.get(self._url)
        except httpx.HTTPError as exc:
            return False, f"unreachable at {self._url} ({type(exc).__name__})"
        if response.is_success:
            return True, f"HTTP {response.status_code}"
        return False, f"HTTP {response.status_code} from {self._url}"

    async def close(self) -> None:
        await self._client.aclose()


@dataclass
class DependencyProbes:
    """Runs every probe now and then and keeps the latest answers."""

    probes: list[Probe]
    clock_s: Callable[[], float] = time.time
    results: dict[str, DependencyCheck | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for probe in self.probes:
            self.results.setdefault(probe.name, None)

    async def check_all(self) -> None:
        answers = await asyncio.gather(*(self._check(probe) for probe in self.probes))
        for check in answers:
            self.results[check.name] = check

    async def _check(self, probe: Probe) -> DependencyCheck:
        try:
            ok, detail = await probe.check()
        except Exception as exc:  # a probe must never take the worker down
            ok, detail = False, f"probe failed: {type(exc).__name__}: {exc}"
        return DependencyCheck(probe.name, ok, detail, self.clock_s())

    async def close(self) -> None:
        for probe in self.probes:
            await probe.close()

    def as_dict(self) -> dict[str, object]:
        return {
            name: None
            if check is None
            else {"ok": check.ok, "detail": check.detail, "checked_at_s": check.checked_at_s}
            for name, check in self.results.items()
        }


def restored_partitions(
    *,
    spans_topic: str,
    partials_topic: str,
    aggregate_partitions: Iterable[int],
    finalize_partitions: Iterable[int],
) -> frozenset[tuple[str, int]]:
    return frozenset(
        [(spans_topic, p) for p in aggregate_partitions]
        + [(partials_topic, p) for p in finalize_partitions]
    )

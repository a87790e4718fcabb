"""Where finalize's alert events go: the alerts topic and the worker's counters.

None of it holds back rollups: the topic is written like the summaries (handed to the
producer before the commit), and MLflow's run tags are set with the window writes. The webhook
reads the topic on its own (``alert_notifier``). An event's JSON is
``schemas/alert.schema.json``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from processor.core.alerts import FIRING, AlertEvaluator, AlertEvent, Rule
from processor.core.rollup import dimension_items, iso_ms
from processor.sinks.alert_webhook import AlertWebhook

log = logging.getLogger(__name__)

DOCUMENT_VERSION = 1
SendAlert = Callable[[bytes, bytes], Awaitable[None]]


def alert_document(
    event: AlertEvent,
    *,
    run_id: str | None,
    dimension_names: Sequence[str],
    link: Callable[[str], str | None],
) -> dict[str, Any]:
    return {
        "v": DOCUMENT_VERSION,
        "key": event.key().decode(),
        "rule": event.rule,
        "severity": event.severity,
        "state": event.state,
        "agent": event.series.agent,
        "dimensions": dict(dimension_items(dimension_names, event.series.dimensions)),
        "metric": event.metric,
        "op": event.op,
        "value": event.value,
        "threshold": event.threshold,
        "window_start_ms": event.window_start_ms,
        "window_end_ms": event.window_end_ms,
        "window_start": iso_ms(event.window_start_ms),
        "window_end": iso_ms(event.window_end_ms),
        "mlflow_run_id": run_id,
        "exemplars": [{"trace_id": trace, "phoenix_url": link(trace)} for trace in event.trace_ids],
    }


@dataclass
class Alerting:
    """The rules and the outputs of finalize's alerts."""

    rules: Sequence[Rule]
    dimension_names: Sequence[str] = ()
    send: SendAlert | None = None
    webhook: AlertWebhook | None = None  # fed from the topic; here for its counters
    link: Callable[[str], str | None] = lambda trace: None
    events: Counter[str] = field(default_factory=Counter)  # by state

    def evaluator(self) -> AlertEvaluator:
        return AlertEvaluator(self.rules, self.dimension_names)

    async def publish(
        self, events: Sequence[AlertEvent], run_ids: Sequence[str | None]
    ) -> list[dict[str, Any]]:
        documents: list[dict[str, Any]] = []
        for event, run_id in zip(events, run_ids, strict=True):
            document = alert_document(
                event, run_id=run_id, dimension_names=self.dimension_names, link=self.link
            )
            documents.append(document)
            value = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
            if self.send is not None:
                await self.send(event.key(), value)
            self.events[event.state] += 1
            log.log(
                logging.WARNING if event.state == FIRING else logging.INFO,
                "alert %s %s for %s: %s %s %s %s in window %s",
                event.rule,
                event.state,
                " ".join((event.series.agent, *event.series.dimensions)),
                event.metric,
                "-" if event.value is None else f"{event.value:g}",
                event.op,
                f"{event.threshold:g}",
                document["window_start"],
                extra={"agent": event.series.agent, "window_start_ms": event.window_start_ms},
            )
        return documents

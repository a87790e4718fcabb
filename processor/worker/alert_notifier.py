"""The alert webhook fed from the alerts topic, in a consumer group of its own.

Finalize writes each alert event to the alerts topic with its commit; this reads the topic and
hands the events to the webhook, committing an offset only once the webhook settled every
event before it (delivered, or refused with a 4xx). So a webhook that is down, slow or
answering 5xx only makes this lag, and a worker killed meanwhile loses no notification: the
next one (any worker of the group) resends from the commit. After a crash an event may be
delivered twice, with the same key. The group (``<app id>.alerts``) is separate from the
aggregating roles', so it never rebalances them.
"""

from __future__ import annotations

import asyncio
import logging

import mode
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from processor.kafka_security import aiokafka_security_options
from processor.settings import WorkerSettings
from processor.sinks.alert_webhook import AlertWebhook

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 500
MAX_RECORDS_PER_POLL = 100
SETTLE_POLL_S = 0.05


class AlertNotifier(mode.Service):
    def __init__(self, settings: WorkerSettings, webhook: AlertWebhook) -> None:
        super().__init__()
        self._settings = settings
        self.webhook = webhook
        self.bad_records = 0

    async def on_start(self) -> None:
        self.add_future(self.webhook.run())
        self.add_future(self._consume())

    async def on_stop(self) -> None:
        await self.webhook.close()

    async def _consume(self) -> None:
        settings = self._settings
        consumer = AIOKafkaConsumer(
            settings.alerts_topic,
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=f"{settings.app_id}.alerts",
            client_id=f"{settings.app_id}-alerts",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=MAX_RECORDS_PER_POLL,
            **aiokafka_security_options(settings),
        )
        await consumer.start()
        try:
            while not self.should_stop:
                batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
                if not batches:
                    continue
                for records in batches.values():
                    for record in records:
                        try:
                            self.webhook.offer(orjson.loads(record.value or b""))
                        except orjson.JSONDecodeError as exc:
                            # Only finalize writes this topic: a bad record is a foreign one.
                            self.bad_records += 1
                            log.error("ignoring a record of %s: %s", settings.alerts_topic, exc)
                # Commit once the webhook settled them: until then a crash sends them again.
                while self.webhook.pending and not self.should_stop:
                    await asyncio.sleep(SETTLE_POLL_S)
                if self.webhook.pending:
                    return  # stopping: the next owner resends from the last commit
                try:
                    await consumer.commit()
                except KafkaError as exc:  # a rebalance: the events may come once more
                    log.warning("could not commit the alerts delivered: %s", exc)
        finally:
            await consumer.stop()

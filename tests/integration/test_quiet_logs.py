"""The only broker killed under a running worker: its log tells the outage in a few lines.

Without the quieting, the Kafka clients wrote ~150 lines a second while the broker was away
(measured: 20,000 in two minutes). The test kills the broker of a Kafka of its own (not the
session's, which other tests kill and restart too) for 30 s, starts it again and reads the
worker's log: a line when Kafka went away, one when it was back, and few client lines between.
This checks what the unit tests cannot: that the clients' real messages are recognised.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from processor.stack import LocalStack
from tests.integration.support import WorkerProcess, poll_until, worker_env

OUTAGE_S = 30.0
# Kinds of client lines the outage brings (a dozen seen) with room for a slower machine's.
MAX_CLIENT_LINES = 60
CLIENT_LOGGERS = ("aiokafka", "faust", "mode")


def _entries(log: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"ts"')]


def test_a_killed_broker_is_a_few_lines_in_the_log(
    lone_broker: LocalStack, tmp_path: Path, unique_name: str
) -> None:
    env = worker_env(
        lone_broker.endpoints,
        name=unique_name,
        data_dir=tmp_path / "data",
        # Only Kafka runs: the aggregate role writes nowhere else.
        PROCESSOR_PHOENIX_ENABLED="false",
        PROCESSOR_LOG_FORMAT="json",
        PROCESSOR_METRICS_HOST="127.0.0.1",
        PROCESSOR_METRICS_PORT="0",
        PROCESSOR_REGISTRY_DIR=str(tmp_path / "registry"),
    )
    worker = WorkerProcess(env, tmp_path / "worker.log", args=("--roles", "aggregate")).start()
    try:
        poll_until(
            lambda: "Setting newly assigned partitions" in worker.log() or None,
            timeout_s=180,
            what="the worker's first assignment",
        )
        killed_at = time.time()
        lone_broker.kill_broker(1)
        time.sleep(OUTAGE_S)
        lone_broker.start_broker(1)
        poll_until(
            lambda: "kafka reachable again" in worker.log() or None,
            timeout_s=120,
            what="the worker's line that Kafka is back",
        )
        assert worker.process is not None and worker.process.poll() is None, worker.log()[-3000:]
    finally:
        worker.stop()

    entries = _entries(worker.log())
    state = [str(e["message"]) for e in entries if e["logger"] == "processor.worker.kafka_log"]
    outage = [s for s in state if s.startswith("kafka ")]
    assert outage[0].startswith("kafka unreachable: "), state
    [back] = [s for s in outage if s.startswith("kafka reachable again after ")]
    assert "repeated client log lines suppressed" in back
    back_at = next(
        e["ts"] for e in entries if str(e["message"]).startswith("kafka reachable again")
    )
    client = [
        e
        for e in entries
        if str(e["logger"]).split(".")[0] in CLIENT_LOGGERS
        and killed_at <= _timestamp(e["ts"]) <= _timestamp(back_at)
    ]
    assert len(client) <= MAX_CLIENT_LINES, "\n".join(str(e["message"]) for e in client)
    assert "Traceback" not in worker.log(), worker.log()[-3000:]


def _timestamp(ts: object) -> float:
    return datetime.fromisoformat(str(ts)).timestamp()

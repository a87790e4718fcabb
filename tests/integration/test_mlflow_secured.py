"""MLflow as production runs it, with basic auth on, and going away in the middle of a stream.

A separate `mlflow server --app-name basic-auth` with its own ports (4154x) and state folder:
the session's MLflow stays untouched while this one is stopped and started. The processor
reaches it as a user of its own (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), like a
worker in production.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from mlflow.tracking import MlflowClient

from processor.clock import wall_clock_ms
from processor.core.aggregate import WindowAggregate
from processor.core.rollup import FinalRollup, PartialRollup, PartitionProgress, SeriesKey
from processor.errors import RetryableExportError
from processor.settings import StackSettings
from processor.sinks.mlflow_writer import RollupWriter
from processor.stack import LocalStack
from processor.worker.finalize import FinalizeRole
from tests.integration.support import mlflow_client_environment

pytestmark = pytest.mark.integration

PORTS = {
    "kafka_port": 41540,
    "kafka_controller_port": 41541,
    "phoenix_port": 41542,
    "phoenix_grpc_port": 41543,
    "mlflow_port": 41544,
}
ADMIN = ("admin", "admin-password-of-the-test-server")
WRITER = ("rollup-writer", "writer-password-of-the-test-server")
MAY_2_NOON = 1_714_651_200_000  # 2024-05-02T12:00:00Z


@pytest.fixture(scope="module")
def secured_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, str]]:
    state = tmp_path_factory.mktemp("secured-mlflow")
    # MLflow's shipped basic_auth.ini, plus its credential cache: without it every request
    # pays a PBKDF2 password check (seconds on a busy machine), as in production.
    auth_config = state / "basic_auth.ini"
    auth_config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        "database_uri = sqlite:///basic_auth.db\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        "auth_cache_ttl_seconds = 300\n"
    )
    local = LocalStack(
        StackSettings.model_validate({"dir": state, **PORTS}),
        mlflow_args=("--app-name", "basic-auth"),
        mlflow_env={
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        },
    )
    try:
        url = local.up(services=("mlflow",)).mlflow_url
        with httpx.Client(base_url=url, auth=ADMIN, timeout=30, trust_env=False) as admin:
            created = admin.post(
                "/api/2.0/mlflow/users/create",
                json={"username": WRITER[0], "password": WRITER[1]},
            )
            assert created.status_code == 200, created.text
        yield local, url
    finally:
        local.down()


@pytest.fixture(autouse=True)
def _own_mlflow_credentials() -> Iterator[None]:
    with mlflow_client_environment():
        yield


def _login(user: tuple[str, str] | None) -> None:
    """Give the MLflow client these credentials, as a user does (None: none)."""
    if user is None:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    else:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user


def _aggregate(seed: int) -> WindowAggregate:
    rng = random.Random(seed)
    aggregate = WindowAggregate()
    for _ in range(rng.randint(2, 9)):
        prompt, completion = rng.randint(50, 900), rng.randint(10, 300)
        aggregate.add(
            trace_id=rng.randbytes(16),
            duration_ns=rng.randint(5, 9_000) * 1_000_000,
            is_error=rng.random() < 0.2,
            is_invocation=True,
            is_llm=True,
            tokens_prompt=prompt,
            tokens_completion=completion,
            tokens_total=prompt + completion,
            cost_nanos=rng.randint(0, 3_000_000),
        )
    return aggregate


def _points(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, int, float]]:
    history = client.get_metric_history(run_id, metric)
    return sorted((point.step, point.timestamp, point.value) for point in history)


def test_writes_need_a_user_allowed_to_edit_the_experiment(
    secured_mlflow: tuple[LocalStack, str],
) -> None:
    _, url = secured_mlflow
    # The team's experiment exists already, made by the admin; users may only read it.
    with httpx.Client(base_url=url, auth=ADMIN, timeout=30, trust_env=False) as admin:
        made = admin.post("/api/2.0/mlflow/experiments/create", json={"name": "team-rollups"})
        assert made.status_code == 200, made.text
        experiment_id = made.json()["experiment_id"]
    rollups = [
        FinalRollup(SeriesKey("coder"), MAY_2_NOON, 60_000, _aggregate(1), (0,), complete=True)
    ]

    _login(None)
    with pytest.raises(RetryableExportError, match="MLFLOW_TRACKING_USERNAME"):
        RollupWriter(tracking_uri=url, experiment_name="team-rollups").write(rollups)
    _login((WRITER[0], "not-the-password"))
    with pytest.raises(RetryableExportError, match="MLFLOW_TRACKING_PASSWORD"):
        RollupWriter(tracking_uri=url, experiment_name="team-rollups").write(rollups)

    _login(WRITER)
    writer = RollupWriter(tracking_uri=url, experiment_name="team-rollups")
    with pytest.raises(RetryableExportError, match="EDIT permission"):
        writer.write(rollups)
    with httpx.Client(base_url=url, auth=ADMIN, timeout=30, trust_env=False) as admin:
        granted = admin.post(
            "/api/3.0/mlflow/users/permissions/grant",
            json={
                "username": WRITER[0],
                "resource_type": "experiment",
                "resource_id": experiment_id,
                "permission": "EDIT",
            },
        )
        assert granted.status_code == 200, granted.text
    writer.write(rollups)  # the same writer, no restart: the window was waiting, not lost

    client = MlflowClient(url)
    (run,) = client.search_runs([experiment_id])
    assert run.info.run_name == "coder 2024-05-02"
    assert _points(client, run.info.run_id, "spans") == [
        (rollups[0].step, rollups[0].window_end_ms, float(rollups[0].aggregate.spans))
    ]
    assert client.list_artifacts(run.info.run_id, "windows")  # artifacts pass the auth too


async def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.25)


def test_every_window_arrives_exactly_once_across_an_mlflow_outage(
    secured_mlflow: tuple[LocalStack, str],
) -> None:
    local, url = secured_mlflow
    _login(WRITER)
    agents = ("orchestrator", "coder", "critic")
    window_ms = 1_000
    writer = RollupWriter(
        tracking_uri=url, experiment_name="outage", params={"window_size_ms": str(window_ms)}
    )
    finalize = FinalizeRole(
        source_partitions=1,
        max_wait_ms=600_000,
        writer=writer,
        clock=wall_clock_ms,
        retry_base_s=0.25,
        retry_max_s=2.0,
    )
    finalize.assign(0, None)  # as on a partition assignment with nothing committed yet
    sent: list[PartialRollup] = []
    outage: dict[str, int] = {}

    async def stream(stop: asyncio.Event) -> None:
        # Aggregate's output for one source partition: a window of partials, then its close.
        offset = 0
        while not stop.is_set():
            start = MAY_2_NOON + len(sent) // len(agents) * window_ms
            for agent in agents:
                partial = PartialRollup(
                    SeriesKey(agent), start, window_ms, 0, _aggregate(len(sent))
                )
                sent.append(partial)
                finalize.handle(0, offset, partial.to_bytes())
                offset += 1
            finalize.handle(0, offset, PartitionProgress(0, start + window_ms).to_bytes())
            offset += 1
            await asyncio.sleep(1.5)

    async def timer() -> None:  # the worker's finalize timer: one tick at a time
        while True:
            await finalize.tick()
            await asyncio.sleep(0.5)

    async def scenario() -> None:
        stop = asyncio.Event()
        feeding = asyncio.create_task(stream(stop))
        ticking = asyncio.create_task(timer())
        try:
            await _until(lambda: finalize.windows_written >= 2 * len(agents), 120, "first windows")
            await asyncio.to_thread(local.stop, "mlflow")
            outage["written_before"] = finalize.windows_written
            await asyncio.sleep(30)
            outage["written_during"] = finalize.windows_written - outage["written_before"]
            outage["retries_during"] = finalize.write_retries
            await asyncio.to_thread(local.start, "mlflow")
            await asyncio.sleep(3)  # the stream goes on a little after MLflow is back
            stop.set()
            await feeding
            await _until(lambda: finalize.windows_written == len(sent), 120, "every window")
        finally:
            stop.set()
            feeding.cancel()
            ticking.cancel()
            await asyncio.gather(feeding, ticking, return_exceptions=True)

    asyncio.run(scenario())

    windows = len(sent) // len(agents)
    assert windows >= 25, "the stream ran through the outage"
    assert outage["written_during"] == 0
    # Each failed attempt came back within seconds and was retried: no call hung on the way.
    assert outage["retries_during"] >= 3
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("outage")
    assert experiment is not None
    runs = {r.data.tags["agent"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(agents)
    for agent, run in runs.items():
        mine = [
            FinalRollup(p.series, p.window_start_ms, window_ms, p.aggregate, (0,), complete=True)
            for p in sent
            if p.series.agent == agent
        ]
        for metric in mine[0].metrics():
            expected = sorted(
                (r.step, r.window_end_ms, float(r.metrics()[metric]))
                for r in mine
                if metric in r.metrics()
            )
            assert _points(client, run.info.run_id, metric) == expected, (agent, metric)

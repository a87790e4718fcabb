"""The product against a secured broker, configured only through the KAFKA_* settings.

The broker is the test module's own (`stack up --secure`): a SASL_SSL listener (SCRAM and
PLAIN users) and a mutual-TLS listener, with a throwaway CA. Over each, the load generator and
the agents' exporter (the LangGraph example, through ``configure_tracing()``) publish, and a
worker moves the stream to MLflow and Phoenix: the rollups equal the truth, every counted span
reaches Phoenix. Wrong credentials, a CA that did not sign the broker's certificate and a
missing client certificate each stop start-up with one line saying what to fix, and the
password shows in no output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from processor.core.rollup import ALL_AGENTS
from processor.loadgen import Truth
from processor.settings import StackSettings
from processor.stack import LocalStack, StackEndpoints
from tests.integration.support import (
    WorkerProcess,
    assert_window_equals_truth,
    environment_without_settings,
    mlflow_rollups,
    phoenix_span_ids,
    poll_until,
    worker_env,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "langgraph_two_agents.py"
WINDOW_MS = 10_000
QUESTIONS = 3
# What the example's fake models report per call (examples/langgraph_two_agents.py).
USAGE = {"researcher": [(120, 45)], "writer": [(310, 160), (190, 20)]}
START_UP_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """`stack up --secure`, Kafka alone; Phoenix and MLflow are the session's. Its ports
    (TEST_KAFKA_SECURE_PORT and the two above) lie below Linux's ephemeral range, for the
    reason conftest's ``kafka_cluster`` gives."""
    port = int(os.environ.get("TEST_KAFKA_SECURE_PORT", "29492"))
    stack = LocalStack(
        StackSettings(
            dir=tmp_path_factory.mktemp("secure-broker"),
            kafka_secure=True,
            kafka_port=port,
            kafka_controller_port=port + 1,
            kafka_mtls_port=port + 2,
            # Not started; set so that nothing defaults to another stack's ports.
            phoenix_port=port + 10,
            phoenix_grpc_port=port + 11,
            mlflow_port=port + 12,
            start_timeout_s=300,
        )
    )
    try:
        stack.up(("kafka",))
        yield stack
    finally:
        stack.down(("kafka",))


def _cli(*args: str, env: Mapping[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor.cli", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


# Seeds no other test of the session uses: Phoenix keeps one span per span id over all its
# projects, so another test's copy of a trace would hide this one's spans.
@pytest.mark.parametrize(("listener", "seed"), [("sasl_ssl", 9121), ("mtls", 9122)])
def test_a_stream_through_a_secured_broker_reaches_mlflow_and_phoenix(
    secure_broker: LocalStack,
    stack: StackEndpoints,
    listener: str,
    seed: int,
    unique_name: str,
    work_dir: Path,
) -> None:
    client = secure_broker.kafka_client_env(mutual_tls=listener == "mtls")
    password = secure_broker.kafka_client_env()["KAFKA_SASL_PASSWORD"]
    topic = f"{unique_name}.spans"  # worker_env's name for it
    # The load generator: event time well in the past, so its windows close once it is read.
    start_ms = time.time_ns() // 1_000_000 - 15 * 60 * 1000
    truth_path = work_dir / "truth.json"
    loadgen = _cli(
        "loadgen", "--topic", topic, "--count", "40", "--rate", "2", "--as-fast-as-possible",
        "--start-ms", str(start_ms), "--seed", str(seed), "--window-size-ms", str(WINDOW_MS),
        "--latency-scale", "0.1",
        "--truth", str(truth_path), "--no-progress",
        env={**environment_without_settings(), **client},
        timeout_s=120,
    )  # fmt: skip
    assert loadgen.returncode == 0, loadgen.stderr[-3000:]
    truth = Truth.load(truth_path)
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        # A trace is one message, sent once it ends: its first spans arrive that much later.
        PROCESSOR_ALLOWED_LATENESS_MS=str(int(truth.max_trace_duration_ms) + 1_000),
        PROCESSOR_IDLE_TIMEOUT_MS="2000",
        PROCESSOR_SAMPLING_PROBABILITY="1.0",  # every span to Phoenix: counted one by one
        **client,
    )
    assert env["PROCESSOR_SPANS_TOPIC"] == topic

    worker = WorkerProcess(env, work_dir / "worker.log").start()
    try:
        # The agents' exporter, configured by the environment a deployment gives it.
        agent = subprocess.run(
            [sys.executable, str(EXAMPLE), "--questions", str(QUESTIONS), "--project", unique_name],
            env={
                **environment_without_settings(),
                **client,
                "PROCESSOR_SPANS_TOPIC": topic,
                "PYTHONPATH": str(ROOT),
            },
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert agent.returncode == 0, agent.stderr[-3000:]

        expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}

        def every_window_written() -> dict | None:
            found = mlflow_rollups(stack.mlflow_url, unique_name)
            # The example's windows are now's; the load generator's lie 15 minutes back.
            example = _example_windows(found, expected)
            by_agent = _totals_by_agent(example, ("llm_calls", "invocations"))
            done = (
                all(key in found and "spans" in found[key] for key in expected)
                and all(
                    by_agent[name]["llm_calls"] == QUESTIONS * len(calls)
                    for name, calls in USAGE.items()
                )
                and by_agent["orchestrator"]["invocations"] == QUESTIONS  # the graph's roots
                # An agent's invocation ends after its model calls, maybe a window later.
                and all(by_agent[name]["invocations"] == QUESTIONS for name in USAGE)
            )
            return found if done else None

        found = poll_until(every_window_written, timeout_s=240, what="every window in MLflow")
        for key, want in expected.items():
            assert_window_equals_truth(key, found[key], want)
        example = _example_windows(found, expected)
        totals = _totals_by_agent(example, ("spans", "llm_calls", "tokens_prompt",
                                            "tokens_completion", "invocations"))  # fmt: skip
        assert set(totals) == {"orchestrator", "researcher", "writer"}
        for name, calls in USAGE.items():
            assert totals[name]["invocations"] == QUESTIONS
            assert totals[name]["tokens_prompt"] == QUESTIONS * sum(p for p, _ in calls)
            assert totals[name]["tokens_completion"] == QUESTIONS * sum(c for _, c in calls)

        # Every span counted reaches Phoenix, once. The example's last spans may close a window
        # after its model calls did: MLflow's count is read again until the two agree.
        def phoenix_holds_every_counted_span() -> tuple[list[str], float] | None:
            counted = sum(
                values.get("spans", 0)
                for (agent, _), values in mlflow_rollups(stack.mlflow_url, unique_name).items()
                if agent != ALL_AGENTS
            )
            ids = phoenix_span_ids(stack.phoenix_url, unique_name)
            return (ids, counted) if len(ids) == counted else None

        got, counted = poll_until(
            phoenix_holds_every_counted_span, timeout_s=180, what="every counted span in Phoenix"
        )
        assert len(set(got)) == len(got) == counted
        assert counted >= truth.span_count + sum(agent["spans"] for agent in totals.values())
    finally:
        worker.stop()
    log = worker.log()
    assert "Traceback" not in log, log[-3000:]
    for output in (log, loadgen.stdout, loadgen.stderr, agent.stdout, agent.stderr):
        assert password not in output


def _example_windows(found: dict, expected: dict) -> dict:
    """The example's windows per agent: those of no loadgen window, without the all-agents
    series (which counts both)."""
    return {
        key: value for key, value in found.items() if key not in expected and key[0] != ALL_AGENTS
    }


def _totals_by_agent(
    found: Mapping[tuple[str, int], Mapping[str, float]], metrics: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (agent, _), values in found.items():
        for metric in metrics:
            totals[agent][metric] += values.get(metric, 0)
    return totals


def _start_up_fails(env: Mapping[str, str], work_dir: Path) -> str:
    """Run a worker that must stop at start-up; its output."""
    worker = WorkerProcess(dict(env), work_dir / "worker.log").start()
    assert worker.process is not None
    try:
        code = worker.process.wait(timeout=START_UP_TIMEOUT_S)
    finally:
        worker.kill()
    output = worker.log()
    assert code == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def test_a_wrong_password_stops_start_up_with_one_clear_line(
    secure_broker: LocalStack, stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    client = secure_broker.kafka_client_env()
    password = client["KAFKA_SASL_PASSWORD"]
    wrong = "not-" + password[::-1]
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        **{**client, "KAFKA_SASL_PASSWORD": wrong},
    )
    line = _start_up_fails(env, work_dir)
    assert "refused the credentials" in line and client["KAFKA_SASL_USERNAME"] in line, line
    output = (work_dir / "worker.log").read_text()
    assert wrong not in output and password not in output


def test_a_broker_certificate_the_ca_did_not_sign_stops_start_up(
    secure_broker: LocalStack, stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    client = secure_broker.kafka_client_env()
    other_ca = secure_broker.layout.kafka_tls.other_ca
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        **{**client, "KAFKA_SSL_CA_LOCATION": str(other_ca)},
    )
    line = _start_up_fails(env, work_dir)
    assert "not trusted" in line and "KAFKA_SSL_CA_LOCATION" in line, line
    assert client["KAFKA_SASL_PASSWORD"] not in (work_dir / "worker.log").read_text()


def test_mutual_tls_without_a_client_certificate_stops_start_up(
    secure_broker: LocalStack, stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    client = {
        key: value
        for key, value in secure_broker.kafka_client_env(mutual_tls=True).items()
        if key not in ("KAFKA_SSL_CERTIFICATE_LOCATION", "KAFKA_SSL_KEY_LOCATION")
    }
    line = _start_up_fails(
        worker_env(stack, name=unique_name, data_dir=work_dir / "faust", **client), work_dir
    )
    assert "client certificate" in line, line


def test_topics_create_with_plaintext_against_the_secured_port_says_so(
    secure_broker: LocalStack, unique_name: str
) -> None:
    bootstrap = secure_broker.kafka_client_env()["KAFKA_BOOTSTRAP_SERVERS"]
    env = {
        **environment_without_settings(),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "PROCESSOR_SPANS_TOPIC": f"{unique_name}.spans",
    }
    created = _cli("topics", "create", env=env, timeout_s=START_UP_TIMEOUT_S)
    assert created.returncode == 1, created.stdout + created.stderr
    [line] = created.stderr.splitlines()
    assert "did not answer PLAINTEXT" in line and "KAFKA_SECURITY_PROTOCOL" in line, line


def test_config_masks_the_password(secure_broker: LocalStack) -> None:
    client = secure_broker.kafka_client_env()
    shown = _cli("config", env={**environment_without_settings(), **client}, timeout_s=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "KAFKA_SASL_PASSWORD" in shown.stdout and "********" in shown.stdout
    assert client["KAFKA_SASL_PASSWORD"] not in shown.stdout + shown.stderr

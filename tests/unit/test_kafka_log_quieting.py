"""A broker storm in the worker's log: state lines and the first of each kind, not thousands.

The records are those the Kafka client libraries wrote while a broker was killed for 90 s
(aiokafka 0.14's own templates and errors), fed through ``KafkaLogQuieter`` as the handlers
of a worker use it, on a clock the test moves.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiokafka.errors import KafkaConnectionError, NodeNotReadyError

from processor.settings import WorkerSettings
from processor.worker.kafka_log import (
    KafkaLogQuieter,
    bootstrap_probe,
    format_duration,
    is_connection_error,
    peers_of,
)
from processor.worker.logging_setup import logging_config

GROUP = "agent-trace-processor"
NOT_READY = NodeNotReadyError("Attempt to send a request to node which is not ready (node id 1).")
REFUSED = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 32092)")


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Probe:
    answers: bool = False
    calls: int = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.answers


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records]

    def state_lines(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.name == REPORT]


REPORT = "test.kafka_log.report"
LOGGERS = ("aiokafka", "faust", "mode", "processor.worker.app", REPORT)


@dataclass
class Rig:
    clock: Clock
    probe: Probe
    quieter: KafkaLogQuieter
    handler: Captured
    fed: int = 0
    ticks: list[float] = field(default_factory=list)

    def log(self, name: str, level: int, msg: str, *args: object) -> None:
        self.fed += 1
        logging.getLogger(name).log(level, msg, *args)

    def advance(self, seconds: float, *, tick: bool = True) -> None:
        """Move the clock a second at a time, ticking as the worker's thread does."""
        for _ in range(round(seconds)):
            self.clock.now += 1
            if tick:
                self.quieter.tick()

    def storm_second(self, *, node: int = 1) -> None:
        """One second of what the clients wrote with the broker gone (~200 records)."""
        for _ in range(100):
            self.log(
                "aiokafka", logging.ERROR, "Unable connect to node with id %s: %s", node, REFUSED
            )
        for _ in range(50):
            self.log("aiokafka", logging.ERROR, "Unable to update metadata from %s", [node])
        for _ in range(20):
            self.log(
                "aiokafka.consumer.fetcher",
                logging.ERROR,
                "Failed fetch messages from %s: %s",
                node,
                NOT_READY,
            )
            self.log(
                "aiokafka.consumer.group_coordinator",
                logging.ERROR,
                "Group Coordinator Request failed: %s",
                NOT_READY,
            )
        for _ in range(10):
            self.log(
                "aiokafka.producer.sender",
                logging.WARNING,
                "Got error produce response: %s",
                NOT_READY,
            )

    def reconnect_burst(self) -> None:
        """What the clients wrote in the second after the broker answered again."""
        coordinator = "aiokafka.consumer.group_coordinator"
        for _ in range(5):
            self.log(
                coordinator,
                logging.WARNING,
                "Heartbeat failed for group %s: coordinator (node %s) is either not started or "
                "not valid",
                GROUP,
                1,
            )
            self.log(
                coordinator, logging.ERROR, "Heartbeat session expired - marking coordinator dead"
            )
            self.log(coordinator, logging.INFO, "Discovered coordinator %s for group %s", 1, GROUP)
            self.log(
                coordinator,
                logging.INFO,
                "OffsetCommit failed for group %s due to a coordinator error (%s), will find new "
                "coordinator and retry",
                GROUP,
                "NotCoordinatorForGroupError",
            )


@pytest.fixture
def rig() -> Iterator[Rig]:
    clock, probe, handler = Clock(), Probe(), Captured()
    quieter = KafkaLogQuieter(
        clock=clock, probe=probe, report=logging.getLogger(REPORT), settle_s=5.0
    )
    handler.addFilter(quieter)
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(handler)
    # Children of the client loggers must reach the handler through them, at any level.
    children = [
        logging.getLogger(name)
        for name in (
            "aiokafka.consumer.fetcher",
            "aiokafka.consumer.group_coordinator",
            "aiokafka.producer.sender",
            "mode.timers",
            "faust.transport.consumer",
        )
    ]
    child_levels = [(child, child.level) for child in children]
    for child in children:
        child.setLevel(logging.NOTSET)
    yield Rig(clock, probe, quieter, handler)
    for logger, level, propagate in saved:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    for child, level in child_levels:
        child.setLevel(level)


def test_a_90_s_outage_is_a_few_lines(rig: Rig) -> None:
    rig.log("processor.worker.app", logging.INFO, "progress messages=%d", 10)
    for _ in range(90):
        rig.storm_second()
        rig.advance(1)
    rig.probe.answers = True
    rig.reconnect_burst()
    rig.advance(10)

    state = rig.handler.state_lines()
    assert state[0].startswith("kafka unreachable: the Kafka clients report connection errors")
    # One summary a minute while it lasts, with what was left out.
    assert state[1].startswith("kafka unreachable for 1m00s (127.0.0.1:32092, node 1), ")
    assert 'repeated client log lines suppressed: aiokafka "Unable connect to node' in state[1]
    assert state[2].startswith("kafka reachable again after 1m29s (127.0.0.1:32092, node 1), ")
    assert len(state) == 3
    # The clients' lines: the first of each kind, storm and burst.
    client = [r for r in rig.handler.records if r.name.startswith("aiokafka")]
    assert [r.getMessage().split(":")[0] for r in client] == [
        "Unable connect to node with id 1",
        "Unable to update metadata from [1]",
        "Failed fetch messages from 1",
        "Group Coordinator Request failed",
        "Got error produce response",
        "Heartbeat failed for group agent-trace-processor",
        "Heartbeat session expired - marking coordinator dead",
        "Discovered coordinator 1 for group agent-trace-processor",
        "OffsetCommit failed for group agent-trace-processor due to a coordinator error (NotCoordinatorForGroupError), will find new coordinator and retry",  # noqa: E501
    ]
    suppressed = rig.fed - 1 - len(client)
    assert f"{suppressed:,} repeated client log lines suppressed" in state[2]
    assert rig.handler.records[0].name == "processor.worker.app"
    # The state line comes before the first client error it stands for.
    assert rig.handler.records[1].name == REPORT
    assert rig.handler.records[2].getMessage().startswith("Unable connect to node with id 1")


def test_the_summary_names_the_noisiest_kinds_and_their_counts(rig: Rig) -> None:
    for _ in range(60):
        rig.storm_second()
        rig.advance(1)
    summary = rig.handler.state_lines()[1]
    assert 'aiokafka "Unable connect to node with id 1: [Errno 111] Connect call failed' in summary
    assert "x5,999" in summary  # 100 a second for 60 s, less the first one logged
    assert "x2,999" in summary
    assert summary.endswith("2 more kinds")


def test_the_processors_own_lines_always_pass(rig: Rig) -> None:
    rig.storm_second()
    for _ in range(5):
        rig.log("processor.worker.app", logging.WARNING, "MLflow not ready yet: %s", "refused")
    own = [r for r in rig.handler.records if r.name == "processor.worker.app"]
    assert len(own) == 5


def test_not_back_while_the_probe_fails(rig: Rig) -> None:
    rig.storm_second()
    rig.advance(30)  # the errors stopped, but nothing accepts a connection
    assert rig.probe.calls > 0
    assert not any("reachable again" in line for line in rig.handler.state_lines())
    rig.probe.answers = True
    rig.advance(1)
    assert rig.handler.state_lines()[-1].startswith("kafka reachable again after <1s")


def test_not_back_while_errors_keep_coming_even_seconds_apart(rig: Rig) -> None:
    # A black-holed network: each connect hangs until its timeout, errors come 3 s apart.
    rig.probe.answers = True
    for _ in range(40):
        rig.log("aiokafka", logging.ERROR, "Unable connect to node with id %s: %s", 1, REFUSED)
        rig.advance(3)
    assert not any("reachable again" in line for line in rig.handler.state_lines())
    rig.advance(6)
    assert rig.handler.state_lines()[-1].startswith("kafka reachable again after 1m57s")


def test_an_error_during_the_probe_keeps_it_unreachable(rig: Rig) -> None:
    rig.storm_second()
    rig.advance(6, tick=False)

    def probe_while_failing() -> bool:
        rig.log("aiokafka", logging.ERROR, "Unable connect to node with id %s: %s", 1, REFUSED)
        return True

    rig.quieter.configure(probe=probe_while_failing, passthrough=False)
    rig.quieter.tick()
    assert not any("reachable again" in line for line in rig.handler.state_lines())


def test_a_second_outage_shows_its_first_errors_again(rig: Rig) -> None:
    rig.probe.answers = True
    rig.storm_second()
    rig.advance(10)
    rig.storm_second(node=2)
    rig.advance(10)
    unable = [m for m in rig.handler.lines if "Unable connect to node" in m]
    assert len(unable) == 2
    assert [line.split(":")[0] for line in rig.handler.state_lines()] == [
        "kafka unreachable",
        "kafka reachable again after <1s (127.0.0.1",
        "kafka unreachable",
        "kafka reachable again after <1s (127.0.0.1",
    ]
    assert "node 2" in rig.handler.state_lines()[-1]


def test_at_debug_everything_passes(rig: Rig) -> None:
    rig.quieter.configure(probe=rig.probe, passthrough=True)
    rig.probe.answers = True
    rig.storm_second()
    rig.reconnect_burst()
    rig.advance(10)
    client = [r for r in rig.handler.records if r.name.startswith("aiokafka")]
    assert len(client) == rig.fed
    state = rig.handler.state_lines()
    assert "all their lines are logged (DEBUG)" in state[0]
    assert state[1].endswith(", 0 repeated client log lines suppressed")


def test_outside_an_outage_a_warning_kind_passes_once_a_minute(rig: Rig) -> None:
    for _ in range(10):
        rig.log(
            "mode.timers",
            logging.WARNING,
            "Timer %s is overlapping (interval=%r runtime=%r)",
            "finalize_tick",
            0.5,
            1.2,
        )
        rig.advance(5)
    # Assignments and other client INFO lines are news each time.
    for _ in range(3):
        rig.log(
            "faust.transport.consumer", logging.INFO, "Setting newly assigned partitions %r", {1}
        )
    rig.advance(10)  # the minute's summary
    rig.log(
        "mode.timers",
        logging.WARNING,
        "Timer %s is overlapping (interval=%r runtime=%r)",
        "t",
        0.5,
        1.0,
    )
    timers = [line for line in rig.handler.lines if line.startswith("WARNING mode.timers")]
    assert len(timers) == 2  # the first, then the first after a minute
    assigned = [line for line in rig.handler.lines if "Setting newly assigned" in line]
    assert len(assigned) == 3
    assert rig.handler.state_lines() == [
        "9 repeated client log lines suppressed in the last 1m00s: "
        'mode.timers "Timer finalize_tick is overlapping (interval=0.5 runtime=1.2)" x9'
    ]


def test_one_verdict_per_record_for_every_handler(rig: Rig) -> None:
    second = Captured()
    second.addFilter(rig.quieter)
    logger = logging.getLogger("aiokafka")
    logger.addHandler(second)
    try:
        rig.storm_second()
        rig.advance(60)
    finally:
        logger.removeHandler(second)
    assert [r.getMessage() for r in second.records] == [
        r.getMessage() for r in rig.handler.records if r.name.startswith("aiokafka")
    ]
    # Counted once, not once per handler.
    assert "195 repeated client log lines suppressed" in rig.handler.state_lines()[1]


@pytest.mark.parametrize(
    ("message", "peers"),
    [
        (f"Unable connect to node with id 1: {REFUSED}", {"node 1", "127.0.0.1:32092"}),
        ('Unable connect to "127.0.0.1:9092": [Errno 111] refused', {"127.0.0.1:9092"}),
        (
            "Unable to request metadata from node with id 3: "
            + repr(KafkaConnectionError("Connection at 10.0.0.7:9092 closed")),
            {"node 3", "10.0.0.7:9092"},
        ),
        ("Unable to update metadata from [1, 2]", set()),
    ],
)
def test_peers_named_by_client_errors(message: str, peers: set[str]) -> None:
    assert peers_of(message) == peers


def test_what_counts_as_a_connection_error() -> None:
    def record(level: int, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        exc_info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("aiokafka", level, __file__, 1, msg, (), exc_info)

    assert is_connection_error(record(logging.ERROR, f"Failed fetch messages from 1: {NOT_READY}"))
    assert is_connection_error(record(logging.ERROR, "error in consumer", KafkaConnectionError()))
    assert not is_connection_error(record(logging.INFO, f"Unable connect to node: {REFUSED}"))
    assert not is_connection_error(
        record(logging.WARNING, "Heartbeat failed for group g because it is rebalancing")
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "<1s"), (45.9, "45s"), (130, "2m10s"), (3600 + 180 + 5, "1h03m")],
)
def test_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_probe_asks_the_bootstrap_servers() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed = unused.getsockname()[1]  # bound, not listening: refuses
            assert bootstrap_probe(f"127.0.0.1:{closed}, 127.0.0.1:{port}", timeout_s=1)()
            assert not bootstrap_probe(f"127.0.0.1:{closed}", timeout_s=1)()


def test_the_worker_handlers_carry_the_quieter() -> None:
    config = logging_config(WorkerSettings(_env_file=None))  # type: ignore[call-arg]
    assert "kafka" in config["handlers"]["console"]["filters"]
    assert "kafka" in config["handlers"]["recent"]["filters"]


def test_back_when_a_summary_was_due_writes_only_the_return(rig: Rig) -> None:
    rig.probe.answers = True
    for _ in range(55):
        rig.storm_second()
        rig.advance(1)
    rig.advance(5)  # the errors stopped 5 s ago, and a minute is up: back, no summary
    assert [line.split(" (")[0] for line in rig.handler.state_lines()] == [
        "kafka unreachable: the Kafka clients report connection errors; each kind is logged "
        "once and its repeats are counted until they stop",
        "kafka reachable again after 54s",
    ]


def test_repeats_before_an_outage_are_summarised_as_it_starts(rig: Rig) -> None:
    for _ in range(2):
        rig.log("faust.transport.consumer", logging.WARNING, "wait_empty: Waiting for tasks %r", [])
        rig.advance(15)
    rig.storm_second()
    state = rig.handler.state_lines()
    assert state[0] == (
        "1 repeated client log line suppressed in the last 30s: "
        'faust.transport.consumer "wait_empty: Waiting for tasks []" x1'
    )
    assert state[1].startswith("kafka unreachable: ")

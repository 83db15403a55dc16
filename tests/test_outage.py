"""Riding out a broker outage (consumers/outage.py), without a broker: which errors are waited
out, what is logged and counted, and the worker's loop on a producer that fails for a while.
The real outage (a broker stopped for 35 s under a busy worker) is in tests/test_worker.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError

from consumers.kafka_transport import DeliveryError
from consumers.metrics import WorkerMetrics
from consumers.outage import OutageGuard, is_transient
from linrec_stream.contracts.events import encode_event
from state.changelog import ChangelogError, ChangelogTimeout
from state.store import StateStore
from tests.helpers import FakeProducer, tiny_serving
from tests.test_worker_loop import NUM_ITEMS, TOPIC, Message, run_worker


def test_transient_errors_are_told_apart():
    assert is_transient(KafkaTimeoutError("flush"))
    assert is_transient(KafkaConnectionError("connection refused"))
    assert is_transient(TimeoutError()) and is_transient(ConnectionRefusedError())
    assert is_transient(ChangelogTimeout("restore timed out")) and is_transient(DeliveryError("2 sends"))
    wrapped = ChangelogError("publishing failed")
    wrapped.__cause__ = KafkaTimeoutError("x")
    assert is_transient(wrapped)
    assert not is_transient(ChangelogError("cleanup.policy=delete; it must be compact"))
    assert not is_transient(ValueError("a bug")) and not is_transient(OSError(28, "No space left on device"))


def test_the_guard_repeats_a_transient_failure_logs_it_once_and_counts_it(caplog):
    metrics = WorkerMetrics()
    guard = OutageGuard(metrics, sleep=lambda s: None)
    failures = iter([KafkaTimeoutError("down"), KafkaTimeoutError("still down"), None])

    def step():
        exc = next(failures)
        if exc is not None:
            raise exc
        return "done"

    with caplog.at_level(logging.WARNING, logger="linrec.worker"):
        assert guard.run(step, "a commit") == "done"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "Kafka unreachable during a commit" in lines[0] and "reachable again" in lines[1]
    assert guard.outages == 1
    assert metrics.registry.get_sample_value("linrec_broker_outages_total") == 1
    assert metrics.registry.get_sample_value("linrec_broker_unreachable") == 0
    with pytest.raises(ValueError):  # not an outage: raised at once
        guard.run(lambda: (_ for _ in ()).throw(ValueError("a bug")), "a commit")


def test_the_guard_gives_up_when_the_worker_is_stopped():
    guard = OutageGuard(WorkerMetrics(), sleep=lambda s: guard.stop.set())
    with pytest.raises(KafkaTimeoutError):
        guard.run(lambda: (_ for _ in ()).throw(KafkaTimeoutError("down")), "a flush")


class FlakyProducer(FakeProducer):
    """Its flush times out ``failures`` times (the broker is down), then works."""

    def __init__(self, calls: list, failures: int) -> None:
        super().__init__(calls)
        self.failures = failures

    def flush(self) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaTimeoutError("Failed to flush buffered records within 30000 ms")
        super().flush()


def test_the_loop_waits_out_a_producer_that_fails_for_a_while(tmp_path: Path, monkeypatch):
    import consumers.worker as worker_module

    monkeypatch.setattr(worker_module, "OutageGuard",
                        lambda metrics, stop=None: OutageGuard(metrics, stop, first_backoff_s=0.01, max_backoff_s=0.02))
    log: dict[int, list[Message]] = {0: []}
    for k in range(12):
        key, value = encode_event(f"u{k % 4}", f"item-{k + 1}", 1e9 + k)
        log[0].append(Message(TOPIC, 0, k, 1_700_000_000_000, key, value))
    flaky = FlakyProducer([], failures=3)
    monkeypatch.setattr("tests.test_worker_loop.FakeProducer", lambda calls: flaky)
    run = run_worker(tmp_path / "state", log, {}, tiny_serving(0, NUM_ITEMS), batch_size=4)
    assert flaky.failures == 0 and run.worker.guard.outages >= 1
    with StateStore(tmp_path / "state") as store:
        assert {r.user: r.events for r in store.records()} == {f"u{k}": 3 for k in range(4)}
        assert store.partitions() == {0: 12}


def test_a_rejoin_during_an_outage_is_waited_out(tmp_path: Path, monkeypatch):
    # Found by the chaos soak: a worker without partitions rebuilt its consumer while the broker
    # was down, kafka-python could not bootstrap within 30 s, and the worker exited.
    import consumers.worker as worker_module
    import tests.test_worker_loop as loop_tests

    monkeypatch.setattr(worker_module, "OutageGuard",
                        lambda metrics, stop=None: OutageGuard(metrics, stop, first_backoff_s=0.01, max_backoff_s=0.02))

    class RejoinsDuringAnOutage(loop_tests.FakeConsumer):
        failures = 2

        def rejoin_if_stuck(self) -> None:
            if self.failures:
                self.failures -= 1
                raise KafkaTimeoutError("Unable to bootstrap from [('127.0.0.1', 9092)]")

    monkeypatch.setattr(loop_tests, "FakeConsumer", RejoinsDuringAnOutage)
    log: dict[int, list[Message]] = {0: []}
    for k in range(6):
        key, value = encode_event(f"u{k % 2}", f"item-{k + 1}", 1e9 + k)
        log[0].append(Message(TOPIC, 0, k, 1_700_000_000_000, key, value))
    run = run_worker(tmp_path / "state", log, {}, tiny_serving(0, NUM_ITEMS), batch_size=4)
    assert run.consumer.failures == 0 and run.worker.guard.outages >= 1
    with StateStore(tmp_path / "state") as store:
        assert {r.user: r.events for r in store.records()} == {"u0": 3, "u1": 3}

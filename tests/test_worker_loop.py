"""The worker's loop (consumers/worker.py) on an in-memory transport and a real rocksdict store,
without a broker: positioning assigned partitions from the store, micro-batches committed
through the checkpoint, dead letters, restart behind the last commit, and the sweep of
partitions whose states another model version built."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from consumers.batch import apply_batch
from consumers.metrics import WorkerMetrics
from consumers.serving import ServingModel
from consumers.worker import StreamWorker, WorkerOptions, WorkerParts
from linrec_stream.contracts.events import Recommendation, Rejected, encode_event
from linrec_stream.contracts.model_updates import Announcement
from linrec_stream.lifecycle.registry import ModelRegistry
from linrec_stream.settings import Settings
from state.store import StateStore
from tests.helpers import FakeChangelog, FakeProducer, tiny_serving, write_run

NUM_ITEMS = 30
TOPIC = "in"


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list = field(default_factory=list)


class FakeConsumer:
    """A group member holding every partition of ``log``: the first poll "rebalances" (assigns
    all, from the group's committed offsets); ``seek`` moves a partition."""

    def __init__(self, log: dict[int, list[Message]], group: dict[int, int], calls: list) -> None:
        self.log, self.group, self.calls = log, group, calls
        self.positions: dict[int, int] = {}
        self.pending: set[int] = set()
        self.seeks: list[tuple[int, int]] = []

    def poll(self, timeout_ms: int, max_records: int) -> list[Message]:
        if not self.positions:
            self.positions = {p: self.group.get(p, 0) for p in self.log}
            self.pending = set(self.log)
        out: list[Message] = []
        for p in sorted(self.positions):
            while len(out) < max_records and self.positions[p] < len(self.log[p]):
                out.append(self.log[p][self.positions[p]])
                self.positions[p] += 1
        if not out:
            time.sleep(min(timeout_ms, 10) / 1000)
        return out

    def assigned(self) -> set[int]:
        return set(self.positions)

    def take_assigned(self) -> set[int]:
        pending, self.pending = self.pending, set()
        return pending

    def committed(self, partition: int) -> int | None:
        return self.group.get(partition)

    def seek(self, partition: int, offset: int) -> None:
        self.seeks.append((partition, offset))
        self.positions[partition] = offset

    def commit(self, next_offsets) -> None:
        self.group.update(next_offsets)
        self.calls.append(("group", dict(next_offsets)))

    def partition_count(self) -> int:
        return len(self.log)

    def lag(self) -> dict[int, int]:
        return {p: len(self.log[p]) - pos for p, pos in self.positions.items()}

    def rejoin_if_stuck(self) -> None:
        pass

    def close(self) -> None:
        self.calls.append(("close", "consumer"))


def append(log: dict[int, list[Message]], partition: int, user: str, item: str) -> None:
    key, value = encode_event(user, item, 1e9 + len(log[partition]))
    log[partition].append(Message(TOPIC, partition, len(log[partition]), 1_700_000_000_000, key, value))


@dataclass
class Run:
    worker: StreamWorker
    consumer: FakeConsumer
    producer: FakeProducer
    changelog: FakeChangelog
    calls: list


class FakeFollower:
    """The model-updates topic: ``announcement`` arrives once every message has been consumed."""

    topic = "model-updates"

    def __init__(self, consumer: FakeConsumer, announcement: Announcement) -> None:
        self.consumer, self.announcement = consumer, announcement

    def poll(self) -> list[Announcement]:
        c = self.consumer
        if self.announcement is None or not c.positions or any(c.positions[p] < len(c.log[p]) for p in c.log):
            return []
        announced, self.announcement = self.announcement, None
        return [announced]

    def close(self) -> None:
        pass


def run_worker(state_dir: Path, log: dict, group: dict, model: ServingModel, batch_size: int = 4,
               registry: ModelRegistry | None = None, announce: Announcement | None = None,
               apply: Callable = apply_batch, repartition: bool = False, producer: FakeProducer | None = None) -> Run:
    """One worker run over ``log`` until idle. The logs here place users on partitions at will,
    so forwarding to the home partition is off unless a test asks for it (``repartition``)."""
    calls: list = []
    settings = Settings.load(env={}).replace(topic_interactions=TOPIC, metrics_port=0, summary_every_s=0.05,
                                             top_k=3, repartition=repartition)
    options = WorkerOptions(None, state_dir, batch_size=batch_size, batch_ms=5, apply=apply)
    consumer, changelog = FakeConsumer(log, group, calls), FakeChangelog(calls)
    producer = producer or FakeProducer(calls)
    producer.calls = calls
    parts = WorkerParts(consumer, producer, StateStore(state_dir, sync=False), changelog, model,
                        metrics=WorkerMetrics(), registry=registry,
                        follower=FakeFollower(consumer, announce) if announce else None)
    worker = StreamWorker(settings, options, parts)
    worker.run(idle_exit_s=0.3)
    return Run(worker, consumer, producer, changelog, calls)


class LoopingProducer(FakeProducer):
    """A producer whose sends to the interactions topic land in ``log`` (the worker's forwards)."""

    def __init__(self, log: dict[int, list[Message]]) -> None:
        super().__init__([])
        self.log = log

    def send(self, topic, value=None, key=None, headers=None, partition=None, timestamp_ms=None):
        super().send(topic, value, key, headers, partition, timestamp_ms)
        if topic == TOPIC:
            part = self.log[partition]
            part.append(Message(TOPIC, partition, len(part), timestamp_ms, key, value, list(headers or [])))


def test_events_on_a_foreign_partition_are_forwarded_home_and_applied_there_once(tmp_path: Path):
    from linrec_stream.contracts.topics import FORWARDED_FROM, home_partition

    # Producers with another partitioner put users on any partition: every event ends up
    # applied on its user's home partition, in one state, and a forward repeated (a crash
    # before the store commit) is skipped as a retry of the forwarded id.
    log: dict[int, list[Message]] = {0: [], 1: [], 2: []}
    users = [f"u{k}" for k in range(6)]
    for k in range(30):
        append(log, k % 3, users[k % 6], f"i{k % NUM_ITEMS + 1}")
    foreign = sum(1 for p, msgs in log.items() for m in msgs if home_partition(m.key, 3) != p)
    assert foreign > 5  # the test means something
    producer = LoopingProducer(log)
    first = run_worker(tmp_path / "state", log, {}, tiny_serving(0, NUM_ITEMS), repartition=True, producer=producer)
    assert first.worker.metrics.totals["forwarded"] == foreign
    forwarded = [m for msgs in log.values() for m in msgs if m.headers]
    assert len(forwarded) == foreign
    assert all(dict(m.headers)[FORWARDED_FROM].count(b"/") == 1 and m.timestamp == 1_700_000_000_000
               for m in forwarded)
    with StateStore(tmp_path / "state") as store:
        records = {r.user: r for r in store.records()}
    assert {u: r.events for u, r in records.items()} == {u: 5 for u in users}
    assert all(r.partition == home_partition(u.encode(), 3) for u, r in records.items())
    # The same forwarded copies again, as after a crash between the forward and the commit.
    for m in forwarded:
        part = log[m.partition]
        part.append(Message(TOPIC, m.partition, len(part), m.timestamp, m.key, m.value, m.headers))
    again = run_worker(tmp_path / "state", log, {}, tiny_serving(0, NUM_ITEMS), repartition=True,
                       producer=LoopingProducer(log))
    assert again.worker.metrics.totals["duplicates"] == foreign and again.worker.metrics.totals["events"] == 0
    with StateStore(tmp_path / "state") as store:
        assert {r.user: r.events for r in store.records()} == {u: 5 for u in users}


def test_a_forwarded_header_of_any_value_is_applied_where_it_lands(tmp_path: Path):
    from linrec_stream.contracts.topics import FORWARDED_FROM

    # Headers come from any producer: a null or odd forwarded-from value must not stop the
    # worker, nor make distinct events look like retries of one another.
    log: dict[int, list[Message]] = {0: [], 1: []}
    for k, value in enumerate([None, b"", b"\xff\xfe", None, b"", b"1/x"]):
        append(log, 0, "u0", f"i{k + 1}")
        log[0][-1].headers.append((FORWARDED_FROM, value))
    run = run_worker(tmp_path / "state", log, {}, tiny_serving(0, NUM_ITEMS), repartition=True,
                     producer=LoopingProducer(log))
    assert run.worker.metrics.totals["forwarded"] == 0 and run.worker.metrics.totals["events"] == 6
    with StateStore(tmp_path / "state") as store:
        assert store.get("u0").events == 6


def sent(run: Run, topic: str) -> list:
    """(key, value, headers) of each message sent to ``topic``: "recommendations" or "dead_letter"."""
    name = getattr(run.worker.settings, f"topic_{topic}")
    return [(key, value, headers) for t, key, value, headers in run.producer.sent if t == name]


def test_micro_batches_are_applied_committed_and_resumed_behind_the_last_commit(tmp_path: Path):
    log: dict[int, list[Message]] = {0: [], 1: []}
    for k in range(9):
        append(log, k % 2, f"u{k % 3}", f"i{k + 1}")
    log[1].append(Message(TOPIC, 1, len(log[1]), 1_700_000_000_000, b"u9", b"{not json"))
    group: dict[int, int] = {}
    model = tiny_serving(0, NUM_ITEMS)
    first = run_worker(tmp_path / "state", log, group, model)

    # Nothing stored, no group offset: restored from the changelog (empty), read from offset 0.
    assert ("restore", [0]) in first.calls and ("restore", [1]) in first.calls
    assert sorted(first.consumer.seeks) == [(0, 0), (1, 0)]
    with StateStore(tmp_path / "state") as store:
        assert store.partitions() == {0: 5, 1: 5} == group
        records = {r.user: r for r in store.records()}
    assert {u: r.events for u, r in records.items()} == {"u0": 3, "u1": 3, "u2": 3}
    assert {r.user for r in first.changelog.published} == set(records)
    dead = [Rejected.from_message(k, v, h) for k, v, h in sent(first, "dead_letter")]
    assert [(d.reason, d.source.partition, d.source.offset) for d in dead] == [("invalid_json", 1, 4)]
    recs = [Recommendation.from_bytes(v) for _, v, _ in sent(first, "recommendations")]
    assert {r.user for r in recs} == set(records) and all(len(r.items) == 3 for r in recs)
    totals = first.worker.metrics.totals
    assert (totals["events"], totals["dead_letters"], totals["duplicates"]) == (9, 1, 0)
    # Every micro-batch: changelog before the store's commit, the group's after it.
    kinds = [c[0] for c in first.calls if c[0] in ("changelog", "group")]
    assert kinds and kinds[0] == "changelog" and kinds[-1] == "group"

    # More events; the group's offsets lag behind the store (its last commit "failed"): the
    # worker resumes at the store's offsets and applies each new event once.
    group.clear()
    append(log, 0, "u0", "i20")
    append(log, 1, "u3", "i21")
    second = run_worker(tmp_path / "state", log, group, model)
    assert sorted(second.consumer.seeks) == [(0, 5), (1, 5)]
    assert not [c for c in second.calls if c[0] == "restore"]
    assert (second.worker.metrics.totals["events"], second.worker.metrics.totals["duplicates"]) == (2, 0)
    with StateStore(tmp_path / "state") as store:
        assert store.get("u0").events == 4 and store.get("u3").events == 1
        assert store.partitions() == {0: 6, 1: 6}


@pytest.mark.parametrize("batch_size", [1, 64])
def test_states_of_another_model_are_rebuilt_by_the_sweep_of_assigned_partitions(tmp_path: Path, batch_size: int):
    log: dict[int, list[Message]] = {0: [], 1: []}
    for k in range(12):
        append(log, k % 2, f"u{k % 5}", f"i{k + 1}")
    old, new = tiny_serving(0, NUM_ITEMS), tiny_serving(1, NUM_ITEMS)
    run_worker(tmp_path / "state", log, {}, old, batch_size)
    # The same store under another model, no new events: every state is rebuilt, each user
    # gets a recommendation by the new model, triggered by the swap.
    again = run_worker(tmp_path / "state", log, {}, new, batch_size)
    with StateStore(tmp_path / "state") as store:
        assert {r.model_version for r in store.records()} == {new.version}
    recs = [Recommendation.from_bytes(v) for _, v, _ in sent(again, "recommendations")]
    assert sorted(r.user for r in recs) == [f"u{k}" for k in range(5)]
    assert {(r.trigger, r.model_version, r.ingested_at) for r in recs} == {("model_swap", new.version, None)}
    assert again.worker.metrics.totals["events"] == 0
    assert not [c for c in again.calls if c[0] == "group"]  # a sweep consumes nothing


def test_an_announced_version_is_swapped_in_and_every_state_rebuilt(tmp_path: Path, caplog):
    a, b = tiny_serving(0, NUM_ITEMS), tiny_serving(1, NUM_ITEMS)
    registry = ModelRegistry(tmp_path / "models")
    for name, m in (("a", a), ("b", b)):
        registry.add(write_run(tmp_path / name, m.model, m.vocab.items))
    registry.promote(a.version)
    log: dict[int, list[Message]] = {0: [], 1: []}
    for k in range(10):
        append(log, k % 2, f"u{k % 4}", f"i{k + 1}")
    announce = Announcement("promote", b.version, a.version, time.time(), int(time.time() * 1000))
    with caplog.at_level(logging.INFO, logger="linrec.worker"):
        run = run_worker(tmp_path / "state", log, {}, a, registry=registry, announce=announce)
    assert run.worker.serving.version == b.version
    assert f"model swap to {b.version[:12]} complete: 4 states rebuilt" in caplog.text
    with StateStore(tmp_path / "state") as store:
        assert {r.model_version for r in store.records()} == {b.version}
        assert sum(r.events for r in store.records()) == 10
    # Per user: recommendations by a for events, then one by b for the swap.
    by_user: dict[str, list[tuple[str, str]]] = {}
    for _, value, _ in sent(run, "recommendations"):
        r = Recommendation.from_bytes(value)
        by_user.setdefault(r.user, []).append((r.trigger, r.model_version))
    assert all(seq[-1] == ("model_swap", b.version) and {v for _, v in seq[:-1]} == {a.version}
               for seq in by_user.values()) and len(by_user) == 4

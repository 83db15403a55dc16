"""The stream worker: interactions in, user states updated, recommendations out.

Two engines carry the same loop (``Settings.worker_engine``): kafka-python
(consumers/kafka_transport.py) and a faust-streaming app whose agent takes the interactions in
micro-batches (consumers/faust_transport.py). Neither uses faust's tables nor its transactions:
the exactly-once effect on state needs the applied input offsets stored atomically *with* the
states (one rocksdict write batch) and each partition sought to the offset the local store says,
which faust's tables (changelog written per key, offsets committed separately; ``exactly_once``
with open duplicate reports) do not give. See README "Stream worker".

This module is the loop; its parts are each in their own module:

* consumers/transport.py: what it needs of a Kafka client (kafka_transport.py: on kafka-python);
* consumers/batch.py: ``apply_batch``, the micro-batch as a pure function;
* consumers/checkpoint.py: the commit protocol, the one way any state change is committed;
* consumers/swap.py: the model served, hot swaps and the sweep that rebuilds stale states;
* consumers/metrics.py: the Prometheus series and the summary line, fed each batch's result;
* consumers/outage.py: the guard every Kafka step goes through, which waits out an outage.

Per micro-batch (what the consumer holds, up to ``batch_size`` events; it does not wait for more):

1. validate every message; malformed ones are routed to the dead-letter topic; an event found
   off its user's home partition (another producer's partitioner) is forwarded there
   (``_route``; README "Partitioning");
2. ``apply_batch``: per user, the new events (those after the user's stored offset, and not a
   retry of a recent ``event_id``) applied in one ``model.encode`` (or ``model.step``) call from
   the stored (or staged) state; each touched user's newest state scored. If it raises, the
   batch is applied in halves down to the one message that raises, which is dead-lettered
   (``internal``): no message stops the worker;
3. ``Checkpoint.add``: recommendations and dead letters sent at once, the new records staged;
   ``Checkpoint.maybe_commit``: the store commit (states and offsets, one synced write batch)
   every ``checkpoint_ms``, the changelog commit (dirty users' records, then group offsets)
   every ``changelog_ms``, both at once whenever the worker is caught up.

A crash re-applies, from the store's offsets, the events staged since its last commit
(recommendations and dead letters may repeat: they are at-least-once). Either way every event
affects its user's state exactly once: the store's offsets say where to resume, and an event at
or below a user's stored offset is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from consumers.batch import BatchResult, apply_batch
from consumers.checkpoint import Checkpoint, CheckpointPolicy
from consumers.metrics import WorkerMetrics
from consumers.outage import OutageGuard
from consumers.serving import ServingModel
from consumers.swap import ModelSwaps, registry_vocabs
from consumers.transport import GroupConsumer, InputRecord, Producer, UpdateSource, codec_arg
from linrec_stream.contracts.events import EventSchema, Interaction, Rejected, Source, parse_event
from linrec_stream.contracts.topics import FORWARDED_FROM, home_partition
from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.lifecycle.registry import ModelRegistry, RegistryError
from linrec_stream.settings import Settings
from state.changelog import Changelog
from state.store import StateStore

log = logging.getLogger("linrec.worker")

#: The event id given to a forwarded event that has none: where it was produced (``_route``).
FORWARDED_ID_PREFIX = "linrec-forwarded:"
_ORIGIN = re.compile(rb"[0-9]+/[0-9]+")  # FORWARDED_FROM's value, as Checkpoint.add writes it


@dataclass(frozen=True)
class WorkerOptions:
    # A fixed model directory; None: serve the registry's version in force and follow the
    # model-updates topic (hot swap).
    model_dir: Path | None
    state_dir: Path
    batch_size: int
    batch_ms: int
    device: str = "cpu"
    # The batch function: apply_batch (state updates), or another with its signature (the
    # benchmark's stateless re-encoding baseline, benchmarks/reencode.py).
    apply: Callable = apply_batch
    swap_batch: int = 512  # users rebuilt per step of the background sweep after a model swap
    # An unreadable state store: "move-aside" (keep it beside, start empty, restore from the
    # changelog) or "refuse" (stop with a one-line error).
    on_store_damage: str = "move-aside"


@dataclass
class WorkerParts:
    """Everything a worker works with. ``build_parts`` makes the real ones; tests pass fakes."""

    consumer: GroupConsumer
    producer: Producer
    store: StateStore
    changelog: Changelog
    serving: ServingModel
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    follower: UpdateSource | None = None  # registry mode: the model-updates topic
    registry: ModelRegistry | None = None

    def close(self) -> None:
        closers = [self.consumer.close, self.producer.close, self.changelog.close, self.store.close]
        if self.follower is not None:
            closers.append(self.follower.close)
        for closer in closers:
            try:
                closer()
            except Exception as exc:
                log.warning("worker: error while closing: %s", exc)


def build_parts(settings: Settings, options: WorkerOptions, stop: threading.Event | None = None) -> WorkerParts:
    """The parts of a real worker: kafka-python clients, the rocksdict store, the changelog, the
    model (``options.model_dir``, or the registry's version in force, followed for swaps)."""
    from consumers.kafka_transport import UpdateFollower

    if options.device == "cpu":
        # Micro-batch tensors are small: one thread avoids OpenMP hand-offs that cost more
        # than the arithmetic, and leaves the other cores to Kafka I/O and other workers.
        torch.set_num_threads(settings.worker_threads)
    metrics = WorkerMetrics()
    # Every client below is made by this one connection (cluster and security, README
    # "Connecting to a real cluster"); a refusal by the cluster is raised, not waited out.
    connection = KafkaConnection.from_settings(settings)
    log.info("worker: Kafka at %s", connection.describe())
    # A worker started while the broker is down waits for it (``stop`` ends the wait).
    connect = OutageGuard(metrics, stop).run
    with contextlib.ExitStack() as built:  # closes what was built if a later step fails
        registry = follower = None
        model_dir = options.model_dir
        if model_dir is None:
            registry = ModelRegistry(settings.path(settings.registry_dir))
            # Follow first, then read CURRENT: a promotion in between is seen, not missed.
            follower = connect(lambda: UpdateFollower(connection, settings.topic_model_updates),
                               "following the model updates")
            built.callback(follower.close)
            version = registry.current()
            if version is None:
                raise RegistryError(f"no model version is in force in {registry.root}: train one, then "
                                    "`linrec-stream models add RUN_DIR --promote`")
            model_dir = registry.path(version)
        serving = ServingModel.load(model_dir, options.device, state_dtype=settings.state_dtype,
                                    dedup_event_ids=settings.dedup_event_ids,
                                    vocab_of=registry_vocabs(registry) if registry is not None else None)
        store, damage = StateStore.open_or_recover(options.state_dir, on_damage=options.on_store_damage)
        built.callback(store.close)
        if damage:
            log.warning("worker: %s", damage)
        changelog = Changelog(connection, settings.topic_state_changelog,
                              compression_type=codec_arg(settings.changelog_compression_type))
        built.callback(changelog.close)
        connect(lambda: changelog.ensure_topic(settings.interactions_partitions), "checking the changelog topic")
        consumer, producer = connect(lambda: _transport(settings, connection, options), "joining the worker group")
        built.pop_all()
    return WorkerParts(consumer, producer, store, changelog, serving, metrics=metrics, follower=follower,
                       registry=registry)


def _transport(settings: Settings, connection: KafkaConnection,
               options: WorkerOptions) -> tuple[GroupConsumer, Producer]:
    """The group consumer and the producer of ``settings.worker_engine`` (the last parts built),
    their clients made by ``connection``."""
    if settings.worker_engine == "faust":
        from consumers.faust_transport import FaustEngine

        engine = FaustEngine(settings, connection, options.batch_size)
        return engine, engine  # one faust app consumes and produces
    from consumers.kafka_transport import KafkaGroupConsumer, KafkaSender

    producer = KafkaSender(settings, connection)
    try:
        return KafkaGroupConsumer(settings, connection, options.batch_size), producer
    except BaseException:
        producer.close()
        raise


class StreamWorker:
    """One worker process. ``run()`` blocks until ``stop`` is set (or it idles out).

    ``StreamWorker(settings, options)`` builds the real parts (``build_parts``); pass ``parts``
    to run it on others."""

    def __init__(self, settings: Settings, options: WorkerOptions, parts: WorkerParts | None = None,
                 stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.options = options
        self.parts = parts if parts is not None else build_parts(settings, options, stop)
        p = self.parts
        self.consumer, self.store, self.changelog, self.metrics = p.consumer, p.store, p.changelog, p.metrics
        self.metrics.observe_model(p.serving.version)
        self.schema = EventSchema.from_settings(settings)
        self.checkpoint = Checkpoint(p.producer, p.changelog, p.store, p.consumer,
                                     recommendations_topic=settings.topic_recommendations,
                                     dead_letter_topic=settings.topic_dead_letter,
                                     policy=CheckpointPolicy(settings.checkpoint_ms, settings.changelog_ms))
        self.swaps = ModelSwaps(p.serving, self.checkpoint, p.store, p.metrics, follower=p.follower,
                                registry=p.registry, device=options.device, swap_batch=options.swap_batch,
                                top_k=settings.top_k, topic=settings.topic_interactions)
        self._last_summary = time.monotonic()
        # Kafka steps are repeated through an outage; run() hands it the stop event.
        self.guard = OutageGuard(p.metrics)
        self._partition_count = 0  # of the interactions topic, for routing; 0: not known yet

    @property
    def serving(self) -> ServingModel:
        """The model served now (a swap replaces it between micro-batches)."""
        return self.swaps.serving

    # --- partitions ---------------------------------------------------------------------------
    def _position_pending(self) -> set[int]:
        """Position the partitions of the last rebalance; returns their numbers (records already
        fetched for them came from the group's position and must be dropped)."""
        pending = self.consumer.take_assigned()
        if pending:
            self._partition_count = 0  # a rebalance may follow a partition count change: ask again
            # What is staged goes to the store and the changelog first: a partition that comes
            # back stale is restored from the changelog, and no staged state may shadow that.
            self.guard.run(lambda: self.checkpoint.commit(self.consumer.assigned()), "the commit before positioning")
        for partition in sorted(pending):
            self.guard.run(lambda: self._position(partition), f"positioning partition {partition}")
        return pending

    def _position(self, partition: int) -> None:
        """Seek a new partition to where its state stands, restoring states if needed."""
        committed = self.consumer.committed(partition)
        local = self.store.next_offset(partition)
        if local is None or (committed is not None and local < committed):
            # No or stale local state for it (it was another worker's): rebuild from the changelog.
            restored = self.changelog.restore(self.store, [partition]).get(partition, 0)
            start = committed or 0
            log.info("partition %d: restored %d user states from %s, resuming at group offset %d",
                     partition, restored, self.settings.topic_state_changelog, start)
        else:
            start = local
            log.info("partition %d: resuming at offset %d from the local state store", partition, start)
        self.consumer.seek(partition, start)

    # --- the loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, idle_exit_s: float | None = None) -> None:
        stop = stop or threading.Event()
        self.guard.stop = stop
        m = self.serving.model
        log.info("worker: model %s (%s, %d items) on %s; state in %s; engine %s, group %s; batches of up to %d "
                 "events / %d ms", self.serving.version, m.config.attention, m.config.num_items, m.device,
                 self.options.state_dir, self.settings.worker_engine, self.settings.worker_group, self.options.batch_size, self.options.batch_ms)
        self.metrics.serve(self.settings.metrics_port)
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                t_poll = time.perf_counter()
                self.swaps.check_updates(self.consumer.assigned())
                records = self._take(0 if self.swaps.sweep else 200)
                if records:
                    self.metrics.observe_stage("poll", time.perf_counter() - t_poll)
                if records or not self.consumer.assigned():
                    # Idle means caught up on assigned partitions, not waiting for a rebalance.
                    idle_since = time.monotonic()
                if records:
                    self.process(records)
                if self.swaps.sweep:
                    self.swaps.sweep_step(self.consumer.assigned())
                    idle_since = time.monotonic()
                elif not records and idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    log.info("worker: idle for %.0fs, exiting", idle_exit_s)
                    break
                if not records:
                    # Caught up: commit everything now, so what is applied is durable everywhere
                    # (and the group's offsets show it) within one poll of the stream going quiet.
                    self._observe_commits(self.guard.run(
                        lambda: self.checkpoint.maybe_commit(self.consumer.assigned(), idle=True), "the idle commit"))
                    self.guard.run(self.consumer.rejoin_if_stuck, "rejoining the worker group")
                if time.monotonic() - self._last_summary >= self.settings.summary_every_s:
                    self._log_summary()
        finally:
            self.close()

    def _log_summary(self) -> None:
        try:
            lag = self.metrics.observe_lag(self.consumer.lag())
        except Exception:  # metrics must never take the worker down
            lag = 0
        log.info(self.metrics.summary(lag) + f"; model {self.serving.version[:12]}"
                 + (" (swap in progress)" if self.swaps.swapping else ""))
        self._last_summary = time.monotonic()

    def _take(self, wait_ms: int = 200) -> list[InputRecord]:
        """Up to batch_size records: waits ``wait_ms`` for the first one, then takes what is
        already there, never waiting for more (without a backlog a lone event is processed at
        once, so latency at low rates is not ``batch_ms``); ``batch_ms`` bounds the gathering."""
        out: list[InputRecord] = []
        deadline = None
        while len(out) < self.options.batch_size:
            timeout = wait_ms if deadline is None else 0
            polled = self.consumer.poll(timeout, self.options.batch_size - len(out))
            repositioned = self._position_pending()
            if repositioned:
                out = [r for r in out if r.partition not in repositioned]
                self.swaps.sweep_partitions(repositioned)
            out.extend(r for r in polled if r.partition not in repositioned)
            if out and deadline is None:
                deadline = time.monotonic() + self.options.batch_ms / 1000
            if deadline is None and not polled:
                return out  # idle: let the caller check stop / summary
            if not polled or (deadline is not None and time.monotonic() >= deadline):
                break  # no backlog (or gathered long enough): go with what there is
        # Stream order within each partition is what matters; keep it.
        out.sort(key=lambda r: (r.partition, r.offset))
        return out

    def process(self, records: list[InputRecord]) -> None:
        """One micro-batch: parse, route, apply on the stored states, commit (the checkpoint), observe."""
        t0 = time.perf_counter()
        events: list[Interaction] = []
        rejected: list[Rejected] = []
        forwards: list[tuple[InputRecord, int]] = []
        next_offsets: dict[int, int] = {}
        for r in records:
            src = Source(r.topic, r.partition, r.offset, r.timestamp)
            parsed = parse_event(r.key, r.value, src, self.schema)
            if isinstance(parsed, Interaction):
                routed = self._route(parsed, r)
                if isinstance(routed, int):
                    forwards.append((r, routed))
                else:
                    events.append(routed)
            else:
                rejected.append(parsed)
            next_offsets[r.partition] = max(next_offsets.get(r.partition, 0), r.offset + 1)
        t_parsed = time.perf_counter()
        stored = self.checkpoint.read(e.user for e in events)
        damaged = self.store.take_damaged()
        if damaged:
            stored = self._recover_damaged(damaged, events)
        t_read = time.perf_counter()
        result = self._apply_total(stored, events, records, rejected)

        # Repeating add() re-sends (at-least-once) and re-stages the same records: safe.
        sent = self.guard.run(lambda: self.checkpoint.add(result, rejected, next_offsets, forwards), "sending a batch")
        committed = self.guard.run(lambda: self.checkpoint.maybe_commit(self.consumer.assigned()), "a commit")
        stages = {"parse": t_parsed - t0, "state_read": t_read - t_parsed, **result.timings, **sent, **committed}
        self.metrics.observe_batch_result(result, rejected, stages, consumed=len(records), forwarded=len(forwards))
        if rejected:
            log.warning("worker: %d malformed event(s) to %s: %s", len(rejected), self.settings.topic_dead_letter,
                        ", ".join(sorted({r.reason for r in rejected})))

    def _route(self, ev: Interaction, r: InputRecord) -> Interaction | int:
        """Where ``ev`` is applied: here (the event itself) or, when it was produced to another
        partition than its user's home (``home_partition``: a producer with another partitioner),
        that home partition's number: the event is forwarded there and applied when it comes
        back, so each user has one state, on one partition, in one order.

        A forwarded copy is applied where it lands (never forwarded twice, even if the partition
        count changed meanwhile). One without ``event_id`` gets the id of where it was produced
        (``FORWARDED_ID_PREFIX``), so a copy forwarded again after a crash, before the store
        commit, is skipped as a retry of that id."""
        forwarded = [v for k, v in (r.headers or ()) if k == FORWARDED_FROM]
        if forwarded:
            origin = forwarded[0]
            # Any producer can set headers: a value that is not "<partition>/<offset>" names no
            # origin, and the event keeps no id rather than share one with other events.
            if ev.event_id is None and isinstance(origin, bytes) and _ORIGIN.fullmatch(origin):
                return dataclasses.replace(ev, event_id=f"{FORWARDED_ID_PREFIX}{origin.decode('ascii')}")
            return ev
        if not self.settings.repartition:
            return ev
        if not self._partition_count:
            self._partition_count = self.consumer.partition_count()
        if not self._partition_count:  # no metadata yet: apply it here rather than guess
            return ev
        home = home_partition(r.key, self._partition_count)
        return ev if home == r.partition else home

    def _recover_damaged(self, users: list[str], events: list[Interaction]) -> dict:
        """Stored records that failed their checksum: their users' partitions are restored from
        the changelog (a record there is the user's state at the last changelog commit; the
        user's events applied since are not in it), then the batch's records are read again."""
        damaged = set(users)
        partitions = sorted({e.source.partition for e in events if e.user in damaged})
        self.metrics.observe_damaged(len(users))
        log.warning("worker: %d stored record(s) failed their checksum (%s); restoring partition(s) %s from %s",
                    len(users), ", ".join(users[:5]) + (" ..." if len(users) > 5 else ""), partitions,
                    self.settings.topic_state_changelog)
        self.guard.run(lambda: self.changelog.restore(self.store, partitions), "restoring damaged records")
        return self.checkpoint.read(e.user for e in events)

    def _apply_total(self, stored: dict, events: list[Interaction], records: list[InputRecord],
                     rejected: list[Rejected]) -> BatchResult:
        """The batch function on ``events``; if it raises, the events are applied in halves, down
        to the one message that raises, which goes to ``rejected`` (reason ``internal``): no
        message can stop the worker, and every other event is applied, in order."""
        try:
            return self.options.apply(self.serving, stored, events, self.settings.top_k, self.settings.recent_window)
        except Exception as exc:
            if len(events) == 1:
                e = events[0]
                raw = next(r for r in records if (r.partition, r.offset) == (e.source.partition, e.source.offset))
                log.warning("worker: event at partition %d offset %d raised %s; to %s", e.source.partition,
                            e.source.offset, type(exc).__name__, self.settings.topic_dead_letter)
                rejected.append(Rejected.internal(exc, raw.key, raw.value, e.source))
                return BatchResult([], [])
            if not events:
                raise
        mid = len(events) // 2
        first = self._apply_total(stored, events[:mid], records, rejected)
        # The second half sees the first half's new records (a user's events may span both).
        second = self._apply_total({**stored, **{r.user: r for r in first.records}}, events[mid:], records, rejected)
        return first.merged(second)

    def _observe_commits(self, seconds: dict[str, float]) -> None:
        for stage, secs in seconds.items():
            self.metrics.observe_stage(stage, secs)

    def close(self) -> None:
        """Commit what is staged (a clean stop leaves nothing to re-apply), then close the parts."""
        try:
            self.checkpoint.commit(self.consumer.assigned())
        except Exception as exc:  # the store's offsets still say where to resume
            log.warning("worker: final commit failed (%s); the next start re-applies the staged events", exc)
        self.parts.close()

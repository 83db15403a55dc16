"""The stream worker: interactions in, user states updated, recommendations out.

Built on kafka-python rather than a faust agent, because the exactly-once effect on state needs
the applied input offsets stored atomically *with* the states (one rocksdict write batch), and
the worker must seek each partition to the offset its local store says, which faust's tables
(changelog written per key, offsets committed separately; ``exactly_once`` only with aiokafka
and with open duplicate reports) do not give. See README "Stream worker".

Per micro-batch (up to ``batch_size`` events or ``batch_ms`` after the first one):

1. validate every message; malformed ones are routed to the dead-letter topic;
2. ``apply_batch``: per user, in order, apply the new events on top of the stored state;
3. produce recommendations, dead letters and changelog records, and flush;
4. commit the new states and every partition's next offset to rocksdict in one write batch;
5. commit the consumer group's offsets (used only when another machine restores from the
   changelog).

A crash before 4 re-delivers the batch (recommendations and dead letters may repeat: they are
at-least-once); a crash after 4 resumes behind it. Either way every event affects its user's
state exactly once: the store's offsets say where to resume, and an event at or below a user's
stored offset is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from consumers.batch import BatchResult, ServingModel, apply_batch, rebuild_batch
from linrec_stream.contracts.events import Interaction, Limits, Rejected, Source, parse_event
from consumers.metrics import WorkerMetrics
from consumers.model_updates import UpdateFollower
from linrec_stream.lifecycle.registry import ModelRegistry, RegistryError
from linrec_stream.settings import Settings
from state.changelog import Changelog
from state.store import StateStore

log = logging.getLogger("linrec.worker")


@dataclass(frozen=True)
class WorkerOptions:
    # A fixed model directory; None: serve the registry's version in force and follow the
    # model-updates topic (hot swap).
    model_dir: Path | None
    state_dir: Path
    batch_size: int
    batch_ms: int
    device: str = "cpu"
    # The batch function: apply_batch (state updates); reencode_batch is the benchmark's baseline.
    apply: Callable = apply_batch
    swap_batch: int = 512  # users rebuilt per step of the background sweep after a model swap


@dataclass
class Sweep:
    """The background rebuild after a model swap (or of partitions just assigned): which
    partitions are still to visit and the users left in the current one."""

    version: str
    partitions: deque[int]
    users: deque[str] = field(default_factory=deque)
    rebuilt: int = 0
    started: float = field(default_factory=time.monotonic)
    announced_ms: int | None = None  # the swap's announcement (Kafka timestamp), None for a rebalance


class StreamWorker:
    """One worker process. ``run()`` blocks until ``stop`` is set (or it idles out)."""

    def __init__(self, settings: Settings, options: WorkerOptions) -> None:
        from kafka import KafkaProducer

        self.settings = settings
        self.options = options
        if options.device == "cpu":
            # Micro-batch tensors are small: one thread avoids OpenMP hand-offs that cost more
            # than the arithmetic, and leaves the other cores to Kafka I/O and other workers.
            torch.set_num_threads(settings.worker_threads)
        self.registry: ModelRegistry | None = None
        self.follower: UpdateFollower | None = None
        model_dir = options.model_dir
        if model_dir is None:
            self.registry = ModelRegistry(settings.path(settings.registry_dir))
            # Follow first, then read CURRENT: a promotion in between is seen, not missed.
            self.follower = UpdateFollower(settings.bootstrap_servers, settings.topic_model_updates)
            version = self.registry.current()
            if version is None:
                self.follower.close()
                raise RegistryError(f"no model version is in force in {self.registry.root}: train one, then "
                                    "`linrec-stream models add RUN_DIR --promote`")
            model_dir = self.registry.path(version)
        self.serving = ServingModel.load(model_dir, options.device)
        self.store = StateStore(options.state_dir)
        self.metrics = WorkerMetrics()
        self.metrics.model_info.labels(self.serving.version).set(1)
        self.sweep: Sweep | None = None
        self.limits = Limits(settings.max_event_bytes, settings.max_id_chars)
        self.changelog = Changelog(settings.bootstrap_servers, settings.topic_state_changelog)
        self.changelog.ensure_topic(settings.interactions_partitions)
        # Flushed after every micro-batch: lingering costs no latency and batches sends.
        self.producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=100,
                                      batch_size=1024 * 1024, max_in_flight_requests_per_connection=5)
        self.topic = settings.topic_interactions
        self.consumer = self._subscribe()
        # Partitions assigned by the last rebalance, not yet positioned. kafka-python runs the
        # rebalance callback on its IO thread, where blocking calls (committed offsets, changelog
        # restore) are not allowed, so the callback only records them and the loop does the work.
        self._pending: set = set()
        self._pending_lock = threading.Lock()
        self._last_summary = time.monotonic()

    def _subscribe(self):
        from kafka import KafkaConsumer

        s = self.settings
        consumer = KafkaConsumer(
            bootstrap_servers=s.bootstrap_servers, group_id=s.worker_group,
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=self.options.batch_size,
            client_id=f"linrec-worker-{id(self):x}", session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(1000, s.session_timeout_ms // 3),
        )
        consumer.subscribe([self.topic], listener=_Rebalance(self))
        self._subscribed_at = time.monotonic()
        return consumer

    def _rejoin_if_stuck(self) -> None:
        """Start over with a new consumer when the group join has not completed in time.

        Seen twice here with kafka-python 3.0: a consumer that never got an assignment while its
        IO thread spun; a fresh consumer joins at once. Nothing is lost: no partition was held,
        and a new assignment positions partitions from the store as usual."""
        limit = max(30.0, 3 * self.settings.session_timeout_ms / 1000)
        if self.consumer.assignment() or time.monotonic() - self._subscribed_at < limit:
            return
        log.warning("worker: no partitions assigned after %.0fs; rejoining the group with a new consumer", limit)
        try:
            self.consumer.close(autocommit=False)
        except Exception as exc:
            log.warning("worker: closing the stuck consumer failed: %s", exc)
        with self._pending_lock:
            self._pending = set()
        self.consumer = self._subscribe()

    # --- partitions ---------------------------------------------------------------------------
    def _position_pending(self) -> set[int]:
        """Position the partitions of the last rebalance; returns their numbers (records already
        fetched for them came from the group's position and must be dropped)."""
        with self._pending_lock:
            pending, self._pending = self._pending, set()
        assigned = self.consumer.assignment()
        pending = {tp for tp in pending if tp in assigned}
        if pending:
            self._position(pending)
        return {tp.partition for tp in pending}

    def _position(self, partitions) -> None:
        """Seek each new partition to where its state stands, restoring states if needed."""
        from kafka.structs import TopicPartition

        for tp in sorted(partitions):
            committed = self.consumer.committed(tp)
            local = self.store.next_offset(tp.partition)
            if local is None or (committed is not None and local < committed):
                # No or stale local state for it (it was another worker's): rebuild from the changelog.
                restored = self.changelog.restore(self.store, [tp.partition]).get(tp.partition, 0)
                start = committed or 0
                log.info("partition %d: restored %d user states from %s, resuming at group offset %d",
                         tp.partition, restored, self.settings.topic_state_changelog, start)
            else:
                start = local
                log.info("partition %d: resuming at offset %d from the local state store", tp.partition, start)
            self.consumer.seek(TopicPartition(tp.topic, tp.partition), start)

    # --- the loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, idle_exit_s: float | None = None) -> None:
        stop = stop or threading.Event()
        m = self.serving.model
        log.info("worker: model %s (%s, %d items) on %s; state in %s; group %s; batches of up to %d events / %d ms",
                 self.serving.version, m.config.attention, m.config.num_items, m.device, self.options.state_dir,
                 self.settings.worker_group, self.options.batch_size, self.options.batch_ms)
        self.metrics.serve(self.settings.metrics_port)
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                t_poll = time.perf_counter()
                self._check_updates()
                records = self._take(0 if self.sweep else 200)
                if records:
                    self.metrics.observe_stage("poll", time.perf_counter() - t_poll)
                if records or not self.consumer.assignment():
                    # Idle means caught up on assigned partitions, not waiting for a rebalance.
                    idle_since = time.monotonic()
                if records:
                    self.process(records)
                if self.sweep:
                    self._sweep_step()
                    idle_since = time.monotonic()
                elif not records and idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    log.info("worker: idle for %.0fs, exiting", idle_exit_s)
                    break
                if not records:
                    self._rejoin_if_stuck()
                if time.monotonic() - self._last_summary >= self.settings.summary_every_s:
                    log.info(self.metrics.summary(self._lag()) + f"; model {self.serving.version[:12]}"
                             + (" (swap in progress)" if self.sweep and self.sweep.announced_ms else ""))
                    self._last_summary = time.monotonic()
        finally:
            self.close()

    def _take(self, wait_ms: int = 200) -> list:
        """Up to batch_size records, waiting at most batch_ms after the first one arrives (and
        ``wait_ms`` for the first one)."""
        out: list = []
        deadline = None
        while len(out) < self.options.batch_size:
            timeout = wait_ms if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            polled = self.consumer.poll(timeout_ms=timeout, max_records=self.options.batch_size - len(out))
            repositioned = self._position_pending()
            if repositioned:
                out = [r for r in out if r.partition not in repositioned]
                self._sweep_partitions(repositioned)
            for tp, records in polled.items():
                if tp.partition not in repositioned:
                    out.extend(records)
            if out and deadline is None:
                deadline = time.monotonic() + self.options.batch_ms / 1000
            if deadline is None and not polled:
                return out  # idle: let the caller check stop / summary
            if deadline is not None and time.monotonic() >= deadline:
                break
        # Stream order within each partition is what matters; keep it.
        out.sort(key=lambda r: (r.partition, r.offset))
        return out

    def process(self, records: list) -> None:
        t0 = time.perf_counter()
        events: list[Interaction] = []
        rejected: list[Rejected] = []
        next_offsets: dict[int, int] = {}
        for r in records:
            src = Source(r.topic, r.partition, r.offset, r.timestamp)
            parsed = parse_event(r.key, r.value, src, self.limits)
            (events if isinstance(parsed, Interaction) else rejected).append(parsed)
            next_offsets[r.partition] = max(next_offsets.get(r.partition, 0), r.offset + 1)
        t_parsed = time.perf_counter()
        stored = self.store.get_many({e.user for e in events})
        t_read = time.perf_counter()
        result = self.options.apply(self.serving, stored, events, self.settings.top_k, self.settings.recent_window)
        t1 = time.perf_counter()

        self._publish(result, rejected)
        t2 = time.perf_counter()
        self.store.commit(result.records, next_offsets)
        t3 = time.perf_counter()
        self._commit_group(next_offsets)

        m = self.metrics
        m.observe_batch(len(records))
        stages = {"parse": t_parsed - t0, "state_read": t_read - t_parsed, **result.timings,
                  "produce": t2 - t1, "state_write": t3 - t2}
        for stage, secs in stages.items():
            m.observe_stage(stage, secs)
        now_ms = time.time() * 1000
        for rec in result.recommendations:
            m.observe_latency(max(0.0, (now_ms - rec.source.kafka_ts_ms) / 1000))
        m.events.labels("applied").inc(result.applied)
        m.events.labels("duplicate").inc(result.duplicates)
        m.events.labels("unknown_item").inc(result.unknown_items)
        m.recommendations.inc(len(result.recommendations))
        m.rebuilt.inc(result.rebuilt)
        for rej in rejected:
            m.dead_letters.labels(rej.reason).inc()
        m.totals["events"] += result.applied
        m.totals["duplicates"] += result.duplicates
        m.totals["unknown_items"] += result.unknown_items
        m.totals["recommendations"] += len(result.recommendations)
        m.totals["dead_letters"] += len(rejected)
        if rejected:
            log.warning("worker: %d malformed event(s) to %s: %s", len(rejected), self.settings.topic_dead_letter,
                        ", ".join(sorted({r.reason for r in rejected})))

    # --- model swap -----------------------------------------------------------------------------
    def _check_updates(self) -> None:
        """Swap to the newest announced version, if it is not the one served."""
        if self.follower is None:
            return
        try:
            announced = self.follower.poll()
        except Exception as exc:  # the stream goes on with the current model
            log.warning("worker: reading %s failed: %s", self.settings.topic_model_updates, exc)
            return
        if announced and announced[-1].version != self.serving.version:
            self.swap(announced[-1].version, announced[-1].announced_ms)

    def swap(self, version: str, announced_ms: int | None = None) -> None:
        """Serve ``version`` from the next batch on and rebuild every stale state in the background.

        Between batches, so no event is applied half under one model. A user whose state is
        still stale when their next event arrives is rebuilt then (apply_batch), so no state is
        ever scored by a model other than the one that built it."""
        assert self.registry is not None
        t0 = time.monotonic()
        try:
            new = ServingModel.load(self.registry.path(version), self.options.device)
        except (OSError, ValueError) as exc:
            log.error("worker: cannot load announced model %s (%s); still serving %s", version[:12], exc,
                      self.serving.version[:12])
            return
        old, self.serving = self.serving, new
        m = self.metrics
        m.model_info.labels(old.version).set(0)
        m.model_info.labels(new.version).set(1)
        m.swaps.inc()
        parts = sorted(tp.partition for tp in self.consumer.assignment())
        log.info("worker: model swap %s -> %s (%s, %d items), loaded in %.0f ms; rebuilding the states of "
                 "partitions %s", old.version[:12], new.version[:12], new.model.config.attention,
                 new.model.config.num_items, (time.monotonic() - t0) * 1000, parts)
        self.sweep = Sweep(new.version, deque(parts), announced_ms=announced_ms)

    def _sweep_partitions(self, partitions: set[int]) -> None:
        """Queue newly assigned partitions: their stored states may predate the model in force."""
        if self.sweep is None:
            self.sweep = Sweep(self.serving.version, deque())
        for p in sorted(partitions):
            if p not in self.sweep.partitions:
                self.sweep.partitions.append(p)

    def _sweep_step(self) -> None:
        """Rebuild up to swap_batch stale states of assigned partitions (one write batch)."""
        sw = self.sweep
        assert sw is not None
        assigned = {tp.partition for tp in self.consumer.assignment()}
        chunk: list[str] = []
        while len(chunk) < self.options.swap_batch and (sw.users or sw.partitions):
            if not sw.users:
                p = sw.partitions.popleft()
                if p in assigned:
                    sw.users.extend(self.store.users(p))
                continue
            chunk.append(sw.users.popleft())
        stored = self.store.get_many(chunk)
        todo = [r for r in stored.values() if r.partition in assigned and r.model_version != self.serving.version]
        if todo:
            result = rebuild_batch(self.serving, todo, self.settings.top_k, self.topic)
            self._publish(result, [])
            self.store.commit(result.records, {})
            sw.rebuilt += result.rebuilt
            self.metrics.rebuilt.inc(result.rebuilt)
            self.metrics.recommendations.inc(len(result.recommendations))
            self.metrics.totals["recommendations"] += len(result.recommendations)
        if sw.users or sw.partitions:
            return
        self.sweep = None
        took = time.monotonic() - sw.started
        if sw.announced_ms is not None:
            since = time.time() - sw.announced_ms / 1000
            self.metrics.swap_seconds.set(since)
            log.info("worker: model swap to %s complete: %d states rebuilt in %.2fs (%.2fs after the announcement)",
                     sw.version[:12], sw.rebuilt, took, since)
        elif sw.rebuilt:
            log.info("worker: %d stored states of newly assigned partitions rebuilt under %s in %.2fs",
                     sw.rebuilt, sw.version[:12], took)

    def _publish(self, result: BatchResult, rejected: list[Rejected]) -> None:
        """Send dead letters, recommendations and changelog records, and wait for the broker."""
        for rej in rejected:
            self.producer.send(self.settings.topic_dead_letter, key=rej.key, value=rej.value, headers=rej.headers())
        for rec in result.recommendations:
            self.producer.send(self.settings.topic_recommendations, key=rec.user.encode(), value=rec.to_bytes())
        self.changelog.publish(result.records)  # flushes the changelog's own producer
        self.producer.flush()

    def _commit_group(self, next_offsets: dict[int, int]) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        try:
            self.consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                                  for p, o in next_offsets.items()})
        except Exception as exc:  # a rebalance in progress: the store already holds the truth
            log.warning("worker: group offset commit failed (%s); the local store keeps the position", exc)

    def _lag(self) -> int:
        total = 0
        try:
            assigned = self.consumer.assignment()
            ends = self.consumer.end_offsets(list(assigned)) if assigned else {}
            for tp in assigned:
                lag = max(0, ends.get(tp, 0) - self.consumer.position(tp))
                self.metrics.lag.labels(str(tp.partition)).set(lag)
                total += lag
        except Exception:  # metrics must never take the worker down
            pass
        return total

    def close(self) -> None:
        closers = [self.consumer.close, self.producer.close, self.changelog.close, self.store.close]
        if self.follower is not None:
            closers.append(self.follower.close)
        for closer in closers:
            try:
                closer()
            except Exception as exc:
                log.warning("worker: error while closing: %s", exc)


def _listener_base():
    from kafka import ConsumerRebalanceListener

    return ConsumerRebalanceListener


class _Rebalance(_listener_base()):
    """kafka-python's rebalance callbacks, forwarded to the worker."""

    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned) -> None:
        if assigned:
            log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))
            with self.worker._pending_lock:
                self.worker._pending |= set(assigned)

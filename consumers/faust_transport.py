"""The stream worker's transport on faust-streaming: a faust App whose agent consumes the
interactions topic in micro-batches (``Stream.take_events``), and faust's producer (aiokafka).

The worker's loop, batch function, checkpoint and store are the same as on kafka-python
(consumers/worker.py): this module implements the interfaces of consumers/transport.py on faust,
so both engines share one commit protocol and one durability contract. What faust brings is its
client: aiokafka's C record decoder and its asyncio producer (README "Stream worker": measured
side by side in benchmarks/bench_stream.py).

How faust is held to that protocol:

* The app runs in its own thread and event loop (``_FaustThread``); the worker's loop calls into
  it with ``asyncio.run_coroutine_threadsafe``. The agent only hands each taken batch to the
  worker (a bounded hand-off, so a slow worker slows the fetcher instead of filling memory).
* The interactions topic is declared with ``acks=False``: faust tracks no acknowledgements for it
  and so never commits its offsets on its own (its commit timer, a rebalance or a stop commit
  only acked offsets). The checkpoint commits the group's offsets explicitly, after each
  changelog flush, as on kafka-python.
* On an assignment faust seeks each partition to the group's committed offset. Its records are
  held back here until the worker has positioned it from its store (``seek``: the offset to
  resume at, never behind the committed one), then those below that offset are dropped (they are
  in the store). So the worker's loop never drops a record it would not get again: the per-user
  rule (an event at or below a user's stored offset is skipped) relies on each partition arriving
  in offset order.
* No faust tables, no faust transactions (``exactly_once`` has open duplicate reports upstream):
  the rocksdict store's offsets give the exactly-once effect on state, the same way for both
  engines.

faust-streaming 0.15 has no public call to commit given offsets (its ``commit`` commits acked
ones) nor to read a partition's committed offset: ``commit`` uses its consumer's ``_commit`` and
``committed`` goes through its consumer thread (``call_thread``) to aiokafka's ``committed``, the
two private entry points used here (checked against faust-streaming 0.15.3).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Coroutine

from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.clients.refusal import KafkaRefusal, refusal, refusals_seen
from linrec_stream.settings import Settings

log = logging.getLogger("linrec.worker")

_START_TIMEOUT_S = 60.0  # joining the group included
_CALL_TIMEOUT_S = 60.0  # one call into the app's loop (a commit, a seek, a flush)


@dataclass(frozen=True, slots=True)
class FaustRecord:
    """One consumed interactions message, as consumers.transport.InputRecord wants it."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # ms (faust gives seconds)
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


class HandOff:
    """Records from the agent (faust's loop) to the worker (its own thread), per partition.

    A partition's records are held back from an assignment until the worker positions it
    (``position``), then those below the position are dropped (they are in the store): the
    worker's loop never drops a record it would not get again, and each partition arrives in
    offset order, which the per-user rule (an event at or below a user's stored offset is skipped)
    relies on. ``capacity`` records at most are queued (``room``: the agent waits for it)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queues: dict[int, collections.deque[FaustRecord]] = collections.defaultdict(collections.deque)
        self._queued = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._pending: set[int] = set()  # assigned, not yet taken by the worker to position
        self._floor: dict[int, int] = {}  # positioned partitions -> the offset the worker resumes at

    def assigned(self, partitions: set[int]) -> None:
        """A new assignment (all of it): each partition waits to be positioned again; the records
        of the others are another member's now."""
        with self._lock:
            self._pending |= partitions
            self._floor = {}
            for p in [p for p in self._queues if p not in partitions]:
                self._queued -= len(self._queues.pop(p))

    def take_pending(self) -> set[int]:
        with self._lock:
            pending, self._pending = self._pending, set()
        return pending

    def position(self, partition: int, offset: int) -> None:
        with self._lock:
            self._floor[partition] = offset

    def room(self) -> bool:
        return self._queued < self.capacity

    def put(self, records: Sequence[FaustRecord]) -> None:
        with self._arrived:
            for r in records:
                queue = self._queues[r.partition]
                # faust seeks every partition of a new assignment to the group's committed offset,
                # which is never ahead of a record not yet applied: a record at or below the last
                # one queued means the partition starts over, and the queued ones come again, in order.
                while queue and queue[-1].offset >= r.offset:
                    queue.pop()
                    self._queued -= 1
                queue.append(r)
                self._queued += 1
            self._arrived.notify_all()

    def take(self, timeout_s: float, max_records: int) -> list[FaustRecord]:
        """Up to ``max_records`` records of positioned partitions, waiting at most ``timeout_s``
        for the first."""
        with self._arrived:
            if timeout_s > 0 and not any(self._queues[p] for p in self._floor):
                self._arrived.wait(timeout_s)
            out: list[FaustRecord] = []
            for partition, floor in self._floor.items():
                queue = self._queues[partition]
                while queue and len(out) < max_records:
                    r = queue.popleft()
                    self._queued -= 1
                    if r.offset >= floor:  # older ones are in the store already
                        out.append(r)
        return out


class FaustEngine:
    """A faust App in a thread: the worker's ``GroupConsumer`` and ``Producer`` at once.

    ``max_poll_records``: the agent's batches; the hand-off to the worker holds four of them.
    ``connection``: the cluster and its security, which the app's clients (aiokafka) use."""

    def __init__(self, settings: Settings, connection: KafkaConnection, max_poll_records: int) -> None:
        if settings.isolation_level == "read_committed":
            # faust-streaming 0.15 gives aiokafka read_committed only with its own exactly_once
            # guarantee (transactions, which this engine does not use: module docstring).
            log.warning("worker: the faust engine reads uncommitted data: events of aborted transactions are "
                        "applied (isolation_level=read_committed holds on the kafka-python engine only)")
        self.settings = settings
        self.connection = connection
        self.topic = settings.topic_interactions
        self.max_poll_records = max_poll_records
        self.handoff = HandOff(4 * max_poll_records)
        # Sends not yet handed to faust's producer, and the delivery futures of those handed over
        # since the last flush (the app's loop only).
        self._outbox: list[tuple[str, bytes | None, bytes | None, list | None]] = []
        self._outbox_lock = threading.Lock()
        self._draining = False
        self._drain_task: asyncio.Future | None = None
        self._deliveries: list[asyncio.Future] = []
        self._closed = False
        self._thread = _FaustThread(self)
        self._thread.start_app()

    # --- GroupConsumer ---------------------------------------------------------------------------
    def poll(self, timeout_ms: int, max_records: int) -> list[FaustRecord]:
        out = self.handoff.take(timeout_ms / 1000, max_records)
        self._thread.raise_if_crashed()
        return out

    def assigned(self) -> set[int]:
        return {tp.partition for tp in self._thread.app.consumer.assignment() if tp.topic == self.topic}

    def take_assigned(self) -> set[int]:
        return self.handoff.take_pending() & self.assigned()

    def committed(self, partition: int) -> int | None:
        thread = self._thread.app.consumer._thread  # see the module docstring
        tp = self._tp(partition)
        offset = self._thread.call(thread.call_thread(thread._ensure_consumer().committed, tp))
        return offset if offset is not None and offset >= 0 else None

    def seek(self, partition: int, offset: int) -> None:
        """Resume ``partition`` at ``offset``: its records below it are dropped.

        No seek reaches the broker: on the assignment faust positioned the partition at the group's
        committed offset, and the worker resumes at that offset or at its store's, which is never
        behind it (consumers.worker.StreamWorker._position); the records in between are in the
        store already."""
        self.handoff.position(partition, offset)

    def commit(self, next_offsets: Mapping[int, int]) -> None:
        offsets = {self._tp(p): o for p, o in next_offsets.items()}
        if offsets and not self._thread.call(self._thread.app.consumer._commit(offsets)):
            raise RuntimeError(f"faust: commit of {dict(next_offsets)} failed (partitions revoked meanwhile?)")

    def partition_count(self) -> int:
        return self._thread.app.consumer.topic_partitions(self.topic) or 0

    def lag(self) -> dict[int, int]:
        consumer = self._thread.app.consumer
        tps = [self._tp(p) for p in sorted(self.assigned())]
        if not tps:
            return {}

        async def lags() -> dict[int, int]:
            ends = await consumer.highwaters(*tps)
            return {tp.partition: max(0, ends.get(tp, 0) - (await consumer.position(tp) or 0)) for tp in tps}

        return self._thread.call(lags())

    def rejoin_if_stuck(self) -> None:
        """faust's consumer (aiokafka) rejoins by itself."""

    # --- Producer --------------------------------------------------------------------------------
    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None, partition: int | None = None,
             timestamp_ms: int | None = None) -> None:
        """Queue a send (not awaited: ``flush`` waits for every delivery). Sends leave in call
        order: one drain task on the app's loop hands them to the producer one after another."""
        with self._outbox_lock:
            self._outbox.append((topic, key, value, partition, None if timestamp_ms is None else timestamp_ms / 1000,
                                 list(headers) if headers else None))
            if self._draining:
                return
            self._draining = True
        self._thread.soon(self._start_drain)

    def _start_drain(self) -> None:  # on the app's loop
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        producer = self._thread.app.producer
        try:
            while True:
                with self._outbox_lock:
                    if not self._outbox:
                        self._draining = False
                        return
                    batch = list(self._outbox)
                    self._outbox.clear()
                for topic, key, value, partition, timestamp_s, headers in batch:
                    self._deliveries.append(await producer.send(topic, key, value, partition, timestamp_s, headers))
        except BaseException:
            with self._outbox_lock:
                self._draining = False
            raise  # flush raises it

    def flush(self) -> None:
        """Return once every send so far is acknowledged; raise the first failure."""

        async def flush() -> None:
            while True:
                task = self._drain_task
                if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
                    self._drain_task = None
                    raise task.exception()
                with self._outbox_lock:
                    idle = not self._draining
                if idle:
                    break
                await (task if task is not None and not task.done() else asyncio.sleep(0.001))
            await self._thread.app.producer.flush()
            deliveries, self._deliveries = self._deliveries, []
            await asyncio.gather(*deliveries)  # raises the first failed delivery

        self._thread.call(flush())

    # --- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the app (idempotent: the worker closes its consumer and its producer, both this)."""
        if not self._closed:
            self._closed = True
            self._thread.stop_app()

    # --- called by the app ----------------------------------------------------------------------
    def _tp(self, partition: int) -> Any:
        from faust.types import TP

        return TP(self.topic, partition)

    def _on_assigned(self, assigned: set) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == self.topic}
        if mine:
            log.info("partitions assigned: %s", sorted(mine))
        self.handoff.assigned(mine)


class _FaustThread:
    """The faust App and its event loop, on a thread of their own.

    The app is built inside the thread: faust binds its services to the loop current when they are
    made, and a loop that stops before ``app.stop()`` finishes leaves the stop hanging; so the
    thread's one coroutine starts the app, waits for a stop request, then stops it."""

    def __init__(self, engine: FaustEngine) -> None:
        self.engine = engine
        self.app: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop_requested: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="faust-app", daemon=True)

    def start_app(self) -> None:
        connection = self.engine.connection
        # aiokafka logs why a bootstrap failed and raises only "Unable to bootstrap": listen.
        with refusals_seen(connection) as seen:
            self._thread.start()
            ready = self._ready.wait(_START_TIMEOUT_S)
        try:
            if not ready:
                raise RuntimeError(f"faust app did not start within {_START_TIMEOUT_S:.0f}s "
                                   f"(broker {connection.describe()})")
            self.raise_if_crashed()
        except Exception as exc:
            seen.raise_if_refused(exc)
            raise

    def raise_if_crashed(self) -> None:
        if self._error is not None:
            line = refusal(self._error, self.engine.connection)
            if line is not None:  # a configuration error, not a crash: one line, never waited out
                raise KafkaRefusal(line) from self._error
            raise RuntimeError(f"faust app stopped: {type(self._error).__name__}: {self._error}") from self._error
        if self.app is not None and self.app.should_stop and not self.engine._closed:
            raise RuntimeError("faust app stopped on its own (see its log above)")

    def call(self, coro: Coroutine) -> Any:
        """Run ``coro`` on the app's loop and return its result (raising what it raised)."""
        self.raise_if_crashed()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(_CALL_TIMEOUT_S)

    def soon(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop_app(self) -> None:
        if self.loop is not None and self._stop_requested is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join(_CALL_TIMEOUT_S)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the worker's thread at its next call
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self.app = _build_app(self.engine)
        self._stop_requested = asyncio.Event()
        self.app.finalize()
        await self.app.start()
        # Ready once the group is joined and the first assignment is handled (or nothing came).
        for _ in range(int(_START_TIMEOUT_S * 10)):
            if self.app.consumer.assignment() or self.app.should_stop:
                break
            await asyncio.sleep(0.1)
        self._ready.set()
        await self._stop_requested.wait()
        await self.app.stop()


def _header_pairs(headers: Any) -> list[tuple[str, bytes]]:
    """A faust message's headers (a list of pairs or a mapping) as (name, value) pairs."""
    if not headers:
        return []
    return list(headers.items()) if hasattr(headers, "items") else list(headers)


def _build_app(engine: FaustEngine) -> Any:
    from consumers.transport import codec_arg

    s = engine.settings
    app = engine.connection.faust_app(
        s.worker_group,  # the app id is the consumer group; broker and credentials from the connection
        store="memory://",  # no faust tables: the rocksdict store holds the states
        web_enabled=False,  # the worker serves its own Prometheus metrics
        topic_allow_declare=False, topic_disable_leader=True,  # topics come from `topics create`
        stream_wait_empty=False,  # nothing is acked on the interactions topic (module docstring)
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=s.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(1.0, s.session_timeout_ms / 3000),
        producer_linger_ms=5,  # as on kafka-python: nobody waits for one batch's sends
        producer_compression_type=codec_arg(s.compression_type),
        loop=asyncio.get_event_loop(),
    )
    topic = app.topic(s.topic_interactions, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", acks=False)
    within_s = 0.005  # take what is there: without a backlog a lone event goes at once

    @app.agent(topic)
    async def interactions(stream):  # noqa: ANN001 (faust's stream)
        async for events in stream.take_events(engine.max_poll_records, within=within_s):
            batch = [FaustRecord(m.topic, m.partition, m.offset, int(m.timestamp * 1000), m.key, m.value,
                                 _header_pairs(m.headers)) for m in (e.message for e in events)]
            while not engine.handoff.room():  # the worker is behind: hold the fetcher back
                await asyncio.sleep(0.002)
            engine.handoff.put(batch)

    @app.on_partitions_assigned.connect
    async def on_assigned(app_, assigned, **kwargs) -> None:  # noqa: ANN001 (faust's signal)
        engine._on_assigned(set(assigned))

    return app

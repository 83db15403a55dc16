"""Which model a worker serves, and the hot swap to another one.

``ModelSwaps`` holds the served model. In registry mode it follows the model-updates topic;
between two micro-batches it loads an announced version and serves it from the next batch on,
so no event is applied half under one model. Then a background sweep rebuilds every stored
state of the worker's partitions that another version built, ``swap_batch`` users per step
between micro-batches. Each step is committed through the checkpoint (states and changelog
records, no offsets: a sweep consumes nothing), and each rebuilt user with a known item in their
window gets a fresh recommendation (``trigger="model_swap"``). A user whose state is still stale
when their next event arrives is rebuilt then (``apply_batch``), so no state is ever scored by a
model other than the one that built it. Partitions just assigned are swept too: their stored
states may predate the model in force.

A swap keeps the served model's storage dtype (``state_dtype``) and, in registry mode, gives the
new model a way to read window ids of any registered version's vocabulary (``registry_vocabs``):
after a retraining from scratch the ids are mapped through the old vocabulary, not dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from consumers.batch import rebuild_batch
from consumers.checkpoint import Checkpoint
from consumers.metrics import WorkerMetrics
from consumers.serving import ServingModel, VocabLookup
from consumers.transport import UpdateSource
from linrec_stream.lifecycle.registry import ModelRegistry
from linrec_stream.model.run_dir import RunDirError, Vocab
from state.store import StateStore

log = logging.getLogger("linrec.worker")


def registry_vocabs(registry: ModelRegistry) -> VocabLookup:
    """Version id -> its vocabulary, read from the registry's run directory (None when the
    version or its vocab.json is missing or unreadable). Each ServingModel keeps what it
    derives from a vocabulary, so each version is read at most once per served model."""

    def lookup(version: str) -> Vocab | None:
        try:
            return Vocab.load(registry.path(version))
        except (OSError, RunDirError) as exc:
            log.warning("worker: vocabulary of model %s unavailable (%s): its windows are dropped", version[:12], exc)
            return None

    return lookup


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


class ModelSwaps:
    """The served model (``serving``), the swaps to announced versions and the sweep after them.

    ``follower`` and ``registry`` are None for a worker serving a fixed model directory: it
    never swaps, but still sweeps partitions it is assigned."""

    def __init__(self, serving: ServingModel, checkpoint: Checkpoint, store: StateStore, metrics: WorkerMetrics,
                 *, top_k: int, topic: str, follower: UpdateSource | None = None,
                 registry: ModelRegistry | None = None, device: str = "cpu", swap_batch: int = 512) -> None:
        self.serving = serving
        self.checkpoint = checkpoint
        self.store = store
        self.metrics = metrics
        self.follower = follower
        self.registry = registry
        self.device = device
        self.swap_batch = swap_batch
        self.top_k = top_k
        self.topic = topic  # the interactions topic: the source named by a swap's recommendations
        self.sweep: Sweep | None = None

    @property
    def swapping(self) -> bool:
        """A swap to an announced version is still rebuilding states."""
        return self.sweep is not None and self.sweep.announced_ms is not None

    def check_updates(self, assigned: set[int]) -> None:
        """Swap to the newest announced version, if it is not the one served."""
        if self.follower is None:
            return
        try:
            announced = self.follower.poll()
        except Exception as exc:  # the stream goes on with the current model
            log.warning("worker: reading %s failed: %s", self.follower.topic, exc)
            return
        if announced and announced[-1].version != self.serving.version:
            self.swap(announced[-1].version, assigned, announced[-1].announced_ms)

    def swap(self, version: str, assigned: set[int], announced_ms: int | None = None) -> None:
        """Serve ``version`` from the next batch on and sweep the ``assigned`` partitions."""
        assert self.registry is not None
        t0 = time.monotonic()
        try:
            new = self.serving.successor(self.registry.path(version), self.device,
                                         vocab_of=registry_vocabs(self.registry))
        except (OSError, ValueError) as exc:
            log.error("worker: cannot load announced model %s (%s); still serving %s", version[:12], exc,
                      self.serving.version[:12])
            return
        # Every state staged so far goes to the store first: the sweep visits the users the
        # store lists, so none built by the old model may be waiting in memory.
        self.checkpoint.commit_store()
        old, self.serving = self.serving, new
        self.metrics.observe_model(new.version, previous=old.version)
        parts = sorted(assigned)
        log.info("worker: model swap %s -> %s (%s, %d items), loaded in %.0f ms; rebuilding the states of "
                 "partitions %s", old.version[:12], new.version[:12], new.model.config.attention,
                 new.model.config.num_items, (time.monotonic() - t0) * 1000, parts)
        self.sweep = Sweep(new.version, deque(parts), announced_ms=announced_ms)

    def sweep_partitions(self, partitions: set[int]) -> None:
        """Queue newly assigned partitions: their stored states may predate the model in force."""
        if self.sweep is None:
            self.sweep = Sweep(self.serving.version, deque())
        for p in sorted(partitions):
            if p not in self.sweep.partitions:
                self.sweep.partitions.append(p)

    def sweep_step(self, assigned: set[int]) -> None:
        """Rebuild up to swap_batch stale states of the ``assigned`` partitions (one checkpoint)."""
        sw = self.sweep
        assert sw is not None
        chunk: list[str] = []
        while len(chunk) < self.swap_batch and (sw.users or sw.partitions):
            if not sw.users:
                p = sw.partitions.popleft()
                if p in assigned:
                    sw.users.extend(self.store.users(p))
                continue
            chunk.append(sw.users.popleft())
        stored = self.checkpoint.read(chunk)  # a newer staged record wins over the stored one
        todo = [r for r in stored.values() if r.partition in assigned and r.model_version != self.serving.version]
        if todo:
            result = rebuild_batch(self.serving, todo, self.top_k, self.topic)
            self.checkpoint.commit(assigned, result)
            sw.rebuilt += result.rebuilt
            self.metrics.observe_batch_result(result)
            if result.windows_dropped:
                log.warning("worker: %d stored windows index a vocabulary %s cannot read: dropped, their states "
                            "rebuilt from the empty state", result.windows_dropped, self.serving.version[:12])
        if sw.users or sw.partitions:
            return
        self.sweep = None
        took = time.monotonic() - sw.started
        if sw.announced_ms is not None:
            since = time.time() - sw.announced_ms / 1000
            self.metrics.observe_swap_complete(since)
            log.info("worker: model swap to %s complete: %d states rebuilt in %.2fs (%.2fs after the announcement)",
                     sw.version[:12], sw.rebuilt, took, since)
        elif sw.rebuilt:
            log.info("worker: %d stored states of newly assigned partitions rebuilt under %s in %.2fs",
                     sw.rebuilt, sw.version[:12], took)

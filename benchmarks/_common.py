"""Helpers shared by the worker benchmarks (bench_worker.py, bench_stream.py): a random model in
a run directory, private topics per case, prefilled user states, paced producing, and the
worker's stage times. Only public entry points of the project are used."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

from consumers.serving import ServingModel
from linrec_stream.broker.topics import create_topics, delete_topics
from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.events import encode_event
from linrec_stream.contracts.topics import project_topics
from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.settings import Settings


def make_model(attention: str, root: Path, num_items: int, items: list[str] | None = None,
               hidden: int = 64, layers: int = 2, heads: int = 2) -> Path:
    """A randomly initialised model (seed 0) saved as a run directory ``root/attention``; its
    vocabulary is ``items`` (default ``i1`` .. ``i<num_items>``)."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=num_items, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      attention=attention, max_len=200, dropout=0.2)
    out = root / attention
    out.mkdir()
    LinRecModel(cfg).eval().save(out / "model.pt")
    items = items if items is not None else [f"i{i}" for i in range(1, num_items + 1)]
    (out / "vocab.json").write_text(json.dumps({"items": ["<pad>"] + list(items)}))
    return out


def fresh_settings(base: Settings) -> Settings:
    """``base`` with a private set of topics and consumer group (created now), no metrics port."""
    tag = uuid.uuid4().hex[:8]
    s = base.replace(topic_interactions=f"b{tag}-in", topic_recommendations=f"b{tag}-rec",
                     topic_dead_letter=f"b{tag}-dlq", topic_model_updates=f"b{tag}-m",
                     topic_state_changelog=f"b{tag}-cl", worker_group=f"b{tag}", metrics_port=0,
                     summary_every_s=3600.0)
    create_topics(s)
    return s


def drop_topics(s: Settings) -> None:
    """Delete a case's private topics (a benchmark's changelogs are hundreds of MB)."""
    try:
        delete_topics(s, project_topics(s))
    except Exception as exc:  # cleanup only: never fail a benchmark on it
        print(f"  (could not delete the topics of {s.worker_group}: {exc})", flush=True)


def prefill(state_dir: Path, model_dir: Path, users: int, history: int, num_items: int, seed: int = 3) -> None:
    """Give users ``u0`` .. ``u<users-1>`` ``history`` random past events each before measuring:
    a full window to re-encode for the softmax baseline, and the matching state (``model.encode``
    of the window) for LinRec. Records carry no partition, so no new event counts as applied."""
    from state.record import MAX_PARTITION, UserRecord
    from state.store import StateStore

    serving = ServingModel.load(model_dir)
    rng = random.Random(seed)
    with StateStore(state_dir) as store, torch.inference_mode():
        for start in range(0, users, 100):
            names = [f"u{i}" for i in range(start, min(users, start + 100))]
            windows = [[rng.randrange(1, num_items + 1) for _ in range(history)] for _ in names]
            states = None
            if serving.model.config.attention != "softmax":
                _, states = serving.model.encode(torch.tensor(windows))
            # The windows are model ids already (the records' vocabulary tag says whose).
            records = [UserRecord(u, states[i].to_bytes() if states is not None else b"", serving.version,
                                  tuple(w), history, MAX_PARTITION, 0, None, 1e9, *serving.vocab_tag)
                       for i, (u, w) in enumerate(zip(names, windows))]
            store.commit(records, {})


def produce(s: Settings, events: Iterable[tuple[str, str]], rate: float | None = None, linger_ms: int = 5) -> int:
    """Send (user, item) events to the interactions topic, ``rate`` events/s (None: at once);
    event time ``1e9 + i``. Returns how many were sent."""
    p = KafkaConnection.from_settings(s).producer(linger_ms=linger_ms)
    t0 = time.monotonic()
    n = 0
    for i, (user, item) in enumerate(events):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        k, v = encode_event(user, item, 1e9 + i)
        p.send(s.topic_interactions, key=k, value=v)
        n += 1
    p.flush()
    p.close()
    return n


def stage_sums(m) -> dict[str, float]:
    """The worker's cumulative seconds per stage (``WorkerMetrics.stage_seconds``), every stage."""
    return dict(m.stage_seconds)

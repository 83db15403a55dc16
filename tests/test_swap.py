"""Hot swap of the model in a running worker, against the real broker and a real rocksdict store:
a version promoted (then rolled back) mid-stream is served without a restart, without dropping
or repeating an event, and no state is scored by a model other than the one that built it."""

from __future__ import annotations

import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from consumers.batch import rebuild_batch, rebuild_state
from consumers.serving import ServingModel
from linrec_stream.broker.topics import create_topics, private_env
from linrec_stream.contracts.events import Recommendation, encode_event
from linrec_stream.lifecycle.registry import ModelRegistry
from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.settings import WORKER_ENGINES, Settings
from state.record import UserRecord
from tests.conftest import REPO, run_cli
from tests.helpers import read_topic, start_worker_args, stored_records, wait, write_run

NUM_ITEMS = 120
VOCAB = ["<pad>"] + [f"item-{i}" for i in range(1, NUM_ITEMS + 1)]


def make_run(path: Path, seed: int) -> LinRecModel:
    """A run directory (model.pt + vocab.json) holding a small random model."""
    torch.manual_seed(seed)
    cfg = ModelConfig(num_items=NUM_ITEMS, hidden_size=16, num_layers=2, num_heads=2, attention="linrec",
                      max_len=16, dropout=0.0, inner_size=32)
    model = LinRecModel(cfg).eval()
    write_run(path, model, VOCAB)
    return model


# --- the sweep's batch function, without Kafka ---------------------------------------------------------
def test_rebuild_batch_rebuilds_only_stale_records_from_their_window(tmp_path: Path):
    old = ServingModel.of(make_run(tmp_path / "a", 0), VOCAB)
    new = ServingModel.of(make_run(tmp_path / "b", 1), VOCAB)

    def record(user: str, items: list[str], version: str) -> UserRecord:
        # The window as the worker writes it: the known items' ids, tagged with their vocabulary.
        return UserRecord(user, b"opaque", version, tuple(old.ids(items)), events=len(items) + 5, partition=2,
                          offset=40, event_id="e", last_ts=1e9, vocab_size=old.vocab_tag[0], vocab_crc=old.vocab_tag[1])

    stale = record("u1", ["item-3", "item-9", "item-4"], old.version)
    only_unknown = record("u2", [], old.version)  # its one event was an unknown item
    current = record("u3", ["item-1"], new.version)
    res = rebuild_batch(new, [stale, only_unknown, current], top_k=5, topic="in")
    assert res.rebuilt == 2 and [r.user for r in res.records] == ["u1", "u2"] and res.windows_dropped == 0
    got = {r.user: r for r in res.records}
    for user, src in (("u1", stale), ("u2", only_unknown)):
        r = got[user]
        # Only the state and its version change: the event position and window are the same.
        assert r.model_version == new.version
        assert (r.window, r.events, r.partition, r.offset, r.event_id) == \
            (src.window, src.events, src.partition, src.offset, src.event_id)
        expected = rebuild_state(new, src.window)
        torch.testing.assert_close(new.model.load_state_bytes(r.state).S, expected.S, rtol=1e-5, atol=1e-6)
    # A fresh recommendation for the user the new model can score, naming the new version.
    assert [(r.user, r.trigger, r.model_version) for r in res.recommendations] == [("u1", "model_swap", new.version)]
    sent = Recommendation.from_bytes(res.recommendations[0].to_bytes())  # as a client reads it
    assert sent.ingested_at is None and not set(sent.items) & {"item-3", "item-9", "item-4"}


# --- a running worker, with the broker ---------------------------------------------------------------
@dataclass
class Live:
    env: dict[str, str]
    settings: Settings
    registry: ModelRegistry
    models: dict[str, LinRecModel]  # "a", "b"
    seqs: dict[str, list[str]] = field(default_factory=dict)  # user -> item ids, valid events in order
    last_offset: dict[str, tuple[int, int]] = field(default_factory=dict)
    sent: int = 0


@pytest.fixture
def live(broker: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Live:
    tag = uuid.uuid4().hex[:8]
    env = {
        **private_env("s", tag), "LINREC_WORKER_ENGINE": getattr(request, "param", "kafka-python"),
        "LINREC_INTERACTIONS_PARTITIONS": "4", "LINREC_METRICS_PORT": "0", "LINREC_SUMMARY_EVERY_S": "1",
        "LINREC_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "LINREC_REGISTRY_DIR": str(tmp_path / "models"),
    }
    settings = Settings.load(env={**os.environ, **env})
    create_topics(settings)
    models = {name: make_run(tmp_path / f"run-{name}", seed) for name, seed in (("a", 0), ("b", 1))}
    registry = ModelRegistry(tmp_path / "models")
    registry.add(tmp_path / "run-a")
    registry.promote(models["a"].version)
    return Live(env, settings, registry, models)


def produce(live: Live, events: int, users: int, seed: int, rate: float | None = None) -> None:
    """Send ``events`` valid events (at ``rate`` per second if given) and record what was sent."""
    from linrec_stream.clients.connection import KafkaConnection

    rng = random.Random(seed)
    producer = KafkaConnection.from_settings(live.settings).producer(linger_ms=5)
    futures = []
    t0 = time.monotonic()
    for i in range(events):
        user = f"user-{rng.randrange(users)}"
        item = f"item-{rng.randrange(1, NUM_ITEMS + 1)}"
        key, value = encode_event(user, item, 1_000_000_000.0 + live.sent + i, event_id=f"e{seed}-{i}")
        futures.append((user, item, producer.send(live.settings.topic_interactions, key=key, value=value)))
        if rate is not None and i % 50 == 49:
            time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
    producer.flush()
    for user, item, fut in futures:
        md = fut.get(timeout=30)
        live.seqs.setdefault(user, []).append(item)
        live.last_offset[user] = (md.partition, md.offset)
    live.sent += events
    producer.close()


def wait_for(path: Path, pattern: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {path.name} after {timeout:.0f}s:\n{path.read_text()[-3000:]}")


def change_mid_stream(live: Live, state: Path, log: Path, command: list[str], seed: int) -> None:
    """A worker under a steady stream; ``command`` (models promote / rollback) runs half-way."""
    import subprocess

    proc = subprocess.Popen(start_worker_args(state, idle_exit=6.0, batch_size=64, model_dir=None),
                            env={**os.environ, **live.env}, cwd=REPO,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    announced = threading.Event()

    def steady() -> None:
        # Events flow until one more chunk after the announcement, however long the command takes
        # to start on a loaded machine: the worker must still be consuming (not idled out) when the
        # announcement lands, and go on receiving events under the new model.
        chunk, done = 0, False
        while not done:
            done = announced.is_set()
            produce(live, 400, 300, seed * 1000 + chunk, 800.0)
            chunk += 1

    try:
        wait_for(log, r"partitions assigned")
        stream = threading.Thread(target=steady)
        stream.start()
        time.sleep(2.5)  # mid-stream
        try:
            res = run_cli(*command, env=live.env)
        finally:
            announced.set()
        assert res.returncode == 0, res.stderr
        assert "announced" in res.stdout
        stream.join()
    finally:
        wait(proc)


def check_swapped(live: Live, state: Path, log: Path, new: LinRecModel, old: LinRecModel) -> None:
    records = stored_records(state)
    assert set(records) == set(live.seqs)
    serving = ServingModel.of(new, VOCAB)
    for user, seq in live.seqs.items():
        rec = records[user]
        # Every valid event applied exactly once, the position is the user's last event...
        assert rec.events == len(seq), f"{user}: {rec.events} events applied, {len(seq)} sent"
        assert (rec.partition, rec.offset) == live.last_offset[user]
        assert list(rec.window) == serving.ids(seq)  # (fewer events per user than the window holds)
        # ...and the state is the new model's encoding of the window it keeps.
        assert rec.model_version == new.version, f"{user}: state still built by {rec.model_version[:12]}"
        expected = rebuild_state(serving, rec.window)
        torch.testing.assert_close(new.load_state_bytes(rec.state).S, expected.S, rtol=1e-4, atol=1e-5)
    text = log.read_text()
    assert f"model swap to {new.version[:12]} complete" in text, text[-3000:]

    # Per user, in topic order, the versions named go old -> new and never back.
    runs = version_runs(live)
    assert all(r in ([old.version], [old.version, new.version], [new.version]) for r in runs.values()), runs
    sent = [Recommendation.from_bytes(r.value) for r in read_topic(live.settings, live.settings.topic_recommendations)]
    assert any(r.trigger == "model_swap" and r.model_version == new.version for r in sent)


def version_runs(live: Live) -> dict[str, list[str]]:
    """Per user, the model versions its recommendations named, in topic order, repeats merged."""
    runs: dict[str, list[str]] = {}
    for r in read_topic(live.settings, live.settings.topic_recommendations):
        rec = Recommendation.from_bytes(r.value)
        seq = runs.setdefault(rec.user, [])
        if not seq or seq[-1] != rec.model_version:
            seq.append(rec.model_version)
    return runs


@pytest.mark.kafka
@pytest.mark.parametrize("live", WORKER_ENGINES, indirect=True)  # the hot swap on both engines
def test_promote_then_rollback_mid_stream(live: Live, tmp_path: Path):
    a, b = live.models["a"], live.models["b"]
    state = tmp_path / "state"
    produce(live, 3_000, 300, seed=1)  # history under version a

    # Promote b while events flow.
    change_mid_stream(live, state, tmp_path / "w1.log", ["models", "add", str(tmp_path / "run-b"), "--promote"], 2)
    assert live.registry.current() == b.version
    check_swapped(live, state, tmp_path / "w1.log", new=b, old=a)

    # Roll back to a the same way: states rebuilt again, recommendations name a from then on.
    change_mid_stream(live, state, tmp_path / "w2.log", ["models", "rollback"], 3)
    assert live.registry.current() == a.version
    records = stored_records(state)
    serving = ServingModel.of(a, VOCAB)
    for user, seq in live.seqs.items():
        rec = records[user]
        assert rec.events == len(seq) and (rec.partition, rec.offset) == live.last_offset[user]
        assert rec.model_version == a.version
        torch.testing.assert_close(a.load_state_bytes(rec.state).S, rebuild_state(serving, rec.window).S,
                                   rtol=1e-4, atol=1e-5)
    assert f"model swap to {a.version[:12]} complete" in (tmp_path / "w2.log").read_text()
    runs = version_runs(live)
    allowed = ([a.version], [a.version, b.version], [b.version], [a.version, b.version, a.version],
               [b.version, a.version])
    assert all(r in allowed for r in runs.values()), runs
    # Every user ends on a: the sweep gave each a fresh recommendation by a if no event did.
    assert all(r[-1] == a.version for r in runs.values())


@pytest.mark.kafka
def test_worker_without_a_version_in_force_says_so(broker: Settings, tmp_path: Path):
    env = {"LINREC_REGISTRY_DIR": str(tmp_path / "empty"), "LINREC_METRICS_PORT": "0",
           "LINREC_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
    res = run_cli("worker", "--state-dir", str(tmp_path / "state"), "--idle-exit", "1", env=env)
    assert res.returncode == 1
    assert "no model version is in force" in res.stderr and "Traceback" not in res.stderr
    # With a version in force but no model-updates topic to follow: says which command creates it.
    registry = ModelRegistry(tmp_path / "empty")
    make_run(tmp_path / "run", 0)
    registry.promote(registry.add(tmp_path / "run").version)
    env["LINREC_TOPIC_MODEL_UPDATES"] = f"missing-{uuid.uuid4().hex[:8]}"
    res = run_cli("worker", "--state-dir", str(tmp_path / "state"), "--idle-exit", "1", env=env)
    assert res.returncode == 1 and "does not exist" in res.stderr and "topics create" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr

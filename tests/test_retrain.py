"""`linrec-stream retrain` against the real broker: the archive read back from Kafka, the first
version published and announced, the vocabulary grown with a warm start, a worse candidate
rejected, and the schedule and error handling."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from linrec_stream.contracts.events import encode_event
from linrec_stream.contracts.model_updates import Announcement
from linrec_stream.lifecycle import retrain as retrain_mod
from linrec_stream.lifecycle.archive import read_archive
from linrec_stream.cli import main
from linrec_stream.data import PAD, Interactions, build_sequences
from linrec_stream.training.evaluate import EvalSet, evaluate
from linrec_stream.model.run_dir import load_run
from linrec_stream.broker.topics import create_topics, private_env
from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.lifecycle.registry import ModelRegistry
from linrec_stream.lifecycle.retrain import (
    RetrainConfig,
    RetrainError,
    parse_duration,
    retrain_once,
    run_every,
)
from linrec_stream.settings import Settings
from linrec_stream.training.warm_start import grow_vocab, remap_items, warm_start_weights
from tests.conftest import run_cli

CPU = torch.device("cpu")
CYCLE = 100  # items on the cycle the synthetic users walk
# A ModelConfig template: each round sizes it to its data's items (model.presets.sized).
TINY = ModelConfig(num_items=1, hidden_size=32, num_layers=1, num_heads=2, inner_size=64, max_len=16, dropout=0.1)
FIRST = RetrainConfig(epochs=6, patience=3, lr=3e-3, batch_size=32, seed=1, scratch=TINY)
Event = tuple[str, str, float]  # user, item, ts


def cycle_events(users: int, length: int, items: list[str], seed: int, prefix: str = "u",
                 t0: float = 1.6e9) -> list[Event]:
    """Each user walks ``items`` as a cycle from a random start (10 % random jumps): the next
    item is predictable from the last one. Timestamps increase per user, in seconds."""
    rng = random.Random(seed)
    out = []
    for u in range(users):
        k = rng.randrange(len(items))
        t = t0 + rng.random() * 1000
        for _ in range(length):
            out.append((f"{prefix}{u}", items[k], t))
            k = rng.randrange(len(items)) if rng.random() < 0.1 else (k + 1) % len(items)
            t += 60.0 + rng.random()
    return out


def produce(settings: Settings, events: list[Event], malformed: list[tuple[bytes, bytes]] = ()) -> None:
    """Produce ``events`` (in order, keyed by user) and ``malformed`` (key, value) messages."""
    from linrec_stream.clients.connection import KafkaConnection

    producer = KafkaConnection.from_settings(settings).producer(linger_ms=10, acks="all")
    futures = [producer.send(settings.topic_interactions, key=k, value=v)
               for k, v in (encode_event(u, i, t) for u, i, t in events)]
    futures += [producer.send(settings.topic_interactions, key=k, value=v) for k, v in malformed]
    producer.flush()
    for f in futures:
        f.get(timeout=30)
    producer.close()


def announcements(settings: Settings) -> list[Announcement]:
    """Everything on the model-updates topic, oldest first (read to its end offset)."""
    from linrec_stream.clients.connection import KafkaConnection
    from kafka.structs import TopicPartition

    c = KafkaConnection.from_settings(settings).consumer(group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(settings.topic_model_updates, 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        end = c.end_offsets([tp])[tp]
        out = []
        while c.position(tp) < end:
            for records in c.poll(timeout_ms=1000).values():
                out += [Announcement.from_bytes(r.value, r.timestamp) for r in records]
        return out
    finally:
        c.close()


def private_settings(broker: Settings, registry: Path, partitions: int = 3) -> tuple[Settings, dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    env = {
        **private_env("rt", tag), "LINREC_INTERACTIONS_PARTITIONS": str(partitions),
        "LINREC_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "LINREC_REGISTRY_DIR": str(registry),
    }
    settings = Settings.load(env={**os.environ, **env})
    create_topics(settings)
    return settings, env


@dataclass
class World:
    """A topic holding the cycle log and a registry whose first version was trained on it."""

    settings: Settings
    events: list[Event]
    items: list[str]
    first: retrain_mod.RetrainResult
    log: list[str]

    def copy_registry(self, to: Path) -> Settings:
        """These settings with a private copy of the registry (tests must not see each other's versions)."""
        shutil.copytree(self.settings.registry_dir, to)
        return self.settings.replace(registry_dir=to)


@pytest.fixture(scope="module")
def world(broker: Settings, tmp_path_factory: pytest.TempPathFactory) -> World:
    settings, _ = private_settings(broker, tmp_path_factory.mktemp("retrain") / "registry")
    items = [f"i{k:03d}" for k in range(CYCLE)]
    events = cycle_events(300, 20, items, seed=0)
    produce(settings, events)
    log: list[str] = []
    first = retrain_once(settings, FIRST, CPU, log=log.append)
    return World(settings, events, items, first, log)


# --- the archive -------------------------------------------------------------------------------
@pytest.mark.kafka
def test_archive_round_trip(broker: Settings, tmp_path: Path):
    settings, _ = private_settings(broker, tmp_path / "registry")
    events = cycle_events(40, 15, [f"x{k}" for k in range(30)], seed=3)
    random.Random(1).shuffle(events)  # arrival order != time order: the archive keeps arrival order per user
    bad = [(b"u1", b"{not json"), (b"u2", json.dumps({"user": "u2", "ts": 1.6e9}).encode()),
           (b"u3", json.dumps({"user": "u3", "item": "x1", "ts": 1.7e12}).encode()), (b"u4", None)]
    produce(settings, events, bad)
    got = read_archive(settings, log=lambda m: None)
    assert got.skipped == len(bad) and got.events == len(events) == len(got.interactions)
    assert sum(end - start for start, end in got.offsets.values()) == len(events) + len(bad)
    assert set(got.offsets) == {0, 1, 2} and all(start == 0 for start, _ in got.offsets.values())
    inter = got.interactions
    assert inter.source == f"kafka:{settings.topic_interactions}" and inter.ts.dtype == np.float64
    back = list(zip(inter.user.tolist(), inter.item.tolist(), inter.ts.tolist()))
    assert Counter(back) == Counter(events)
    for user in {u for u, _, _ in events}:  # each user's events in the order they were produced
        assert [e for e in back if e[0] == user] == [e for e in events if e[0] == user]
    assert got.first_ts == min(t for _, _, t in events) and got.last_ts == max(t for _, _, t in events)


@pytest.mark.kafka
def test_empty_topic_is_one_clear_error(broker: Settings, tmp_path: Path):
    settings, env = private_settings(broker, tmp_path / "registry")
    with pytest.raises(RetrainError, match="no events in topic"):
        retrain_once(settings, FIRST, CPU, log=lambda m: None)
    res = run_cli("retrain", "--device", "cpu", env=env, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no events in topic" in errors[0], res.stderr
    assert not (tmp_path / "registry" / "versions").exists()


# --- publish, grow, reject -------------------------------------------------------------------------
@pytest.mark.kafka
def test_first_retrain_publishes_and_announces(world: World):
    r, reg = world.first, ModelRegistry(world.settings.registry_dir)
    assert (r.decision, r.reason, r.parent, r.current) == ("published", "first", None, None)
    assert reg.current() == r.version and r.change is not None and r.announced
    card = reg.card(r.version)
    assert (card.origin, card.decision, card.parent) == ("retrain", "published", None)
    assert card.data["events"] == len(world.events) and card.data["items"] == CYCLE
    assert card.metrics["test_users"] == 300 and card.metrics["current"] is None
    # It learned the cycle: far above the ~0.05 NDCG@10 of a random ranking of 100 items.
    assert card.metrics["candidate"]["ndcg@10"] > 0.3, card.metrics
    said = announcements(world.settings)
    assert [(a.action, a.version) for a in said] == [("promote", r.version)]
    assert any(line.startswith(f"retrain: published {r.version[:12]}") for line in world.log)
    assert list((world.settings.registry_dir / ".work").iterdir()) == []  # work folder removed


def test_warm_start_weight_copy():
    torch.manual_seed(0)
    parent = LinRecModel(ModelConfig(num_items=10, hidden_size=16, num_layers=1, num_heads=2, max_len=8))
    fresh = LinRecModel(ModelConfig(num_items=14, hidden_size=16, num_layers=1, num_heads=2, max_len=8)).state_dict()
    got = warm_start_weights(parent.state_dict(), fresh)
    emb = got["item_embedding.weight"]
    assert emb.shape == (15, 16)
    assert torch.equal(emb[:11], parent.item_embedding.weight.detach())  # padding + known items, same ids
    assert torch.equal(emb[11:], fresh["item_embedding.weight"][11:])  # new items keep their fresh init
    for name, w in parent.state_dict().items():
        if name != "item_embedding.weight":
            assert torch.equal(got[name], w), name
    other = LinRecModel(ModelConfig(num_items=14, hidden_size=16, num_layers=1, num_heads=2, max_len=12))
    with pytest.raises(ValueError, match="position_embedding"):
        warm_start_weights(parent.state_dict(), other.state_dict())


def test_vocab_growth_keeps_parent_ids():
    parent = [PAD, "b", "a", "z"]  # not sorted: a parent's order is kept whatever it is
    seqs = build_sequences(Interactions(user=np.array(["u", "u", "u", "v"], dtype=object),
                                        item=np.array(["d", "a", "c", "b"], dtype=object),
                                        ts=np.array([1.0, 2.0, 3.0, 1.0]), source="t"))
    vocab = grow_vocab(parent, seqs.vocab)
    assert vocab == [PAD, "b", "a", "z", "c", "d"]
    mapped = remap_items(seqs, vocab)
    assert [[vocab[i] for i in s] for s in mapped.seqs] == [["d", "a", "c"], ["b"]]


@pytest.mark.kafka
def test_retrain_grows_vocabulary_with_warm_start(world: World, tmp_path: Path):
    settings = world.copy_registry(tmp_path / "registry")
    base = world.settings
    settings = settings.replace(topic_interactions=f"{base.topic_interactions}-grown",
                                topic_model_updates=f"{base.topic_model_updates}-grown")
    create_topics(settings)
    new = [f"new{k:02d}" for k in range(15)]
    produce(settings, world.events + cycle_events(40, 12, new, seed=5, prefix="n", t0=1.7e9))
    parent_model, parent_vocab = load_run(world.settings.registry_dir / "versions" / world.first.version)
    log: list[str] = []
    # A near-zero learning rate: the candidate's weights are still (almost) its initial ones.
    r = retrain_once(settings, RetrainConfig(epochs=1, lr=1e-9, batch_size=64, seed=1), CPU, log=log.append)
    assert r.parent == world.first.version and r.new_items == 15 and r.num_items == CYCLE + 15
    assert f"cold-start items: 15 new since parent {r.parent[:12]}" in log
    cand, vocab = load_run(settings.registry_dir / "versions" / r.version)
    assert cand.config.num_items == CYCLE + 15
    assert vocab.items[:len(parent_vocab)] == parent_vocab.items and list(vocab.items[len(parent_vocab):]) == sorted(new)
    assert {k: v for k, v in cand.config.to_dict().items() if k != "num_items"} == \
        {k: v for k, v in parent_model.config.to_dict().items() if k != "num_items"}
    emb, old = cand.item_embedding.weight.detach(), parent_model.item_embedding.weight.detach()
    torch.testing.assert_close(emb[:CYCLE + 1], old, rtol=0, atol=1e-5)  # warm start: known rows copied
    assert emb[CYCLE + 1:].abs().mean() > 1e-3  # new rows: a fresh init, not zeros or copies
    torch.testing.assert_close(cand.blocks[0].attention.query.weight, parent_model.blocks[0].attention.query.weight,
                               rtol=0, atol=1e-5)
    # The parent was scored on the same users, the new items' users counting as its misses.
    card = ModelRegistry(settings.registry_dir).card(r.version)
    assert card.metrics["test_users"] == 340 and card.metrics["current"] is not None
    assert card.parent == world.first.version and card.data["new_items"] == 15


@pytest.mark.kafka
def test_worse_candidate_is_not_published(world: World, tmp_path: Path):
    settings = world.copy_registry(tmp_path / "registry")
    before = announcements(settings)
    log: list[str] = []
    bad = RetrainConfig(epochs=1, lr=1e-6, batch_size=64, from_scratch=True, seed=2)
    r = retrain_once(settings, bad, CPU, log=log.append)
    reg = ModelRegistry(settings.registry_dir)
    assert (r.decision, r.reason, r.change) == ("rejected", "worse", None)
    assert r.candidate["ndcg@10"] < r.current["ndcg@10"] - bad.margin
    assert reg.current() == world.first.version  # CURRENT unchanged
    assert [h.version for h in reg.history()] == [world.first.version]
    card = reg.card(r.version)
    assert card.decision == "rejected" and card.parent == world.first.version
    assert card.metrics["current"]["ndcg@10"] == pytest.approx(world.first.candidate["ndcg@10"], abs=1e-9)
    assert announcements(settings) == before  # nothing announced
    assert log[-1].startswith(f"retrain: rejected {r.version[:12]}") and "not published" in log[-1]


@pytest.mark.kafka
def test_whole_history_round_trains_and_compares_on_whole_histories(world: World, tmp_path: Path):
    settings = world.copy_registry(tmp_path / "registry")
    cfg = RetrainConfig(epochs=1, lr=3e-3, batch_size=32, seed=3, history="full")
    r = retrain_once(settings, cfg, CPU, log=lambda m: None)
    reg = ModelRegistry(settings.registry_dir)
    assert json.loads((reg.path(r.version) / "meta.json").read_text())["train_config"]["history"] == "full"
    # The version in force is scored on each user's whole test history (19 events, its max_len is
    # 16), as the workers serve it, not on the window its own round was judged on.
    parent, vocab = load_run(reg.path(world.first.version))
    index = {s: k for k, s in enumerate(vocab)}
    by_user: dict[str, list[int]] = {}
    for user, item, _ts in world.events:  # each user's events are in time order
        by_user.setdefault(user, []).append(index[item])
    test = EvalSet([np.array(s[:-1]) for s in by_user.values()], np.array([s[-1] for s in by_user.values()]))
    full, window = evaluate(parent, test, history="full"), evaluate(parent, test, history="window")
    assert any(abs(full[k] - window[k]) > 1e-6 for k in full), "the two encodings must differ for this test"
    assert r.current == pytest.approx(full, abs=1e-6)


# --- schedule and command line -------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("30s", 30), ("15m", 900), ("24h", 86400), ("2d", 172800),
                                           ("1.5h", 5400), (" 10 s ", 10)])
def test_parse_duration(text: str, seconds: float):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "", "h", "-1h", "0s", "10", "1e3s", "24 hours"])
def test_parse_duration_rejects(text: str):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_run_every_goes_on_after_a_failed_round(monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []

    def fake(settings, config, device, log, progress):
        calls.append(len(calls))
        if len(calls) == 1:
            raise OSError("disk full")

    monkeypatch.setattr(retrain_mod, "retrain_once", fake)
    log: list[str] = []
    assert run_every(Settings(), FIRST, 0.01, CPU, log=log.append, max_rounds=3) == 3
    assert len(calls) == 3 and any("round 1 failed: OSError: disk full" in line for line in log)
    stop = threading.Event()
    stop.set()
    assert run_every(Settings(), FIRST, 0.01, CPU, log=log.append, stop=stop) == 0


def test_cli_bad_duration_is_one_line():
    res = run_cli("retrain", "--every", "5x", env={"LINREC_BOOTSTRAP_SERVERS": "127.0.0.1:1"}, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--every" in res.stderr and "'5x'" in res.stderr


@pytest.mark.parametrize("args, needle", [
    (["--margin", "-0.1"], "--margin"), (["--epochs", "0"], "--epochs"), (["--lr", "0"], "--lr"),
    (["--batch-size", "0"], "--batch-size"), (["--device", "tpu"], "--device"),
])
def test_cli_usage_errors_are_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture):
    # In-process (the subprocess case above covers the real entry point): no torch start-up per case.
    assert main(["retrain", "--bootstrap-servers", "127.0.0.1:1", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_config_checks():
    assert replace(FIRST, margin=0.0).margin == 0.0
    with pytest.raises(ValueError, match="margin"):
        RetrainConfig(margin=float("nan"))
    with pytest.raises(ValueError, match="patience"):
        RetrainConfig(patience=0)

"""The command line's parts below its parsing: the train flags' single source of defaults, the
architecture a warm start keeps, the presets, the recommendations reader behind ``recs tail``
and the quickstart's reading of a hot swap off a worker's metrics."""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest

from linrec_stream.cli import build_parser
from linrec_stream.cli.train import ARCH_FLAGS, ATTENTIONS, model_default
from linrec_stream.model import ModelConfig
from linrec_stream.model.ops import OPS
from linrec_stream.model.presets import PRESETS, preset, sized
from linrec_stream.settings import Settings
from linrec_stream.training.experiment import ArchitectureConflict, ArchitectureError, inherit_architecture
from tests.conftest import run_cli

DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != "num_items"}


# --- train's architecture flags ----------------------------------------------------------------
def test_train_flags_default_to_model_config_and_offer_every_attention():
    assert set(ATTENTIONS) == set(OPS)
    assert set(ARCH_FLAGS.values()) <= set(DEFAULTS)
    assert {field: model_default(field) for field in ARCH_FLAGS.values()} == \
        {field: DEFAULTS[field] for field in ARCH_FLAGS.values()}
    assert DEFAULTS["attention"] == "linrec_decay"
    # Left out, a flag stays None, so that --init-from can tell it from one given.
    args = build_parser().parse_args(["train", "--data", "x", "--out", "y"])
    assert all(getattr(args, flag.replace("-", "_")) is None for flag in ARCH_FLAGS)


def test_train_help_shows_model_config_defaults():
    res = run_cli("train", "--help", env={"COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    help_text = " ".join(res.stdout.split())
    for flag, field in ARCH_FLAGS.items():
        assert f"--{flag}" in help_text and f"default {DEFAULTS[field]}" in help_text


# --- the architecture of a warm start ----------------------------------------------------------
def test_inherit_architecture_keeps_the_parents_and_lets_dropout_change():
    parent = ModelConfig(num_items=9, hidden_size=16, num_heads=2, max_len=8)
    assert inherit_architecture(parent, {}) == parent
    assert inherit_architecture(parent, {"hidden_size": 16, "attention": parent.attention}) == parent
    assert inherit_architecture(parent, {"dropout": 0.1}) == dataclasses.replace(parent, dropout=0.1)
    with pytest.raises(ArchitectureConflict) as conflict:
        inherit_architecture(parent, {"dropout": 0.1, "hidden_size": 32, "max_len": 4})
    assert (conflict.value.field, conflict.value.value, conflict.value.kept) == ("hidden_size", 32, 16)
    assert str(conflict.value).startswith("hidden_size 32: the parent model has hidden_size 16")
    with pytest.raises(ArchitectureError) as bad:
        inherit_architecture(parent, {"dropout": 1.5})
    assert bad.value.field == "dropout" and "ModelConfig.dropout" in str(bad.value)


# --- presets -------------------------------------------------------------------------------------
def test_presets_are_model_config_defaults_plus_their_own_changes():
    assert sized(PRESETS["default"], 12) == ModelConfig(num_items=12)
    small = preset("quickstart", 30)
    assert small.num_items == 30 and (small.hidden_size, small.inner_size, small.max_len) == (32, 64, 50)
    assert small.attention == DEFAULTS["attention"] and small.num_layers == DEFAULTS["num_layers"]
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge", 3)


def test_retrain_trains_the_default_architecture_without_a_parent():
    from linrec_stream.lifecycle.retrain import RetrainConfig

    assert RetrainConfig().scratch == PRESETS["default"]


# --- the recommendations reader ------------------------------------------------------------------
@pytest.mark.kafka
def test_recommendation_reader_and_recs_tail_read_what_was_produced(broker: Settings):
    from linrec_stream.clients.connection import KafkaConnection

    from linrec_stream.broker.topics import create_topics, delete_topics, private_env
    from linrec_stream.clients.recommendations import RecommendationReader
    from linrec_stream.contracts.events import Recommendation, Source
    from linrec_stream.contracts.topics import project_topics

    env = {**private_env("rr", uuid.uuid4().hex[:8]), "LINREC_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
    settings = Settings.load(env={**os.environ, **env})
    create_topics(settings)
    try:
        recs = [Recommendation(f"u{k}", ["a", "b"], [0.5, 0.25], "0123456789abcdef", Source("in", 0, k, 1000 + k),
                               None, 1.0 + k, 2.0 + k) for k in range(3)]
        producer = KafkaConnection.from_settings(broker).producer()
        for rec in recs:
            producer.send(settings.topic_recommendations, key=rec.user.encode(), value=rec.to_bytes())
        producer.flush()
        producer.close()

        with RecommendationReader(settings, from_beginning=True) as reader:
            got = list(reader.follow(idle_timeout_s=3))
        assert sorted(r.raw for r in got) == sorted(r.to_bytes() for r in recs)
        assert sorted((r.recommendation for r in got), key=lambda r: r.user) == recs

        tail = run_cli("recs", "tail", "--from-beginning", "--max", "3", "--timeout", "20", env=env)
        assert tail.returncode == 0, tail.stderr
        assert sorted(tail.stdout.splitlines()) == [f"u{k}: a | b  (model 01234567)" for k in range(3)]
        raw = run_cli("recs", "tail", "--from-beginning", "--json", "--timeout", "5", env=env)
        assert raw.returncode == 0, raw.stderr
        assert sorted(raw.stdout.splitlines()) == sorted(r.to_bytes().decode() for r in recs)
    finally:
        delete_topics(settings, project_topics(settings))


# --- the quickstart's view of a hot swap ---------------------------------------------------------
def test_quickstart_reads_a_hot_swap_off_the_worker_metrics():
    from consumers.metrics import WorkerMetrics
    from linrec_stream import quickstart

    metrics = WorkerMetrics()
    port = quickstart._free_port()
    metrics.serve(port)
    metrics.observe_model("v1")
    metrics.rebuilt.inc(2)  # before the round: not the swap's
    before = quickstart._scrape(port)
    assert before[("linrec_model_info", (("version", "v1"),))] == 1.0
    assert quickstart._wait_for_swap(port, "v2", before, timeout_s=0.3) is None
    metrics.observe_model("v2", previous="v1")
    metrics.rebuilt.inc(5)
    # Served, but the sweep has not rebuilt every state yet.
    assert quickstart._wait_for_swap(port, "v2", before, timeout_s=0.3) is None
    metrics.observe_swap_complete(1.5)
    assert quickstart._wait_for_swap(port, "v2", before, timeout_s=5) == (5, 1.5)

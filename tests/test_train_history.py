"""Training on whole histories (``TrainConfig.history="full"``): every event is a target, batches
stay within a window batch's cost, and validation encodes histories as a worker serves them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from linrec_stream.training.evaluate import evaluate
from linrec_stream.training.train import TrainConfig, causal_batch, epoch_batches, train
from tests.helpers import cycle_log, small_config, split, write_cycle_csv

QUIET = dict(progress=False, log=lambda m: None)


def test_whole_history_batch_makes_every_event_after_the_first_a_target():
    seqs = [np.arange(1, n + 1, dtype=np.int64) for n in (3, 40, 7)]
    inputs, targets = causal_batch(seqs, None)
    assert inputs.shape == targets.shape == (3, 39)
    assert int((targets != 0).sum()) == sum(len(s) - 1 for s in seqs)
    # Each target is the event after its input, in every row.
    assert torch.equal(targets[1], torch.arange(2, 41))
    assert torch.equal(inputs[0, -2:], torch.tensor([1, 2])) and torch.equal(targets[0, -2:], torch.tensor([2, 3]))
    # A window keeps the last max_len + 1 events only.
    _, t = causal_batch(seqs, 8)
    assert int((t != 0).sum()) == 2 + 8 + 6


@pytest.mark.parametrize("history", ["window", "full"])
def test_epoch_batches_cover_every_user_once_within_the_budget(history: str):
    rng = np.random.default_rng(0)
    seqs = [np.ones(int(n), np.int64) for n in rng.integers(2, 300, size=500)]
    tc = TrainConfig(batch_size=32, history=history)
    batches = epoch_batches(seqs, tc, max_len=20, rng=np.random.default_rng(5))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(seqs)))
    assert all(len(b) <= 32 for b in batches)
    if history == "full":
        # count × longest within batch_size × max_len, unless one user alone is longer.
        assert all(len(b) * max(len(seqs[i]) for i in b) <= 32 * 20 or len(b) == 1 for b in batches)
        # Sorting within blocks keeps padding low: well under half of the padded size is waste.
        padded = sum(len(b) * max(len(seqs[i]) for i in b) for b in batches)
        assert sum(len(s) for s in seqs) > 0.7 * padded
    else:
        assert [len(b) for b in batches] == [32] * 15 + [20]
    # Same seed, same batches: training stays deterministic and resumable.
    again = epoch_batches(seqs, tc, max_len=20, rng=np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


@pytest.mark.parametrize("attention", ["linrec", "linrec_decay"])
def test_whole_history_training_learns_and_validates_on_whole_histories(tmp_path: Path, attention: str):
    # Histories of 60 events, four times the model's max_len of 16.
    data, test = split(cycle_log(users=120, length=60))
    tc = TrainConfig(epochs=6, batch_size=16, lr=3e-3, patience=6, seed=1, history="full")
    model, hist = train(small_config(attention), tc, data, tmp_path, torch.device("cpu"), **QUIET)
    served = evaluate(model, test, history="full")
    assert served["hr@10"] > 0.75, served
    # Model selection used the whole histories: the best validation figure is the saved model's.
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["train_config"]["history"] == "full"
    best = hist.epochs[hist.best_epoch]["valid_ndcg@10"]
    assert evaluate(model, data.valid, history="full")["ndcg@10"] == pytest.approx(best, abs=1e-9)


def test_whole_histories_need_a_causal_attention(tmp_path: Path):
    data, _ = split(cycle_log(users=10, length=8))
    with pytest.raises(ValueError, match="causal attention"):
        train(small_config("linrec_bidir"), TrainConfig(epochs=1, history="full"), data, tmp_path,
              torch.device("cpu"), **QUIET)
    with pytest.raises(ValueError, match="history must be one of"):
        TrainConfig(history="all")


def test_resume_accepts_a_run_saved_before_the_history_setting_existed(tmp_path: Path):
    data, _ = split(cycle_log(users=20, length=8))
    cfg = small_config("linrec")
    train(cfg, TrainConfig(epochs=1, batch_size=8), data, tmp_path, torch.device("cpu"), **QUIET)
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    del ck["train_config"]["history"]  # as written by earlier versions
    torch.save(ck, tmp_path / "last.pt")
    _, hist = train(cfg, TrainConfig(epochs=2, batch_size=8), data, tmp_path, torch.device("cpu"),
                    resume=True, **QUIET)
    assert len(hist.epochs) == 2
    # Resuming a window run with whole histories changes how it trains: refused.
    with pytest.raises(ValueError, match="other training settings"):
        train(cfg, TrainConfig(epochs=3, batch_size=8, history="full"), data, tmp_path, torch.device("cpu"),
              resume=True, **QUIET)


def test_train_history_full_from_the_command_line(tmp_path: Path):
    from tests.conftest import run_cli

    log = write_cycle_csv(tmp_path / "log.csv", users=40, length=30, seed=3)
    small = ["--epochs", "1", "--hidden", "16", "--layers", "1", "--max-len", "8", "--inner", "32", "--no-progress"]
    out = tmp_path / "run"
    res = run_cli("train", "--data", str(log), "--out", str(out), "--history", "full", *small)
    assert res.returncode == 0, res.stderr
    assert "test (full ranking, whole histories)" in res.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_config"]["history"] == "full" and meta["model_config"]["attention"] == "linrec_decay"
    # The test figure train reports is the one `evaluate --history full` gives.
    ev = run_cli("evaluate", "--model", str(out), "--data", str(log), "--history", "full", "--json")
    assert json.loads(ev.stdout)["ndcg@10"] == pytest.approx(meta["test_full"]["ndcg@10"])
    bad = run_cli("train", "--data", str(log), "--out", str(tmp_path / "bidir"), "--history", "full",
                  "--attention", "linrec_bidir", *small)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("linrec-stream: error: ")
    assert "causal attention" in bad.stderr and "Traceback" not in bad.stderr

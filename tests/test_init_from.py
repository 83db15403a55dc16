"""``train --init-from``: a run that starts from another run's best model (its architecture, its
weights, its item ids), e.g. to fine-tune a window-trained model on whole histories."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from linrec_stream.model.run_dir import load_run
from linrec_stream.training.experiment import init_from_run, prepare
from linrec_stream.training.warm_start import ITEM_EMBEDDING
from tests.conftest import run_cli
from tests.helpers import write_cycle_csv

SMALL = ["--hidden", "16", "--layers", "1", "--heads", "2", "--max-len", "8", "--inner", "32", "--no-progress"]


def _quiet(_: str) -> None:
    pass


def _train(*args: str) -> None:
    res = run_cli("train", *args)
    assert res.returncode == 0, res.stderr


def test_warm_start_keeps_every_weight_and_item_id_and_adds_rows_for_new_items(tmp_path: Path):
    parent_log = write_cycle_csv(tmp_path / "a.csv", users=30, length=12, seed=1)
    _train("--data", str(parent_log), "--out", str(tmp_path / "parent"), "--epochs", "1", *SMALL)
    parent, parent_vocab = load_run(tmp_path / "parent")
    # A later log: more users, so items the parent never saw (the cycle has 200).
    child_log = write_cycle_csv(tmp_path / "b.csv", users=120, length=12, seed=2)
    prepared = prepare(str(child_log), tmp_path, log=_quiet, base_vocab=parent_vocab)
    vocab = prepared.split.data.vocab
    assert vocab[: len(parent_vocab)] == list(parent_vocab.items) and len(vocab) > len(parent_vocab)

    mc, init = init_from_run(tmp_path / "parent", parent, parent_vocab, prepared, seed=7, log=_quiet)
    assert mc.num_items == len(vocab) - 1
    assert {k: v for k, v in mc.to_dict().items() if k != "num_items"} == \
        {k: v for k, v in parent.config.to_dict().items() if k != "num_items"}
    for name, weight in parent.state_dict().items():
        got = init.weights[name]
        if name == ITEM_EMBEDDING:
            assert torch.equal(got[: weight.shape[0]], weight)
            assert got.shape[0] == len(vocab) and got[weight.shape[0]:].abs().sum() > 0
        else:
            assert torch.equal(got, weight), name
    assert init.source["version"] == parent.version


def test_init_from_on_the_command_line_starts_where_the_parent_ended(tmp_path: Path):
    log = write_cycle_csv(tmp_path / "log.csv", users=120, length=30, seed=3)
    parent = tmp_path / "parent"
    _train("--data", str(log), "--out", str(parent), "--epochs", "4", "--lr", "3e-3", *SMALL)
    parent_meta = json.loads((parent / "meta.json").read_text())
    parent_best = parent_meta["best_valid"]["ndcg@10"]

    # With a learning rate too small to move anything, epoch 1 validates the starting weights:
    # the parent's best, not a fresh model's.
    still = ["--epochs", "1", "--lr", "1e-9", "--no-progress"]
    _train("--data", str(log), "--out", str(tmp_path / "warm"), "--init-from", str(parent), *still)
    _train("--data", str(log), "--out", str(tmp_path / "fresh"), *still, *SMALL[:-1])
    warm = json.loads((tmp_path / "warm" / "meta.json").read_text())
    fresh = json.loads((tmp_path / "fresh" / "meta.json").read_text())
    assert parent_best > 0.2
    assert abs(warm["epochs"][0]["valid_ndcg@10"] - parent_best) < 1e-3
    assert fresh["epochs"][0]["valid_ndcg@10"] < parent_best / 2
    assert warm["init_from"] == {"dir": str(parent), "version": parent_meta["model_version"]}
    assert warm["model_config"] == parent_meta["model_config"]

    # Fine-tuning on whole histories from it; --dropout may change, the architecture may not.
    res = run_cli("train", "--data", str(log), "--out", str(tmp_path / "full"), "--init-from", str(parent),
                  "--history", "full", "--dropout", "0.1", "--epochs", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    full = json.loads((tmp_path / "full" / "meta.json").read_text())
    assert full["train_config"]["history"] == "full" and full["model_config"]["dropout"] == 0.1
    for bad, says in ((["--hidden", "32"], "--hidden 32: the model in --init-from"),
                      (["--attention", "softmax"], "--attention softmax: the model in --init-from")):
        res = run_cli("train", "--data", str(log), "--out", str(tmp_path / "bad"), "--init-from", str(parent),
                      *bad, "--epochs", "1")
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith(f"linrec-stream: error: {says}")
    res = run_cli("train", "--data", str(log), "--out", str(tmp_path / "bad"), "--init-from", str(tmp_path / "nope"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--init-from:" in res.stderr and "model.pt is missing" in res.stderr

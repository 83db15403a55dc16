"""Training and evaluation end to end on a synthetic log with a learnable pattern."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from linrec_stream.model import LinRecModel
from linrec_stream.training.evaluate import evaluate, popularity_baseline, popularity_counts
from linrec_stream.training.train import TrainConfig, train
from tests.helpers import CYCLE_ITEMS, cycle_log, small_config, split, write_cycle_csv

@pytest.mark.parametrize("attention", ["linrec", "linrec_decay", "softmax", "linrec_bidir"])
def test_training_learns_the_pattern_far_beyond_popularity(tmp_path: Path, attention: str):
    data, test = split(cycle_log())
    tc = TrainConfig(epochs=8, batch_size=32, lr=3e-3, patience=8, seed=1)
    model, hist = train(small_config(attention), tc, data, tmp_path, torch.device("cpu"),
                        progress=False, log=lambda m: None)
    got = evaluate(model, test)
    pop = popularity_baseline(test, popularity_counts(data.train_seqs, CYCLE_ITEMS))
    assert pop["hr@10"] < 0.15
    assert got["hr@10"] > 0.75, (got, pop)
    assert got["ndcg@10"] > 5 * pop["ndcg@10"]
    # The run directory has everything a user is promised.
    for name in ("model.pt", "vocab.json", "meta.json", "last.pt", "curves.png"):
        assert (tmp_path / name).exists(), name
    assert LinRecModel.load(tmp_path / "model.pt").version == model.version
    if attention == "linrec_decay":
        # The decay is learned: the half-lives moved from their initial 4 and 256 events.
        last = json.loads((tmp_path / "meta.json").read_text())["epochs"][-1]["decay_half_lives"]
        assert len(last) == 1 and len(last[0]) == 2
        assert all(abs(h / h0 - 1) > 0.01 for h, h0 in zip(last[0], [4.0, 256.0])), last


QUIET = dict(progress=False, log=lambda m: None)


def three_epochs_and_two(tmp_path: Path, attention: str):
    """An uninterrupted 3-epoch run in ``a`` and the same run stopped after 2 in ``c``; returns
    what resuming ``c`` needs and ``a``'s model to compare with."""
    data, _ = split(cycle_log(users=60, length=14))
    cfg = small_config(attention)
    tc3 = TrainConfig(epochs=3, batch_size=16, patience=10, seed=7)
    a, _ = train(cfg, tc3, data, tmp_path / "a", torch.device("cpu"), **QUIET)
    train(cfg, TrainConfig(epochs=2, batch_size=16, patience=10, seed=7), data, tmp_path / "c",
          torch.device("cpu"), **QUIET)
    return cfg, tc3, data, a


def test_same_seed_same_model_and_resume_equals_uninterrupted(tmp_path: Path):
    cfg, tc3, data, a = three_epochs_and_two(tmp_path, "linrec")
    b, _ = train(cfg, tc3, data, tmp_path / "b", torch.device("cpu"), **QUIET)
    assert a.version == b.version  # deterministic on CPU
    c, hist = train(cfg, tc3, data, tmp_path / "c", torch.device("cpu"), resume=True, **QUIET)
    assert len(hist.epochs) == 3
    last_a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    last_c = torch.load(tmp_path / "c" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(last_a[k], last_c[k]) for k in last_a)
    assert c.version == a.version


def test_resume_of_a_run_saved_with_one_optimiser_group_equals_uninterrupted(tmp_path: Path):
    # Earlier versions kept linrec_decay's rates in the one optimiser group with everything else.
    cfg, tc3, data, a = three_epochs_and_two(tmp_path, "linrec_decay")
    ck = torch.load(tmp_path / "c" / "last.pt", weights_only=False)
    names = list(ck["model"])
    rates = [i for i, n in enumerate(names) if n.endswith("log_decay_rate")]
    grouped = [i for i in range(len(names)) if i not in rates] + rates  # model index of each slot now
    opt = ck["optimizer"]
    assert [len(g["params"]) for g in opt["param_groups"]] == [len(names) - len(rates), len(rates)]
    ck["optimizer"] = {"state": {grouped[k]: v for k, v in opt["state"].items()},
                       "param_groups": [{**opt["param_groups"][0], "params": list(range(len(names)))}]}
    torch.save(ck, tmp_path / "c" / "last.pt")
    c, _ = train(cfg, tc3, data, tmp_path / "c", torch.device("cpu"), resume=True, **QUIET)
    assert c.version == a.version


def test_time_budget_stops_after_the_epoch_in_progress_and_resume_goes_on(tmp_path: Path):
    data, _ = split(cycle_log(users=20, length=8))
    logs: list[str] = []
    tiny = TrainConfig(epochs=5, batch_size=8, max_minutes=1e-6)
    _, hist = train(small_config("linrec"), tiny, data, tmp_path, torch.device("cpu"), progress=False, log=logs.append)
    assert len(hist.epochs) == 1  # at least one epoch per call, then the budget stops it
    assert any("time budget reached" in m for m in logs)
    # The budget may change on resume (like --epochs); without one it runs to the end.
    _, hist = train(small_config("linrec"), TrainConfig(epochs=5, batch_size=8), data, tmp_path,
                    torch.device("cpu"), resume=True, progress=False, log=logs.append)
    assert len(hist.epochs) == 5


def test_resume_refuses_other_settings(tmp_path: Path):
    data, _ = split(cycle_log(users=20, length=8))
    train(small_config("linrec"), TrainConfig(epochs=1, batch_size=8), data, tmp_path, torch.device("cpu"), **QUIET)
    with pytest.raises(ValueError, match="another model configuration"):
        train(small_config("softmax"), TrainConfig(epochs=2, batch_size=8), data, tmp_path,
              torch.device("cpu"), resume=True, **QUIET)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(small_config("linrec"), TrainConfig(epochs=2), data, tmp_path / "new", torch.device("cpu"),
              resume=True, **QUIET)


def test_train_and_evaluate_from_the_command_line(tmp_path: Path):
    import json

    from tests.conftest import run_cli

    log = write_cycle_csv(tmp_path / "log.csv", users=80, length=12, seed=3)
    out = tmp_path / "run"
    res = run_cli("train", "--data", str(log), "--out", str(out), "--epochs", "2", "--hidden", "16",
                  "--layers", "1", "--max-len", "8", "--inner", "32", "--batch-size", "32", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "epoch   2" in res.stderr and "test (full ranking)" in res.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["epochs"]) == 2 and meta["data"]["users"] == 80
    # A second train into the same directory without --resume is refused in one line.
    again = run_cli("train", "--data", str(log), "--out", str(out), "--epochs", "2")
    assert again.returncode == 2 and "pass --resume" in again.stderr
    ev = run_cli("evaluate", "--model", str(out), "--data", str(log), "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["users"] == 80 and result["protocol"] == "full"
    assert result["ndcg@10"] == pytest.approx(meta["test_full"]["ndcg@10"])  # same model, same users
    sampled = json.loads(run_cli("evaluate", "--model", str(out), "--data", str(log), "--json",
                                 "--protocol", "pop100").stdout)
    assert sampled["protocol"] == "pop100" and sampled["hr@10"] >= result["hr@10"]  # 101 candidates vs all

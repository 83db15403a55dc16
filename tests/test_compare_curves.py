"""scripts/compare_curves.py: runs grouped over seeds, mean ± sd at the asked epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script

SCRIPT = "scripts/compare_curves.py"


def _run(tmp: Path, name: str, curve: list[float]) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"epochs": [{"valid_ndcg@10": x} for x in curve]}))
    return d


def test_groups_seeds_and_reports_mean_and_spread(tmp_path, capsys):
    runs = [
        _run(tmp_path, "m-a-s1", [0.1, 0.2, 0.3]),
        _run(tmp_path, "m-a-s2", [0.1, 0.4]),
        _run(tmp_path, "m-b-s1", [0.05, 0.15, 0.25]),
    ]
    assert load_script(SCRIPT).main([*map(str, runs), "--epochs", "2,3", "--plot", str(tmp_path / "c.png")]) == 0
    rows = {line.split(" (")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    # m-a at epoch 2: 0.2 and 0.4 -> 0.3000 ± 0.1414; at epoch 3 only seed 1 ran that far.
    assert "| 0.3000 ± 0.1414 | 0.3000 | 0.3500 ± 0.0707 |" in rows["m-a"]
    assert "epochs 3/2" in rows["m-a"]
    assert "| 0.1500 | 0.2500 | 0.2500 |" in rows["m-b"]
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_missing_run_and_bad_epochs_are_one_line_errors(tmp_path, capsys):
    mod = load_script(SCRIPT)
    with pytest.raises(SystemExit, match="does not exist"):
        mod.main([str(tmp_path / "nope")])
    run = _run(tmp_path, "x-s1", [0.1])
    assert mod.main([str(run), "--epochs", "one"]) == 2
    assert "--epochs must be integers" in capsys.readouterr().err

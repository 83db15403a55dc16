"""The floor plan holds: layers import downward only (the contracts in pyproject.toml), there is
no import cycle among the project's modules, and a stream worker loads no training code.

These check the code as it is, so a new import that breaks a layer fails here, not in review."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

from tests.conftest import REPO

PACKAGES = ("linrec_stream", "consumers", "state")


def test_layer_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            # A package importing its own submodules (re-exports in __init__) is not a cycle.
            if imported.startswith(module + "."):
                continue
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.append(" -> ".join((module, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_a_running_worker_imports_no_training_code(tmp_path: Path):
    # What `linrec-stream worker --model DIR` loads: the CLI's worker command, the worker and its
    # collaborators, and a model read from a run directory. Nothing of training or data sets.
    script = f"""
import sys
import torch
from linrec_stream.cli import build_parser
from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.model.run_dir import save_run
import consumers.worker
from consumers.serving import ServingModel

save_run({str(tmp_path)!r}, LinRecModel(ModelConfig(num_items=5, hidden_size=8, num_heads=2, num_layers=1)),
         ["<pad>"] + ["i%d" % k for k in range(1, 6)])
args = build_parser().parse_args(["worker", "--model", {str(tmp_path)!r}])
ServingModel.load(args.model)
# (tqdm is not listed: `import torch` loads it by itself, through torch.hub.)
bad = sorted(m for m in sys.modules if m.startswith(("linrec_stream.training", "linrec_stream.data", "matplotlib")))
print(" ".join(bad))
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "", f"a worker imported: {res.stdout.strip()}"

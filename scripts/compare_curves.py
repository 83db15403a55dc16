#!/usr/bin/env python3
"""Validation curves of several training runs side by side, grouped over seeds.

Reads each run's ``meta.json`` (a run directory or the file itself, as ``train`` writes it) and
prints a Markdown table of validation NDCG@10 at the given epochs, mean ± sample standard
deviation over the runs of a group; with ``--plot`` also draws every group's mean curve (band:
min to max over its seeds). A group is the run's name with its ``-s<seed>`` suffix removed, so
``ml1m-softmax-paper-s42`` and ``ml1m-softmax-paper-s43`` form ``ml1m-softmax-paper``.

    python scripts/compare_curves.py results/ml1m-h200/*paper-s4?.json runs/*paper-cpu* \\
        --epochs 5,10,15,20 --plot curves.png

Comparing runs at equal epochs is fair between variants trained with the same settings; it is
not the final result (that is the test split at the best validation epoch, in meta.json).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METRIC = "valid_ndcg@10"


def load(path: Path) -> tuple[str, list[float]]:
    """(group name, validation NDCG@10 per epoch) of one run."""
    meta = path / "meta.json" if path.is_dir() else path
    if not meta.is_file():
        raise SystemExit(f"compare_curves: {meta} does not exist")
    name = meta.parent.name if meta.name == "meta.json" else meta.stem
    epochs = json.loads(meta.read_text()).get("epochs", [])
    return re.sub(r"-s\d+$", "", name), [e[METRIC] for e in epochs]


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories or meta.json files")
    ap.add_argument("--epochs", default="5,10,15,20", help="comma-separated epochs (1-based)")
    ap.add_argument("--plot", type=Path, help="write the curves to this PNG")
    args = ap.parse_args(argv)
    try:
        at = [int(e) for e in args.epochs.split(",")]
    except ValueError:
        print(f"compare_curves: --epochs must be integers separated by commas, got {args.epochs!r}", file=sys.stderr)
        return 2

    groups: dict[str, list[list[float]]] = defaultdict(list)
    for path in args.runs:
        name, curve = load(path)
        groups[name].append(curve)

    print(f"| run (seeds) | " + " | ".join(f"epoch {e}" for e in at) + " | best so far |")
    print("|---|" + "---|" * (len(at) + 1))
    for name, curves in groups.items():
        cells = [cell([c[e - 1] for c in curves if len(c) >= e]) for e in at]
        best = cell([max(c) for c in curves if c])
        epochs_run = "/".join(str(len(c)) for c in curves)
        print(f"| {name} ({len(curves)}; epochs {epochs_run}) | " + " | ".join(cells) + f" | {best} |")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for name, curves in groups.items():
            n = max(len(c) for c in curves)
            xs, mean, lo, hi = [], [], [], []
            for e in range(n):
                vals = [c[e] for c in curves if len(c) > e]
                xs.append(e + 1)
                mean.append(statistics.mean(vals))
                lo.append(min(vals))
                hi.append(max(vals))
            (line,) = ax.plot(xs, mean, label=f"{name} ({len(curves)})")
            if len(curves) > 1:
                ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation NDCG@10 (full ranking)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

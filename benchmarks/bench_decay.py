#!/usr/bin/env python3
"""What the decay of ``linrec_decay`` costs over plain ``linrec``, measured side by side.

(a) the one-event step (the worker's hot path) at batch 1 and 256;
(b) a training step (forward + backward, padded batch) at sequence lengths N, which exercises the
    masked form (N ≤ ops.MASKED_MAX_LEN) and the chunked form (above, where the decay adds a
    loop over the chunks).

Both variants are built with the same sizes and timed alternately in one process; the table gives
each time and the ratio decay / plain (1.00 = free).

    .venv/bin/python benchmarks/bench_decay.py
    .venv/bin/python benchmarks/bench_decay.py --device cuda --ns 200,1000
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import build, machine, measure, state_after, table  # noqa: E402

from linrec_stream.model import ModelConfig  # noqa: E402

VARIANTS = ("linrec", "linrec_decay")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,256", help="(a) users per step")
    ap.add_argument("--ns", default="50,200,800", help="(b) training sequence lengths")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--num-items", type=int, default=3706)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_decay: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    dev = args.device
    base = ModelConfig(num_items=args.num_items, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.heads, max_len=200, dropout=0.2)
    models = {v: build(replace(base, attention=v), dev) for v in VARIANTS}
    print(f"machine: {machine(dev)}")
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, {args.num_items} items\n")

    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        items = torch.randint(1, args.num_items + 1, (B,), device=dev)
        t = {}
        for v, m in models.items():
            s = state_after(m, B, 100)
            t[v] = measure(lambda: m.step(s, items), dev)
        rows.append([f"step, B={B}", f"{t['linrec'] * 1e3:.3f}", f"{t['linrec_decay'] * 1e3:.3f}",
                     f"{t['linrec_decay'] / t['linrec']:.2f}"])
        print("  " + " | ".join(rows[-1]), flush=True)

    for N in (int(n) for n in args.ns.split(",")):
        seq = torch.randint(1, args.num_items + 1, (args.train_batch, N), device=dev)
        seq[: args.train_batch // 2, : N // 3] = 0  # half the rows padded: the masked path
        t = {}
        for v, m in models.items():
            m.train()

            def train_step(m=m) -> None:
                m.zero_grad(set_to_none=True)
                m(seq).square().mean().backward()

            t[v] = measure(train_step, dev, min_runs=3, max_time=20.0)
        rows.append([f"train fwd+bwd, B={args.train_batch}, N={N}", f"{t['linrec'] * 1e3:.1f}",
                     f"{t['linrec_decay'] * 1e3:.1f}", f"{t['linrec_decay'] / t['linrec']:.2f}"])
        print("  " + " | ".join(rows[-1]), flush=True)

    print()
    print(table(["operation", "linrec ms", "linrec_decay ms", "decay / plain"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

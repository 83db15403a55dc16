"""Checks on an accelerator that the model's forms agree there as they do in the CPU tests.

For each streamable attention, a model of the paper's shape (hidden 128, 2 layers, 8 heads,
max length 200) in eval mode, float32 on DEVICE, on a left-padded batch of histories longer
than max_len (so the chunked form and the clamped positions are both exercised):

- ``forward`` in each parallel form (masked, chunked) against a float64 CPU copy of the model,
  the specification here;
- ``encode`` split in two (resuming from the returned state) against one call;
- the one-event ``step`` loop against ``forward`` (the serving form against the training form).

Prints one row per attention with the largest absolute differences (hidden states are O(1)
after the final layer norm) and exits 1 if any exceeds TOL. Usage:
    PYTHONPATH=. python benchmarks/gpu_parity.py [--device cuda] [--tol 2e-4]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.model.ops import OPS


def histories(B: int, T: int, num_items: int, seed: int = 0) -> torch.Tensor:
    """(B, T) int64 item ids, row b left-padded with 37 * b zeros."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items + 1, (B, T), generator=g)
    for b in range(B):
        seq[b, : min(37 * b, T - 1)] = 0
    return seq


def check(attention: str, device: str, B: int, T: int, split: int) -> dict[str, float]:
    cfg = ModelConfig(num_items=500, hidden_size=128, num_layers=2, num_heads=8, attention=attention,
                      max_len=200, dropout=0.2)
    torch.manual_seed(0)
    ref = LinRecModel(cfg).double().eval()  # the float64 CPU model: the specification
    seq = histories(B, T, cfg.num_items)
    with torch.no_grad():
        h_ref = ref(seq)  # (B, T, D)
        errors: dict[str, float] = {}
        for form in ("masked", "chunked"):
            model = LinRecModel(dataclasses.replace(cfg, parallel_form=form))
            model.load_state_dict(ref.state_dict())
            model = model.float().to(device).eval()
            h = model(seq.to(device)).double().cpu()
            errors[f"forward {form}"] = (h - h_ref).abs().max().item()
        # `model` (chunked) now serves the resume and step checks
        dev_seq = seq.to(device)
        h_full = model(dev_seq)
        h1, s1 = model.encode(dev_seq[:, :split])
        h2, _ = model.encode(dev_seq[:, split:], s1)
        errors["encode split"] = (torch.cat([h1, h2], 1) - h_full).abs().max().item()
        state = model.init_state(B)
        steps = []
        for t in range(T):
            h_t, state = model.step(state, dev_seq[:, t])
            steps.append(h_t)
        errors["step loop"] = (torch.stack(steps, 1) - h_full).abs().max().item()
    return errors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tol", type=float, default=2e-4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=300)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    # TF32 matmuls would make float32 on the GPU differ from the CPU by ~1e-3: keep full float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    names = [n for n, op in OPS.items() if op.streamable]
    cols = ["forward masked", "forward chunked", "encode split", "step loop"]
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
          f"torch {torch.__version__}, B={args.batch}, T={args.length}, tol {args.tol:g}")
    print("| attention | " + " | ".join(cols) + " | ok |")
    print("|---" * (len(cols) + 2) + "|")
    failed = False
    for name in names:
        err = check(name, args.device, args.batch, args.length, split=args.length // 3)
        ok = all(v <= args.tol for v in err.values())
        failed |= not ok
        print(f"| {name} | " + " | ".join(f"{err[c]:.1e}" for c in cols) + f" | {'yes' if ok else 'NO'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks of the LinRec model (issue 3).

(a) Cost per event of bringing a user up to date after a history of N events:
    the one-event step (linrec: a d×d state; softmax: a key/value cache of N events) against
    re-encoding the last N events with the parallel form (linrec, softmax). Batch 1 and 256.
(b) A training step (forward + backward) of softmax vs linrec: time and peak memory.
(c) A PNG plot of (a) and (b).
Also: the chunked-vs-masked crossover of the parallel linear form (``--parts crossover``) and the
parity loss of float16/bfloat16 state bytes (``--parts parity``).

    .venv/bin/python benchmarks/bench_model.py                      # everything, CPU
    .venv/bin/python benchmarks/bench_model.py --parts a --batches 1 --ns 50,200
    .venv/bin/python benchmarks/bench_model.py --device cuda

Peak memory of (b): on CUDA torch.cuda.max_memory_allocated; on the CPU the growth of the peak
resident set size (Linux VmHWM, reset through /proc/self/clear_refs) during one training step,
each configuration in its own process with glibc's MALLOC_MMAP_THRESHOLD_=65536 so that freed
tensors go back to the OS and the peak is the step's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linrec_stream.model import LinRecModel, ModelConfig, UserState  # noqa: E402
from linrec_stream.model.ops import OPS  # noqa: E402
from linrec_stream.model.ops.kernels import chunked_form, masked_form  # noqa: E402

HERE = Path(__file__).resolve().parent


# --- helpers -----------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object],
    device: str,
    *,
    warmup: Callable[[], object] | None = None,
    min_runs: int = 3,
    min_time: float = 0.5,
    max_time: float = 6.0,
) -> float:
    """Seconds per call of fn: the best of several runs (after one warm-up call of ``warmup``
    or fn itself). The best, not the median, because other processes share this machine's
    cores and only ever add time."""
    (warmup or fn)()
    sync(device)
    times: list[float] = []
    while len(times) < min_runs or sum(times) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) > max_time:
            break
    return min(times)


def build(cfg: ModelConfig, device: str, seed: int = 0) -> LinRecModel:
    torch.manual_seed(seed)
    return LinRecModel(cfg).to(device).eval()


def state_after(model: LinRecModel, B: int, N: int) -> UserState:
    """The state of B users after N events. Contents are random: the cost of a step does not
    depend on them, only on their sizes (and on N for the softmax cache)."""
    cfg, s = model.config, model.init_state(B)
    n = torch.full((B,), N, dtype=torch.int64, device=model.device)
    if s.k is not None:
        k = torch.randn(B, cfg.num_layers, cfg.num_heads, N, cfg.head_size, device=model.device)
        return replace(s, num_events=n, k=k, v=torch.randn_like(k), kv_mask=torch.ones(B, N, dtype=torch.bool, device=model.device))
    return replace(s, num_events=n, S=torch.randn_like(s.S) * 0.1, z=None if s.z is None else torch.rand_like(s.z) + 1)


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


# --- (a) bringing a user up to date ------------------------------------------------------------


TIMED_A = ("linrec_step", "softmax_step", "linrec_reencode", "softmax_reencode")


def part_a(args, cfg: ModelConfig) -> dict:
    """``args.passes`` passes over the grid; each cell keeps its best time over the passes."""
    best: dict[tuple[int, int], dict] = {}
    for p in range(args.passes):
        print(f" pass {p + 1}/{args.passes}", flush=True)
        for row in _part_a_pass(args, cfg):
            key = (row["B"], row["N"])
            if key in best:
                for k in TIMED_A:
                    best[key][k] = min(best[key][k], row[k])
            else:
                best[key] = row
    return {"rows": list(best.values()), "passes": args.passes}


def _part_a_pass(args, cfg: ModelConfig) -> list[dict]:
    dev = args.device
    lin = build(replace(cfg, attention="linrec"), dev)
    sm = build(replace(cfg, attention="softmax"), dev)
    results = []
    for B in args.batches:
        for N in args.ns:
            row = {"B": B, "N": N}
            items = torch.randint(1, cfg.num_items + 1, (B,), device=dev)
            with torch.inference_mode():
                s_lin = state_after(lin, B, N)
                row["linrec_step"] = measure(lambda: lin.step(s_lin, items), dev)
                s_sm = state_after(sm, B, N)
                row["softmax_step"] = measure(lambda: sm.step(s_sm, items), dev)
                del s_sm
                # Re-encoding B users × N events; above the token budget, a sub-batch is timed
                # and scaled by B / sub-batch (the cost per row is flat at these batch sizes).
                sub = max(1, min(B, args.reencode_tokens // N))
                seq = torch.randint(1, cfg.num_items + 1, (sub, N), device=dev)
                for name, model in (("linrec_reencode", lin), ("softmax_reencode", sm)):
                    t = measure(lambda: model(seq), dev, warmup=lambda: model(seq[:1]), min_runs=2, max_time=args.max_time)
                    row[name] = t * B / sub
                row["reencode_sub_batch"] = sub
            results.append(row)
            print(
                f"  B={B:4d} N={N:5d}  step linrec {row['linrec_step'] * 1e3:8.3f} ms  "
                f"step softmax {row['softmax_step'] * 1e3:8.3f} ms  re-encode linrec "
                f"{row['linrec_reencode'] * 1e3:9.1f} ms  softmax {row['softmax_reencode'] * 1e3:9.1f} ms"
                + ("" if sub == B else f"  (re-encode timed on {sub} rows)"),
                flush=True,
            )
    return results


def report_a(res: dict) -> str:
    headers = [
        "B", "N", "linrec step ev/s", "softmax KV step ev/s", "re-encode linrec ev/s", "re-encode softmax ev/s",
        "step vs re-enc. linrec", "step vs re-enc. softmax", "step vs softmax KV step",
    ]
    rows = []
    for r in res["rows"]:
        B = r["B"]
        star = "" if r["reencode_sub_batch"] == B else " *"
        rows.append([
            str(B), str(r["N"]),
            fmt_rate(B / r["linrec_step"]), fmt_rate(B / r["softmax_step"]),
            fmt_rate(B / r["linrec_reencode"]) + star, fmt_rate(B / r["softmax_reencode"]) + star,
            f"{r['linrec_reencode'] / r['linrec_step']:,.1f}×",
            f"{r['softmax_reencode'] / r['linrec_step']:,.1f}×",
            f"{r['softmax_step'] / r['linrec_step']:,.1f}×",
        ])
    note = (
        "\nev/s = users brought up to date per second (one new event each). Ratios: how many times"
        " faster the linrec one-event step is. * re-encode timed on a sub-batch and scaled to B rows."
        f" Best of {res['passes']} passes."
    )
    return table(headers, rows) + note


# --- (b) training step -------------------------------------------------------------------------


def train_child(variant: str, N: int, batch: int, padded: bool, device: str, cfg: ModelConfig, repeats: int) -> dict:
    """One configuration, in its own process: seconds per fwd+bwd and peak memory growth."""
    torch.manual_seed(0)
    model = LinRecModel(replace(cfg, attention=variant)).to(device).train()
    seq = torch.randint(1, cfg.num_items + 1, (batch, N + 1), device=device)
    if padded:  # a realistic batch: histories of different lengths, left-padded
        for b in range(batch):
            seq[b, : (b * N) // (2 * batch)] = 0
    inputs, target = seq[:, :-1], seq[:, -1]

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        h = model(inputs)[:, -1]  # RecBole SASRec: CE over all items at the last position
        torch.nn.functional.cross_entropy(model.score(h), target).backward()

    seconds = measure(train_step, device, min_runs=repeats, min_time=0.0, max_time=30.0)
    model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _proc_status("VmRSS")
        train_step()
        peak = _proc_status("VmHWM") - base
    return {"seconds": seconds, "peak_bytes": peak}


def _proc_status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


TRAIN_CASES = [("linrec", True), ("softmax", True), ("softmax", False)]


def part_b(args, cfg: ModelConfig) -> dict:
    """Each configuration in a fresh process, ``args.passes`` times; the best time and the
    smallest peak are kept (other processes on the machine only ever add to either)."""
    best: dict[tuple, dict] = {}
    for p in range(args.passes):
        print(f" pass {p + 1}/{args.passes}", flush=True)
        for r in _part_b_pass(args, cfg):
            key = (r["N"], r["variant"], r["padded"])
            if key in best:
                best[key]["seconds"] = min(best[key]["seconds"], r["seconds"])
                best[key]["peak_bytes"] = min(best[key]["peak_bytes"], r["peak_bytes"])
            else:
                best[key] = r
    return {"rows": list(best.values()), "batch": args.train_batch, "passes": args.passes}


def _part_b_pass(args, cfg: ModelConfig) -> list[dict]:
    rows = []
    for N in args.train_ns:
        for variant, padded in TRAIN_CASES:
            cmd = [
                sys.executable, __file__, "--_train-child", variant, str(N), str(args.train_batch),
                "1" if padded else "0", "--device", args.device, "--repeats", str(args.repeats),
                *args.model_args,
            ]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                raise SystemExit(f"training child failed: {variant} N={N}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(variant=variant, N=N, padded=padded)
            rows.append(r)
            print(
                f"  N={N:5d} {variant:8s} {'padded' if padded else 'no padding':10s} "
                f"{r['seconds'] * 1e3:9.1f} ms  peak +{r['peak_bytes'] / 2**20:8.1f} MiB",
                flush=True,
            )
    return rows


def _train_ratios(res: dict) -> list[dict]:
    by = {(r["N"], r["variant"], r["padded"]): r for r in res["rows"]}
    out = []
    for N in sorted({r["N"] for r in res["rows"]}):
        lin = by[(N, "linrec", True)]
        out.append({
            "N": N,
            "time": by[(N, "softmax", True)]["seconds"] / lin["seconds"],
            "mem": by[(N, "softmax", True)]["peak_bytes"] / lin["peak_bytes"],
            "time_flash": by[(N, "softmax", False)]["seconds"] / lin["seconds"],
            "mem_flash": by[(N, "softmax", False)]["peak_bytes"] / lin["peak_bytes"],
        })
    return out


def report_b(res: dict, device: str) -> str:
    rows = [
        [str(r["N"]), r["variant"], "left-padded" if r["padded"] else "none",
         f"{r['seconds'] * 1e3:,.1f}", f"{r['peak_bytes'] / 2**20:,.1f}"]
        for r in res["rows"]
    ]
    mem = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS growth"
    t1 = table(["N", "attention", "padding", "fwd+bwd ms", f"peak memory MiB ({mem})"], rows)
    ratio_rows = [
        [str(r["N"]), f"{r['time']:.2f}×", f"{r['mem']:.2f}×", f"{r['time_flash']:.2f}×", f"{r['mem_flash']:.2f}×"]
        for r in _train_ratios(res)
    ]
    t2 = table(
        ["N", "softmax/linrec time", "softmax/linrec memory", "softmax (no padding, is_causal)/linrec time", "… memory"],
        ratio_rows,
    )
    return f"batch {res['batch']}, best of {res['passes']} passes\n\n{t1}\n\n{t2}"


# --- chunked vs masked crossover ---------------------------------------------------------------


def part_crossover(args, cfg: ModelConfig) -> dict:
    dev, B, H, d = args.device, args.crossover_batch, cfg.num_heads, cfg.head_size
    rows = []
    for N in args.crossover_ns:
        q, k, v = (torch.randn(B, H, N, d, device=dev, requires_grad=True) for _ in range(3))

        def fwd_bwd(f):
            def run():
                o, _ = f(q, k, v)
                o.sum().backward()
            return run

        row = {"N": N, "masked": measure(fwd_bwd(masked_form), dev, min_runs=5, min_time=0.3)}
        for C in args.chunk_sizes:
            row[f"chunked{C}"] = measure(fwd_bwd(lambda a, b, c: chunked_form(a, b, c, chunk_size=C)), dev, min_runs=5, min_time=0.3)
        rows.append(row)
        print("  N=%5d " % N + "  ".join(f"{key} {val * 1e3:8.2f} ms" for key, val in row.items() if key != "N"), flush=True)
    return {"rows": rows, "B": B, "H": H, "d": d}


def report_crossover(res: dict) -> str:
    keys = [k for k in res["rows"][0] if k != "N"]
    rows = []
    for r in res["rows"]:
        best = min(keys, key=lambda k: r[k])
        rows.append([str(r["N"])] + [f"{r[k] * 1e3:,.2f}" + (" ←" if k == best else "") for k in keys])
    return f"fwd+bwd of the kernel, B={res['B']}, H={res['H']}, d={res['d']}, ms\n\n" + table(["N"] + keys, rows)


# --- float16 / bfloat16 state bytes ------------------------------------------------------------


def part_parity(args, cfg: ModelConfig) -> dict:
    dev, rows = args.device, []
    users, hist, more = args.parity_users, args.parity_history, args.parity_continue
    if args.parity_checkpoint:  # trained models: the loss depends on the weights
        models = [(str(p), LinRecModel.load(p, map_location=dev)) for p in args.parity_checkpoint]
    else:
        models = [
            ("random init", build(replace(cfg, attention=v), dev)) for v, op in OPS.items() if op.streamable
        ]
    for source, model in models:
        variant, cfg = model.config.attention, model.config
        g = torch.Generator().manual_seed(1)
        seq = torch.randint(1, cfg.num_items + 1, (users, hist), generator=g).to(dev)
        nxt = torch.randint(1, cfg.num_items + 1, (more, users), generator=g).to(dev)
        with torch.inference_mode():
            _, state = model.encode(seq)
            singles = [state[i] for i in range(users)]
            ref_h, ref_s = [], state
            for t in range(more):
                h, ref_s = model.step(ref_s, nxt[t])
                ref_h.append(h)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                blobs = [s.to_bytes(dtype) for s in singles]
                st = UserState.stack([model.load_state_bytes(b) for b in blobs])
                # the stored tensors' own rounding error (relative, over all users)
                stored = [t for t in (st.S, st.z, st.k, st.v) if t is not None]
                orig = [t for t in (state.S, state.z, state.k, state.v) if t is not None]
                state_err = max(((a - b).norm() / b.norm()).item() for a, b in zip(stored, orig))
                errs, top = [], []
                for t in range(more):
                    h, st = model.step(st, nxt[t])
                    errs.append(((h - ref_h[t]).norm(dim=-1) / ref_h[t].norm(dim=-1)).cpu())
                    a = model.score(h).topk(10).indices
                    b = model.score(ref_h[t]).topk(10).indices
                    top.append(torch.tensor([len(set(x.tolist()) & set(y.tolist())) / 10 for x, y in zip(a, b)]))
                e = torch.stack(errs)
                rows.append({
                    "model": source, "variant": variant, "dtype": str(dtype).replace("torch.", ""),
                    "state_rel": state_err,
                    "bytes": len(blobs[0]), "max_rel": e.max().item(), "mean_rel": e.mean().item(),
                    "top10": torch.stack(top).mean().item(),
                })
                print("  " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return {"rows": rows, "users": users, "history": hist, "continue": more}


def report_parity(res: dict) -> str:
    rows = [
        [r["model"], r["variant"], r["dtype"], f"{r['bytes']:,}", f"{r['state_rel']:.2e}", f"{r['max_rel']:.2e}",
         f"{r['mean_rel']:.2e}", f"{r['top10']:.4f}"]
        for r in res["rows"]
    ]
    return (
        f"{res['users']} users, state after {res['history']} events stored in the dtype, then "
        f"{res['continue']} more events stepped in float32; compared with the float32 state never stored.\n\n"
        + table(["model", "attention", "stored as", "bytes/user", "rel. err of the stored state",
                 "max rel. err of h", "mean rel. err of h", "top-10 overlap"], rows)
    )


# --- (c) plot ----------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "a" in results:
        panels += [("a", B) for B in sorted({r["B"] for r in results["a"]["rows"]})]
    if "b" in results:
        panels.append(("b", None))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (part, B) in zip(axes[0], panels):
        if part == "a":
            rows = [r for r in results["a"]["rows"] if r["B"] == B]
            Ns = [r["N"] for r in rows]
            for key, label, style in (
                ("linrec_step", "linrec one-event step", "o-"),
                ("softmax_step", "softmax step (KV cache)", "s--"),
                ("linrec_reencode", "re-encode N, linrec", "^-"),
                ("softmax_reencode", "re-encode N, softmax", "v--"),
            ):
                ax.plot(Ns, [B / r[key] for r in rows], style, label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("history length N (events)")
            ax.set_ylabel("users updated per second")
            ax.set_title(f"(a) one new event per user, batch {B}")
            ax.legend(fontsize=8)
        else:
            ratios = _train_ratios(results["b"])
            Ns = [r["N"] for r in ratios]
            ax.plot(Ns, [r["time"] for r in ratios], "o-", label="time, softmax / linrec")
            ax.plot(Ns, [r["mem"] for r in ratios], "s-", label="peak memory, softmax / linrec")
            ax.plot(Ns, [r["time_flash"] for r in ratios], "o:", label="time, softmax without padding / linrec")
            ax.plot(Ns, [r["mem_flash"] for r in ratios], "s:", label="memory, softmax without padding / linrec")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("ratio (>1: linrec cheaper)")
            ax.set_title(f"(b) training step, batch {results['b']['batch']}")
            ax.legend(fontsize=8)
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


# --- main --------------------------------------------------------------------------------------


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="crossover,a,b,parity", help="comma-separated: crossover, a, b, parity")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ns", type=ints, default=[50, 200, 1000, 5000], help="(a) history lengths")
    p.add_argument("--batches", type=ints, default=[1, 256], help="(a) batch sizes")
    p.add_argument("--reencode-tokens", type=int, default=64_000,
                   help="(a) largest B×N re-encoded at once; larger cases are timed on a sub-batch and scaled")
    p.add_argument("--max-time", type=float, default=6.0, help="seconds of repeated runs per measurement, at most")
    p.add_argument("--passes", type=int, default=2,
                   help="(a), (b): passes over the whole grid, best per cell (a shared machine only adds time)")
    p.add_argument("--train-ns", type=ints, default=[200, 1000, 4000], help="(b) sequence lengths")
    p.add_argument("--train-batch", type=int, default=4, help="(b) batch size")
    p.add_argument("--repeats", type=int, default=2, help="(b) timed runs per configuration (best)")
    p.add_argument("--crossover-ns", type=ints, default=[32, 64, 128, 192, 256, 512, 1024])
    p.add_argument("--crossover-batch", type=int, default=32)
    p.add_argument("--chunk-sizes", type=ints, default=[32, 64, 128])
    p.add_argument("--parity-users", type=int, default=64)
    p.add_argument("--parity-history", type=int, default=200)
    p.add_argument("--parity-continue", type=int, default=50)
    p.add_argument("--parity-checkpoint", type=Path, action="append",
                   help="trained model(s) saved by LinRecModel.save to measure instead of random inits")
    p.add_argument("--num-items", type=int, default=3706)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--plot", type=Path, default=HERE / "bench_model.png")
    p.add_argument("--json", type=Path, default=HERE / "bench_model.json")
    p.add_argument("--_train-child", nargs=4, metavar=("VARIANT", "N", "BATCH", "PADDED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model_args = [
        "--num-items", str(args.num_items), "--hidden", str(args.hidden), "--layers", str(args.layers),
        "--heads", str(args.heads), "--max-len", str(args.max_len),
    ]
    cfg = ModelConfig(
        num_items=args.num_items, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        max_len=args.max_len, dropout=0.2,
    )
    if args._train_child:
        variant, N, batch, padded = args._train_child
        r = train_child(variant, int(N), int(batch), padded == "1", args.device, cfg, args.repeats)
        print(json.dumps(r))
        return

    results: dict = {"machine": machine(args.device), "config": cfg.to_dict(), "argv": sys.argv}
    print(f"machine: {results['machine']}\nconfig: {cfg}\n")
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    sections = []
    for name, run, report in (
        ("crossover", part_crossover, report_crossover),
        ("a", part_a, report_a),
        ("b", part_b, lambda r: report_b(r, args.device)),
        ("parity", part_parity, report_parity),
    ):
        if name in parts:
            print(f"[{name}]", flush=True)
            results[name] = run(args, cfg)
            sections.append(f"### {name}\n\n{report(results[name])}\n")
    results["seconds"] = time.perf_counter() - t0
    print("\n" + "\n".join(sections))
    print(f"total {results['seconds']:.0f} s")
    args.json.write_text(json.dumps(results, indent=1))
    plot(results, args.plot)


if __name__ == "__main__":
    main()

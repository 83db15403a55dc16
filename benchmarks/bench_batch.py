"""The worker's micro-batch on a device: ``consumers.batch.apply_batch`` against the model-only
ceiling, no Kafka and no RocksDB, in one run.

``--users`` users (default 4,096) each get ``--history`` (200) random past items, encoded on
``--device`` (cpu or cuda) from the empty state; their user records are built in memory with
the state bytes ``apply_batch`` writes (``to_bytes_each`` in the serving model's state dtype)
and the last ``--window`` (200) ids as the window. Model: linrec_decay, hidden 64, 2 layers,
2 heads, ``--items`` items (1,682 as ML-100K; 3,706 for ML-1M), random weights (seed 0), as
benchmarks/bench_stream.py. Then, each case for ``--seconds``, batches of ``--batch`` (512)
distinct users, one new event each, top 10:

1. model-only ceiling: the states already decoded and stacked on the device, one new event per
   user (``model.step`` and ``model.encode`` both timed; the faster counts), ``score``, the
   window masked (one scatter of a prepared id tensor), top 10; ``torch.cuda.synchronize()``
   after every batch on CUDA (a worker needs each batch's top-k before the next).
2. ``apply_batch`` per ``--state-dtype`` (float32 float16): stored records in (state bytes,
   windows), new records and recommendations out: each batch's states read and moved to the
   device in one transfer, scoring and top-k on the device, the new states copied back once.
   Each batch's new records replace the stored ones, as the worker's store does. Only the
   ``apply_batch`` call is timed (the events are built before it).

Printed: the machine line, a table (case, device, dtype, users/s, ms per batch, ratio to the
ceiling, and apply_batch's own stage times ``BatchResult.timings``, mean ms per batch; on CUDA
a stage's kernels may finish in the next stage that waits for them); ``--json PATH`` the rows.

    .venv/bin/python benchmarks/bench_batch.py                         # CPU, ~40 s (prefill ~15 s)
    .venv/bin/python benchmarks/bench_batch.py --device cuda --items 3706 --json results/bench_batch.json
"""

# No `from __future__ import annotations`: the tests load this script with tests.conftest.load_script,
# outside sys.modules, where dataclasses cannot resolve string annotations.
import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from consumers.batch import apply_batch  # noqa: E402
from consumers.serving import STORAGE_DTYPES, ServingModel  # noqa: E402
from linrec_stream.contracts.events import Interaction, Source  # noqa: E402
from linrec_stream.model import UserState  # noqa: E402
from linrec_stream.model.run_dir import load_run  # noqa: E402
from state.record import MAX_PARTITION, UserRecord  # noqa: E402
from _common import make_model  # noqa: E402  (benchmarks/_common.py)

TOP_K = 10
TOPIC = "bench-batch"
STAGES = ("load", "update", "score", "pack")  # BatchResult.timings
FORMS = ("step", "encode")
WARM_BATCHES = 2  # untimed batches before each case


@dataclass
class Row:
    case: str
    device: str
    dtype: str  # the stored states' dtype ("-" for the ceiling: states already in the model's)
    users: int  # users served in the timed batches
    batches: int
    users_per_s: float
    ms_per_batch: float
    x_ceiling: float = math.nan
    stage_ms: dict[str, float] = field(default_factory=dict)  # mean ms per batch


@dataclass(frozen=True)
class Population:
    """The prefilled users: names, their past item ids (oldest first) and their states after
    them, in chunks of at most one batch, on the device, in the model's dtype."""

    names: list[str]
    histories: list[list[int]]
    states: list[UserState]
    chunk: int

    def records(self, serving: ServingModel, window: int) -> dict[str, UserRecord]:
        """Each user's record as the worker stores it: state bytes in ``serving.state_dtype``
        (one copy to the host per chunk, as apply_batch writes them), the last ``window`` ids.
        No partition yet, so no new event counts as applied."""
        out: dict[str, UserRecord] = {}
        for c, state in enumerate(self.states):
            blobs = state.to("cpu").to_bytes_each(serving.state_dtype)
            for j, blob in enumerate(blobs):
                i = c * self.chunk + j
                out[self.names[i]] = UserRecord(
                    self.names[i], blob, serving.version, tuple(self.histories[i][-window:]),
                    len(self.histories[i]), MAX_PARTITION, 0, None, 1e9, *serving.vocab_tag)
        return out


@dataclass(frozen=True)
class CeilingBatch:
    """One batch of the model-only case, everything on the device beforehand."""

    rows: list[int]  # population indices of its users
    state: UserState  # (B,) stacked
    new: torch.Tensor  # (B,) the new item of each user
    seen: torch.Tensor  # (B, W) the window after the new item: ids excluded from the top-k


@torch.inference_mode()
def prefill(serving: ServingModel, users: int, history: int, chunk: int, seed: int = 3) -> Population:
    """``users`` users with ``history`` random past items each, encoded from the empty state on
    the model's device, ``chunk`` users at a time."""
    rng = random.Random(seed)
    n_items = serving.model.config.num_items
    names = [f"u{i}" for i in range(users)]
    hist = [[rng.randrange(1, n_items + 1) for _ in range(history)] for _ in names]
    states = []
    for start in range(0, users, chunk):
        ids = torch.tensor(hist[start:start + chunk], device=serving.model.device)
        states.append(serving.model.encode(ids)[1])
    return Population(names, hist, states, chunk)


def batch_rows(users: int, batch: int, i: int, perm: list[int]) -> list[int]:
    """Population indices of batch ``i``: the next ``batch`` of a fixed permutation, cyclically
    (so distinct within a batch as long as batch <= users)."""
    return [perm[(i * batch + j) % users] for j in range(batch)]


def events_for(serving: ServingModel, pop: Population, rows: list[int], items: list[int],
               offset: int) -> list[Interaction]:
    """One interaction per user of ``rows`` (model item ids ``items``), at consecutive offsets
    of partition 0 from ``offset``."""
    names = serving.vocab.items
    return [Interaction(pop.names[r], names[it], 1e9 + offset + j, None, Source(TOPIC, 0, offset + j, -1))
            for j, (r, it) in enumerate(zip(rows, items))]


def ceiling_batch(serving: ServingModel, pop: Population, rows: list[int], items: list[int],
                  window: int) -> CeilingBatch:
    """The users ``rows`` with their new ``items`` as the model-only case sees them."""
    dev = serving.model.device
    by_chunk = [pop.states[r // pop.chunk][r % pop.chunk] for r in rows]
    seen = torch.tensor([(*pop.histories[r], it)[-window:] for r, it in zip(rows, items)], device=dev)
    return CeilingBatch(rows, UserState.stack(by_chunk), torch.tensor(items, device=dev), seen)


@torch.inference_mode()
def model_only(serving: ServingModel, b: CeilingBatch, form: str,
               top_k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """The ceiling's computation for one batch: (scores, item ids) of each user's top-k."""
    model = serving.model
    if form == "step":
        h, _ = model.step(b.state, b.new)
    else:
        h, _ = model.encode(b.new[:, None], b.state)
        h = h[:, -1]
    scores = model.score(h).float()
    scores.scatter_(1, b.seen, float("-inf"))
    return scores.topk(min(top_k, model.config.num_items), dim=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ceiling(serving: ServingModel, batches: list[CeilingBatch], seconds: float) -> dict:
    """Users/s of ``model_only`` over ``batches`` (cycled), the faster of the two forms."""
    dev = serving.model.device
    best: dict = {}
    for form in FORMS:
        for b in batches[:WARM_BATCHES]:
            model_only(serving, b, form)  # warm-up
        _sync(dev)
        done = n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            b = batches[n % len(batches)]
            model_only(serving, b, form)
            _sync(dev)
            done, n = done + len(b.rows), n + 1
        elapsed = time.perf_counter() - t0
        if done / elapsed > best.get("users_per_s", 0.0):
            best = {"users_per_s": done / elapsed, "users": done, "batches": n, "s": elapsed, "form": form}
    return best


def time_apply(serving: ServingModel, pop: Population, window: int, batch: int, seconds: float, seed: int) -> dict:
    """Users/s of ``apply_batch`` over the population's stored records, ``batch`` distinct users
    a batch, each batch's records written back; stage seconds summed over the timed batches."""
    records = pop.records(serving, window)
    users = len(pop.names)
    rng = random.Random(seed)
    perm = list(range(users))
    rng.shuffle(perm)
    n_items = serving.model.config.num_items
    stages = dict.fromkeys(STAGES, 0.0)
    done = n = offset = i = 0
    spent = 0.0
    while spent < seconds or n < 2:
        rows = batch_rows(users, batch, i, perm)
        events = events_for(serving, pop, rows, [rng.randrange(1, n_items + 1) for _ in rows], offset)
        offset, i = offset + len(events), i + 1
        stored = {e.user: records[e.user] for e in events}
        t0 = time.perf_counter()
        result = apply_batch(serving, stored, events, TOP_K, window)
        took = time.perf_counter() - t0
        if len(result.recommendations) != len(rows):
            raise RuntimeError(f"{len(result.recommendations)} recommendations for {len(rows)} distinct users")
        records.update((r.user, r) for r in result.records)
        if i <= WARM_BATCHES:  # allocations, CUDA kernels loading: not timed
            continue
        spent, done, n = spent + took, done + len(rows), n + 1
        for k in STAGES:
            stages[k] += result.timings.get(k, 0.0)
    return {"users_per_s": done / spent, "users": done, "batches": n, "s": spent,
            "stage_ms": {k: v * 1000 / n for k, v in stages.items()}}


def machine_line(device: torch.device, threads: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return (f"{name} ({device.type}), {os.cpu_count()} CPUs, {threads} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def table(rows: list[Row]) -> str:
    head = (f"{'case':<26} {'device':<6} {'dtype':<8} {'users/s':>10} {'ms/batch':>9} {'x ceil':>7} "
            + " ".join(f"{k + ' ms':>9}" for k in STAGES))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.case:<26} {r.device:<6} {r.dtype:<8} {r.users_per_s:>10,.0f} {r.ms_per_batch:>9.2f} "
                     f"{_fmt(r.x_ceiling, '.2f'):>7} "
                     + " ".join(f"{_fmt(r.stage_ms.get(k, math.nan), '.2f'):>9}" for k in STAGES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--users", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=512, help="distinct users per micro-batch")
    ap.add_argument("--history", type=int, default=200, help="past items per user")
    ap.add_argument("--window", type=int, default=200, help="recent item ids kept per user and masked")
    ap.add_argument("--items", type=int, default=1682, help="model items (1682: ML-100K, 3706: ML-1M)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case (and per ceiling form)")
    ap.add_argument("--state-dtype", nargs="+", default=["float32", "float16"], choices=list(STORAGE_DTYPES),
                    help="stored state dtypes, one apply_batch case each")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the worker's default: 1)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not 0 < args.batch <= args.users:
        ap.error(f"--batch must be in 1 .. --users ({args.users}): a batch holds distinct users")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/" + Path(__file__).name,
                                                 *(sys.argv[1:] if argv is None else argv)])
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_batch-") as tmp:
            model, vocab = load_run(make_model("linrec_decay", Path(tmp), args.items), device)
        servings = {dt: ServingModel.of(model, vocab, state_dtype=dt) for dt in args.state_dtype}
        serving = next(iter(servings.values()))
        t0 = time.perf_counter()
        pop = prefill(serving, args.users, args.history, args.batch)
        print(f"prefilled {args.users:,} users x {args.history} items on {device} in {time.perf_counter() - t0:.1f}s",
              flush=True)

        rng = random.Random(5)
        perm = list(range(args.users))
        rng.shuffle(perm)
        ceil_batches = []
        for i in range(max(1, min(args.users // args.batch, 8))):
            rows = batch_rows(args.users, args.batch, i, perm)
            ceil_batches.append(ceiling_batch(serving, pop, rows, [rng.randrange(1, args.items + 1) for _ in rows],
                                              args.window))
        ceil = time_ceiling(serving, ceil_batches, args.seconds)
        out = [Row(f"model-only ceiling ({ceil['form']})", device.type, "-", ceil["users"], ceil["batches"],
                   ceil["users_per_s"], ceil["s"] * 1000 / ceil["batches"], 1.0)]
        print(f"model-only ceiling: {ceil['users_per_s']:,.0f} users/s ({ceil['form']})", flush=True)
        for dt, sv in servings.items():
            r = time_apply(sv, pop, args.window, args.batch, args.seconds, seed=11)
            out.append(Row("apply_batch", device.type, dt, r["users"], r["batches"], r["users_per_s"],
                           r["s"] * 1000 / r["batches"], r["users_per_s"] / ceil["users_per_s"], r["stage_ms"]))
            print(f"apply_batch, {dt} states: {r['users_per_s']:,.0f} users/s", flush=True)
    finally:
        torch.set_num_threads(threads)

    print(f"\nmachine: {machine_line(device, args.threads)}")
    print(f"command: {command}")
    print(f"{args.users:,} users x {args.history} past items, window {args.window}; linrec_decay hidden 64, "
          f"2 layers, 2 heads, {args.items} items; {args.batch} distinct users a batch, one new event each; top {TOP_K}")
    print(table(out))
    print("x ceil: users/s over the model-only ceiling's; stage ms: apply_batch's BatchResult.timings, mean per batch")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": machine_line(device, args.threads), "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": [asdict(r) for r in out]}, indent=1))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()

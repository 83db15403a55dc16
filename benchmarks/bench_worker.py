"""End-to-end stream worker benchmark through the local broker (one worker, in process).

Sustained throughput on a backlog at batch sizes 1, 64 and 512, and end-to-end latency at a
fixed offered load, for the LinRec worker (state updates, O(d²) per event) and, side by side,
a baseline worker that re-encodes each touched user's last 200 events with softmax SASRec on
every micro-batch. Also where the time goes (mean ms per micro-batch, by stage).

    .venv/bin/python benchmarks/bench_worker.py [--users 3000] [--events 6000] [--rate 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

from consumers.batch import apply_batch
from consumers.worker import StreamWorker, WorkerOptions
from linrec_stream.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (benchmarks/_common.py, shared with bench_stream.py)
from _common import fresh_settings  # noqa: E402
from reencode import reencode_batch  # noqa: E402  (benchmarks/reencode.py, the stateless baseline)

NUM_ITEMS = 3706
STAGES = ("poll", "parse", "state_read", "load", "update", "score", "pack", "produce", "state_write")


def make_model(attention: str, root: Path) -> Path:
    return _common.make_model(attention, root, NUM_ITEMS)


def produce(s: Settings, n: int, users: int, rate: float | None, seed: int, history: dict) -> None:
    rng = random.Random(seed)
    events = ((f"u{rng.randrange(users)}", f"i{rng.randrange(1, NUM_ITEMS + 1)}") for _ in range(n))
    _common.produce(s, events, rate)


def prefill(state_dir: Path, model_dir: Path, users: int, history: int) -> None:
    _common.prefill(state_dir, model_dir, users, history, NUM_ITEMS)


def run_case(base: Settings, model_dir: Path, apply, batch: int, n: int, users: int, rate: float | None,
             history: int, state_root: Path) -> dict:
    s = fresh_settings(base)
    hist: dict = {}
    warm = 0
    state_dir = state_root / uuid.uuid4().hex
    prefill(state_dir, model_dir, users, history)
    if rate is None:
        produce(s, n, users, None, 2, hist)
    worker = StreamWorker(s, WorkerOptions(model_dir, state_dir, batch, 20, "cpu", apply))
    stop = threading.Event()
    th = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    th.start()
    m = worker.metrics
    if warm:
        while m.totals["events"] < warm:
            time.sleep(0.05)
        m._recent_latency.clear()
    base_sums = _stage_sums(m)
    n_batches0 = m.totals["batches"]
    target = warm + n
    if rate is not None:
        while not worker.consumer.assigned():
            time.sleep(0.05)
        producer = threading.Thread(target=produce, args=(s, n, users, rate, 2, hist))
        producer.start()
    while m.totals["events"] < target:
        time.sleep(0.01)
    if rate is not None:
        producer.join()
    stop.set()
    th.join(timeout=30)
    p50, p99 = m.latency_quantiles()
    sums = _stage_sums(m)
    nb = max(1, m.totals["batches"] - n_batches0)
    # Busy time (every stage of every batch, polling included): with a backlog the worker is
    # never idle, so this is its wall time without the start-up and group join.
    busy = sum(sums[k] - base_sums[k] for k in STAGES)
    return {"events/s": n / busy if busy else float("nan"), "p50_ms": p50 * 1000, "p99_ms": p99 * 1000,
            "batches": nb, **{f"{k}_ms": (sums[k] - base_sums[k]) * 1000 / nb for k in STAGES}}


def _stage_sums(m) -> dict:
    return {k: m.stage_seconds.get(k, 0.0) for k in STAGES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--events", type=int, default=6000)
    ap.add_argument("--history", type=int, default=200, help="past events per user before measuring")
    ap.add_argument("--rate", type=float, default=200.0, help="offered load for the latency case, events/s")
    ap.add_argument("--batch1-events", type=int, default=1000)
    args = ap.parse_args()
    base = Settings.load()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lin, soft = make_model("linrec", root), make_model("softmax", root)
        cases = [("linrec step", lin, apply_batch), ("softmax re-encode 200", soft, reencode_batch)]
        for batch in (1, 64, 512):
            for name, md, fn in cases:
                n = args.batch1_events if batch == 1 else args.events
                r = run_case(base, md, fn, batch, n, args.users, None, args.history, root)
                rows.append((name, f"backlog, batch {batch}", n, r))
                print(f"{name:<22} backlog batch {batch:>3}: {r['events/s']:8.0f} events/s", flush=True)
        for name, md, fn in cases:
            r = run_case(base, md, fn, 512, int(args.rate * 20), args.users, args.rate, args.history, root)
            rows.append((name, f"{args.rate:.0f} ev/s offered, batch<=512", int(args.rate * 20), r))
            print(f"{name:<22} at {args.rate:.0f} ev/s: p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms", flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU; "
          f"{args.users} users with {args.history} past events each; model hidden 64, 2 layers, "
          f"2 heads, {NUM_ITEMS} items")
    print(f"{'worker':<22} {'case':<32} {'events':>6} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for name, case, n, r in rows:
        print(f"{name:<22} {case:<32} {n:>6} {r['events/s']:>9.0f} {r['p50_ms']:>7.0f} {r['p99_ms']:>7.0f}")
    print("\nratio (linrec step / softmax re-encode), events/s:")
    for i in range(0, 6, 2):
        print(f"  {rows[i][1]:<20} {rows[i][3]['events/s'] / rows[i + 1][3]['events/s']:.1f}x")
    print("\nwhere the time goes, mean ms per micro-batch:")
    print(f"{'worker':<22} {'case':<20} " + " ".join(f"{k:>11}" for k in STAGES))
    for name, case, n, r in rows:
        print(f"{name:<22} {case[:20]:<20} " + " ".join(f"{r[k + '_ms']:>11.2f}" for k in STAGES))


if __name__ == "__main__":
    main()

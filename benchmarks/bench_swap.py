"""Benchmark of a model hot swap (issue 6).

(a) Where to rebuild, measured side by side without Kafka: a micro-batch of events for users
    whose states are current, the same batch when every state is stale (rebuilt from its window
    on the event, as ``apply_batch`` does), and the background sweep's ``rebuild_batch``.
(b) End to end on the real broker: N users with stored states under version A, a running worker
    (`linrec-stream worker`, registry mode), then `models promote B`; the time from the
    announcement to every stored state rebuilt under B, as the worker logs it.

    .venv/bin/python benchmarks/bench_swap.py                  # both parts
    .venv/bin/python benchmarks/bench_swap.py --parts a --windows 50,200
    .venv/bin/python benchmarks/bench_swap.py --parts b --users 6040,50000

Part (b) needs the local broker (`linrec-stream kafka start`); it uses private topics.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumers.batch import apply_batch, rebuild_batch  # noqa: E402
from consumers.serving import ServingModel  # noqa: E402
from linrec_stream.contracts.events import Interaction, Source, encode_event  # noqa: E402
from linrec_stream.model import LinRecModel, ModelConfig  # noqa: E402
from state.record import UserRecord  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def model(seed: int, num_items: int) -> LinRecModel:
    torch.manual_seed(seed)
    return LinRecModel(ModelConfig(num_items=num_items, hidden_size=64, num_layers=2, num_heads=2,
                                   attention="linrec", max_len=200, dropout=0.0)).eval()


def best_of(fn, runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def part_a(args) -> list[str]:
    torch.set_num_threads(1)  # as the worker runs
    vocab = ["<pad>"] + [f"item-{i}" for i in range(1, args.num_items + 1)]
    old, new = (ServingModel.of(model(s, args.num_items), vocab) for s in (0, 1))
    rng = random.Random(0)
    rows = ["| window W | batch | events, states current | events, states stale (rebuilt on the event) | "
            "ratio | sweep `rebuild_batch` |", "|---|---|---|---|---|---|"]
    B = args.batch
    for W in args.windows:
        users = [f"u{k}" for k in range(B)]
        windows = {u: tuple(f"item-{rng.randrange(1, args.num_items + 1)}" for _ in range(W)) for u in users}

        def records(serving: ServingModel) -> dict[str, UserRecord]:
            ids = torch.tensor([serving.ids(windows[u]) for u in users])
            _, st = serving.model.encode(ids)
            return {u: UserRecord(u, st[i].to_bytes(), serving.version, ids[i].tolist(), W, 0, 10 * W, None, 1e9,
                                  *serving.vocab_tag)
                    for i, u in enumerate(users)}

        with torch.inference_mode():
            current, stale = records(new), records(old)
        events = [Interaction(u, f"item-{rng.randrange(1, args.num_items + 1)}", 1e9 + 1, None,
                              Source("in", 0, 10 * W + 1 + i, 0)) for i, u in enumerate(users)]
        t_cur = best_of(lambda: apply_batch(new, current, events, 10, 200))
        t_stale = best_of(lambda: apply_batch(new, stale, events, 10, 200))
        t_sweep = best_of(lambda: rebuild_batch(new, list(stale.values()), 10, "in"))
        rows.append(f"| {W} | {B} | {t_cur * 1000:.1f} ms ({B / t_cur:,.0f} users/s) | "
                    f"{t_stale * 1000:.1f} ms ({B / t_stale:,.0f} users/s) | {t_stale / t_cur:.1f}x | "
                    f"{t_sweep * 1000:.1f} ms ({B / t_sweep:,.0f} states/s) |")
        print(rows[-1], flush=True)
    return rows


def part_b(args) -> list[str]:
    from linrec_stream.broker.topics import create_topics, private_env
    from linrec_stream.clients.connection import KafkaConnection
    from linrec_stream.lifecycle.registry import ModelRegistry
    from linrec_stream.settings import Settings

    rows = ["| users | events stored | states rebuilt | announcement -> all rebuilt | rebuild only | states/s |",
            "|---|---|---|---|---|---|"]
    for n_users in args.users:
        tmp = Path(tempfile.mkdtemp(prefix="bench-swap-"))
        tag = uuid.uuid4().hex[:8]
        env = {**private_env("b", tag), "LINREC_METRICS_PORT": "0", "LINREC_REGISTRY_DIR": str(tmp / "models"),
               "LINREC_SUMMARY_EVERY_S": "2"}
        settings = Settings.load(env={**os.environ, **env})
        create_topics(settings)
        vocab = ["<pad>"] + [f"item-{i}" for i in range(1, args.num_items + 1)]
        reg = ModelRegistry(tmp / "models")
        versions = []
        for name, seed in (("a", 0), ("b", 1)):
            m = model(seed, args.num_items)
            (tmp / name).mkdir()
            m.save(tmp / name / "model.pt")
            (tmp / name / "vocab.json").write_text(json.dumps({"items": vocab}))
            reg.add(tmp / name)
            versions.append(m.version)
        reg.promote(versions[0])
        rng = random.Random(n_users)
        producer = KafkaConnection.from_settings(settings).producer(linger_ms=20, batch_size=1 << 20)
        events = n_users * args.events_per_user
        for i in range(events):
            u = f"user-{i % n_users}"
            key, value = encode_event(u, f"item-{rng.randrange(1, args.num_items + 1)}", 1e9 + i)
            producer.send(settings.topic_interactions, key=key, value=value)
        producer.flush()
        producer.close()
        log = tmp / "worker.log"
        cmd = [sys.executable, "-m", "linrec_stream.cli", "worker", "--state-dir", str(tmp / "state"),
               "--device", "cpu", "--swap-batch", str(args.swap_batch)]
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=REPO, stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT)
        try:
            _wait_log(log, rf"totals: {events:,} events", 900)  # every event applied under A
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "linrec_stream.cli", "models", "promote", versions[1]],
                           env={**os.environ, **env}, cwd=REPO, check=True, capture_output=True)
            m = _wait_log(log, r"complete: (\d+) states rebuilt in ([\d.]+)s \(([\d.]+)s after the announcement\)",
                          900)
        finally:
            proc.terminate()
            proc.wait()
        rebuilt, only, since = int(m.group(1)), float(m.group(2)), float(m.group(3))
        rows.append(f"| {n_users:,} | {events:,} | {rebuilt:,} | {since:.2f} s | {only:.2f} s | "
                    f"{rebuilt / only:,.0f} |")
        print(rows[-1], f"(`models promote` started -> completion seen in the log: {time.time() - t0:.1f}s)", flush=True)
    return rows


def _wait_log(path: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text()) if path.exists() else None
        if m:
            return m
        time.sleep(0.2)
    raise SystemExit(f"{pattern!r} not seen in {path} within {timeout:.0f}s:\n{path.read_text()[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="a,b")
    p.add_argument("--num-items", type=int, default=3706)
    p.add_argument("--windows", type=lambda s: [int(x) for x in s.split(",")], default=[50, 200])
    p.add_argument("--batch", type=int, default=256, help="(a) users per batch")
    p.add_argument("--users", type=lambda s: [int(x) for x in s.split(",")], default=[6040, 50000])
    p.add_argument("--events-per-user", type=int, default=20, help="(b) window length of each user")
    p.add_argument("--swap-batch", type=int, default=512, help="(b) the worker's --swap-batch")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    out = []
    if "a" in args.parts:
        out += part_a(args) + [""]
    if "b" in args.parts:
        out += part_b(args)
    print("\n".join(out))


if __name__ == "__main__":
    main()

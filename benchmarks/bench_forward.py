"""What forwarding costs (issue 21): a backlog from producers that partition by murmur2 (Java,
kafka-python: every event on its user's home partition) beside the same backlog partitioned by
CRC32 of the key (librdkafka's default, ``consistent_random``: most events elsewhere, forwarded
home by the worker and applied when they come back).

Both cases run one after the other in one call, on fresh topics, an empty state store and the
same events (many distinct users), through ``bench_stream.run_worker_case``: one in-process
worker, timed from its first applied batch to the last event applied. Prints a table.

    .venv/bin/python benchmarks/bench_forward.py [--users 6000 --events 24000 --rounds 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import LINREC, NUM_ITEMS, distinct_events, machine_line, run_worker_case  # noqa: E402

from consumers.batch import apply_batch  # noqa: E402
from linrec_stream.clients.connection import KafkaConnection  # noqa: E402
from linrec_stream.contracts.events import encode_event  # noqa: E402
from linrec_stream.contracts.topics import home_partition  # noqa: E402
from linrec_stream.settings import Settings  # noqa: E402
from _common import make_model  # noqa: E402


def crc32_partition(key: bytes, partitions: int) -> int:
    """librdkafka's default partitioner for a keyed message (``consistent_random``)."""
    return zlib.crc32(key) % partitions


def producer_of(events: list[tuple[str, str]],
                partitioner: Callable[[bytes, int], int] | None) -> Callable[[Settings], int]:
    """A ``replay_fn`` for run_worker_case: sends ``events`` to the partitions ``partitioner``
    (None: the client's own, murmur2) chooses; returns how many it sent."""
    def send(s: Settings) -> int:
        p = KafkaConnection.from_settings(s).producer(linger_ms=20)
        parts = s.interactions_partitions
        for i, (user, item) in enumerate(events):
            key, value = encode_event(user, item, 1e9 + i)
            p.send(s.topic_interactions, key=key, value=value,
                   partition=None if partitioner is None else partitioner(key, parts))
        p.flush()
        p.close()
        return len(events)
    return send


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--events", type=int, default=24_000)
    ap.add_argument("--rounds", type=int, default=2, help="each case this many times, alternating")
    args = ap.parse_args(argv)
    base = Settings.load()
    events = distinct_events(args.users, args.events, seed=5)
    parts = base.interactions_partitions
    foreign = sum(crc32_partition(u.encode(), parts) != home_partition(u.encode(), parts) for u, _ in events)
    cases = {"murmur2 (home)": None, "crc32 (librdkafka)": crc32_partition}
    results: dict[str, list[dict]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
        root = Path(tmp)
        model_dir = make_model("linrec_decay", root, NUM_ITEMS)
        for r in range(args.rounds):
            for name, partitioner in cases.items():
                out = run_worker_case(base, model_dir, apply_batch, events, None, root, None,
                                      replay_fn=producer_of(events, partitioner))
                results[name].append(out)
                print(f"  round {r + 1} {name}: {out['events']:,} applied, {out['eps_wall']:,.0f} ev/s wall",
                      flush=True)
    print(f"\nmachine: {machine_line()}")
    print(f"{args.events:,} events of {args.users:,} distinct users, {parts} partitions, {LINREC} (hidden 64); "
          f"crc32 puts {foreign:,} ({foreign / len(events):.0%}) off their home partition")
    print(f"{'partitioner':<22}{'applied':>10}{'ev/s wall':>12}{'ev/s busy':>12}{'vs murmur2':>12}")
    home_wall = _median([o["eps_wall"] for o in results["murmur2 (home)"]])
    for name, outs in results.items():
        wall, busy = _median([o["eps_wall"] for o in outs]), _median([o["eps_busy"] for o in outs])
        print(f"{name:<22}{min(o['events'] for o in outs):>10,}{wall:>12,.0f}{busy:>12,.0f}{wall / home_wall:>12.2f}")


def _median(xs: list[float]) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    return xs[len(xs) // 2] if xs else math.nan


if __name__ == "__main__":
    main()

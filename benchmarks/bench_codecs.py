"""Bytes and CPU per message of each Kafka compression codec on the worker's own messages.

What the ``compression_type`` defaults rest on (BENCHMARKS.md, "Compression of the worker's own
messages"): one producer batch of 64 changelog records (a float32 state of 4,096 values, as the
benchmark model's 2 layers x 2 heads x 32 x 32, plus a window of 200 item ids; the values are
Gaussian noise, whose mantissas compress about as little as a real state's) and one of 512
recommendations (JSON, 10 items and scores), compressed whole as kafka-python does per batch.

    .venv/bin/python benchmarks/bench_codecs.py
"""

from __future__ import annotations

import json
import platform
import random
import time

import numpy as np
from kafka import codec

CODECS = {"none": lambda b: b, "gzip": codec.gzip_encode, "snappy": codec.snappy_encode,
          "lz4": codec.lz4_encode, "zstd": codec.zstd_encode}


def messages(seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    states = [rng.standard_normal(4096).astype(np.float32).tobytes()
              + rng.integers(1, 1683, 200).astype(np.uint32).tobytes() + bytes(60) for _ in range(64)]
    recs = [json.dumps({"v": 1, "user": f"u{i}", "items": [f"i{pyrng.randrange(1682)}" for _ in range(10)],
                        "scores": [round(pyrng.random() * 10, 6) for _ in range(10)], "model_version": "ab" * 16,
                        "source": {"topic": "interactions", "partition": 1, "offset": 123_456 + i},
                        "event_id": f"e{i}", "event_ts": 1.7e9, "ingested_at": 1.7e9, "produced_at": 1.7e9,
                        "trigger": "event"}).encode() for i in range(512)]
    return states, recs


def per_message(encode, msgs: list[bytes], seconds: float = 0.5) -> tuple[float, float]:
    """(bytes, microseconds) per message, the batch compressed whole."""
    blob = b"".join(msgs)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        out = encode(blob)
        n += 1
    return len(out) / len(msgs), (time.perf_counter() - t0) / n / len(msgs) * 1e6


def main() -> None:
    states, recs = messages()
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print(f"{'codec':<7} {'changelog B/rec':>16} {'us/rec':>8} {'recommendation B/rec':>21} {'us/rec':>8}")
    for name, encode in CODECS.items():
        (sb, su), (rb, ru) = per_message(encode, states), per_message(encode, recs)
        print(f"{name:<7} {sb:>16,.0f} {su:>8.1f} {rb:>21,.0f} {ru:>8.2f}")


if __name__ == "__main__":
    main()

"""Local broker start-to-ready time (first start with storage format, then restarts) and
round-trip throughput, on a private broker instance (own ports and files).

    .venv/bin/python benchmarks/bench_broker.py [--restarts 3] [--messages 10000]
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import tempfile
from pathlib import Path

from linrec_stream.broker.broker import LocalBroker
from linrec_stream.broker.roundtrip import roundtrip
from linrec_stream.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--messages", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        s = Settings.load(overrides={
            "kafka_port": port, "kafka_controller_port": _free_port(),
            "bootstrap_servers": f"127.0.0.1:{port}", "runtime_dir": str(Path(tmp) / "rt"),
        })
        broker = LocalBroker(s)
        rows = []
        first = broker.start(log=lambda m: None)
        rows.append(("first start (format + start)", first.seconds))
        rt = roundtrip(s, messages=args.messages)
        assert not rt.problems(), rt.problems()
        stop = broker.stop()
        rows.append(("stop", stop.seconds))
        restarts = []
        for _ in range(args.restarts):
            restarts.append(broker.start(log=lambda m: None).seconds)
            broker.stop()
        print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores")
        print(f"{'what':<32} {'seconds':>8}")
        for name, sec in rows:
            print(f"{name:<32} {sec:>8.1f}")
        print(f"{'restart, median of ' + str(len(restarts)):<32} {statistics.median(restarts):>8.1f}"
              f"   (all: {', '.join(f'{x:.1f}' for x in restarts)})")
        print(f"{'round trip ' + str(args.messages) + ' msgs':<32} {rt.total_s:>8.2f}   "
              f"(produce {rt.produce_s:.2f}s; {args.messages / rt.total_s:,.0f} msg/s end to end)")


if __name__ == "__main__":
    main()

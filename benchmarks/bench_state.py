"""StateStore commit throughput: commits/s and records/s for batches of 1, 64 and 512 user
records of 4 KB and 17 KB state, with the WAL fsynced (sync=True, what the worker uses) and not.

    .venv/bin/python benchmarks/bench_state.py [--dir DIR] [--seconds S] [--users N] [--changelog]

Each case commits batches of distinct users (cycling over --users, so the store grows like a
warm worker's) for about --seconds seconds in a fresh store under --dir (default: a temp dir on
the same disk as /tmp; pass the real state-dir's disk to measure that). --changelog also
measures Changelog.publish (acks=all) against the local broker for the same batches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from state import Changelog, StateStore, UserRecord  # noqa: E402


def make_records(n_users: int, state_bytes: int) -> list[UserRecord]:
    blob = os.urandom(state_bytes)  # float32 states barely compress; random bytes are fair
    return [
        UserRecord(f"user-{u}", blob, "0123456789abcdef", tuple(range(1000, 1050)),
                   u, u % 4, u, None, 1.7e9, 2000, 0x5EED)
        for u in range(n_users)
    ]


def bench_store(root: Path, records: list[UserRecord], batch: int, sync: bool, seconds: float) -> tuple[float, float]:
    """Returns (commits/s, ms per commit)."""
    path = root / f"store-{uuid.uuid4().hex[:6]}"
    with StateStore(path, sync=sync) as store:
        n, i, t0 = 0, 0, time.perf_counter()
        while True:
            chunk = records[i:i + batch] if i + batch <= len(records) else records[:batch]
            i = (i + batch) % len(records)
            store.commit(chunk, {0: n + 1, 1: n + 1, 2: n + 1, 3: n + 1})
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds and n >= 3:
                break
    shutil.rmtree(path, ignore_errors=True)
    return n / dt, 1000 * dt / n


def bench_changelog(records: list[UserRecord], batch: int, seconds: float) -> tuple[float, float]:
    from linrec_stream.clients.connection import KafkaConnection
    from linrec_stream.settings import Settings

    connection = KafkaConnection.from_settings(Settings.load())
    cl = Changelog(connection, f"bench-state-changelog-{uuid.uuid4().hex[:6]}")
    cl.ensure_topic(4)
    try:
        cl.publish(records[:1])  # connect, metadata, producer id
        n, t0 = 0, time.perf_counter()
        while True:
            cl.publish(records[(n * batch) % len(records):][:batch] or records[:batch])
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds and n >= 3:
                break
        return n / dt, 1000 * dt / n
    finally:
        cl.close()
        admin = connection.admin()
        admin.delete_topics([cl.topic])
        admin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--users", type=int, default=4096)
    ap.add_argument("--changelog", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-state-", dir=args.dir))
    try:
        print(f"state dir {root}; {os.cpu_count()} CPUs; {args.seconds}s per case")
        print(f"{'what':<18}{'state':>7}{'batch':>7}{'commits/s':>12}{'records/s':>12}{'ms/commit':>11}{'MB/s':>8}")
        for size in (4096, 17 * 1024):
            records = make_records(args.users, size)
            rec_bytes = len(records[0].to_bytes())
            cases = [(f"store sync={sync}", lambda b, sync=sync: bench_store(root, records, b, sync, args.seconds))
                     for sync in (True, False)]
            if args.changelog:
                cases.append(("changelog publish", lambda b: bench_changelog(records, b, args.seconds)))
            for what, fn in cases:
                for batch in (1, 64, 512):
                    cps, ms = fn(batch)
                    print(f"{what:<18}{size // 1024:>5}KB{batch:>7}{cps:>12,.0f}{cps * batch:>12,.0f}{ms:>11.2f}"
                          f"{cps * batch * rec_bytes / 1e6:>8.0f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

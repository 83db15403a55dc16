"""What users meet: the stream worker on many distinct users, against its model-only ceiling.

One run measures, side by side (one worker in process, ``consumers.worker.StreamWorker`` on a
thread, private topics on the local broker and a fresh state directory for every case):

1. distinct users, backlog: ``--users`` users (default 12,000) each with a stored state of
   ``--history`` (200) past events, prefilled into the store before the worker starts; then a
   backlog of ``--events`` (24,000) events cycling through a random permutation of the users,
   so every micro-batch of 512 holds 512 distinct users (checked: one recommendation per event).
   LinRec worker (``apply_batch``, linrec_decay, hidden 64, 2 layers, 2 heads, 1,682 items as
   ML-100K, batch 512).
   events/s busy = events / the worker's busy time (sum of its stage seconds, polling included);
   events/s wall = events / wall time; both counted from the end of the first micro-batch (the
   one that also positions the partitions; its start is not observable from outside) to the end
   of the last; what the worker commits when it stops is not counted (--json: ``stop_commit_s``,
   and ``eps_busy_all_batches``: every batch and the stop included).
   The same on the other variants (``--variants``): the LinRec worker on the faust engine
   (``worker_engine=faust``: faust-streaming's app on aiokafka), and with float16 stored states
   (``state_dtype=float16``).
2. the same input on the softmax re-encoding worker (``benchmarks/reencode.py``, softmax model of
   the same size, each touched user's last 200 items re-encoded per batch).
3. the model-only ceiling, no Kafka and no RocksDB, one torch thread: batches of 512 distinct
   users, their states decoded from the stored bytes and stacked in memory beforehand, one new
   event each (``model.encode``; ``model.step`` is timed too and the faster counts), ``score``,
   the window excluded, top 10. Also "model + state bytes": the same with the states decoded,
   stacked and re-encoded to bytes inside the timed loop. For softmax: the re-encoding of the
   last 200 items. "x ceiling" = the worker's events/s over its own variant's ceiling.
4. bytes written per event: changelog = key + value bytes of the records the case produced to
   its changelog topic (records produced = the topic's end offsets, x their mean size read
   back: the topic is compacted, so some older records are gone by then) / events; store =
   logical bytes of the user records the worker committed (records written, from the worker's
   ``records_stored`` count where it keeps one, else its recommendations, x the mean key + value
   of the touched users' records read back after the run) / events. The net growth of the RocksDB directory
   is in the --json output (``store_dir_growth_B_per_event``); it is not bytes written.
5. end-to-end latency p50 / p99 at ``--rate`` (2,000) events/s offered for
   ``--latency-seconds`` (15 s), distinct users as above, from the worker's latency window
   (``WorkerMetrics.latency_quantiles``: its most recent 20,000 events). The paced producer
   runs in a child process (another client, as in production; ``--producer-thread``: a thread
   of the worker's process, as bench_worker.py does).
6. ``--ml1m``: the ML-1M log replayed in time order (``linrec_stream.lifecycle.replay``) into
   an empty store, first ``--ml1m-events`` events (needs ``linrec-stream data fetch ml-1m``).

Output: a table on stdout, the machine line and the command; ``--json PATH`` the rows,
``--png PATH`` a chart (events/s per variant, latency p50/p99).

    .venv/bin/python benchmarks/bench_stream.py                 # the full run (minutes)
    .venv/bin/python benchmarks/bench_stream.py --quick         # smoke test
    .venv/bin/python benchmarks/bench_stream.py --json results/bench_stream.json --png results/bench_stream.png
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from consumers.batch import apply_batch
from consumers.serving import ServingModel
from consumers.worker import StreamWorker, WorkerOptions
from linrec_stream.model import UserState
from linrec_stream.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_topics, fresh_settings, make_model, prefill, produce, stage_sums  # noqa: E402
from reencode import reencode_batch  # noqa: E402  (benchmarks/reencode.py, the stateless baseline)

NUM_ITEMS = 1682  # ML-100K's item count
BATCH = 512
BATCH_MS = 20
TOP_K = 10
LINREC, SOFTMAX = "linrec_decay", "softmax re-encode 200"


@dataclass(frozen=True)
class Variant:
    """One worker measured: its batch function and the settings it runs with."""

    name: str
    attention: str
    apply: Callable
    settings: dict = field(default_factory=dict)  # Settings.replace(**settings)
    ml1m: bool = True  # also replays ML-1M with --ml1m


VARIANTS = [
    Variant(LINREC, "linrec_decay", apply_batch),
    Variant(f"{LINREC} faust", "linrec_decay", apply_batch, {"worker_engine": "faust"}),
    Variant(f"{LINREC} fp16 state", "linrec_decay", apply_batch, {"state_dtype": "float16"}, ml1m=False),
    Variant(SOFTMAX, "softmax", reencode_batch, ml1m=False),
]


@dataclass
class Row:
    variant: str
    case: str
    events: int
    eps_busy: float = math.nan
    eps_wall: float = math.nan
    ceil_busy: float = math.nan  # events/s busy / the variant's model-only ceiling
    ceil_wall: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    changelog_bpe: float = math.nan
    store_bpe: float = math.nan
    extra: dict = field(default_factory=dict)


# --- the worker cases ---------------------------------------------------------------------------

def distinct_events(users: int, n: int, seed: int) -> list[tuple[str, str]]:
    """n events; event i goes to user perm[i % users] (the same permutation every cycle, so two
    events of a user are ``users`` events apart) with a random item."""
    rng = random.Random(seed)
    perm = list(range(users))
    rng.shuffle(perm)
    return [(f"u{perm[i % users]}", f"i{rng.randrange(1, NUM_ITEMS + 1)}") for i in range(n)]


def run_worker_case(base: Settings, model_dir: Path, apply, events: list[tuple[str, str]], template: Path | None,
                    state_root: Path, rate: float | None, producer_thread: bool = False,
                    replay_fn=None) -> dict:
    """One worker on fresh topics and a copy of the prefilled ``template`` store (None: empty).
    ``rate`` None: the events are a backlog produced before the worker starts; else they are
    offered at ``rate`` events/s once the worker holds its partitions. ``replay_fn(settings)``
    instead of ``events``: produces the backlog itself and returns how many events it sent."""
    s = fresh_settings(base)
    state_dir = state_root / uuid.uuid4().hex
    if template is not None:
        shutil.copytree(template, state_dir)
    try:
        n = len(events)
        if rate is None:
            n = replay_fn(s) if replay_fn is not None else produce(s, events, None, linger_ms=20)
        dir0 = _dir_bytes(state_dir)
        worker = StreamWorker(s, WorkerOptions(model_dir=model_dir, state_dir=state_dir, batch_size=BATCH,
                                               batch_ms=BATCH_MS, device="cpu", apply=apply))
        m = worker.metrics
        failure: list[BaseException] = []

        def run() -> None:
            try:
                worker.run(stop)
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)

        stop = threading.Event()
        th = threading.Thread(target=run, name="bench-worker", daemon=True)
        sums0, batches0 = stage_sums(m), m.totals["batches"]
        producer = None
        th.start()
        try:
            if rate is not None:
                while not worker.consumer.assigned():
                    _check_alive(th, failure)
                    time.sleep(0.05)
                if producer_thread:
                    producer = threading.Thread(target=produce, args=(s, events, rate), daemon=True)
                else:
                    producer = multiprocessing.get_context("spawn").Process(
                        target=produce, args=(s, events, rate), daemon=True)
                producer.start()
            # Wait for every event: the worker is never idle on a backlog; at an offered load it
            # may fall behind, so give it time to drain, then report what it applied.
            budget = 600.0 if rate is None else n / rate * 4 + 60
            deadline = time.monotonic() + budget
            t_first = e_first = t_last = None
            e_last, first, last = 0, {}, {}
            while True:
                e, now = m.totals["events"], time.perf_counter()
                if e > e_last:
                    t_last, e_last = now, e
                    last = {"stages": stage_sums(m), "batches": m.totals["batches"]}
                    if t_first is None:
                        # After the first batch (it carries the partition set-up: positioning,
                        # the changelog restore check): the measured window starts here.
                        t_first, e_first, first = now, e, last
                if e >= n:
                    break
                _check_alive(th, failure)
                if time.monotonic() > deadline:
                    print(f"  worker applied {e:,} of {n:,} events in {budget:.0f}s; reporting those", flush=True)
                    break
                time.sleep(0.002)
        finally:
            stop.set()
            th.join(timeout=120)
            if th.is_alive():
                print("  WARNING: the worker thread did not stop within 120 s", flush=True)
            if producer is not None:
                producer.join(timeout=60)
        _check_alive(th, failure)
        p50, p99 = m.latency_quantiles()
        sums = stage_sums(m)  # after the stop: with the commits the worker makes when it stops
        applied = m.totals["events"]
        all_busy = sum(sums.values()) - sum(sums0.values())
        measured = e_last - (e_first or 0)
        if measured > 0:  # from the end of the first applied batch to the end of the last
            stages = {k: v - first["stages"].get(k, 0.0) for k, v in last["stages"].items()}
            batches = max(1, last["batches"] - first["batches"])
        else:  # a single batch: all of it, up to the stop
            stages = {k: v - sums0.get(k, 0.0) for k, v in sums.items()}
            batches, measured = max(1, m.totals["batches"] - batches0), applied
        busy = sum(stages.values())
        wall = (t_last - t_first) if t_first is not None and t_last > t_first else math.nan
        recs = m.totals["recommendations"]
        committed, committed_from = records_committed(worker, recs)
        cl_bytes, cl_records, cl_read = changelog_bytes(s)
        store_bytes, touched = store_record_bytes(state_dir, committed)
        return {
            "events": applied, "events_measured": measured, "eps_busy": measured / busy if busy else math.nan,
            "eps_wall": measured / wall if wall == wall else math.nan,
            "eps_busy_all_batches": applied / all_busy if all_busy else math.nan,
            "busy_s": busy, "wall_s": wall, "batches": batches,
            "stop_commit_s": sum(sums.values()) - sum((last or {"stages": sums})["stages"].values()),
            "store_records_committed": committed, "store_records_committed_from": committed_from,
            "events_per_batch": measured / batches, "recommendations": recs,
            "distinct_users_per_batch": recs == applied,
            "p50_ms": p50 * 1000, "p99_ms": p99 * 1000,
            "changelog_records": cl_records, "changelog_records_read_back": cl_read, "changelog_bpe": cl_bytes / applied if applied else math.nan,
            "store_bpe": store_bytes / applied if applied else math.nan, "store_users_touched": touched,
            # Net growth of the RocksDB directory (at close): NOT bytes written (flushes, compaction
            # and WAL recycling reclaim older versions), kept only as a rough disk-footprint figure.
            "store_dir_growth_B_per_event": (_dir_bytes(state_dir) - dir0) / applied if applied else math.nan,
            "stage_ms_per_batch": {k: v * 1000 / batches for k, v in stages.items()},
        }
    finally:
        drop_topics(s)
        shutil.rmtree(state_dir, ignore_errors=True)


def _check_alive(th: threading.Thread, failure: list[BaseException]) -> None:
    if failure:
        raise RuntimeError(f"the worker failed: {failure[0]!r}") from failure[0]


def changelog_bytes(s: Settings) -> tuple[float, int, int]:
    """Key + value bytes the case produced to its changelog topic: records produced (the end
    offsets: a fresh topic, no transactions) x the mean key + value size of the records read
    back. The topic is compacted, so by the time it is read the log cleaner may already have
    removed a user's older records: counting only what is read would undercount.
    Returns (bytes, records produced, records read back)."""
    from kafka import TopicPartition

    from linrec_stream.clients.connection import KafkaConnection

    c = KafkaConnection.from_settings(s).consumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                                  max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    try:
        parts = c.partitions_for_topic(s.topic_state_changelog) or set()
        tps = [TopicPartition(s.topic_state_changelog, p) for p in sorted(parts)]
        if not tps:
            return 0.0, 0, 0
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        produced = sum(end.values())
        total = read = 0
        left = {tp for tp in tps if end[tp] > 0}
        deadline = time.monotonic() + 300
        while left and time.monotonic() < deadline:
            for tp, msgs in c.poll(timeout_ms=500, max_records=5000).items():
                for r in msgs:
                    if r.offset < end[tp]:
                        total += max(0, r.serialized_key_size) + max(0, r.serialized_value_size)
                        read += 1
            left = {tp for tp in left if c.position(tp) < end[tp]}
        if left:
            print(f"  (changelog read-back incomplete: {sorted(tp.partition for tp in left)})", flush=True)
        return (total / read * produced if read else 0.0), produced, read
    finally:
        c.close()


def records_committed(worker: StreamWorker, recommendations: int) -> tuple[int, str]:
    """User records the worker wrote to its store, and where the count comes from. Not a public
    figure of the worker yet: its metrics' totals or its checkpoint's counts are used when they
    have ``records_stored``; else the recommendations (one record and one recommendation per
    touched user per micro-batch when every item is known, as here; an upper bound if the worker
    coalesces a user's records over several batches)."""
    for name, counts in (("metrics.totals", worker.metrics.totals),
                         ("checkpoint.counts", getattr(getattr(worker, "checkpoint", None), "counts", None))):
        if isinstance(counts, dict) and "records_stored" in counts:
            return int(counts["records_stored"]), name
    return recommendations, "recommendations"


def store_record_bytes(state_dir: Path, records_written: int) -> tuple[float, int]:
    """Logical bytes of the user records the worker wrote to the store: ``records_written`` x
    the mean size (user key + record value) of the touched users' records, read back from the
    store after the run. The store's own bookkeeping keys (offsets, partition index, ...) are
    left out. Returns (bytes, users touched)."""
    from state.record import MAX_PARTITION
    from state.store import StateStore

    total = touched = 0
    with StateStore(state_dir) as store:
        for rec in store.records():
            if rec.partition == MAX_PARTITION:
                continue  # prefilled, not touched by the worker
            total += 1 + len(rec.user.encode("utf-8")) + len(rec.to_bytes())
            touched += 1
    return (total / touched * records_written if touched else 0.0), touched


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- the model-only ceiling ---------------------------------------------------------------------

def ceiling(model_dir: Path, template: Path, users: int, seconds: float, with_bytes: bool = False) -> dict:
    """Users/s of the model alone on batches of BATCH distinct users, one torch thread: one new
    event each from the stored state, scored, the window excluded, top TOP_K. ``with_bytes``:
    the states are decoded from their stored bytes, stacked and encoded back inside the loop."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serving = ServingModel.load(model_dir)  # outside inference mode: loading checks the version
        with torch.inference_mode():
            return _ceiling(serving, template, users, seconds, with_bytes)
    finally:
        torch.set_num_threads(threads)


def _ceiling(serving: ServingModel, template: Path, users: int, seconds: float, with_bytes: bool) -> dict:
    from state.store import StateStore

    model = serving.model
    softmax = model.config.attention == "softmax"
    gen = torch.Generator().manual_seed(5)
    chunks = []  # up to 8 batches of distinct users, all in memory
    with StateStore(template) as store:
        for c in range(max(1, min(users // BATCH, 8))):
            names = [f"u{i}" for i in range(c * BATCH, min(users, (c + 1) * BATCH))]
            found = store.get_many(names)
            recs = [found[u] for u in names]
            win = torch.tensor([serving.window_ids(r) for r in recs])  # (B, history): model ids
            new = torch.randint(1, model.config.num_items + 1, (len(recs), 1), generator=gen)
            blobs = [r.state for r in recs]
            st = None if softmax or with_bytes else UserState.stack([UserState.from_bytes(b) for b in blobs])
            chunks.append((blobs, st, win, new))

    def one(chunk, form: str) -> None:
        blobs, st, win, new = chunk
        if softmax:
            h = model(torch.cat([win, new], 1)[:, -win.shape[1]:])[:, -1]  # the last `history` items
        else:
            if with_bytes:
                st = UserState.stack([UserState.from_bytes(b) for b in blobs])
            if form == "step":
                h, new_state = model.step(st, new[:, 0])
            else:
                h, new_state = model.encode(new, st)
                h = h[:, -1]
            if with_bytes:
                for i in range(len(blobs)):
                    new_state[i].to_bytes()
        scores = model.score(h).float()
        scores.scatter_(1, torch.cat([win, new], 1), float("-inf"))
        scores.topk(TOP_K, dim=1)

    best: dict = {}
    for form in ["encode"] if softmax else ["encode", "step"]:
        for chunk in chunks[:2]:
            one(chunk, form)  # warm-up
        done, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or i < 2:
            chunk = chunks[i % len(chunks)]
            one(chunk, form)
            done, i = done + len(chunk[0]), i + 1
        rate = done / (time.perf_counter() - t0)
        if rate > best.get("users_per_s", 0.0):
            best = {"users_per_s": rate, "users": done, "form": form}
    return best


# --- the run ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=12_000)
    ap.add_argument("--events", type=int, default=24_000, help="backlog events of the distinct-users case")
    ap.add_argument("--history", type=int, default=200, help="past events per user before measuring")
    ap.add_argument("--rate", type=float, default=2000.0, help="offered load of the latency case, events/s")
    ap.add_argument("--latency-seconds", type=float, default=15.0)
    ap.add_argument("--ceiling-seconds", type=float, default=3.0, help="timed seconds per ceiling form")
    ap.add_argument("--producer-thread", action="store_true",
                    help="latency case: pace the producer on a thread of this process, not a child process")
    ap.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], default=[v.name for v in VARIANTS],
                    metavar="NAME", help=f"workers to measure (default all: {', '.join(v.name for v in VARIANTS)})")
    ap.add_argument("--ml1m", action="store_true", help="also replay ML-1M in time order (needs the data set)")
    ap.add_argument("--ml1m-events", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="small smoke run: 3,000 users, 4,000 events, 5 s latency")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.users, args.events, args.latency_seconds, args.ceiling_seconds = 3000, 4000, 5.0, 1.0
    base = Settings.load()
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/" + Path(__file__).name,
                                                 *(sys.argv[1:] if argv is None else argv)])
    per_partition = args.users / base.interactions_partitions
    if per_partition < BATCH:
        print(f"note: {args.users} users over {base.interactions_partitions} partitions is {per_partition:.0f} per "
              f"partition, under {BATCH}: a batch from one partition may repeat users", flush=True)
    variants = [v for v in VARIANTS if v.name in args.variants]
    rows: list[Row] = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_stream-") as tmp:
        root = Path(tmp)
        for attention in dict.fromkeys(v.attention for v in variants):  # one model and store per attention
            model_dir = make_model(attention, root, NUM_ITEMS)
            template = root / f"{attention}-template"
            t0 = time.monotonic()
            prefill(template, model_dir, args.users, args.history, NUM_ITEMS)
            print(f"{attention}: prefilled {args.users:,} users x {args.history} events in "
                  f"{time.monotonic() - t0:.0f}s", flush=True)

            ceil = ceiling(model_dir, template, args.users, args.ceiling_seconds)
            rows.append(Row(attention, f"model-only ceiling ({ceil['form']})", ceil["users"], ceil["users_per_s"],
                            ceil["users_per_s"], 1.0, 1.0, extra=ceil))
            print(f"{attention}: model-only ceiling {ceil['users_per_s']:,.0f} users/s ({ceil['form']})", flush=True)
            if attention != "softmax":
                cb = ceiling(model_dir, template, args.users, args.ceiling_seconds, with_bytes=True)
                rows.append(Row(attention, f"model + state bytes ({cb['form']})", cb["users"], cb["users_per_s"],
                                cb["users_per_s"], cb["users_per_s"] / ceil["users_per_s"],
                                cb["users_per_s"] / ceil["users_per_s"], extra=cb))
                print(f"{attention}: model + state bytes {cb['users_per_s']:,.0f} users/s", flush=True)

            for v in (v for v in variants if v.attention == attention):
                vbase = base.replace(**v.settings)
                evs = distinct_events(args.users, args.events, seed=11)
                r = run_worker_case(vbase, model_dir, v.apply, evs, template, root, None)
                rows.append(_worker_row(v.name, "distinct users, backlog", r, ceil["users_per_s"]))
                print(f"{v.name}: backlog {r['eps_busy']:,.0f} events/s busy, {r['eps_wall']:,.0f} wall", flush=True)

                n_lat = int(args.rate * args.latency_seconds)
                evs = distinct_events(args.users, n_lat, seed=12)
                r = run_worker_case(vbase, model_dir, v.apply, evs, template, root, args.rate,
                                    producer_thread=args.producer_thread)
                rows.append(_worker_row(v.name, f"{args.rate:,.0f} ev/s offered", r, ceil["users_per_s"],
                                        offered=True))
                print(f"{v.name}: at {args.rate:,.0f} ev/s p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms",
                      flush=True)
                if args.ml1m and v.ml1m:
                    rows.extend(_ml1m_rows(vbase, v.name, attention, v.apply, root, args.ml1m_events))
            shutil.rmtree(template, ignore_errors=True)
    elapsed = time.monotonic() - t_start

    report(rows, args, command, elapsed)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": machine_line(), "args": _jsonable(vars(args)),
                                         "rows": [_jsonable(asdict(r)) for r in rows]}, indent=1))
        print(f"wrote {args.json}")
    if args.png:
        draw(rows, args.png, args)
        print(f"wrote {args.png}")


def _worker_row(variant: str, case: str, r: dict, ceiling_ups: float, offered: bool = False) -> Row:
    """A worker case's row. Backlog: no latency (its events waited in Kafka before the worker
    started; the figures stay in ``extra``); offered load: no ratio to the ceiling (the rate is
    the offered one)."""
    keep = {k: v for k, v in r.items() if k not in ("events", "eps_busy", "eps_wall", "changelog_bpe", "store_bpe")}
    nan = math.nan
    return Row(variant, case, r["events"], r["eps_busy"], r["eps_wall"],
               nan if offered else r["eps_busy"] / ceiling_ups, nan if offered else r["eps_wall"] / ceiling_ups,
               r["p50_ms"] if offered else nan, r["p99_ms"] if offered else nan,
               r["changelog_bpe"], r["store_bpe"], keep)


def _ml1m_rows(base: Settings, variant: str, attention: str, apply, root: Path, limit: int) -> list[Row]:
    """ML-1M, first ``limit`` events in time order, replayed as a backlog into an empty store."""
    from linrec_stream.data import dataset_path
    from linrec_stream.lifecycle.replay import ReplayPlan, ordered_events, replay

    path = dataset_path("ml-1m", base.path(base.data_dir))
    if not path.is_file():
        print(f"{variant}: ML-1M skipped: {path} not found (`linrec-stream data fetch ml-1m`)", flush=True)
        return []
    plan = ReplayPlan(path, "", limit=limit)
    _, items, _ = ordered_events(plan)
    vocab = sorted(set(map(str, items)))
    model_dir = make_model(attention, _mkdir(root / "ml1m"), len(vocab), vocab)

    def play(s: Settings) -> int:
        return replay(ReplayPlan(path, s.topic_interactions, limit=limit), s, progress=False).sent

    r = run_worker_case(base, model_dir, apply, [], None, root, None, replay_fn=play)
    shutil.rmtree(model_dir, ignore_errors=True)
    print(f"{variant}: ML-1M replay {r['eps_busy']:,.0f} events/s busy, {r['eps_wall']:,.0f} wall", flush=True)
    return [_worker_row(variant, f"ML-1M replay, {r['events']:,} ev", r, math.nan)]


def _mkdir(p: Path) -> Path:
    p.mkdir(exist_ok=True)
    return p


def machine_line() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU, "
            f"Python {platform.python_version()}")


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(rows: list[Row], args, command: str, elapsed: float) -> None:
    print(f"\nmachine: {machine_line()}")
    print(f"command: {command}   ({elapsed / 60:.1f} min)")
    print(f"{args.users:,} users with {args.history} past events each; model hidden 64, 2 layers, 2 heads, "
          f"{NUM_ITEMS} items; batch <= {BATCH} events / {BATCH_MS} ms; top {TOP_K}")
    head = (f"{'variant':<22} {'case':<28} {'events':>7} {'ev/s busy':>10} {'ev/s wall':>10} {'x ceil busy':>11} "
            f"{'x ceil wall':>11} {'p50 ms':>7} {'p99 ms':>7} {'changelog B/ev':>14} {'store B/ev':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.variant:<22} {r.case:<28} {r.events:>7} {_fmt(r.eps_busy, ',.0f'):>10} {_fmt(r.eps_wall, ',.0f'):>10} "
              f"{_fmt(r.ceil_busy, '.2f'):>11} {_fmt(r.ceil_wall, '.2f'):>11} {_fmt(r.p50_ms, '.0f'):>7} "
              f"{_fmt(r.p99_ms, '.0f'):>7} {_fmt(r.changelog_bpe, ',.0f'):>14} {_fmt(r.store_bpe, ',.0f'):>10}")
    print("\nev/s busy: events / the worker's busy time (sum of its stage seconds, polling included); ev/s wall: "
          "events / wall time; both from the end of the first micro-batch (its set-up is not counted) to the\n"
          "last one applied. Ceiling rows: users/s of the model alone (one thread). x ceil: over the variant's "
          "model-only ceiling. Latency: at the offered load only.")
    print("store B/ev: logical bytes of the user records committed (key + value) / events; "
          "changelog B/ev: key + value bytes of the changelog records\nproduced (end offsets x mean size read "
          "back; the topic is compacted) / events.")
    sources = sorted({r.extra["store_records_committed_from"] for r in rows if "store_records_committed_from" in r.extra})
    if sources:
        print(f"store records written counted from the worker's: {', '.join(sources)}")
    backlog = {r.variant: r for r in rows if r.case.startswith("distinct users")}
    verdict = lambda x, floor: "meets" if x >= floor else "BELOW"  # noqa: E731
    for name, a in backlog.items():
        if name == SOFTMAX:
            continue
        if SOFTMAX in backlog:
            b = backlog[SOFTMAX]
            busy, wall = a.eps_busy / b.eps_busy, a.eps_wall / b.eps_wall
            print(f"ratio {name} / {SOFTMAX}, distinct users backlog: {busy:.1f}x busy, {wall:.1f}x wall "
                  f"(floor 5x: {verdict(wall, 5)})")
        print(f"{name}: worker / model-only ceiling (floor 0.25): busy {a.ceil_busy:.2f} "
              f"{verdict(a.ceil_busy, 0.25)}, wall {a.ceil_wall:.2f} {verdict(a.ceil_wall, 0.25)}; "
              f"durability bytes/event {a.store_bpe + a.changelog_bpe:,.0f}")
    if f"{LINREC} faust" in backlog and LINREC in backlog:
        print(f"engines: faust / kafka-python, distinct users backlog: "
              f"{backlog[f'{LINREC} faust'].eps_wall / backlog[LINREC].eps_wall:.2f}x wall")
    for r in rows:
        if "distinct_users_per_batch" in r.extra and not r.case.startswith("ML-1M"):
            if not r.extra["distinct_users_per_batch"]:
                print(f"WARNING: {r.variant} / {r.case}: {r.extra['recommendations']} recommendations for "
                      f"{r.events} events: some micro-batches repeated a user")
    print("\nwhere the time goes, mean ms per micro-batch (the worker's stage seconds):")
    worker_rows = [r for r in rows if "stage_ms_per_batch" in r.extra]
    stages: list[str] = []
    for r in worker_rows:
        stages += [k for k in r.extra["stage_ms_per_batch"] if k not in stages]
    print(f"{'variant':<22} {'case':<28} {'ev/batch':>8} " + " ".join(f"{k:>11}" for k in stages) + f" {'total':>9}")
    for r in worker_rows:
        st = r.extra["stage_ms_per_batch"]
        print(f"{r.variant:<22} {r.case:<28} {r.extra['events_per_batch']:>8.0f} "
              + " ".join(f"{st.get(k, 0.0):>11.2f}" for k in stages) + f" {sum(st.values()):>9.2f}")


def draw(rows: list[Row], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tput = [r for r in rows if not math.isnan(r.eps_busy) and "offered" not in r.case]
    lat = [r for r in rows if "offered" in r.case]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    labels = [f"{r.variant}\n{r.case}" for r in tput]
    xs = range(len(tput))
    ax1.bar([x - 0.2 for x in xs], [r.eps_busy for r in tput], 0.4, label="busy")
    ax1.bar([x + 0.2 for x in xs], [r.eps_wall for r in tput], 0.4, label="wall")
    ax1.set_xticks(list(xs), labels, fontsize=7, rotation=20, ha="right")
    ax1.set_ylabel("events/s (ceilings: users/s)")
    ax1.set_yscale("log")
    ax1.set_title(f"throughput, {args.users:,} distinct users, batch {BATCH}")
    ax1.legend()
    xs = range(len(lat))
    ax2.bar([x - 0.2 for x in xs], [r.p50_ms for r in lat], 0.4, label="p50")
    ax2.bar([x + 0.2 for x in xs], [r.p99_ms for r in lat], 0.4, label="p99")
    ax2.set_xticks(list(xs), [r.variant for r in lat], fontsize=7, rotation=20, ha="right")
    ax2.set_ylabel("end-to-end latency, ms")
    ax2.set_yscale("log")
    ax2.set_title(f"latency at {args.rate:,.0f} events/s offered")
    ax2.legend()
    fig.suptitle(f"bench_stream: {machine_line()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


if __name__ == "__main__":
    main()

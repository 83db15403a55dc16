"""The main job on one machine, end to end, with real parts only:

local Kafka broker -> ML-1M fetched -> a model (trained quickly, or reused) -> a stream worker
-> the first 90% of the log (by time) replayed to warm every user's state -> the last 10%
replayed at a steady rate while live recommendations are shown -> one retraining round on the
event archive (warm start), published to a private model registry and hot-swapped into the running
worker -> a summary. It stops what it started (the broker only if it was not already running).

Its topics are private (``quickstart-*``, recreated on every run) and so are its state store and
consumer group, so a run never mixes with a previous one or with a production setup.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.topics import QUICKSTART_PREFIX as QS
from linrec_stream.settings import Settings

if TYPE_CHECKING:
    from linrec_stream.contracts.events import Recommendation

Log = Callable[[str], None]


@dataclass(frozen=True)
class QuickstartOptions:
    data: str = "ml-1m"
    model_dir: Path | None = None  # default: <runtime>/quickstart/model-<data file stem>, trained when absent
    warm_fraction: float = 0.9
    live_rate: float = 1000.0  # events/s for the last part
    train_epochs: int = 3
    show: int = 12  # live recommendations printed
    retrain: bool = True  # the model lifecycle stage: retrain on the archive, publish, hot swap


def quickstart(settings: Settings, opts: QuickstartOptions, log: Log = print) -> int:
    from linrec_stream.broker.broker import LocalBroker
    from linrec_stream.broker.topics import create_topics, delete_topics
    from linrec_stream.contracts.topics import stream_topics

    t_start = time.monotonic()
    home = settings.path(settings.runtime_dir) / "quickstart"
    home.mkdir(parents=True, exist_ok=True)
    broker = LocalBroker(settings)
    started_broker = False
    steps = 7 if opts.retrain else 6
    if settings.bootstrap_servers == settings.local_bootstrap:
        res = broker.start(log=log)
        started_broker = not res.already_running
        log(f"[1/{steps}] Kafka at {KafkaConnection.from_settings(settings).describe()}"
            + (f" (started in {res.seconds:.1f}s)" if started_broker else " (already running)"))
    qs = settings.replace(
        topic_interactions=f"{QS}interactions", topic_recommendations=f"{QS}recommendations",
        topic_dead_letter=f"{QS}interactions-dlq", topic_model_updates=f"{QS}model-updates",
        topic_state_changelog=f"{QS}user-state-changelog", worker_group=f"{QS}{uuid.uuid4().hex[:8]}",
        state_dir=home / "state", summary_every_s=15.0, batch_size=512, batch_ms=50, registry_dir=home / "models",
        # The worker's /metrics on a free port: the hot swap is read off it (_wait_for_swap).
        metrics_port=_free_port(),
    )
    worker = None
    try:
        delete_topics(qs, stream_topics(qs))
        create_topics(qs)
        from linrec_stream.data import resolve_data
        from linrec_stream.model.run_dir import missing_files

        path = resolve_data(opts.data, settings.path(settings.data_dir), log=log)
        log(f"[2/{steps}] data: {path}")
        # One trained model per log: a model of another data set knows none of its items.
        model_dir = opts.model_dir or home / f"model-{path.stem}"
        if missing_files(model_dir):
            _train_quick(path, model_dir, settings, opts.train_epochs, log)
        log(f"[3/{steps}] model: {model_dir}")
        first = _fresh_registry(qs, model_dir)
        log(f"      registered and promoted as {first[:12]} in {qs.registry_dir}")
        if qs.state_dir.exists():
            shutil.rmtree(qs.state_dir)
        worker = _start_worker(qs, home / "worker.log")
        log(f"[4/{steps}] worker started (pid {worker.pid}, log {home / 'worker.log'})")

        from linrec_stream.lifecycle.replay import ReplayPlan, ordered_events, replay

        _, _, ts = ordered_events(ReplayPlan(path, qs.topic_interactions))
        cut = float(ts[int(len(ts) * opts.warm_fraction)])
        t_warm = time.monotonic()
        warm = replay(ReplayPlan(path, qs.topic_interactions, to_ts=cut), qs)
        log(f"[5/{steps}] warm-up: {warm.describe()}; waiting for the worker to apply them ...")
        _wait_caught_up(qs, worker, warm.sent, log)
        warm_s = time.monotonic() - t_warm
        log(f"      worker caught up: {warm.sent:,} events applied in {warm_s:.0f}s ({warm.sent / warm_s:,.0f}/s)")

        log(f"[6/{steps}] live: replaying the rest at {opts.live_rate:,.0f} events/s; recommendations as they arrive:")
        watcher = _RecWatcher(qs, opts.show, log)
        watcher.start()
        live = replay(ReplayPlan(path, qs.topic_interactions, rate=opts.live_rate, from_ts=cut), qs,
                      progress=False)
        _wait_caught_up(qs, worker, warm.sent + live.sent, log)
        time.sleep(1.0)
        watcher.stop()
        log(f"      {live.describe()}")
        swap = _lifecycle(qs, log) if opts.retrain else None
        dead = _count(qs, qs.topic_dead_letter)
        _summary(warm, live, watcher, dead, time.monotonic() - t_start, log)
        if swap:
            log(f"  model lifecycle     {swap}")
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if started_broker:
            broker.stop()
            log("stopped the Kafka broker this run started")


def _train_quick(path: Path, out: Path, settings: Settings, epochs: int, log: Log) -> None:
    import torch

    from linrec_stream.model.device import resolve_device
    from linrec_stream.model.presets import preset
    from linrec_stream.training.experiment import prepare, run_training
    from linrec_stream.training.train import TrainConfig

    log(f"      no model yet: training a small LinRec with decay ({epochs} epochs; `linrec-stream train` makes better ones)")
    prepared = prepare(str(path), settings.path(settings.data_dir), log=log)
    mc = preset("quickstart", prepared.split.data.num_items)
    tc = TrainConfig(epochs=epochs, batch_size=256, lr=2e-3, patience=epochs)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run_training(prepared, mc, tc, out, resolve_device(settings.device), progress=True, log=log)


def _fresh_registry(s: Settings, model_dir: Path) -> str:
    """A private registry holding only ``model_dir``'s model, in force; returns its version."""
    from linrec_stream.lifecycle.registry import ModelRegistry

    if s.registry_dir.exists():
        shutil.rmtree(s.registry_dir)
    registry = ModelRegistry(s.registry_dir)
    version = registry.add(model_dir, origin="train", note="quickstart").version
    registry.promote(version)
    return version


def _lifecycle(s: Settings, log: Log) -> str:
    """One retraining round on the archive; if published, wait for the worker's hot swap."""
    from linrec_stream.lifecycle.retrain import RetrainConfig, retrain_once
    from linrec_stream.model.device import resolve_device

    log("[7/7] model lifecycle: one retraining round on the event archive (warm start from the model in "
        "force, 1 epoch), publish if not worse, hot swap in the running worker")
    # The worker's counters before the round, so the swap's own figures can be told apart.
    before = _scrape(s.metrics_port)
    res = retrain_once(s, RetrainConfig(epochs=1, patience=1, batch_size=256, lr=1e-3),
                       resolve_device(s.device), log=lambda m: log(f"      {m}"), progress=True)
    if not res.published:
        return f"candidate {res.version[:12]} {res.decision}: {res.reason} (the worker keeps its model)"
    swap = _wait_for_swap(s.metrics_port, res.version, before, timeout_s=600)
    if swap is None:
        return f"published {res.version[:12]}, but the worker did not report the swap within 600s"
    rebuilt, seconds = swap
    line = (f"{res.parent[:12] if res.parent else '-'} -> {res.version[:12]} ({res.reason}); the worker rebuilt "
            f"{rebuilt:,} states {seconds:.1f}s after the announcement, without a restart")
    log(f"      hot swap: {line}")
    return line


# --- the worker's metrics ----------------------------------------------------------------------
# Names and labels as consumers/metrics.py exposes them (a Counter gains "_total").
MODEL_INFO = "linrec_model_info"  # {version="..."}: 1 for the version served
SWAP_SECONDS = "linrec_model_swap_seconds"  # set when a swap's sweep has rebuilt every stored state
STATES_REBUILT = "linrec_states_rebuilt_total"
#: A scrape of /metrics: (sample name, its labels sorted) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick), for the worker's metrics: a fixed
    one could be taken by a production worker on the same machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> Samples:
    """The worker's metric samples; empty while it does not answer (not started yet, or gone)."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError):
        return {}
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _wait_for_swap(port: int, version: str, before: Samples, timeout_s: float) -> tuple[int, float] | None:
    """Wait until the worker serves ``version`` and its swap sweep has completed; returns the
    states rebuilt since ``before`` (a scrape from before the round) and the seconds from the
    announcement to the last one rebuilt, or None after ``timeout_s``.

    The swap gauge counts as set when it differs from ``before``: a worker that swapped earlier
    (not the quickstart's own, which starts fresh) keeps the previous swap's figure until then."""
    served = (MODEL_INFO, (("version", version),))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = _scrape(port)
        swap_s = now.get((SWAP_SECONDS, ()), 0.0)
        if now.get(served) == 1.0 and swap_s > 0 and swap_s != before.get((SWAP_SECONDS, ())):
            rebuilt = now.get((STATES_REBUILT, ()), 0.0) - before.get((STATES_REBUILT, ()), 0.0)
            return int(rebuilt), swap_s
        time.sleep(0.5)
    return None


#: The settings of how a client reaches the cluster (linrec_stream/clients/connection.py).
_SECURITY_SETTINGS = ("security_protocol", "sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file",
                      "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password", "ssl_check_hostname")


def _start_worker(s: Settings, log_path: Path) -> subprocess.Popen:
    """A worker serving the registry's version in force (hot swap on announcements)."""
    # The cluster and its security travel too: they may come from a config file or flags.
    env = {**os.environ, **{f"LINREC_{k.upper()}": str(getattr(s, k)) for k in (
        "bootstrap_servers", *_SECURITY_SETTINGS, "topic_interactions", "topic_recommendations",
        "topic_dead_letter", "topic_model_updates", "topic_state_changelog", "worker_group", "metrics_port",
        "summary_every_s", "interactions_partitions", "registry_dir")}}
    cmd = [sys.executable, "-m", "linrec_stream.cli", "worker", "--state-dir",
           str(s.state_dir), "--batch-size", str(s.batch_size), "--batch-ms", str(s.batch_ms)]
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)


def _group_position(s: Settings) -> int:
    admin = KafkaConnection.from_settings(s).admin()
    try:
        offsets = admin.list_group_offsets(s.worker_group).get(s.worker_group, {})
        return sum(o.offset for tp, o in offsets.items() if tp.topic == s.topic_interactions and o.offset > 0)
    finally:
        admin.close()


def _wait_caught_up(s: Settings, worker: subprocess.Popen, total: int, log: Log, timeout_s: float = 3600) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="ev", desc="worker applied", smoothing=0.1)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}; see its log")
            done = _group_position(s)
            bar.update(max(0, min(done, total) - bar.n))
            if done >= total:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not catch up within {timeout_s:.0f}s")
            time.sleep(0.5)
    finally:
        bar.close()


def _count(s: Settings, topic: str) -> int:
    from kafka.structs import TopicPartition

    c = KafkaConnection.from_settings(s).consumer()
    try:
        parts = [TopicPartition(topic, p) for p in (c.partitions_for_topic(topic) or [])]
        begins, ends = c.beginning_offsets(parts), c.end_offsets(parts)
        return sum(ends[p] - begins[p] for p in parts)
    finally:
        c.close()


class _RecWatcher:
    """Reads the recommendations topic in a thread: latencies, and a few printed as they come."""

    def __init__(self, s: Settings, show: int, log: Log) -> None:
        self.s, self.show, self.log = s, show, log
        self.latencies: list[float] = []
        self.last: dict[str, Recommendation] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from linrec_stream.clients.recommendations import RecommendationReader

        shown, next_show = 0, time.monotonic()
        with RecommendationReader(self.s) as reader:
            while not self._stop.is_set():
                for received in reader.poll(timeout_s=0.3):
                    rec = received.recommendation
                    if rec.ingested_at is not None:  # None: rebuilt by a model swap, no event behind it
                        self.latencies.append(rec.produced_at - rec.ingested_at)
                    self.last[rec.user] = rec
                    if shown < self.show and time.monotonic() >= next_show:
                        shown += 1
                        next_show = time.monotonic() + 2.0
                        self.log(f"  live  {rec.user:>8}: " + " | ".join(rec.items[:3]) + " ...")


def _summary(warm, live, watcher: _RecWatcher, dead: int, total_s: float, log: Log) -> None:
    lat = np.array(watcher.latencies) * 1000 if watcher.latencies else np.array([np.nan])
    log("")
    log("summary")
    log(f"  events replayed     {warm.sent + live.sent:,} ({warm.sent:,} warm-up, {live.sent:,} live)")
    log(f"  live rate           {live.sent / max(live.seconds, 1e-9):,.0f} events/s offered, "
        f"{len(watcher.latencies):,} recommendations received")
    log(f"  end-to-end latency  p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms "
        "(event into Kafka -> recommendation produced)")
    log(f"  dead letters        {dead}")
    log(f"  total time          {total_s:.0f}s")
    for user in list(watcher.last)[-3:]:
        rec = watcher.last[user]
        log(f"  {user}: " + "; ".join(rec.items[:5]))

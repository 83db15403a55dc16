"""Periodic full retraining: warm start from the model in force, compare, publish or reject.

One round (:func:`retrain_once`):

1. read the event archive from Kafka (plus an optional base log that was never replayed into
   Kafka) and build each user's sequence;
2. grow the item vocabulary: the parent's (the version in force) ids stay as they are, items it
   has never seen are appended in sorted order, so the parent's item-embedding rows stay valid;
3. split leave-one-out: each user's newest event is the test target (the held-out most recent
   slice), the second-newest the validation target (early stopping), the rest is training data;
4. warm start: the parent's architecture and every one of its weights, new item rows freshly
   initialised; train into a work folder under ``<registry_dir>/.work/``;
5. evaluate candidate and parent on the same test users (full ranking) and publish the candidate
   iff there is no parent or ``candidate NDCG@10 >= parent NDCG@10 - margin``. Published or not,
   the candidate is registered with its card (decision, data range, both metric sets); a
   published one is promoted and announced on the model-updates topic.

:func:`run_every` repeats rounds on a fixed schedule until stopped.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from linrec_stream.data import Interactions, LeaveOneOut, build_sequences, leave_one_out
from linrec_stream.training.evaluate import evaluate
from linrec_stream.model.run_dir import Vocab, load_run
from linrec_stream.training.experiment import eval_set, format_metrics, remap
from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.model.presets import PRESETS, sized
from linrec_stream.lifecycle.announce import AnnounceError, announce
from linrec_stream.lifecycle.registry import Change, ModelRegistry
from linrec_stream.settings import Settings
from linrec_stream.training.train import TrainConfig, TrainData, train
from linrec_stream.training.warm_start import grow_vocab, grown_config, grown_model, remap_items

Log = Callable[[str], None]
WORK_DIR = ".work"  # under the registry root: same file system, so registering is a cheap copy


class RetrainError(ValueError):
    """A round that cannot be done: no events, too little data, a broken parent version."""


@dataclass(frozen=True)
class RetrainConfig:
    """Settings of a retraining round.

    margin: absolute NDCG@10 the candidate may fall short of the current version and still be
        published (evaluation noise should not block fresh item embeddings).
    from_scratch: do not copy the parent's weights (its architecture is still reused).
    base_data: an extra initial log (data set name or file) merged with the archive, for history
        that was never replayed into Kafka; events also in the archive are counted once.
    history: "window" (each user's last max_len events) or "full" (every event, as the workers
        serve them) for training and for the candidate-versus-current comparison alike.
    scratch: the architecture of a model trained without a parent (the registry's first
        version), a ModelConfig template whose item count the data replace
        (``model.presets``); by default the project's default architecture, as ``train`` uses.
    """

    epochs: int = 20
    patience: int = 3
    lr: float = 1e-3
    batch_size: int = 128
    margin: float = 0.005
    from_scratch: bool = False
    seed: int = 42
    max_minutes: float | None = None
    base_data: str | None = None
    history: str = "window"
    scratch: ModelConfig = field(default_factory=lambda: PRESETS["default"])

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin}")
        self.train_config()  # checks epochs, patience, lr, batch_size, max_minutes, history

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, patience=self.patience,
                           seed=self.seed, max_minutes=self.max_minutes, history=self.history)


@dataclass(frozen=True)
class RetrainResult:
    """What a round did. ``decision`` is "published" or "rejected"; ``reason`` is "first" (no
    parent), "better", "within margin" or "worse"."""

    version: str
    parent: str | None
    decision: str
    reason: str
    candidate: dict[str, float]
    current: dict[str, float] | None
    margin: float
    test_users: int
    num_items: int
    new_items: int
    data: dict
    change: Change | None
    announced: bool
    seconds: float

    @property
    def published(self) -> bool:
        return self.decision == "published"

    def line(self) -> str:
        """The decision line, e.g. ``retrain: published 1a2b3c4d5e6f (NDCG@10 0.1520 vs current
        0.1500, margin 0.0050)``."""
        ndcg = self.candidate["ndcg@10"]
        if self.current is None:
            return f"retrain: published {self.version[:12]} (NDCG@10 {ndcg:.4f}; first version, nothing to compare)"
        cmp = f"NDCG@10 {ndcg:.4f} vs current {self.current['ndcg@10']:.4f}, margin {self.margin:.4f}"
        if self.published:
            return f"retrain: published {self.version[:12]} ({cmp})"
        return f"retrain: rejected {self.version[:12]} ({cmp}): not published, {self.parent[:12]} stays"


# --- data --------------------------------------------------------------------------------------
def load_events(settings: Settings, config: RetrainConfig, log: Log, progress: bool) -> tuple[Interactions, dict]:
    """The archive, merged with the base log if any; returns the log and its description."""
    from linrec_stream.lifecycle.archive import read_archive

    archive = read_archive(settings, log=log, progress=progress)
    info = archive.describe()
    inter = archive.interactions
    if config.base_data:
        inter, base_info = _merge_base(inter, config.base_data, settings, log)
        info["base"] = base_info
    if len(inter) == 0:
        raise RetrainError(f"no events in topic {archive.topic!r} on {settings.bootstrap_servers}"
                           + (" and none in the base data" if config.base_data else "")
                           + ": nothing to train on (replay a log into it first)")
    return inter, info


def _merge_base(archive: Interactions, spec: str, settings: Settings, log: Log) -> tuple[Interactions, dict]:
    """``archive`` plus the base log's events that are not already in it (same user, item, ts):
    a base log partly replayed into Kafka must not count those events twice."""
    from linrec_stream.data import read_interactions, resolve_data

    path = resolve_data(spec, settings.path(settings.data_dir), log=log)
    base = read_interactions(path)
    seen = set(zip(archive.user.tolist(), archive.item.tolist(), archive.ts.tolist()))
    keep = np.fromiter((k not in seen for k in zip(base.user.tolist(), base.item.tolist(), base.ts.tolist())),
                       dtype=bool, count=len(base))
    merged = Interactions(
        user=np.concatenate([base.user[keep], archive.user]), item=np.concatenate([base.item[keep], archive.item]),
        ts=np.concatenate([base.ts[keep], archive.ts]), source=f"{path}+{archive.source}",
    )
    dup = int(len(base) - keep.sum())
    log(f"base data: {path} - {len(base):,} events, {int(keep.sum()):,} added"
        + (f" ({dup:,} already in the archive)" if dup else ""))
    return merged, {"source": str(path), "events": len(base), "added": int(keep.sum())}


# --- one round ---------------------------------------------------------------------------------
def retrain_once(settings: Settings, config: RetrainConfig, device: torch.device, log: Log = print,
                 progress: bool = False) -> RetrainResult:
    """Retrain on the whole archive, evaluate against the version in force, publish or reject."""
    t0 = time.monotonic()
    registry = ModelRegistry(settings.path(settings.registry_dir))
    parent_id = registry.current()
    parent_model, parent_vocab = _load_parent(registry, parent_id, device)

    inter, data_info = load_events(settings, config, log, progress)
    seqs = build_sequences(inter)
    new_items = 0
    if parent_vocab is not None:
        vocab = grow_vocab(parent_vocab, seqs.vocab)
        new_items = len(vocab) - len(parent_vocab)
        seqs = remap_items(seqs, vocab)
        log(f"cold-start items: {new_items} new since parent {parent_id[:12]}")
    split = leave_one_out(seqs)
    if split.num_eval == 0:
        raise RetrainError(f"too little data: no user has 3 or more events ({seqs.num_events} events, "
                           f"{len(seqs.users)} users)")
    data_info.update(users=len(seqs.users), items=seqs.num_items, new_items=new_items,
                     test_users=split.num_eval)
    log(f"data: {seqs.num_events:,} events, {len(seqs.users):,} users, {seqs.num_items:,} items; "
        f"{split.num_eval:,} test users (newest event held out)")

    mc, init = _candidate_setup(parent_model, seqs.num_items, config, device, log)
    work_root = registry.root / WORK_DIR
    work_root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="retrain-", dir=work_root))
    try:
        tc = config.train_config()
        data = TrainData(split.train, eval_set(split, "valid"), seqs.vocab)
        model, _ = train(mc, tc, data, run_dir, device, meta={"data": data_info, "parent": parent_id},
                         progress=progress, log=log, init_weights=init)
        test = eval_set(split, "test")
        cand = evaluate(model, test, batch_size=tc.eval_batch_size, history=tc.history)
        log("candidate: " + format_metrics(cand))
        current = None
        if parent_model is not None:
            current, known = _evaluate_parent(parent_model, parent_vocab, split, tc, cand)
            log(f"current:   {format_metrics(current)}  ({known:,} of {split.num_eval:,} test targets known to it)")
        decision, reason = decide(cand, current, config.margin)
        metrics = {"candidate": cand, "current": current, "margin": config.margin, "test_users": split.num_eval}
        card = registry.add(run_dir, origin="retrain", parent=parent_id, decision=decision, data=data_info,
                            metrics=metrics)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    change, announced = None, False
    if decision == "published":
        change = registry.promote(card.version)
        announced = _announce(settings, change, log)
    result = RetrainResult(
        version=card.version, parent=parent_id, decision=decision, reason=reason, candidate=cand, current=current,
        margin=config.margin, test_users=split.num_eval, num_items=seqs.num_items, new_items=new_items,
        data=data_info, change=change, announced=announced, seconds=time.monotonic() - t0,
    )
    log(result.line())
    return result


def decide(candidate: dict[str, float], current: dict[str, float] | None, margin: float) -> tuple[str, str]:
    """("published" | "rejected", reason): publish iff there is no current version or the
    candidate's NDCG@10 is at least the current's minus ``margin``."""
    if current is None:
        return "published", "first"
    c, p = candidate["ndcg@10"], current["ndcg@10"]
    if c >= p:
        return "published", "better"
    if c >= p - margin:
        return "published", "within margin"
    return "rejected", "worse"


def _load_parent(registry: ModelRegistry, version: str | None,
                 device: torch.device) -> tuple[LinRecModel | None, Vocab | None]:
    if version is None:
        return None, None
    try:
        return load_run(registry.path(version), device)
    except (FileNotFoundError, ValueError) as exc:
        raise RetrainError(f"the current version {version[:12]} cannot be loaded: {exc}") from None


def _candidate_setup(parent: LinRecModel | None, num_items: int, config: RetrainConfig, device: torch.device,
                     log: Log) -> tuple[ModelConfig, dict[str, Tensor] | None]:
    """The candidate's ModelConfig and its initial weights (None: random init)."""
    if parent is None:
        mc = sized(config.scratch, num_items)
        log(f"no current version: training {mc.attention} from scratch "
            f"(hidden {mc.hidden_size}, layers {mc.num_layers}, max_len {mc.max_len})")
        return mc, None
    if config.from_scratch:
        log(f"from scratch with the current version's architecture ({num_items:,} items)")
        return grown_config(parent.config, num_items), None
    mc, init = grown_model(parent, num_items, config.seed)
    log(f"warm start from the current version: {parent.config.num_items:,} -> {num_items:,} items")
    return mc, init


def _evaluate_parent(parent: LinRecModel, parent_vocab: Vocab, split: LeaveOneOut, tc: TrainConfig,
                     names: Iterable[str]) -> tuple[dict[str, float], int]:
    """The parent's metrics on the test users, over all of them: histories are mapped into its
    vocabulary (unknown items dropped) and a user whose target it does not know is a miss (it
    cannot recommend an item it has never seen), so each mean is scaled by known / total."""
    data, _unknown = remap(split, parent_vocab, "test")
    total, known = split.num_eval, len(data)
    if known == 0:  # every target is new to it: all misses
        return {k: 0.0 for k in names}, 0
    m = evaluate(parent, data, batch_size=tc.eval_batch_size, history=tc.history)
    return {k: v * known / total for k, v in m.items()}, known


def _announce(settings: Settings, change: Change, log: Log) -> bool:
    """Announce a promotion. CURRENT.json is the source of truth: a failed announcement only
    means workers pick the version up at their next start, so it is reported, not raised."""
    try:
        announce(settings, change)
        return True
    except AnnounceError as exc:
        log(f"retrain: warning: {exc}")
        return False


# --- the schedule --------------------------------------------------------------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """"30s", "15m", "24h", "2d" (also "1.5h") -> seconds (> 0). Raises ValueError otherwise."""
    m = _DURATION.match(text or "")
    if not m:
        raise ValueError(f"expected a duration such as 30s, 15m, 24h or 2d, got {text!r}")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"a duration must be > 0, got {text!r}")
    return seconds


def run_every(settings: Settings, config: RetrainConfig, every_s: float, device: torch.device, log: Log = print,
              stop: threading.Event | None = None, progress: bool = False, max_rounds: int | None = None) -> int:
    """Retrain now and then every ``every_s`` seconds until ``stop`` is set (or ``max_rounds``
    rounds have run); returns the number of rounds. A failing round is logged and the schedule
    goes on; a round that overruns its slot skips the slots it missed rather than piling up."""
    stop = stop or threading.Event()
    rounds = 0
    next_at = time.monotonic()
    while not stop.is_set():
        rounds += 1
        try:
            retrain_once(settings, config, device, log=log, progress=progress)
        except Exception as exc:  # noqa: BLE001 - one bad round must not end the schedule
            log(f"retrain: round {rounds} failed: {type(exc).__name__}: {exc}")
        if max_rounds is not None and rounds >= max_rounds:
            break
        now = time.monotonic()
        next_at += every_s * max(1, math.ceil((now - next_at) / every_s))
        log(f"retrain: next round in {_human(next_at - now)}")
        stop.wait(next_at - now)
    return rounds


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"

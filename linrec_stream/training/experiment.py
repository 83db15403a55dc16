"""From a data spec to a trained, evaluated run directory, and back: what `train` and
`evaluate` on the command line do, as functions."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from linrec_stream.data import LeaveOneOut, build_sequences, leave_one_out, read_interactions, resolve_data
from linrec_stream.training.evaluate import EvalSet, evaluate, popularity_baseline, popularity_counts
from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.model.run_dir import META_FILE, Vocab
from linrec_stream.training.train import TrainConfig, TrainData, train
from linrec_stream.training.warm_start import grow_vocab, grown_model, remap_items

Log = Callable[[str], None]


@dataclass(frozen=True)
class Prepared:
    source: Path
    split: LeaveOneOut
    skipped: int

    def describe(self) -> dict:
        d = self.split.data
        return {"source": str(self.source), "events": int(d.num_events), "users": len(d.users),
                "items": d.num_items, "evaluated_users": self.split.num_eval, "skipped_lines": self.skipped}


def prepare(spec: str, data_dir: Path, skip_malformed: bool = False, log: Log = print,
            base_vocab: Vocab | None = None) -> Prepared:
    """Resolve (fetching if needed), read, order and split a data set.

    ``base_vocab``: item ids to keep (a model's vocabulary, to start from it); the data's other
    items are numbered after them (``warm_start.grow_vocab``)."""
    t0 = time.monotonic()
    path = resolve_data(spec, data_dir, log=log)
    inter = read_interactions(path, skip_malformed=skip_malformed)
    seqs = build_sequences(inter)
    if base_vocab is not None:
        seqs = remap_items(seqs, grow_vocab(base_vocab, seqs.vocab))
    split = leave_one_out(seqs)
    p = Prepared(path, split, inter.skipped)
    d = p.describe()
    log(f"data: {path} - {d['events']:,} events, {d['users']:,} users, {d['items']:,} items"
        + (f", {inter.skipped} malformed lines skipped" if inter.skipped else "")
        + f" ({time.monotonic() - t0:.1f}s)")
    return p


def eval_set(split: LeaveOneOut, which: str) -> EvalSet:
    if which == "valid":
        return EvalSet(split.valid_input, split.valid_target)
    if which == "test":
        return EvalSet(split.test_input, split.test_target)
    raise ValueError(f"split must be 'valid' or 'test', got {which!r}")


@dataclass(frozen=True)
class InitFrom:
    """A warm start for ``run_training``: the weights to begin with, and where they came from."""

    weights: dict[str, torch.Tensor]
    source: dict  # recorded in meta.json: the run directory and its model version


def init_from_run(model_dir: Path, parent: LinRecModel, vocab: Vocab, prepared: Prepared, seed: int,
                  log: Log = print) -> tuple[ModelConfig, InitFrom]:
    """The architecture and initial weights of a run that starts from ``parent``, the best model
    of ``model_dir`` with its item ``vocab`` (as ``run_dir.load_run`` gives them).

    ``prepared`` must have been prepared with ``vocab`` as ``base_vocab``, so its items keep their
    ids; items the model does not know get fresh rows."""
    num_items = prepared.split.data.num_items
    if prepared.split.data.vocab[: len(vocab)] != list(vocab.items):
        raise ValueError(f"the data was not prepared with {model_dir}'s vocabulary")
    mc, weights = grown_model(parent, num_items, seed)
    log(f"starting from {model_dir} (version {parent.version[:12]}, {parent.config.attention}, "
        f"{parent.config.num_items:,} -> {num_items:,} items)")
    return mc, InitFrom(weights, {"dir": str(model_dir), "version": parent.version})


#: ModelConfig fields a run started from a model may change: they shape no weight.
FREE_FIELDS = frozenset({"dropout"})


class ArchitectureError(ValueError):
    """An override that a run started from a model cannot take; ``field`` is the ModelConfig
    field, so a caller can name its own spelling of it (a command-line flag, say)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ArchitectureConflict(ArchitectureError):
    """An override that contradicts the parent's architecture (``kept``): its weights have that
    shape, so the value cannot change."""

    def __init__(self, field: str, value: object, kept: object) -> None:
        super().__init__(field, f"{field} {value}: the parent model has {field} {kept} (its architecture is kept)")
        self.value, self.kept = value, kept


def inherit_architecture(config: ModelConfig, overrides: Mapping[str, object]) -> ModelConfig:
    """The config of a run that starts from a model of config ``config`` (``init_from_run``'s),
    given the architecture values a user set explicitly (ModelConfig field -> value).

    The architecture is the parent's: an override equal to it is accepted (it says nothing new),
    one that differs raises ``ArchitectureConflict``; only the ``FREE_FIELDS`` may change, and an
    invalid value for one raises ``ArchitectureError``. Overrides are checked in their order,
    so the first wrong one is reported."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, value in overrides.items():
        if name not in known:
            raise ArchitectureError(name, f"{name}: not a ModelConfig field")
        if name not in FREE_FIELDS and value != getattr(config, name):
            raise ArchitectureConflict(name, value, getattr(config, name))
    for name in FREE_FIELDS & overrides.keys():
        try:
            config = dataclasses.replace(config, **{name: overrides[name]})
        except ValueError as exc:  # ModelConfig's own check of the value
            raise ArchitectureError(name, str(exc)) from None
    return config


def run_training(
    prepared: Prepared, model_config: ModelConfig, train_config: TrainConfig, out: Path,
    device: torch.device, resume: bool = False, progress: bool = True, log: Log = print,
    init: InitFrom | None = None,
) -> dict:
    """Train (from ``init``'s weights if given), then evaluate the best model on the test users;
    returns the test metrics (also written to ``out/meta.json`` with the popularity baseline)."""
    split = prepared.split
    data = TrainData(split.train, eval_set(split, "valid"), split.data.vocab)
    meta = {"data": prepared.describe(), "device": str(device)}
    if init is not None:
        meta["init_from"] = init.source
    model, hist = train(model_config, train_config, data, out, device, resume=resume, meta=meta,
                        progress=progress, log=log, init_weights=None if init is None else init.weights)
    test = eval_set(split, "test")
    metrics = evaluate(model, test, batch_size=train_config.eval_batch_size, history=train_config.history)
    pop = popularity_baseline(test, popularity_counts(split.train, split.data.num_items))
    meta_path = out / META_FILE
    saved = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    saved.update({"model_version": model.version, "test_full": metrics, "popularity_test_full": pop})
    meta_path.write_text(json.dumps(saved, indent=2))
    scope = "" if train_config.history == "window" else ", whole histories"
    log(f"test (full ranking{scope}): " + format_metrics(metrics))
    log("popularity baseline: " + format_metrics(pop))
    return metrics


class NothingToEvaluate(ValueError):
    """No user of the split has a target item the model knows (the data share no items with it)."""


@dataclass(frozen=True)
class RunEvaluation:
    """What ``evaluate_run`` measured, and on what: the model, the data, the protocol, the users
    evaluated (and skipped: their target is unknown to the model) and the metrics."""

    model_version: str
    attention: str
    data: str
    split: str
    protocol: str
    history: str
    users: int
    skipped_users: int
    metrics: dict[str, float]

    def to_dict(self) -> dict:
        """One flat record (the metrics beside the rest), as ``evaluate --json`` prints it."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "metrics"}
        return {**fields, **self.metrics}


def evaluate_run(model: LinRecModel, vocab: Vocab, prepared: Prepared, split: str = "test",
                 protocol: str = "full", seed: int = 0, history: str = "window") -> RunEvaluation:
    """Evaluate a trained model (``run_dir.load_run``'s model and vocabulary) on the ``split``
    users of ``prepared``, data that need not be the data it was trained on: their items are
    mapped into its ids (``remap``).

    ``protocol``: "full" (rank every item) or "pop100" (the target against 100 negatives drawn
    by popularity, seeded by ``seed``); the popularity counts are the users' training events
    (the "valid" inputs: every event but the test target), so the test target never counts.
    ``history``: "window" (the last max_len events, as in training) or "full" (every event, as a
    worker's state holds them). Raises ``NothingToEvaluate`` if no target is known."""
    data, skipped = remap(prepared.split, vocab, split)
    if len(data) == 0:
        raise NothingToEvaluate("no user's target item is known to the model")
    train_seqs = [s[s != 0] for s in remap(prepared.split, vocab, "valid")[0].inputs]
    pop = popularity_counts(train_seqs, model.config.num_items)
    metrics = evaluate(model, data, protocol=protocol, popularity=pop, seed=seed, history=history)
    return RunEvaluation(model.version, model.config.attention, str(prepared.source), split, protocol, history,
                         len(data), skipped, metrics)


def remap(split: LeaveOneOut, vocab: Vocab, which: str) -> tuple[EvalSet, int]:
    """The ``which`` users of ``split`` in the model's item ids. Items the model does not know
    are dropped from histories; users whose target it does not know are skipped (counted)."""
    data_vocab = split.data.vocab
    es = eval_set(split, which)
    if data_vocab == list(vocab.items):
        return es, 0
    to_model = np.array([vocab.index.get(s, 0) for s in data_vocab], dtype=np.int64)
    inputs, targets, skipped = [], [], 0
    for seq, t in zip(es.inputs, es.targets):
        if to_model[t] == 0:
            skipped += 1
            continue
        mapped = to_model[seq]
        inputs.append(mapped[mapped != 0])
        targets.append(to_model[t])
    return EvalSet(inputs, np.array(targets, dtype=np.int64)), skipped


def format_metrics(m: dict[str, float]) -> str:
    return "  ".join(f"{k.upper()} {v:.4f}" for k, v in m.items())

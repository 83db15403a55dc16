"""Training: cross-entropy over all items, early stopping on validation NDCG@10, resumable.

Causal models learn next-item prediction at every position of each user's training sequence
(inputs ``s[:-1]``, targets ``s[1:]``, SASRec-style). With ``history="window"`` (the field's
protocol) that sequence is the user's last ``max_len + 1`` items; with ``history="full"`` it is all
of them, positions clamped at ``max_len - 1``: exactly what a stream worker's state has applied,
so the model is trained on what it serves, and every event is a target. The offline
bidirectional LinRec sees a whole window, so it learns from the last position only; it draws a
fresh random cut of each user's sequence every epoch (the counterpart of RecBole's every-prefix
augmentation).

A run directory holds:
    model.pt      best model so far (config, weights, version id; ``LinRecModel.load``)
    vocab.json    item vocabulary: external id of each item id (index 0 = padding)
    meta.json     training config, data, per-epoch history, best epoch, validation/test metrics
    last.pt       everything needed to resume after the last finished epoch
    curves.png    training loss and validation metrics per epoch
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from linrec_stream.training.evaluate import HISTORIES, EvalSet, batch_ranges, evaluate, left_pad
from linrec_stream.model import LinRecModel, ModelConfig
# resolve_device moved to the model layer (a worker needs it without training code); it is
# re-exported here for the callers that import it from training.
from linrec_stream.model.device import resolve_device  # noqa: F401
from linrec_stream.model.run_dir import MODEL_FILE, Vocab, load_run, save_run
from linrec_stream.model.ops import OPS


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the model's own are in ModelConfig)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    seed: int = 42
    eval_batch_size: int = 256
    max_minutes: float | None = None  # wall-clock budget: no new epoch starts after it
    # "window": each user's last max_len events (the protocol); "full": every event, as served.
    # Validation and test then encode histories the same way.
    history: str = "window"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.history not in HISTORIES:
            raise ValueError(f"history must be one of {HISTORIES}, got {self.history!r}")


@dataclass(frozen=True)
class TrainData:
    """What the trainer needs: the training sequences and the validation users."""

    train_seqs: list[np.ndarray]  # each user's training items in time order (ids 1..I)
    valid: EvalSet
    vocab: list[str]  # external id of each item id; vocab[0] is padding

    @property
    def num_items(self) -> int:
        return len(self.vocab) - 1


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_ndcg: float = -math.inf
    bad_epochs: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- batches ---------------------------------------------------------------------------------
def causal_batch(seqs: list[np.ndarray], max_len: int | None) -> tuple[Tensor, Tensor]:
    """Inputs and next-item targets, both (B, N) left-padded with 0; N <= max_len, or (None) the
    longest sequence less one."""
    windows = seqs if max_len is None else [s[-(max_len + 1):] for s in seqs]
    return left_pad([w[:-1] for w in windows]), left_pad([w[1:] for w in windows])


def last_position_batch(seqs: list[np.ndarray], max_len: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """A random cut of each sequence: inputs (B, N) left-padded, targets (B,) the item after."""
    cuts = [int(rng.integers(1, len(s))) for s in seqs]
    inputs = left_pad([s[max(0, c - max_len):c] for s, c in zip(seqs, cuts)])
    targets = torch.tensor([int(s[c]) for s, c in zip(seqs, cuts)], dtype=torch.int64)
    return inputs, targets


def epoch_batches(seqs: list[np.ndarray], tc: TrainConfig, max_len: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches: indices into ``seqs``, every sequence exactly once, in random order.

    Windows: batch_size users each. Whole histories: users of similar length together (sorted
    within random blocks of 16 batches, so padding stays small), at most batch_size users and
    batch_size × max_len padded events per batch (the cost of a full window batch).
    """
    order = rng.permutation(len(seqs))
    if tc.history == "window":
        return [order[i:i + tc.batch_size] for i in range(0, len(order), tc.batch_size)]
    block = 16 * tc.batch_size
    lengths = np.array([len(s) for s in seqs])
    order = np.concatenate([b[np.argsort(lengths[b], kind="stable")]
                            for b in np.split(order, range(block, len(order), block))])
    ranges = batch_ranges([seqs[i] for i in order], tc.batch_size, tc.batch_size * max_len)
    return [order[a:b] for a, b in (ranges[j] for j in rng.permutation(len(ranges)))]


def batch_loss(
    model: LinRecModel, seqs: list[np.ndarray], rng: np.random.Generator, history: str = "window",
) -> Tensor:
    """Mean cross-entropy over all items for one batch of users (every target position counts
    once, so a long history weighs in proportion to its events)."""
    device = model.device
    if model.op.streamable:
        inputs, targets = causal_batch(seqs, model.config.max_len if history == "window" else None)
        inputs, targets = inputs.to(device), targets.to(device)
        h = model(inputs)  # (B, N, D)
        keep = targets != 0
        logits = model.score(h[keep])  # (P, I+1): only real positions, not B·N·I
        return F.cross_entropy(logits, targets[keep])
    inputs, targets = last_position_batch(seqs, model.config.max_len, rng)
    h = model(inputs.to(device))[:, -1]  # (B, D)
    return F.cross_entropy(model.score(h), targets.to(device))


# --- the loop --------------------------------------------------------------------------------
def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: TrainData,
    out: Path,
    device: torch.device,
    resume: bool = False,
    meta: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    init_weights: dict[str, Tensor] | None = None,
) -> tuple[LinRecModel, History]:
    """Train until ``epochs`` or early stopping; returns the best model (eval mode) and history.

    With ``resume``, continues from ``out/last.pt`` exactly where it stopped (same RNG streams,
    so a resumed run reproduces an uninterrupted one on CPU).

    ``init_weights``: a full state dict for ``model_config`` to start from instead of the random
    initialisation (a warm start); ignored with ``resume``, whose checkpoint has the weights.
    """
    from tqdm import tqdm

    if train_config.history == "full" and not OPS[model_config.attention].streamable:
        raise ValueError(f"history 'full' needs a causal attention; {model_config.attention} "
                         "sees a whole window at once")
    out.mkdir(parents=True, exist_ok=True)
    usable = [s for s in data.train_seqs if len(s) >= 2]
    if not usable:
        raise ValueError("no user has two or more training interactions")
    seed_everything(train_config.seed)
    model = LinRecModel(model_config).to(device)
    if init_weights is not None and not resume:
        model.load_state_dict(init_weights)  # before the optimizer exists: it starts from these
    # Weight decay would pull linrec_decay's log rates towards 0, i.e. γ towards 1/e: not a prior
    # anyone wants, so those (like nothing else) are left out of it.
    rates = [p for n, p in model.named_parameters() if n.endswith("log_decay_rate")]
    others = [p for n, p in model.named_parameters() if not n.endswith("log_decay_rate")]
    groups = [{"params": others}] + ([{"params": rates, "weight_decay": 0.0}] if rates else [])
    opt = torch.optim.Adam(groups, lr=train_config.lr, weight_decay=train_config.weight_decay)
    hist = History()
    start_epoch = 0
    if resume:
        start_epoch, hist = _load_last(out, model, opt, model_config, train_config)
        log(f"resuming after epoch {start_epoch} (best so far: epoch {hist.best_epoch + 1}, "
            f"NDCG@10 {hist.best_ndcg:.4f})")
    vocab = Vocab.of(data.vocab)
    vocab.save(out)
    if hist.best_epoch < 0 and not (out / MODEL_FILE).exists():
        save_run(out, model, vocab)  # so a run interrupted in epoch 1 still leaves a loadable model

    started = time.monotonic()
    budget_s = None if train_config.max_minutes is None else 60.0 * train_config.max_minutes
    last_plot = -math.inf
    for epoch in range(start_epoch, train_config.epochs):
        if hist.bad_epochs >= train_config.patience:
            break
        if budget_s is not None and epoch > start_epoch and time.monotonic() - started >= budget_s:
            log(f"time budget reached: {train_config.max_minutes:g} min, stopping before epoch {epoch + 1}")
            break
        t0 = time.monotonic()
        model.train()
        rng = np.random.default_rng([train_config.seed, epoch])
        batches = epoch_batches(usable, train_config, model_config.max_len, rng)
        total, n = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress)
        for idx in bar:
            loss = batch_loss(model, [usable[i] for i in idx], rng, train_config.history)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
            bar.set_postfix(loss=f"{total / n:.4f}")
        bar.close()
        train_s = time.monotonic() - t0
        valid = evaluate(model, data.valid, batch_size=train_config.eval_batch_size,
                         history=train_config.history)
        row = {"epoch": epoch + 1, "loss": total / n, "train_s": train_s,
               "eval_s": time.monotonic() - t0 - train_s, **{f"valid_{k}": v for k, v in valid.items()}}
        if (half_lives := model.decay_half_lives()) is not None:
            row["decay_half_lives"] = [[round(x, 2) for x in layer] for layer in half_lives]
        hist.epochs.append(row)
        improved = valid["ndcg@10"] > hist.best_ndcg
        if improved:
            hist.best_ndcg, hist.best_epoch, hist.bad_epochs = valid["ndcg@10"], epoch, 0
            save_run(out, model, vocab)
        else:
            hist.bad_epochs += 1
        log(f"epoch {epoch + 1:>3}  loss {row['loss']:.4f}  valid HR@10 {valid['hr@10']:.4f} "
            f"NDCG@10 {valid['ndcg@10']:.4f}  {train_s:.1f}s+{row['eval_s']:.1f}s" + ("  *best" if improved else ""))
        _save_last(out, model, opt, epoch + 1, hist, model_config, train_config)
        _write_meta(out, model_config, train_config, hist, meta or {})
        # A plot costs ~0.3 s: on a GPU, where an epoch can take about as long, redraw at most
        # every 30 s (and once at the end).
        if time.monotonic() - last_plot >= 30.0:
            plot_curves(hist, out / "curves.png")
            last_plot = time.monotonic()
    if hist.epochs:
        plot_curves(hist, out / "curves.png")
    if hist.bad_epochs >= train_config.patience:
        log(f"early stop: no better validation NDCG@10 for {train_config.patience} epochs")
    best, _ = load_run(out, device)
    return best, hist


def _save_last(out: Path, model, opt, epoch: int, hist: History, mc: ModelConfig, tc: TrainConfig) -> None:
    tmp = out / "last.pt.tmp"
    torch.save({
        "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "history": asdict(hist), "model_config": mc.to_dict(), "train_config": asdict(tc),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }, tmp)
    tmp.replace(out / "last.pt")  # atomic: an interrupt never leaves half a checkpoint


def _load_last(out: Path, model, opt, mc: ModelConfig, tc: TrainConfig) -> tuple[int, History]:
    path = out / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume: {path} does not exist (no earlier run in {out})")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck["model_config"] != mc.to_dict():
        raise ValueError(f"--resume: {out} was trained with another model configuration")
    free = ("epochs", "max_minutes")  # how long to go on may change; how to train may not
    saved = {**asdict(TrainConfig()), **ck["train_config"]}  # settings added since take their defaults
    if {k: v for k, v in saved.items() if k not in free} != \
            {k: v for k, v in asdict(tc).items() if k not in free}:
        raise ValueError(f"--resume: {out} was trained with other training settings "
                         "(only --epochs and --max-minutes may change)")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(_regrouped(ck["optimizer"], model, opt))
    torch.set_rng_state(ck["torch_rng"])
    if ck.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
    return ck["epoch"], History(**ck["history"])


def _regrouped(saved: dict, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """``saved`` optimiser state in ``opt``'s grouping. Runs saved before linrec_decay's rates got
    their own group (the one without weight decay) have a single group over every parameter in
    model order; their Adam moments are moved to where each parameter sits now."""
    if len(saved["param_groups"]) != 1 or len(opt.param_groups) == 1:
        return saved  # the layout it was saved in (or one we cannot map: torch's own error says so)
    position = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    order = [position[id(p)] for g in opt.param_groups for p in g["params"]]  # saved index of each slot
    state = {new: saved["state"][old] for new, old in enumerate(order) if old in saved["state"]}
    groups, start = [], 0
    for g in opt.param_groups:
        end = start + len(g["params"])
        groups.append({**saved["param_groups"][0], "weight_decay": g["weight_decay"],
                       "params": list(range(start, end))})
        start = end
    return {"state": state, "param_groups": groups}


def _write_meta(out: Path, mc: ModelConfig, tc: TrainConfig, hist: History, extra: dict) -> None:
    best = hist.epochs[hist.best_epoch] if hist.best_epoch >= 0 else {}
    meta = {
        **extra,
        "model_config": mc.to_dict(),
        "train_config": asdict(tc),
        "best_epoch": hist.best_epoch + 1,
        "best_valid": {k[len("valid_"):]: v for k, v in best.items() if k.startswith("valid_")},
        "epochs": hist.epochs,
    }
    path = out / "meta.json"
    if path.exists():
        # Keep keys written by others (e.g. test metrics, model version of the best checkpoint).
        old = json.loads(path.read_text())
        meta = {**old, **meta}
    path.write_text(json.dumps(meta, indent=2))


def plot_curves(hist: History, path: Path) -> None:
    """Training loss and validation HR@10 / NDCG@10 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in hist.epochs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep, [r["loss"] for r in hist.epochs], marker=".")
    a.set(xlabel="epoch", ylabel="training loss (CE)", title="training loss")
    b.plot(ep, [r["valid_hr@10"] for r in hist.epochs], marker=".", label="HR@10")
    b.plot(ep, [r["valid_ndcg@10"] for r in hist.epochs], marker=".", label="NDCG@10")
    if hist.best_epoch >= 0:
        b.axvline(hist.best_epoch + 1, color="grey", linestyle=":", label="best")
    b.set(xlabel="epoch", title="validation (full ranking)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

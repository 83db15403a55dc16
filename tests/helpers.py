"""Helpers shared by test modules (fixtures stay in conftest.py): synthetic training logs, run
directories, and driving a worker child process against the broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from consumers.serving import ServingModel
from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.settings import Settings
from state.store import StateStore

if TYPE_CHECKING:
    from linrec_stream.training.evaluate import EvalSet
    from linrec_stream.training.train import TrainData

# --- training: a log with a learnable pattern --------------------------------------------------------
CYCLE_ITEMS = 200  # the item cycle of cycle_log


def cycle_log(users: int = 300, length: int = 24, noise: float = 0.1, seed: int = 0) -> list[np.ndarray]:
    """Each user walks the item cycle 1 -> 2 -> ... -> 200 -> 1 from a random start, with a
    random jump now and then: the next item is predictable from the last one."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(users):
        item = int(rng.integers(1, CYCLE_ITEMS + 1))
        seq = [item]
        for _ in range(length - 1):
            item = int(rng.integers(1, CYCLE_ITEMS + 1)) if rng.random() < noise else item % CYCLE_ITEMS + 1
            seq.append(item)
        seqs.append(np.array(seq, dtype=np.int64))
    return seqs


def write_cycle_csv(path: Path, users: int, length: int, seed: int) -> Path:
    """``cycle_log`` as a user,item,timestamp CSV, the way a user brings their own log."""
    rows = ["user,item,timestamp"]
    for u, seq in enumerate(cycle_log(users=users, length=length, seed=seed)):
        rows += [f"u{u},i{item},{1000 + t}" for t, item in enumerate(seq)]
    path.write_text("\n".join(rows) + "\n")
    return path


def split(seqs: list[np.ndarray]) -> tuple[TrainData, EvalSet]:
    """Leave-one-out: train on all but the last two events, validate on the second-last, test
    on the last."""
    from linrec_stream.training.evaluate import EvalSet
    from linrec_stream.training.train import TrainData

    vocab = ["<pad>"] + [f"item{i}" for i in range(1, CYCLE_ITEMS + 1)]
    valid = EvalSet([s[:-2] for s in seqs], np.array([s[-2] for s in seqs]))
    test = EvalSet([s[:-1] for s in seqs], np.array([s[-1] for s in seqs]))
    return TrainData([s[:-2] for s in seqs], valid, vocab), test


def small_config(attention: str) -> ModelConfig:
    return ModelConfig(num_items=CYCLE_ITEMS, hidden_size=32, num_layers=1, num_heads=2, attention=attention,
                       max_len=16, dropout=0.1, inner_size=64)


# --- serving: tiny models, run directories and worker processes -------------------------------------
def item_vocab(num_items: int) -> list[str]:
    """``<pad>``, then items ``i1`` .. ``i<num_items>``."""
    return ["<pad>"] + [f"i{k}" for k in range(1, num_items + 1)]


def tiny_serving(seed: int, num_items: int, attention: str = "linrec") -> ServingModel:
    """A tiny random model (width 8, one layer) over ``item_vocab(num_items)``, ready to serve."""
    torch.manual_seed(seed)
    cfg = ModelConfig(num_items=num_items, hidden_size=8, num_layers=1, num_heads=2, attention=attention,
                      max_len=16, dropout=0.0, inner_size=16)
    return ServingModel.of(LinRecModel(cfg), item_vocab(num_items))


def write_run(path: Path, model: LinRecModel, vocab: Sequence[str]) -> Path:
    """A run directory as `train` writes it for serving: model.pt and vocab.json."""
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / "model.pt")
    (path / "vocab.json").write_text(json.dumps({"items": list(vocab)}))
    return path


def start_worker_args(state_dir: Path, idle_exit: float | None, batch_size: int, model_dir: Path | None) -> list[str]:
    """`linrec-stream worker` as a child process runs it (model_dir None: the registry's version)."""
    args = [sys.executable, "-m", "linrec_stream.cli", "worker", "--state-dir", str(state_dir),
            "--batch-size", str(batch_size), "--batch-ms", "20", "--device", "cpu"]
    if model_dir is not None:
        args += ["--model", str(model_dir)]
    if idle_exit is not None:
        args += ["--idle-exit", str(idle_exit)]
    return args


def wait(proc: subprocess.Popen, timeout: float = 240) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a worker behind to load the rest of the suite
        proc.wait()
        raise AssertionError(f"the worker did not finish within {timeout:.0f}s") from None
    assert code == 0, f"worker exited with {code}"


def read_topic(settings: Settings, topic: str, timeout_s: float = 10.0) -> list:
    """Every record of ``topic`` from the beginning (no consumer group)."""
    from linrec_stream.clients.connection import KafkaConnection

    consumer = KafkaConnection.from_settings(settings).consumer(topic, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=int(timeout_s * 1000))
    records = list(consumer)
    consumer.close()
    return records


def stored_records(state_dir: Path) -> dict:
    """{user: UserRecord} of a worker's state directory."""
    with StateStore(state_dir) as store:
        return {r.user: r for r in store.records()}


# --- in-memory fakes of the worker's parts (consumers/transport.py, consumers/checkpoint.py) ---------
class FakeProducer:
    """Records every send; ``flush`` raises when ``fail`` is set. ``calls`` is shared with the
    other fakes, so a test sees the order of everything done."""

    def __init__(self, calls: list, fail: bool = False) -> None:
        self.calls, self.fail, self.sent = calls, fail, []
        self.sent_to: list[tuple[int | None, int | None]] = []  # (partition, timestamp_ms) of each send

    def send(self, topic, value=None, key=None, headers=None, partition=None, timestamp_ms=None):
        self.sent.append((topic, key, value, list(headers or [])))
        self.calls.append(("send", topic))
        self.sent_to.append((partition, timestamp_ms))

    def flush(self) -> None:
        if self.fail:
            raise TimeoutError("flush: the broker did not acknowledge")
        self.calls.append(("flush",))

    def close(self) -> None:
        self.calls.append(("close", "producer"))


class FakeChangelog:
    """Records what is published (``publish`` raises ChangelogError when ``fail`` is set) and
    restores nothing."""

    def __init__(self, calls: list, fail: bool = False) -> None:
        self.calls, self.fail, self.published = calls, fail, []

    def publish(self, records) -> int:
        from state.changelog import ChangelogError

        records = list(records)
        if self.fail:
            raise ChangelogError("publishing to changelog failed: broker down")
        self.published += records
        self.calls.append(("changelog", [r.user for r in records]))
        return len(records)

    def restore(self, store, partitions) -> dict[int, int]:
        self.calls.append(("restore", sorted(partitions)))
        return {}

    def close(self) -> None:
        self.calls.append(("close", "changelog"))

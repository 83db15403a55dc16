"""The run directory: the files a trained model is kept in, written by training and read by the
registry, the worker and the command line. One place knows the file names and the format.

A run directory (``train --out DIR``, or a registry version folder) holds::

    model.pt     the best model: config, weights, version id (``LinRecModel.save``)
    vocab.json   {"items": [external id of item id 0, 1, ...]}; id 0 is padding

and, from training, ``meta.json``, ``curves.png`` and ``last.pt`` (the resume point), which
serving does not need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .linrec import LinRecModel

MODEL_FILE = "model.pt"
VOCAB_FILE = "vocab.json"
META_FILE = "meta.json"
RESUME_FILE = "last.pt"
CURVES_FILE = "curves.png"
#: What a directory must hold to be served.
MODEL_FILES = (MODEL_FILE, VOCAB_FILE)


class RunDirError(ValueError):
    """Not a trained model directory, or its files disagree."""


@dataclass(frozen=True)
class Vocab:
    """The item vocabulary: ``items[k]`` is the external id of model item id ``k`` (``items[0]``
    is padding, never an item) and ``index`` maps back (padding excluded)."""

    items: tuple[str, ...]
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(self.items))
        object.__setattr__(self, "index", {s: k for k, s in enumerate(self.items) if k > 0})

    @classmethod
    def of(cls, items: Iterable[str]) -> Vocab:
        return cls(tuple(items))

    @property
    def num_items(self) -> int:
        """Real items (padding not counted)."""
        return len(self.items) - 1

    def ids(self, external: Iterable[str]) -> list[int]:
        """Model ids of the known items among ``external``, in order (unknown ones dropped)."""
        return [k for k in map(self.index.get, external) if k is not None]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> str:
        return self.items[k]

    def save(self, run_dir: Path) -> None:
        (Path(run_dir) / VOCAB_FILE).write_text(json.dumps({"items": list(self.items)}))

    @classmethod
    def load(cls, run_dir: Path) -> Vocab:
        f = Path(run_dir) / VOCAB_FILE
        try:
            items = json.loads(f.read_text())["items"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"{f}: not an item vocabulary ({exc})") from None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise RunDirError(f"{f}: 'items' must be a list of strings")
        return cls(tuple(items))


def missing_files(run_dir: Path) -> list[str]:
    """The serving files ``run_dir`` lacks (empty: it is a complete model directory)."""
    return [name for name in MODEL_FILES if not (Path(run_dir) / name).is_file()]


def check_run_dir(run_dir: Path) -> None:
    """Raises ``RunDirError`` (one sentence) unless ``run_dir`` holds a model to serve."""
    missing = missing_files(run_dir)
    if missing:
        raise RunDirError(f"{run_dir} is not a trained model directory (written by `train`): "
                          f"{missing[0]} is missing")


def save_run(run_dir: Path, model: LinRecModel, vocab: Vocab | Sequence[str]) -> None:
    """Write the serving files (the model and its vocabulary)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocab if isinstance(vocab, Vocab) else Vocab.of(vocab)
    if len(vocab) != model.config.num_items + 1:
        raise RunDirError(f"vocabulary of {vocab.num_items} items for a model of {model.config.num_items}")
    vocab.save(run_dir)
    model.save(run_dir / MODEL_FILE)


def load_run(run_dir: Path, device: torch.device | str = "cpu") -> tuple[LinRecModel, Vocab]:
    """The model of a run directory (eval mode, on ``device``) and its item vocabulary."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    model = LinRecModel.load(run_dir / MODEL_FILE, map_location=device)
    vocab = Vocab.load(run_dir)
    if vocab.num_items != model.config.num_items:
        raise RunDirError(f"{run_dir / VOCAB_FILE} has {vocab.num_items} items, the model {model.config.num_items}")
    return model, vocab

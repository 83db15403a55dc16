"""The model a worker serves: a trained model with its item vocabulary, ready to serve."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from linrec_stream.model import LinRecModel, UserState
from linrec_stream.model.run_dir import Vocab, load_run


@dataclass(frozen=True)
class ServingModel:
    """A trained model with its item vocabulary, ready to serve (eval mode, no autograd)."""

    model: LinRecModel
    vocab: Vocab
    # Computed once: the model's version hashes its weights, far too slow to ask per user.
    version: str
    empty: UserState  # a new user's state (a value: stacking copies it)

    @classmethod
    def load(cls, model_dir: Path, device: torch.device | str = "cpu") -> "ServingModel":
        return cls.of(*load_run(model_dir, device))

    @classmethod
    def of(cls, model: LinRecModel, vocab: Vocab | Sequence[str]) -> "ServingModel":
        model = model.eval()
        vocab = vocab if isinstance(vocab, Vocab) else Vocab.of(vocab)
        return cls(model, vocab, model.version, model.init_state(1))

    def ids(self, items: Iterable[str]) -> list[int]:
        """Model ids of the known items among ``items`` (unknown ones dropped)."""
        return self.vocab.ids(items)

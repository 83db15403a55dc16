"""Starting a model from another one: the item vocabulary grown, the weights carried over.

Used by a retraining round (the version in force is the parent) and by ``train --init-from``
(a run directory is). Item ids the parent knows keep their ids, so its item-embedding rows stay
valid; items it has never seen get new ids after them and a fresh initialisation.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from linrec_stream.data import PAD, SequenceData
from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.model.run_dir import Vocab
from linrec_stream.training.train import seed_everything

ITEM_EMBEDDING = "item_embedding.weight"


def grow_vocab(parent_vocab: Vocab | list[str], data_vocab: list[str]) -> list[str]:
    """The parent's vocabulary unchanged (same ids, same order), then the items of ``data_vocab``
    it does not know, sorted. Index 0 stays padding."""
    known = set(parent_vocab[1:])
    new = sorted(s for s in data_vocab[1:] if s not in known)
    return [PAD, *parent_vocab[1:], *new]


def remap_items(data: SequenceData, vocab: list[str]) -> SequenceData:
    """``data`` with its item ids rewritten into ``vocab`` (which must hold every item of it)."""
    if vocab == data.vocab:
        return data
    index = Vocab.of(vocab).index
    missing = [s for s in data.vocab[1:] if s not in index]
    if missing:
        raise ValueError(f"{len(missing)} items of the data are not in the vocabulary, e.g. {missing[0]!r}")
    table = np.array([0] + [index[s] for s in data.vocab[1:]], dtype=np.int64)  # data id -> vocab id
    return SequenceData(vocab=list(vocab), users=data.users, seqs=[table[s] for s in data.seqs],
                        timestamps=data.timestamps)


def warm_start_weights(parent: dict[str, Tensor], fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """The initial weights of a grown model: ``fresh`` (its random init) with every parent tensor
    copied over; the item embedding (I'+1, D) takes the parent's (I+1, D) rows 0..I (padding and
    known items, which keep their ids) and keeps its fresh rows for the new items I+1..I'."""
    out: dict[str, Tensor] = {}
    for name, init in fresh.items():
        if name not in parent:
            raise ValueError(f"warm start: the parent has no weight {name!r} (another architecture)")
        old = parent[name].to(init.device, init.dtype)
        if name == ITEM_EMBEDDING and old.shape[0] <= init.shape[0] and old.shape[1:] == init.shape[1:]:
            grown = init.clone()
            grown[: old.shape[0]] = old
            out[name] = grown
        elif old.shape == init.shape:
            out[name] = old.clone()
        else:
            raise ValueError(f"warm start: {name} has shape {tuple(old.shape)} in the parent, "
                             f"{tuple(init.shape)} in the candidate")
    return out


def grown_config(parent: ModelConfig, num_items: int) -> ModelConfig:
    """The parent's architecture for ``num_items`` items."""
    return ModelConfig.from_dict({**parent.to_dict(), "num_items": num_items})


def grown_model(parent: LinRecModel, num_items: int, seed: int) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The parent's architecture for ``num_items`` items (≥ the parent's) and its initial weights:
    every parent tensor, new item rows initialised as a fresh model seeded with ``seed`` would be
    (the seed ``train`` uses, so a warm start differs from a fresh run only where it should)."""
    mc = grown_config(parent.config, num_items)
    seed_everything(seed)
    fresh = LinRecModel(mc).state_dict()
    return mc, warm_start_weights({k: v.detach().cpu() for k, v in parent.state_dict().items()}, fresh)

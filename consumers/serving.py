"""The model a worker serves: a trained model with its item vocabulary, ready to serve, and how
its user records are read and written (the dtype states are stored in, the vocabulary a
record's window ids index, how many recent event ids a record keeps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from linrec_stream.model import LinRecModel, UserState
from linrec_stream.model.run_dir import Vocab, load_run
from state.record import MAX_RECENT_IDS, UserRecord, vocab_crc

#: The dtypes a state may be stored in (the ``state_dtype`` setting's names).
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: The ``dedup_event_ids`` setting's default: recent event ids a user record keeps.
DEDUP_EVENT_IDS = 32

#: Version id -> the vocabulary of that model version (its run directory's), None if unknown.
VocabLookup = Callable[[str], "Vocab | None"]


def storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A ``state_dtype`` setting value (or a torch dtype, or None) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return STORAGE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"state dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}") from None


@dataclass(frozen=True)
class ServingModel:
    """A trained model with its item vocabulary, ready to serve (eval mode, no autograd).

    state_dtype: the dtype user states are *stored* in (``to_bytes_each``); None: the model's
        own (exact). The model always computes in its dtype: stored states are converted back.
    vocab_of: finds the vocabulary of another model version (the registry's run directories),
        to read the window ids of a record whose vocabulary this one does not extend; None: such
        a window cannot be read (the batch drops it and rebuilds the state from scratch).
    dedup_event_ids: the ``dedup_event_ids`` setting: each record keeps the hashed event ids of
        the user's latest this many applied events, and a batch skips an event whose id is among
        them (an upstream retry at a new offset); 0: events are deduplicated by offset only.
    """

    model: LinRecModel
    vocab: Vocab
    # Computed once: the model's version hashes its weights, far too slow to ask per user.
    version: str
    empty: UserState  # a new user's state (a value: stacking copies it)
    state_dtype: torch.dtype | None = None
    vocab_of: VocabLookup | None = field(default=None, compare=False, repr=False)
    dedup_event_ids: int = DEDUP_EVENT_IDS
    #: (vocab_size, vocab_crc) of this vocabulary, written into every record (state/record.py).
    vocab_tag: tuple[int, int] = field(init=False)
    # Per instance, filled lazily: prefix size -> crc of this vocabulary's first ids, and
    # (version, size, crc) -> old id -> this model's id (0: unknown here), None if not readable.
    _prefix_crcs: dict[int, int] = field(init=False, default_factory=dict, compare=False, repr=False)
    _remaps: dict[tuple[str, int, int], np.ndarray | None] = field(
        init=False, default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.dedup_event_ids <= MAX_RECENT_IDS:
            raise ValueError(f"dedup_event_ids must be 0 .. {MAX_RECENT_IDS}, got {self.dedup_event_ids}")
        object.__setattr__(self, "vocab_tag", (len(self.vocab), vocab_crc(self.vocab.items)))

    @classmethod
    def load(cls, model_dir: Path, device: torch.device | str = "cpu", *,
             state_dtype: str | torch.dtype | None = None, vocab_of: VocabLookup | None = None,
             dedup_event_ids: int = DEDUP_EVENT_IDS) -> "ServingModel":
        """The model of a run directory on ``device`` (``state_dtype``: a setting name such as
        "float16", a torch dtype, or None for the model's own)."""
        return cls.of(*load_run(model_dir, device), state_dtype=state_dtype, vocab_of=vocab_of,
                      dedup_event_ids=dedup_event_ids)

    @classmethod
    def of(cls, model: LinRecModel, vocab: Vocab | Sequence[str], *, state_dtype: str | torch.dtype | None = None,
           vocab_of: VocabLookup | None = None, dedup_event_ids: int = DEDUP_EVENT_IDS) -> "ServingModel":
        model = model.eval()
        vocab = vocab if isinstance(vocab, Vocab) else Vocab.of(vocab)
        return cls(model, vocab, model.version, model.init_state(1), storage_dtype(state_dtype), vocab_of,
                   dedup_event_ids)

    def successor(self, model_dir: Path, device: torch.device | str, *,
                  vocab_of: VocabLookup | None = None) -> "ServingModel":
        """Another run directory's model, storing states as this one does (the same storage
        dtype and event-id bound; ``vocab_of`` if given, else this one's): what a swap serves."""
        return ServingModel.load(model_dir, device, state_dtype=self.state_dtype,
                                 vocab_of=vocab_of if vocab_of is not None else self.vocab_of,
                                 dedup_event_ids=self.dedup_event_ids)

    def ids(self, items: Iterable[str]) -> list[int]:
        """Model ids of the known items among ``items`` (unknown ones dropped)."""
        return self.vocab.ids(items)

    def window_ids(self, record: UserRecord) -> tuple[int, ...] | None:
        """``record``'s window as this model's item ids, oldest first; None when it cannot be
        read (ids of a vocabulary this one does not extend, which ``vocab_of`` does not know).

        The usual case is one tuple comparison: the record was written under this vocabulary.
        A vocabulary that grew since (warm start) keeps the ids; a reordered one (retraining
        from scratch) maps them through the record's own version's vocabulary."""
        if record.legacy_window is not None:  # format 1: external ids, mapped on first use
            return tuple(self.ids(record.legacy_window))
        tag = (record.vocab_size, record.vocab_crc)
        if tag == self.vocab_tag or not record.window or self._extends(*tag):
            return record.window
        remap = self._remap(record.model_version, *tag)
        if remap is None:
            return None
        # Decoded records hold ids < vocab_size <= len(remap); a record built in memory may not.
        old = np.asarray(record.window, dtype=np.int64)
        if old.max(initial=0) >= len(remap):
            return None
        new = remap[old]
        return tuple(new[new > 0].tolist())

    def _extends(self, size: int, crc: int) -> bool:
        """This vocabulary's first ``size`` ids are those the tag (size, crc) names."""
        if size > len(self.vocab):
            return False
        if size not in self._prefix_crcs:
            self._prefix_crcs[size] = vocab_crc(self.vocab.items[:size])
        return self._prefix_crcs[size] == crc

    def _remap(self, version: str, size: int, crc: int) -> np.ndarray | None:
        """(size,) int64: the id under this vocabulary of each id of ``version``'s vocabulary
        with tag (size, crc), 0 for items this one lacks; None when that vocabulary is unknown
        or is not the one the tag names."""
        key = (version, size, crc)
        if key not in self._remaps:
            old = self.vocab_of(version) if self.vocab_of is not None else None
            remap = None
            if old is not None and len(old) >= size and vocab_crc(old.items[:size]) == crc:
                index = self.vocab.index
                remap = np.array([0, *(index.get(s, 0) for s in old.items[1:size])], dtype=np.int64)
            self._remaps[key] = remap
        return self._remaps[key]

"""Per-user item sequences and the leave-one-out split.

Item ids: 0 is padding, items get 1..I in sorted order of their string ids. Sorting (rather
than order of first appearance) makes the vocabulary depend only on the set of items, not on the
file's row order, so the same data set fetched from another source maps to the same ids.
Users are kept in sorted order of their string ids for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .readers import DataError, Interactions

PAD = "<pad>"


@dataclass(frozen=True, eq=False)
class SequenceData:
    """Each user's items in time order.

    Attributes:
        vocab: length I + 1; ``vocab[0] == "<pad>"``, ``vocab[k]`` is the string id of item k.
        users: length U, user string ids (sorted).
        seqs: length U; ``seqs[u]`` int64 array of shape (n_u,), item ids in time order
            (ties in timestamp keep file order).
        timestamps: length U; ``timestamps[u]`` float64 array of shape (n_u,), non-decreasing.
    """

    vocab: list[str]
    users: list[str]
    seqs: list[np.ndarray]
    timestamps: list[np.ndarray]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s: k for k, s in enumerate(self.vocab) if k > 0})

    @property
    def num_items(self) -> int:
        """I, the number of real items (ids 1..I; the vocabulary has I + 1 entries)."""
        return len(self.vocab) - 1

    @property
    def num_events(self) -> int:
        return int(sum(len(s) for s in self.seqs))

    def item_id(self, item: str) -> int:
        """The integer id (1..I) of an item string id. Raises KeyError for unknown items."""
        return self._index[item]

    def lengths(self) -> np.ndarray:
        """Shape (U,), int64: events per user."""
        return np.fromiter((len(s) for s in self.seqs), dtype=np.int64, count=len(self.seqs))


def _factorize(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Sorted unique strings and each value's index into them (shape (N,), int64).

    dict.fromkeys dedupes in C; only the few thousand unique keys are sorted, which is much
    faster than np.unique on an object array of a million strings.
    """
    uniq = sorted(dict.fromkeys(values.tolist()))
    index = {s: k for k, s in enumerate(uniq)}
    codes = np.fromiter(map(index.__getitem__, values.tolist()), dtype=np.int64, count=len(values))
    return uniq, codes


def build_sequences(inter: Interactions) -> SequenceData:
    """Group an interaction log by user and sort each user's events by timestamp.

    The sort is stable: events of one user with equal timestamps keep their file order
    (row index is the last sort key).
    """
    n = len(inter)
    if n == 0:
        raise DataError(f"{inter.source}: no interactions")
    items, item_codes = _factorize(inter.item)
    users, user_codes = _factorize(inter.user)
    # lexsort: last key is primary -> by user, then timestamp, then row index (file order).
    order = np.lexsort((np.arange(n), inter.ts, user_codes))
    item_ids = (item_codes + 1)[order]  # +1: id 0 is padding
    ts = inter.ts[order]
    counts = np.bincount(user_codes, minlength=len(users))
    cuts = np.cumsum(counts)[:-1]
    return SequenceData(
        vocab=[PAD, *items],
        users=users,
        seqs=np.split(item_ids, cuts),
        timestamps=np.split(ts, cuts),
    )


@dataclass(frozen=True, eq=False)
class LeaveOneOut:
    """The leave-one-out split (last item test, second-to-last validation, rest training).

    Attributes:
        data: the sequences it was made from.
        train: length U, aligned with ``data.users``: ``seq[:-2]`` for evaluated users, the whole
            sequence for users with fewer than 3 events (train-only).
        eval_users: shape (E,), int64, indices into ``data.users`` of the users with >= 3 events.
        valid_input: length E, ``seq[:-2]`` (same contents as ``train`` for these users).
        valid_target: shape (E,), int64, ``seq[-2]``.
        test_input: length E, ``seq[:-1]`` (training items plus the validation item).
        test_target: shape (E,), int64, ``seq[-1]``.

    The inputs are also the histories to exclude from the ranking. Arrays are views of
    ``data.seqs``; do not modify them in place.
    """

    data: SequenceData
    train: list[np.ndarray]
    eval_users: np.ndarray
    valid_input: list[np.ndarray]
    valid_target: np.ndarray
    test_input: list[np.ndarray]
    test_target: np.ndarray

    @property
    def num_eval(self) -> int:
        return int(self.eval_users.shape[0])


def leave_one_out(data: SequenceData) -> LeaveOneOut:
    """Split each user's sequence: ``seq[:-2]`` train, ``seq[-2]`` validation target,
    ``seq[-1]`` test target. Users with fewer than 3 events are train-only."""
    train: list[np.ndarray] = []
    eval_users: list[int] = []
    valid_input: list[np.ndarray] = []
    test_input: list[np.ndarray] = []
    valid_target: list[int] = []
    test_target: list[int] = []
    for u, seq in enumerate(data.seqs):
        if len(seq) < 3:
            train.append(seq)
            continue
        train.append(seq[:-2])
        eval_users.append(u)
        valid_input.append(seq[:-2])
        valid_target.append(int(seq[-2]))
        test_input.append(seq[:-1])
        test_target.append(int(seq[-1]))
    return LeaveOneOut(
        data=data,
        train=train,
        eval_users=np.array(eval_users, dtype=np.int64),
        valid_input=valid_input,
        valid_target=np.array(valid_target, dtype=np.int64),
        test_input=test_input,
        test_target=np.array(test_target, dtype=np.int64),
    )

"""The recurrent states that the attention ops take and return.

Every op has the signature ``f(q, k, v, initial_state, output_final_state) -> (o, final_state)``
(as in flash-linear-attention), so a sequence can be split anywhere and resumed from the state
returned by the first call. The states are plain immutable values: nothing is kept on a module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LinearState(NamedTuple):
    """State of the linear-attention variants, per batch row and head.

    S: (B, H, d_k, d_v)  sum over the events seen of feature(k_s) v_sᵀ.
    z: (B, H, d_k) or None  ``linear``: sum of feature(k_s); ``linrec_seqnorm``: sum of
       feature(k_s)² (elementwise); ``linrec``: None.
    n: (B,) int64 or None  number of real events seen (``linrec_seqnorm`` only: its √t factor).
    """

    S: Tensor
    z: Tensor | None = None
    n: Tensor | None = None


class KVCache(NamedTuple):
    """State of softmax attention: every key and value seen so far; it grows with the history.

    k, v: (B, H, T, d)  left-padded when rows hold different numbers of events.
    mask: (B, T) bool  True where the slot holds a real event.
    """

    k: Tensor
    v: Tensor
    mask: Tensor


def empty_linear_state(
    batch: int,
    heads: int,
    d_k: int,
    d_v: int,
    *,
    with_z: bool,
    with_n: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LinearState:
    """Zero state: what a user who has seen no event holds."""
    S = torch.zeros(batch, heads, d_k, d_v, dtype=dtype, device=device)
    z = torch.zeros(batch, heads, d_k, dtype=dtype, device=device) if with_z else None
    n = torch.zeros(batch, dtype=torch.int64, device=device) if with_n else None
    return LinearState(S, z, n)


def empty_kv_cache(
    batch: int,
    heads: int,
    d: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> KVCache:
    """A cache with no slot."""
    k = torch.zeros(batch, heads, 0, d, dtype=dtype, device=device)
    mask = torch.zeros(batch, 0, dtype=torch.bool, device=device)
    return KVCache(k, k.clone(), mask)

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

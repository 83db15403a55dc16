"""SASRec's causal softmax attention, the baseline, in the same two forms as the linear variants.

Its state is a key/value cache (``KVCache``) that grows by one slot per event: the cost of a
one-event update grows with the user's history, which is what LinRec avoids.
Shapes as in ``linear.py``: q, k, v (B, H, T, d), mask (B, T) bool (True = real event).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .states import KVCache


def softmax_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: KVCache | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, KVCache | None]:
    """softmax(q kᵀ / √d, causal, padding keys excluded) v over the cache and the new events.

    dropout_p: dropout on the attention probabilities (training only; SASRec's attn_dropout).
    """
    B, H, T, d = q.shape
    if initial_state is None and mask is None and not output_final_state:
        # No padding and nothing cached: the causal fast path (flash kernel on CPU and GPU).
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True), None

    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=q.device)
    keys, values, key_mask = k, v, mask
    if initial_state is not None:
        keys = torch.cat([initial_state.k, k], dim=2)  # (B, H, T0 + T, d)
        values = torch.cat([initial_state.v, v], dim=2)
        key_mask = torch.cat([initial_state.mask, mask], dim=1)  # (B, T0 + T)
    T0 = keys.shape[2] - T
    # Query i (at absolute slot T0 + i) sees real slots j <= T0 + i. It always sees itself, so that
    # no row is empty (a padding query would otherwise give NaN); padding outputs are zeroed below.
    causal = torch.ones(T, T0 + T, dtype=torch.bool, device=q.device).tril(T0)  # (T, T0 + T)
    self_slot = torch.zeros_like(causal)
    self_slot[torch.arange(T), T0 + torch.arange(T)] = True
    allowed = (causal & key_mask[:, None, :]) | self_slot  # (B, T, T0 + T)
    o = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=allowed[:, None], dropout_p=dropout_p
    )  # (B, H, T, d)
    o = torch.where(mask[:, None, :, None], o, 0.0)
    return o, (KVCache(keys, values, key_mask) if output_final_state else None)


def softmax_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: KVCache | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, KVCache | None]:
    """Event by event over a growing cache: O(t d) work and memory for the t-th event."""
    B, H, T, d = q.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=q.device)
    cache = initial_state
    if cache is None:
        empty = q.new_zeros(B, H, 0, d)
        cache = KVCache(empty, empty, torch.zeros(B, 0, dtype=torch.bool, device=q.device))
    outs = []
    for t in range(T):
        keys = torch.cat([cache.k, k[:, :, t : t + 1]], dim=2)  # (B, H, t', d)
        values = torch.cat([cache.v, v[:, :, t : t + 1]], dim=2)
        key_mask = torch.cat([cache.mask, mask[:, t : t + 1]], dim=1)  # (B, t')
        cache = KVCache(keys, values, key_mask)
        scores = (q[:, :, t : t + 1] @ keys.transpose(-1, -2)) / math.sqrt(d)  # (B, H, 1, t')
        allowed = key_mask.clone()
        allowed[:, -1] = True  # as in the parallel form: a padding query sees itself
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
        o_t = torch.softmax(scores, dim=-1) @ values  # (B, H, 1, d)
        outs.append(torch.where(mask[:, None, t : t + 1, None], o_t, 0.0))
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(B, H, 0, d)
    return o, (cache if output_final_state else None)

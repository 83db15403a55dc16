"""Causal linear attention, o_t = q_tᵀ S_t with S_t = S_0 + Σ_{s≤t} k_s v_sᵀ, in three forms.

All three variants of LinRec/linear attention reduce to this kernel once their feature maps and
normalisations are applied to q and k (see ``attention.py``), so this is the only place where
the sum over time is computed.

- ``masked_form``: (q kᵀ ⊙ causal mask) v, an N×N matrix per head. O(N² d) work, O(N²) memory.
- ``chunked_form``: the sequence is cut into chunks of C events; inside a chunk the masked form,
  across chunks the running state. O(N C d + N d²) work; it keeps one d×d state per *chunk*
  (B, H, N/C, d, d), never one per event.
- ``recurrent_form``: one event at a time; the streaming form (and the only one whose memory does
  not depend on N).

Neither parallel form materialises a (B, H, N, d_k, d_v) tensor. Which of the two is faster
depends on N; ``parallel_form`` picks by ``MASKED_MAX_LEN``, measured by
``benchmarks/bench_model.py --parts crossover`` (see BENCHMARKS.md, "Model").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ParallelForm = Literal["auto", "chunked", "masked"]

#: Below or at this length the masked N×N form is used by ``form="auto"``, above it the chunked
#: form. Forward + backward at head size 32 on a 2-core CPU: masked faster up to N = 128, even at
#: 192, chunked faster from 256 on (BENCHMARKS.md, "Model"). The crossover grows with the
#: head size (masked costs ~N²d, chunked ~N·C·d + 2N·d²); re-measure for other shapes/devices.
MASKED_MAX_LEN = 160
#: Chunk length of the chunked form (best of {32, 64, 128} in the same measurement).
DEFAULT_CHUNK_SIZE = 64


def masked_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Quadratic causal form.

    q, k: (B, H, T, d_k); v: (B, H, T, d_v); initial_state: (B, H, d_k, d_v) or None (zeros).
    Returns o (B, H, T, d_v) and, if asked, the final state (B, H, d_k, d_v).
    """
    scores = torch.tril(q @ k.transpose(-1, -2))  # (B, H, T, T): s > t cut off
    o = scores @ v  # (B, H, T, d_v)
    if initial_state is not None:
        o = o + q @ initial_state
    final = None
    if output_final_state:
        final = k.transpose(-1, -2) @ v  # (B, H, d_k, d_v)
        if initial_state is not None:
            final = final + initial_state
    return o, final


def chunked_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Chunk-wise causal form (same arguments and results as ``masked_form``)."""
    B, H, T, d_k = q.shape
    d_v = v.shape[-1]
    C = chunk_size
    n = max(1, -(-T // C))
    pad = n * C - T
    if pad:
        # Zero keys and values at the end add nothing to any state; their outputs are cut off.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    q = q.reshape(B, H, n, C, d_k)
    k = k.reshape(B, H, n, C, d_k)
    v = v.reshape(B, H, n, C, d_v)

    kv = k.transpose(-1, -2) @ v  # (B, H, n, d_k, d_v): one state increment per chunk
    # State at the start of each chunk: exclusive prefix sum over chunks (plus the initial state).
    start = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2).cumsum(dim=2)
    if initial_state is not None:
        start = start + initial_state.unsqueeze(2)
    o = q @ start  # (B, H, n, C, d_v): everything before the chunk
    o = o + torch.tril(q @ k.transpose(-1, -2)) @ v  # within the chunk, causal
    o = o.reshape(B, H, n * C, d_v)[:, :, :T]

    final = None
    if output_final_state:
        final = start[:, :, -1] + kv[:, :, -1]
    return o, final


def parallel_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    form: ParallelForm = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """The parallel (training) form: masked for short sequences, chunked for long ones."""
    if form == "auto":
        form = "masked" if q.shape[2] <= MASKED_MAX_LEN else "chunked"
    if form == "masked":
        return masked_form(q, k, v, initial_state, output_final_state)
    if form == "chunked":
        return chunked_form(q, k, v, initial_state, output_final_state, chunk_size)
    raise ValueError(f"form must be 'auto', 'chunked' or 'masked', got {form!r}")


def recurrent_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One event at a time (same arguments and results as ``masked_form``). O(d_k d_v) per event."""
    B, H, T, d_k = q.shape
    S = initial_state
    if S is None:
        S = q.new_zeros(B, H, d_k, v.shape[-1])
    outs = []
    for t in range(T):
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, d_k, d_v)
        outs.append((q[:, :, t, None, :] @ S).squeeze(-2))  # (B, H, d_v)
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    return o, (S if output_final_state else None)

"""Causal linear attention, o_t = q_tᵀ S_t with S_t = S_0 + Σ_{s≤t} k_s v_sᵀ, in three forms.

With a decay ``g`` (log γ_t ≤ 0 per event, (B, H, T)) the state forgets geometrically:
S_t = γ_t S_{t-1} + k_t v_tᵀ, i.e. S_t = e^{G_t} S_0 + Σ_{s≤t} e^{G_t - G_s} k_s v_sᵀ with
G_t = Σ_{r≤t} g_r (RetNet / gated linear attention with a scalar gate). Every exponent is ≤ 0, so
nothing overflows; g = None is the undecayed kernel (and its faster path).

All three variants of LinRec/linear attention reduce to this kernel once their feature maps and
normalisations are applied to q and k (see ``linear.py``), so this is the only place where
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


def check_log_decay(log_decay: Tensor | None, heads: int) -> Tensor:
    """The ``log_decay`` argument of ``linrec_decay``'s forms: log γ per head, shape (heads,)."""
    if log_decay is None or log_decay.shape != (heads,):
        got = None if log_decay is None else tuple(log_decay.shape)
        raise ValueError(f"linrec_decay needs log_decay of shape ({heads},) (log γ per head), got {got}")
    return log_decay


def _decay_matrix(G: Tensor) -> Tensor:
    """G (..., T) cumulative log decay -> (..., T, T) with e^{G_t - G_s} for s ≤ t, else 0."""
    T = G.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=G.device).tril()
    # Mask the exponent, not the result: above the diagonal G_t - G_s > 0 could overflow.
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
    return diff.exp()


def masked_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    g: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Quadratic causal form.

    q, k: (B, H, T, d_k); v: (B, H, T, d_v); initial_state: (B, H, d_k, d_v) or None (zeros);
    g: (B, H, T) log decay per event (≤ 0) or None (no decay).
    Returns o (B, H, T, d_v) and, if asked, the final state (B, H, d_k, d_v).
    """
    if g is None:
        scores = torch.tril(q @ k.transpose(-1, -2))  # (B, H, T, T): s > t cut off
    else:
        G = g.cumsum(dim=-1)  # (B, H, T)
        scores = (q @ k.transpose(-1, -2)) * _decay_matrix(G)
    o = scores @ v  # (B, H, T, d_v)
    if initial_state is not None:
        o = o + (q if g is None else q * G.exp()[..., None]) @ initial_state
    final = None
    if output_final_state:
        if g is None:
            final = k.transpose(-1, -2) @ v  # (B, H, d_k, d_v)
        else:
            final = (k * (G[..., -1:] - G).exp()[..., None]).transpose(-1, -2) @ v
        if initial_state is not None:
            # g.sum is G_T, and 0 (no decay) when there is no event.
            final = final + (initial_state if g is None else g.sum(-1).exp()[..., None, None] * initial_state)
    return o, final


def _chunks(x: Tensor, C: int) -> Tensor:
    """(B, H, T, d) -> (B, H, n, C, d), zero-padded at the end to n = ⌈T / C⌉ (at least 1) chunks.

    Zero keys and values add nothing to any state, and the outputs of the padded slots are cut
    off by the callers.
    """
    B, H, T, d = x.shape
    n = max(1, -(-T // C))
    return F.pad(x, (0, 0, 0, n * C - T)).reshape(B, H, n, C, d)


def chunked_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    g: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunk-wise causal form (same arguments and results as ``masked_form``)."""
    if g is not None:
        return _chunked_decay(q, k, v, initial_state, output_final_state, chunk_size, g)
    B, H, T, _ = q.shape
    q, k, v = (_chunks(x, chunk_size) for x in (q, k, v))  # (B, H, n, C, d)

    kv = k.transpose(-1, -2) @ v  # (B, H, n, d_k, d_v): one state increment per chunk
    # State at the start of each chunk: exclusive prefix sum over chunks (plus the initial state).
    start = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2).cumsum(dim=2)
    if initial_state is not None:
        start = start + initial_state.unsqueeze(2)
    o = q @ start  # (B, H, n, C, d_v): everything before the chunk
    o = o + torch.tril(q @ k.transpose(-1, -2)) @ v  # within the chunk, causal
    o = o.flatten(2, 3)[:, :, :T]

    final = None
    if output_final_state:
        final = start[:, :, -1] + kv[:, :, -1]
    return o, final


def _chunked_decay(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
    g: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """``chunked_form`` with a decay: inside a chunk the decayed masked form, across chunks a
    loop over the chunk states (T / C steps, each O(d_k d_v))."""
    B, H, T, d_k = q.shape
    d_v = v.shape[-1]
    q, k, v = (_chunks(x, chunk_size) for x in (q, k, v))  # (B, H, n, C, d)
    n = q.shape[2]
    # No decay at the padded end (log γ = 0), so padding changes no state.
    G = _chunks(g[..., None], chunk_size)[..., 0].cumsum(dim=-1)  # (B, H, n, C): since chunk start
    G_end = G[..., -1:]  # (B, H, n, 1)

    o = ((q @ k.transpose(-1, -2)) * _decay_matrix(G)) @ v  # within the chunk, causal
    # Each chunk's own increment, decayed to the chunk's end.
    kv = (k * (G_end - G).exp()[..., None]).transpose(-1, -2) @ v  # (B, H, n, d_k, d_v)
    S = q.new_zeros(B, H, d_k, d_v) if initial_state is None else initial_state
    starts = []
    for c in range(n):
        starts.append(S)
        S = G_end[:, :, c, :, None].exp() * S + kv[:, :, c]
    start = torch.stack(starts, dim=2)  # (B, H, n, d_k, d_v): the state before each chunk
    o = o + (q * G.exp()[..., None]) @ start
    o = o.flatten(2, 3)[:, :, :T]
    return o, (S if output_final_state else None)


def parallel_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    form: ParallelForm = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    g: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The parallel (training) form: masked for short sequences, chunked for long ones."""
    if form == "auto":
        form = "masked" if q.shape[2] <= MASKED_MAX_LEN else "chunked"
    if form == "masked":
        return masked_form(q, k, v, initial_state, output_final_state, g)
    if form == "chunked":
        return chunked_form(q, k, v, initial_state, output_final_state, chunk_size, g)
    raise ValueError(f"form must be 'auto', 'chunked' or 'masked', got {form!r}")


def recurrent_form(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    g: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One event at a time (same arguments and results as ``masked_form``). O(d_k d_v) per event."""
    B, H, T, d_k = q.shape
    S = initial_state
    if S is None:
        S = q.new_zeros(B, H, d_k, v.shape[-1])
    outs = []
    for t in range(T):
        if g is not None:
            S = g[:, :, t, None, None].exp() * S
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, d_k, d_v)
        outs.append((q[:, :, t, None, :] @ S).squeeze(-2))  # (B, H, d_v)
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    return o, (S if output_final_state else None)

"""The linear-attention variants: ``linrec``, ``linrec_decay``, ``linrec_seqnorm``, ``linear`` and
``linrec_bidir``.

Each variant is written once (``_linrec``, ``_seqnorm``, ``_linear``) as "feature maps +
normalisation around the causal kernel o_t = q_tᵀ S_t" and exposed in two forms with the same
signature, ``f(q, k, v, initial_state, output_final_state, *, mask) -> (o, final_state)``:

- ``*_parallel``: the training form, whole sequences at once (chunked or masked kernel);
- ``*_recurrent``: the streaming form, event by event (for T = 1 it is the worker's step).

Shapes: q, k, v (B, H, T, d) with d the head size; mask (B, T) bool, True at real events,
None meaning all real. Events where the mask is False add nothing to any state and their output
is 0, so a left-padded row gives at each real event the same output as the real events alone.
``naive.py`` holds the specification these are tested against.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import DEFAULT_CHUNK_SIZE, ParallelForm, check_log_decay, parallel_form, recurrent_form
from .states import LinearState

Kernel = Callable[..., tuple[Tensor, Tensor | None]]


class StreamingUnsupported(NotImplementedError):
    """Raised when a variant without a one-event form (``linrec_bidir``) is asked for one."""


def unit_elu(x: Tensor) -> Tensor:
    """elu(x) / ‖elu(x)‖₂ over the last (head) dimension: LinRec's ρ(φ(x)).

    The official code divides without an epsilon; ``F.normalize`` clamps the norm at 1e-12,
    which only differs when every coordinate of x is (numerically) 0.
    """
    return F.normalize(F.elu(x), p=2.0, dim=-1)


def _safe_rsqrt(x: Tensor) -> Tensor:
    """1/√x where x > 0, else 0 (written so that neither the value nor the gradient is NaN)."""
    positive = x > 0
    return torch.where(positive, torch.rsqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def _mask4(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask[:, None, :, None]  # (B, 1, T, 1)


def _zero_masked(o: Tensor, mask: Tensor | None) -> Tensor:
    return o if mask is None else torch.where(_mask4(mask), o, 0.0)


# --- linrec: the official semantics, made causal -------------------------------------------


def _linrec(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None,
    output_final_state: bool,
    mask: Tensor | None,
    kernel: Kernel,
    log_decay: Tensor | None = None,
) -> tuple[Tensor, LinearState | None]:
    # o_t = q̂_tᵀ S_t / √d with S_t = γ S_{t-1} + k̂_t v_tᵀ (γ = 1 without a decay); the 1/√d is
    # folded into q̂.
    q_hat = unit_elu(q) / math.sqrt(q.shape[-1])
    k_hat = unit_elu(k)
    if mask is not None:
        k_hat = k_hat * _mask4(mask)
    g = None
    if log_decay is not None:
        B, H, T, _ = q.shape
        g = log_decay.to(q.dtype)[None, :, None].expand(B, H, T)  # (B, H, T)
        if mask is not None:
            g = g * mask[:, None, :]  # padding neither adds to nor decays the state
    S0 = None if initial_state is None else initial_state.S
    o, S = kernel(q_hat, k_hat, v, S0, output_final_state, g=g)
    return _zero_masked(o, mask), (LinearState(S) if output_final_state else None)


def linrec_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
    form: ParallelForm = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, LinearState | None]:
    """Causal LinRec, whole sequences. State: S (B, H, d, d)."""
    kernel = partial(parallel_form, form=form, chunk_size=chunk_size)
    return _linrec(q, k, v, initial_state, output_final_state, mask, kernel)


def linrec_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, LinearState | None]:
    """Causal LinRec, event by event. O(d²) per event and head."""
    return _linrec(q, k, v, initial_state, output_final_state, mask, recurrent_form)


# --- linrec_decay: LinRec whose state forgets, one learned rate per head ----------------------


def linrec_decay_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
    log_decay: Tensor | None = None,
    form: ParallelForm = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, LinearState | None]:
    """LinRec with a per-head decay γ = e^{log_decay} ∈ (0, 1]: S_t = γ S_{t-1} + k̂_t v_tᵀ.

    log_decay: (H,) ≤ 0. Whole sequences. State: S (B, H, d, d), as ``linrec``.
    """
    kernel = partial(parallel_form, form=form, chunk_size=chunk_size)
    log_decay = check_log_decay(log_decay, q.shape[1])
    return _linrec(q, k, v, initial_state, output_final_state, mask, kernel, log_decay)


def linrec_decay_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
    log_decay: Tensor | None = None,
) -> tuple[Tensor, LinearState | None]:
    """``linrec_decay``, event by event. O(d²) per event and head."""
    log_decay = check_log_decay(log_decay, q.shape[1])
    return _linrec(q, k, v, initial_state, output_final_state, mask, recurrent_form, log_decay)


# --- linrec_seqnorm: the paper's text (K normalised over the sequence), made causal ----------


def _seqnorm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None,
    output_final_state: bool,
    mask: Tensor | None,
    kernel: Kernel,
) -> tuple[Tensor, LinearState | None]:
    # o_t = ρ(φ(q_t))ᵀ diag(1/(√t √z_t)) S_t. The diagonal factor depends on t only through
    # running sums, so it is folded into the query and the rest is plain causal linear attention
    # with keys φ(k). φ = elu must come before any normalisation for this to be exact.
    B, H, T, d = q.shape
    phi_k = F.elu(k)
    if mask is not None:
        phi_k = phi_k * _mask4(mask)
    real = torch.ones(B, T, dtype=torch.int64, device=q.device) if mask is None else mask.long()
    if initial_state is None:
        S0, z0, n0 = None, q.new_zeros(B, H, d), torch.zeros(B, dtype=torch.int64, device=q.device)
    else:
        S0, z0, n0 = initial_state
    z = z0.unsqueeze(2) + torch.cumsum(phi_k * phi_k, dim=2)  # (B, H, T, d): z_t
    n = n0.unsqueeze(1) + torch.cumsum(real, dim=1)  # (B, T): events up to and including t
    scale = _safe_rsqrt(z) * _safe_rsqrt(n.to(q.dtype))[:, None, :, None]
    o, S = kernel(unit_elu(q) * scale, phi_k, v, S0, output_final_state)
    final = None
    if output_final_state:
        final = LinearState(S, z[:, :, -1], n[:, -1]) if T else LinearState(S, z0, n0)
    return _zero_masked(o, mask), final


def seqnorm_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
    form: ParallelForm = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, LinearState | None]:
    """LinRec as the paper's text describes it, causal. State: S (B,H,d,d), z (B,H,d), n (B,)."""
    kernel = partial(parallel_form, form=form, chunk_size=chunk_size)
    return _seqnorm(q, k, v, initial_state, output_final_state, mask, kernel)


def seqnorm_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, LinearState | None]:
    """``linrec_seqnorm``, event by event."""
    return _seqnorm(q, k, v, initial_state, output_final_state, mask, recurrent_form)


# --- linear: Katharopoulos et al. 2020 --------------------------------------------------------


def _linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None,
    output_final_state: bool,
    mask: Tensor | None,
    kernel: Kernel,
) -> tuple[Tensor, LinearState | None]:
    # o_t = φ(q_t)ᵀ S_t / φ(q_t)ᵀ z_t with φ = elu + 1. The denominator is the same kernel applied
    # to a column of ones appended to v, so S and z travel together as one (d, d_v + 1) state.
    phi_q = F.elu(q) + 1.0
    phi_k = F.elu(k) + 1.0
    if mask is not None:
        phi_k = phi_k * _mask4(mask)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, T, d_v + 1)
    S0 = None
    if initial_state is not None:
        S0 = torch.cat([initial_state.S, initial_state.z.unsqueeze(-1)], dim=-1)
    o1, S1 = kernel(phi_q, phi_k, v1, S0, output_final_state)
    num, den = o1[..., :-1], o1[..., -1:]
    if mask is not None:
        # Padding before any real event has den = 0; its output is zeroed below anyway.
        den = torch.where(_mask4(mask), den, 1.0)
    final = LinearState(S1[..., :-1], S1[..., -1]) if output_final_state else None
    return _zero_masked(num / den, mask), final


def linear_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
    form: ParallelForm = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, LinearState | None]:
    """Linear attention (elu + 1, q·z denominator), whole sequences. State: S, z (B, H, d)."""
    kernel = partial(parallel_form, form=form, chunk_size=chunk_size)
    return _linear(q, k, v, initial_state, output_final_state, mask, kernel)


def linear_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, LinearState | None]:
    """Linear attention, event by event."""
    return _linear(q, k, v, initial_state, output_final_state, mask, recurrent_form)


# --- linrec_bidir: the official code as written (offline only) --------------------------------


def bidir_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, None]:
    """The official LinRec layer: o_t = q̂_tᵀ (Σ_{all s} k̂_s v_sᵀ) / √d over the whole row.

    Bidirectional and ``mask`` is ignored on purpose (padding enters the sum), as in the official
    code; kept to reproduce the paper offline. It has no state to start from or return.
    """
    if initial_state is not None or output_final_state:
        raise StreamingUnsupported(
            "linrec_bidir attends to future events and has no recurrent state; "
            "use attention='linrec' for a model that can be resumed or streamed"
        )
    kv = unit_elu(k).transpose(-1, -2) @ v  # (B, H, d, d): one sum over every position
    return (unit_elu(q) @ kv) / math.sqrt(q.shape[-1]), None


def bidir_recurrent(*args: object, **kwargs: object) -> None:
    """There is no one-event form of a bidirectional layer."""
    raise StreamingUnsupported(
        "linrec_bidir (the official, bidirectional LinRec) has no one-event form: every output "
        "depends on later events. Use attention='linrec' (its causal version) to stream"
    )

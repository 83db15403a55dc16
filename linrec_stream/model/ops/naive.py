"""The specification: every variant written as a plain loop over events, straight from the maths.

Slow on purpose and free of the tricks the fast forms use (no folding of normalisations into the
query, no appended column of ones, no chunking, no fused attention), so that the tests that
compare the fast forms with these loops (in float64) check the tricks, not restate them.

Same signature as the fast forms: ``f(q, k, v, initial_state, output_final_state, *, mask)``;
q, k, v (B, H, T, d); mask (B, T) bool, True at real events. At an event where the mask is False
the state does not change and the output is 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import check_log_decay  # an argument check, not maths
from .states import KVCache, LinearState


def _rho(x: Tensor) -> Tensor:
    """L2 normalisation over the head dimension, without an epsilon (as the official code)."""
    return x / x.norm(dim=-1, keepdim=True)


def _real(mask: Tensor | None, q: Tensor) -> Tensor:
    B, _, T, _ = q.shape
    return torch.ones(B, T, dtype=torch.bool, device=q.device) if mask is None else mask


def naive_linrec(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
    log_decay: Tensor | None = None,
) -> tuple[Tensor, LinearState | None]:
    """S_t = γ S_{t-1} + k̂_t v_tᵀ;  o_t = q̂_tᵀ S_t / √d;  x̂ = elu(x) / ‖elu(x)‖.

    γ = 1 (``linrec``) or e^{log_decay[h]} per head (``linrec_decay``, log_decay (H,)).
    """
    B, H, T, d = q.shape
    real = _real(mask, q)
    S = q.new_zeros(B, H, d, v.shape[-1]) if initial_state is None else initial_state.S
    gamma = q.new_ones(H) if log_decay is None else torch.exp(log_decay.to(q.dtype))
    o = q.new_zeros(B, H, T, v.shape[-1])
    for t in range(T):
        on = real[:, t, None, None, None]  # (B, 1, 1, 1)
        k_hat = _rho(F.elu(k[:, :, t]))
        q_hat = _rho(F.elu(q[:, :, t]))
        S_new = gamma[None, :, None, None] * S + torch.einsum("bhi,bhj->bhij", k_hat, v[:, :, t])
        S = torch.where(on, S_new, S)
        o_t = torch.einsum("bhi,bhij->bhj", q_hat, S) / math.sqrt(d)
        o[:, :, t] = torch.where(on[..., 0], o_t, 0.0)
    return o, (LinearState(S) if output_final_state else None)


def naive_linrec_decay(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
    log_decay: Tensor | None = None,
) -> tuple[Tensor, LinearState | None]:
    """``naive_linrec`` with its decay required: S_t = γ_h S_{t-1} + k̂_t v_tᵀ, log_decay (H,)."""
    log_decay = check_log_decay(log_decay, q.shape[1])
    return naive_linrec(q, k, v, initial_state, output_final_state, mask=mask, log_decay=log_decay)


def naive_seqnorm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, LinearState | None]:
    """o_t = ρ(φ(q_t))ᵀ diag(1 / (√t √z_t)) S_t, S_t = Σ φ(k_s) v_sᵀ, z_t = Σ φ(k_s)², φ = elu."""
    B, H, T, d = q.shape
    real = _real(mask, q)
    if initial_state is None:
        S = q.new_zeros(B, H, d, v.shape[-1])
        z = q.new_zeros(B, H, d)
        n = torch.zeros(B, dtype=torch.int64, device=q.device)
    else:
        S, z, n = initial_state
    o = q.new_zeros(B, H, T, v.shape[-1])
    for t in range(T):
        on = real[:, t]  # (B,)
        phi_k = F.elu(k[:, :, t])  # (B, H, d)
        S = torch.where(on[:, None, None, None], S + phi_k[..., :, None] * v[:, :, t, None, :], S)
        z = torch.where(on[:, None, None], z + phi_k * phi_k, z)
        n = n + on.long()
        for b in range(B):
            if not on[b]:
                continue  # output stays 0
            diag = 1.0 / (math.sqrt(int(n[b])) * torch.sqrt(z[b]))  # (H, d)
            q_rho = _rho(F.elu(q[b, :, t]))  # (H, d)
            o[b, :, t] = torch.einsum("hi,hij->hj", q_rho * diag, S[b])
    return o, (LinearState(S, z, n) if output_final_state else None)


def naive_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, LinearState | None]:
    """o_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t), S_t = Σ φ(k_s) v_sᵀ, z_t = Σ φ(k_s), φ = elu + 1."""
    B, H, T, d = q.shape
    real = _real(mask, q)
    if initial_state is None:
        S, z = q.new_zeros(B, H, d, v.shape[-1]), q.new_zeros(B, H, d)
    else:
        S, z = initial_state.S, initial_state.z
    o = q.new_zeros(B, H, T, v.shape[-1])
    for t in range(T):
        on = real[:, t]
        phi_q, phi_k = F.elu(q[:, :, t]) + 1, F.elu(k[:, :, t]) + 1
        S = torch.where(on[:, None, None, None], S + phi_k[..., :, None] * v[:, :, t, None, :], S)
        z = torch.where(on[:, None, None], z + phi_k, z)
        num = torch.einsum("bhi,bhij->bhj", phi_q, S)
        den = (phi_q * z).sum(-1, keepdim=True)
        o[:, :, t] = torch.where(on[:, None, None], num / den, 0.0)
    return o, (LinearState(S, z) if output_final_state else None)


def naive_softmax(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: KVCache | None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, KVCache | None]:
    """o_t = Σ_{real s ≤ t} softmax_s(q_tᵀ k_s / √d) v_s, the keys of the cache included."""
    B, H, T, d = q.shape
    real = _real(mask, q)
    if initial_state is None:
        keys, values = q.new_zeros(B, H, 0, d), q.new_zeros(B, H, 0, v.shape[-1])
        key_mask = torch.zeros(B, 0, dtype=torch.bool, device=q.device)
    else:
        keys, values, key_mask = initial_state
    o = q.new_zeros(B, H, T, v.shape[-1])
    for t in range(T):
        keys = torch.cat([keys, k[:, :, t : t + 1]], dim=2)
        values = torch.cat([values, v[:, :, t : t + 1]], dim=2)
        key_mask = torch.cat([key_mask, real[:, t : t + 1]], dim=1)
        for b in range(B):
            if not real[b, t]:
                continue
            sel = key_mask[b]  # the real events so far
            w = torch.softmax((keys[b][:, sel] @ q[b, :, t, :, None]).squeeze(-1) / math.sqrt(d), -1)
            o[b, :, t] = (w[:, None, :] @ values[b][:, sel]).squeeze(-2)
    return o, (KVCache(keys, values, key_mask) if output_final_state else None)


def naive_bidir(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: None = None,
    output_final_state: bool = False,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, None]:
    """The official code: o_t = q̂_tᵀ (Σ_{every s} k̂_s v_sᵀ) / √d; the mask is not applied."""
    B, H, T, d = q.shape
    S = q.new_zeros(B, H, d, v.shape[-1])
    for s in range(T):
        S = S + torch.einsum("bhi,bhj->bhij", _rho(F.elu(k[:, :, s])), v[:, :, s])
    o = torch.stack(
        [torch.einsum("bhi,bhij->bhj", _rho(F.elu(q[:, :, t])), S) for t in range(T)], dim=2
    )
    return o / math.sqrt(d), None

"""Attention ops: every variant in a parallel (training) form, a recurrent (streaming) form and a
naive loop (the specification), all with the signature

    f(q, k, v, initial_state=None, output_final_state=False, *, mask=None) -> (o, final_state)

q, k, v: (B, H, T, d); mask: (B, T) bool, True at real events; o: (B, H, T, d).

Modules: ``kernels`` (the causal linear-attention kernel: masked, chunked and recurrent),
``linear`` (linrec, linrec_decay, linrec_seqnorm, linear, linrec_bidir), ``softmax`` (SASRec),
``naive`` (the reference loops), ``states`` (the state values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import naive
from .kernels import DEFAULT_CHUNK_SIZE, MASKED_MAX_LEN, chunked_form, masked_form, parallel_form
from .linear import (
    StreamingUnsupported,
    bidir_parallel,
    bidir_recurrent,
    linear_parallel,
    linear_recurrent,
    linrec_decay_parallel,
    linrec_decay_recurrent,
    linrec_parallel,
    linrec_recurrent,
    seqnorm_parallel,
    seqnorm_recurrent,
    unit_elu,
)
from .softmax import softmax_parallel, softmax_recurrent
from .states import KVCache, LinearState


@dataclass(frozen=True)
class AttentionOp:
    """One attention variant: its forms and the shape of its state.

    state_kind: "linear" (``LinearState``), "kv" (``KVCache``) or "none" (not streamable).
    has_z, has_n: which optional fields of a ``LinearState`` the variant uses.
    has_decay: the forms take ``log_decay`` (H,), a learned parameter of the attention layer.
    """

    name: str
    parallel: Callable
    recurrent: Callable
    naive: Callable
    state_kind: str
    has_z: bool = False
    has_n: bool = False
    has_decay: bool = False

    @property
    def streamable(self) -> bool:
        return self.state_kind != "none"


OPS: dict[str, AttentionOp] = {
    op.name: op
    for op in (
        AttentionOp("linrec", linrec_parallel, linrec_recurrent, naive.naive_linrec, "linear"),
        AttentionOp(
            "linrec_decay",
            linrec_decay_parallel,
            linrec_decay_recurrent,
            naive.naive_linrec_decay,
            "linear",
            has_decay=True,
        ),
        AttentionOp(
            "linrec_seqnorm",
            seqnorm_parallel,
            seqnorm_recurrent,
            naive.naive_seqnorm,
            "linear",
            has_z=True,
            has_n=True,
        ),
        AttentionOp(
            "linear", linear_parallel, linear_recurrent, naive.naive_linear, "linear", has_z=True
        ),
        AttentionOp("softmax", softmax_parallel, softmax_recurrent, naive.naive_softmax, "kv"),
        AttentionOp("linrec_bidir", bidir_parallel, bidir_recurrent, naive.naive_bidir, "none"),
    )
}

__all__ = [
    "AttentionOp",
    "DEFAULT_CHUNK_SIZE",
    "KVCache",
    "LinearState",
    "MASKED_MAX_LEN",
    "OPS",
    "StreamingUnsupported",
    "chunked_form",
    "masked_form",
    "parallel_form",
    "unit_elu",
]

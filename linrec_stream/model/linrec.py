"""The LinRec sequential recommender: one model, two forms that compute the same function.

- ``model(item_seq)``: the parallel (training) form over left-padded sequences (B, N).
- ``model.step(state, items)``: the one-event (streaming) form; O(L·H·d²) per event for the
  linear variants, whatever the length of the history.

Architecture (SASRec as in RecBole, with the attention swapped):
    x = Dropout(LayerNorm(item_emb[i] + pos_emb[p]))
    L × [ x = LayerNorm(x + Dropout(Dense(Attention(x))))          post-LN residual blocks
          x = LayerNorm(x + Dropout(W2 GELU(W1 x))) ]
    scores = x · item_embᵀ                                         tied output embedding
LayerNorm eps 1e-12, weights N(0, 0.02), biases 0, as RecBole.

Attention variants (``ModelConfig.attention``; maths in ``linrec_stream/model/ops``):
``linrec`` (the official LinRec layer made causal, padding masked), ``linrec_decay`` (``linrec``
whose state decays by a learned factor γ per head and event, so recent events weigh more and a
state stays bounded over an unbounded stream), ``linrec_seqnorm`` (the
paper's text made causal), ``linear`` (Katharopoulos et al.), ``softmax`` (SASRec; its one-event
form keeps a key/value cache that grows with the history) and ``linrec_bidir`` (the official
layer as written: bidirectional, padding included; offline only, no one-event form).

Positions. A stream has no maximum length, so the position of an event is its index in the
user's history counted from the user's first event (padding not counted), clamped at
``max_len - 1``: events beyond max_len share the last learned position. The state carries the
number of events applied, so ``step`` knows the next position, and the two forms agree at any
length. ``positions="none"`` drops position embeddings (order is then only seen through
causality). Train/serve consequence: the streaming state sums the *whole* history with
positions counted from its start, so train on whole histories (the chunked form is O(N) in
memory) rather than on windows of the last max_len events, whose positions would restart at 0
and whose state would miss the older events; with windows the served model sees inputs it was
not trained on once a user passes max_len events. Measured on ML-1M (RESULTS.md, models trained
on windows of 50, ``evaluate --history full``): served on the whole history, ``linrec`` falls from
0.150 to 0.090 NDCG@10, as its undecayed, unnormalised sum grows past anything seen in training;
``linrec_decay``, ``linear``, ``linrec_seqnorm`` and ``softmax`` lose 0.016-0.022.

Padding: id 0, on the left in the parallel input. A padding slot contributes to no state and
its output is 0; the outputs at real events equal stepping the real events from ``init_state``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops import OPS, KVCache, LinearState, StreamingUnsupported
from .user_state import StateMismatchError, UserState

__all__ = ["ModelConfig", "LinRecModel", "UserState", "StreamingUnsupported", "StateMismatchError"]

CHECKPOINT_FORMAT = "linrec-stream/model"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the model; saved in the checkpoint.

    num_items: number of real items; ids are 1..num_items, 0 is padding.
    hidden_size: model width D; split into num_heads heads of D / num_heads.
    attention: "linrec", "linrec_decay" (the default), "linrec_seqnorm", "linear", "softmax" or
        "linrec_bidir".
    max_len: number of learned positions (later events reuse the last one) and the length of
        the training windows.
    dropout: on embeddings, attention output and feed-forward output (RecBole hidden_dropout).
    attn_dropout: on softmax attention probabilities (None: same as dropout; linear variants
        have no attention matrix and ignore it).
    inner_size: feed-forward width (256: RecBole SASRec's default).
    positions: "learned" (clamped at max_len - 1, see the module docstring) or "none".
    parallel_form: "auto" (masked N×N form up to ops.MASKED_MAX_LEN, chunked above),
        "chunked" or "masked": how the parallel linear forms sum over time.
    chunk_size: chunk length of the chunked form.
    """

    num_items: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    # linrec_decay: its state stays bounded over an unbounded stream, so it keeps its accuracy when
    # served on whole histories (RESULTS.md, "Served accuracy"); the default of every entry point.
    attention: str = "linrec_decay"
    max_len: int = 200
    dropout: float = 0.2
    attn_dropout: float | None = None
    inner_size: int = 256
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    positions: str = "learned"
    parallel_form: str = "auto"
    chunk_size: int = 64

    def __post_init__(self) -> None:
        for name in ("num_items", "hidden_size", "num_layers", "num_heads", "max_len", "inner_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.num_layers > 65535 or self.num_heads > 65535 or self.head_size > 65535:
            raise ValueError("ModelConfig.num_layers, num_heads and head size must be < 65536")
        if self.attention not in OPS:
            raise ValueError(f"ModelConfig.attention must be one of {sorted(OPS)}, got {self.attention!r}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is None and name == "attn_dropout":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be a number in [0, 1), got {value!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if self.positions not in ("learned", "none"):
            raise ValueError(f"ModelConfig.positions must be 'learned' or 'none', got {self.positions!r}")
        if self.parallel_form not in ("auto", "chunked", "masked"):
            raise ValueError(
                f"ModelConfig.parallel_form must be 'auto', 'chunked' or 'masked', got {self.parallel_form!r}"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


class Attention(nn.Module):
    """Multi-head attention sublayer with its residual and LayerNorm (RecBole's layout)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.dense = nn.Linear(D, D)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.op = OPS[cfg.attention]
        self.attn_dropout = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
        self.parallel = self.op.parallel
        if self.op.state_kind == "linear":
            self.parallel = partial(self.op.parallel, form=cfg.parallel_form, chunk_size=cfg.chunk_size)
        if self.op.has_decay:
            # log γ_h = -exp(a_h): γ stays in (0, 1) without clamping, and Adam moves a_h, the log
            # of the forgetting rate, by relative steps (a sigmoid would freeze the slow heads).
            # Initial half-lives spread geometrically from 4 to 256 events over the heads, so
            # some heads start near the most recent events and some near the whole history.
            H = cfg.num_heads
            half_lives = torch.logspace(2.0, 8.0, H, base=2.0) if H > 1 else torch.tensor([32.0])
            self.log_decay_rate = nn.Parameter(torch.log(math.log(2.0) / half_lives))  # (H,)

    def log_decay(self) -> Tensor:
        """log γ per head (H,), ≤ 0 (``linrec_decay`` only): each event multiplies the state by γ."""
        return -torch.exp(self.log_decay_rate)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, d)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        state: LinearState | KVCache | None,
        output_final_state: bool,
        recurrent: bool,
    ) -> tuple[Tensor, LinearState | KVCache | None]:
        """x (B, T, D); mask (B, T) bool or None (all real). Returns (B, T, D) and the state."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        extra = {}
        if self.op.has_decay:
            extra["log_decay"] = self.log_decay()
        if recurrent:
            o, state = self.op.recurrent(q, k, v, state, output_final_state, mask=mask, **extra)
        elif self.op.name == "softmax":
            p = self.attn_dropout if self.training else 0.0
            o, state = self.parallel(q, k, v, state, output_final_state, mask=mask, dropout_p=p)
        else:
            o, state = self.parallel(q, k, v, state, output_final_state, mask=mask, **extra)
        B, H, T, d = o.shape
        o = o.transpose(1, 2).reshape(B, T, H * d)  # (B, T, D)
        return self.norm(x + self.dropout(self.dense(o))), state


class FeedForward(nn.Module):
    """Position-wise feed-forward sublayer with its residual and LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense_1 = nn.Linear(cfg.hidden_size, cfg.inner_size)
        self.dense_2 = nn.Linear(cfg.inner_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.dense_2(F.gelu(self.dense_1(x)))))


class Block(nn.Module):
    """One transformer layer: attention sublayer, then feed-forward sublayer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        state: LinearState | KVCache | None,
        output_final_state: bool,
        recurrent: bool,
    ) -> tuple[Tensor, LinearState | KVCache | None]:
        x, state = self.attention(x, mask, state, output_final_state, recurrent)
        return self.feed_forward(x), state


class LinRecModel(nn.Module):
    """SASRec-style recommender with a parallel form (``forward``/``encode``) and a one-event
    form (``step``) over an explicit per-user ``UserState``. See the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.item_embedding = nn.Embedding(config.num_items + 1, D, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, D) if config.positions == "learned" else None
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.op = OPS[config.attention]
        self.apply(self._init_weights)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()  # padding row (RecBole's init overwrites it)
        self._version_memo: tuple[tuple, str] | None = None

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.item_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.item_embedding.weight.device

    # --- the two forms ---------------------------------------------------------------------------

    def forward(self, item_seq: Tensor) -> Tensor:
        """item_seq (B, N) int64, left-padded with 0 -> hidden states (B, N, D), causal
        (except ``linrec_bidir``); 0 at padding slots."""
        return self._run(item_seq, None, output_final_state=False, recurrent=False)[0]

    def encode(self, item_seq: Tensor, state: UserState | None = None) -> tuple[Tensor, UserState]:
        """Parallel form from a state: applies a (B, N) left-padded block of new events to each
        user and returns their hidden states (B, N, D) and the new state. ``encode(seq)`` then
        ``encode(more, state)`` equals ``encode(cat(seq, more))`` (for a catch-up of many events)."""
        if state is None:
            state = self.init_state(item_seq.shape[0])
        return self._run(item_seq, state, output_final_state=True, recurrent=False)

    @torch.no_grad()
    def step(self, state: UserState, items: Tensor) -> tuple[Tensor, UserState]:
        """One event per user: items (B,) int64 -> h_t (B, D) and the next state.

        Equals ``model(seq)[:, t]`` in eval mode. An item 0 leaves that user's state unchanged
        (h_t is then 0), so users with fewer new events can sit out a step of the batch.
        Runs without autograd: it is the serving form (a state stepped with autograd on would
        drag the graph of the whole history along); train with ``forward``/``encode``.
        """
        h, state = self._run(items[:, None], state, output_final_state=True, recurrent=True)
        return h[:, 0], state

    def decay_half_lives(self) -> list[list[float]] | None:
        """``linrec_decay``: per layer, per head, the number of events after which an event's
        weight in the state has halved (ln 2 / -log γ); None for the other variants."""
        if not self.op.has_decay:
            return None
        with torch.no_grad():
            return [(math.log(2.0) / -b.attention.log_decay()).tolist() for b in self.blocks]

    def score(self, h: Tensor) -> Tensor:
        """h (..., D) -> logits (..., num_items + 1) against every item; column 0 is -inf."""
        logits = h @ self.item_embedding.weight.T
        logits[..., 0] = float("-inf")
        return logits

    def _run(
        self, item_seq: Tensor, state: UserState | None, output_final_state: bool, recurrent: bool
    ) -> tuple[Tensor, UserState | None]:
        B, T = item_seq.shape
        mask = item_seq != 0  # (B, T)
        version = self.version  # once per call: it walks every parameter
        if state is not None:
            self._check_state(state, B, version)
            state = state.to(self.device, self.dtype)
            n0 = state.num_events
        else:
            n0 = torch.zeros(B, dtype=torch.int64, device=item_seq.device)
        # Index of each event in its user's history, padding not counted; clamped (see top).
        pos = n0[:, None] + torch.cumsum(mask, dim=1) - 1  # (B, T)
        x = self.item_embedding(item_seq)  # (B, T, D)
        if self.position_embedding is not None:
            x = x + self.position_embedding(pos.clamp(0, self.config.max_len - 1))
        x = self.dropout(self.norm(x))

        # Without padding and without a cache the ops take their unmasked fast path.
        op_mask = None if state is None and bool(mask.all()) else mask
        new_layers = []
        for layer, block in enumerate(self.blocks):
            layer_state = None if state is None else self._layer_state(state, layer)
            x, layer_state = block(x, op_mask, layer_state, output_final_state, recurrent)
            new_layers.append(layer_state)
        h = torch.where(mask[..., None], x, 0.0)  # (B, T, D)
        if not output_final_state:
            return h, None
        return h, self._pack_state(new_layers, n0 + mask.sum(dim=1), version)

    # --- states --------------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> UserState:
        """States of ``batch_size`` users who have seen nothing, in the model's dtype and device."""
        cfg = self.config
        if not self.op.streamable:
            raise StreamingUnsupported(
                f"attention {cfg.attention!r} is bidirectional and has no one-event form or state; "
                "use attention='linrec' to stream"
            )
        B, L, H, d = batch_size, cfg.num_layers, cfg.num_heads, cfg.head_size
        like = dict(dtype=self.dtype, device=self.device)
        n = torch.zeros(B, dtype=torch.int64, device=self.device)
        if self.op.state_kind == "kv":
            k = torch.zeros(B, L, H, 0, d, **like)
            mask = torch.zeros(B, 0, dtype=torch.bool, device=self.device)
            return UserState(cfg.attention, self.version, n, k=k, v=k.clone(), kv_mask=mask)
        S = torch.zeros(B, L, H, d, d, **like)
        z = torch.zeros(B, L, H, d, **like) if self.op.has_z else None
        return UserState(cfg.attention, self.version, n, S=S, z=z)

    def load_state_bytes(self, blob: bytes) -> UserState:
        """``UserState.from_bytes`` checked against this model, in its dtype and device."""
        return UserState.from_bytes(blob, expect_model=self)

    def _check_state(self, state: UserState, batch_size: int, version: str) -> None:
        if not self.op.streamable:
            raise StreamingUnsupported(f"attention {self.config.attention!r} has no state to resume from")
        state.check_model(self, version)
        if len(state) != batch_size:
            raise ValueError(f"state holds {len(state)} users, the input {batch_size}")

    def _layer_state(self, state: UserState, layer: int) -> LinearState | KVCache:
        if self.op.state_kind == "kv":
            return KVCache(state.k[:, layer], state.v[:, layer], state.kv_mask)
        z = None if state.z is None else state.z[:, layer]
        return LinearState(state.S[:, layer], z, state.num_events if self.op.has_n else None)

    def _pack_state(self, layers: list, num_events: Tensor, version: str) -> UserState:
        cfg = self.config
        if self.op.state_kind == "kv":
            k = torch.stack([s.k for s in layers], dim=1)  # (B, L, H, T, d)
            v = torch.stack([s.v for s in layers], dim=1)
            return UserState(cfg.attention, version, num_events, k=k, v=v, kv_mask=layers[0].mask)
        S = torch.stack([s.S for s in layers], dim=1)  # (B, L, H, d, d)
        z = torch.stack([s.z for s in layers], dim=1) if self.op.has_z else None
        return UserState(cfg.attention, version, num_events, S=S, z=z)

    # --- identity and checkpoints --------------------------------------------------------------

    @property
    def version(self) -> str:
        """The model version id: 32 hex digits of a SHA-256 over the config and the weights.

        Same weights -> same id, whatever the dtype they were cast to without loss (float32 ->
        float64) or the device; any change to a weight (a training step) gives a new id, and
        states of another id are refused. Memoised on the tensors' in-place version counters.
        """
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in (*self.parameters(), *self.buffers()))
        if self._version_memo is None or self._version_memo[0] != key:
            h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            for name, t in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
            self._version_memo = (key, h.hexdigest()[:32])
        return self._version_memo[1]

    def save(self, path: str | Path) -> None:
        """Writes config, version id and weights (in the model's dtype) to ``path``."""
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "format_version": CHECKPOINT_VERSION,
                "config": self.config.to_dict(),
                "version": self.version,
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            },
            Path(path),
        )

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> LinRecModel:
        """Rebuilds a saved model from the file alone, in eval mode (ready to serve)."""
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a linrec-stream model checkpoint")
        if ckpt.get("format_version") != CHECKPOINT_VERSION:
            raise ValueError(f"unknown checkpoint format version {ckpt.get('format_version')}")
        model = cls(ModelConfig.from_dict(ckpt["config"]))
        weights = ckpt["state_dict"]
        model.to(next(iter(weights.values())).dtype)
        model.load_state_dict(weights)
        if model.version != ckpt["version"]:
            raise ValueError(f"{path}: the weights do not match the stored version id (corrupted file?)")
        return model.to(map_location).eval()

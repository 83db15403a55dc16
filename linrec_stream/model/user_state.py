"""``UserState``: what the model remembers about a batch of users, and its byte format.

A ``UserState`` is a plain value (tensors + metadata), produced by ``LinRecModel.init_state`` and
``LinRecModel.step``/``encode`` and never stored on the model: a worker keeps one per user (as
bytes, e.g. in rocksdict), stacks the users of a batch, steps them, and splits them again.

Byte format, version 1 (little-endian), for a single user:

    offset size  field
    0      4     magic b"LRUS"
    4      2     format version (1)
    6      2     header size in bytes (54)
    8      16    model version id (the model's content hash, see ``LinRecModel.version``)
    24     1     attention variant (1 linrec, 2 linrec_seqnorm, 3 linear, 4 softmax,
                 5 linrec_decay)
    25     1     dtype of the tensors (1 float32, 2 float16, 3 bfloat16, 4 float64);
                 by default the state's own (float32 for a float32 model)
    26     2     number of layers L
    28     2     number of heads H
    30     2     head size d
    32     2     reserved (0)
    34     8     number of real events applied
    42     8     softmax cache length T (0 for the linear variants)
    50     4     CRC-32 of the payload
    54     ...   payload: S (L, H, d, d); then z (L, H, d) for linrec_seqnorm and linear;
                 for softmax instead k and v (L, H, T, d) each. C order, no padding.

Size per user with the default config (hidden 64, 2 layers, 2 heads, so d = 32), float32:
linrec and linrec_decay 54 + 4·2·2·32·32 = 16,438 bytes; linrec_seqnorm and linear + 512 = 16,950 bytes;
softmax 54 + 1,024 bytes per event (204,854 bytes after 200 events). float16/bfloat16 halve
the payload.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor



class _ModelConfig(Protocol):
    attention: str
    num_layers: int
    num_heads: int

    @property
    def head_size(self) -> int: ...


class StateOwner(Protocol):
    """What a state is checked against: a model's config, version, device and dtype.

    Structural (``LinRecModel`` satisfies it), so this module does not import the model: the
    model imports the state, never the other way round."""

    @property
    def config(self) -> _ModelConfig: ...

    @property
    def version(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

MAGIC = b"LRUS"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHH16sBBHHHHQQI")
HEADER_SIZE = _HEADER.size  # 54
_DTYPE_AT = 25  # the dtype code's offset in the header
_N_EVENTS_AT = 34  # where the per-user part of the header starts: events, cache length, CRC
_TAIL = struct.Struct("<QQI")

VARIANT_CODES = {"linrec": 1, "linrec_seqnorm": 2, "linear": 3, "softmax": 4, "linrec_decay": 5}
DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
_VARIANTS = {c: n for n, c in VARIANT_CODES.items()}
_DTYPES = {c: t for t, c in DTYPE_CODES.items()}


class StateFormatError(ValueError):
    """The bytes are not a valid user state (truncated, corrupted, unknown format)."""


class StateMismatchError(StateFormatError):
    """The state is valid but belongs to another model (version, variant or sizes differ)."""


@dataclass(frozen=True, eq=False)
class UserState:
    """The recurrent state of B users, for every layer. Batch first in every tensor.

    attention: the variant that produced it; model_version: the producing model's version id.
    num_events: (B,) int64, real events applied (drives the clamped positions and seqnorm's t).
    S: (B, L, H, d, d) for the linear variants.
    z: (B, L, H, d) for ``linrec_seqnorm`` (Σφ(k)²) and ``linear`` (Σφ(k)).
    k, v: (B, L, H, T, d) softmax key/value cache, left-padded; kv_mask (B, T) bool marks
    the real slots.
    """

    attention: str
    model_version: str
    num_events: Tensor
    S: Tensor | None = None
    z: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    kv_mask: Tensor | None = None

    # --- batch handling ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_events.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return (self.S if self.S is not None else self.k).dtype

    @property
    def device(self) -> torch.device:
        return self.num_events.device

    def __getitem__(self, i: int) -> UserState:
        """User i alone, as a batch of 1 (a softmax cache keeps only its real slots)."""
        if not isinstance(i, int):
            raise TypeError(f"UserState indices are ints, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"user {i} out of range for a batch of {len(self)}")
        sl = slice(i, i + 1 if i != -1 else None)
        one = UserState(
            self.attention,
            self.model_version,
            self.num_events[sl],
            *(None if t is None else t[sl] for t in (self.S, self.z, self.k, self.v, self.kv_mask)),
        )
        if one.k is not None:
            real = one.kv_mask[0]
            one = replace(one, k=one.k[:, :, :, real], v=one.v[:, :, :, real], kv_mask=one.kv_mask[:, real])
        return one

    @staticmethod
    def stack(states: Sequence[UserState]) -> UserState:
        """One batch from several (users may have different histories and cache lengths)."""
        if not states:
            raise ValueError("UserState.stack needs at least one state")
        first = states[0]
        for s in states[1:]:
            if (s.attention, s.model_version) != (first.attention, first.model_version):
                raise StateMismatchError(
                    "cannot stack states of different models or variants: "
                    f"{(first.attention, first.model_version)} vs {(s.attention, s.model_version)}"
                )
            if s.dtype != first.dtype or s.device != first.device:
                raise ValueError("cannot stack states of different dtypes or devices; use .to()")

        def cat(name: str) -> Tensor | None:
            ts = [getattr(s, name) for s in states]
            return None if ts[0] is None else torch.cat(ts, dim=0)

        out = UserState(
            first.attention, first.model_version, cat("num_events"), cat("S"), cat("z")
        )
        if first.k is not None:
            T = max(s.k.shape[3] for s in states)
            # Left-pad every cache to the longest, marking the new slots as padding.
            out = replace(
                out,
                k=torch.cat([F.pad(s.k, (0, 0, T - s.k.shape[3], 0)) for s in states]),
                v=torch.cat([F.pad(s.v, (0, 0, T - s.v.shape[3], 0)) for s in states]),
                kv_mask=torch.cat([F.pad(s.kv_mask, (T - s.kv_mask.shape[1], 0)) for s in states]),
            )
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> UserState:
        """Moves the tensors; ``dtype`` applies to the floating-point ones only."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return UserState(
            self.attention,
            self.model_version,
            *(move(t) for t in (self.num_events, self.S, self.z, self.k, self.v, self.kv_mask)),
        )

    # --- bytes -------------------------------------------------------------------------------

    def to_bytes(self, dtype: torch.dtype | None = None) -> bytes:
        """The single user's state as bytes (format above).

        dtype: None stores the state's own dtype (float32 for a float32 model: exact);
        float16/bfloat16 halve the size at a small loss (BENCHMARKS.md, "Model").
        """
        if len(self) != 1:
            raise ValueError(f"to_bytes serialises one user; index the batch first (got {len(self)})")
        dtype = self.dtype if dtype is None else dtype
        if dtype not in DTYPE_CODES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CODES)}, got {dtype}")
        if self.attention not in VARIANT_CODES:
            raise ValueError(f"no byte format for attention {self.attention!r}")
        one = self[0]  # drops the padding slots of a softmax cache
        tensors = [t for t in (one.S, one.z, one.k, one.v) if t is not None]
        payload = b"".join(_tensor_bytes(t[0], dtype) for t in tensors)
        L, H = (one.S if one.S is not None else one.k).shape[1:3]
        d = (one.S if one.S is not None else one.k).shape[-1]
        cache_len = 0 if one.k is None else one.k.shape[3]
        header = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            HEADER_SIZE,
            bytes.fromhex(one.model_version),
            VARIANT_CODES[one.attention],
            DTYPE_CODES[dtype],
            L,
            H,
            d,
            0,
            int(one.num_events[0]),
            cache_len,
            zlib.crc32(payload),
        )
        return header + payload

    def to_bytes_each(self, dtype: torch.dtype | None = None) -> list[bytes]:
        """``[self[i].to_bytes(dtype) for i in range(len(self))]``, the same bytes, made for the
        whole batch at once: one device-to-host copy and one conversion instead of one per user
        (a softmax cache, whose users differ in length, goes user by user)."""
        dtype = self.dtype if dtype is None else dtype
        if self.k is not None or len(self) == 0:
            return [self[i].to_bytes(dtype) for i in range(len(self))]
        if dtype not in DTYPE_CODES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CODES)}, got {dtype}")
        if self.attention not in VARIANT_CODES:
            raise ValueError(f"no byte format for attention {self.attention!r}")
        B, L, H, d = self.S.shape[:4]
        parts = [_tensor_bytes(t, dtype) for t in (self.S, self.z) if t is not None]
        sizes = [len(p) // B for p in parts]
        version, vcode, dcode = bytes.fromhex(self.model_version), VARIANT_CODES[self.attention], DTYPE_CODES[dtype]
        out = []
        for i, n in enumerate(self.num_events.tolist()):
            payload = b"".join(p[i * size:(i + 1) * size] for p, size in zip(parts, sizes))
            out.append(_HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, version, vcode, dcode, L, H, d, 0, n, 0,
                                    zlib.crc32(payload)) + payload)
        return out

    @staticmethod
    def stored_dtype(blob: bytes) -> torch.dtype | None:
        """The dtype a ``to_bytes`` blob stores its tensors in, read from the header alone (no
        checks: ``from_bytes`` does them); None when the blob is too short or the code unknown.
        For grouping blobs of a batch into runs ``from_bytes_many`` can read together."""
        return _DTYPES.get(blob[_DTYPE_AT]) if len(blob) > _DTYPE_AT else None

    @staticmethod
    def from_bytes_many(blobs: Sequence[bytes]) -> UserState:
        """``UserState.stack([UserState.from_bytes(b) for b in blobs])``, read as one batch: every
        blob is checked as ``from_bytes`` checks it (its own CRC-32 too), the payloads are
        converted in one go. The states must share a model and sizes (StateMismatchError
        otherwise); a softmax cache goes user by user."""
        if not blobs:
            raise ValueError("UserState.from_bytes_many needs at least one state")
        first = UserState.from_bytes(blobs[0])
        if first.k is not None or len(blobs) == 1:
            return UserState.stack([first, *(UserState.from_bytes(b) for b in blobs[1:])])
        head = bytes(blobs[0][:_N_EVENTS_AT])
        counts, payloads = [], []
        for blob in blobs:
            if len(blob) != len(blobs[0]) or blob[:_N_EVENTS_AT] != head:
                # Another model, variant, dtype or size: let from_bytes and stack name the difference.
                UserState.stack([first, UserState.from_bytes(blob)])
                raise StateFormatError("user state header differs from the batch's first")  # pragma: no cover
            (n, T, crc) = _TAIL.unpack_from(blob, _N_EVENTS_AT)
            payload = blob[HEADER_SIZE:]
            if T != 0 or n >= 2**63:
                UserState.from_bytes(blob)  # raises, naming what is wrong
            if zlib.crc32(payload) != crc:
                raise StateFormatError("corrupted user state: the payload's CRC-32 does not match")
            counts.append(n)
            payloads.append(payload)
        flat = torch.frombuffer(bytearray(b"".join(payloads)), dtype=first.dtype).reshape(len(blobs), -1)
        S_size = first.S[0].numel()
        S = flat[:, :S_size].reshape(len(blobs), *first.S.shape[1:])
        z = None if first.z is None else flat[:, S_size:].reshape(len(blobs), *first.z.shape[1:])
        return UserState(first.attention, first.model_version, torch.tensor(counts, dtype=torch.int64), S=S, z=z)

    @staticmethod
    def from_bytes(blob: bytes, expect_model: StateOwner | None = None) -> UserState:
        """Reads ``to_bytes`` output. Raises ``StateFormatError`` on anything malformed.

        expect_model: if given, the state must come from this model (same version id, variant
        and sizes; ``StateMismatchError`` otherwise) and is returned in its dtype and device.
        Without it, the state comes back on the CPU in the stored dtype.
        """
        blob = bytes(blob)
        if len(blob) < 4 or blob[:4] != MAGIC:
            raise StateFormatError("not a linrec-stream user state (bad magic bytes)")
        if len(blob) < HEADER_SIZE:
            raise StateFormatError(f"truncated user state: {len(blob)} bytes, the header alone has {HEADER_SIZE}")
        (_, fmt, hsize, version, vcode, dcode, L, H, d, _, n, T, crc) = _HEADER.unpack_from(blob)
        if fmt != FORMAT_VERSION:
            raise StateFormatError(f"unknown user-state format version {fmt} (this code reads {FORMAT_VERSION})")
        if hsize != HEADER_SIZE:
            raise StateFormatError(f"header size {hsize} does not match format {fmt} ({HEADER_SIZE})")
        if vcode not in _VARIANTS:
            raise StateFormatError(f"unknown attention variant code {vcode}")
        if dcode not in _DTYPES:
            raise StateFormatError(f"unknown dtype code {dcode}")
        attention, dtype = _VARIANTS[vcode], _DTYPES[dcode]
        if min(L, H, d) < 1:
            raise StateFormatError(f"invalid sizes in header: layers {L}, heads {H}, head size {d}")
        if n >= 2**63:
            raise StateFormatError(f"invalid number of events {n}")
        if attention == "softmax" and T != n:
            raise StateFormatError(f"softmax cache holds {T} events but the header counts {n}")
        if attention != "softmax" and T != 0:
            raise StateFormatError(f"{attention} state with a cache length of {T}")

        shapes = _payload_shapes(attention, L, H, d, T)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        expected = HEADER_SIZE + sum(itemsize * _numel(s) for s in shapes)
        if len(blob) < expected:
            raise StateFormatError(f"truncated user state: {len(blob)} bytes, expected {expected}")
        if len(blob) > expected:
            raise StateFormatError(f"{len(blob) - expected} unexpected bytes after the user state")
        if zlib.crc32(blob[HEADER_SIZE:]) != crc:
            raise StateFormatError("corrupted user state: the payload's CRC-32 does not match")

        tensors, offset = [], HEADER_SIZE
        for shape in shapes:
            size = itemsize * _numel(shape)
            if size:
                t = torch.frombuffer(bytearray(blob[offset : offset + size]), dtype=dtype)
            else:  # an empty softmax cache; frombuffer refuses empty buffers
                t = torch.empty(0, dtype=dtype)
            tensors.append(t.reshape(1, *shape))
            offset += size
        fields: dict[str, Tensor] = {}
        if attention == "softmax":
            fields.update(k=tensors[0], v=tensors[1], kv_mask=torch.ones(1, T, dtype=torch.bool))
        else:
            fields["S"] = tensors[0]
            if len(tensors) > 1:
                fields["z"] = tensors[1]
        state = UserState(attention, version.hex(), torch.tensor([n], dtype=torch.int64), **fields)
        if expect_model is not None:
            state.check_model(expect_model)
            state = state.to(expect_model.device, expect_model.dtype)
        return state

    def check_model(self, model: StateOwner, version: str | None = None) -> None:
        """Raises ``StateMismatchError`` unless this state was produced by ``model``
        (``version``: the model's version id if the caller has it at hand)."""
        cfg = model.config
        version = model.version if version is None else version
        if self.attention != cfg.attention:
            raise StateMismatchError(
                f"state of attention {self.attention!r}, model uses {cfg.attention!r}"
            )
        if self.model_version != version:
            raise StateMismatchError(
                f"state of model version {self.model_version}, this model is {version}"
            )
        got = (self.S if self.S is not None else self.k).shape
        want = (cfg.num_layers, cfg.num_heads)
        if tuple(got[1:3]) != want or got[-1] != cfg.head_size:
            raise StateMismatchError(
                f"state sizes (layers, heads, head size) {tuple(got[1:3]) + (got[-1],)} "
                f"do not match the model's {want + (cfg.head_size,)}"
            )


def _payload_shapes(attention: str, L: int, H: int, d: int, T: int) -> list[tuple[int, ...]]:
    if attention == "softmax":
        return [(L, H, T, d), (L, H, T, d)]
    if attention in ("linrec", "linrec_decay"):
        return [(L, H, d, d)]
    return [(L, H, d, d), (L, H, d)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor_bytes(t: Tensor, dtype: torch.dtype) -> bytes:
    # Through uint8 because numpy has no bfloat16. Assumes a little-endian machine.
    flat = t.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()

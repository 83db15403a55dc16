"""One user's durable record: the model state plus the input position that produced it.

Byte format (version 3, all integers little-endian), stored in rocksdict and as the value of
the changelog topic::

    fixed header, 46 bytes
        magic         4s   b"LRUR"
        version       u8   3
        flags         u8   bit 0: event_id present (other bits must be 0)
        partition     u32  interactions partition of the last applied event
        offset        i64  its Kafka offset (>= 0)
        events        i64  valid events applied to this user so far (>= 0)
        last_ts       f64  event time of the last applied event, epoch seconds
        n_window      u16  item ids in the window
        n_recent      u16  event-id hashes in the recent set
        vocab_size    u32  the vocabulary tag (below): entries of the vocabulary the ids index
        vocab_crc     u32  CRC-32C of its first vocab_size external ids joined with "\n"
    variable part (each string: u16 length in bytes, then UTF-8)
        user, model_version, [event_id]
        window        n_window u32 model item ids, each in 1 .. vocab_size - 1, oldest first
        recent        n_recent u64 ``event_id_hash``es of the user's latest applied events, oldest first
        state         u32 length, then the bytes of UserState.to_bytes()
    crc32c            u32  CRC-32C (Castagnoli) of everything before it

The window holds the model ids of the user's recent *known* items (items the serving model's
vocabulary has): a micro-batch masks them and rebuilds states from them without mapping ~200
strings per user. Items unknown to the model are still valid events (they count in
``events``) but never enter the window: the retraining that learns them reads the archived
interactions topic, not the window.

Ids mean nothing without their vocabulary, hence the tag ``(vocab_size, vocab_crc)`` (see
``vocab_crc``). Warm-started versions only append to the vocabulary, so ids stay valid under
any vocabulary whose first vocab_size ids have that crc; a retraining from scratch (items
reordered) does not match, and the reader maps the ids through the old vocabulary or drops
the window (consumers/serving.py).

The recent set lets a batch skip an upstream retry, the same ``event_id`` at a new offset
(consumers/batch.py): 8-byte blake2b hashes of the ids (``event_id_hash``) of the user's last
events that had one, at most the ``dedup_event_ids`` setting; a false match of two ids needs a
64-bit collision among a user's few dozen recent ids (~2**-59).

Version 2 (read, never written) is version 3 without the recent set: its header's n_recent
field was ``reserved``, always 0, so such a record reads back with an empty ``recent_ids``.
Version 1 (read, never written) had a 38-byte header without the tag and the window as
external ids (n_window u16 lengths, then the UTF-8 items back to back); such a record reads
back with ``legacy_window`` holding those strings and an empty ``window``.

CRC-32C (the ``crc32c`` package, a dependency of the project already) runs at ~15 GB/s against
zlib's ~2.6 GB/s: 1 us instead of 6.5 us for a 17 KB state. The crc catches a torn or corrupted
changelog value or disk block that would otherwise decode into a plausible but wrong offset or
window (the state bytes carry their own crc too). Overhead over the state bytes: 54 bytes + the
strings + 4 bytes per window item + 8 bytes per recent event id (256 bytes for 32).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Sequence

from crc32c import crc32c

MAGIC = b"LRUR"
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, FORMAT_VERSION)
_HEADER = struct.Struct("<4sBBIqqdHHII")  # formats 3 and 2 (where n_recent was reserved, 0)
_HEADER_V1 = struct.Struct("<4sBBIqqdHH")  # format 1: no vocabulary tag
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_FLAG_EVENT_ID = 0x01
MAX_STRING_BYTES = 0xFFFF  # u16 length prefix
MAX_WINDOW = 0xFFFF
MAX_RECENT_IDS = 0xFFFF  # u16 count
MAX_PARTITION = 0xFFFFFFFF
MAX_INT64 = 2**63 - 1
MAX_U32 = 0xFFFFFFFF


def vocab_crc(items: Sequence[str]) -> int:
    """The ``vocab_crc`` of a record's tag: CRC-32C of ``items`` (the external ids of item ids
    0, 1, ..., padding included) joined with "\\n", in UTF-8."""
    return crc32c("\n".join(items).encode("utf-8", "surrogatepass"))


def event_id_hash(event_id: str) -> int:
    """The u64 a record's recent set holds for ``event_id``: the 8-byte blake2b digest of its
    UTF-8 bytes, little-endian (stable across processes, unlike the salted ``hash``)."""
    digest = hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class RecordError(ValueError):
    """Bytes that are not a valid UserRecord, or field values that cannot be encoded."""


@dataclass(frozen=True)
class UserRecord:
    """One user's state and the position of the last interaction applied to it.

    state: one user's ``UserState.to_bytes()`` (opaque here; the model version is inside too).
    window: model item ids of the user's most recent known items, oldest first (bounded by the
        worker; unknown items never enter it). Each in 1 .. vocab_size - 1, checked when read.
    events: valid events applied so far (known and unknown items).
    partition, offset: Kafka position of the last applied event; the idempotence key.
    last_ts: event time of that event, epoch seconds.
    vocab_size, vocab_crc: the tag of the vocabulary the window's ids index (module docstring).
    legacy_window: a format-1 record's window (external ids; ``window`` is then empty), for the
        reader to map through its vocabulary; None for any record this code writes.
    recent_ids: ``event_id_hash`` of the event ids of the user's latest applied events that had
        one, oldest first, distinct, bounded by the batch (``dedup_event_ids``); () when off.
    """

    user: str
    state: bytes
    model_version: str
    window: tuple[int, ...]
    events: int
    partition: int
    offset: int
    event_id: str | None
    last_ts: float
    vocab_size: int = 0
    vocab_crc: int = 0
    legacy_window: tuple[str, ...] | None = None
    recent_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Accept any sequence for the window / bytes-like for the state, store immutable ones:
        # the record is a value object shared between the store, the changelog and the worker.
        # (A numpy array becomes a tuple of Python ints: equal, hashable, and struct packs it.)
        if not isinstance(self.window, tuple):
            w = self.window
            object.__setattr__(self, "window", tuple(w.tolist() if hasattr(w, "tolist") else w))
        if self.legacy_window is not None and not isinstance(self.legacy_window, tuple):
            object.__setattr__(self, "legacy_window", tuple(self.legacy_window))
        if not isinstance(self.recent_ids, tuple):
            object.__setattr__(self, "recent_ids", tuple(self.recent_ids))
        if not isinstance(self.state, bytes):
            object.__setattr__(self, "state", bytes(self.state))
        if not isinstance(self.user, str) or not self.user:
            raise RecordError(f"user must be a non-empty str, got {self.user!r}")
        if not 0 <= self.partition <= MAX_PARTITION:
            raise RecordError(f"partition out of range: {self.partition}")
        if not 0 <= self.offset <= MAX_INT64:
            raise RecordError(f"offset out of range: {self.offset}")
        if not 0 <= self.events <= MAX_INT64:
            raise RecordError(f"events out of range: {self.events}")
        if len(self.window) > MAX_WINDOW:
            raise RecordError(f"window of {len(self.window)} items exceeds {MAX_WINDOW}")
        if len(self.recent_ids) > MAX_RECENT_IDS:
            raise RecordError(f"recent set of {len(self.recent_ids)} event ids exceeds {MAX_RECENT_IDS}")
        if not (0 <= self.vocab_size <= MAX_U32 and 0 <= self.vocab_crc <= MAX_U32):
            raise RecordError(f"vocabulary tag out of range: size {self.vocab_size}, crc {self.vocab_crc}")
        if self.legacy_window is not None and (self.window or len(self.legacy_window) > MAX_WINDOW):
            raise RecordError(f"a format-1 window comes alone (no ids) and holds at most {MAX_WINDOW} items")
        # The ids are not range-checked here (512 records a batch, 200 ids each: the batch
        # functions write ids of their own vocabulary); the decoder checks every id it reads.
        if not isinstance(self.last_ts, (int, float)) or not math.isfinite(self.last_ts):
            raise RecordError(f"last_ts must be a finite number, got {self.last_ts!r}")

    def already_applied(self, partition: int, offset: int) -> bool:
        """True when the event at (partition, offset) is already reflected in this record.

        The idempotence rule: a user's events all come from one partition, in offset order, so
        an event at or below the last applied offset of the same partition was applied before
        (re-delivered after a crash or a changelog restore). An event from another partition
        (the topic's partition count changed) is never considered applied.
        """
        return partition == self.partition and offset <= self.offset

    def supersedes(self, other: UserRecord) -> bool:
        """True when this record reflects later input of the user than ``other`` (a restore
        keeps the one that supersedes).

        On one partition the higher offset is later. Offsets of two partitions say nothing of
        each other, so across partitions (a producer that partitioned the user elsewhere, or a
        partition count that grew) the later event time wins, then the record with more events,
        then the higher partition, so that the choice never depends on reading order."""
        if self.partition == other.partition:
            return self.offset > other.offset
        return (self.last_ts, self.events, self.partition) > (other.last_ts, other.events, other.partition)

    # --- bytes ---------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The versioned binary form (module docstring). Raises RecordError if a string is too long.

        Encoded once per record and kept: the store and the changelog write the same bytes."""
        cached = self.__dict__.get("_encoded")
        if cached is None:
            cached = self.__dict__["_encoded"] = self._encode()
        return cached

    def _encode(self) -> bytes:
        if self.legacy_window is not None:
            raise RecordError("a format-1 window of external ids is not written: map it to model ids first")
        parts = [
            _HEADER.pack(
                MAGIC, FORMAT_VERSION, _FLAG_EVENT_ID if self.event_id is not None else 0,
                self.partition, self.offset, self.events, float(self.last_ts), len(self.window),
                len(self.recent_ids), self.vocab_size, self.vocab_crc,
            ),
            _string(self.user, "user"),
            _string(self.model_version, "model_version"),
        ]
        if self.event_id is not None:
            parts.append(_string(self.event_id, "event_id"))
        try:
            parts.append(struct.pack(f"<{len(self.window)}I", *self.window))
        except struct.error as e:  # a negative, too large or non-integer id
            raise RecordError(f"window ids must be u32 integers: {e}") from None
        try:
            parts.append(struct.pack(f"<{len(self.recent_ids)}Q", *self.recent_ids))
        except struct.error as e:
            raise RecordError(f"recent event-id hashes must be u64 integers: {e}") from None
        if len(self.state) > 0xFFFFFFFF:
            raise RecordError(f"state of {len(self.state)} bytes is too large")
        parts.append(_U32.pack(len(self.state)))
        parts.append(self.state)
        body = b"".join(parts)
        return body + _U32.pack(crc32c(body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> UserRecord:
        """Reads ``to_bytes`` output. Raises RecordError (a ValueError) on anything malformed."""
        blob = bytes(blob)
        if len(blob) < 4 or blob[:4] != MAGIC:
            raise RecordError(f"not a user record (bad magic bytes {blob[:4]!r}, expected {MAGIC!r})")
        if len(blob) < 5:
            raise RecordError("truncated user record: no format version")
        fmt = blob[4]
        if fmt not in READ_VERSIONS:
            raise RecordError(f"unknown user-record format version {fmt} (this code reads "
                              f"{', '.join(map(str, READ_VERSIONS[:-1]))} and {FORMAT_VERSION})")
        header = _HEADER_V1 if fmt == 1 else _HEADER
        if len(blob) < header.size + 4:
            raise RecordError(f"truncated user record: {len(blob)} bytes, the header alone has {header.size}")
        body, (crc,) = blob[:-4], _U32.unpack_from(blob, len(blob) - 4)
        # Before the crc, check the lengths make sense, so a truncation is reported as one.
        _, _, flags, partition, offset, events, last_ts, n_window, field16, *tag = header.unpack_from(body)
        vocab_size, v_crc = tag if tag else (0, 0)
        # Format 3's n_recent is the reserved field (0) of formats 1 and 2: checked below.
        n_recent, reserved = (field16, 0) if fmt == FORMAT_VERSION else (0, field16)
        recent: tuple[int, ...] = ()
        reader = _Reader(body, header.size)
        window: tuple[int, ...] = ()
        legacy: tuple[str, ...] | None = None
        try:
            user = reader.string("user")
            model_version = reader.string("model_version")
            event_id = reader.string("event_id") if flags & _FLAG_EVENT_ID else None
            if fmt == 1:
                legacy = reader.strings(n_window, "window item")
            else:
                window = struct.unpack(f"<{n_window}I", reader.chunk(4 * n_window, "window ids"))
            if n_recent:
                recent = struct.unpack(f"<{n_recent}Q", reader.chunk(8 * n_recent, "recent event ids"))
            state = reader.chunk(reader.u32("state length"), "state")
        except _Truncated as e:
            raise RecordError(f"truncated user record ({len(blob)} bytes): {e}") from None
        if reader.pos != len(body):
            raise RecordError(f"user record has {len(body) - reader.pos} unexpected trailing bytes")
        if crc32c(body) != crc:
            raise RecordError("user record checksum mismatch (corrupted bytes)")
        if flags & ~_FLAG_EVENT_ID or reserved:
            raise RecordError(f"unknown flags {flags:#x} / reserved field {reserved} in user record")
        if window and (min(window) < 1 or max(window) >= vocab_size):
            raise RecordError(f"window ids out of range 1 .. {vocab_size - 1} of the record's vocabulary")
        try:
            rec = cls(user, state, model_version, window, events, partition, offset, event_id, last_ts,
                      vocab_size, v_crc, legacy, recent)
        except RecordError as e:
            raise RecordError(f"invalid user record: {e}") from None
        # The encoding is a function of the fields, so the checked bytes are its to_bytes(): a
        # record read back and published to the changelog is not encoded again (a format-1
        # or format-2 record goes on as the bytes it was read from, until a batch rewrites it).
        rec.__dict__["_encoded"] = blob
        return rec


def _utf8(s: str, what: str) -> bytes:
    try:
        raw = s.encode("utf-8")
    except (UnicodeEncodeError, AttributeError) as e:
        raise RecordError(f"{what} must be a str encodable as UTF-8: {e}") from None
    if len(raw) > MAX_STRING_BYTES:
        raise RecordError(f"{what} of {len(raw)} bytes exceeds {MAX_STRING_BYTES}")
    return raw


def _string(s: str, what: str) -> bytes:
    raw = _utf8(s, what)
    return _U16.pack(len(raw)) + raw


class _Truncated(Exception):
    pass


class _Reader:
    """Sequential reads from a bytes body, raising _Truncated past its end."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def chunk(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Truncated(f"{what} needs {n} bytes at {self.pos}, {len(self.data) - self.pos} left")
        out, self.pos = self.data[self.pos:end], end
        return out

    def u32(self, what: str) -> int:
        return _U32.unpack(self.chunk(4, what))[0]

    def strings(self, n: int, what: str) -> tuple[str, ...]:
        """n strings stored as n u16 lengths, then their bytes back to back."""
        lengths = struct.unpack(f"<{n}H", self.chunk(2 * n, f"{what} lengths"))
        data = self.chunk(sum(lengths), f"{what}s")
        # ASCII: byte lengths are character lengths, so decode once and slice the str.
        whole = data.decode("ascii") if data.isascii() else None
        parts = whole if whole is not None else data
        out, pos = [], 0
        for n_bytes in lengths:
            out.append(parts[pos:pos + n_bytes])
            pos += n_bytes
        if whole is not None:
            return tuple(out)
        try:
            return tuple(b.decode("utf-8") for b in out)
        except UnicodeDecodeError as e:
            raise RecordError(f"{what} is not valid UTF-8: {e}") from None

    def string(self, what: str) -> str:
        n = _U16.unpack(self.chunk(2, f"{what} length"))[0]
        try:
            return self.chunk(n, what).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"{what} is not valid UTF-8: {e}") from None

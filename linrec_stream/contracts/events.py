"""The message contracts of the stream (format version 1) and the validation of input events.

interactions (key = user id, UTF-8), value JSON::

    {"user": str | int, "item": str | int, "ts": number, "event_id": str (optional)}

The field names are the :class:`EventSchema`'s (settings ``field_user``, ``field_item``,
``field_ts``, ``field_event_id``; the names above are the defaults), so a stream that says
``user_id``, ``item_id`` and ``timestamp`` is read as it is. An integer id stands for its
decimal string (``7`` and ``"7"`` are one item); the key is always that string in UTF-8.

``ts`` is the event time in **epoch seconds** (``event_time_unit = "ms"`` reads milliseconds;
a value outside 1990..now+1 day is rejected, so a producer that sends the other unit finds out
at once rather than skewing latencies). ``event_time`` says where the time comes from:
``field`` (the default: the field, required), ``field_or_record`` (the field when present,
else the Kafka record's timestamp) or ``record`` (always the record's timestamp; the field, if
any, is ignored).

recommendations (key = user id), value JSON::

    {"v": 1, "user": str, "items": [K external ids], "scores": [K floats], "model_version": str,
     "source": {"topic": str, "partition": int, "offset": int}, "event_id": str | null,
     "event_ts": float, "ingested_at": float, "produced_at": float}

``event_ts`` is the event's own time; ``ingested_at`` its Kafka timestamp and ``produced_at``
the time the recommendation was made (both epoch seconds): their difference is the
end-to-end latency.

``source`` names the user's newest event applied, so a consumer can drop duplicates
(recommendations are at-least-once).

interactions-dlq: the original message, bytes untouched (same key and value), with headers
``dlq.reason`` (one of :data:`REASONS`), ``dlq.detail`` (a sentence), ``dlq.topic``,
``dlq.partition``, ``dlq.offset``. A copy that would not fit in one Kafka message
(:data:`DEAD_LETTER_MAX_BYTES`) keeps the first bytes of the value and says so in
``dlq.truncated`` (the original value's length in bytes).

A message without a key is rejected (``missing_key``): a user's events must all land in one
partition (one worker, one state), which only the key gives. ``internal`` names a message whose
handling raised (the exception's class in the detail); the worker goes on without it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Sequence

from linrec_stream.settings import Settings

FORMAT_VERSION = 1
MIN_TS = 631_152_000.0  # 1990-01-01: anything earlier is not an interaction of this system
FUTURE_SLACK_S = 86_400.0  # clocks drift; a day ahead is still plausible, more is not

REASONS = (
    "oversized", "invalid_utf8", "invalid_json", "not_an_object", "missing_field", "bad_type",
    "empty_field", "oversized_field", "bad_timestamp", "key_mismatch", "missing_key", "internal",
)
# Key + value + headers of one dead letter at most: under the 1 MiB default of the broker's
# message.max.bytes and of the producers' max_request_size, with room for the batch overhead.
DEAD_LETTER_MAX_BYTES = 1_000_000


@dataclass(frozen=True)
class Source:
    topic: str
    partition: int
    offset: int
    kafka_ts_ms: int  # the broker's (or producer's) timestamp, for end-to-end latency


@dataclass(frozen=True)
class Interaction:
    user: str
    item: str
    ts: float
    event_id: str | None
    source: Source


@dataclass(frozen=True)
class Rejected:
    reason: str  # one of REASONS
    detail: str
    key: bytes | None
    value: bytes | None
    source: Source

    def headers(self) -> list[tuple[str, bytes]]:
        s = self.source
        # The detail may quote input; backslashreplace keeps any str (a lone surrogate too) sendable.
        return [("dlq.reason", self.reason.encode()), ("dlq.detail", self.detail.encode("utf-8", "backslashreplace")),
                ("dlq.topic", s.topic.encode()), ("dlq.partition", str(s.partition).encode()),
                ("dlq.offset", str(s.offset).encode())]

    def message(self, max_bytes: int = DEAD_LETTER_MAX_BYTES) -> tuple[bytes | None, bytes | None,
                                                                        list[tuple[str, bytes]]]:
        """(key, value, headers) of the dead letter, at most ``max_bytes`` in all: a value that
        does not fit is cut, with ``dlq.truncated`` = its original length."""
        headers = self.headers()
        size = len(self.key or b"") + sum(len(k) + len(v) for k, v in headers)
        value = self.value
        if value is not None and size + len(value) > max_bytes:
            headers.append(("dlq.truncated", str(len(value)).encode()))
            value = value[:max(0, max_bytes - size - 64)]  # 64: the header just added, with room
        return self.key, value, headers

    @classmethod
    def internal(cls, exc: BaseException, key: bytes | None, value: bytes | None, source: Source) -> Rejected:
        """A message whose handling raised ``exc``: reason ``internal``, the class in the detail."""
        return cls("internal", f"{type(exc).__name__}: {exc}"[:500], key, value, source)

    @classmethod
    def from_message(cls, key: bytes | None, value: bytes | None,
                     headers: Sequence[tuple[str, bytes]], kafka_ts_ms: int = -1) -> Rejected:
        """A dead-letter message read back (the inverse of ``headers``): the original key and
        value, the reason and where the event was read from. Raises ValueError if the headers
        are not a dead letter's."""
        h = {k: v.decode("utf-8", "replace") for k, v in headers}
        try:
            source = Source(h["dlq.topic"], int(h["dlq.partition"]), int(h["dlq.offset"]), kafka_ts_ms)
            return cls(h["dlq.reason"], h.get("dlq.detail", ""), key, value, source)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"not a dead letter: header {exc} missing or malformed") from None


@dataclass(frozen=True)
class EventSchema:
    """How an interactions message is read: its field names, where its event time comes from
    and the size limits. The defaults are the settings' (one place: :class:`Settings`)."""

    user: str = Settings.field_user
    item: str = Settings.field_item
    ts: str = Settings.field_ts
    event_id: str = Settings.field_event_id
    event_time: str = Settings.event_time  # one of EVENT_TIME_SOURCES
    ts_unit: str = Settings.event_time_unit  # "s" or "ms"
    max_event_bytes: int = Settings.max_event_bytes
    max_id_chars: int = Settings.max_id_chars

    @classmethod
    def from_settings(cls, settings: Settings) -> EventSchema:
        return cls(settings.field_user, settings.field_item, settings.field_ts, settings.field_event_id,
                   settings.event_time, settings.event_time_unit, settings.max_event_bytes, settings.max_id_chars)


def parse_event(key: bytes | None, value: bytes | None, source: Source, schema: EventSchema,
                now: float | None = None) -> Interaction | Rejected:
    """Validate one interactions message; never raises (anything unforeseen is ``internal``).
    ``now`` (epoch seconds, default the clock) bounds the event time from above."""
    try:
        return _parse_event(key, value, source, schema, now)
    except Exception as exc:  # total: one message never stops the worker
        return Rejected.internal(exc, key, value, source)


def _parse_event(key: bytes | None, value: bytes | None, source: Source, schema: EventSchema,
                 now: float | None) -> Interaction | Rejected:
    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(reason, detail, key, value, source)

    if key is None:
        return reject("missing_key", "the message has no key (the user id): its partition would not be its user's")
    if value is None:
        return reject("invalid_json", "empty message (null value)")
    if len(value) > schema.max_event_bytes:
        return reject("oversized", f"{len(value)} bytes > limit {schema.max_event_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject("invalid_utf8", f"not UTF-8 at byte {exc.start}")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return reject("invalid_json", f"not JSON: {exc}")
    if not isinstance(obj, dict):
        return reject("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    ts_from_field = schema.event_time == "field" or (
        schema.event_time == "field_or_record" and obj.get(schema.ts) is not None)
    for name in (schema.user, schema.item) + ((schema.ts,) if ts_from_field else ()):
        if name not in obj:
            return reject("missing_field", f"field {name!r} is missing")
    ids: dict[str, object] = {schema.user: obj[schema.user], schema.item: obj[schema.item]}
    if obj.get(schema.event_id) is not None:
        ids[schema.event_id] = obj[schema.event_id]
    for name, v in ids.items():
        if isinstance(v, int) and not isinstance(v, bool) and name != schema.event_id:
            v = ids[name] = str(v)  # numeric ids, as many schemas have them: one id, one string
        if not isinstance(v, str):
            kinds = "a string" if name == schema.event_id else "a string or an integer"
            return reject("bad_type", f"field {name!r} must be {kinds}, got {type(v).__name__}")
        if not v.strip():
            return reject("empty_field", f"field {name!r} is empty")
        if len(v) > schema.max_id_chars:
            return reject("oversized_field", f"field {name!r} has {len(v)} characters > {schema.max_id_chars}")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # valid JSON ("\ud800"), but no key, record or message can hold it
            return reject("invalid_utf8", f"field {name!r} is not encodable as UTF-8 (a lone surrogate escape)")
    if ts_from_field:
        raw_ts = obj[schema.ts]
        if isinstance(raw_ts, bool) or not isinstance(raw_ts, (int, float)):
            unit = "epoch milliseconds" if schema.ts_unit == "ms" else "epoch seconds"
            return reject("bad_type", f"field {schema.ts!r} must be a number ({unit}), got {type(raw_ts).__name__}")
        ts = float(raw_ts) / (1000.0 if schema.ts_unit == "ms" else 1.0)
        what = f"{schema.ts} {raw_ts!r}"
    else:
        if source.kafka_ts_ms < 0:
            return reject("bad_timestamp", "the record has no timestamp to take the event time from")
        ts = source.kafka_ts_ms / 1000.0
        what = f"the record's timestamp {source.kafka_ts_ms} ms"
    latest = (time.time() if now is None else now) + FUTURE_SLACK_S
    if not math.isfinite(ts) or not MIN_TS <= ts <= latest:
        unit = "milliseconds" if ts_from_field and schema.ts_unit == "ms" else "seconds"
        return reject("bad_timestamp", f"{what} is not an epoch time in {unit} between 1990 and now")
    user, item = ids[schema.user], ids[schema.item]
    if key != user.encode("utf-8"):
        # All events of a user must land in one partition, hence one worker and one state.
        return reject("key_mismatch", f"message key differs from the {schema.user!r} field")
    return Interaction(user, item, ts, ids.get(schema.event_id), source)


def encode_event(user: str, item: str, ts: float, event_id: str | None = None,
                 schema: EventSchema = EventSchema()) -> tuple[bytes, bytes]:
    """(key, value) of an interactions message, in ``schema``'s field names and time unit
    (``ts`` in epoch seconds)."""
    body: dict[str, object] = {schema.user: user, schema.item: item,
                               schema.ts: ts * 1000.0 if schema.ts_unit == "ms" else ts}
    if event_id is not None:
        body[schema.event_id] = event_id
    return user.encode("utf-8"), json.dumps(body, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class Recommendation:
    user: str
    items: list[str]
    scores: list[float]
    model_version: str
    source: Source
    event_id: str | None
    event_ts: float
    produced_at: float
    trigger: str = "event"  # "event": a new interaction; "model_swap": the state was rebuilt by a new model

    def to_bytes(self) -> bytes:
        s = self.source
        return json.dumps({
            "v": FORMAT_VERSION, "user": self.user, "items": self.items,
            "scores": [round(x, 6) for x in self.scores], "model_version": self.model_version,
            "source": {"topic": s.topic, "partition": s.partition, "offset": s.offset},
            "event_id": self.event_id, "event_ts": self.event_ts,
            "ingested_at": s.kafka_ts_ms / 1000 if s.kafka_ts_ms >= 0 else None,
            "produced_at": self.produced_at, "trigger": self.trigger,
        }, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, blob: bytes) -> Recommendation:
        """A recommendations message read back (the inverse of ``to_bytes``; scores are rounded
        to 6 decimals there). Raises ValueError on anything that is not one."""
        try:
            d = json.loads(blob)
            if not isinstance(d, dict) or d.get("v") != FORMAT_VERSION:
                raise ValueError(f"format version {d.get('v') if isinstance(d, dict) else None!r}")
            src = d["source"]
            ingested = d.get("ingested_at")
            source = Source(str(src["topic"]), int(src["partition"]), int(src["offset"]),
                            -1 if ingested is None else round(float(ingested) * 1000))
            return cls(user=str(d["user"]), items=[str(i) for i in d["items"]],
                       scores=[float(x) for x in d["scores"]], model_version=str(d["model_version"]),
                       source=source, event_id=d.get("event_id"), event_ts=float(d["event_ts"]),
                       produced_at=float(d["produced_at"]), trigger=str(d.get("trigger", "event")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a recommendation ({exc}): {bytes(blob)[:120]!r}") from None

    @property
    def ingested_at(self) -> float | None:
        """The triggering event's Kafka timestamp in epoch seconds (None for a model swap)."""
        return self.source.kafka_ts_ms / 1000 if self.source.kafka_ts_ms >= 0 else None

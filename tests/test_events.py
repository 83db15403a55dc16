"""Validation of interaction messages: every malformed shape has its reason; valid ones pass."""

import json

import pytest

from linrec_stream.contracts.events import Interaction, Limits, Recommendation, Rejected, Source, encode_event, parse_event

SRC = Source("interactions", 2, 41, 1_700_000_000_000)
NOW = 1_800_000_000.0


def parse(value, key=b"alice"):
    return parse_event(key, value, SRC, Limits(max_event_bytes=300, max_id_chars=20), now=NOW)


def test_valid_event():
    key, value = encode_event("alice", "Heat (1995)", 978300760.5, "e1")
    ev = parse(value, key)
    assert ev == Interaction("alice", "Heat (1995)", 978300760.5, "e1", SRC)
    assert parse(json.dumps({"user": "alice", "item": "x", "ts": 978300760}).encode()).event_id is None
    assert isinstance(parse(value, key=None), Interaction)  # an unkeyed message is accepted


@pytest.mark.parametrize("value, reason", [
    (None, "invalid_json"),
    (b"x" * 301, "oversized"),
    (b"\xc3\x28", "invalid_utf8"),
    (b"{", "invalid_json"),
    (b'"just a string"', "not_an_object"),
    (b'{"user": "alice", "ts": 978300760}', "missing_field"),
    (b'{"item": "x", "ts": 978300760}', "missing_field"),
    (b'{"user": "alice", "item": "x"}', "missing_field"),
    (b'{"user": "alice", "item": 7, "ts": 978300760}', "bad_type"),
    (b'{"user": "alice", "item": "x", "ts": "978300760"}', "bad_type"),
    (b'{"user": "alice", "item": "x", "ts": true}', "bad_type"),
    (b'{"user": "alice", "item": "x", "ts": 978300760, "event_id": 3}', "bad_type"),
    (b'{"user": "alice", "item": "  ", "ts": 978300760}', "empty_field"),
    (b'{"user": "alice", "item": "xxxxxxxxxxxxxxxxxxxxx", "ts": 978300760}', "oversized_field"),
    (b'{"user": "alice", "item": "x", "ts": 1700000000000}', "bad_timestamp"),  # milliseconds
    (b'{"user": "alice", "item": "x", "ts": -5}', "bad_timestamp"),
    (b'{"user": "alice", "item": "x", "ts": NaN}', "bad_timestamp"),
    (b'{"user": "alice", "item": "x", "ts": Infinity}', "bad_timestamp"),
    (b'{"user": "bob", "item": "x", "ts": 978300760}', "key_mismatch"),
])
def test_malformed_events_are_rejected_with_their_reason(value, reason):
    out = parse(value)
    assert isinstance(out, Rejected) and out.reason == reason, out
    assert out.value == value and out.key == b"alice"  # the original bytes, untouched
    headers = dict(out.headers())
    assert headers["dlq.reason"] == reason.encode() and headers["dlq.offset"] == b"41"
    assert headers["dlq.partition"] == b"2" and headers["dlq.detail"]


def test_recommendation_message_format():
    rec = Recommendation("alice", ["a", "b"], [1.23456789, 0.5], "v1", SRC, "e1", 978300760.0, 1.8e9)
    body = json.loads(rec.to_bytes())
    assert body == {"v": 1, "user": "alice", "items": ["a", "b"], "scores": [1.234568, 0.5], "model_version": "v1",
                    "source": {"topic": "interactions", "partition": 2, "offset": 41}, "event_id": "e1",
                    "event_ts": 978300760.0, "ingested_at": 1_700_000_000.0, "produced_at": 1.8e9,
                    "trigger": "event"}

"""Validation of interaction messages: every malformed shape has its reason; valid ones pass."""

import json

import pytest

from linrec_stream.contracts.events import Interaction, EventSchema, Recommendation, Rejected, Source, encode_event, parse_event

SRC = Source("interactions", 2, 41, 1_700_000_000_000)
NOW = 1_800_000_000.0


def parse(value, key=b"alice"):
    return parse_event(key, value, SRC, EventSchema(max_event_bytes=300, max_id_chars=20), now=NOW)


def test_valid_event():
    key, value = encode_event("alice", "Heat (1995)", 978300760.5, "e1")
    ev = parse(value, key)
    assert ev == Interaction("alice", "Heat (1995)", 978300760.5, "e1", SRC)
    assert parse(json.dumps({"user": "alice", "item": "x", "ts": 978300760}).encode()).event_id is None
    # No key: its partition is not its user's (one user, one partition, one state): rejected.
    unkeyed = parse(value, key=None)
    assert isinstance(unkeyed, Rejected) and unkeyed.reason == "missing_key" and unkeyed.value == value


@pytest.mark.parametrize("value, reason", [
    (None, "invalid_json"),
    (b"x" * 301, "oversized"),
    (b"\xc3\x28", "invalid_utf8"),
    (b"{", "invalid_json"),
    (b'"just a string"', "not_an_object"),
    (b'{"user": "alice", "ts": 978300760}', "missing_field"),
    (b'{"item": "x", "ts": 978300760}', "missing_field"),
    (b'{"user": "alice", "item": "x"}', "missing_field"),
    (b'{"user": "alice", "item": 7.5, "ts": 978300760}', "bad_type"),
    (b'{"user": "alice", "item": true, "ts": 978300760}', "bad_type"),
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
    # Valid JSON that no key, record or message could hold: lone surrogate escapes.
    (b'{"user": "alice", "item": "\\ud800", "ts": 978300760}', "invalid_utf8"),
    (b'{"user": "alice", "item": "x", "ts": 978300760, "event_id": "\\udfff"}', "invalid_utf8"),
])
def test_malformed_events_are_rejected_with_their_reason(value, reason):
    out = parse(value)
    assert isinstance(out, Rejected) and out.reason == reason, out
    assert out.value == value and out.key == b"alice"  # the original bytes, untouched
    headers = dict(out.headers())
    assert headers["dlq.reason"] == reason.encode() and headers["dlq.offset"] == b"41"
    assert headers["dlq.partition"] == b"2" and headers["dlq.detail"]


def test_integer_ids_are_their_decimal_strings():
    ev = parse(b'{"user": "alice", "item": 7, "ts": 978300760}')
    assert isinstance(ev, Interaction) and ev.item == "7"
    ev = parse(b'{"user": 42, "item": "x", "ts": 978300760}', key=b"42")
    assert isinstance(ev, Interaction) and ev.user == "42"
    assert parse(b'{"user": 42, "item": "x", "ts": 978300760}', key=b"042").reason == "key_mismatch"


MAPPED = EventSchema(user="user_id", item="item_id", ts="timestamp", event_id="id", max_id_chars=20)


def test_field_mapping_reads_other_names():
    value = b'{"user_id": "alice", "item_id": 7, "timestamp": 978300760, "id": "e9"}'
    assert parse_event(b"alice", value, SRC, MAPPED, now=NOW) == Interaction("alice", "7", 978300760.0, "e9", SRC)
    # The default names mean nothing under the mapping: the mapped field is missing, by its name.
    out = parse_event(b"alice", b'{"user": "alice", "item": "x", "ts": 978300760}', SRC, MAPPED, now=NOW)
    assert out.reason == "missing_field" and "'user_id'" in out.detail
    out = parse_event(b"alice", b'{"user_id": "bob", "item_id": "x", "timestamp": 978300760}', SRC, MAPPED, now=NOW)
    assert out.reason == "key_mismatch" and "'user_id'" in out.detail
    # encode_event writes the schema's names: what replay sends, the worker reads.
    key, value = encode_event("alice", "x", 978300760.5, "e1", MAPPED)
    assert set(json.loads(value)) == {"user_id", "item_id", "timestamp", "id"}
    assert parse_event(key, value, SRC, MAPPED, now=NOW) == Interaction("alice", "x", 978300760.5, "e1", SRC)


def test_event_time_in_milliseconds():
    ms = EventSchema(ts_unit="ms")
    key, value = encode_event("alice", "x", 978300760.5, schema=ms)
    assert json.loads(value)["ts"] == 978300760500
    assert parse_event(key, value, SRC, ms, now=NOW).ts == 978300760.5
    # Seconds read as milliseconds land in 1970: refused, with the unit named.
    out = parse_event(b"alice", b'{"user": "alice", "item": "x", "ts": 978300760}', SRC, ms, now=NOW)
    assert out.reason == "bad_timestamp" and "milliseconds" in out.detail


def test_event_time_from_the_record_timestamp():
    no_ts = b'{"user": "alice", "item": "x"}'
    with_ts = b'{"user": "alice", "item": "x", "ts": 978300760}'
    either, record = EventSchema(event_time="field_or_record"), EventSchema(event_time="record")
    assert parse_event(b"alice", no_ts, SRC, either, now=NOW).ts == SRC.kafka_ts_ms / 1000
    assert parse_event(b"alice", with_ts, SRC, either, now=NOW).ts == 978300760.0
    assert parse_event(b"alice", b'{"user": "alice", "item": "x", "ts": null}', SRC, either, now=NOW).ts == 1.7e9
    assert parse_event(b"alice", with_ts, SRC, record, now=NOW).ts == SRC.kafka_ts_ms / 1000  # field ignored
    assert parse_event(b"alice", no_ts, SRC, EventSchema(), now=NOW).reason == "missing_field"
    no_record_ts = Source("interactions", 0, 1, -1)
    out = parse_event(b"alice", no_ts, no_record_ts, record, now=NOW)
    assert out.reason == "bad_timestamp" and "no timestamp" in out.detail


def test_recommendation_message_format():
    rec = Recommendation("alice", ["a", "b"], [1.23456789, 0.5], "v1", SRC, "e1", 978300760.0, 1.8e9)
    body = json.loads(rec.to_bytes())
    assert body == {"v": 1, "user": "alice", "items": ["a", "b"], "scores": [1.234568, 0.5], "model_version": "v1",
                    "source": {"topic": "interactions", "partition": 2, "offset": 41}, "event_id": "e1",
                    "event_ts": 978300760.0, "ingested_at": 1_700_000_000.0, "produced_at": 1.8e9,
                    "trigger": "event"}


def test_a_lone_surrogate_user_is_rejected_not_raised():
    value = b'{"user": "\\ud800", "item": "x", "ts": 978300760}'
    out = parse(value, key=b"\xed\xa0\x80")
    assert isinstance(out, Rejected) and out.reason == "invalid_utf8"
    assert all(isinstance(v, bytes) for _, v in out.headers())


def test_anything_unforeseen_while_parsing_is_internal(monkeypatch):
    import linrec_stream.contracts.events as events

    def boom(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(events.json, "loads", boom)
    out = parse(b'{"user": "alice", "item": "x", "ts": 978300760}')
    assert isinstance(out, Rejected) and out.reason == "internal" and out.detail.startswith("RecursionError")


def test_a_dead_letter_too_large_for_kafka_is_cut_and_says_so():
    big = b"x" * 2_000_000
    rej = Rejected("oversized", "too big", b"alice", big, SRC)
    key, value, headers = rej.message(max_bytes=1_000_000)
    size = len(key) + len(value) + sum(len(k) + len(v) for k, v in headers)
    assert size <= 1_000_000 and big.startswith(value) and len(value) > 900_000
    assert dict(headers)["dlq.truncated"] == b"2000000"
    small = Rejected("invalid_json", "not JSON", b"alice", b"{", SRC).message()
    assert small[1] == b"{" and "dlq.truncated" not in dict(small[2])

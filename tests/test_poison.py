"""No message stops the worker (issue 19): the loop on an in-memory transport and a real rocksdict
store, fed arbitrary records (a hypothesis fuzzer) and a message whose handling raises. The
property: the worker never raises; each message is either applied or dead-lettered with a reason;
no valid event is dropped."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from consumers.batch import apply_batch
from linrec_stream.contracts.events import REASONS, Interaction, EventSchema, Rejected, Source, encode_event, parse_event
from state.store import StateStore
from tests.helpers import tiny_serving
from tests.test_worker_loop import NUM_ITEMS, TOPIC, Message, run_worker, sent

MODEL = tiny_serving(0, NUM_ITEMS)
USERS = ["u0", "u1", "u2", "\u00e9l\u00e8ve", "\U0001f600"]

# Every code point, lone surrogates included (hypothesis leaves them out by default): json.dumps
# escapes them ("\ud800"), valid JSON that no UTF-8 key, record or message can hold.
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
ids = st.sampled_from(USERS) | any_text | st.sampled_from(["\ud800", "a\udfffb"])  # (rare in any_text)
ts = st.floats(allow_nan=True) | st.integers() | st.just(1.0e9) | st.text(max_size=5)


@st.composite
def messages(draw) -> tuple[bytes | None, bytes | None]:
    """(key, value) of one record: a valid event, an event-shaped object with any field values,
    any JSON value, JSON text with duplicate keys, deep nesting or huge numbers, or any bytes;
    with the user's key, any key or none. (The worker reads no record headers.)"""
    kind = draw(st.sampled_from(["valid", "shaped", "json", "bytes", "text"]))
    user = draw(st.sampled_from(USERS))
    if kind == "valid":
        item = draw(st.integers(1, NUM_ITEMS + 3))  # a few unknown items too
        key, value = encode_event(user, f"item-{item}", 1.0e9 + draw(st.integers(0, 10**6)))
    elif kind == "shaped":
        body = {"user": draw(ids), "item": draw(ids), "ts": draw(ts)}
        if draw(st.booleans()):
            body["event_id"] = draw(ids | json_values)
        body.update(draw(st.dictionaries(any_text, json_values, max_size=2)))  # extra fields
        value = json.dumps(body, allow_nan=True).encode()
        key = user.encode()
    elif kind == "json":
        value, key = json.dumps(draw(json_values), allow_nan=True).encode(), user.encode()
    elif kind == "text":  # JSON text json.dumps never writes: duplicate keys, deep nesting, huge numbers
        depth = draw(st.integers(1, 2500))
        value = draw(st.sampled_from([
            f'{{"user": "{user}", "user": "other", "item": "item-1", "ts": 1e9}}',
            f'{{"user": "{user}", "item": "item-1", "item": "item-2", "ts": 1e9, "ts": 2e9}}',
            "[" * depth + "]" * depth,
            f'{{"user": "{user}", "item": ' + "[" * depth + "]" * depth + ', "ts": 1e9}',
            f'{{"user": "{user}", "item": "item-1", "ts": 1e400}}',
            f'{{"user": "{user}", "item": "item-1", "ts": {"9" * draw(st.integers(1, 4000))}}}',
            f'{{"user": "{user}", "item": "item-1", "ts": 1e9, "event_id": "{"x" * draw(st.integers(1, 300))}"}}',
        ])).encode("utf-8", "surrogatepass")
        key = user.encode()
    else:
        value, key = draw(st.binary(max_size=64)), draw(st.binary(max_size=8))
    key = draw(st.sampled_from([key, None, key])) if kind != "bytes" else key
    if draw(st.booleans()) and kind != "valid":
        key = draw(st.binary(max_size=8) | st.none())
    return key, value


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), min_size=1, max_size=30), st.integers(1, 8))
def test_any_records_are_applied_or_dead_lettered_never_raised(records, batch_size):
    log: dict[int, list[Message]] = {0: [], 1: []}
    for i, (key, value) in enumerate(records):
        p = i % 2
        log[p].append(Message(TOPIC, p, len(log[p]), 1_700_000_000_000, key, value))
    # What the contract says of each record, and so what the worker must do with it.
    expected = Counter()
    valid = 0
    limits = EventSchema()
    for p, msgs in log.items():
        for m in msgs:
            out = parse_event(m.key, m.value, Source(TOPIC, p, m.offset, m.timestamp), limits)
            if isinstance(out, Interaction):
                expected[out.user] += 1
                valid += 1
    with tempfile.TemporaryDirectory() as tmp:
        run = run_worker(Path(tmp) / "state", log, {}, MODEL, batch_size)  # raises if the worker did
        dead = [Rejected.from_message(k, v, h) for k, v, h in sent(run, "dead_letter")]
        with StateStore(Path(tmp) / "state") as store:
            applied = Counter({r.user: r.events for r in store.records()})
    assert all(d.reason in REASONS for d in dead)
    assert len(dead) + valid == len(records), "every record is applied or dead-lettered, once"
    assert applied == expected, "every valid event is applied to its user"


def test_a_message_whose_handling_raises_is_dead_lettered_and_the_rest_applied(tmp_path: Path):
    def apply_but_choke_on_poison(serving, stored, events, top_k, window):
        if any(e.item == "item-13" for e in events):
            raise OverflowError("the poison item")
        return apply_batch(serving, stored, events, top_k, window)

    log: dict[int, list[Message]] = {0: []}
    for k in range(10):
        key, value = encode_event(f"u{k % 3}", f"item-{13 if k == 6 else k + 1}", 1e9 + k)
        log[0].append(Message(TOPIC, 0, k, 1_700_000_000_000, key, value))
    run = run_worker(tmp_path / "state", log, {}, MODEL, batch_size=8, apply=apply_but_choke_on_poison)
    dead = [Rejected.from_message(k, v, h) for k, v, h in sent(run, "dead_letter")]
    assert [(d.reason, d.source.offset) for d in dead] == [("internal", 6)]
    assert dead[0].detail.startswith("OverflowError") and dead[0].value == log[0][6].value
    with StateStore(tmp_path / "state") as store:
        events = {r.user: r.events for r in store.records()}
        assert store.partitions() == {0: 10}  # the worker went past it
    assert events == {"u0": 4 - 1, "u1": 3, "u2": 3}  # u0's event at offset 6 was the poison

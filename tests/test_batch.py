"""``apply_batch``, the worker's micro-batch, without Kafka: a tiny random model, events in,
records and recommendations out, checked against the model's own encoding of each user's
history."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from consumers.batch import apply_batch, rebuild_batch
from consumers.serving import ServingModel
from linrec_stream.contracts.events import Interaction, Source
from linrec_stream.model import UserState
from linrec_stream.model.user_state import HEADER_SIZE
from linrec_stream.settings import Settings, SettingsError
from state.record import UserRecord, event_id_hash
from tests.helpers import item_vocab, tiny_serving

NUM_ITEMS = 20
TOPIC = "interactions"


def serving_model(seed: int = 0) -> ServingModel:
    # Decaying states: a user sitting out part of a batch must not decay.
    return tiny_serving(seed, NUM_ITEMS, "linrec_decay")


@pytest.fixture(scope="module")
def sm() -> ServingModel:
    return serving_model()


def stream(pairs: list[tuple[str, str]], start: int = 0, partition: int = 0) -> list[Interaction]:
    """(user, item) pairs as consecutive messages of one partition from offset ``start``."""
    return [Interaction(user, item, 1e9 + off, f"e{off}", Source(TOPIC, partition, off, 1_700_000_000_000 + off))
            for off, (user, item) in enumerate(pairs, start)]


def apply(sm: ServingModel, stored: dict[str, UserRecord], events: list[Interaction], window: int = 50,
          top_k: int = 5):
    result = apply_batch(sm, stored, events, top_k, window, now=2e9)
    return result, {r.user: r for r in result.records}


def ids(sm: ServingModel, *items: str) -> tuple[int, ...]:
    """The window a record holds for these known items: their model ids."""
    return tuple(sm.ids(items))


def encoded(sm: ServingModel, items: list[str]) -> UserState:
    """The model's own encoding of a whole history from the empty state (known items only)."""
    with torch.inference_mode():
        return sm.model.encode(torch.tensor([sm.ids(items) or [0]]))[1]


def assert_state(sm: ServingModel, record: UserRecord, items: list[str]) -> None:
    got, want = UserState.from_bytes(record.state), encoded(sm, items)
    assert int(got.num_events[0]) == len(sm.ids(items))
    torch.testing.assert_close(got.S, want.S, rtol=1e-4, atol=1e-6)


def test_each_state_encodes_the_users_events_and_redelivered_offsets_are_skipped(sm: ServingModel):
    first = stream([("a", "i1"), ("b", "i2"), ("a", "i3"), ("a", "i4"), ("b", "i5")])
    result, records = apply(sm, {}, first)
    assert (result.applied, result.duplicates, result.rebuilt) == (5, 0, 0)
    assert (records["a"].events, records["a"].offset, records["a"].event_id) == (3, 3, "e3")
    assert_state(sm, records["a"], ["i1", "i3", "i4"])
    assert_state(sm, records["b"], ["i2", "i5"])

    # After a crash between the store commit and the group commit: offsets 2-4 come again.
    again, after = apply(sm, records, first[2:] + stream([("a", "i6")], start=5))
    assert (again.applied, again.duplicates) == (1, 3)
    assert list(after) == ["a"] and [r.user for r in again.recommendations] == ["a"]
    assert (after["a"].events, after["a"].offset, after["a"].window) == (4, 5, ids(sm, "i1", "i3", "i4", "i6"))
    assert (after["a"].vocab_size, after["a"].vocab_crc) == sm.vocab_tag
    assert_state(sm, after["a"], ["i1", "i3", "i4", "i6"])

    # The whole batch re-delivered: nothing applied, nothing recommended.
    replay, none = apply(sm, records, first)
    assert (replay.applied, replay.duplicates, none, replay.recommendations) == (0, 5, {}, [])


def test_applying_events_in_two_batches_equals_one_batch(sm: ServingModel):
    rng = random.Random(3)
    items = [f"i{k}" for k in range(1, NUM_ITEMS + 1)] + ["new-1", "new-2"]  # some unknown
    events = stream([(rng.choice("abc"), rng.choice(items)) for _ in range(40)])
    whole, whole_records = apply(sm, {}, events, window=8)
    whole_recs = {r.user: r for r in whole.recommendations}
    for cut in (1, 17, 39):
        head, stored = apply(sm, {}, events[:cut], window=8)
        tail, tail_records = apply(sm, stored, events[cut:], window=8)
        assert head.applied + tail.applied == 40 and tail.duplicates == 0
        final = {**stored, **tail_records}
        assert set(final) == set(whole_records)
        for user, rec in whole_records.items():
            got = final[user]
            assert (got.window, got.events, got.partition, got.offset, got.event_id, got.last_ts) == \
                (rec.window, rec.events, rec.partition, rec.offset, rec.event_id, rec.last_ts)
            torch.testing.assert_close(UserState.from_bytes(got.state).S, UserState.from_bytes(rec.state).S,
                                       rtol=1e-4, atol=1e-6)
        # Each user's newest recommendation is the one the single batch gave.
        newest = {r.user: r for r in head.recommendations + tail.recommendations}
        assert set(newest) == set(whole_recs)
        for user, rec in whole_recs.items():
            assert newest[user].items == rec.items and newest[user].source == rec.source
            assert newest[user].scores == pytest.approx(rec.scores, rel=1e-4, abs=1e-6)


def test_unknown_items_count_but_leave_the_state_and_the_window(sm: ServingModel):
    _, stored = apply(sm, {}, stream([("a", "i1"), ("a", "i2")]))
    result, records = apply(sm, stored, stream([("a", "new-x"), ("b", "new-z"), ("a", "new-y"), ("b", "i3")],
                                               start=2))
    assert (result.applied, result.unknown_items) == (4, 3)
    a = records["a"]
    assert (a.window, a.events, a.offset, a.event_id) == (ids(sm, "i1", "i2"), 4, 4, "e4")
    before, after = UserState.from_bytes(stored["a"].state), UserState.from_bytes(a.state)
    assert int(after.num_events[0]) == 2
    torch.testing.assert_close(after.S, before.S, rtol=0, atol=0)
    assert (records["b"].window, records["b"].events) == (ids(sm, "i3"), 2)
    assert_state(sm, records["b"], ["i3"])
    # Only unknown items in this batch: no recommendation for a; b had a known one.
    assert [r.user for r in result.recommendations] == ["b"]
    # A brand-new user with only unknown items: a record, no recommendation.
    new_user, new_records = apply(sm, {}, stream([("c", "new-q")], start=10))
    assert new_user.recommendations == [] and new_records["c"].window == ()
    assert new_records["c"].events == 1


def test_a_state_of_another_model_version_is_rebuilt_from_its_window(sm: ServingModel):
    old = serving_model(seed=1)
    assert old.version != sm.version
    _, by_old = apply(old, {}, stream([("a", "i1"), ("a", "i2"), ("a", "i3")]))
    _, by_new = apply(sm, {}, stream([("b", "i4")], start=3))
    result, records = apply(sm, {**by_old, **by_new}, stream([("a", "i5"), ("b", "i6")], start=4))
    assert result.rebuilt == 1  # a only: b's state is this model's
    assert records["a"].model_version == sm.version and records["a"].events == 4
    assert_state(sm, records["a"], ["i1", "i2", "i3", "i5"])
    assert_state(sm, records["b"], ["i4", "i6"])
    assert {r.model_version for r in result.recommendations} == {sm.version}


def test_the_window_keeps_the_last_items_and_the_state_all_of_them(sm: ServingModel):
    history = [f"i{k}" for k in (3, 1, 4, 1, 5, 9, 2)]
    _, stored = apply(sm, {}, stream([("a", x) for x in history[:5]]), window=4)
    assert stored["a"].window == ids(sm, "i1", "i4", "i1", "i5")
    _, records = apply(sm, stored, stream([("a", x) for x in history[5:]], start=5), window=4)
    assert records["a"].window == ids(sm, "i1", "i5", "i9", "i2") and records["a"].events == 7
    assert_state(sm, records["a"], history)


def test_seen_items_are_the_window_and_are_never_recommended(sm: ServingModel):
    history = ["i1", "i2", "i3", "i2", "i4", "new-x", "i5"]
    result, _ = apply(sm, {}, stream([("a", x) for x in history]), window=4, top_k=NUM_ITEMS)
    (rec,) = result.recommendations
    seen = {"i3", "i2", "i4", "i5"}  # the window: the last 4 known items (new-x is unknown)
    assert not set(rec.items) & seen
    # Every other item is ranked, i1 too: it has left the window.
    assert sorted(rec.items) == sorted(set(item_vocab(NUM_ITEMS)[1:]) - seen) and "i1" in rec.items
    assert rec.scores == sorted(rec.scores, reverse=True)
    top5, _ = apply(sm, {}, stream([("a", x) for x in history]), window=4, top_k=5)
    assert top5.recommendations[0].items == rec.items[:5]


# --- storage dtype ----------------------------------------------------------------------------------
def as_stored(sm: ServingModel, dtype: str | None) -> ServingModel:
    return ServingModel.of(sm.model, sm.vocab, state_dtype=dtype)


def test_float32_storage_is_the_models_own_bytes(sm: ServingModel):
    events = stream([("a", "i1"), ("b", "i2"), ("a", "i3")])
    _, own = apply(sm, {}, events)  # state_dtype None: the model's dtype, as before the setting
    _, f32 = apply(as_stored(sm, "float32"), {}, events)
    assert {u: r.state for u, r in own.items()} == {u: r.state for u, r in f32.items()}
    assert UserState.stored_dtype(f32["a"].state) == torch.float32
    assert_state(sm, f32["a"], ["i1", "i3"])


def test_float16_storage_halves_the_state_and_resumes_close_to_float32(sm: ServingModel):
    half = as_stored(sm, "float16")
    rng = random.Random(5)
    first = stream([(rng.choice("abcd"), f"i{rng.randint(1, NUM_ITEMS)}") for _ in range(30)])
    second = stream([(u, f"i{rng.randint(1, NUM_ITEMS)}") for u in "abcd"], start=30)
    _, s32 = apply(sm, {}, first, top_k=NUM_ITEMS)
    _, s16 = apply(half, {}, first, top_k=NUM_ITEMS)
    payload32 = len(s32["a"].state) - HEADER_SIZE  # one layer, 2 heads of 4x4, float32: 128 bytes
    assert payload32 == 4 * 2 * 4 * 4 and len(s16["a"].state) == HEADER_SIZE + payload32 // 2
    assert UserState.stored_dtype(s16["a"].state) == torch.float16
    # Resuming: the float16 states are read back, computed on in float32, stored again.
    r32, after32 = apply(sm, s32, second, top_k=NUM_ITEMS)
    r16, after16 = apply(half, s16, second, top_k=NUM_ITEMS)
    assert r16.rebuilt == 0 and [r.items[:3] for r in r16.recommendations] == [r.items[:3] for r in r32.recommendations]
    state_err = max(float((UserState.from_bytes(after16[u].state).S.float() - UserState.from_bytes(after32[u].state).S)
                          .abs().max()) for u in "abcd")
    score_err = max(max(abs(x - y) for x, y in zip(a.scores, b.scores))
                    for a, b in zip(r16.recommendations, r32.recommendations))
    # The hidden states of the resumed step itself, from the float16 and the float32 states.
    new_items = torch.tensor([sm.ids([e.item]) for e in second])  # (4, 1): a, b, c, d
    with torch.inference_mode():
        h16 = sm.model.encode(new_items, UserState.from_bytes_many([s16[u].state for u in "abcd"]))[0]
        h32 = sm.model.encode(new_items, UserState.from_bytes_many([s32[u].state for u in "abcd"]))[0]
    hidden_err = float((h16 - h32).abs().max())
    # Measured on this model (states up to 0.26, hidden states up to 2.0, scores up to 0.13):
    # stored state 8.5e-5 (float16's rounding), hidden state 1.0e-6, scores 8.2e-8. Bounds a bit above.
    assert state_err < 1.5e-4 and hidden_err < 3e-6 and score_err < 2e-7


def test_states_stored_in_two_dtypes_are_read_in_one_batch(sm: ServingModel):
    _, a = apply(sm, {}, stream([("a", "i1"), ("a", "i2")]))
    _, b = apply(as_stored(sm, "bfloat16"), {}, stream([("b", "i3")], start=2))
    result, records = apply(sm, {**a, **b}, stream([("a", "i4"), ("b", "i5")], start=3))
    assert result.rebuilt == 0 and {r.user for r in result.recommendations} == {"a", "b"}
    assert_state(sm, records["a"], ["i1", "i2", "i4"])
    got, want = UserState.from_bytes(records["b"].state), encoded(sm, ["i3", "i5"])
    torch.testing.assert_close(got.S, want.S, rtol=0, atol=2e-2)  # i3 went through bfloat16


# --- windows as ids of a tagged vocabulary --------------------------------------------------------
def test_a_grown_vocabulary_reads_the_window_ids_as_they_are(sm: ServingModel):
    _, stored = apply(sm, {}, stream([("a", "i1"), ("a", "i7")]))
    grown = tiny_serving(2, NUM_ITEMS + 4, "linrec_decay")  # warm start: i21..i24 appended
    assert grown.vocab_tag != sm.vocab_tag
    result, records = apply(grown, stored, stream([("a", "i22")], start=2))
    assert (result.rebuilt, result.windows_dropped) == (1, 0)
    assert records["a"].window == ids(grown, "i1", "i7", "i22")
    assert (records["a"].vocab_size, records["a"].vocab_crc) == grown.vocab_tag
    assert_state(grown, records["a"], ["i1", "i7", "i22"])


def reordered(seed: int, vocab_of=None) -> ServingModel:
    """A model retrained from scratch: the same items, numbered in another order."""
    torch.manual_seed(seed)
    other = tiny_serving(seed, NUM_ITEMS, "linrec_decay")
    return ServingModel.of(other.model, ["<pad>", *reversed(item_vocab(NUM_ITEMS)[1:])], vocab_of=vocab_of)


def test_a_reordered_vocabulary_maps_the_window_through_the_old_one(sm: ServingModel):
    _, stored = apply(sm, {}, stream([("a", "i1"), ("a", "i7")]))
    new = reordered(3, vocab_of={sm.version: sm.vocab}.get)
    assert new.ids(["i1", "i7"]) != sm.ids(["i1", "i7"])
    result, records = apply(new, stored, stream([("a", "i2")], start=2))
    assert (result.rebuilt, result.windows_dropped) == (1, 0)
    assert records["a"].window == ids(new, "i1", "i7", "i2") and records["a"].vocab_size == len(new.vocab)
    assert_state(new, records["a"], ["i1", "i7", "i2"])
    # The sweep after a swap maps them the same way.
    swept = rebuild_batch(new, list(stored.values()), top_k=5, topic=TOPIC)
    assert swept.records[0].window == ids(new, "i1", "i7") and swept.windows_dropped == 0


def test_an_unreadable_window_is_dropped_and_the_state_rebuilt_from_scratch(sm: ServingModel):
    _, stored = apply(sm, {}, stream([("a", "i1"), ("a", "i7")]))
    new = reordered(3)  # no way to find the old vocabulary
    result, records = apply(new, stored, stream([("a", "i2")], start=2))
    assert (result.rebuilt, result.windows_dropped, result.applied) == (1, 1, 1)
    assert records["a"].window == ids(new, "i2") and records["a"].events == 3  # the count survives
    assert_state(new, records["a"], ["i2"])
    swept = rebuild_batch(new, list(stored.values()), top_k=5, topic=TOPIC)
    assert (swept.windows_dropped, swept.records[0].window, swept.recommendations) == (1, (), [])


def test_a_format_1_window_of_external_ids_is_mapped_on_first_use(sm: ServingModel):
    old = serving_model(seed=1)
    _, by_old = apply(old, {}, stream([("a", "i1"), ("a", "i3")]))
    v1 = dataclasses.replace(by_old["a"], window=(), vocab_size=0, vocab_crc=0,
                             legacy_window=("i1", "gone", "i3"))
    result, records = apply(sm, {"a": v1}, stream([("a", "i4")], start=2))
    assert (result.rebuilt, result.windows_dropped) == (1, 0)
    assert records["a"].window == ids(sm, "i1", "i3", "i4") and records["a"].legacy_window is None
    assert_state(sm, records["a"], ["i1", "i3", "i4"])
    assert UserRecord.from_bytes(records["a"].to_bytes()) == records["a"]


# --- one new event per user: the one-event form ----------------------------------------------------
@pytest.mark.parametrize("attention", ["linrec", "linrec_decay", "linrec_seqnorm", "linear", "softmax"])
def test_a_batch_of_one_event_per_user_steps_equal_to_encode(attention: str):
    sm = tiny_serving(4, NUM_ITEMS, attention)
    rng = random.Random(9)
    _, stored = apply(sm, {}, stream([(rng.choice("abcde"), f"i{rng.randint(1, NUM_ITEMS)}") for _ in range(25)]))
    one_each = stream([("a", "i3"), ("b", "new-x"), ("c", "i9"), ("d", "i1"), ("e", "i20")], start=25)
    result, records = apply(sm, stored, one_each, top_k=NUM_ITEMS)
    users = "abcde"
    with torch.inference_mode():  # the parallel form from the same stored states
        start = UserState.stack([sm.model.load_state_bytes(stored[u].state) for u in users])
        h, want = sm.model.encode(torch.tensor([sm.ids([e.item]) or [0] for e in one_each]), start)
        logits = sm.model.score(h[:, -1])  # (5, I + 1)
    for row, u in enumerate(users):
        got = sm.model.load_state_bytes(records[u].state)
        for name in ("S", "z", "k", "v"):
            if getattr(got, name) is not None:
                torch.testing.assert_close(getattr(got, name), getattr(want[row], name), rtol=0, atol=1e-5)
    recs = {r.user: r for r in result.recommendations}
    assert set(recs) == {"a", "c", "d", "e"}  # b's only event is unknown
    for row, u in enumerate(users):
        if u in recs:
            scores = logits[row].tolist()
            assert recs[u].scores == pytest.approx([scores[k] for k in sm.ids(recs[u].items)], abs=1e-5)


# --- event ids: upstream retries (the same event_id at a new offset) ------------------------------
def with_ids(rows: list[tuple[str, str, str | None]], start: int = 0) -> list[Interaction]:
    """(user, item, event_id) rows as consecutive messages of partition 0 from offset ``start``."""
    return [Interaction(user, item, 1e9 + off, eid, Source(TOPIC, 0, off, 1_700_000_000_000 + off))
            for off, (user, item, eid) in enumerate(rows, start)]


def dedup(sm: ServingModel, keep: int) -> ServingModel:
    return ServingModel.of(sm.model, sm.vocab, dedup_event_ids=keep)


def hashes(*event_ids: str) -> tuple[int, ...]:
    return tuple(event_id_hash(e) for e in event_ids)


def test_the_dedup_setting_reaches_the_batch_through_the_serving_model(sm: ServingModel):
    assert sm.dedup_event_ids == Settings().dedup_event_ids == 32  # the same default both ways
    assert Settings(dedup_event_ids=0).dedup_event_ids == 0
    with pytest.raises(SettingsError, match=r"^setting dedup_event_ids: must be 0 \(off\) .. 65535, got -1$"):
        Settings(dedup_event_ids=-1)
    with pytest.raises(ValueError, match="dedup_event_ids"):
        dedup(sm, 70_000)  # more than a record holds


def test_a_retried_event_id_is_applied_once_within_and_across_batches(sm: ServingModel):
    first = with_ids([("a", "i1", "x1"), ("b", "i2", "y1"), ("a", "i3", "x1"), ("a", "i4", "x2")])
    result, records = apply(sm, {}, first)
    assert (result.applied, result.duplicates, result.duplicate_ids) == (3, 1, 1)
    a = records["a"]
    assert (a.events, a.offset, a.event_id, a.window) == (2, 3, "x2", ids(sm, "i1", "i4"))
    assert a.recent_ids == hashes("x1", "x2") and records["b"].recent_ids == hashes("y1")
    assert_state(sm, a, ["i1", "i4"])
    assert UserRecord.from_bytes(a.to_bytes()) == a

    # Later retries at new offsets: skipped against the stored set. The same id for another
    # user (c) is another event; a re-delivered offset (3) is a duplicate, not a duplicate id.
    second = first[3:] + with_ids([("a", "i5", "x1"), ("b", "i6", "y1"), ("c", "i7", "x1"), ("a", "i8", "x3")],
                                  start=4)
    again, after = apply(sm, records, second)
    assert (again.applied, again.duplicates, again.duplicate_ids) == (2, 3, 2)
    assert set(after) == {"a", "c"} and {r.user for r in again.recommendations} == {"a", "c"}  # b: only a retry
    assert (after["a"].events, after["a"].offset, after["a"].window) == (3, 7, ids(sm, "i1", "i4", "i8"))
    assert after["a"].recent_ids == hashes("x1", "x2", "x3") and after["c"].recent_ids == hashes("x1")
    assert_state(sm, after["a"], ["i1", "i4", "i8"])
    # Merged results add the new counter up; a model swap's rebuild keeps the set.
    assert result.merged(again).duplicate_ids == 3
    (rebuilt,) = rebuild_batch(serving_model(seed=1), [after["a"]], 5, TOPIC).records
    assert rebuilt.recent_ids == after["a"].recent_ids


def test_the_recent_set_keeps_the_last_ids_and_an_older_one_is_applied_again(sm: ServingModel):
    two = dedup(sm, 2)
    _, stored = apply(two, {}, with_ids([("a", "i1", "x1"), ("a", "i2", "x2"), ("a", "i3", "x3")]))
    assert stored["a"].recent_ids == hashes("x2", "x3")  # x1, the oldest, dropped
    # Documented: x1 has slid out of the set, so its retry is applied again; x3's is skipped.
    result, records = apply(two, stored, with_ids([("a", "i4", "x1"), ("a", "i5", "x3")], start=3))
    assert (result.applied, result.duplicate_ids) == (1, 1)
    assert records["a"].recent_ids == hashes("x3", "x1") and records["a"].events == 4
    # Within one batch the set slides the same way: x1 is 2 ids back when retried, then 3.
    within, one = apply(two, {}, with_ids([("a", "i1", "x1"), ("a", "i2", "x2"), ("a", "i3", "x1"),
                                           ("a", "i4", "x3"), ("a", "i5", "x1")]))
    assert (within.applied, within.duplicate_ids) == (4, 1)
    assert one["a"].recent_ids == hashes("x3", "x1") and one["a"].window == ids(sm, "i1", "i2", "i4", "i5")
    # A smaller bound than a stored set's (the setting lowered) keeps its newest ids.
    (lowered,) = apply(dedup(sm, 1), stored, with_ids([("a", "i6", "x2")], start=3))[0].records
    assert lowered.recent_ids == hashes("x2") and lowered.events == 4  # x2 was 2 back: applied again


def test_zero_turns_event_id_dedup_off(sm: ServingModel):
    retried = with_ids([("a", "i1", "x1"), ("a", "i2", "x1")])
    _, stored = apply(sm, {}, retried[:1])
    off = dedup(sm, 0)
    result, records = apply(off, stored, retried[1:])
    assert (result.applied, result.duplicates, result.duplicate_ids) == (1, 0, 0)
    assert records["a"].events == 2 and records["a"].recent_ids == ()  # no set kept when off
    assert_state(sm, records["a"], ["i1", "i2"])
    both, _ = apply(off, {}, retried)
    assert (both.applied, both.duplicates) == (2, 0)
    # Offsets still deduplicate.
    assert apply(off, records, retried)[0].duplicates == 2


def test_events_without_an_event_id_are_never_deduplicated_by_id(sm: ServingModel):
    _, stored = apply(sm, {}, with_ids([("a", "i1", "x1")]))
    same = with_ids([("a", "i2", None), ("a", "i2", None), ("b", "i3", None)], start=1)
    result, records = apply(sm, stored, same)
    assert (result.applied, result.duplicates, result.duplicate_ids) == (3, 0, 0)
    assert records["a"].events == 3 and records["a"].event_id is None
    assert records["a"].recent_ids == hashes("x1") and records["b"].recent_ids == ()  # the stored set carries on
    assert_state(sm, records["a"], ["i1", "i2", "i2"])


def test_with_retries_two_batches_still_equal_one(sm: ServingModel):
    rng = random.Random(5)
    pool = [f"x{k}" for k in range(8)]  # few ids: many retries, some of them slid out of the set
    rows = [(rng.choice("ab"), f"i{rng.randint(1, NUM_ITEMS)}", rng.choice(pool + [None])) for _ in range(40)]
    events, three = with_ids(rows), dedup(sm, 3)
    whole, whole_records = apply(three, {}, events, window=8)
    assert whole.duplicate_ids > 0 and whole.applied + whole.duplicates == 40
    for cut in range(1, 40, 3):
        head, stored = apply(three, {}, events[:cut], window=8)
        tail, tail_records = apply(three, stored, events[cut:], window=8)
        assert (head.applied + tail.applied, head.duplicates + tail.duplicates,
                head.duplicate_ids + tail.duplicate_ids) == (whole.applied, whole.duplicates, whole.duplicate_ids)
        final = {**stored, **tail_records}
        assert set(final) == set(whole_records)
        for user, rec in whole_records.items():
            got = final[user]
            assert (got.window, got.events, got.offset, got.event_id, got.recent_ids) == \
                (rec.window, rec.events, rec.offset, rec.event_id, rec.recent_ids)
            torch.testing.assert_close(UserState.from_bytes(got.state).S, UserState.from_bytes(rec.state).S,
                                       rtol=1e-4, atol=1e-6)

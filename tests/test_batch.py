"""``apply_batch``, the worker's micro-batch, without Kafka: a tiny random model, events in,
records and recommendations out, checked against the model's own encoding of each user's
history."""

from __future__ import annotations

import random

import pytest
import torch

from consumers.batch import apply_batch
from consumers.serving import ServingModel
from linrec_stream.contracts.events import Interaction, Source
from linrec_stream.model import UserState
from state.record import UserRecord
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
    assert (after["a"].events, after["a"].offset, after["a"].window) == (4, 5, ("i1", "i3", "i4", "i6"))
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


def test_unknown_items_enter_the_window_and_count_but_leave_the_state(sm: ServingModel):
    _, stored = apply(sm, {}, stream([("a", "i1"), ("a", "i2")]))
    result, records = apply(sm, stored, stream([("a", "new-x"), ("b", "new-z"), ("a", "new-y"), ("b", "i3")],
                                               start=2))
    assert (result.applied, result.unknown_items) == (4, 3)
    a = records["a"]
    assert (a.window, a.events, a.offset, a.event_id) == (("i1", "i2", "new-x", "new-y"), 4, 4, "e4")
    before, after = UserState.from_bytes(stored["a"].state), UserState.from_bytes(a.state)
    assert int(after.num_events[0]) == 2
    torch.testing.assert_close(after.S, before.S, rtol=0, atol=0)
    assert (records["b"].window, records["b"].events) == (("new-z", "i3"), 2)
    assert_state(sm, records["b"], ["i3"])
    # Only unknown items in this batch: no recommendation for a; b had a known one.
    assert [r.user for r in result.recommendations] == ["b"]
    # A brand-new user with only unknown items: a record, no recommendation.
    new_user, new_records = apply(sm, {}, stream([("c", "new-q")], start=10))
    assert new_user.recommendations == [] and new_records["c"].window == ("new-q",)


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
    assert stored["a"].window == ("i1", "i4", "i1", "i5")
    _, records = apply(sm, stored, stream([("a", x) for x in history[5:]], start=5), window=4)
    assert records["a"].window == ("i1", "i5", "i9", "i2") and records["a"].events == 7
    assert_state(sm, records["a"], history)


def test_seen_items_are_the_window_and_are_never_recommended(sm: ServingModel):
    history = ["i1", "i2", "i3", "i2", "i4", "new-x", "i5"]
    result, _ = apply(sm, {}, stream([("a", x) for x in history]), window=4, top_k=NUM_ITEMS)
    (rec,) = result.recommendations
    seen = {"i2", "i4", "i5"}  # the window: i2, i4, new-x, i5
    assert not set(rec.items) & seen
    # Every other item is ranked, i1 and i3 too: they have left the window.
    assert sorted(rec.items) == sorted(set(item_vocab(NUM_ITEMS)[1:]) - seen) and {"i1", "i3"} <= set(rec.items)
    assert rec.scores == sorted(rec.scores, reverse=True)
    top5, _ = apply(sm, {}, stream([("a", x) for x in history]), window=4, top_k=5)
    assert top5.recommendations[0].items == rec.items[:5]

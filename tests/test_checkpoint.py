"""The commit protocol (consumers/checkpoint.py) on a real rocksdict store with in-memory fakes of
the Kafka side: what is sent, staged, stored and published, in which order, at which interval,
and what is not committed when a step fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from consumers.batch import BatchResult
from consumers.checkpoint import Checkpoint, CheckpointPolicy
from linrec_stream.contracts.events import Recommendation, Rejected, Source
from state.changelog import ChangelogError
from state.record import UserRecord
from state.store import StateStore
from tests.helpers import FakeChangelog, FakeProducer


class FakeGroup:
    def __init__(self, calls: list, fail: bool = False) -> None:
        self.calls, self.fail = calls, fail

    def commit(self, next_offsets) -> None:
        if self.fail:
            raise RuntimeError("CommitFailedError: the group is rebalancing")
        self.calls.append(("group", dict(next_offsets)))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def record(user: str, offset: int, partition: int = 0) -> UserRecord:
    return UserRecord(user, b"state-%d" % offset, "v1", (1,), offset + 1, partition, offset, f"e{offset}", 1e9, 2, 0)


def batch(users_offsets=(("a", 3), ("b", 4))) -> tuple[BatchResult, list[Rejected]]:
    src = Source("in", 0, 4, 1_700_000_000_000)
    recs = [Recommendation("b", ["i2"], [0.5], "v1", src, "e4", 1e9, 2e9)]
    rejected = [Rejected("invalid_json", "not JSON", b"c", b"{", Source("in", 1, 7, 1_700_000_000_000))]
    return BatchResult([record(u, o) for u, o in users_offsets], recs, applied=2), rejected


@pytest.fixture()
def store(tmp_path: Path):
    with StateStore(tmp_path / "state", sync=False) as s:
        yield s


def make(store: StateStore, calls: list, fail: str = "", policy=CheckpointPolicy(1000, 10_000), clock=None):
    producer = FakeProducer(calls, fail=fail == "flush")
    changelog = FakeChangelog(calls, fail=fail == "changelog")
    cp = Checkpoint(producer, changelog, store, FakeGroup(calls, fail=fail == "group"), recommendations_topic="recs",
                    dead_letter_topic="dlq", policy=policy, clock=clock or Clock())
    return cp, producer, changelog


def test_add_sends_at_once_and_stages_the_records(store: StateStore):
    calls: list = []
    cp, producer, _ = make(store, calls)
    result, rejected = batch()
    cp.add(result, rejected, {0: 5, 1: 8})
    assert calls == [("send", "dlq"), ("send", "recs")]  # nothing flushed, stored or published yet
    assert store.get("a") is None and cp.read(["a", "b", "zz"]) == {"a": result.records[0], "b": result.records[1]}
    (_, key, value, headers), (_, rec_key, rec_value, _) = producer.sent
    dead = Rejected.from_message(key, value, headers)
    assert (dead.reason, dead.source.partition, dead.source.offset, dead.value) == ("invalid_json", 1, 7, b"{")
    assert rec_key == b"b" and Recommendation.from_bytes(rec_value).items == ["i2"]


def test_store_commit_flushes_first_then_stores_states_offsets_and_dirty_marks(store: StateStore):
    calls: list = []
    cp, _, _ = make(store, calls)
    result, rejected = batch()
    cp.add(result, rejected, {0: 5, 1: 8})
    cp.commit_store()
    assert calls[-1] == ("flush",)  # flushed; the store commit is the rocksdict write itself
    assert store.get("a") == result.records[0] and store.partitions() == {0: 5, 1: 8}
    assert sorted(store.dirty_users()) == ["a", "b"]
    assert not [c for c in calls if c[0] in ("changelog", "group")]
    assert cp.read(["a"]) == {"a": result.records[0]} and cp.staged == 0


def test_changelog_commit_publishes_each_dirty_user_once_then_commits_the_group(store: StateStore):
    calls: list = []
    cp, _, changelog = make(store, calls)
    first, _ = batch()
    cp.add(first, (), {0: 5})
    cp.commit_store()
    second, _ = batch((("a", 6),))  # "a" again, newer
    cp.add(second, (), {0: 7})
    cp.commit_store()
    cp.commit_changelog(assigned={0})
    assert calls[-2:] == [("changelog", ["a", "b"]), ("group", {0: 7})]
    assert {r.user: r.offset for r in changelog.published} == {"a": 6, "b": 4}  # the newest, once each
    assert store.dirty_users() == []
    assert cp.counts["records_stored"] == 3 and cp.counts["records_published"] == 2


def test_group_offsets_of_partitions_no_longer_held_are_not_committed(store: StateStore):
    calls: list = []
    cp, _, _ = make(store, calls)
    result, _ = batch()
    cp.commit(assigned={1}, result=result, next_offsets={0: 5, 1: 8})
    assert calls[-1] == ("group", {1: 8})


@pytest.mark.parametrize("fail, raises", [("changelog", ChangelogError), ("flush", TimeoutError)])
def test_a_failed_step_commits_nothing_after_it(store: StateStore, fail: str, raises: type):
    calls: list = []
    cp, _, _ = make(store, calls, fail)
    result, rejected = batch()
    with pytest.raises(raises):
        cp.commit({0, 1}, result, rejected, {0: 5, 1: 8})
    assert "group" not in [c[0] for c in calls]
    if fail == "flush":  # recommendations not acknowledged: the states are not stored either
        assert store.get("a") is None and store.partitions() == {}
    else:  # stored, but still marked for the changelog: the next commit publishes them
        assert sorted(store.dirty_users()) == ["a", "b"]


def test_dirty_marks_survive_a_crash_between_the_two_commits(tmp_path: Path):
    calls: list = []
    with StateStore(tmp_path / "s", sync=False) as store:
        cp, _, _ = make(store, calls)
        result, _ = batch()
        cp.add(result, (), {0: 5})
        cp.commit_store()
        # the process dies here: no changelog commit
    with StateStore(tmp_path / "s", sync=False) as store:
        cp, _, changelog = make(store, calls)
        cp.commit_changelog(assigned={0})
        assert sorted(r.user for r in changelog.published) == ["a", "b"]


def test_a_failed_group_commit_is_logged_not_raised(store: StateStore, caplog: pytest.LogCaptureFixture):
    calls: list = []
    cp, _, _ = make(store, calls, "group")
    result, rejected = batch()
    with caplog.at_level(logging.WARNING, logger="linrec.worker"):
        cp.commit({0}, result, rejected, {0: 5})
    assert calls[-1] == ("changelog", ["a", "b"]) and store.dirty_users() == []
    assert "group offset commit failed" in caplog.text and "rebalancing" in caplog.text


def test_commits_run_at_their_intervals_and_all_at_once_when_idle(store: StateStore):
    calls: list = []
    clock = Clock()
    cp, _, _ = make(store, calls, policy=CheckpointPolicy(store_ms=1000, changelog_ms=5000), clock=clock)
    result, _ = batch()
    cp.add(result, (), {0: 5})
    assert cp.maybe_commit({0}) == {} and store.get("a") is None  # nothing due yet
    clock.t = 1.5
    assert set(cp.maybe_commit({0})) == {"state_write"} and store.get("a") is not None
    assert "group" not in [c[0] for c in calls]
    clock.t = 5.5
    assert "changelog" in cp.maybe_commit({0}) and calls[-1] == ("group", {0: 5})
    cp.add(batch((("c", 9),))[0], (), {0: 10})
    clock.t = 5.6
    assert set(cp.maybe_commit({0}, idle=True)) == {"state_write", "changelog"} and calls[-1] == ("group", {0: 10})
    assert cp.maybe_commit({0}, idle=True) == {}  # nothing new: nothing to do


def test_policy_is_checked():
    with pytest.raises(ValueError):
        CheckpointPolicy(store_ms=2000, changelog_ms=1000)


def test_dirty_users_of_partitions_not_held_keep_their_marks_unpublished(store: StateStore):
    calls: list = []
    cp, _, changelog = make(store, calls)
    result = BatchResult([record("a", 3, partition=0), record("b", 9, partition=1)], [])
    cp.add(result, (), {0: 4, 1: 10})
    cp.commit_store()
    cp.commit_changelog(assigned={0})  # partition 1 moved to another worker meanwhile
    assert [r.user for r in changelog.published] == ["a"] and calls[-1] == ("group", {0: 4})
    assert store.dirty_users() == ["b"]  # published once partition 1 is held again
    cp.commit_changelog(assigned={0, 1})
    assert [r.user for r in changelog.published] == ["a", "b"] and store.dirty_users() == []

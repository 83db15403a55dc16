"""The commit protocol (consumers/checkpoint.py) with in-memory fakes: what is published,
flushed and committed, in which order, and what is not committed when a step fails."""

from __future__ import annotations

import logging

import pytest

from consumers.batch import BatchResult
from consumers.checkpoint import Checkpoint
from linrec_stream.contracts.events import Recommendation, Rejected, Source
from state.changelog import ChangelogError
from state.record import UserRecord
from tests.helpers import FakeChangelog, FakeProducer


class FakeStore:
    def __init__(self, calls: list, fail: bool = False) -> None:
        self.calls, self.fail = calls, fail

    def commit(self, records, next_offsets) -> None:
        if self.fail:
            raise OSError("disk full")
        self.calls.append(("store", [r.user for r in records], dict(next_offsets)))


class FakeGroup:
    def __init__(self, calls: list, fail: bool = False) -> None:
        self.calls, self.fail = calls, fail

    def commit(self, next_offsets) -> None:
        if self.fail:
            raise RuntimeError("CommitFailedError: the group is rebalancing")
        self.calls.append(("group", dict(next_offsets)))


def batch() -> tuple[BatchResult, list[Rejected]]:
    src = Source("in", 0, 4, 1_700_000_000_000)
    records = [UserRecord(u, b"state", "v1", ("i1",), 1, 0, off, f"e{off}", 1e9) for u, off in (("a", 3), ("b", 4))]
    recs = [Recommendation("b", ["i2"], [0.5], "v1", src, "e4", 1e9, 2e9)]
    rejected = [Rejected("invalid_json", "not JSON", b"c", b"{", Source("in", 1, 7, 1_700_000_000_000))]
    return BatchResult(records, recs, applied=2), rejected


def checkpoint(calls: list, fail: str = "") -> tuple[Checkpoint, FakeProducer]:
    producer = FakeProducer(calls, fail=fail == "flush")
    cp = Checkpoint(producer, FakeChangelog(calls, fail=fail == "changelog"), FakeStore(calls, fail=fail == "store"),
                    FakeGroup(calls, fail=fail == "group"), recommendations_topic="recs", dead_letter_topic="dlq")
    return cp, producer


def test_publishes_and_flushes_then_commits_the_store_then_the_group_offsets():
    calls: list = []
    cp, producer = checkpoint(calls)
    result, rejected = batch()
    timings = cp.commit(result, rejected, {0: 5, 1: 8})
    assert calls == [("send", "dlq"), ("send", "recs"), ("changelog", ["a", "b"]), ("flush",),
                     ("store", ["a", "b"], {0: 5, 1: 8}), ("group", {0: 5, 1: 8})]
    assert set(timings) == {"produce", "state_write"} and all(t >= 0 for t in timings.values())
    # What was sent is what a client reads back.
    (dlq_topic, key, value, headers), (rec_topic, rec_key, rec_value, _) = producer.sent
    dead = Rejected.from_message(key, value, headers)
    assert (dead.reason, dead.source.partition, dead.source.offset, dead.value) == ("invalid_json", 1, 7, b"{")
    assert rec_key == b"b" and Recommendation.from_bytes(rec_value).items == ["i2"]


@pytest.mark.parametrize("fail, raises", [("changelog", ChangelogError), ("flush", TimeoutError),
                                          ("store", OSError)])
def test_a_failed_step_commits_nothing_after_it(fail: str, raises: type):
    calls: list = []
    cp, _ = checkpoint(calls, fail)
    result, rejected = batch()
    with pytest.raises(raises):
        cp.commit(result, rejected, {0: 5, 1: 8})
    done = [c[0] for c in calls]
    assert "group" not in done
    if fail != "store":
        assert "store" not in done  # the store never holds what the changelog may lack
    if fail == "changelog":
        assert "flush" not in done


def test_a_failed_group_commit_is_logged_not_raised(caplog: pytest.LogCaptureFixture):
    calls: list = []
    cp, _ = checkpoint(calls, "group")
    result, rejected = batch()
    with caplog.at_level(logging.WARNING, logger="linrec.worker"):
        cp.commit(result, rejected, {0: 5})
    assert calls[-1] == ("store", ["a", "b"], {0: 5})
    assert "group offset commit failed" in caplog.text and "rebalancing" in caplog.text


def test_a_sweep_step_commits_states_without_offsets():
    calls: list = []
    cp, _ = checkpoint(calls)
    result, _ = batch()
    cp.commit(result)
    assert calls == [("send", "recs"), ("changelog", ["a", "b"]), ("flush",), ("store", ["a", "b"], {})]

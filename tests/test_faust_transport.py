"""The faust engine's hand-off between its agent and the worker (consumers/faust_transport.py),
without a broker: what the worker's loop may rely on (records of a partition only once it is
positioned, in offset order, none it would not get again). The engine end to end, on the real
broker, is in tests/test_worker.py and tests/test_swap.py (the crash tests on both engines)."""

from __future__ import annotations

import threading
import time

from consumers.faust_transport import FaustRecord, HandOff


def recs(partition: int, *offsets: int) -> list[FaustRecord]:
    return [FaustRecord("in", partition, o, 1000 * o, b"k", b"v") for o in offsets]


def offsets(records: list[FaustRecord]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


def test_records_wait_until_their_partition_is_positioned():
    h = HandOff(capacity=100)
    h.assigned({0, 1})
    h.put(recs(0, 5, 6) + recs(1, 9))
    assert h.take(0, 10) == []  # nothing positioned yet: held back, not dropped
    assert h.take_pending() == {0, 1} and h.take_pending() == set()
    h.position(0, 6)
    assert offsets(h.take(0, 10)) == [(0, 6)]  # offset 5 is below the position: in the store already
    h.position(1, 0)
    assert offsets(h.take(0, 10)) == [(1, 9)]


def test_a_partition_that_starts_over_is_delivered_again_in_order():
    h = HandOff(capacity=100)
    h.assigned({0})
    h.position(0, 0)
    h.put(recs(0, 10, 11, 12))
    assert offsets(h.take(0, 1)) == [(0, 10)]
    # A rebalance: faust seeks back to the committed offset (10) and fetches again.
    h.assigned({0})
    h.put(recs(0, 10, 11, 12, 13))
    h.position(0, 11)  # the worker resumes at its store's offset
    assert offsets(h.take(0, 10)) == [(0, 11), (0, 12), (0, 13)]  # each once, in order


def test_revoked_partitions_are_dropped_and_the_rest_repositioned():
    h = HandOff(capacity=100)
    h.assigned({0, 1})
    h.position(0, 0)
    h.position(1, 0)
    h.put(recs(0, 1, 2) + recs(1, 3))
    h.assigned({1})  # partition 0 went to another member
    assert h.take(0, 10) == []  # 1 must be positioned again first
    h.position(1, 0)
    assert offsets(h.take(0, 10)) == [(1, 3)]
    assert h.room()


def test_capacity_and_wakeup():
    h = HandOff(capacity=3)
    h.assigned({0})
    h.position(0, 0)
    h.put(recs(0, 1, 2, 3))
    assert not h.room()
    assert offsets(h.take(0, 2)) == [(0, 1), (0, 2)] and h.room()
    assert offsets(h.take(0, 5)) == [(0, 3)]
    # A waiting take wakes when records arrive, well before its timeout.
    threading.Timer(0.05, h.put, args=(recs(0, 4),)).start()
    t0 = time.monotonic()
    assert offsets(h.take(5.0, 5)) == [(0, 4)]
    assert time.monotonic() - t0 < 2.0

"""state/: UserRecord bytes, the rocksdict StateStore (atomic, durable commits, checked with
SIGKILLed child processes) and the Kafka changelog (against the real local broker)."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from crc32c import crc32c
import torch
from hypothesis import given, settings as hsettings, strategies as st

from linrec_stream.settings import Settings
from state import Changelog, ChangelogError, RecordError, StateStore, StateStoreError, UserRecord
from state.record import FORMAT_VERSION, MAGIC, event_id_hash, vocab_crc

REPO = Path(__file__).resolve().parents[1]


def rec(user: str = "u1", offset: int = 10, partition: int = 0, state: bytes = b"S" * 32, **kw) -> UserRecord:
    fields = dict(model_version="ab" * 8, window=(1, 2), events=offset + 1, event_id=None, last_ts=1.7e9, vocab_size=3,
                  vocab_crc=0x1234)
    fields.update(kw)
    return UserRecord(user=user, state=state, partition=partition, offset=offset, **fields)


# --- UserRecord --------------------------------------------------------------------------------
def test_supersedes_is_offset_order_on_a_partition_and_event_time_across():
    assert rec(offset=11).supersedes(rec(offset=10)) and not rec(offset=10).supersedes(rec(offset=11))
    assert not rec(offset=10).supersedes(rec(offset=10))
    # A user whose events landed on two partitions (another partitioner): the later event wins,
    # whatever the partition numbers or offsets.
    early_high = rec(offset=900, partition=3, last_ts=1.7e9)
    late_low = rec(offset=5, partition=0, last_ts=1.7e9 + 60)
    assert late_low.supersedes(early_high) and not early_high.supersedes(late_low)
    # Same event time: more events, then the higher partition, so that reading order never decides.
    a, b = rec(partition=0, events=4), rec(partition=1, events=3)
    assert a.supersedes(b) and not b.supersedes(a)
    c, d = rec(partition=0, events=3), rec(partition=1, events=3)
    assert d.supersedes(c) and not c.supersedes(d)



@st.composite
def tagged_windows(draw) -> tuple[int, int, tuple[int, ...]]:
    """(vocab_size, vocab_crc, window): ids of a vocabulary of vocab_size entries (0 is padding)."""
    size = draw(st.integers(2, 2**32 - 1) | st.integers(2, 300))
    window = draw(st.lists(st.integers(1, size - 1), max_size=60).map(tuple))
    return size, draw(st.integers(0, 2**32 - 1)), window


def _record(user, state, model_version, tagged, events, partition, offset, event_id, last_ts,
            recent_ids=()) -> UserRecord:
    size, crc, window = tagged
    return UserRecord(user, state, model_version, window, events, partition, offset, event_id, last_ts, size, crc,
                      recent_ids=recent_ids)


records = st.builds(
    _record,
    user=st.text(min_size=1, max_size=40),
    state=st.binary(max_size=3000),
    model_version=st.text(max_size=40),
    tagged=tagged_windows() | st.just((0, 0, ())),
    events=st.integers(0, 2**63 - 1),
    partition=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**63 - 1),
    event_id=st.none() | st.text(max_size=60),
    last_ts=st.floats(allow_nan=False, allow_infinity=False),
    recent_ids=st.lists(st.integers(0, 2**64 - 1), max_size=40).map(tuple) | st.just(()),
)


def v1_bytes(r: UserRecord, window: tuple[str, ...]) -> bytes:
    """``r`` in format 1 (38-byte header, no vocabulary tag, the window as UTF-8 external ids),
    as the code before format 2 wrote it; the decoder must still read such records."""
    def string(x: str) -> bytes:
        raw = x.encode("utf-8")
        return struct.pack("<H", len(raw)) + raw

    raws = [x.encode("utf-8") for x in window]
    body = b"".join([
        struct.pack("<4sBBIqqdHH", MAGIC, 1, 1 if r.event_id is not None else 0, r.partition, r.offset, r.events,
                    float(r.last_ts), len(window), 0),
        string(r.user), string(r.model_version), string(r.event_id) if r.event_id is not None else b"",
        struct.pack(f"<{len(raws)}H", *map(len, raws)), b"".join(raws),
        struct.pack("<I", len(r.state)), r.state,
    ])
    return body + struct.pack("<I", crc32c(body))


def v2_bytes(r: UserRecord) -> bytes:
    """``r`` in format 2 (format 3 without the recent set: the header's n_recent was a reserved
    0), as the code before format 3 wrote it; the decoder must still read such records."""
    def string(x: str) -> bytes:
        raw = x.encode("utf-8")
        return struct.pack("<H", len(raw)) + raw

    body = b"".join([
        struct.pack("<4sBBIqqdHHII", MAGIC, 2, 1 if r.event_id is not None else 0, r.partition, r.offset, r.events,
                    float(r.last_ts), len(r.window), 0, r.vocab_size, r.vocab_crc),
        string(r.user), string(r.model_version), string(r.event_id) if r.event_id is not None else b"",
        struct.pack(f"<{len(r.window)}I", *r.window),
        struct.pack("<I", len(r.state)), r.state,
    ])
    return body + struct.pack("<I", crc32c(body))


v1_records = st.tuples(records, st.lists(st.text(max_size=30), max_size=30).map(tuple)
                       | st.lists(st.text("abc019-_:", max_size=12), max_size=60).map(tuple))


@given(records)
@hsettings(max_examples=300, deadline=None)
def test_record_round_trip(r: UserRecord):
    blob = r.to_bytes()
    back = UserRecord.from_bytes(blob)
    assert back == r
    assert back.to_bytes() == blob
    assert blob[:4] == MAGIC and blob[4] == FORMAT_VERSION


def test_record_is_compact_and_normalises_its_fields():
    r = UserRecord("u", bytearray(b"x" * 17_000), "ab" * 8, [1, 2], 2, 1, 5, "e-1", 1.0, 3, 9)
    assert isinstance(r.window, tuple) and isinstance(r.state, bytes)
    # A numpy window becomes a tuple of Python ints (hashable, equal to the decoded one).
    a = UserRecord("u", b"x", "v", np.array([4, 2], dtype=np.int64), 2, 1, 5, None, 1.0, 5, 0)
    assert a.window == (4, 2) and type(a.window[0]) is int and UserRecord.from_bytes(a.to_bytes()) == a
    # fixed overhead is small next to a 17 KB state
    assert len(r.to_bytes()) - 17_000 < 100
    # the recent set costs 8 bytes an event id: 256 bytes for the default 32
    ids = tuple(event_id_hash(f"ev-{i}") for i in range(32))
    assert len(dataclasses.replace(r, recent_ids=ids).to_bytes()) - len(r.to_bytes()) == 256
    assert dataclasses.replace(r, recent_ids=list(ids)).recent_ids == ids  # any sequence, stored as a tuple


def test_event_id_hash_is_stable_8_byte_blake2b():
    import hashlib

    assert event_id_hash("e1") == int.from_bytes(hashlib.blake2b(b"e1", digest_size=8).digest(), "little")
    assert event_id_hash("e1") == 0x040F4FF5515E5D1B  # pinned: stored in records, never to change
    assert event_id_hash("é") == event_id_hash("\u00e9") != event_id_hash("e")
    assert 0 <= event_id_hash("\ud800") < 2**64  # a lone surrogate (JSON allows it) hashes too


def test_the_recent_set_is_checked():
    with pytest.raises(RecordError, match="recent set of 65536"):
        rec(recent_ids=(1,) * 65536)
    for bad in ((-1,), (2**64,), ("x",)):
        with pytest.raises(RecordError, match="u64"):
            rec(recent_ids=bad).to_bytes()
    # More ids announced than the bytes hold: a truncation, whatever the crc says.
    body = bytearray(rec(recent_ids=(7, 8)).to_bytes()[:-4])
    body[36:38] = struct.pack("<H", 3)
    with pytest.raises(RecordError, match="truncated"):
        UserRecord.from_bytes(bytes(body) + struct.pack("<I", crc32c(bytes(body))))


@given(records, st.data())
@hsettings(max_examples=150, deadline=None)
def test_a_format_2_record_reads_back_with_an_empty_recent_set(r: UserRecord, data):
    blob = v2_bytes(r)
    back = UserRecord.from_bytes(blob)
    assert back == dataclasses.replace(r, recent_ids=()) and back.recent_ids == ()
    assert back.to_bytes() == blob  # passed on as read; a batch rewrites it in format 3
    assert dataclasses.replace(back).to_bytes()[4] == FORMAT_VERSION
    # Format 2's reserved field (format 3's n_recent) must be 0: with a valid crc, still an error.
    body = bytearray(blob[:-4])
    body[36:38] = struct.pack("<H", data.draw(st.integers(1, 0xFFFF)))
    with pytest.raises(RecordError, match="reserved"):
        UserRecord.from_bytes(bytes(body) + struct.pack("<I", crc32c(bytes(body))))
    # Malformed format-2 bytes are record errors too.
    assert_damage_is_a_record_error(blob, data)


def assert_damage_is_a_record_error(blob: bytes, data) -> None:
    """Any truncation and any flipped byte of ``blob`` (drawn from ``data``) is a RecordError."""
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(RecordError):
        UserRecord.from_bytes(blob[:cut])
    flipped = bytearray(blob)
    flipped[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    with pytest.raises(RecordError):
        UserRecord.from_bytes(bytes(flipped))


@given(records, st.data())
@hsettings(max_examples=100, deadline=None)
def test_record_every_truncation_and_any_flipped_byte_is_a_record_error(r: UserRecord, data):
    assert_damage_is_a_record_error(r.to_bytes(), data)


@given(st.binary(max_size=200), st.sampled_from([1, 2, FORMAT_VERSION]))
@hsettings(max_examples=300, deadline=None)
def test_record_garbage_raises_only_record_error(blob: bytes, version: int):
    with pytest.raises(RecordError):
        UserRecord.from_bytes(MAGIC + bytes([version]) + blob)


@given(v1_records, st.data())
@hsettings(max_examples=150, deadline=None)
def test_a_format_1_record_reads_back_with_its_window_of_external_ids(rw, data):
    r, window = rw
    blob = v1_bytes(r, window)
    back = UserRecord.from_bytes(blob)
    assert back.legacy_window == window and back.window == () and (back.vocab_size, back.vocab_crc) == (0, 0)
    assert (back.user, back.state, back.offset, back.events, back.event_id) == (r.user, r.state, r.offset, r.events,
                                                                                r.event_id)
    assert back.to_bytes() == blob  # passed on as read; a batch rewrites it in the newest format
    with pytest.raises(RecordError, match="format-1 window"):
        dataclasses.replace(back)._encode()
    # Malformed format-1 bytes are record errors too.
    assert_damage_is_a_record_error(blob, data)


def test_window_ids_outside_the_records_vocabulary_are_record_errors():
    for window, size in (((0,), 5), ((5,), 5), ((1, 2**31), 100)):
        body = bytearray(rec(window=window, vocab_size=size).to_bytes()[:-4])  # valid crc over bad ids
        blob = bytes(body) + struct.pack("<I", crc32c(bytes(body)))
        with pytest.raises(RecordError, match="out of range"):
            UserRecord.from_bytes(blob)
    with pytest.raises(RecordError, match="u32"):
        rec(window=(-1,)).to_bytes()
    with pytest.raises(RecordError, match="tag out of range"):
        rec(vocab_size=2**32)


def test_the_vocabulary_tag_is_the_crc_of_the_joined_external_ids():
    items = ["<pad>", "i1", "é2"]
    assert vocab_crc(items) == crc32c("<pad>\ni1\né2".encode()) and vocab_crc(items[:2]) != vocab_crc(items)
    assert vocab_crc([]) == 0


def test_record_error_messages():
    blob = rec().to_bytes()
    with pytest.raises(RecordError, match="bad magic"):
        UserRecord.from_bytes(b"XXXX" + blob[4:])
    with pytest.raises(RecordError, match="unknown user-record format version 9"):
        UserRecord.from_bytes(blob[:4] + b"\x09" + blob[5:])
    with pytest.raises(RecordError, match="truncated"):
        UserRecord.from_bytes(blob[:20])
    with pytest.raises(RecordError, match="truncated"):
        UserRecord.from_bytes(blob[:-5])
    with pytest.raises(RecordError, match="trailing"):
        body = blob[:-4] + b"!"
        UserRecord.from_bytes(body + crc32c(body).to_bytes(4, "little"))
    with pytest.raises(RecordError, match="checksum"):
        UserRecord.from_bytes(blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:])
    assert issubclass(RecordError, ValueError)


@pytest.mark.parametrize(
    "bad", [dict(user=""), dict(offset=-1), dict(partition=-1), dict(events=-1), dict(last_ts=float("nan")),
            dict(last_ts=float("inf"))],
)
def test_record_rejects_invalid_fields(bad):
    with pytest.raises(RecordError):
        rec(**bad)


def test_already_applied_is_per_partition_and_inclusive():
    r = rec(offset=100, partition=2)
    assert r.already_applied(2, 99) and r.already_applied(2, 100)
    assert not r.already_applied(2, 101)
    assert not r.already_applied(1, 5)  # another partition: never applied


# --- StateStore --------------------------------------------------------------------------------

def test_store_reads_and_counts(tmp_path: Path):
    with StateStore(tmp_path / "s") as s:
        assert len(s) == 0 and s.partitions() == {} and s.get("u1") is None and s.next_offset(0) is None
        a, b, c = rec("a", 3, 0), rec("b", 7, 1), rec("c", 8, 1, event_id="ev")
        s.commit([a, b, c], {0: 4, 1: 9})
        # a later record of the same user in one batch wins
        s.commit([rec("a", 5, 0), rec("a", 6, 0)], {0: 7})
        assert s.get("a") == rec("a", 6, 0)
        assert s.get_many(["b", "nobody", "c", "b"]) == {"b": b, "c": c}
        assert s.get_many([]) == {}
        assert s.partitions() == {0: 7, 1: 9} and s.next_offset(1) == 9
        assert len(s) == 3
        assert sorted(r.user for r in s.records()) == ["a", "b", "c"]
        s.commit([], {2: 0})  # offsets alone (a batch of dead letters)
        assert s.partitions() == {0: 7, 1: 9, 2: 0}
        with pytest.raises(ValueError):
            s.commit([], {0: -1})
    with StateStore(tmp_path / "s") as s:  # durable across close/reopen
        assert s.get("c") == c and s.partitions() == {0: 7, 1: 9, 2: 0} and len(s) == 3
    with pytest.raises(StateStoreError, match="closed"):
        s.get("a")


def test_store_is_locked_to_one_opener(tmp_path: Path):
    with StateStore(tmp_path / "s"):
        with pytest.raises(StateStoreError, match="in use"):
            StateStore(tmp_path / "s")
    StateStore(tmp_path / "s").close()  # released on close


def test_store_user_keys_do_not_collide_with_other_kinds(tmp_path: Path):
    # user ids that look like the other prefixes' keys stay users
    weird = ["o\x00\x00\x00\x01", "i", "mformat", "\u00e9\U0001f600", "u"]
    with StateStore(tmp_path / "s") as s:
        s.commit([rec(u, 1, 1) for u in weird], {1: 2})
        assert sorted(r.user for r in s.records()) == sorted(weird)
        assert s.partitions() == {1: 2} and len(s) == len(weird)


def test_drop_partitions(tmp_path: Path):
    with StateStore(tmp_path / "s") as s:
        s.commit([rec(f"u{i}", 10 + i, i % 3) for i in range(30)], {0: 100, 1: 100, 2: 100})
        # u3 moves to partition 1 (partition count changed): it is no longer partition 0's
        s.commit([rec("u3", 50, 1)], {1: 101})
        assert s.drop_partitions([0, 2]) == {0: 9, 2: 10}
        assert s.partitions() == {1: 101}
        assert sorted(r.user for r in s.records()) == sorted([f"u{i}" for i in range(1, 30, 3)] + ["u3"])
        assert s.drop_partitions([0]) == {0: 0}


def _child(script: str, store: Path) -> subprocess.Popen:
    """A Python child that imports state/ from this checkout and talks over stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(store)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_commit_survives_sigkill_right_after_it_returns(tmp_path: Path):
    child = _child("""
        import os, signal, sys
        from pathlib import Path
        from state import StateStore, UserRecord
        s = StateStore(Path(sys.argv[1]))
        recs = [UserRecord(f"u{i}", bytes([i % 256]) * 4096, "v", (i + 1,), i, i % 3, 1000 + i, None, 1.0, 301, 7)
                for i in range(300)]
        s.commit(recs, {0: 1298, 1: 1299, 2: 1300})
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush: only the synced WAL survives
    """, tmp_path / "s")
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL and out == "committed\n", err
    with StateStore(tmp_path / "s") as s:
        assert len(s) == 300 and s.partitions() == {0: 1298, 1: 1299, 2: 1300}
        got = s.get_many(f"u{i}" for i in range(300))
        for i in range(300):
            r = got[f"u{i}"]
            assert (r.offset, r.partition, r.state, r.window) == (1000 + i, i % 3, bytes([i % 256]) * 4096, (i + 1,))


LOOP_CHILD = """
    import sys
    from pathlib import Path
    from state import StateStore, UserRecord
    s = StateStore(Path(sys.argv[1]))
    USERS = 64
    i = max(s.partitions().values(), default=0)  # resume after the last stored batch, as a worker does
    while True:
        p = i % 3  # batch i rewrites every user of partition p with offset i
        recs = [UserRecord(f"p{p}-u{u}", (f"{u}:{i}:".encode() * 600)[:4096], "v", (i % 1000 + 1,), i // 3 + 1, p, i, None, float(i),
                          1001, 7)
                for u in range(USERS)]
        s.commit(recs, {p: i + 1})
        print(i, flush=True)
        i += 1
"""


def test_sigkill_in_a_loop_of_commits_leaves_whole_batches(tmp_path: Path):
    """Kill a committing child at random moments, 8 times over one store: after each kill every
    partition holds whole batches only, and every batch the child saw committed is there."""
    rng = random.Random(1234)
    for _ in range(8):
        child = _child(LOOP_CHILD, tmp_path / "s")
        acked, seen = -1, 0
        try:
            target = rng.randint(2, 8)
            while seen < target:  # let it commit a few batches, then kill at a random moment
                line = child.stdout.readline()
                assert line, child.stderr.read()
                acked, seen = int(line), seen + 1
            time.sleep(rng.uniform(0, 0.015))
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
        with StateStore(tmp_path / "s") as s:
            parts = s.partitions()
            # durability: the last batch the child reported as committed is there
            assert parts[acked % 3] - 1 >= acked
            for p, nxt in parts.items():
                users = s.get_many(f"p{p}-u{u}" for u in range(64))
                assert len(users) == 64
                offsets = {r.offset for r in users.values()}
                # all-or-nothing: every user of the partition carries the batch of the stored offset
                assert offsets == {nxt - 1}, (p, nxt, sorted(offsets))
                i = nxt - 1
                for u, r in users.items():
                    assert r.state == (f"{u.split('-u')[1]}:{i}:".encode() * 600)[:4096]
                    assert (r.events, r.window, r.last_ts) == (i // 3 + 1, (i % 1000 + 1,), float(i))
            assert len(s) == 3 * 64 and set(parts) == {0, 1, 2}


def _wal_counts(s: StateStore) -> tuple[int, int]:
    """(WAL writes, WAL syncs) so far, from RocksDB's own statistics."""
    line = next(l for l in s.db.property_value("rocksdb.stats").splitlines() if l.startswith("Cumulative WAL:"))
    m = re.match(r"Cumulative WAL: (\d+) writes, (\d+) syncs", line)
    return int(m[1]), int(m[2])


def test_commit_is_one_synced_wal_write(tmp_path: Path):
    # A process kill cannot tell a synced WAL from an unsynced one (the OS keeps the data);
    # power loss can. So check what RocksDB did: one WAL write per commit, and an fsync.
    with StateStore(tmp_path / "s") as s:
        w0, s0 = _wal_counts(s)
        s.commit([rec(f"u{i}", i, i % 4) for i in range(200)], {0: 200, 1: 200, 2: 200, 3: 200})
        assert _wal_counts(s) == (w0 + 1, s0 + 1)
        s.commit([rec("x", 1, 0)], {0: 2}, sync=False)
        assert _wal_counts(s) == (w0 + 2, s0 + 1)


# --- Changelog (real broker) -------------------------------------------------------------------

@pytest.fixture
def changelog(broker: Settings):
    from linrec_stream.clients.connection import KafkaConnection

    cl = Changelog(KafkaConnection.from_settings(broker), f"test-state-changelog-{uuid.uuid4().hex[:8]}")
    yield cl
    cl.close()
    admin = KafkaConnection.from_settings(broker).admin()
    try:  # leave the shared broker as we found it
        mine = [t for t in admin.list_topics() if t.startswith(cl.topic)]
        if mine:
            admin.delete_topics(mine)
    finally:
        admin.close()


@pytest.mark.kafka
def test_ensure_topic_is_idempotent_compacted_and_grows(changelog: Changelog):
    from kafka.admin import ConfigResource, ConfigResourceType

    changelog.ensure_topic(2)
    changelog.ensure_topic(2)
    changelog.ensure_topic(3)  # the interactions topic grew
    changelog.ensure_topic(1)  # never shrinks
    admin = changelog.connection.admin()
    try:
        assert len(admin.describe_topics([changelog.topic])[0]["partitions"]) == 3
        cfg = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, changelog.topic, {"cleanup.policy": None})])
        assert cfg["topic"][changelog.topic]["cleanup.policy"]["value"] == "compact"
        # an existing topic that is not compacted is refused
        plain = f"{changelog.topic}-plain"
        admin.create_topics({plain: {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True)
    finally:
        admin.close()
    with pytest.raises(ChangelogError, match="compact"):
        Changelog(changelog.connection, plain).ensure_topic(1)


@pytest.mark.kafka
def test_restore_keeps_each_users_newest_record(changelog: Changelog, tmp_path: Path):
    changelog.ensure_topic(3)
    users = [f"user-{i}" for i in range(30)]
    part = {u: i % 3 for i, u in enumerate(users)}
    newest = {}
    for version in range(3):  # three versions per user, offsets increasing
        batch = [rec(u, 100 * version + i, part[u], state=f"{u}@{version}".encode() * 50, events=version + 1)
                 for i, u in enumerate(users)]
        assert changelog.publish(batch) == 30
        newest.update({r.user: r for r in batch})
    # a stale record published late (e.g. a zombie worker) must not win over a newer offset
    changelog.publish([rec("user-4", 3, part["user-4"], state=b"stale")])
    # user-5's events also went to another partition (another producer's partitioner): the
    # record of its later event wins, on a lower partition and offset, read first or last.
    moved = rec("user-5", 1, 0, state=b"on partition 0, later", last_ts=1.8e9, events=9)
    changelog.publish([moved])
    newest["user-5"] = moved

    with StateStore(tmp_path / "all") as s:
        counts = changelog.restore(s, [0, 1, 2], timeout_s=30)
        assert counts == {0: 11, 1: 10, 2: 9}  # user-5 counted once, under the partition that won
        assert {r.user: r for r in s.records()} == newest
        assert s.partitions() == {}  # next offsets are the worker's decision

    with StateStore(tmp_path / "some") as s:
        assert changelog.restore(s, [0, 2], timeout_s=30) == {0: 11, 2: 9}
        assert {r.user for r in s.records()} == {u for u in users if part[u] in (0, 2)}
        assert all(s.get(u) == newest[u] for u in users if part[u] in (0, 2))

    with StateStore(tmp_path / "merge") as s:
        ahead = rec("user-0", 10_000, 0, state=b"local and newer")
        behind = rec("user-3", 1, 0, state=b"local and older")
        s.commit([ahead, behind], {0: 10_001})
        counts = changelog.restore(s, [0], timeout_s=30)
        assert counts == {0: 10}  # user-0's local record is newer than anything published
        assert s.get("user-0") == ahead and s.get("user-3") == newest["user-3"]
        assert s.partitions() == {0: 10_001}


@pytest.mark.kafka
def test_restore_edge_cases(changelog: Changelog, tmp_path: Path):
    changelog.ensure_topic(2)
    with StateStore(tmp_path / "s") as s:
        assert changelog.restore(s, [0, 1], timeout_s=30) == {0: 0, 1: 0}  # empty partitions
        assert changelog.restore(s, [], timeout_s=30) == {}
        with pytest.raises(ChangelogError, match=r"asked to restore \[5\]"):
            changelog.restore(s, [1, 5], timeout_s=10)
        assert len(s) == 0
    with pytest.raises(RecordError):  # a record that cannot be encoded never reaches Kafka
        changelog.publish([rec("x" * 70_000)])


@pytest.mark.kafka
def test_restored_model_state_continues_exactly_like_the_original(changelog: Changelog, tmp_path: Path):
    from linrec_stream.model import LinRecModel, ModelConfig

    torch.manual_seed(0)
    model = LinRecModel(ModelConfig(num_items=50, hidden_size=16, num_layers=1, num_heads=2, max_len=8)).eval()
    changelog.ensure_topic(2)
    seq = [3, 7, 9, 41, 2]
    states = {}
    for user, items in (("alice", seq), ("bob", seq[::-1])):
        st = model.init_state(1)
        for it in items:
            _, st = model.step(st, torch.tensor([it]))
        states[user] = st
    recs = [rec(u, 10 + j, j, state=states[u].to_bytes(), model_version=states[u].model_version,
                window=tuple(items), vocab_size=51, events=len(items))
            for j, (u, items) in enumerate((("alice", seq), ("bob", seq[::-1])))]
    with StateStore(tmp_path / "local") as s:
        s.commit(recs, {0: 11, 1: 12})
    changelog.publish(recs)

    with StateStore(tmp_path / "elsewhere") as s:  # an empty state dir on another machine
        assert changelog.restore(s, [0, 1], timeout_s=30) == {0: 1, 1: 1}
        restored = {u: model.load_state_bytes(s.get(u).state) for u in ("alice", "bob")}
    more = [11, 4, 20, 50, 1]
    for user in ("alice", "bob"):
        a, b = states[user], restored[user]
        assert torch.equal(a.S, b.S) and int(b.num_events) == len(seq)
        for it in more:
            ha, a = model.step(a, torch.tensor([it]))
            hb, b = model.step(b, torch.tensor([it]))
            assert torch.equal(ha, hb)
        full = seq if user == "alice" else seq[::-1]
        # and both still equal the parallel form over the whole sequence
        h_full = model(torch.tensor([full + more]))[0, -1]
        torch.testing.assert_close(hb[0], h_full, rtol=1e-4, atol=1e-5)


def test_dirty_marks_are_written_with_the_records_and_cleared_on_request(tmp_path: Path):
    rec = UserRecord("ü", b"s", "v", (1,), 1, 0, 5, None, 1e9, 2, 0)
    with StateStore(tmp_path / "s") as store:
        store.commit([rec], {0: 6})
        assert store.dirty_users() == []  # not asked for: a restore writes no marks
        store.commit([rec, UserRecord("b", b"s", "v", (), 1, 1, 2, None, 1e9)], {0: 6}, mark_dirty=True)
        assert sorted(store.dirty_users()) == ["b", "ü"] and len(store) == 2  # marks are not users
        store.clear_dirty(["ü"])
        assert store.dirty_users() == ["b"]
    with StateStore(tmp_path / "s") as store:  # durable across a reopen
        assert store.dirty_users() == ["b"]


def test_a_record_read_back_gives_the_same_bytes_as_encoding_it_again():
    rec = UserRecord("ü-user", b"\x00state", "v1", (1, 2, 3), 3, 2, 41, "evt", 1e9, 4, 0xDEADBEEF)
    back = UserRecord.from_bytes(rec.to_bytes())
    assert back.to_bytes() == rec.to_bytes() == back._encode()

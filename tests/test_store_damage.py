"""state/store.py against a damaged store (issue #19): every case is first shown to break a plain
``StateStore(path)`` open + read (so the test is not passing on undetected damage), then
``open_or_recover`` must say so in one line and move the directory aside (default) or refuse."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable

import pytest
from rocksdict import Options, Rdict

from state import Opened, StateStore, StateStoreDamaged, StateStoreError, UserRecord

N = 300


def rec(user: str, offset: int, partition: int = 0, state_bytes: int = 2000) -> UserRecord:
    state = (user.encode() * (state_bytes // len(user) + 1))[:state_bytes]
    return UserRecord(user=user, state=state, model_version="ab" * 8, window=(1, 2), events=offset + 1,
                      partition=partition, offset=offset, event_id=None, last_ts=1.7e9, vocab_size=3, vocab_crc=0x1234)


def users() -> list[str]:
    return [f"user{i:04d}" for i in range(N)]


def make_store(path: Path) -> Path:
    """A store of N records written by commit, flushed so everything is in .sst files (a closed
    store otherwise keeps its last writes in the WAL, where .sst damage would not touch them)."""
    s = StateStore(path, sync=False)
    for i in range(0, N, 100):
        s.commit([rec(u, j, partition=j % 2) for j, u in enumerate(users()[i:i + 100], start=i)],
                 {0: i + 100, 1: i + 100})
    s.db.flush()
    s.close()
    assert glob.glob(f"{path}/*.sst")
    return path


def read_everything(path: Path) -> tuple[dict[int, int], int, int]:
    """What a worker does with a store: open, offsets, records (raises on detected damage)."""
    with StateStore(path) as s:
        return s.partitions(), len(s.get_many(users())), sum(1 for _ in s.records())


# --- damage ------------------------------------------------------------------------------------
def _one_sst(path: Path) -> str:
    files = sorted(glob.glob(f"{path}/*.sst"), key=os.path.getsize)
    return files[-1]


def truncate_sst(path: Path) -> None:
    f = _one_sst(path)
    os.truncate(f, os.path.getsize(f) // 2)


def _flip(f: str, at: int) -> None:
    with open(f, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0xFF]))


def flip_sst_data(path: Path) -> None:
    """Bytes in the middle of the file: a data block, read only when iterated (not at open)."""
    f = _one_sst(path)
    n = os.path.getsize(f)
    for at in (n // 3, n // 2):
        _flip(f, at)


def flip_sst_tail(path: Path) -> None:
    """A byte near the end: the index / meta blocks that RocksDB reads when it opens the table."""
    f = _one_sst(path)
    _flip(f, os.path.getsize(f) - 200)


def truncate_manifest(path: Path) -> None:
    (f,) = glob.glob(f"{path}/MANIFEST-*")
    os.truncate(f, os.path.getsize(f) // 2)


def garbage_current(path: Path) -> None:
    (path / "CURRENT").write_bytes(b"\x00\xffgarbage\x13")


def wrong_current(path: Path) -> None:
    (path / "CURRENT").write_bytes(b"MANIFEST-999999\n")


def delete_current(path: Path) -> None:
    (path / "CURRENT").unlink()


WHOLE_STORE: dict[str, Callable[[Path], None]] = {
    "truncated-sst": truncate_sst,
    "flipped-sst-data": flip_sst_data,
    "flipped-sst-tail": flip_sst_tail,
    "truncated-manifest": truncate_manifest,
    "garbage-current": garbage_current,
    "current-naming-missing-manifest": wrong_current,
    "deleted-current": delete_current,
}


@pytest.fixture(params=sorted(WHOLE_STORE))
def damaged(request, tmp_path: Path) -> Path:
    path = make_store(tmp_path / "state")
    assert read_everything(path) == ({0: N, 1: N}, N, N)  # sound before
    WHOLE_STORE[request.param](path)
    return path


def test_plain_open_and_read_fails_on_each_damage(damaged: Path):
    # The precondition of the tests below: the damage is real and visible to a worker's reads.
    # (Before issue #19, "flipped-sst-data" read back 148 of 300 records without any error, as
    # rocksdict's iterators end quietly at a bad block; "truncated-manifest" opened as an empty
    # store; "deleted-current" without a WAL file would have been re-created empty.)
    with pytest.raises(StateStoreDamaged) as e:
        read_everything(damaged)
    assert "\n" not in str(e.value) and str(damaged) in str(e.value)


def test_open_or_recover_moves_the_damaged_store_aside(damaged: Path):
    opened = StateStore.open_or_recover(damaged)
    store, message = opened
    assert isinstance(opened, Opened)
    try:
        assert message is not None and "\n" not in message
        moved = store.recovered_from
        assert moved is not None and moved.is_dir() and moved.parent == damaged.parent
        assert moved.name.startswith("state.damaged-") and moved.name.endswith("Z")
        assert str(moved) in message and str(damaged) in message and "restoring from the changelog" in message
        # A usable, empty store: no offsets, so the worker restores every partition from the changelog.
        assert store.partitions() == {} and len(store) == 0 and store.get_many(users()) == {}
        store.commit([rec("u-new", 5)], {0: 6})
        assert store.get("u-new") == rec("u-new", 5) and store.next_offset(0) == 6
    finally:
        store.close()
    # Reopened, the fresh store verifies and needs no recovery.
    again, msg = StateStore.open_or_recover(damaged)
    with again:
        assert msg is None and again.next_offset(0) == 6
    assert sorted(p.name for p in damaged.parent.iterdir() if ".damaged-" in p.name) == [moved.name]


def test_open_or_recover_refuses_in_one_line(damaged: Path):
    with pytest.raises(StateStoreDamaged) as e:
        StateStore.open_or_recover(damaged, on_damage="refuse")
    text = str(e.value)
    assert "\n" not in text and str(damaged) in text and "refus" in text and e.value.cause in text
    assert isinstance(e.value, StateStoreError)
    # Nothing moved, nothing new.
    assert damaged.is_dir() and not [p for p in damaged.parent.iterdir() if ".damaged-" in p.name]


def test_a_second_move_aside_in_the_same_second_gets_its_own_name(tmp_path: Path):
    path = tmp_path / "state"
    names = []
    for _ in range(2):
        make_store(path)
        delete_current(path)
        store, message = StateStore.open_or_recover(path)
        store.close()
        assert message is not None
        names.append(store.recovered_from)
    assert names[0] != names[1] and all(n.is_dir() for n in names)


# --- not damage --------------------------------------------------------------------------------
def test_a_sound_store_opens_verified_and_untouched(tmp_path: Path):
    path = make_store(tmp_path / "state")
    store, message = StateStore.open_or_recover(path, on_damage="refuse")
    with store:
        assert message is None and store.recovered_from is None
        assert store.verify() == 2 * N + 2 + 1  # records, index entries, offsets, format key
        assert len(store.get_many(users())) == N and store.damaged_records == 0
    fresh, message = StateStore.open_or_recover(tmp_path / "new")
    with fresh:
        assert message is None and fresh.partitions() == {}


def test_a_store_in_use_is_never_moved_aside(tmp_path: Path):
    path = make_store(tmp_path / "state")
    with StateStore(path):
        with pytest.raises(StateStoreError, match="in use") as e:
            StateStore.open_or_recover(path)
        assert not isinstance(e.value, StateStoreDamaged)
    assert not [p for p in tmp_path.iterdir() if ".damaged-" in p.name]


def test_on_damage_is_checked(tmp_path: Path):
    with pytest.raises(ValueError, match="on_damage"):
        StateStore.open_or_recover(tmp_path / "s", on_damage="ignore")


# --- one damaged record ------------------------------------------------------------------------
def _flip_record(path: Path, user: str) -> None:
    """Rewrite one user's value through rocksdict directly with one byte flipped (RocksDB's own
    checksums are then right: only the record's CRC can tell)."""
    db = Rdict(str(path), Options(raw_mode=True))
    try:
        key = b"u" + user.encode()
        blob = bytearray(db[key])
        blob[len(blob) // 2] ^= 0x01
        db[key] = bytes(blob)
        db.flush()
    finally:
        db.close()


def test_one_flipped_record_is_left_out_counted_and_named(tmp_path: Path):
    path = make_store(tmp_path / "state")
    bad = users()[123]
    _flip_record(path, bad)
    from state import RecordError

    with StateStore(path) as s:  # the bytes really fail their CRC
        with pytest.raises(RecordError):
            UserRecord.from_bytes(s.db.get(b"u" + bad.encode()))

    store, message = StateStore.open_or_recover(path, on_damage="refuse")  # not whole-store damage
    with store:
        assert message is None
        got = store.get_many(users())
        assert len(got) == N - 1 and bad not in got and got[users()[0]] == rec(users()[0], 0, 0)
        assert store.damaged_records == 1
        assert store.get_many([bad]) == {} and store.get(bad) is None  # counted once until taken
        assert store.damaged_records == 1
        assert [r.user for r in store.records()] == [u for u in users() if u != bad]
        assert store.take_damaged() == [bad] and store.take_damaged() == []
        # Seen again after it was taken: noted (and counted) again.
        assert bad not in store.get_many([bad]) and store.damaged_records == 2
        # Restored (e.g. from the changelog): sound again, no longer noted.
        store.commit([rec(bad, 123, partition=1)], {})
        assert store.take_damaged() == [] and store.get(bad) == rec(bad, 123, partition=1)


def test_drop_partitions_drops_a_damaged_record_of_the_partition(tmp_path: Path):
    path = make_store(tmp_path / "state")
    bad = users()[7]  # partition 1
    _flip_record(path, bad)
    with StateStore(path) as store:
        assert store.drop_partitions([1]) == {1: N // 2}
        assert store.db.get(b"u" + bad.encode()) is None and store.take_damaged() == []
        assert len(store) == N // 2


def test_verify_time_is_bounded(tmp_path: Path):
    """~2,000 records of 17 KB (34 MB): the verify scan stays well under a second."""
    import time

    s = StateStore(tmp_path / "state", sync=False)
    for i in range(0, 2000, 500):
        s.commit([rec(f"v{j:05d}", j, state_bytes=17_000) for j in range(i, i + 500)], {0: i + 500})
    s.db.flush()
    s.close()
    t0 = time.perf_counter()
    store, message = StateStore.open_or_recover(tmp_path / "state")
    elapsed = time.perf_counter() - t0
    with store:
        assert message is None and store.partitions() == {0: 2000}
    assert elapsed < 2.0

"""The worker's durable per-user state: rocksdict (RocksDB, raw bytes mode) on local disk.

Key layout (one RocksDB, prefixes keep the kinds apart and make each a contiguous range)::

    b"u" + user (UTF-8)                  -> UserRecord.to_bytes()
    b"o" + partition (u32 big-endian)     -> next interactions offset to consume (i64 big-endian)
    b"i" + partition (u32 BE) + user      -> b""  (which users a partition holds, for drop_partitions)
    b"d" + user (UTF-8)                  -> b""  (committed here, not yet in the changelog)
    b"m" + name                           -> store metadata (format version)

Exactly-once effect on state
----------------------------
``commit`` writes every record of a micro-batch and every partition's next offset in ONE
RocksDB WriteBatch with the WAL fsynced (``WriteOptions.sync = True``): a batch is applied
entirely or not at all, and once ``commit`` returns it survives SIGKILL and power loss. A
state therefore never exists on disk without the offset that produced it, nor an offset
without its states. On restart the worker resumes each partition at ``next_offset(p)``, so
every event before it is in the states exactly once and every event from it on is not yet.

The changelog (state/changelog.py) makes the states recoverable on another machine; see its
docstring for the ordering of publish / commit / consumer-group commit that keeps the
changelog at least as new as this store.

One process at a time: RocksDB's LOCK file makes a second open fail (StateStoreError).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

from rocksdict import DBCompressionType, Options, Rdict, WriteBatch, WriteOptions

from state.record import UserRecord

STORE_FORMAT = b"1"
_USER = b"u"
_OFFSET = b"o"
_INDEX = b"i"
_DIRTY = b"d"
_META_FORMAT = b"mformat"
_PART = struct.Struct(">I")  # big-endian so keys sort by partition
_OFF = struct.Struct(">q")


class StateStoreError(RuntimeError):
    """The state directory cannot be used (locked by another process, foreign format, closed)."""


class StateStore:
    """rocksdict (raw mode) at ``path``: user records under one key prefix, and per interactions
    partition the next offset to consume under another. Opened by one worker process at a time.

    sync: the default of ``commit(sync=...)``; True (fsync the WAL on every commit) is what the
    exactly-once guarantee needs against power loss. False survives a process crash (the WAL
    is written to the OS on every write) but not a machine crash; meant for tests and benchmarks.
    """

    def __init__(self, path: Path, *, sync: bool = True, write_buffer_mb: int = 128) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        # Float32 states do not compress (Snappy costs CPU for ~nothing), and with 4-17 KB values
        # the default 64 MB memtable flushes and compacts every few thousand users: measured on
        # 2 cores, 512 x 17 KB batches went 8.9k -> 19k records/s with both changes (at most
        # 3 x write_buffer_mb of memtables in memory).
        opts.set_compression_type(DBCompressionType.none())
        opts.set_write_buffer_size(write_buffer_mb << 20)
        opts.set_max_write_buffer_number(3)
        opts.increase_parallelism(max(2, os.cpu_count() or 2))
        try:
            self._db: Rdict | None = Rdict(str(self.path), opts)
        except Exception as e:  # rocksdict raises a bare Exception for IO errors
            if "lock" in str(e).lower():
                raise StateStoreError(
                    f"state directory {self.path} is in use by another process (RocksDB LOCK): {e}"
                ) from e
            raise StateStoreError(f"cannot open state directory {self.path}: {e}") from e
        self._sync_default = sync
        self._write_sync = self._write_opts(True)
        self._write_nosync = self._write_opts(False)
        found = self._db.get(_META_FORMAT)
        if found is None:
            self._db.put(_META_FORMAT, STORE_FORMAT, self._write_sync)
        elif found != STORE_FORMAT:
            self.close()
            raise StateStoreError(
                f"state directory {self.path} has store format {found!r}; this code reads {STORE_FORMAT!r}"
            )

    @staticmethod
    def _write_opts(sync: bool) -> WriteOptions:
        wo = WriteOptions()
        wo.sync = sync
        return wo

    @property
    def db(self) -> Rdict:
        if self._db is None:
            raise StateStoreError(f"state store {self.path} is closed")
        return self._db

    # --- reads ---------------------------------------------------------------------------------

    def get(self, user: str) -> UserRecord | None:
        """The user's record, or None if the user has no state yet."""
        blob = self.db.get(_user_key(user))
        return None if blob is None else UserRecord.from_bytes(blob)

    def get_many(self, users: Iterable[str]) -> dict[str, UserRecord]:
        """Records of the given users that exist (one RocksDB multi-get)."""
        wanted = list(dict.fromkeys(users))
        if not wanted:
            return {}
        blobs = self.db.get([_user_key(u) for u in wanted])
        return {u: UserRecord.from_bytes(b) for u, b in zip(wanted, blobs) if b is not None}

    def next_offset(self, partition: int) -> int | None:
        """The next interactions offset to consume in ``partition``; None if never committed."""
        raw = self.db.get(_offset_key(partition))
        return None if raw is None else _OFF.unpack(raw)[0]

    def partitions(self) -> dict[int, int]:
        """{partition: next offset} for every partition this store has committed."""
        return {
            _PART.unpack(k[1:])[0]: _OFF.unpack(v)[0] for k, v in self._scan(_OFFSET)
        }

    def records(self) -> Iterator[UserRecord]:
        """Every user's record, in key order (user id bytes)."""
        for _, v in self._scan(_USER):
            yield UserRecord.from_bytes(v)

    def users(self, partition: int) -> list[str]:
        """The users whose records were written from ``partition`` (the partition index; a user
        whose partition changed since may still be listed: check ``record.partition``)."""
        prefix = _INDEX + _PART.pack(partition)
        return [k[len(prefix):].decode("utf-8") for k, _ in self._scan(prefix, values=False)]

    def __len__(self) -> int:
        """Number of users. O(users): a key scan (RocksDB keeps no exact count); not for hot paths."""
        return sum(1 for _ in self._scan(_USER, values=False))

    def _scan(self, prefix: bytes, values: bool = True) -> Iterator[tuple[bytes, bytes | None]]:
        # rocksdict's iterate bounds are encoded in non-raw mode, so seek and stop at the prefix end.
        source = self.db.items(from_key=prefix) if values else ((k, None) for k in self.db.keys(from_key=prefix))
        for k, v in source:
            if not k.startswith(prefix):
                break
            yield k, v

    # --- writes --------------------------------------------------------------------------------

    def commit(
        self, records: Iterable[UserRecord], next_offsets: Mapping[int, int], *, sync: bool | None = None,
        mark_dirty: bool = False,
    ) -> None:
        """Atomically store ``records`` and each partition's next offset.

        ONE WriteBatch holds every record and every offset; with ``sync`` (default: the store's)
        the WAL is fsynced before returning, so a SIGKILL or power loss never separates a state
        from the offset that produced it. A later record of the same user in ``records`` wins.
        ``mark_dirty``: note in the same batch that these users' records are not yet in the
        changelog (``dirty_users``), so a crash before the changelog is written cannot make the
        worker forget to publish them.
        ``next_offsets`` may be empty (e.g. restore) or hold partitions without records (a batch
        of dead letters only); offsets are stored as given (the worker never moves them back).
        """
        batch = WriteBatch(raw_mode=True)
        for rec in records:
            batch.put(_user_key(rec.user), rec.to_bytes())
            batch.put(_index_key(rec.partition, rec.user), b"")
            if mark_dirty:
                batch.put(_DIRTY + rec.user.encode("utf-8"), b"")
        for partition, offset in next_offsets.items():
            if offset < 0:
                raise ValueError(f"next offset of partition {partition} must be >= 0, got {offset}")
            batch.put(_offset_key(partition), _OFF.pack(offset))
        if batch.is_empty():
            return
        sync = self._sync_default if sync is None else sync
        self.db.write(batch, self._write_sync if sync else self._write_nosync)

    def dirty_users(self) -> list[str]:
        """Users committed with ``mark_dirty`` and not cleared since: their records still have to
        be published to the changelog."""
        return [k[1:].decode("utf-8") for k, _ in self._scan(_DIRTY, values=False)]

    def clear_dirty(self, users: Iterable[str]) -> None:
        """The records of ``users`` are in the changelog now (no sync: a lost clear republishes)."""
        batch = WriteBatch(raw_mode=True)
        for u in users:
            batch.delete(_DIRTY + u.encode("utf-8"))
        if not batch.is_empty():
            self.db.write(batch, self._write_nosync)

    def sync_wal(self) -> None:
        """fsync the WAL: makes every earlier ``commit(sync=False)`` durable against power loss."""
        self.db.flush_wal(True)

    def drop_partitions(self, partitions: Iterable[int]) -> dict[int, int]:
        """Forget the users and the next offset of ``partitions``; returns {partition: users dropped}.

        Choice: the worker does NOT call this on every revoke (with a sticky assignment the
        partition usually comes back, and the local state is still exact). It calls it when a
        partition comes back stale, i.e. the group's committed offset is past ``next_offset(p)``
        (another worker advanced it meanwhile), before restoring that partition from the
        changelog; or on revoke when local disk must be reclaimed. One synced WriteBatch.
        O(users of those partitions) thanks to the partition index.
        """
        batch = WriteBatch(raw_mode=True)
        dropped: dict[int, int] = {}
        for p in dict.fromkeys(partitions):
            prefix = _INDEX + _PART.pack(p)
            current = self.get_many(self.users(p))
            # A user whose record moved to another partition (partition count changed) keeps it.
            gone = [u for u, r in current.items() if r.partition == p]
            for u in gone:
                batch.delete(_user_key(u))
            batch.delete_range(prefix, _INDEX + _PART.pack(p + 1) if p < 0xFFFFFFFF else _INDEX + b"\xff" * 5)
            batch.delete(_offset_key(p))
            dropped[p] = len(gone)
        if not batch.is_empty():
            self.db.write(batch, self._write_sync)
        return dropped

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and release the directory (idempotent)."""
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore({str(self.path)!r}{', closed' if self._db is None else ''})"


def _user_key(user: str) -> bytes:
    return _USER + user.encode("utf-8")


def _offset_key(partition: int) -> bytes:
    if not 0 <= partition <= 0xFFFFFFFF:
        raise ValueError(f"partition out of range: {partition}")
    return _OFFSET + _PART.pack(partition)


def _index_key(partition: int, user: str) -> bytes:
    return _INDEX + _PART.pack(partition) + user.encode("utf-8")

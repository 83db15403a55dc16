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

Damage
------
The changelog holds every committed state, so a damaged store is never a reason to die with a
traceback. Two kinds:

* **The whole store** (a truncated or bit-flipped .sst, a truncated MANIFEST, a bad or deleted
  CURRENT): ``StateStore.open_or_recover`` opens AND verifies (``verify``: a scan of every key,
  which makes RocksDB read and checksum every data block). On damage it says so in one line
  and, by default (``on_damage="move-aside"``), renames the directory to
  ``<path>.damaged-<UTC timestamp>`` and opens a fresh empty store there: the worker finds no
  offset for its partitions and restores them from the changelog. ``on_damage="refuse"``
  raises ``StateStoreDamaged`` (a StateStoreError) with that line instead. Damage that appears
  later, while running, surfaces as ``StateStoreDamaged`` from the read or write that meets
  it (rocksdict's own iterators would silently stop early at a bad block: ``_scan`` checks).
* **One record** whose value fails ``UserRecord.from_bytes`` (its CRC): reads never raise for
  it. ``get``/``get_many``/``records`` leave it out, count it (``damaged_records``) and note
  the user in ``take_damaged()`` for the caller to restore from the changelog or rebuild
  from its window; a later ``commit`` of that user clears the note.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from rocksdict import DBCompressionType, Options, Rdict, WriteBatch, WriteOptions

from state.record import UserRecord

log = logging.getLogger("linrec.state")

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


class StateStoreDamaged(StateStoreError):
    """The store's files are damaged (RocksDB reports corruption or a missing file, CURRENT is
    gone, the store lost its own metadata). ``cause``: RocksDB's (or our) reason, one line.
    The changelog can rebuild it: see ``StateStore.open_or_recover``."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class Opened(NamedTuple):
    """What ``StateStore.open_or_recover`` returns: the store, and None or the one line saying
    that the store was found damaged and where the damaged copy went."""

    store: StateStore
    message: str | None


ON_DAMAGE = ("move-aside", "refuse")


class StateStore:
    """rocksdict (raw mode) at ``path``: user records under one key prefix, and per interactions
    partition the next offset to consume under another. Opened by one worker process at a time.

    sync: the default of ``commit(sync=...)``; True (fsync the WAL on every commit) is what the
    exactly-once guarantee needs against power loss. False survives a process crash (the WAL
    is written to the OS on every write) but not a machine crash; meant for tests and benchmarks.
    """

    def __init__(self, path: Path, *, sync: bool = True, write_buffer_mb: int = 128) -> None:
        self.path = Path(path)
        self.damaged_records = 0  # records that failed to decode, counted when first met
        self._damaged: set[str] = set()  # their users, until take_damaged() or a commit of them
        self.recovered_from: Path | None = None  # set by open_or_recover after a move-aside
        self.path.mkdir(parents=True, exist_ok=True)
        # An existing store has CURRENT. Without it RocksDB would create a new, empty DB over the
        # old files (and delete them as obsolete) or refuse with an obscure message.
        existed = (self.path / "CURRENT").exists()
        if not existed:
            leftovers = sorted(f.name for f in self.path.iterdir() if _is_rocksdb_file(f.name))
            if leftovers:
                cause = f"CURRENT is missing but the directory holds RocksDB files ({', '.join(leftovers[:4])})"
                raise StateStoreDamaged(f"state store {self.path} unreadable ({cause})", cause)
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
            raise _open_error(self.path, e) from None
        self._sync_default = sync
        self._write_sync = self._write_opts(True)
        self._write_nosync = self._write_opts(False)
        try:
            with self._rocks():
                found = self._db.get(_META_FORMAT)
        except BaseException:
            self.close()
            raise
        if found is None and existed:
            # A store this code made always has its format key: RocksDB opened without error but
            # lost what it held (e.g. a truncated MANIFEST, read as if it ended there).
            self.close()
            cause = "the store's format key is missing: RocksDB recovered an older or empty state (truncated MANIFEST?)"
            raise StateStoreDamaged(f"state store {self.path} unreadable ({cause})", cause)
        if found is None:
            self._db.put(_META_FORMAT, STORE_FORMAT, self._write_sync)
        elif found != STORE_FORMAT:
            self.close()
            raise StateStoreError(
                f"state directory {self.path} has store format {found!r}; this code reads {STORE_FORMAT!r}"
            )

    @classmethod
    def open_or_recover(cls, path: Path, *, on_damage: str = "move-aside", **kwargs: object) -> Opened:
        """Open the store at ``path`` and ``verify`` it; ``(store, None)`` when it is sound.

        A damaged store (``StateStoreDamaged`` from opening or verifying) is, with
        ``on_damage="move-aside"`` (default), closed and renamed to
        ``<path>.damaged-<UTC timestamp>``, and a fresh empty store is opened at ``path``:
        ``(store, message)`` where message is one line naming the cause and the damaged copy
        (also in ``store.recovered_from``). The empty store has no partition offsets, so the
        worker restores each partition it is assigned from the changelog.
        ``on_damage="refuse"`` raises StateStoreDamaged with that one line instead. Nothing is
        logged here: the caller prints the message (one line, no traceback).

        Not damage, raised whatever ``on_damage`` says: the directory is in use by another
        process (the LOCK is checked by the open, before anything is verified or moved), a
        foreign store format, permission or disk errors (StateStoreError).
        ``kwargs`` go to ``StateStore(...)``. Cost: a scan of every key (``verify``).
        """
        if on_damage not in ON_DAMAGE:
            raise ValueError(f"on_damage must be one of {ON_DAMAGE}, got {on_damage!r}")
        path = Path(path)
        try:
            store = cls(path, **kwargs)  # type: ignore[arg-type]
            try:
                store.verify()
            except BaseException:
                store.close()
                raise
            return Opened(store, None)
        except StateStoreDamaged as e:
            cause = e.cause
        if on_damage == "refuse":
            raise StateStoreDamaged(
                f"state store {path} unreadable ({cause}); refusing to start (on_damage=refuse): move the "
                "directory aside or delete it to restore from the changelog", cause)
        moved = _move_aside(path)
        store = cls(path, **kwargs)  # type: ignore[arg-type]
        store.recovered_from = moved
        message = f"state store {path} unreadable ({cause}); moved to {moved}, restoring from the changelog"
        return Opened(store, message)

    def verify(self) -> int:
        """Read every key once (RocksDB reads and checksums every data block, index and filter
        of every live .sst and the memtables) and decode the partition offsets; returns the
        number of keys. Raises StateStoreDamaged on the first damage met.

        Records are not decoded (their CRC is checked when read: see ``get_many``). Cost,
        measured on 2 shared cores for 10,000 records of 17 KB (180 MB): 0.14-0.27 s with the
        files in the page cache, 0.26-0.42 s with them evicted (the time to read them once)."""
        n = 0
        for k, v in self._scan(_OFFSET):
            if len(k) != 1 + _PART.size or len(v or b"") != _OFF.size:
                cause = f"malformed partition offset entry {k!r} -> {v!r}"
                raise StateStoreDamaged(f"state store {self.path} unreadable ({cause})", cause)
        for _ in self._scan(b"", values=False):
            n += 1
        return n

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
        """The user's record, or None if the user has no state yet or a damaged one (counted and
        noted for ``take_damaged``, as in ``get_many``)."""
        with self._rocks():
            blob = self.db.get(_user_key(user))
        return None if blob is None else self._decode(user, blob)

    def get_many(self, users: Iterable[str]) -> dict[str, UserRecord]:
        """Records of the given users that exist and are sound (one RocksDB multi-get).

        A stored record that fails ``UserRecord.from_bytes`` (bad CRC, malformed) or names
        another user is left out as if absent, never raised: it is counted in
        ``damaged_records`` (once until taken) and its user is noted for ``take_damaged()``,
        so that the caller restores it from the changelog or rebuilds it from its window.
        Damage of the store itself (a bad block) raises StateStoreDamaged."""
        wanted = list(dict.fromkeys(users))
        if not wanted:
            return {}
        with self._rocks():
            blobs = self.db.get([_user_key(u) for u in wanted])
        out: dict[str, UserRecord] = {}
        for u, b in zip(wanted, blobs):
            if b is not None and (r := self._decode(u, b)) is not None:
                out[u] = r
        return out

    def take_damaged(self) -> list[str]:
        """The users whose stored record reads have found damaged (and not committed since),
        sorted; clears the list. ``damaged_records`` keeps counting."""
        users, self._damaged = sorted(self._damaged), set()
        return users

    def _decode(self, user: str, blob: bytes) -> UserRecord | None:
        try:
            r = UserRecord.from_bytes(blob)
            if r.user != user:
                raise ValueError(f"the record is of user {r.user!r}")
            return r
        except ValueError as e:  # RecordError is a ValueError
            if user not in self._damaged:
                self._damaged.add(user)
                self.damaged_records += 1
                log.warning("state store %s: the record of user %r is damaged (%s); treated as absent",
                            self.path, user, " ".join(str(e).split())[:200])
            return None

    def next_offset(self, partition: int) -> int | None:
        """The next interactions offset to consume in ``partition``; None if never committed."""
        with self._rocks():
            raw = self.db.get(_offset_key(partition))
        return None if raw is None else _OFF.unpack(raw)[0]

    def partitions(self) -> dict[int, int]:
        """{partition: next offset} for every partition this store has committed."""
        return {
            _PART.unpack(k[1:])[0]: _OFF.unpack(v)[0] for k, v in self._scan(_OFFSET)
        }

    def records(self) -> Iterator[UserRecord]:
        """Every user's sound record, in key order (user id bytes). A damaged record is skipped,
        counted and noted for ``take_damaged`` (see ``get_many``)."""
        for k, v in self._scan(_USER):
            r = self._decode(k[len(_USER):].decode("utf-8", "replace"), v)
            if r is not None:
                yield r

    def users(self, partition: int) -> list[str]:
        """The users whose records were written from ``partition`` (the partition index; a user
        whose partition changed since may still be listed: check ``record.partition``)."""
        prefix = _INDEX + _PART.pack(partition)
        return [k[len(prefix):].decode("utf-8") for k, _ in self._scan(prefix, values=False)]

    def __len__(self) -> int:
        """Number of users. O(users): a key scan (RocksDB keeps no exact count); not for hot paths."""
        return sum(1 for _ in self._scan(_USER, values=False))

    def _scan(self, prefix: bytes, values: bool = True) -> Iterator[tuple[bytes, bytes | None]]:
        # rocksdict's iterate bounds are encoded in non-raw mode, so seek and stop at the prefix
        # end. Its items()/keys() end quietly at a corrupt block (they never check the iterator's
        # status), which would read as fewer users or offsets: the raw iterator is checked here.
        with self._rocks():
            it = self.db.iter()
            it.seek(prefix)
            while it.valid():
                k = it.key()
                if not k.startswith(prefix):
                    break
                yield k, (it.value() if values else None)
                it.next()
            it.status()

    @contextlib.contextmanager
    def _rocks(self) -> Iterator[None]:
        """rocksdict calls: RocksDB's corruption / missing-file errors become StateStoreDamaged."""
        try:
            yield
        except StateStoreError:
            raise
        except Exception as e:
            if type(e) is Exception and _is_damage(str(e)):  # rocksdict's errors are bare Exceptions
                cause = _one_line(e)
                raise StateStoreDamaged(f"state store {self.path} unreadable ({cause})", cause) from None
            raise

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
        written: list[str] = []
        for rec in records:
            written.append(rec.user)
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
        with self._rocks():
            self.db.write(batch, self._write_sync if sync else self._write_nosync)
        if self._damaged:
            self._damaged.difference_update(written)

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
            listed = self.users(p)
            with self._rocks():
                blobs = self.db.get([_user_key(u) for u in listed]) if listed else []
            gone = []
            for u, b in zip(listed, blobs):
                if b is None:
                    continue
                try:
                    r = UserRecord.from_bytes(b)
                except ValueError:  # a damaged record of the partition goes too (not counted)
                    gone.append(u)
                    self._damaged.discard(u)
                    continue
                # A user whose record moved to another partition (partition count changed) keeps it.
                if r.partition == p:
                    gone.append(u)
            for u in gone:
                batch.delete(_user_key(u))
            batch.delete_range(prefix, _INDEX + _PART.pack(p + 1) if p < 0xFFFFFFFF else _INDEX + b"\xff" * 5)
            batch.delete(_offset_key(p))
            dropped[p] = len(gone)
        if not batch.is_empty():
            with self._rocks():
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


_ROCKSDB_FILES = ("MANIFEST-", "OPTIONS-", "IDENTITY")


def _is_rocksdb_file(name: str) -> bool:
    return name.startswith(_ROCKSDB_FILES) or name.endswith((".sst", ".log", ".blob"))


def _one_line(e: BaseException | str, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_damage(message: str) -> bool:
    """RocksDB's status for damaged files: Corruption, or a file it needs that is gone, or the
    disk failing to read it. Not: a LOCK held, permissions, a full disk."""
    return not _is_lock(message) and (
        "Corruption" in message or "No such file or directory" in message or "Input/output error" in message)


def _is_lock(message: str) -> bool:
    # "IO error: While lock file: <dir>/LOCK: Resource temporarily unavailable", or "lock hold by
    # current process". (Not "lock" anywhere: "block checksum mismatch" is corruption.)
    return "While lock file" in message or "lock hold by current process" in message


def _open_error(path: Path, e: Exception) -> StateStoreError:
    msg = str(e)
    if _is_lock(msg):
        return StateStoreError(f"state directory {path} is in use by another process (RocksDB LOCK): {_one_line(e)}")
    if _is_damage(msg):
        cause = _one_line(e)
        return StateStoreDamaged(f"state store {path} unreadable ({cause})", cause)
    return StateStoreError(f"cannot open state directory {path}: {_one_line(e)}")


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<path>.damaged-<UTC timestamp>`` (a suffix if that exists); returns it."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    try:
        path.rename(target)
    except OSError as e:
        raise StateStoreError(f"state store {path} is damaged and cannot be moved aside to {target}: {e}") from None
    return target


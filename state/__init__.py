"""Durable per-user state of the stream worker, with an exactly-once effect on state.

- ``record.UserRecord``: one user's model state bytes, recent window (model ids of known items,
  tagged with their vocabulary) and the Kafka position of the last event applied (the
  idempotence key), in a versioned binary format.
- ``store.StateStore``: rocksdict on local disk; records and per-partition next offsets are
  committed together in one fsynced WriteBatch; ``StateStore.open_or_recover`` opens and verifies
  it, moving a damaged store aside (``StateStoreDamaged``) so the changelog restores it.
- ``changelog.Changelog``: a compacted Kafka topic mirroring the records, so another machine
  can rebuild the states of its partitions. Its docstring gives the worker's commit order.
"""

from state.changelog import Changelog, ChangelogError
from state.record import RecordError, UserRecord
from state.store import Opened, StateStore, StateStoreDamaged, StateStoreError

__all__ = ["Changelog", "ChangelogError", "Opened", "RecordError", "StateStore", "StateStoreDamaged", "StateStoreError",
           "UserRecord"]

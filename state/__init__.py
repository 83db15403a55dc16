"""Durable per-user state of the stream worker, with an exactly-once effect on state.

- ``record.UserRecord``: one user's model state bytes, recent window (model ids of known items,
  tagged with their vocabulary) and the Kafka position of the last event applied (the
  idempotence key), in a versioned binary format.
- ``store.StateStore``: rocksdict on local disk; records and per-partition next offsets are
  committed together in one fsynced WriteBatch.
- ``changelog.Changelog``: a compacted Kafka topic mirroring the records, so another machine
  can rebuild the states of its partitions. Its docstring gives the worker's commit order.
"""

from state.changelog import Changelog, ChangelogError
from state.record import RecordError, UserRecord
from state.store import StateStore, StateStoreError

__all__ = ["Changelog", "ChangelogError", "RecordError", "StateStore", "StateStoreError", "UserRecord"]

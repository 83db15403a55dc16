"""The ``model-updates`` topic: announcements of the model version in force.

One partition, compacted, every message keyed :data:`KEY`: after compaction the topic holds the
newest announcement, and in between a follower sees every promote and rollback in order. The
registry's ``CURRENT.json`` stays the source of truth; an announcement tells running workers to
look now rather than at their next start.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

KEY = b"current"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Announcement:
    action: str  # promote | rollback
    version: str
    previous: str | None
    at: float  # epoch seconds of the registry change
    announced_ms: int = 0  # the message's Kafka timestamp (set when read back)

    def to_bytes(self) -> bytes:
        body = {"v": FORMAT_VERSION, **{k: v for k, v in asdict(self).items() if k != "announced_ms"}}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, blob: bytes, announced_ms: int = 0) -> Announcement:
        """Raises ValueError on anything that is not an announcement of this format."""
        try:
            d = json.loads(blob)
            if not isinstance(d, dict) or d.get("v") != FORMAT_VERSION or not isinstance(d.get("version"), str):
                raise ValueError("wrong format")
            previous = d.get("previous")
            return cls(str(d["action"]), d["version"], None if previous is None else str(previous),
                       float(d["at"]), announced_ms)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"not a model announcement: {bytes(blob)[:120]!r}") from None

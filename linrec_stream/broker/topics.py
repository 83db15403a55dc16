"""Create and delete the project's topics (the catalogue is ``contracts.topics``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.topics import Topic, project_topics
from linrec_stream.settings import Settings


@dataclass(frozen=True)
class TopicOutcome:
    name: str
    partitions: int
    created: bool  # False: it existed already (its partition count is reported as found)


def create_topics(settings: Settings, timeout_s: float = 30.0) -> list[TopicOutcome]:
    """Create every project topic (``contracts.topics.project_topics``) that does not exist;
    leave existing ones untouched."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    topics = project_topics(settings)
    admin = KafkaConnection.from_settings(settings).admin(request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        created: set[str] = set()
        for t in topics:
            if t.name in existing:
                continue
            try:
                admin.create_topics([NewTopic(t.name, t.partitions, 1, topic_configs=dict(t.configs))],
                                    timeout_ms=int(timeout_s * 1000))
                created.add(t.name)
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process: same outcome
        found = _partition_counts(admin, [t.name for t in topics], timeout_s)
        return [TopicOutcome(t.name, found.get(t.name, t.partitions), t.name in created) for t in topics]
    finally:
        admin.close()


def delete_topics(settings: Settings, topics: Iterable[Topic], timeout_s: float = 30.0) -> list[str]:
    """Delete those of ``topics`` that exist and wait until the broker no longer lists them;
    returns the names deleted."""
    names = {t.name for t in topics}
    admin = KafkaConnection.from_settings(settings).admin(request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = sorted(names & set(admin.list_topics()))
        if existing:
            admin.delete_topics(existing)
            deadline = time.monotonic() + timeout_s
            while set(existing) & set(admin.list_topics()) and time.monotonic() < deadline:
                time.sleep(0.3)
            time.sleep(1.0)  # let deletion settle before the same names are created again
        return existing
    finally:
        admin.close()


def _partition_counts(admin, names: list[str], timeout_s: float) -> dict[str, int]:
    """Partition count per topic, waiting briefly for a just-created topic's metadata to show."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {t.get("name", t.get("topic")): len(t["partitions"]) for t in admin.describe_topics(names)}
        if all(found.get(n, 0) > 0 for n in names) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def private_env(prefix: str, tag: str) -> dict[str, str]:
    """``LINREC_*`` settings naming a private set of topics and consumer group,
    ``<prefix>-<tag>-in`` and so on, so that a test or benchmark shares nothing with another."""
    base = f"{prefix}-{tag}"
    return {
        "LINREC_TOPIC_INTERACTIONS": f"{base}-in", "LINREC_TOPIC_RECOMMENDATIONS": f"{base}-recs",
        "LINREC_TOPIC_DEAD_LETTER": f"{base}-dlq", "LINREC_TOPIC_MODEL_UPDATES": f"{base}-models",
        "LINREC_TOPIC_STATE_CHANGELOG": f"{base}-changelog", "LINREC_WORKER_GROUP": base,
    }

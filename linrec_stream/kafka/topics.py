"""Create the project's topics, idempotently."""

from __future__ import annotations

import time
from dataclasses import dataclass

from linrec_stream.settings import Settings


@dataclass(frozen=True)
class TopicOutcome:
    name: str
    partitions: int
    created: bool  # False: it existed already (its partition count is reported as found)


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Per-topic broker configs. Interactions are kept as long as retraining needs them;
    model announcements are compacted to the newest per key."""
    return {
        settings.topic_interactions: {"retention.ms": str(settings.interactions_retention_ms)},
        settings.topic_model_updates: {"cleanup.policy": "compact"},
    }


def create_topics(settings: Settings, timeout_s: float = 30.0) -> list[TopicOutcome]:
    """Create every project topic that does not exist; leave existing ones untouched."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        configs = topic_configs(settings)
        wanted = [
            NewTopic(name, partitions, 1, topic_configs=configs.get(name, {}))
            for name, partitions in settings.topics.items()
            if name not in existing
        ]
        created: set[str] = set()
        for topic in wanted:
            try:
                admin.create_topics([topic], timeout_ms=int(timeout_s * 1000))
                created.add(topic.name)
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process: same outcome
        found = _partition_counts(admin, list(settings.topics), timeout_s)
        return [TopicOutcome(name, found.get(name, n), name in created) for name, n in settings.topics.items()]
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

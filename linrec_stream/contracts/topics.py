"""The catalogue of the project's topics: names, partition counts and broker configs, from
the settings. Every component that creates, checks or deletes a topic reads it from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from linrec_stream.settings import Settings

#: Name prefixes of the topics and groups that project code names for itself, beside those of the
#: settings: the quick start's (``quickstart-interactions``, ...) and ``kafka check``'s throw-away
#: topic and group. The secure broker grants on them (broker/secure.py).
QUICKSTART_PREFIX = "quickstart-"
ROUNDTRIP_PREFIX = "linrec-roundtrip-"

#: Header of an interactions message the worker forwarded to its user's home partition: where
#: the event was produced, ``"<partition>/<offset>"`` (consumers/worker.py, "Partitioning").
FORWARDED_FROM = "linrec.forwarded-from"


def home_partition(key: bytes, partitions: int) -> int:
    """The partition a user's events belong to, of ``partitions``: murmur2 of the key made
    positive, modulo the count: what Java's and kafka-python's default partitioners choose for a
    keyed record (librdkafka's default, CRC32, often differs)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


#: Keep only the newest record per key (user states, the model in force), never delete by age.
COMPACTED: Mapping[str, str] = {"cleanup.policy": "compact"}


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    configs: Mapping[str, str] = field(default_factory=dict)
    purpose: str = ""


def changelog_topic(s: Settings) -> Topic:
    """The compacted user-state changelog: one partition per interactions partition, so a
    worker restores exactly the users of the partitions it is assigned."""
    return Topic(s.topic_state_changelog, s.interactions_partitions, COMPACTED, "user states, for recovery")


def project_topics(s: Settings) -> tuple[Topic, ...]:
    """Every topic of the project. Interactions are kept as long as retraining needs them;
    model announcements and user states are compacted to the newest per key."""
    return (
        Topic(s.topic_interactions, s.interactions_partitions,
              {"retention.ms": str(s.interactions_retention_ms)}, "input events, keyed by user"),
        Topic(s.topic_recommendations, s.recommendations_partitions, {}, "refreshed top-K per user"),
        Topic(s.topic_dead_letter, s.dead_letter_partitions, {}, "malformed input with the reason"),
        Topic(s.topic_model_updates, 1, COMPACTED, "announcements of promoted model versions"),
        changelog_topic(s),
    )


def stream_topics(s: Settings) -> tuple[Topic, ...]:
    """The topics that carry one run's data (all but the model announcements), e.g. to start
    a private run afresh."""
    return tuple(t for t in project_topics(s) if t.name != s.topic_model_updates)

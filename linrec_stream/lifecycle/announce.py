"""Telling running workers about a registry change: one message on the ``model-updates`` topic.

The registry's ``CURRENT.json`` is the source of truth, so an announcement that fails leaves
the registry changed and the workers picking the version up at their next start. Every caller
(``models promote``/``rollback``/``add --promote``, a publishing retrain) goes through
:func:`announce`, which says so in one sentence when it fails.
"""

from __future__ import annotations

from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.clients.refusal import KafkaRefusal
from linrec_stream.contracts.model_updates import KEY, Announcement
from linrec_stream.lifecycle.registry import Change
from linrec_stream.settings import Settings


class AnnounceError(RuntimeError):
    """The registry changed but running workers could not be told (the message says what to do)."""


def announce(settings: Settings, change: Change, timeout_s: float = 30.0) -> Announcement:
    """Publish ``change`` on ``settings.topic_model_updates`` and wait until the broker has it.

    Raises AnnounceError (one sentence, naming the version and the cause) if it cannot."""
    from kafka.errors import KafkaError

    a = Announcement(change.action, change.version, change.previous, change.at)
    topic = settings.topic_model_updates
    try:
        producer = KafkaConnection.from_settings(settings).producer(acks="all", max_block_ms=int(timeout_s * 1000))
        try:
            producer.send(topic, key=KEY, value=a.to_bytes()).get(timeout=timeout_s)
            producer.flush()
        finally:
            producer.close()
    except (KafkaError, KafkaRefusal) as exc:  # a refusal too: the registry has changed all the same
        raise AnnounceError(
            f"{change.version[:12]} is in force in the registry, but announcing it on {topic} failed "
            f"({type(exc).__name__}: {exc}); running workers pick it up at their next start, or repeat "
            "the command once the broker is back") from None
    return a

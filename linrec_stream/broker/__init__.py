"""The local Apache Kafka broker: fetching it from Maven Central, running it, creating topics."""

from linrec_stream.broker.errors import KafkaSetupError

__all__ = ["KafkaSetupError"]

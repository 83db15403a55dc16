"""One typed settings object for every component of linrec-stream.

Values are layered, later layers winning:

1. the defaults below,
2. an optional TOML file (``--config PATH`` or ``LINREC_CONFIG``), flat ``name = value`` pairs,
3. environment variables ``LINREC_<NAME>`` (upper case),
4. command-line flags (``--set name=value`` and the CLI's named flags).

Every value is parsed and checked when the settings are built; a wrong value raises
:class:`SettingsError` with a one-line message that names the setting and where it came from.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

ENV_PREFIX = "LINREC_"
CONFIG_ENV = "LINREC_CONFIG"


class SettingsError(ValueError):
    """A setting has a wrong value, an unknown name, or its file cannot be read."""


def _check_port(value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"a TCP port is 1..65535, got {value}")


def _check_port_or_off(value: int) -> None:
    if value != 0:
        _check_port(value)


def _check_positive(value: int | float) -> None:
    if not value > 0 or value == float("inf"):  # NaN compares false: refused too
        raise ValueError(f"must be a finite number > 0, got {value}")


def _check_servers(value: str) -> None:
    # host:port[,host:port...]: an empty or port-less list would only fail later, as a timeout.
    servers = [v.strip() for v in value.split(",")]
    if not all(h and p.isdigit() for h, _, p in (v.rpartition(":") for v in servers)):
        raise ValueError(f"a comma-separated list of host:port, got {value!r}")


def _check_topic(value: str) -> None:
    # Kafka's own rule: 1..249 chars of [a-zA-Z0-9._-].
    ok = 0 < len(value) <= 249 and all(c.isascii() and (c.isalnum() or c in "._-") for c in value)
    if not ok:
        raise ValueError(f"a Kafka topic name is 1-249 characters of letters, digits, '.', '_' or '-', got {value!r}")


def _check_heap(value: str) -> None:
    if not (value[:-1].isdigit() and value[-1].lower() in "mg"):
        raise ValueError(f"a JVM heap size such as 512m or 1g, got {value!r}")


def _check_device(value: str) -> None:
    if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
        raise ValueError(f"one of auto, cpu, cuda, cuda:N, got {value!r}")


#: The dtypes a user state may be stored in (``state_dtype``); names as torch spells them.
STATE_DTYPES = ("float32", "float16", "bfloat16")



#: The most event ids a user record's recent set holds (its u16 count, state/record.py).
MAX_DEDUP_EVENT_IDS = 0xFFFF


def _check_dedup_event_ids(value: int) -> None:
    if not 0 <= value <= MAX_DEDUP_EVENT_IDS:
        raise ValueError(f"must be 0 (off) .. {MAX_DEDUP_EVENT_IDS}, got {value}")


#: Where an event's time comes from (``event_time``; contracts/events.py says how each reads).
EVENT_TIME_SOURCES = ("field", "field_or_record", "record")
TIME_UNITS = ("s", "ms")


def _one_of(*choices: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"one of {', '.join(choices)}, got {value!r}")
    return check


def _check_field_name(value: str) -> None:
    if not value or value != value.strip():
        raise ValueError(f"a JSON field name, not empty and without surrounding spaces, got {value!r}")


WORKER_ENGINES = ("kafka-python", "faust")
ISOLATION_LEVELS = ("read_committed", "read_uncommitted")
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")





SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: What ``settings`` prints instead of a secret's value.
MASK = "********"


def _check_file_or_unset(value: str) -> None:
    # "" means unset; a path that is given must be a readable file, checked now rather than as a
    # TLS handshake error later.
    if value and not Path(value).expanduser().is_file():
        raise ValueError(f"no such file: {value}")


def _setting(default: Any, doc: str, check: Callable[[Any], None] | None = None, secret: bool = False) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every knob of linrec-stream. Paths are resolved against the working directory."""

    # --- Kafka client side -------------------------------------------------------------
    bootstrap_servers: str = _setting("127.0.0.1:9092", "Kafka bootstrap servers, comma separated", _check_servers)
    # Security of every client the project makes (linrec_stream/clients/connection.py; README
    # "Connecting to a real cluster"). "" means unset.
    security_protocol: str = _setting("PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
                                      _one_of(*SECURITY_PROTOCOLS))
    sasl_mechanism: str = _setting("SCRAM-SHA-512", "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                                   _one_of(*SASL_MECHANISMS))
    sasl_username: str = _setting("", "SASL user name")
    sasl_password: str = _setting("", "SASL password (wins over sasl_password_file; never printed)", secret=True)
    sasl_password_file: str = _setting("", "file holding the SASL password (first line)", _check_file_or_unset)
    ssl_cafile: str = _setting("", "PEM file of the CA certificates to trust (\"\": the system's)",
                               _check_file_or_unset)
    ssl_certfile: str = _setting("", "PEM client certificate, for mutual TLS", _check_file_or_unset)
    ssl_keyfile: str = _setting("", "PEM private key of ssl_certfile, for mutual TLS", _check_file_or_unset)
    ssl_key_password: str = _setting("", "password of an encrypted ssl_keyfile (never printed)", secret=True)
    ssl_check_hostname: bool = _setting(True, "check that the broker's certificate names its host")
    # --- the local broker that `linrec-stream kafka start` runs ---------------------------
    kafka_port: int = _setting(9092, "local broker's client port on 127.0.0.1", _check_port)
    kafka_controller_port: int = _setting(9093, "local broker's KRaft controller port on 127.0.0.1", _check_port)
    kafka_version: str = _setting("4.3.1", "Apache Kafka version fetched from Maven Central")
    kafka_heap: str = _setting("512m", "maximum JVM heap of the local broker", _check_heap)
    kafka_start_timeout_s: float = _setting(90.0, "seconds to wait for the local broker to answer", _check_positive)
    kafka_cache_dir: Path = _setting(
        Path("~/.cache/linrec-stream/kafka"), "where the broker's jars are cached (shared by checkouts)"
    )
    runtime_dir: Path = _setting(Path(".runtime"), "project-local runtime files: broker data, logs, pid")
    # --- topics -----------------------------------------------------------------------
    # Measured in BENCHMARKS.md ("Compression of the worker's own messages"): zstd makes a
    # recommendation 5x smaller for ~2 us; a state (float32) shrinks 9% for ~70 us: not worth it.
    compression_type: str = _setting(
        "zstd", "codec of the recommendations and dead letters the worker sends (none, gzip, snappy, lz4, zstd)",
        _one_of(*CODECS))
    changelog_compression_type: str = _setting(
        "none", "codec of the state changelog records (float states barely compress)", _one_of(*CODECS))
    isolation_level: str = _setting(
        "read_committed", "what the worker, the archive and `recs tail` read of transactional producers: "
        "read_committed skips events of aborted transactions", _one_of(*ISOLATION_LEVELS))
    topic_interactions: str = _setting("interactions", "input events, keyed by user", _check_topic)
    topic_recommendations: str = _setting("recommendations", "refreshed top-K per user", _check_topic)
    topic_dead_letter: str = _setting("interactions-dlq", "malformed input with the reason", _check_topic)
    topic_model_updates: str = _setting("model-updates", "announcements of promoted model versions", _check_topic)
    interactions_partitions: int = _setting(4, "partitions of the interactions topic", _check_positive)
    recommendations_partitions: int = _setting(4, "partitions of the recommendations topic", _check_positive)
    dead_letter_partitions: int = _setting(1, "partitions of the dead-letter topic", _check_positive)
    interactions_retention_ms: int = _setting(
        -1, "retention of the interactions topic in ms (-1: forever, so retraining can re-read it)"
    )
    # --- data, models, worker -------------------------------------------------------------
    data_dir: Path = _setting(Path("data"), "where fetched data sets are kept")
    registry_dir: Path = _setting(Path("models"), "versioned model checkpoints")
    state_dir: Path = _setting(Path(".runtime/state"), "the worker's rocksdict user-state store")
    device: str = _setting("auto", "torch device for workers and training: auto, cpu, cuda", _check_device)
    metrics_port: int = _setting(9464, "Prometheus metrics port of a worker (0: no endpoint)", _check_port_or_off)
    topic_state_changelog: str = _setting(
        "user-state-changelog", "compacted topic the worker's user states are recovered from", _check_topic
    )
    worker_group: str = _setting("linrec-workers", "consumer group of the stream workers")
    batch_size: int = _setting(256, "worker: most events in one micro-batch", _check_positive)
    batch_ms: int = _setting(50, "worker: longest wait in ms to fill a micro-batch", _check_positive)
    top_k: int = _setting(10, "items per recommendation", _check_positive)
    recent_window: int = _setting(200, "recent item ids kept per user (excluded from recommendations)", _check_positive)
    max_event_bytes: int = _setting(4096, "larger interaction messages go to the dead-letter topic", _check_positive)
    max_id_chars: int = _setting(256, "longest user or item id accepted", _check_positive)
    # --- the interactions message contract (README "Message contract") ---------------------
    field_user: str = _setting("user", "interactions: JSON field of the user id (the key must equal it)",
                               _check_field_name)
    field_item: str = _setting("item", "interactions: JSON field of the item id", _check_field_name)
    field_ts: str = _setting("ts", "interactions: JSON field of the event time", _check_field_name)
    field_event_id: str = _setting("event_id", "interactions: JSON field of the optional event id",
                                   _check_field_name)
    event_time: str = _setting(
        "field", "interactions: where the event time comes from: field (required), field_or_record (the "
        "Kafka record's timestamp when the field is absent) or record (always the record's)",
        _one_of(*EVENT_TIME_SOURCES))
    event_time_unit: str = _setting("s", "interactions: unit of the event-time field: s (epoch seconds) or ms",
                                    _one_of(*TIME_UNITS))
    repartition: bool = _setting(
        True, "worker: an event found on another partition than its user's home partition (murmur2 of the key, "
        "as Java and kafka-python partition) is forwarded there and applied there, so a fleet of producers "
        "with other partitioners (librdkafka's CRC32) still gives each user one state")
    dedup_event_ids: int = _setting(
        32, "worker: event ids kept per user to skip an upstream retry (same event_id, new offset) as a duplicate; "
        "an id older than the last this many is applied again (0: off)", _check_dedup_event_ids)
    state_dtype: str = _setting(
        "float32", "worker: dtype user states are stored in (float32, float16, bfloat16; float16/bfloat16 halve the "
        "state bytes at a small loss; the model computes in its own dtype)", _one_of(*STATE_DTYPES))
    worker_engine: str = _setting(
        "kafka-python", "worker: Kafka client engine, kafka-python or faust (faust-streaming's app on aiokafka); "
        "README \"Stream worker\" compares them", _one_of(*WORKER_ENGINES))
    worker_threads: int = _setting(1, "worker: torch CPU threads (small micro-batch tensors favour 1)", _check_positive)
    session_timeout_ms: int = _setting(
        10_000, "worker: consumer group session timeout; a crashed worker's partitions move after this", _check_positive
    )
    summary_every_s: float = _setting(10.0, "worker: seconds between summary log lines", _check_positive)
    checkpoint_ms: int = _setting(
        1000, "worker: states and offsets to the local store at least this often (a crash re-applies at most "
        "this much of the stream)", _check_positive)
    changelog_ms: int = _setting(
        10_000, "worker: changed states to the changelog, then group offsets, at least this often (another "
        "machine restores from there; each user once per interval)", _check_positive)

    def __post_init__(self) -> None:
        # Every construction path (load, the constructor, replace) is checked the same way, so
        # no Settings object holds a value that load() would have refused.
        for f in fields(self):
            object.__setattr__(self, f.name, _convert(f, getattr(self, f.name), f"setting {f.name}"))
        names = [self.field_user, self.field_item, self.field_ts, self.field_event_id]
        if len(set(names)) < len(names):
            raise SettingsError(f"settings field_user, field_item, field_ts, field_event_id must name four "
                                f"different fields, got {', '.join(names)}")

    # ---------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def docs(cls) -> list[tuple[str, str, Any]]:
        """(name, description, default) for the settings reference."""
        return [(f.name, f.metadata["doc"], f.default) for f in fields(cls)]

    def shown(self) -> list[tuple[str, Any]]:
        """(name, value) of every setting, a secret that is set shown as :data:`MASK`: what may be
        printed or logged."""
        return [(f.name, MASK if f.metadata["secret"] and getattr(self, f.name) else getattr(self, f.name))
                for f in fields(self)]

    def __repr__(self) -> str:  # a Settings in a traceback or a log line never shows a secret
        return f"Settings({', '.join(f'{n}={v!r}' for n, v in self.shown())})"

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> "Settings":
        """Build settings from defaults, then the file, then ``env`` (default ``os.environ``), then overrides."""
        env = os.environ if env is None else env
        values: dict[str, tuple[Any, str]] = {}
        path = config_file or env.get(CONFIG_ENV)
        if path:
            for name, raw in _read_file(Path(path)).items():
                values[name] = (raw, f"{path}: {name}")
        known = set(cls.names())
        for key, raw in env.items():
            if key.startswith(ENV_PREFIX) and key != CONFIG_ENV:
                name = key[len(ENV_PREFIX):].lower()
                if name not in known:
                    raise SettingsError(f"{key}: unknown setting (known: {', '.join(sorted(known))})")
                values[name] = (raw, key)
        for name, raw in (overrides or {}).items():
            if raw is not None:
                values[name] = (raw, f"command-line setting {name}")
        kwargs = {}
        for name, (raw, origin) in values.items():
            if name not in known:
                raise SettingsError(f"{origin}: unknown setting {name!r}")
            kwargs[name] = _convert(cls._field(name), raw, origin)
        return cls(**kwargs)

    @classmethod
    def _field(cls, name: str) -> dataclasses.Field:
        return next(f for f in fields(cls) if f.name == name)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes``, checked like any other settings (SettingsError if wrong)."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise SettingsError(f"unknown setting {unknown[0]!r}")
        return dataclasses.replace(self, **changes)

    # --- derived values -------------------------------------------------------------------
    @property
    def local_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def path(self, p: Path) -> Path:
        return p.expanduser().resolve()


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"settings file {path} cannot be read: {exc}") from None
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise SettingsError(f"settings file {path}: expected flat 'name = value' pairs, found table [{nested[0]}]")
    return data


def _convert(f: dataclasses.Field, raw: Any, origin: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "Path": Path,
                                                    "bool": bool}[f.type]
    try:
        if kind is bool:
            words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            if isinstance(raw, bool):
                value: Any = raw
            elif isinstance(raw, str) and raw.strip().lower() in words:
                value = words[raw.strip().lower()]
            else:
                raise ValueError(f"expected true or false, got {raw!r}")
        elif kind is int:
            if isinstance(raw, bool) or not isinstance(raw, (int, str)):
                raise ValueError(f"expected an integer, got {raw!r}")
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"expected an integer, got {raw!r}") from None
        elif kind is float:
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                raise ValueError(f"expected a number, got {raw!r}")
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"expected a number, got {raw!r}") from None
        elif kind is Path:
            if not isinstance(raw, (str, Path)) or str(raw) == "":
                raise ValueError(f"expected a path, got {raw!r}")
            value = Path(raw)
        else:
            if not isinstance(raw, str):
                raise ValueError(f"expected a string, got {raw!r}")
            value = raw
        check = f.metadata.get("check")
        if check is not None:
            check(value)
    except ValueError as exc:
        raise SettingsError(f"{origin}: {exc}") from None
    return value

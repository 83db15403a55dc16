"""How the project reaches a Kafka cluster: the one place its clients are built.

:class:`KafkaConnection` turns :class:`Settings` (bootstrap servers, TLS, SASL) into the arguments
of each client library the project uses, one adapter per library:

- kafka-python: :meth:`KafkaConnection.producer`, :meth:`~KafkaConnection.consumer` and
  :meth:`~KafkaConnection.admin` build ``KafkaProducer``, ``KafkaConsumer`` and
  ``KafkaAdminClient`` with the security arguments (``security_protocol``, ``sasl_*``,
  ``ssl_*``) added to the caller's options;
- aiokafka under faust-streaming: :meth:`KafkaConnection.faust_app` builds the ``faust.App``
  with ``broker_credentials`` (``faust.SASLCredentials`` / ``faust.SSLCredentials``, which carry
  an ``ssl.SSLContext`` made by :meth:`~KafkaConnection.ssl_context`).

Nothing else in the project constructs a Kafka client (tests/test_connection.py checks the source),
so a setting such as ``security_protocol = "SASL_SSL"`` reaches the worker, the replay, the
archive, the admin work and ``recs tail`` alike. The password is read from
``sasl_password_file`` when ``sasl_password`` is empty; it is held here and never printed
(``repr`` masks it).

A client that the cluster refuses (a wrong password, an untrusted certificate) raises
:class:`~linrec_stream.clients.refusal.KafkaRefusal`, one line naming the cause, rather than the
timeout kafka-python would raise after retrying (linrec_stream/clients/refusal.py).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from linrec_stream.clients.refusal import refusals_seen
from linrec_stream.settings import MASK, Settings, SettingsError

T = TypeVar("T")


@dataclass(frozen=True)
class KafkaConnection:
    """Where the cluster is and how to prove who we are. Build it with :meth:`from_settings`."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_key_password: str = field(default="", repr=False)
    ssl_check_hostname: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaConnection:
        """The connection ``settings`` describe. Raises SettingsError (one line) when SASL is
        asked for without a user name or password, or the password file cannot be read."""
        s = settings
        password = s.sasl_password
        if not password and s.sasl_password_file:
            try:
                lines = Path(s.sasl_password_file).expanduser().read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise SettingsError(f"setting sasl_password_file: cannot read {s.sasl_password_file}: "
                                    f"{exc.strerror if isinstance(exc, OSError) else exc}") from None
            password = lines[0].strip() if lines else ""
        if s.security_protocol.startswith("SASL_"):
            if not s.sasl_username:
                raise SettingsError(f"security_protocol {s.security_protocol} needs sasl_username")
            if not password:
                raise SettingsError(f"security_protocol {s.security_protocol} needs sasl_password or "
                                    f"sasl_password_file")
        if bool(s.ssl_certfile) != bool(s.ssl_keyfile):
            raise SettingsError("mutual TLS needs both ssl_certfile and ssl_keyfile")
        return cls(s.bootstrap_servers, s.security_protocol, s.sasl_mechanism, s.sasl_username, password,
                   s.ssl_cafile, s.ssl_certfile, s.ssl_keyfile, s.ssl_key_password, s.ssl_check_hostname)

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    def describe(self) -> str:
        """One line for logs: where and how, never the password."""
        who = f" as {self.sasl_username} ({self.sasl_mechanism})" if self.uses_sasl else ""
        mtls = " with a client certificate" if self.ssl_certfile else ""
        return f"{self.bootstrap_servers} over {self.security_protocol}{who}{mtls}"

    def __repr__(self) -> str:
        return (f"KafkaConnection({self.describe()}, sasl_password={MASK if self.sasl_password else ''!r})")

    # --- TLS ------------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of this connection (None without TLS): the CA file (or the system's
        CAs), the client certificate for mutual TLS, hostname checking as set."""
        if not self.uses_tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_cafile or None)
        ctx.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, self.ssl_key_password or None)
        return ctx

    # --- kafka-python ---------------------------------------------------------------------------

    def kafka_python_args(self) -> dict[str, Any]:
        """The connection arguments every kafka-python client takes."""
        args: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                                "security_protocol": self.security_protocol}
        if self.uses_tls:
            args["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            args.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password)
        return args

    def producer(self, **options: Any) -> Any:
        """A ``kafka.KafkaProducer`` on this connection; ``options`` are the producer's own."""
        from kafka import KafkaProducer

        return self.built(lambda: KafkaProducer(**self.kafka_python_args(), **options))

    def consumer(self, *topics: str, **options: Any) -> Any:
        """A ``kafka.KafkaConsumer`` on this connection (subscribed to ``topics`` if any)."""
        from kafka import KafkaConsumer

        return self.built(lambda: KafkaConsumer(*topics, **self.kafka_python_args(), **options))

    def admin(self, **options: Any) -> Any:
        """A ``kafka.KafkaAdminClient`` on this connection."""
        from kafka import KafkaAdminClient

        return self.built(lambda: KafkaAdminClient(**self.kafka_python_args(), **options))

    def built(self, make: Callable[[], T]) -> T:
        """``make()`` (a client's construction, which bootstraps), raising KafkaRefusal when it
        fails because the cluster refused us, also where the client itself only says "timeout"."""
        with refusals_seen(self) as seen:
            try:
                return make()
            except Exception as exc:
                seen.raise_if_refused(exc)
                raise

    # --- aiokafka / faust-streaming -------------------------------------------------------------

    def faust_broker_credentials(self) -> Any:
        """faust's ``broker_credentials`` for this connection (None for PLAINTEXT)."""
        import faust

        if self.uses_sasl:
            return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                         mechanism=self.sasl_mechanism, ssl_context=self.ssl_context())
        if self.uses_tls:
            return faust.SSLCredentials(self.ssl_context())
        return None

    def faust_app(self, app_id: str, **options: Any) -> Any:
        """A ``faust.App`` whose consumer and producer (aiokafka) use this connection."""
        import faust

        broker = ";".join(f"kafka://{s.strip()}" for s in self.bootstrap_servers.split(","))
        return faust.App(app_id, broker=broker, broker_credentials=self.faust_broker_credentials(), **options)

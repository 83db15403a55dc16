"""When the cluster refuses us: a wrong password, a missing ACL, an untrusted certificate.

A refusal is a configuration error, not an outage: waiting does not cure it, so the worker must
not ride it out (consumers/outage.py) and the command line reports it as one line naming the
cause. :func:`refusal` turns such an exception (kafka-python's, aiokafka's, or ``ssl``'s, also
when wrapped by ``raise ... from``) into that line; :class:`KafkaRefusal` carries it.

kafka-python 3.0 and aiokafka hide the cause of a failed bootstrap: they log each failed attempt
and, in the end, raise only a timeout (``Unable to bootstrap from ...``), which reads like an
outage. :func:`refusals_seen` therefore listens to those log records while a client is built
(``KafkaConnection`` does so for every client) so that the refusal behind the timeout is raised
instead.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Protocol


class Claims(Protocol):
    """What a line reads of the connection: who we claimed to be, what we trusted (a
    ``KafkaConnection``; connection.py imports this module, so it is not imported here)."""

    security_protocol: str
    sasl_mechanism: str
    sasl_username: str
    ssl_cafile: str
    ssl_certfile: str

    @property
    def uses_sasl(self) -> bool: ...


class KafkaRefusal(RuntimeError):
    """The cluster refused this client (its message is the one line saying why): fix the
    settings or the broker's ACLs; retrying will not help."""

    retriable = False  # read by consumers/outage.py like kafka-python's own flag


# Class names, as kafka-python and aiokafka have distinct classes for the same broker answers.
_AUTHENTICATION = {"SaslAuthenticationFailedError", "AuthenticationFailedError", "SaslAuthenticationFailed"}
_AUTHORIZATION = {
    "TopicAuthorizationFailedError": "topic",
    "GroupAuthorizationFailedError": "consumer group",
    "TransactionalIdAuthorizationFailedError": "transactional id",
}
# OpenSSL reasons of a handshake with a listener that does not speak TLS (a Kafka plaintext
# listener reads the ClientHello as a request size and closes the connection).
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"}
# ... and those of a broker refusing (or missing) our client certificate under mutual TLS.
_CLIENT_CERT = {"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                "TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_HANDSHAKE_FAILURE"}
_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH (OpenSSL's verify code)


def refusal(exc: BaseException | None, connection: Claims | None = None, *,
            handshake: bool = False) -> str | None:
    """One line naming why the cluster refused us, or None if ``exc`` (or what it wraps, by
    ``raise ... from`` or as the error being handled; not past ``from None``, whose error says
    all itself) is not a refusal. ``connection`` adds who we claimed to be and which CA file we
    trusted.

    An ``ssl`` error other than a certificate check is only a refusal during a TLS handshake
    (``handshake``, or kafka-python's ``Handshake failed`` wrapper in the chain): on an
    established connection an EOF is a broker going away, i.e. an outage."""
    seen = 0
    while exc is not None and seen < 8:
        handshake = handshake or "Handshake failed" in str(exc)
        line = _classify(exc, connection, handshake)
        if line is not None:
            return line
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
        seen += 1
    return None


def _classify(exc: BaseException, c: Claims | None, handshake: bool) -> str | None:
    name = type(exc).__name__
    sasl = c is not None and c.uses_sasl
    who = f" for user {c.sasl_username} ({c.sasl_mechanism})" if sasl else ""
    as_user = f" (user {c.sasl_username})" if sasl else ""
    protocol = f"security_protocol {c.security_protocol}" if c is not None else "the security_protocol"
    if isinstance(exc, KafkaRefusal):
        return str(exc)
    if name in _AUTHENTICATION:
        return f"authentication failed{who}: wrong user name or password"
    if name == "UnsupportedSaslMechanismError":
        mechanism = c.sasl_mechanism if c is not None else "asked for"
        return f"the broker does not enable SASL mechanism {mechanism} (setting sasl_mechanism): {_text(exc)}"
    if name == "IllegalSaslStateError":
        return (f"the broker's listener does not take SASL: {protocol} against a listener without it "
                "(use its SASL port, or SSL/PLAINTEXT)")
    if name in _AUTHORIZATION:
        names = _names(exc)
        return f"not authorized for {_AUTHORIZATION[name]}{' ' + names if names else ''}{as_user}"
    if name == "ClusterAuthorizationFailedError":
        return f"not authorized for cluster operations (creating topics, idempotent writes){as_user}: {_text(exc)}"
    if name.endswith("AuthorizationFailedError"):
        return f"not authorized{as_user}: {_text(exc)}"
    if name == "InvalidReceiveError" and _tls_record_as_length(exc):
        return (f"the broker's listener speaks TLS, {protocol} does not: use SSL or SASL_SSL "
                "(setting security_protocol)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        if exc.verify_code == _HOSTNAME_MISMATCH:
            return (f"TLS: the broker's certificate does not name the host it was reached at ({reason}); use "
                    "that name in bootstrap_servers, or set ssl_check_hostname=false")
        trusted = f"ssl_cafile {c.ssl_cafile}" if c is not None and c.ssl_cafile else \
            "the system's CA certificates (set ssl_cafile)"
        return f"TLS: the broker's certificate is not trusted by {trusted} ({reason})"
    if isinstance(exc, ssl.SSLError) and handshake:
        reason = exc.reason or str(exc)
        if reason in _NOT_TLS:
            return (f"TLS: the handshake with the broker failed ({reason}): is that listener plaintext? "
                    f"{protocol} needs a TLS listener")
        if reason in _CLIENT_CERT:
            cert = f"ssl_certfile {c.ssl_certfile}" if c is not None and c.ssl_certfile else \
                "no client certificate (set ssl_certfile and ssl_keyfile)"
            return f"TLS: the broker refused the client certificate ({reason}): {cert}"
        return f"TLS: the handshake with the broker failed ({reason})"
    return None


def _tls_record_as_length(exc: BaseException) -> bool:
    """A plaintext client reads a TLS listener's answer (an alert, 0x15, or a handshake, 0x16,
    then version 0x03 ...) as the 4-byte size of a Kafka response: ``Invalid frame length:
    352518912`` is 0x15030300."""
    digits = str(exc).rsplit(":", 1)[-1].strip()
    return digits.isdigit() and int(digits) >> 16 in (0x1503, 0x1603)


def _names(exc: BaseException) -> str:
    """The topics or groups an authorization error names (a set, a list or one string)."""
    arg = exc.args[0] if exc.args else None
    if isinstance(arg, (set, frozenset, list, tuple)):
        return ", ".join(sorted(str(a) for a in arg))
    return str(arg) if arg else ""


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# --- what the clients log while they bootstrap ---------------------------------------------------

#: The loggers on which kafka-python (each failed bootstrap attempt) and aiokafka ("Unable
#: connect to ...") report the error they then hide behind a timeout.
_TAPPED = ("kafka.net.manager", "aiokafka")  # aiokafka/client.py logs on "aiokafka" itself

_lock = threading.Lock()
_open: list[RefusalWitness] = []
_untap: list[Callable[[], None]] = []


class RefusalWitness:
    """What :func:`refusals_seen` heard: the last refusal the clients logged, as a line."""

    def __init__(self, connection: Claims | None) -> None:
        self.connection = connection
        self.line: str | None = None

    def note(self, exc: BaseException) -> None:
        # Logged errors are those of connection attempts: an SSL error there is a handshake's.
        line = refusal(exc, self.connection, handshake=True)
        if line is not None:
            self.line = line

    def raise_if_refused(self, exc: BaseException) -> None:
        """Raise :class:`KafkaRefusal` (from ``exc``) if ``exc``, or what the clients logged
        before it, is a refusal; return otherwise (the caller re-raises ``exc``)."""
        line = refusal(exc, self.connection) or self.line
        if line is not None:
            raise KafkaRefusal(line) from exc


class _Tap(logging.Filter):
    def __init__(self, shown_from: int) -> None:
        super().__init__()
        self.shown_from = shown_from

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        for witness in list(_open):
            for arg in args:
                if isinstance(arg, BaseException):
                    witness.note(arg)
        # The level may have been lowered for the tap: what was hidden before stays hidden.
        return record.levelno >= self.shown_from


@contextmanager
def refusals_seen(connection: Claims | None = None) -> Iterator[RefusalWitness]:
    """Listen, while the block runs, to the errors the Kafka clients log when a connection
    attempt fails; the witness says whether one was a refusal (``raise_if_refused``).

    The tapped loggers are set to WARNING meanwhile if they were quieter (a command may silence
    ``kafka``); records below their former level are still dropped, so nothing more is printed."""
    witness = RefusalWitness(connection)
    with _lock:
        if not _open:
            for name in _TAPPED:
                _untap.append(_tap(logging.getLogger(name)))
        _open.append(witness)
    try:
        yield witness
    finally:
        with _lock:
            _open.remove(witness)
            if not _open:
                while _untap:
                    _untap.pop()()


def _tap(logger: logging.Logger) -> Callable[[], None]:
    tap, level = _Tap(logger.getEffectiveLevel()), logger.level
    logger.addFilter(tap)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)

    def untap() -> None:
        logger.removeFilter(tap)
        logger.setLevel(level)

    return untap

"""Every Kafka client through one adapter (linrec_stream/clients/connection.py), its settings,
secrets kept out of output, and refusals (linrec_stream/clients/refusal.py) told from outages.

No broker needed: the two end-to-end refusals run against throwaway local servers (one that
closes the connection like a plaintext listener, one speaking TLS with a self-signed certificate).
"""

from __future__ import annotations

import ast
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import errors as kerr

from consumers.outage import OutageGuard, is_transient
from linrec_stream.cli import main
from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.clients.refusal import KafkaRefusal, refusal, refusals_seen
from linrec_stream.settings import MASK, Settings, SettingsError

from tests.conftest import REPO, run_cli

SECRET = "s3cr3t-Pa55word"


def sasl(**env: str) -> Settings:
    return Settings.load(env={"LINREC_SECURITY_PROTOCOL": "SASL_SSL", "LINREC_SASL_USERNAME": "bob", **env})


# --- (a) no client is built anywhere else ---------------------------------------------------------

#: The client classes only connection.py may construct (kafka-python's, aiokafka's).
CLIENTS = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient", "AIOKafkaProducer", "AIOKafkaConsumer"}
SCANNED = ("linrec_stream", "consumers", "state", "benchmarks")
ADAPTER = Path("linrec_stream/clients/connection.py")


def client_constructions(source: str) -> list[int]:
    """Lines of ``source`` that construct a Kafka client or a faust App, however imported
    (``kafka.KafkaProducer(...)``, ``from kafka import KafkaProducer as P; P(...)``, ``faust.App(...)``)."""
    tree = ast.parse(source)
    names = set(CLIENTS)  # local names bound to a client class
    faust_modules, apps = {"faust"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in CLIENTS:
                    names.add(alias.asname or alias.name)
                if node.module == "faust" and alias.name == "App":
                    apps.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            faust_modules |= {a.asname for a in node.names if a.name == "faust" and a.asname}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and (f.id in names or f.id in apps):
            lines.append(node.lineno)
        elif isinstance(f, ast.Attribute) and (f.attr in CLIENTS or (
                f.attr == "App" and isinstance(f.value, ast.Name) and f.value.id in faust_modules)):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_kafka_client_is_constructed_outside_the_adapter():
    offending = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel == ADAPTER or ".venv" in rel.parts:
                continue
            offending += [f"{rel}:{line}" for line in client_constructions(path.read_text())]
    assert offending == [], "build Kafka clients with KafkaConnection (linrec_stream/clients/connection.py)"


def test_the_source_scan_finds_every_spelling():
    source = '''
import faust
import faust as fs
import kafka
from kafka import KafkaProducer as P, KafkaConsumer
from faust import App
from aiokafka import AIOKafkaConsumer

P(bootstrap_servers="x")
KafkaConsumer("t")
kafka.KafkaAdminClient()
faust.App("id")
fs.App("id")
App("id")
AIOKafkaConsumer("t")
connection.producer()  # fine
'''
    assert client_constructions(source) == [9, 10, 11, 12, 13, 14, 15]
    # ... and the adapter itself is what it would find, were it not exempt.
    assert client_constructions((REPO / ADAPTER).read_text())


# --- (b) from_settings ----------------------------------------------------------------------------

def test_password_file_is_read_and_sasl_password_wins(tmp_path: Path):
    f = tmp_path / "pw"
    f.write_text(f"{SECRET}  \nsecond line ignored\n")
    assert KafkaConnection.from_settings(sasl(LINREC_SASL_PASSWORD_FILE=str(f))).sasl_password == SECRET
    both = sasl(LINREC_SASL_PASSWORD_FILE=str(f), LINREC_SASL_PASSWORD="given")
    assert KafkaConnection.from_settings(both).sasl_password == "given"


@pytest.mark.parametrize("env, match", [
    ({"LINREC_SASL_PASSWORD": SECRET, "LINREC_SASL_USERNAME": ""}, "needs sasl_username"),
    ({}, "needs sasl_password or sasl_password_file"),
])
def test_sasl_without_user_or_password_is_one_line(env: dict, match: str):
    with pytest.raises(SettingsError, match=match) as info:
        KafkaConnection.from_settings(sasl(**env))
    assert "\n" not in str(info.value) and SECRET not in str(info.value)


def test_an_empty_password_file_is_no_password(tmp_path: Path):
    (tmp_path / "pw").write_text("")
    with pytest.raises(SettingsError, match="needs sasl_password"):
        KafkaConnection.from_settings(sasl(LINREC_SASL_PASSWORD_FILE=str(tmp_path / "pw")))


def test_client_certificate_without_its_key_is_refused(tmp_path: Path):
    (tmp_path / "cert.pem").write_text("x")
    s = Settings.load(env={"LINREC_SECURITY_PROTOCOL": "SSL", "LINREC_SSL_CERTFILE": str(tmp_path / "cert.pem")})
    with pytest.raises(SettingsError, match="both ssl_certfile and ssl_keyfile"):
        KafkaConnection.from_settings(s)


# --- (c) the arguments of each protocol ------------------------------------------------------------

@pytest.mark.parametrize("protocol, tls, has_sasl", [
    ("PLAINTEXT", False, False), ("SSL", True, False), ("SASL_PLAINTEXT", False, True), ("SASL_SSL", True, True)])
def test_kafka_python_args_of_each_protocol(protocol: str, tls: bool, has_sasl: bool):
    s = Settings.load(env={"LINREC_SECURITY_PROTOCOL": protocol, "LINREC_SASL_USERNAME": "bob",
                           "LINREC_SASL_PASSWORD": SECRET, "LINREC_SSL_CHECK_HOSTNAME": "false",
                           "LINREC_BOOTSTRAP_SERVERS": "a:9093,b:9093"})
    args = KafkaConnection.from_settings(s).kafka_python_args()
    assert args["bootstrap_servers"] == "a:9093,b:9093" and args["security_protocol"] == protocol
    assert ("ssl_context" in args) == tls
    if tls:
        assert isinstance(args["ssl_context"], ssl.SSLContext) and not args["ssl_context"].check_hostname
        assert args["ssl_context"].verify_mode == ssl.CERT_REQUIRED  # unchecked names, never unchecked CAs
    if has_sasl:
        assert (args["sasl_mechanism"], args["sasl_plain_username"], args["sasl_plain_password"]) == \
            ("SCRAM-SHA-512", "bob", SECRET)
    else:
        assert not any(k.startswith("sasl") for k in args)
    if protocol == "PLAINTEXT":  # exactly what the clients were given before the adapter
        assert set(args) == {"bootstrap_servers", "security_protocol"}


def test_faust_credentials_of_each_protocol():
    import faust

    def creds(protocol: str):
        return KafkaConnection.from_settings(Settings.load(env={
            "LINREC_SECURITY_PROTOCOL": protocol, "LINREC_SASL_USERNAME": "bob",
            "LINREC_SASL_PASSWORD": SECRET})).faust_broker_credentials()

    assert creds("PLAINTEXT") is None
    assert isinstance(creds("SSL"), faust.SSLCredentials)
    assert isinstance(creds("SASL_SSL"), faust.SASLCredentials)


# --- (d) secrets never printed ----------------------------------------------------------------------

def test_settings_command_masks_the_password():
    out = run_cli("settings", env={"LINREC_SASL_PASSWORD": SECRET, "LINREC_SSL_KEY_PASSWORD": SECRET}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr
    assert f"sasl_password = {MASK}" in out.stdout and f"ssl_key_password = {MASK}" in out.stdout
    assert "sasl_password_file = \n" in out.stdout  # unset: nothing to mask


def test_reprs_and_describe_never_show_the_password():
    s = sasl(LINREC_SASL_PASSWORD=SECRET)
    c = KafkaConnection.from_settings(s)
    for text in (repr(s), repr(c), str(c), c.describe()):
        assert SECRET not in text
    assert MASK in repr(s) and MASK in repr(c)
    assert c.describe() == "127.0.0.1:9092 over SASL_SSL as bob (SCRAM-SHA-512)"


# --- refusals ----------------------------------------------------------------------------------------

def _raised_in(wrapper: BaseException, inner: BaseException) -> BaseException:
    """``wrapper`` raised while ``inner`` was being handled (as kafka-python wraps a handshake)."""
    try:
        try:
            raise inner
        except BaseException:
            raise wrapper
    except BaseException as exc:
        return exc


def _ssl_error(reason: str, cls: type[ssl.SSLError] = ssl.SSLError) -> ssl.SSLError:
    e = cls(1, f"[SSL: {reason}] ...")
    e.reason = reason
    return e


def _untrusted(code: int = 19, message: str = "self-signed certificate in certificate chain"):
    e = _ssl_error("CERTIFICATE_VERIFY_FAILED", ssl.SSLCertVerificationError)
    e.verify_code, e.verify_message = code, message
    return e


def test_refusals_are_named_in_one_line(tmp_path: Path):
    (tmp_path / "ca.pem").write_text("x")
    c = KafkaConnection.from_settings(sasl(LINREC_SASL_PASSWORD=SECRET, LINREC_SSL_CAFILE=str(tmp_path / "ca.pem")))

    def handshake() -> BaseException:  # kafka-python's wrapper of an SSL error
        return kerr.KafkaConnectionError("Handshake failed: ...")

    cases = [  # (error, what its line says); kafka-python's errors are unhashable, so no dict
        (kerr.SaslAuthenticationFailedError("Authentication failed due to invalid credentials"),
         "authentication failed for user bob (SCRAM-SHA-512): wrong user name or password"),
        (kerr.TopicAuthorizationFailedError({"interactions"}), "not authorized for topic interactions (user bob)"),
        (kerr.GroupAuthorizationFailedError("linrec-workers"), "not authorized for consumer group linrec-workers"),
        (kerr.ClusterAuthorizationFailedError("x"), "not authorized for cluster operations"),
        (kerr.TransactionalIdAuthorizationFailedError(), "not authorized for transactional id"),
        (kerr.IllegalSaslStateError(), "listener does not take SASL"),
        (kerr.UnsupportedSaslMechanismError("enabled: PLAIN"), "does not enable SASL mechanism SCRAM-SHA-512"),
        (_untrusted(), f"TLS: the broker's certificate is not trusted by ssl_cafile {tmp_path / 'ca.pem'} "
                       "(self-signed certificate in certificate chain)"),
        (_untrusted(62, "Hostname mismatch"), "does not name the host it was reached at (Hostname mismatch)"),
        (_raised_in(handshake(), _ssl_error("WRONG_VERSION_NUMBER")),
         "is that listener plaintext? security_protocol SASL_SSL needs a TLS listener"),
        (_raised_in(handshake(), _ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED")),
         "TLS: the broker refused the client certificate (TLSV13_ALERT_CERTIFICATE_REQUIRED): no client certificate"),
        # wrapped by our own errors
        (_raised_in(RuntimeError("faust app stopped"), kerr.SaslAuthenticationFailedError()), "authentication failed"),
        (KafkaRefusal("already a line"), "already a line"),
    ]
    for exc, expected in cases:
        line = refusal(exc, c)
        assert line is not None and expected in line, (exc, line)
        assert "\n" not in line and SECRET not in line
        assert not is_transient(exc), exc
    assert refusal(kerr.SaslAuthenticationFailedError()) == "authentication failed: wrong user name or password"
    assert "system's CA certificates (set ssl_cafile)" in refusal(_untrusted())


def test_outages_are_not_refusals():
    outages = [kerr.KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:9092"), kerr.NodeNotReadyError(1),
               kerr.KafkaConnectionError("socket disconnected"), ConnectionRefusedError(111, "refused"),
               # an EOF on an established TLS connection is a broker going away, not a refusal
               _ssl_error("UNEXPECTED_EOF_WHILE_READING", ssl.SSLEOFError)]
    for exc in outages:
        assert refusal(exc) is None, exc
    assert all(is_transient(e) for e in outages[:4])
    # `raise ... from None` replaces the error: its message says it all, it is not classified
    try:
        try:
            raise kerr.SaslAuthenticationFailedError()
        except kerr.KafkaError:
            raise ValueError("announcing failed (SaslAuthenticationFailedError)") from None
    except ValueError as exc:
        assert refusal(exc) is None


def test_a_refused_delivery_is_not_waited_out():
    from consumers.kafka_transport import DeliveryError

    def refused():
        raise DeliveryError("1 send(s) not acknowledged") from kerr.TopicAuthorizationFailedError("recommendations")

    class Metrics:
        def observe_outage(self, down: bool, seconds: float) -> None:
            raise AssertionError("a refusal is no outage")

    with pytest.raises(DeliveryError):
        OutageGuard(Metrics(), sleep=lambda s: None).run(refused, "sending a batch")


def test_the_witness_hears_what_kafka_python_logs_and_keeps_it_quiet():
    kafka_log, manager = logging.getLogger("kafka"), logging.getLogger("kafka.net.manager")
    heard: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = heard.append  # type: ignore[method-assign]
    kafka_log.addHandler(handler)
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # as `retrain` silences it
    try:
        with refusals_seen() as seen:
            manager.warning("Bootstrap connection to %s failed: %s (backoff %.2f secs)", "bootstrap-0",
                            kerr.SaslAuthenticationFailedError("invalid credentials"), 0.1)
        assert seen.line == "authentication failed: wrong user name or password"
        assert heard == []  # silenced before, silenced still
        assert manager.level == logging.NOTSET and manager.filters == []  # untapped
    finally:
        kafka_log.removeHandler(handler)
        kafka_log.setLevel(level)


def test_a_timeout_behind_which_a_refusal_was_logged_raises_the_refusal():
    c = KafkaConnection.from_settings(sasl(LINREC_SASL_PASSWORD=SECRET))

    def refused_bootstrap():
        logging.getLogger("kafka.net.manager").warning("Bootstrap connection to %s failed: %s", "bootstrap-0",
                                                       kerr.SaslAuthenticationFailedError("invalid"))
        raise kerr.KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:9092")

    def down():
        raise kerr.KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:9092")

    with pytest.raises(KafkaRefusal, match=r"^authentication failed for user bob \(SCRAM-SHA-512\)"):
        c.built(refused_bootstrap)
    with pytest.raises(kerr.KafkaTimeoutError):  # an outage stays an outage
        c.built(down)


def test_the_command_line_prints_a_refusal_as_one_line(monkeypatch, capsys):
    import linrec_stream.broker.topics as topics

    def refused(settings, timeout_s=30.0):
        raise RuntimeError("wrapped") from kerr.TopicAuthorizationFailedError({"interactions"})

    monkeypatch.setattr(topics, "create_topics", refused)
    assert main(["topics", "create"]) == 1
    err = capsys.readouterr().err
    assert err == "linrec-stream: error: not authorized for topic interactions\n"


# --- end to end, against throwaway local servers -----------------------------------------------------

def _serve(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback port whose every accepted connection goes to ``handle``, until the test ends."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                try:
                    handle(conn)
                except OSError:  # ssl.SSLError too: the client refusing our certificate is the point
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


@pytest.fixture
def closing_server() -> Iterator[int]:
    """A port that accepts, reads a little and closes, as a Kafka plaintext listener does with a
    TLS ClientHello."""
    def read_and_close(conn: socket.socket) -> None:
        conn.settimeout(1)
        conn.recv(1024)

    yield from _serve(read_and_close)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[int]:
    """A TLS port whose certificate is signed by a CA of its own (that the client does not trust)."""
    from linrec_stream.broker.secure import ensure_tls

    ensure_tls(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "broker.pem")

    def handshake(conn: socket.socket) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1024)

    yield from _serve(handshake)


def _tls_connection(port: int) -> KafkaConnection:
    return KafkaConnection.from_settings(Settings.load(env={
        "LINREC_SECURITY_PROTOCOL": "SSL", "LINREC_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}))


def test_tls_against_a_plaintext_listener_is_a_refusal(closing_server: int):
    with pytest.raises(KafkaRefusal, match="is that listener plaintext"):
        _tls_connection(closing_server).consumer(bootstrap_timeout_ms=1500)


def test_an_untrusted_broker_certificate_is_a_refusal(tls_server: int):
    with pytest.raises(KafkaRefusal, match="certificate is not trusted by the system's CA certificates"):
        _tls_connection(tls_server).admin(bootstrap_timeout_ms=1500)

"""The secure variant of the local broker (``linrec-stream kafka start --secure``).

What it adds to the plaintext broker of :mod:`broker`:

- **TLS**: a CA and a broker certificate (``subjectAltName`` ``IP:127.0.0.1`` and
  ``DNS:localhost``, so clients check the host name) made with ``openssl`` on first use under
  ``<runtime_dir>/kafka/tls/``. The CA's key is deleted once it has signed: nobody can mint a
  second certificate the clients would trust. Kafka reads the PEM files directly
  (``ssl.keystore.type=PEM``).
- **Users**: ``admin`` (the super user: the broker itself and the CLI's admin work), ``linrec``
  (the components) and ``reader`` (may only consume the recommendations topic), each with a
  random password generated on first use into ``<runtime_dir>/kafka/secrets/`` (mode 0600) and
  never printed. Their SCRAM-SHA-512 credentials go into the metadata log when the storage is
  formatted (KIP-900), so they exist before the broker takes its first request.
- **Listeners**: the client listener on ``kafka_port`` is SASL_SSL with SCRAM-SHA-512, and the
  broker reaches itself over it as ``admin``. The KRaft controller listener is SASL_SSL too,
  with PLAIN and a static JAAS user ``admin`` (SCRAM cannot authenticate on a controller
  listener: its credentials live in the metadata the controller serves). A PLAINTEXT controller
  listener would make the broker reach the controller as ``User:ANONYMOUS``, which would then
  have to be a super user: anyone able to reach the controller port could administer the cluster.
- **ACLs**: the KRaft ``StandardAuthorizer`` with ``allow.everyone.if.no.acl.found=false``; the
  ACLs of :func:`acls` are created with the admin user's client after every start (creating an
  existing ACL is a no-op, so this is idempotent).
- **Client settings**: ``client-secure.toml`` (``linrec``), ``client-secure-admin.toml`` and
  ``client-secure-reader.toml`` beside the broker's files, for ``--config``.

A marker file records that a data directory was formatted secure: its SCRAM users exist only
then, so a data directory is started in the mode it was formatted in.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linrec_stream.broker.errors import KafkaSetupError
from linrec_stream.contracts.topics import QUICKSTART_PREFIX, ROUNDTRIP_PREFIX
from linrec_stream.settings import Settings

MECHANISM = "SCRAM-SHA-512"
ADMIN, COMPONENTS, READER = "admin", "linrec", "reader"
USERS = (ADMIN, COMPONENTS, READER)
#: The JAAS login modules of the two SASL mechanisms the broker uses.
_SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
_PLAIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"


@dataclass(frozen=True)
class SecurePaths:
    """Where the secure broker keeps its certificates, passwords and client settings."""

    root: Path  # <runtime_dir>/kafka, the broker's own directory

    @property
    def marker(self) -> Path:
        return self.root / "secure"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def ca_cert(self) -> Path:
        return self.tls / "ca.pem"

    @property
    def broker_pem(self) -> Path:
        """The broker's private key followed by its certificate: Kafka's PEM key store."""
        return self.tls / "broker.pem"

    def password_file(self, user: str) -> Path:
        return self.secrets / f"{user}.password"

    def client_config(self, user: str) -> Path:
        """The ``--config`` file of ``user``; the components' is plain ``client-secure.toml``."""
        return self.root / ("client-secure.toml" if user == COMPONENTS else f"client-secure-{user}.toml")


# --- first use: certificates and passwords ---------------------------------------------------
def ensure_tls(tls_dir: Path, common_name: str = "linrec-stream local CA") -> None:
    """A CA certificate ``ca.pem`` and a broker key store ``broker.pem`` signed by it, in
    ``tls_dir``, made now unless both exist. Raises KafkaSetupError (one line) if openssl fails."""
    ca_cert, broker_pem = tls_dir / "ca.pem", tls_dir / "broker.pem"
    if ca_cert.exists() and broker_pem.exists():
        return
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    with tempfile.TemporaryDirectory(dir=tls_dir) as tmp:
        work = Path(tmp)
        ext = work / "broker.ext"
        # What a strict verifier asks of a server certificate: the names it serves, not a CA,
        # key usages, and the key identifiers that chain it to its CA.
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
                       "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
        # P-256 keys: made in milliseconds (RSA takes a noticeable share of a first start), and
        # Kafka's PEM key store and Python's ssl take them.
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        _openssl(["req", "-x509", *key, "-keyout", str(work / "ca.key"), "-out", str(work / "ca.pem"),
                  "-days", "3650", "-subj", f"/CN={common_name}",
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                  "-addext", "subjectKeyIdentifier=hash"])
        _openssl(["req", "-new", *key, "-keyout", str(work / "broker.key"), "-out", str(work / "broker.csr"),
                  "-subj", "/CN=localhost"])
        _openssl(["x509", "-req", "-in", str(work / "broker.csr"), "-CA", str(work / "ca.pem"),
                  "-CAkey", str(work / "ca.key"), "-set_serial", f"0x{secrets.token_hex(16)}",
                  "-days", "825", "-extfile", str(ext), "-out", str(work / "broker.crt")])
        write_private(work / "broker.pem", (work / "broker.key").read_text() + (work / "broker.crt").read_text())
        (work / "broker.pem").replace(broker_pem)
        (work / "ca.pem").replace(ca_cert)  # last: its presence means the pair is complete
        # ca.key goes with the temporary directory.


def _openssl(args: list[str]) -> None:
    try:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise KafkaSetupError("openssl not found on PATH: the secure broker makes its TLS certificates "
                              "with it (e.g. apt-get install openssl)") from None
    if proc.returncode != 0:
        raise KafkaSetupError(f"openssl {args[0]} failed (exit {proc.returncode}) making the broker's TLS files",
                              detail=proc.stderr.strip())


def ensure_passwords(paths: SecurePaths) -> dict[str, str]:
    """Each user's password, drawn now for a user that has none yet (files mode 0600)."""
    paths.secrets.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.secrets, 0o700)
    out = {}
    for user in USERS:
        f = paths.password_file(user)
        if not f.exists():
            # URL-safe characters only: the password is quoted inside a JAAS line and a
            # --add-scram argument, where a quote or a bracket would end it.
            write_private(f, secrets.token_urlsafe(24) + "\n")
        out[user] = f.read_text().splitlines()[0].strip()
    return out


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file that only its owner may read (mode 0600 from creation on,
    never readable by others even for a moment)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


# --- the broker's configuration -------------------------------------------------------------
def broker_properties(template: str, paths: SecurePaths, passwords: dict[str, str]) -> str:
    """The secure overlay (``secure.properties``) with its placeholders filled; it holds the
    admin password, so it goes into a file of mode 0600."""
    admin = passwords[ADMIN]
    return (template
            .replace("@TLS_KEYSTORE@", str(paths.broker_pem))
            .replace("@TLS_TRUSTSTORE@", str(paths.ca_cert))
            .replace("@INTER_BROKER_JAAS@", f'{_SCRAM_MODULE} required username="{ADMIN}" password="{admin}";')
            # The controller listener's JAAS line is both sides: the broker logs in with
            # username/password, the controller accepts the user_<name> entries.
            .replace("@CONTROLLER_JAAS@", f'{_PLAIN_MODULE} required username="{ADMIN}" password="{admin}" '
                                          f'user_{ADMIN}="{admin}";'))


def scram_format_args(passwords: dict[str, str]) -> list[str]:
    """The storage tool's ``--add-scram`` arguments creating every user (KIP-900)."""
    out = []
    for user in USERS:
        out += ["--add-scram", f"{MECHANISM}=[name={user},password={passwords[user]}]"]
    return out


def merge_properties(base: str, overlay: str) -> str:
    """``base`` without the keys ``overlay`` sets, then ``overlay``: one value per key, so the
    file says what the broker runs with (a Java properties file would let a later line win
    silently)."""
    def key(line: str) -> str | None:
        s = line.strip()
        return None if not s or s.startswith("#") else s.split("=", 1)[0].strip()

    replaced = {key(line) for line in overlay.splitlines()} - {None}
    kept = [line for line in base.splitlines() if key(line) not in replaced]
    return "\n".join(kept).rstrip() + "\n\n" + overlay


# --- clients --------------------------------------------------------------------------------
def client_settings(settings: Settings, paths: SecurePaths, user: str) -> dict[str, Any]:
    """The settings a client of the local secure broker needs, as ``user``."""
    return {
        "bootstrap_servers": settings.local_bootstrap,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": MECHANISM,
        "sasl_username": user,
        "sasl_password_file": str(paths.password_file(user)),
        "ssl_cafile": str(paths.ca_cert),
        # The local broker these settings reach, so that `kafka status|stop` and the quick start
        # given this file find it.
        "kafka_port": settings.kafka_port,
        "kafka_controller_port": settings.kafka_controller_port,
        "runtime_dir": str(settings.path(settings.runtime_dir)),
    }


def as_settings(settings: Settings, paths: SecurePaths, user: str) -> Settings:
    """``settings`` as a client of the local secure broker logged in as ``user``."""
    return settings.replace(sasl_password="", **client_settings(settings, paths, user))


def write_client_configs(settings: Settings, paths: SecurePaths) -> Path:
    """Write the ``--config`` file of each user; returns the components' (``client-secure.toml``).
    The files name the password files, never a password."""
    for user in USERS:
        lines = [f"# linrec-stream settings for the local secure broker as user {user!r}",
                 "# (written by `linrec-stream kafka start --secure`; use with --config)"]
        # JSON strings are TOML basic strings (the same escapes), and numbers are numbers.
        lines += [f"{name} = {json.dumps(value)}" for name, value in client_settings(settings, paths, user).items()]
        paths.client_config(user).write_text("\n".join(lines) + "\n")
    return paths.client_config(COMPONENTS)


# --- ACLs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grant:
    """``operations`` for ``user`` on the resources of one type whose name is (or, prefixed,
    begins with) ``name``."""

    user: str
    resource: str  # "topic" or "group"
    name: str
    prefixed: bool
    operations: tuple[str, ...]


#: What a component does to its topics: create them (topics create, the worker's changelog),
#: read their metadata and configs (the changelog's cleanup policy is checked), read and write.
_TOPIC_OPS = ("CREATE", "DESCRIBE", "DESCRIBE_CONFIGS", "READ", "WRITE")
#: A consumer group: join it and commit (Read), look up its offsets (Describe).
_GROUP_OPS = ("READ", "DESCRIBE")


def grants(settings: Settings) -> list[Grant]:
    """Every right the ACLs give, for the topics and group that ``settings`` name. ``admin`` is
    a super user and needs none."""
    s = settings
    out = [Grant(COMPONENTS, "topic", t, False, _TOPIC_OPS)
           for t in (s.topic_interactions, s.topic_recommendations, s.topic_dead_letter, s.topic_model_updates)]
    # The worker grows the changelog's partitions to the interactions' count (create_partitions).
    out.append(Grant(COMPONENTS, "topic", s.topic_state_changelog, False, _TOPIC_OPS + ("ALTER",)))
    out.append(Grant(COMPONENTS, "group", s.worker_group, True, _GROUP_OPS))
    # The quick start and `kafka check` make and remove their own topics: Delete too.
    for prefix in (QUICKSTART_PREFIX, ROUNDTRIP_PREFIX):
        out.append(Grant(COMPONENTS, "topic", prefix, True, _TOPIC_OPS + ("DELETE",)))
        out.append(Grant(COMPONENTS, "group", prefix, True, _GROUP_OPS))
    # recs tail reads outside any group: the topic is all the reader needs.
    out.append(Grant(READER, "topic", s.topic_recommendations, False, ("READ", "DESCRIBE")))
    return out


def acls(settings: Settings) -> list[Any]:
    """The kafka-python ``ACL`` objects of :func:`grants` (allow, from any host)."""
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, \
        ResourceType

    out = []
    for g in grants(settings):
        pattern = ResourcePattern(ResourceType.TOPIC if g.resource == "topic" else ResourceType.GROUP, g.name,
                                  ACLResourcePatternType.PREFIXED if g.prefixed else ACLResourcePatternType.LITERAL)
        out += [ACL(f"User:{g.user}", "*", ACLOperation[op], ACLPermissionType.ALLOW, pattern)
                for op in g.operations]
    return out


def apply_acls(admin_settings: Settings, settings: Settings) -> int:
    """Create the ACLs of :func:`acls` with the admin user's client; returns how many. Raises
    KafkaSetupError (one line) if the broker refuses one."""
    from linrec_stream.clients.connection import KafkaConnection

    from linrec_stream.clients.refusal import KafkaRefusal, refusal

    wanted = acls(settings)
    connection = KafkaConnection.from_settings(admin_settings)
    admin = connection.admin(request_timeout_ms=30_000)
    try:
        result = admin.create_acls(wanted)
    finally:
        admin.close()
    if result["failed"]:
        error = result["failed"][0]
        error = error() if isinstance(error, type) else error  # kafka-python lists the error classes
        line = refusal(error, connection)
        if line is not None:  # not the admin user: one line saying who was refused
            raise KafkaRefusal(f"creating {len(wanted)} ACLs: {line}")
        raise KafkaSetupError(f"the broker refused {len(result['failed'])} of {len(wanted)} ACLs: "
                              f"{type(error).__name__}: {error}")
    return len(wanted)

"""No Docker engine runs here, so keep the deployment files honest by checking them against the code."""

from pathlib import Path

import pytest
import yaml

from linrec_stream.cli import build_parser
from linrec_stream.settings import ENV_PREFIX, Settings

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_services_present(compose):
    assert {"kafka", "topics", "worker", "trainer"} <= set(compose["services"])
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert "healthcheck" in kafka and any(v.startswith("kafka-data:") for v in kafka["volumes"])
    assert compose["services"]["worker"]["deploy"]["replicas"] >= 2


def _linrec_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s.get("image", "").startswith("linrec-stream")}


def test_every_command_parses_with_the_real_cli(compose):
    services = _linrec_services(compose)
    assert set(services) == {"topics", "worker", "trainer"}
    parser = build_parser()
    for name, service in services.items():
        command = service["command"]
        args = parser.parse_args(command)  # raises (UsageError) on an unknown subcommand, flag or value
        # The service runs the command group it names (not, say, a default the parser fell back to).
        assert args.command == command[0], name
        if hasattr(args, "action"):
            assert args.action == command[1], name


def test_every_linrec_variable_is_a_known_setting(compose):
    known = {ENV_PREFIX + n.upper() for n in Settings.names()}
    env_values: dict[str, str] = {}
    for service in _linrec_services(compose).values():
        for key, value in service["environment"].items():
            if key.startswith(ENV_PREFIX):
                assert key in known, f"{key} is not a setting"
                env_values[key] = str(value)
    assert "LINREC_BOOTSTRAP_SERVERS" in env_values
    # Values must also be valid, not just names.
    Settings.load(env=env_values)


def test_dockerfile_installs_the_package_and_runs_the_cli():
    text = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["linrec-stream"]' in text
    for needed in ("linrec_stream", "consumers", "state", "pyproject.toml"):
        assert f"COPY {needed}" in text
    for line in text.splitlines():
        if line.startswith("ENV") or line.strip().startswith(ENV_PREFIX):
            for word in line.replace("ENV", "").replace("\\", "").split():
                key = word.split("=")[0]
                if key.startswith(ENV_PREFIX):
                    assert key.lower()[len(ENV_PREFIX):] in Settings.names(), key


# --- the secured variant: docker-compose.secure.yml over docker-compose.yml --------------------

SECURE = DOCKER / "docker-compose.secure.yml"
SECRETS_DIR = "/run/secrets/"


def _merge(base, override):
    """What ``docker compose -f base -f override`` makes of two maps: maps merge key by key;
    volumes, secrets and ports add up; any other value (command, entrypoint, healthcheck test) is
    replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if key in out and key in ("volumes", "secrets", "ports", "expose") and isinstance(value, list):
                out[key] = out[key] + [v for v in value if v not in out[key]]
            elif key in out:
                out[key] = _merge(out[key], value)
            else:
                out[key] = value
        return out
    return override


@pytest.fixture(scope="module")
def secure_override() -> dict:
    return yaml.safe_load(SECURE.read_text())


@pytest.fixture(scope="module")
def secure(compose, secure_override) -> dict:
    for doc in (compose, secure_override):  # list-form environments would not merge key by key
        for service in doc["services"].values():
            assert isinstance(service.get("environment", {}), dict)
    return _merge(compose, secure_override)


def _service_secrets(service: dict) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def test_secure_header_says_how_to_run_it():
    header = SECURE.read_text().split("\n\n")[0]
    assert "docker compose -f docker/docker-compose.yml -f docker/docker-compose.secure.yml up -d" in header
    assert "make-secrets.sh" in header


def test_secure_services_and_order(secure):
    services = secure["services"]
    assert {"kafka", "acls", "topics", "worker", "trainer"} <= set(services)
    assert services["acls"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    # The ACLs exist before linrec creates the topics (it may only create its own).
    assert services["topics"]["depends_on"]["acls"]["condition"] == "service_completed_successfully"
    assert services["worker"]["deploy"]["replicas"] >= 2  # the plain file's settings survive


def test_secure_commands_parse_with_the_real_cli(secure):
    services = _linrec_services(secure)
    assert set(services) == {"acls", "topics", "worker", "trainer"}
    parser = build_parser()
    for name, service in services.items():
        command = service["command"]
        args = parser.parse_args(command)
        assert args.command == command[0], name


def test_acls_service_runs_kafka_acls(secure):
    command = secure["services"]["acls"]["command"]
    assert command == ["kafka", "acls"]
    args = build_parser().parse_args(command)
    assert (args.command, args.action) == ("kafka", "acls")


def test_secure_settings_are_known_and_load(secure, tmp_path):
    from linrec_stream.clients.connection import KafkaConnection

    known = {ENV_PREFIX + n.upper() for n in Settings.names()}
    for name, service in _linrec_services(secure).items():
        env = {k: str(v) for k, v in service["environment"].items() if k.startswith(ENV_PREFIX)}
        assert set(env) <= known, (name, set(env) - known)
        assert env["LINREC_SECURITY_PROTOCOL"] == "SASL_SSL", name
        assert env["LINREC_SASL_USERNAME"] == ("admin" if name == "acls" else "linrec"), name
        # The files named are the service's Docker secrets...
        for key in ("LINREC_SASL_PASSWORD_FILE", "LINREC_SSL_CAFILE"):
            path = env[key]
            assert path.startswith(SECRETS_DIR) and path[len(SECRETS_DIR):] in _service_secrets(service), (name, key)
        # ... and, with those files standing in, the values load and make a connection.
        local = dict(env)
        (tmp_path / "password").write_text("not-a-real-password\n")
        (tmp_path / "ca.pem").write_text("")
        local["LINREC_SASL_PASSWORD_FILE"] = str(tmp_path / "password")
        local["LINREC_SSL_CAFILE"] = str(tmp_path / "ca.pem")
        conn = KafkaConnection.from_settings(Settings.load(env=local))
        assert conn.bootstrap_servers == "kafka:9092" and conn.uses_tls and conn.uses_sasl, name
        assert conn.sasl_mechanism == "SCRAM-SHA-512" and conn.ssl_check_hostname, name


def test_every_secret_referenced_is_declared(secure):
    declared = secure["secrets"]
    for name, service in secure["services"].items():
        attached = _service_secrets(service)
        assert attached <= set(declared), (name, attached - set(declared))
        for key, value in service.get("environment", {}).items():
            if str(value).startswith(SECRETS_DIR):
                assert str(value)[len(SECRETS_DIR):] in attached, (name, key)
    # The broker's entrypoint reads <user>_password of each user (when it formats the storage).
    assert {"admin_password", "linrec_password", "reader_password", "broker.pem", "ca.pem"} <= \
        _service_secrets(secure["services"]["kafka"])
    for secret in declared.values():
        # Files only (no `environment:` secrets), under docker/secrets/, which git ignores.
        assert set(secret) == {"file"} and secret["file"].startswith("./secrets/"), secret
        assert (DOCKER / secret["file"]).parent == DOCKER / "secrets"
    assert "secrets/" in (DOCKER / ".gitignore").read_text().split()


def test_secure_broker_has_no_plaintext_listener_and_an_authorizer(secure):
    kafka = secure["services"]["kafka"]
    env = {k: str(v) for k, v in kafka["environment"].items()}
    protocols = dict(pair.split(":") for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols.values()) == {"SASL_SSL"}, protocols
    for key in ("KAFKA_LISTENERS", "KAFKA_ADVERTISED_LISTENERS"):
        names = [listener.split("://")[0] for listener in env[key].split(",")]
        assert names and all(protocols.get(n) == "SASL_SSL" for n in names), (key, names)
    assert protocols[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "SASL_SSL"
    assert protocols[env["KAFKA_CONTROLLER_LISTENER_NAMES"]] == "SASL_SSL"
    assert env["KAFKA_LISTENER_NAME_CLIENT_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert env["KAFKA_SASL_MECHANISM_INTER_BROKER_PROTOCOL"] == "SCRAM-SHA-512"
    assert env["KAFKA_SASL_MECHANISM_CONTROLLER_PROTOCOL"] == "PLAIN"
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["KAFKA_SUPER_USERS"] == "User:admin"  # no User:ANONYMOUS
    assert env["KAFKA_SSL_KEYSTORE_TYPE"] == env["KAFKA_SSL_TRUSTSTORE_TYPE"] == "PEM"
    # The broker starts through the script that adds the SCRAM users, mounted from docker/.
    assert kafka["entrypoint"] == ["bash", "/opt/linrec/kafka-secure-start.sh"]
    assert "./kafka-secure-start.sh:/opt/linrec/kafka-secure-start.sh:ro" in kafka["volumes"]
    assert "--command-config" in kafka["healthcheck"]["test"][1]


def test_no_password_literal_in_the_compose_files(secure):
    for path in (DOCKER / "docker-compose.yml", SECURE):
        text = path.read_text().lower()
        assert "password=" not in text and "jaas" not in text, path.name
    for name, service in secure["services"].items():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key:
                assert key.endswith("_FILE") and str(value).startswith(SECRETS_DIR), (name, key)


def _fake_kafka_image(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A stand-in for the apache/kafka image's files: a kafka-storage.sh, a kafka-server-start.sh
    and a java that record what they were given (no JVM runs)."""
    home, bin_dir, log = tmp_path / "opt-kafka", tmp_path / "path", tmp_path / "calls.log"
    (home / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    scripts = {
        home / "bin" / "kafka-storage.sh": 'echo "storage $*" >>"$CALLS"; echo MkU3OEVBNTcwNTJENDM2Qg',
        home / "bin" / "kafka-server-start.sh": 'echo "server $*" >>"$CALLS"',
        # java @argfile: record the command line and the argfile; "format" makes meta.properties.
        bin_dir / "java": 'echo "java $*" >>"$CALLS"; f=${!#}; cat "${f#@}" >>"$CALLS"; '
                          'touch "$KAFKA_LOG_DIRS/meta.properties"',
    }
    for path, body in scripts.items():
        path.write_text("#!/usr/bin/env bash\n" + body + "\n")
        path.chmod(0o755)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for user in ("admin", "linrec", "reader"):
        (secrets / f"{user}_password").write_text(f"{user}-pw-0123\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(log), "KAFKA_HOME": str(home),
           "LINREC_SECRETS_DIR": str(secrets), "LINREC_KAFKA_CONF_DIR": str(tmp_path / "conf")}
    return log, env


def test_broker_entrypoint_formats_once_with_scram_users(secure, tmp_path):
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = DOCKER / "kafka-secure-start.sh"
    log, env = _fake_kafka_image(tmp_path)
    env.update({k: str(v) for k, v in secure["services"]["kafka"]["environment"].items()})
    env["KAFKA_LOG_DIRS"] = str(tmp_path / "data")
    (tmp_path / "data").mkdir()
    for run in (1, 2):
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    calls = log.read_text()
    # Formatted on the first start only, with every user; then the broker, twice.
    assert calls.count("kafka.tools.StorageTool format") == 1
    for user in ("admin", "linrec", "reader"):
        assert f"--add-scram SCRAM-SHA-512=[name={user},password={user}-pw-0123]" in calls
    assert calls.count(f"server {tmp_path / 'conf' / 'server.properties'}") == 2
    # No password on a command line (only in the argfile, removed after), nor in the output.
    for line in calls.splitlines():
        if line.startswith(("java ", "storage ", "server ")):
            assert "-pw-" not in line, line
    assert not (tmp_path / "conf" / "format.args").exists()
    assert "-pw-" not in proc.stdout + proc.stderr
    props_file = tmp_path / "conf" / "server.properties"
    assert props_file.stat().st_mode & 0o077 == 0
    props = dict(line.split("=", 1) for line in props_file.read_text().splitlines() if line and line[0] != "#")
    assert props["listener.security.protocol.map"] == "CLIENT:SASL_SSL,CONTROLLER:SASL_SSL"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["super.users"] == "User:admin"
    assert props["controller.quorum.voters"] == "1@kafka:9093"  # from the plain file
    assert 'username="admin" password="admin-pw-0123"' in props["listener.name.client.scram-sha-512.sasl.jaas.config"]
    assert 'user_admin="admin-pw-0123"' in props["listener.name.controller.plain.sasl.jaas.config"]
    assert "home" not in props  # KAFKA_HOME is not a broker setting


def test_broker_entrypoint_refuses_a_password_it_cannot_quote(secure, tmp_path):
    import subprocess

    log, env = _fake_kafka_image(tmp_path)
    env.update({k: str(v) for k, v in secure["services"]["kafka"]["environment"].items()})
    env["KAFKA_LOG_DIRS"] = str(tmp_path)
    (tmp_path / "secrets" / "admin_password").write_text('pw"; evil\n')
    proc = subprocess.run(["bash", str(DOCKER / "kafka-secure-start.sh")], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and "admin_password" in proc.stderr and "evil" not in proc.stderr
    assert not log.exists()  # nothing was started


def test_make_secrets_names_the_compose_host(tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    out = tmp_path / "secrets"
    subprocess.run(["bash", str(DOCKER / "make-secrets.sh"), str(out)], check=True, capture_output=True, timeout=60)
    names = {p.name for p in out.iterdir()}
    assert names == {"ca.pem", "broker.pem", "admin.password", "linrec.password", "reader.password"}
    cert = ssl._ssl._test_decode_cert(str(out / "broker.pem"))  # the certificate after the key
    assert ("DNS", "kafka") in cert["subjectAltName"]
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.pem"), "-verify_hostname", "kafka",
                             str(out / "broker.pem")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert out.stat().st_mode & 0o077 == 0
    first = (out / "linrec.password").read_text()
    subprocess.run(["bash", str(DOCKER / "make-secrets.sh"), str(out)], check=True, capture_output=True, timeout=60)
    assert (out / "linrec.password").read_text() == first  # kept: the broker's storage holds it

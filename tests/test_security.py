"""The secure local broker (``kafka start --secure``, issue 20) against real Apache Kafka: SASL_SSL
with SCRAM users and ACLs, the client settings files it writes, the refusals a client meets, and
that no secret is ever printed.

One secure broker (own ports and runtime directory) serves the whole module: starting it is the
expensive part. The refusals that wait out a client's bootstrap timeout run side by side.
"""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from linrec_stream.broker.secure import ensure_tls
from linrec_stream.settings import WORKER_ENGINES, Settings
from tests.conftest import free_port, run_cli

pytestmark = pytest.mark.kafka

#: A refusal must come within the client's own timeout (kafka-python's 30 s bootstrap), plus
#: the start of a Python process, on a loaded 2-core CI machine with the others beside it.
REFUSAL_BOUND_S = 75.0


@dataclass
class SecureBroker:
    """The module's secure broker: where its files are, and every output seen (for the secrets test)."""

    env: dict[str, str]
    kafka_dir: Path
    start_s: float
    outputs: list[str] = field(default_factory=list)

    def config(self, user: str = "linrec") -> Path:
        return self.kafka_dir / ("client-secure.toml" if user == "linrec" else f"client-secure-{user}.toml")

    def cli(self, *args: str, user: str = "linrec", timeout: float = 180) -> subprocess.CompletedProcess:
        """`linrec-stream ARGS --config <user's file>`; its output is kept for the secrets test."""
        res = run_cli(*args, "--config", str(self.config(user)), timeout=timeout)
        self.outputs += [res.stdout, res.stderr]
        return res

    def passwords(self) -> dict[str, str]:
        return {f.stem: f.read_text().strip() for f in (self.kafka_dir / "secrets").glob("*.password")}


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> SecureBroker:
    port, cport = free_port(), free_port()
    runtime = tmp_path_factory.mktemp("secure-broker") / "runtime"
    env = {"LINREC_KAFKA_PORT": str(port), "LINREC_KAFKA_CONTROLLER_PORT": str(cport),
           "LINREC_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "LINREC_RUNTIME_DIR": str(runtime)}
    t0 = time.monotonic()
    started = run_cli("kafka", "start", "--secure", env=env)
    broker = SecureBroker(env, runtime / "kafka", time.monotonic() - t0, [started.stdout, started.stderr])
    try:
        assert started.returncode == 0, started.stderr
        print(f"secure broker started in {broker.start_s:.1f}s")
        yield broker
    finally:
        run_cli("kafka", "stop", env=env)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The single error line of a command that failed as a user error should: exit 1, no traceback."""
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("linrec-stream: error: ")]
    assert len(errors) == 1, res.stderr
    return errors[0]


# --- the broker and its files ----------------------------------------------------------------------
def test_start_writes_client_settings_that_load(secure: SecureBroker):
    assert "over SASL_SSL" in secure.outputs[0] and str(secure.config()) in secure.outputs[0]
    for user in ("linrec", "admin", "reader"):
        s = Settings.load(config_file=secure.config(user), env={})
        assert (s.bootstrap_servers, s.security_protocol, s.sasl_mechanism, s.sasl_username) == \
            (secure.env["LINREC_BOOTSTRAP_SERVERS"], "SASL_SSL", "SCRAM-SHA-512", user)
        assert s.sasl_password == "" and Path(s.sasl_password_file).read_text().strip()
        assert Path(s.ssl_cafile).read_text().startswith("-----BEGIN CERTIFICATE-----")
    # Secrets and the broker's key are its owner's only.
    for f in [*(secure.kafka_dir / "secrets").iterdir(), secure.kafka_dir / "tls" / "broker.pem",
              secure.kafka_dir / "server.properties"]:
        assert f.stat().st_mode & 0o077 == 0, f
    assert not list((secure.kafka_dir / "tls").glob("*.key")), "the CA's key is not kept"


def test_status_names_the_client_settings(secure: SecureBroker):
    res = secure.cli("kafka", "status")
    assert res.returncode == 0 and "over SASL_SSL" in res.stdout and str(secure.config()) in res.stdout


def test_kafka_check_over_sasl_ssl(secure: SecureBroker):
    res = secure.cli("kafka", "check", "--messages", "200")
    assert res.returncode == 0 and "each exactly once" in res.stdout, res.stderr


def test_topics_create_as_the_components_user(secure: SecureBroker):
    res = secure.cli("topics", "create")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 5


def test_secure_start_of_a_plaintext_data_dir_says_what_to_do(tmp_path: Path):
    # A plaintext broker's storage has no SCRAM users (they are written when it is formatted).
    data = tmp_path / "runtime" / "kafka" / "data"
    data.mkdir(parents=True)
    (data / "meta.properties").write_text("node.id=1\n")
    res = run_cli("kafka", "start", "--secure", env={"LINREC_RUNTIME_DIR": str(tmp_path / "runtime"),
                                                     "LINREC_KAFKA_PORT": str(free_port())})
    line = one_error_line(res)
    assert "without security" in line and "start it without --secure" in line and str(data) in line


# --- refusals ---------------------------------------------------------------------------------------
# name -> (command and arguments, what the error line must say); a command given as arguments
# alone is `topics create`. Each waits out the client's bootstrap timeout (kafka-python raises
# only a timeout; the project names the cause).
BOOTSTRAP_REFUSALS = {
    "wrong password": (["--set", "sasl_password=wrong"], "authentication failed for user linrec"),
    # A configuration error is not an outage: the worker says so and exits instead of waiting.
    "a worker with a wrong password": (["worker", "--model", "@MODEL@", "--state-dir", "@STATE@", "--device", "cpu",
                                        "--set", "metrics_port=0", "--set", "sasl_password=wrong"],
                                       "authentication failed for user linrec"),
    "unknown user": (["--set", "sasl_username=nobody", "--set", "sasl_password=x"],
                     "authentication failed for user nobody"),
    "plaintext client on the TLS port": (["--set", "security_protocol=PLAINTEXT"], "TLS"),
    "TLS client on a plaintext port": (["--bootstrap-servers", "@PLAINTEXT@"], "is that listener plaintext?"),
    "untrusted CA": (["--set", "ssl_cafile=@OTHER_CA@"], "not trusted by ssl_cafile"),
}


@pytest.fixture(scope="module")
def refused(secure: SecureBroker, broker: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """name -> (result, seconds) of each of BOOTSTRAP_REFUSALS, all run at once."""
    other = tmp_path_factory.mktemp("other-ca")
    ensure_tls(other, common_name="a CA nobody trusts")
    fill = {"@PLAINTEXT@": broker.bootstrap_servers, "@OTHER_CA@": str(other / "ca.pem"),
            "@MODEL@": str(tiny_model(tmp_path_factory.mktemp("model"))),
            "@STATE@": str(tmp_path_factory.mktemp("refused-worker") / "state")}

    def attempt(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.monotonic()
        for placeholder, value in fill.items():
            args = [a.replace(placeholder, value) for a in args]
        command = [] if args[0] == "worker" else ["topics", "create"]
        res = secure.cli(*command, *args, timeout=REFUSAL_BOUND_S + 60)
        return res, time.monotonic() - t0

    with ThreadPoolExecutor(len(BOOTSTRAP_REFUSALS)) as pool:
        futures = {name: pool.submit(attempt, args) for name, (args, _) in BOOTSTRAP_REFUSALS.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(BOOTSTRAP_REFUSALS))
def test_refusal_is_one_line_naming_the_cause_in_bounded_time(refused: dict, name: str):
    res, seconds = refused[name]
    print(f"{name}: {seconds:.1f}s: {res.stderr.strip()}")
    line = one_error_line(res)
    assert BOOTSTRAP_REFUSALS[name][1] in line, line
    assert seconds < REFUSAL_BOUND_S


def test_the_reader_cannot_produce_to_interactions(secure: SecureBroker, tmp_path: Path):
    from kafka.errors import TopicAuthorizationFailedError

    from linrec_stream.clients.connection import KafkaConnection

    assert secure.cli("topics", "create").returncode == 0
    reader = Settings.load(config_file=secure.config("reader"), env={})
    producer = KafkaConnection.from_settings(reader).producer(max_block_ms=10_000)
    t0 = time.monotonic()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            producer.send(reader.topic_interactions, key=b"ann", value=b"{}").get(timeout=15)
    finally:
        producer.close(timeout=2)
    assert time.monotonic() - t0 < 15
    # ... and the command line says so (a replay must not report events it could not write).
    log = tmp_path / "log.csv"
    log.write_text("user,item,timestamp\nann,i1,1000000100\nbob,i2,1000000200\n")
    res = secure.cli("replay", "--data", str(log), "--no-progress", user="reader")
    line = one_error_line(res)
    assert f"not authorized for topic {reader.topic_interactions} (user reader)" in line, line


def test_kafka_acls_as_admin_only(secure: SecureBroker):
    # What docker's `acls` service runs: idempotent as the admin user; refused to the components.
    res = secure.cli("kafka", "acls", user="admin")
    assert res.returncode == 0 and "ACLs in place" in res.stdout and "linrec, reader" in res.stdout, res.stderr
    line = one_error_line(secure.cli("kafka", "acls"))
    assert "not authorized" in line and "user linrec" in line, line


def test_the_reader_may_tail_recommendations(secure: SecureBroker):
    assert secure.cli("topics", "create").returncode == 0
    res = secure.cli("recs", "tail", "--from-beginning", "--timeout", "2", user="reader")
    assert res.returncode == 0, res.stderr


def tiny_model(where: Path) -> Path:
    """A run directory of a small untrained model over items i1..i20."""
    import torch

    from linrec_stream.model import LinRecModel, ModelConfig
    from tests.helpers import item_vocab, write_run

    torch.manual_seed(0)
    cfg = ModelConfig(num_items=20, hidden_size=8, num_layers=1, num_heads=2, attention="linrec", max_len=16,
                      dropout=0.0, inner_size=16)
    return write_run(where / "model", LinRecModel(cfg).eval(), item_vocab(20))


@pytest.mark.parametrize("engine", WORKER_ENGINES)
def test_worker_end_to_end_over_sasl_ssl(secure: SecureBroker, tmp_path: Path, engine: str):
    # Topics, a replay, a worker and `recs tail`, each with the client settings file alone: the
    # components as linrec, the tail as the read-only reader. On both engines: faust's app
    # (aiokafka) takes the credentials and the TLS context its own way.
    from tests.helpers import start_worker_args

    model_dir = tiny_model(tmp_path)
    users = [f"u{n}" for n in range(6)]
    log = tmp_path / f"log-{engine}.csv"  # its own event ids (<file>:<row>): not retries of the other run's
    log.write_text("user,item,timestamp\n" + "".join(f"{u},i{1 + (k + n) % 20},{1_000_000_000 + 10 * k + n}\n"
                                                    for k in range(5) for n, u in enumerate(users)))
    assert secure.cli("topics", "create").returncode == 0
    replayed = secure.cli("replay", "--data", str(log), "--no-progress")
    assert replayed.returncode == 0 and "replayed 30 events" in replayed.stdout, replayed.stderr
    worker = subprocess.run(start_worker_args(tmp_path / "state", 4, 64, model_dir)
                            + ["--config", str(secure.config()), "--set", "metrics_port=0", "--engine", engine,
                               "--set", "summary_every_s=0.5"],
                            capture_output=True, text=True, timeout=180)
    secure.outputs += [worker.stdout, worker.stderr]
    assert worker.returncode == 0, worker.stderr[-3000:]
    log = worker.stdout + worker.stderr
    assert f"engine {engine}," in log and "over SASL_SSL as linrec" in log, log[-2000:]
    assert re.search(r"totals: [1-9]", log), log[-2000:]  # it applied events (a new replay's, at least)
    # Every recommendation so far (a user may have several: one per micro-batch that touched it).
    tail = secure.cli("recs", "tail", "--from-beginning", "--timeout", "5", user="reader")
    assert tail.returncode == 0, tail.stderr
    assert {line.split(":")[0] for line in tail.stdout.splitlines()} == set(users)


def test_restart_keeps_security_and_acls(secure: SecureBroker):
    # Started again without --secure: the data directory stays secure; creating the ACLs again
    # on start is harmless.
    assert run_cli("kafka", "stop", env=secure.env).returncode == 0
    again = run_cli("kafka", "start", env=secure.env)
    secure.outputs += [again.stdout, again.stderr]
    assert again.returncode == 0 and "over SASL_SSL" in again.stdout, again.stderr
    res = secure.cli("kafka", "check", "--messages", "50")
    assert res.returncode == 0, res.stderr


# --- last: nothing printed or logged holds a secret -------------------------------------------------
def test_no_secret_in_any_output_log_or_settings_listing(secure: SecureBroker):
    passwords = secure.passwords()
    assert set(passwords) == {"admin", "linrec", "reader"}
    for user in ("linrec", "admin", "reader"):
        # Even a password given on the command line is masked in the listing.
        listing = secure.cli("settings", "--set", f"sasl_password={passwords[user]}", user=user)
        assert listing.returncode == 0, listing.stderr
    logs = [f.read_text(errors="replace") for f in (secure.kafka_dir / "logs").iterdir() if f.is_file()]
    for secret in passwords.values():
        for text in secure.outputs + logs:
            assert secret not in text

"""Run a real single-node Apache Kafka broker (KRaft combined mode) on 127.0.0.1.

The broker is a background JVM started from the jars that :mod:`artifacts` fetched. Its
data, logs and pid file live under ``<runtime_dir>/kafka``, so each checkout has its own
broker state. ``start`` returns only once the broker answers an admin request.

By default the broker speaks PLAINTEXT; ``start(secure=True)`` makes it the SASL_SSL broker with
users and ACLs of :mod:`secure`. A data directory keeps the mode it was formatted in.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from linrec_stream.broker import artifacts
from linrec_stream.broker import secure as secure_broker
from linrec_stream.broker.errors import KafkaSetupError
from linrec_stream.broker.secure import SecurePaths
from linrec_stream.settings import Settings

MIN_JAVA = 17
STOP_TIMEOUT_S = 30.0


def new_cluster_id(draw: Callable[[], bytes] = lambda: uuid.uuid4().bytes) -> str:
    """A random KRaft cluster id: 16 bytes in URL-safe base64, 22 characters.

    One id in 64 would begin with ``-``, which the storage tool's argument parser takes for an
    option ("argument --cluster-id/-t: expected one argument"); Kafka's own ``Uuid.randomUuid``
    draws again in that case, and so does this. ``draw`` supplies the 16 random bytes.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(draw()).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True)
class BrokerPaths:
    """Where one local broker keeps its files."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pid_file(self) -> Path:
        return self.root / "broker.pid"

    @property
    def properties(self) -> Path:
        return self.root / "server.properties"

    @property
    def log4j_config(self) -> Path:
        return self.root / "log4j2.xml"

    @property
    def console_log(self) -> Path:
        return self.logs / "console.log"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    root: Path
    #: The client settings file of a broker whose storage was formatted secure (None: plaintext).
    client_config: Path | None = None

    @property
    def secure(self) -> bool:
        return self.client_config is not None

    def describe(self) -> str:
        how = " over SASL_SSL" if self.secure else ""
        if self.running:
            line = f"Kafka broker running at {self.bootstrap}{how} (pid {self.pid}, files in {self.root})"
        else:
            line = f"Kafka broker not running (would listen on {self.bootstrap}{how}, files in {self.root})"
        return line + (f"; client settings: --config {self.client_config}" if self.secure else "")


@dataclass(frozen=True)
class StartResult:
    already_running: bool
    status: BrokerStatus
    seconds: float
    formatted: bool = False


@dataclass(frozen=True)
class StopResult:
    was_running: bool
    killed: bool
    seconds: float


class LocalBroker:
    """Start, stop and inspect the project's local broker as configured by ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = BrokerPaths(settings.path(settings.runtime_dir) / "kafka")
        self.secure_paths = SecurePaths(self.paths.root)
        self.bootstrap = settings.local_bootstrap

    # --- inspection ---------------------------------------------------------------------
    def status(self) -> BrokerStatus:
        pid = self._live_pid()
        client = self.secure_paths.client_config(secure_broker.COMPONENTS) if self.is_secure() else None
        return BrokerStatus(pid is not None, pid, self.bootstrap, self.paths.root, client)

    def is_secure(self) -> bool:
        """Whether the storage was formatted for the secure broker (its SCRAM users exist)."""
        return self.secure_paths.marker.exists() and self._formatted()

    def _formatted(self) -> bool:
        return (self.paths.data / "meta.properties").exists()

    def _live_pid(self) -> int | None:
        try:
            pid = int(self.paths.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_broker_process(pid) else None

    # --- start --------------------------------------------------------------------------
    def start(self, log: Callable[[str], None] = print, secure: bool = False) -> StartResult:
        """Start the broker unless it runs already; block until it answers or fail with one line.

        ``secure``: the SASL_SSL broker of :mod:`secure` (a new data directory is formatted for
        it). Without it, an existing data directory starts in the mode it was formatted in, a new
        one plaintext."""
        t0 = time.monotonic()
        current = self.status()
        self._check_mode(secure, current)
        if current.running:
            return StartResult(True, current, 0.0)
        secure = secure or current.secure
        java = find_java()
        lib = artifacts.ensure_broker_jars(self.settings.kafka_cache_dir, self.settings.kafka_version, log=log)
        for port in (self.settings.kafka_port, self.settings.kafka_controller_port):
            if not port_is_free(port):
                raise KafkaSetupError(
                    f"port {port} on 127.0.0.1 is in use by another process: stop it or choose another "
                    f"port (LINREC_KAFKA_PORT / LINREC_KAFKA_CONTROLLER_PORT)"
                )
        passwords: dict[str, str] = {}
        if secure:
            secure_broker.ensure_tls(self.secure_paths.tls)
            passwords = secure_broker.ensure_passwords(self.secure_paths)
        self._write_config(passwords)
        formatted = self._format_if_new(java, lib, passwords)
        proc = self._launch(java, lib)
        try:
            self._wait_ready(proc, deadline=t0 + self.settings.kafka_start_timeout_s)
            if passwords:
                # Every start, so ACLs follow the topic names of the settings it starts with.
                secure_broker.apply_acls(self._probe_settings(), self.settings)
                secure_broker.write_client_configs(self.settings, self.secure_paths)
        except BaseException:
            _terminate(proc.pid, timeout=5.0)
            self.paths.pid_file.unlink(missing_ok=True)
            raise
        return StartResult(False, self.status(), time.monotonic() - t0, formatted)

    def _check_mode(self, secure: bool, current: BrokerStatus) -> None:
        """Refuse ``--secure`` for a plaintext data directory (it has no SCRAM users, which
        exist only from formatting on), in one line that says what to do."""
        if not secure or current.secure or not (current.running or self._formatted()):
            return
        raise KafkaSetupError(
            f"the broker in {self.paths.root} is {'running' if current.running else 'formatted'} without "
            f"security, so it has no users: start it without --secure, or stop it and delete {self.paths.data} "
            f"(its topics go with it) or choose another runtime_dir to start a secure one"
        )

    def _probe_settings(self) -> Settings:
        """How this process reaches its own broker: the secure one as its admin user."""
        if self.is_secure():
            return secure_broker.as_settings(self.settings, self.secure_paths, secure_broker.ADMIN)
        return self.settings.replace(bootstrap_servers=self.bootstrap, security_protocol="PLAINTEXT")

    def _write_config(self, passwords: dict[str, str]) -> None:
        """server.properties (with the secure overlay when ``passwords`` are given: then mode
        0600, as it holds the admin password) and the log configuration."""
        p = self.paths
        for d in (p.data, p.logs):
            d.mkdir(parents=True, exist_ok=True)
        pkg = resources.files("linrec_stream.broker")
        props = pkg.joinpath("server.properties").read_text()
        if passwords:
            overlay = secure_broker.broker_properties(pkg.joinpath("secure.properties").read_text(),
                                               self.secure_paths, passwords)
            props = secure_broker.merge_properties(props, overlay)
        props = (
            props.replace("@PORT@", str(self.settings.kafka_port))
            .replace("@CONTROLLER_PORT@", str(self.settings.kafka_controller_port))
            .replace("@DATA_DIR@", str(p.data))
        )
        secure_broker.write_private(p.properties, props)
        p.log4j_config.write_text(pkg.joinpath("log4j2.xml").read_text())

    def _java_base(self, java: str, lib: Path) -> list[str]:
        return [
            java,
            f"-Xmx{self.settings.kafka_heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.paths.logs}",
            f"-Dlog4j2.configurationFile={self.paths.log4j_config}",
            "-cp",
            f"{lib}/*",
        ]

    def _format_if_new(self, java: str, lib: Path, passwords: dict[str, str]) -> bool:
        """Format a new data directory; with ``passwords``, for the secure broker: its SCRAM
        users are written into the metadata log, and the marker says it is secure."""
        if self._formatted():
            return False
        args = self._java_base(java, lib)[1:] + [
            "kafka.tools.StorageTool", "format", "--standalone",
            "-t", new_cluster_id(), "-c", str(self.paths.properties),
        ] + (secure_broker.scram_format_args(passwords) if passwords else [])
        # The arguments go in a java @argfile (mode 0600, removed after), so that the passwords
        # never appear in a process listing.
        argfile = self.paths.root / "format.args"
        secure_broker.write_private(argfile, "\n".join(_argfile_quote(a) for a in args) + "\n")
        try:
            proc = subprocess.run([java, f"@{argfile}"], capture_output=True, text=True)
        finally:
            argfile.unlink(missing_ok=True)
        if proc.returncode == 0:
            if passwords:
                self.secure_paths.marker.write_text("SASL_SSL\n")
            else:
                self.secure_paths.marker.unlink(missing_ok=True)
        else:
            raise KafkaSetupError(
                f"formatting the broker's storage in {self.paths.data} failed (exit {proc.returncode})",
                detail=_tail_text(proc.stdout + proc.stderr),
            )
        return True

    def _launch(self, java: str, lib: Path) -> subprocess.Popen:
        cmd = self._java_base(java, lib) + ["kafka.Kafka", str(self.paths.properties)]
        with self.paths.console_log.open("ab") as out:
            # A session of its own: the broker outlives this CLI process and its terminal.
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.paths.pid_file.write_text(f"{proc.pid}\n")
        return proc

    def _wait_ready(self, proc: subprocess.Popen, deadline: float) -> None:
        while True:
            code = proc.poll()
            if code is not None:
                raise KafkaSetupError(
                    f"the Kafka broker exited with code {code} while starting", detail=self.log_tail()
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaSetupError(
                    f"the Kafka broker did not answer at {self.bootstrap} within "
                    f"{self.settings.kafka_start_timeout_s:g}s (LINREC_KAFKA_START_TIMEOUT_S)",
                    detail=self.log_tail(),
                )
            if port_is_open(self.settings.kafka_port) and broker_answers(self._probe_settings(),
                                                                         timeout_s=min(5.0, remaining)):
                return
            time.sleep(0.25)

    def log_tail(self, lines: int = 15) -> str:
        for f in (self.paths.server_log, self.paths.console_log):
            if f.exists() and f.stat().st_size > 0:
                return _tail_text(f.read_text(errors="replace"), lines)
        return ""

    # --- stop ---------------------------------------------------------------------------
    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> StopResult:
        """Ask the broker to shut down (SIGTERM: controlled shutdown); kill it after ``timeout_s``."""
        t0 = time.monotonic()
        pid = self._live_pid()
        if pid is None:
            self.paths.pid_file.unlink(missing_ok=True)
            return StopResult(False, False, 0.0)
        killed = _terminate(pid, timeout=timeout_s)
        self.paths.pid_file.unlink(missing_ok=True)
        return StopResult(True, killed, time.monotonic() - t0)


# --- helpers ------------------------------------------------------------------------------
def find_java() -> str:
    """The path of a Java >= 17 runtime on PATH, or a one-line error."""
    java = shutil.which("java")
    if java is None:
        raise KafkaSetupError(
            f"Java not found on PATH: Apache Kafka 4 needs Java {MIN_JAVA}+ (e.g. apt-get install openjdk-17-jre-headless)"
        )
    proc = subprocess.run([java, "-version"], capture_output=True, text=True)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if m is None:
        raise KafkaSetupError(f"cannot tell the version of {java}: 'java -version' printed {proc.stderr.strip()!r}")
    major = int(m.group(1))
    if major == 1 and m.group(2):  # "1.8" style
        major = int(m.group(2))
    if major < MIN_JAVA:
        raise KafkaSetupError(f"{java} is Java {major}; Apache Kafka 4 needs Java {MIN_JAVA}+")
    return java


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR so a socket in TIME_WAIT from a previous broker is not mistaken for a user.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_is_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def broker_answers(settings: Settings, timeout_s: float = 5.0) -> bool:
    """True when the broker of ``settings`` (its bootstrap servers and security) answers a
    DescribeCluster admin request (an open port is not enough)."""
    from linrec_stream.clients.connection import KafkaConnection

    quiet = logging.getLogger("kafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # connection-refused noise while the JVM boots
    admin = None
    try:
        ms = int(timeout_s * 1000)
        admin = KafkaConnection.from_settings(settings).admin(request_timeout_ms=ms, bootstrap_timeout_ms=ms)
        info = admin.describe_cluster()
        return bool(info.get("brokers"))
    except Exception:
        return False
    finally:
        if admin is not None:
            admin.close()
        quiet.setLevel(level)


def _is_broker_process(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # A recycled pid must not be taken for our broker.
    return b"kafka.Kafka" in cmdline


def _terminate(pid: int, timeout: float) -> bool:
    """SIGTERM, wait, SIGKILL if needed. Returns True when it had to kill."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return False
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    while _alive(pid):
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    # Reap it if it is our child, so a zombie does not look alive.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _argfile_quote(arg: str) -> str:
    """``arg`` as one argument of a java @argfile: in double quotes, backslash escaped."""
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tail_text(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

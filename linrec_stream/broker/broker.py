"""Run a real single-node Apache Kafka broker (KRaft combined mode) on 127.0.0.1.

The broker is a background JVM started from the jars that :mod:`artifacts` fetched. Its
data, logs and pid file live under ``<runtime_dir>/kafka``, so each checkout has its own
broker state. ``start`` returns only once the broker answers an admin request.
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
from linrec_stream.broker.errors import KafkaSetupError
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

    def describe(self) -> str:
        if self.running:
            return f"Kafka broker running at {self.bootstrap} (pid {self.pid}, files in {self.root})"
        return f"Kafka broker not running (would listen on {self.bootstrap}, files in {self.root})"


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
        self.bootstrap = settings.local_bootstrap

    # --- inspection ---------------------------------------------------------------------
    def status(self) -> BrokerStatus:
        pid = self._live_pid()
        return BrokerStatus(pid is not None, pid, self.bootstrap, self.paths.root)

    def _live_pid(self) -> int | None:
        try:
            pid = int(self.paths.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_broker_process(pid) else None

    # --- start --------------------------------------------------------------------------
    def start(self, log: Callable[[str], None] = print) -> StartResult:
        """Start the broker unless it runs already; block until it answers or fail with one line."""
        t0 = time.monotonic()
        current = self.status()
        if current.running:
            return StartResult(True, current, 0.0)
        java = find_java()
        lib = artifacts.ensure_broker_jars(self.settings.kafka_cache_dir, self.settings.kafka_version, log=log)
        for port in (self.settings.kafka_port, self.settings.kafka_controller_port):
            if not port_is_free(port):
                raise KafkaSetupError(
                    f"port {port} on 127.0.0.1 is in use by another process: stop it or choose another "
                    f"port (LINREC_KAFKA_PORT / LINREC_KAFKA_CONTROLLER_PORT)"
                )
        self._write_config()
        formatted = self._format_if_new(java, lib)
        proc = self._launch(java, lib)
        try:
            self._wait_ready(proc, deadline=t0 + self.settings.kafka_start_timeout_s)
        except BaseException:
            _terminate(proc.pid, timeout=5.0)
            self.paths.pid_file.unlink(missing_ok=True)
            raise
        return StartResult(False, self.status(), time.monotonic() - t0, formatted)

    def _write_config(self) -> None:
        p = self.paths
        for d in (p.data, p.logs):
            d.mkdir(parents=True, exist_ok=True)
        pkg = resources.files("linrec_stream.broker")
        props = (
            pkg.joinpath("server.properties").read_text()
            .replace("@PORT@", str(self.settings.kafka_port))
            .replace("@CONTROLLER_PORT@", str(self.settings.kafka_controller_port))
            .replace("@DATA_DIR@", str(p.data))
        )
        p.properties.write_text(props)
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

    def _format_if_new(self, java: str, lib: Path) -> bool:
        if (self.paths.data / "meta.properties").exists():
            return False
        cmd = self._java_base(java, lib) + [
            "kafka.tools.StorageTool", "format", "--standalone",
            "-t", new_cluster_id(), "-c", str(self.paths.properties),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
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
            if port_is_open(self.settings.kafka_port) and broker_answers(self.bootstrap, timeout_s=min(5.0, remaining)):
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


def broker_answers(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True when the broker answers a DescribeCluster admin request (an open port is not enough)."""
    from kafka import KafkaAdminClient

    quiet = logging.getLogger("kafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # connection-refused noise while the JVM boots
    admin = None
    try:
        ms = int(timeout_s * 1000)
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ms, bootstrap_timeout_ms=ms)
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


def _tail_text(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

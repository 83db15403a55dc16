"""Shared fixtures. Broker-backed tests use the real local Kafka broker of the project:
scripts/test.sh starts it; when pytest runs alone, the `broker` fixture starts it itself
(and stops it again at the end)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from linrec_stream.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """The module of a script that is not in a package (``scripts/``, ``benchmarks/``), by its
    path from the repository root, loaded afresh on every call."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.load()


@pytest.fixture(scope="session")
def broker(settings: Settings):
    """The running local broker's Settings. Fails (never skips) when it cannot be started."""
    from linrec_stream.broker.broker import LocalBroker

    local = LocalBroker(settings)
    started = local.start(log=lambda m: None)
    before = _topic_names(settings)
    yield settings
    # The tests' private topics go with them, so that a broker kept running stays clean.
    _delete_topics(settings, _topic_names(settings) - before)
    if not started.already_running:
        local.stop()


def _topic_names(settings: Settings) -> set[str]:
    from linrec_stream.clients.connection import KafkaConnection

    admin = KafkaConnection.from_settings(settings).admin()
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def _delete_topics(settings: Settings, names: set[str]) -> None:
    from linrec_stream.clients.connection import KafkaConnection

    if not names:
        return
    admin = KafkaConnection.from_settings(settings).admin()
    try:
        admin.delete_topics(sorted(names), timeout_ms=30_000)
    except Exception as exc:  # cleaning up must not fail the run
        print(f"conftest: could not delete {len(names)} test topics: {exc}")
    finally:
        admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `linrec-stream ARGS` in a child process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "linrec_stream.cli", *args],
        capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout,
    )

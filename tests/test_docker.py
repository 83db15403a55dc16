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

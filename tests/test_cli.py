"""The CLI's contract for wrong input: one line on stderr, no traceback, a non-zero exit."""

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["kafka", "bogus"], {}, "invalid choice: 'bogus'"),
        (["kafka", "status", "--set", "kafka_port=abc"], {}, "kafka_port: expected an integer, got 'abc'"),
        (["kafka", "status", "--set", "kafkaport"], {}, "expected NAME=VALUE"),
        (["settings", "--config", "/no/such/file.toml"], {}, "settings file /no/such/file.toml does not exist"),
        (["settings"], {"LINREC_KAFKA_HEAP": "x"}, "LINREC_KAFKA_HEAP: a JVM heap size"),
        (["topics", "create", "--nope"], {}, "unrecognized arguments: --nope"),
        (["settings", "--set", "summary_every_s=nan"], {}, "summary_every_s: must be a finite number > 0, got nan"),
        (["settings", "--bootstrap-servers", ""], {}, "bootstrap_servers: a comma-separated list of host:port"),
    ],
)
def test_wrong_input_is_one_line(args, env, expected):
    res = run_cli(*args, env=env)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("linrec-stream: error: ") and expected in lines[0]
    assert "Traceback" not in res.stderr


def test_settings_prints_the_effective_values():
    res = run_cli("settings", "--set", "kafka_port=19999", env={"LINREC_TOPIC_INTERACTIONS": "ev"})
    assert res.returncode == 0
    assert "kafka_port = 19999" in res.stdout.splitlines()
    assert "topic_interactions = ev" in res.stdout.splitlines()


def test_readme_settings_reference_is_complete():
    from linrec_stream.settings import Settings
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    for name in Settings.names():
        assert f"| `{name}` | `LINREC_{name.upper()}` |" in readme, f"README lacks setting {name}"


def test_replay_of_an_empty_file_says_so(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    res = run_cli("replay", "--data", str(empty), "--no-progress")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"linrec-stream: error: nothing to replay: {empty} holds no events"


def test_a_wrong_state_dir_names_the_option(tmp_path):
    from tests.helpers import tiny_serving, write_run

    serving = tiny_serving(0, 10)
    model = write_run(tmp_path / "model", serving.model, serving.vocab.items)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for state_dir, expected in ((a_file, "exists and is not a directory"), (a_file / "x", "cannot be created (File exists)")):
        res = run_cli("worker", "--model", str(model), "--state-dir", str(state_dir), "--idle-exit", "1")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip() == f"linrec-stream: error: --state-dir {state_dir}: {expected}"

from pathlib import Path

import pytest

from linrec_stream.contracts.topics import project_topics
from linrec_stream.settings import Settings, SettingsError


def test_defaults_point_at_the_local_broker():
    s = Settings.load(env={})
    assert s.bootstrap_servers == "127.0.0.1:9092" == s.local_bootstrap
    topics = {t.name: (t.partitions, dict(t.configs)) for t in project_topics(s)}
    assert topics == {"interactions": (4, {"retention.ms": "-1"}), "recommendations": (4, {}),
                      "interactions-dlq": (1, {}), "model-updates": (1, {"cleanup.policy": "compact"}),
                      "user-state-changelog": (4, {"cleanup.policy": "compact"})}


def test_layers_file_then_env_then_flags(tmp_path: Path):
    cfg = tmp_path / "linrec.toml"
    cfg.write_text('kafka_port = 19000\ntopic_interactions = "from-file"\ninteractions_partitions = 8\n')
    s = Settings.load(config_file=cfg, env={"LINREC_KAFKA_PORT": "19001"})
    assert (s.kafka_port, s.topic_interactions, s.interactions_partitions) == (19001, "from-file", 8)
    s = Settings.load(config_file=cfg, env={"LINREC_KAFKA_PORT": "19001"}, overrides={"kafka_port": "19002"})
    assert s.kafka_port == 19002
    # The file can also come from the environment.
    s = Settings.load(env={"LINREC_CONFIG": str(cfg)})
    assert s.topic_interactions == "from-file"


def test_types_are_parsed():
    s = Settings.load(env={"LINREC_KAFKA_START_TIMEOUT_S": "2.5", "LINREC_DATA_DIR": "/tmp/d"})
    assert s.kafka_start_timeout_s == 2.5 and s.data_dir == Path("/tmp/d")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LINREC_KAFKA_PORT": "abc"}, "LINREC_KAFKA_PORT: expected an integer, got 'abc'"),
        ({"LINREC_KAFKA_PORT": "70000"}, "LINREC_KAFKA_PORT: a TCP port is 1..65535, got 70000"),
        ({"LINREC_SUMMARY_EVERY_S": "nan"}, "LINREC_SUMMARY_EVERY_S: must be a finite number > 0, got nan"),
        ({"LINREC_BOOTSTRAP_SERVERS": ""}, "LINREC_BOOTSTRAP_SERVERS: a comma-separated list of host:port, got ''"),
        ({"LINREC_BOOTSTRAP_SERVERS": "broker1"}, "LINREC_BOOTSTRAP_SERVERS: a comma-separated list of host:port, got 'broker1'"),
        ({"LINREC_INTERACTIONS_PARTITIONS": "0"}, "LINREC_INTERACTIONS_PARTITIONS: must be a finite number > 0, got 0"),
        ({"LINREC_TOPIC_INTERACTIONS": "no spaces"}, "LINREC_TOPIC_INTERACTIONS: a Kafka topic name"),
        ({"LINREC_KAFKA_HEAP": "lots"}, "LINREC_KAFKA_HEAP: a JVM heap size"),
        ({"LINREC_DEVICE": "tpu"}, "LINREC_DEVICE: one of auto, cpu, cuda"),
        ({"LINREC_STATE_DTYPE": "float8"}, "LINREC_STATE_DTYPE: one of float32, float16, bfloat16, got 'float8'"),
        ({"LINREC_NO_SUCH_THING": "1"}, "LINREC_NO_SUCH_THING: unknown setting"),
        ({"LINREC_EVENT_TIME": "kafka"}, "LINREC_EVENT_TIME: one of field, field_or_record, record, got 'kafka'"),
        ({"LINREC_EVENT_TIME_UNIT": "us"}, "LINREC_EVENT_TIME_UNIT: one of s, ms, got 'us'"),
        ({"LINREC_FIELD_USER": " user"}, "LINREC_FIELD_USER: a JSON field name"),
        ({"LINREC_FIELD_ITEM": "user"}, "settings field_user, field_item, field_ts, field_event_id must name four "
                                        "different fields, got user, user, ts, event_id"),
    ],
)
def test_a_wrong_value_names_the_setting(env, message):
    with pytest.raises(SettingsError) as err:
        Settings.load(env=env)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_state_dtype_defaults_to_float32_and_takes_the_half_precision_dtypes():
    assert Settings.load(env={}).state_dtype == "float32"
    for name in ("float16", "bfloat16"):
        assert Settings.load(env={"LINREC_STATE_DTYPE": name}).state_dtype == name


def test_file_errors(tmp_path: Path):
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load(config_file=tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("kafka_port = [1, 2]\n")
    with pytest.raises(SettingsError, match=r"bad.toml: kafka_port: expected an integer"):
        Settings.load(config_file=bad, env={})
    bad.write_text("[kafka]\nport = 1\n")
    with pytest.raises(SettingsError, match="flat"):
        Settings.load(config_file=bad, env={})
    bad.write_text("kafka_prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'kafka_prot'"):
        Settings.load(config_file=bad, env={})
    bad.write_text("kafka_port = true\n")
    with pytest.raises(SettingsError, match="expected an integer"):
        Settings.load(config_file=bad, env={})


@pytest.mark.parametrize("make", [lambda: Settings(batch_size=-5), lambda: Settings().replace(batch_size=-5),
                                  lambda: Settings().replace(batch_size="many")])
def test_every_construction_path_is_checked(make):
    with pytest.raises(SettingsError, match=r"^setting batch_size: "):
        make()


def test_replace_converts_and_refuses_unknown_names():
    s = Settings().replace(batch_size="64", data_dir="/tmp/d", kafka_start_timeout_s=3)
    assert (s.batch_size, s.data_dir, s.kafka_start_timeout_s) == (64, Path("/tmp/d"), 3.0)
    with pytest.raises(SettingsError, match="unknown setting 'batch_sise'"):
        Settings().replace(batch_sise=1)

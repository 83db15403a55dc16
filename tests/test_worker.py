"""The stream worker against the real broker and a real rocksdict store, run as a user runs it
(`linrec-stream worker` in a child process): exactly-once effect on state, dead letters,
recommendations, crash recovery, two workers, restore from the changelog."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from linrec_stream.broker.topics import create_topics, private_env
from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.events import Recommendation, Rejected, encode_event
from linrec_stream.model import LinRecModel, ModelConfig
from linrec_stream.settings import WORKER_ENGINES, Settings
from state.changelog import Changelog
from state.store import StateStore
from tests.conftest import REPO
from tests.helpers import read_topic, start_worker_args, stored_records, wait, write_run

pytestmark = pytest.mark.kafka

NUM_ITEMS = 300
PARTITIONS = 4


@dataclass
class Stream:
    """One test's private topics, model and expected outcome."""

    env: dict[str, str]
    settings: Settings
    model_dir: Path
    model: LinRecModel
    seqs: dict[str, list[int]]  # user -> item ids in stream order (valid events only)
    last_offset: dict[str, tuple[int, int]]  # user -> (partition, offset) of their last valid event
    malformed: dict[tuple[int, int], str]  # (partition, offset) -> expected reason


# The crash tests run on both worker engines: ``@BOTH_ENGINES`` (the fixture's param).
BOTH_ENGINES = pytest.mark.parametrize("stream", WORKER_ENGINES, indirect=True)


@pytest.fixture
def stream(broker: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Stream:
    return make_stream(broker.bootstrap_servers, tmp_path, getattr(request, "param", "kafka-python"))


def make_stream(bootstrap_servers: str, tmp_path: Path, engine: str, extra_env: dict[str, str] | None = None) -> Stream:
    """Private topics on ``bootstrap_servers`` and a small model, for one test."""
    tag = uuid.uuid4().hex[:8]
    env = {
        **private_env("w", tag), "LINREC_WORKER_ENGINE": engine,
        "LINREC_INTERACTIONS_PARTITIONS": str(PARTITIONS), "LINREC_METRICS_PORT": "0",
        "LINREC_SUMMARY_EVERY_S": "1", "LINREC_BOOTSTRAP_SERVERS": bootstrap_servers, **(extra_env or {}),
    }
    settings = Settings.load(env={**os.environ, **env})
    create_topics(settings)
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=NUM_ITEMS, hidden_size=16, num_layers=2, num_heads=2, attention="linrec",
                      max_len=16, dropout=0.0, inner_size=32)
    model = LinRecModel(cfg).eval()
    model_dir = write_run(tmp_path / "model", model, ["<pad>"] + [f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    return Stream(env, settings, model_dir, model, {}, {}, {})


MALFORMED = [
    (b"\xff\xfe not utf-8", "invalid_utf8"),
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (json.dumps({"user": "{user}", "ts": 1e9}).encode(), "missing_field"),
    (json.dumps({"user": "{user}", "item": 5.5, "ts": 1e9}).encode(), "bad_type"),
    (json.dumps({"user": "{user}", "item": "", "ts": 1e9}).encode(), "empty_field"),
    (json.dumps({"user": "{user}", "item": "x" * 300, "ts": 1e9}).encode(), "oversized_field"),
    (json.dumps({"user": "{user}", "item": "item-1", "ts": 1.7e12}).encode(), "bad_timestamp"),
    (b'{"user": "{user}", "item": "item-1", "ts": NaN}', "bad_timestamp"),
    (json.dumps({"user": "{user}", "item": "item-1", "ts": 1e9, "pad": "x" * 5000}).encode(), "oversized"),
]


def produce(stream: Stream, events: int, users: int, seed: int, malformed_every: int = 97) -> None:
    """Produce a synthetic log (each user walks items with a preference) with malformed messages
    mixed in; records the expected outcome in ``stream``."""
    rng = random.Random(seed)
    producer = KafkaConnection.from_settings(stream.settings).producer(linger_ms=10)
    futures = []
    t = 1_000_000_000.0 + seed * 1e6
    for i in range(events):
        user = f"user-{rng.randrange(users)}"
        if i % malformed_every == malformed_every - 1:
            raw, reason = MALFORMED[(i // malformed_every) % len(MALFORMED)]
            value = raw.replace(b"{user}", user.encode())
            futures.append(("bad", reason, producer.send(stream.settings.topic_interactions, key=user.encode(),
                                                          value=value)))
            continue
        item = rng.randrange(1, NUM_ITEMS + 1)
        t += rng.random()
        key, value = encode_event(user, f"item-{item}", t, event_id=f"e{seed}-{i}")
        futures.append(("ok", (user, item), producer.send(stream.settings.topic_interactions, key=key, value=value)))
    producer.flush()
    for kind, what, fut in futures:
        md = fut.get(timeout=30)
        if kind == "bad":
            stream.malformed[(md.partition, md.offset)] = what
        else:
            user, item = what
            stream.seqs.setdefault(user, []).append(item)
            stream.last_offset[user] = (md.partition, md.offset)
    producer.close()


def start_worker(stream: Stream, state_dir: Path, idle_exit: float | None = 6.0, batch_size: int = 256,
                 log_path: Path | None = None) -> subprocess.Popen:
    args = start_worker_args(state_dir, idle_exit, batch_size, stream.model_dir)
    out = open(log_path or os.devnull, "ab")
    return subprocess.Popen(args, env={**os.environ, **stream.env}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def parallel_states(model: LinRecModel, seqs: dict[str, list[int]], users: list[str]):
    """(user, state) for each of ``users``: the model's parallel encoding of the user's whole
    sequence ``seqs[user]`` (model item ids), 128 users at a time."""
    for start in range(0, len(users), 128):
        chunk = users[start:start + 128]
        n = max(len(seqs[u]) for u in chunk)
        seq = torch.zeros(len(chunk), n, dtype=torch.int64)
        for i, u in enumerate(chunk):
            seq[i, n - len(seqs[u]):] = torch.tensor(seqs[u])
        with torch.no_grad():
            _, expected = model.encode(seq)
        for i, u in enumerate(chunk):
            yield u, expected[i]


def check_outcome(stream: Stream, records: dict) -> None:
    """The three promises: exactly-once state, a recommendation naming each user's last event,
    every malformed message in the dead-letter topic with its reason."""
    model = stream.model
    assert set(records) == set(stream.seqs), "every user with valid events has a state, and no one else"
    users = sorted(stream.seqs)
    for user in users:
        rec, seq = records[user], stream.seqs[user]
        assert rec.events == len(seq), f"{user}: {rec.events} events applied, log has {len(seq)}"
        assert (rec.partition, rec.offset) == stream.last_offset[user]
    # Each stored state equals the model's parallel encoding of the user's whole sequence.
    for u, expected in parallel_states(model, stream.seqs, users):
        got = model.load_state_bytes(records[u].state)
        assert int(got.num_events[0]) == len(stream.seqs[u])
        torch.testing.assert_close(got.S[0], expected.S[0], rtol=1e-4, atol=1e-5)

    named = {}
    for r in read_topic(stream.settings, stream.settings.topic_recommendations):
        rec = Recommendation.from_bytes(r.value)
        assert rec.model_version == model.version and len(rec.items) == 10
        named.setdefault(rec.user, set()).add((rec.source.partition, rec.source.offset))
    for user in users:
        assert stream.last_offset[user] in named.get(user, set()), f"{user}: no recommendation for its last event"

    got = {}
    for r in read_topic(stream.settings, stream.settings.topic_dead_letter):
        dead = Rejected.from_message(r.key, r.value, r.headers)
        assert dead.source.topic == stream.settings.topic_interactions
        got[(dead.source.partition, dead.source.offset)] = dead.reason
    assert got == stream.malformed


@BOTH_ENGINES
def test_replay_through_one_worker_applies_each_event_once(stream: Stream, tmp_path: Path):
    import urllib.request

    from tests.conftest import free_port, run_cli

    produce(stream, events=20_000, users=500, seed=1)
    assert len(stream.seqs) == 500 and len(stream.malformed) >= 200
    port = free_port()
    stream.env["LINREC_METRICS_PORT"] = str(port)
    proc = start_worker(stream, tmp_path / "state", log_path=tmp_path / "worker.log")
    metrics = ""
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:  # scrape /metrics while the worker runs
        try:
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            pass
        time.sleep(0.5)
    wait(proc)
    check_outcome(stream, stored_records(tmp_path / "state"))
    log = (tmp_path / "worker.log").read_text()
    assert "malformed event(s)" in log and "partitions assigned" in log
    assert f"engine {stream.env['LINREC_WORKER_ENGINE']}," in log  # the engine asked for is the one that ran
    assert 'linrec_events_total{outcome="applied"}' in metrics
    assert "linrec_end_to_end_seconds_bucket" in metrics and "linrec_dead_letters_total" in metrics
    # `recs tail` shows what the worker produced.
    tail = run_cli("recs", "tail", "--from-beginning", "--max", "3", "--json", "--timeout", "20", env=stream.env)
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.strip().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["user"].startswith("user-") for line in lines)


def test_replay_cli_produces_in_time_order_keyed_by_user(stream: Stream, tmp_path: Path):
    from tests.conftest import run_cli

    log = tmp_path / "log.csv"
    log.write_text("user,item,timestamp\nbob,item-2,1000000300\nann,item-1,1000000100\nbob,item-3,1000000200\n"
                   "ann,item-9,1000000400\n")
    res = run_cli("replay", "--data", str(log), "--no-progress", "--to-ts", "1000000400", env=stream.env)
    assert res.returncode == 0, res.stderr
    assert "replayed 3 events" in res.stdout
    got = sorted(((json.loads(r.value)["ts"], r.key, json.loads(r.value)["item"])
                  for r in read_topic(stream.settings, stream.settings.topic_interactions)))
    assert got == [(1000000100, b"ann", "item-1"), (1000000200, b"bob", "item-3"), (1000000300, b"bob", "item-2")]


@BOTH_ENGINES
def test_sigkill_twice_then_restart(stream: Stream, tmp_path: Path):
    produce(stream, events=20_000, users=500, seed=2)
    state, rng = tmp_path / "state", random.Random(7)
    for run in range(2):
        log = tmp_path / f"killed-{run}.log"
        proc = start_worker(stream, state, idle_exit=None, batch_size=64, log_path=log)
        deadline = time.monotonic() + 120
        # Wait until it is applying events (a batch committed), then kill it somewhere mid-stream.
        while not re.search(r"totals: [1-9]", log.read_text() if log.exists() else "") \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert re.search(r"totals: [1-9]", log.read_text()), "the worker never applied events"
    wait(start_worker(stream, state, log_path=tmp_path / "worker.log"))
    check_outcome(stream, stored_records(state))


@BOTH_ENGINES
def test_two_workers_share_the_partitions(stream: Stream, tmp_path: Path):
    produce(stream, events=20_000, users=500, seed=3)
    a = start_worker(stream, tmp_path / "a", idle_exit=8, log_path=tmp_path / "a.log")
    b = start_worker(stream, tmp_path / "b", idle_exit=8, log_path=tmp_path / "b.log")
    wait(a)
    wait(b)
    assigned = [(tmp_path / n).read_text() for n in ("a.log", "b.log")]
    assert all("partitions assigned" in text for text in assigned)
    # A machine recovering every partition from the changelog sees the final states.
    fresh = StateStore(tmp_path / "recovered")
    Changelog(KafkaConnection.from_settings(stream.settings), stream.settings.topic_state_changelog).restore(
        fresh, range(PARTITIONS))
    records = {r.user: r for r in fresh.records()}
    fresh.close()
    check_outcome(stream, records)


def test_decaying_states_stream_exactly_like_the_parallel_form(stream: Stream, tmp_path: Path):
    # The same worker serving linrec_decay: each stored state, decayed event by event across
    # micro-batches (users sitting out a step must not decay), must equal the parallel encoding
    # of the user's whole sequence.
    from dataclasses import replace

    torch.manual_seed(1)
    stream.model = LinRecModel(replace(stream.model.config, attention="linrec_decay")).eval()
    stream.model.save(stream.model_dir / "model.pt")
    produce(stream, events=6_000, users=120, seed=6)
    wait(start_worker(stream, tmp_path / "state"))
    check_outcome(stream, stored_records(tmp_path / "state"))


def test_a_busy_worker_rides_out_a_broker_outage(tmp_path: Path):
    # Its own broker, stopped for longer than the clients' 30 s request timeout while the worker
    # is in the middle of a backlog, then started again on the same files.
    from tests.conftest import free_port, run_cli

    port, cport = free_port(), free_port()
    own = {"LINREC_KAFKA_PORT": str(port), "LINREC_KAFKA_CONTROLLER_PORT": str(cport),
           "LINREC_RUNTIME_DIR": str(tmp_path / "runtime")}
    started = run_cli("kafka", "start", env={**own, "LINREC_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"})
    assert started.returncode == 0, started.stderr
    try:
        stream = make_stream(f"127.0.0.1:{port}", tmp_path, "kafka-python", own)
        produce(stream, events=20_000, users=500, seed=8)
        log = tmp_path / "worker.log"
        proc = start_worker(stream, tmp_path / "state", idle_exit=55, batch_size=64, log_path=log)
        deadline = time.monotonic() + 120
        while not re.search(r"totals: [1-9]", log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run_cli("kafka", "stop", env=stream.env).returncode == 0
        time.sleep(35)
        assert proc.poll() is None, "the worker died during the outage:\n" + log.read_text()[-3000:]
        assert run_cli("kafka", "start", env=stream.env).returncode == 0
        produce(stream, events=2_000, users=500, seed=9)  # and the stream goes on
        wait(proc, timeout=300)
        text = log.read_text()
        # A step that failed while the broker was down says so, and says when it came back
        # (kafka-python may also just block until it reconnects: no line then).
        assert text.count("Kafka unreachable during") == text.count("Kafka reachable again after")
        check_outcome(stream, stored_records(tmp_path / "state"))
    finally:
        run_cli("kafka", "stop", env={**own, "LINREC_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"})


def test_a_damaged_store_is_moved_aside_and_restored_from_the_changelog(stream: Stream, tmp_path: Path):
    from tests.conftest import run_cli

    produce(stream, events=6_000, users=300, seed=10)
    state = tmp_path / "state"
    wait(start_worker(stream, state))
    (state / "CURRENT").write_text("garbage")  # a torn write of RocksDB's pointer to its manifest
    refused = run_cli("worker", "--model", str(stream.model_dir), "--state-dir", str(state), "--idle-exit", "1",
                      "--refuse-damaged-store", env=stream.env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert [line for line in refused.stderr.splitlines() if "error:" in line] == \
        [line for line in refused.stderr.splitlines() if "unreadable" in line], refused.stderr
    produce(stream, events=2_000, users=300, seed=11)
    wait(start_worker(stream, state, log_path=tmp_path / "again.log"))
    text = (tmp_path / "again.log").read_text()
    assert "unreadable" in text and "moved to" in text and "restored" in text
    assert list(tmp_path.glob("state.damaged-*")), "the damaged store is kept beside the new one"
    check_outcome(stream, stored_records(state))


def produce_with_librdkafka(stream: Stream, events: int, users: int, seed: int, codec: str) -> None:
    """Valid events sent by librdkafka (confluent-kafka), ``compression.type`` = ``codec``, with its
    own default partitioner (CRC32 of the key: consistent per user, not kafka-python's murmur2)."""
    from confluent_kafka import Producer

    rng = random.Random(seed)
    producer = Producer({"bootstrap.servers": stream.settings.bootstrap_servers, "compression.type": codec,
                         "linger.ms": 20})
    delivered: list = []
    t = 1_000_000_000.0 + seed * 1e6
    for i in range(events):
        user, item = f"user-{rng.randrange(users)}", rng.randrange(1, NUM_ITEMS + 1)
        t += rng.random()
        key, value = encode_event(user, f"item-{item}", t, event_id=f"{codec}-{seed}-{i}")
        producer.produce(stream.settings.topic_interactions, key=key, value=value,
                         on_delivery=lambda err, msg, what=(user, item): delivered.append((err, msg, what)))
        producer.poll(0)
    assert producer.flush(30) == 0
    for err, msg, (user, item) in sorted(delivered, key=lambda d: (d[1].partition(), d[1].offset())):
        assert err is None, err
        stream.seqs.setdefault(user, []).append(item)
        stream.last_offset[user] = (msg.partition(), msg.offset())


def test_events_of_an_aborted_transaction_are_never_applied(stream: Stream, tmp_path: Path):
    # An upstream that produces transactionally (Kafka Streams, Flink): what it aborted never
    # happened, and the worker reads committed data only (isolation_level, default read_committed).
    producer = KafkaConnection.from_settings(stream.settings).producer(
        transactional_id=f"upstream-{uuid.uuid4().hex[:6]}")
    producer.init_transactions()
    for committed, seed in ((False, 30), (True, 31)):
        rng = random.Random(seed)
        producer.begin_transaction()
        sent = []
        for i in range(100):
            user, item = f"user-{rng.randrange(40)}", rng.randrange(1, NUM_ITEMS + 1)
            key, value = encode_event(user, f"item-{item}", 1.1e9 + seed * 1e3 + i, event_id=f"t{seed}-{i}")
            sent.append(((user, item), producer.send(stream.settings.topic_interactions, key=key, value=value)))
        producer.flush()
        if committed:
            producer.commit_transaction()
            for (user, item), fut in sent:
                md = fut.get(timeout=10)
                stream.seqs.setdefault(user, []).append(item)
                stream.last_offset[user] = (md.partition, md.offset)
        else:
            producer.abort_transaction()
    producer.close()
    wait(start_worker(stream, tmp_path / "state"))
    check_outcome(stream, stored_records(tmp_path / "state"))  # the 100 committed, none of the aborted


def applied_order(stream: Stream) -> None:
    """Recompute the expected outcome from the interactions topic as the worker must apply it:
    each user's events in the order of their home partition (``home_partition``), the events
    a producer put elsewhere counted where the worker forwarded them (their copy's offset)."""
    from linrec_stream.contracts.events import EventSchema, Interaction, Source, parse_event
    from linrec_stream.contracts.topics import FORWARDED_FROM, home_partition

    stream.seqs.clear()
    stream.last_offset.clear()
    seen: set[str] = set()
    records = read_topic(stream.settings, stream.settings.topic_interactions)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        ev = parse_event(r.key, r.value, Source(r.topic, r.partition, r.offset, r.timestamp), EventSchema())
        forwarded = any(k == FORWARDED_FROM for k, _ in r.headers or ())
        if not isinstance(ev, Interaction) or (not forwarded and home_partition(r.key, PARTITIONS) != r.partition):
            continue
        assert ev.event_id not in seen, f"{ev.event_id} forwarded twice"
        seen.add(ev.event_id)
        stream.seqs.setdefault(ev.user, []).append(int(ev.item.removeprefix("item-")))
        stream.last_offset[ev.user] = (r.partition, r.offset)


@BOTH_ENGINES
def test_a_fleet_of_mixed_partitioners_and_codecs_gives_each_user_one_state(stream: Stream, tmp_path: Path):
    # The same users from kafka-python (murmur2, as Java) and librdkafka (CRC32): about 3/4 of
    # librdkafka's events land off their user's home partition. The worker forwards those home,
    # so every event is applied once, to one state per user; a worker on a new machine (an empty
    # state directory) restores exactly that from the changelog, then applies the events
    # produced since (this is also the suite's restore-on-an-empty-state-directory test).
    # librdkafka's batches come in every codec a Java or librdkafka producer uses in production
    # (one compressed producer used to stop the worker at its first poll, uncompressed events
    # included).
    produce(stream, events=1000, users=60, seed=40)
    for seed, codec in enumerate(("none", "gzip", "snappy")):
        produce_with_librdkafka(stream, events=200, users=60, seed=41 + seed, codec=codec)
    wait(start_worker(stream, tmp_path / "first", log_path=tmp_path / "first.log"))
    assert "forwarded to their home partition" in (tmp_path / "first.log").read_text()
    for seed, codec in enumerate(("lz4", "zstd")):
        produce_with_librdkafka(stream, events=200, users=60, seed=44 + seed, codec=codec)
    produce(stream, events=500, users=60, seed=46)
    wait(start_worker(stream, tmp_path / "second", log_path=tmp_path / "second.log"))
    assert "restored" in (tmp_path / "second.log").read_text()
    applied_order(stream)
    assert sum(map(len, stream.seqs.values())) == 2500 - len(stream.malformed)  # nothing lost, none twice
    check_outcome(stream, stored_records(tmp_path / "second"))

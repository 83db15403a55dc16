"""A chaos soak (issue 19), in the spirit of Kafka's own system tests (streams_eos_test.py: kill
things until a verifier says every record was delivered once).

A private broker; a log produced in chunks while the soak runs, with malformed and poison messages
mixed in; two workers in one group, each with its own state directory; and a controller that, at
random (seeded) moments, kills a worker (kill -9, restarted 0-3 s later), takes the broker down
(a clean stop or a kill -9, down 5-15 s in the short form) and starts it again on the same files,
or kills a worker and wipes its state directory before restarting it. At least five faults per run.

After the last chunk and the last fault the workers catch up (the group's committed offsets reach
the end of every partition), are stopped cleanly (SIGTERM), every partition is restored from the
changelog into a fresh store, and a verifier counts, per user: events applied against valid
events produced (lost, doubled), the stored state against the model's parallel encoding of the
user's events (float32, rtol 1e-4), a recommendation naming the user's last valid event; and
every malformed message in the dead-letter topic with its reason.

    .venv/bin/python -m tests.chaos --seconds 600 [--seed 1] [--engine kafka-python]

tests/test_chaos.py runs the short form (~90 s).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from linrec_stream.broker.broker import LocalBroker, _alive
from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.events import Interaction, EventSchema, Recommendation, Rejected, Source, encode_event, parse_event
from linrec_stream.settings import Settings
from state.changelog import Changelog
from state.store import StateStore
from tests.conftest import free_port
from tests.helpers import read_topic
from tests.test_worker import PARTITIONS, Stream, make_stream, parallel_states, produce, start_worker

MIN_FAULTS = 5
EVENTS_PER_CHUNK = 2_000
MAX_CHUNKS = 45
USERS = 500


# --- the report ------------------------------------------------------------------------------------
@dataclass
class Fault:
    t: float  # seconds since the soak began
    kind: str  # worker_kill | broker_restart | worker_wipe | crash (a worker that died on its own)
    target: str
    detail: str = ""

    def line(self) -> str:
        return f"chaos: t={self.t:7.1f}s  {self.kind:<14} {self.target:<8} {self.detail}".rstrip()


@dataclass
class SoakReport:
    seed: int
    seconds: float
    engine: str
    faults: list[Fault] = field(default_factory=list)
    events: int = 0  # valid events produced
    malformed: int = 0  # malformed and poison messages produced
    users: int = 0
    lost: int = 0  # events produced but not applied (summed over users)
    doubled: int = 0  # events applied more than once (summed over users)
    users_lost: int = 0
    users_doubled: int = 0
    users_missing: int = 0  # users with valid events but no state
    users_extra: int = 0  # states of users without valid events
    position_wrong: int = 0  # stored (partition, offset) is not the user's last valid event
    states_wrong: int = 0  # state differs from model.encode of the user's events
    recs_missing: int = 0  # users whose last valid event has no recommendation
    recs_bad: int = 0  # recommendations with the wrong model version or length
    dead_missing: int = 0  # malformed messages absent from the dead-letter topic
    dead_wrong_reason: int = 0
    dead_extra: int = 0  # dead letters for messages that were not malformed
    unclean_exits: list[str] = field(default_factory=list)  # a worker that did not stop cleanly on SIGTERM
    caught_up: bool = True
    catch_up_s: float = 0.0
    wall_s: float = 0.0
    workdir: str = ""
    examples: list[str] = field(default_factory=list)  # the first few problems, for the report

    @property
    def crashes(self) -> list[Fault]:
        return [f for f in self.faults if f.kind == "crash"]

    @property
    def injected(self) -> list[Fault]:
        return [f for f in self.faults if f.kind != "crash"]

    @property
    def ok(self) -> bool:
        counts = (self.lost, self.doubled, self.users_missing, self.users_extra, self.position_wrong,
                  self.states_wrong, self.recs_missing, self.recs_bad, self.dead_missing, self.dead_wrong_reason,
                  self.dead_extra)
        return (not any(counts) and not self.crashes and not self.unclean_exits and self.caught_up
                and len(self.injected) >= MIN_FAULTS)

    def verdict(self) -> str:
        kinds = Counter(f.kind for f in self.injected)
        parts = ", ".join(f"{kinds[k]} {name}" for k, name in
                          (("worker_kill", "worker kills"), ("broker_restart", "broker restarts"),
                           ("worker_wipe", "wipes")))
        states = "states ok" if not (self.states_wrong or self.position_wrong or self.users_missing
                                     or self.users_extra) else \
            (f"states WRONG ({self.states_wrong} states, {self.position_wrong} positions, "
             f"{self.users_missing} users missing, {self.users_extra} extra)")
        recs = "recommendations ok" if not (self.recs_missing or self.recs_bad) else \
            f"recommendations WRONG ({self.recs_missing} users without one for their last event, {self.recs_bad} bad)"
        dead = "dead letters ok" if not (self.dead_missing or self.dead_wrong_reason or self.dead_extra) else \
            (f"dead letters WRONG ({self.dead_missing} missing, {self.dead_wrong_reason} wrong reason, "
             f"{self.dead_extra} extra)")
        extra = []
        if self.crashes:
            extra.append(f"{len(self.crashes)} worker CRASH(ES)")
        if self.unclean_exits:
            extra.append("unclean stop: " + "; ".join(self.unclean_exits))
        if not self.caught_up:
            extra.append("the workers did NOT catch up")
        if len(self.injected) < MIN_FAULTS:
            extra.append(f"only {len(self.injected)} faults (< {MIN_FAULTS})")
        return (f"chaos: {len(self.injected)} faults ({parts}), {self.events:,} events, {self.malformed:,} malformed, "
                f"{self.users} users: lost {self.lost} ({self.users_lost} users), doubled {self.doubled} "
                f"({self.users_doubled} users), {states}, {recs}, {dead}"
                + ("; " + "; ".join(extra) if extra else "")
                + f" -> {'PASS' if self.ok else 'FAIL'}")

    def summary(self) -> str:
        lines = [f.line() for f in self.faults]
        lines.append(f"chaos: seed {self.seed}, engine {self.engine}, soak {self.seconds:.0f}s, caught up in "
                     f"{self.catch_up_s:.0f}s after the last fault, wall {self.wall_s:.0f}s")
        lines += [f"chaos: problem: {e}" for e in self.examples]
        lines.append(self.verdict())
        return "\n".join(lines)

    def assert_ok(self) -> None:
        assert self.ok, self.summary() + (f"\nchaos: work directory kept: {self.workdir}" if self.workdir else "")


# --- poison: messages that once took a worker down -------------------------------------------------
def poison_messages(user: str) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of a few poison messages for ``user``; their reasons come from parse_event."""
    u = user.encode()
    head = b'{"user": "' + u + b'", "item": "item-1", "ts": 1e9, '
    key, valid = encode_event(user, "item-1", 1e9)
    return [
        (u, b'{"user": "\\ud800", "item": "item-1", "ts": 1e9}'),  # a lone surrogate escape in an id
        (None, valid),  # a valid event without a key
        (u, b"[" * 3000 + b"]" * 3000),  # deep nesting (over max_event_bytes)
        (u, head + b'"a": ' + b"[" * 1990 + b"]" * 1990 + b"}"),  # deep nesting within max_event_bytes
        (u, head + b'"pad": "' + b"x" * (1_000_000 - len(head) - 12) + b'"}'),  # just under 1 MB
    ]


def produce_poison(stream: Stream, users: list[str]) -> Counter:
    """Send the poison messages for ``users``; records each expected reason (parse_event's) in
    ``stream.malformed`` by where it landed. Returns the reasons produced."""
    s = stream.settings
    limits = EventSchema.from_settings(s)
    producer = KafkaConnection.from_settings(s).producer(linger_ms=10, max_request_size=1_048_576)
    sent = []
    for user in users:
        for key, value in poison_messages(user):
            sent.append((key, value, producer.send(s.topic_interactions, key=key, value=value)))
    producer.flush()
    reasons = Counter()
    for key, value, fut in sent:
        md = fut.get(timeout=30)
        out = parse_event(key, value, Source(s.topic_interactions, md.partition, md.offset, 0), limits)
        assert not isinstance(out, Interaction), "a poison message parsed as a valid event"
        stream.malformed[(md.partition, md.offset)] = out.reason
        reasons[out.reason] += 1
    producer.close()
    return reasons


# --- the soak --------------------------------------------------------------------------------------
class Soak:
    def __init__(self, tmp_path: Path, seconds: float, seed: int, engine: str) -> None:
        self.tmp, self.seconds, self.seed, self.engine = tmp_path, seconds, seed, engine
        self.rng = random.Random(seed)
        self.report = SoakReport(seed, seconds, engine, workdir=str(tmp_path))
        self.broker_lock = threading.Lock()  # the producer never sends while the controller downs the broker
        self.procs: dict[str, subprocess.Popen] = {}
        self.expected_exit: set[str] = set()
        self.t0 = time.monotonic()
        self.short = seconds <= 120
        self.chunks = min(MAX_CHUNKS, max(4, int(seconds / 15)))
        self.events_per_chunk = max(EVENTS_PER_CHUNK, int(seconds * 40 / self.chunks))
        self.produced_all = threading.Event()
        self.producer_error: BaseException | None = None

    # the pieces
    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, fault: Fault) -> None:
        self.report.faults.append(fault)
        print(fault.line(), flush=True)

    def log_path(self, name: str) -> Path:
        return self.tmp / f"worker-{name}.log"

    def state_dir(self, name: str) -> Path:
        return self.tmp / f"state-{name}"

    def start(self, name: str) -> None:
        with open(self.log_path(name), "a") as f:
            f.write(f"=== chaos: worker {name} started at t={self.now():.1f}s\n")
        self.procs[name] = start_worker(self.stream, self.state_dir(name), idle_exit=None, batch_size=64,
                                        log_path=self.log_path(name))

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        self.expected_exit.add(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.expected_exit.discard(name)

    def check_crashes(self) -> None:
        """A worker that exited without being killed is a crash: recorded, then restarted."""
        for name, proc in list(self.procs.items()):
            if name not in self.expected_exit and proc.poll() is not None:
                tail = self.log_path(name).read_text(errors="replace").splitlines()[-15:]
                self.say(Fault(self.now(), "crash", name, f"exit code {proc.returncode}"))
                self.report.examples.append(f"worker {name} exited {proc.returncode} at t={self.now():.1f}s; "
                                            "log tail:\n    " + "\n    ".join(tail))
                self.start(name)

    def wait_running(self, name: str, timeout: float = 90) -> None:
        """Until the worker's latest start has reached its loop (its start line is logged)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path(name).read_text(errors="replace")
            if "worker: model" in text.rsplit("=== chaos:", 1)[-1]:
                return
            if self.procs[name].poll() is not None:
                return  # check_crashes reports it
            time.sleep(0.3)

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.check_crashes()
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    # the faults
    def worker_kill(self, wipe: bool) -> None:
        name = self.rng.choice(["a", "b"])
        delay = self.rng.uniform(0.0, 3.0)
        t = self.now()
        self.kill(name)
        if wipe:
            shutil.rmtree(self.state_dir(name), ignore_errors=True)
        self.say(Fault(t, "worker_wipe" if wipe else "worker_kill", name,
                       f"kill -9{', state directory wiped' if wipe else ''}, restarted after {delay:.1f}s"))
        time.sleep(delay)
        self.start(name)
        self.wait_running(name)

    def broker_restart(self) -> None:
        down = self.rng.uniform(5, 15) if self.short else self.rng.uniform(5, 40)
        how = self.rng.choice(["stop", "kill -9"])
        with self.broker_lock:
            t = self.now()
            if how == "stop":
                self.broker.stop()
            else:
                pid = self.broker.status().pid
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    while _alive(pid):
                        time.sleep(0.1)
            self.sleep(down)
            t_up = time.monotonic()
            self.broker.start(log=lambda m: None)
            self.say(Fault(t, "broker_restart", "broker",
                           f"{how}, down {down:.1f}s, back up after {time.monotonic() - t_up:.1f}s more"))

    # the threads
    def producer(self) -> None:
        try:
            users = [f"user-{i}" for i in range(USERS)]
            for k in range(self.chunks):
                target = self.seconds * k / self.chunks
                while self.now() < target:
                    time.sleep(0.2)
                with self.broker_lock:
                    # produce() stamps events from 1e9 + seed * 1e6 on (seconds): kept in the past
                    # (a future one is a bad_timestamp), one seed per chunk (unique event ids).
                    produce(self.stream, events=self.events_per_chunk, users=USERS,
                            seed=(self.seed % 12) * MAX_CHUNKS + k, malformed_every=97)
                    produce_poison(self.stream, self.rng_poison.sample(users, 2))
        except BaseException as exc:  # reported by run()
            self.producer_error = exc
        finally:
            self.produced_all.set()

    def controller(self) -> None:
        plan = ["worker_kill", "broker_restart", "worker_wipe"]
        self.rng.shuffle(plan)
        gap = (4, 10) if self.short else (5, 25)
        n = 0
        while n < MIN_FAULTS or self.now() < self.seconds:
            self.sleep(self.rng.uniform(*gap))
            kind = plan[n] if n < len(plan) else self.rng.choices(
                ["worker_kill", "broker_restart", "worker_wipe"], weights=[4, 3, 3])[0]
            if kind == "broker_restart":
                self.broker_restart()
            else:
                self.worker_kill(wipe=kind == "worker_wipe")
            n += 1

    # the whole run
    def run(self) -> SoakReport:
        port, cport = free_port(), free_port()
        own = {"LINREC_KAFKA_PORT": str(port), "LINREC_KAFKA_CONTROLLER_PORT": str(cport),
               "LINREC_RUNTIME_DIR": str(self.tmp / "runtime"), "LINREC_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}
        self.broker = LocalBroker(Settings.load(env={**os.environ, **own}))
        self.broker.start(log=lambda m: None)
        try:
            self.stream = make_stream(f"127.0.0.1:{port}", self.tmp, self.engine, own)
            self.rng_poison = random.Random(self.seed + 1)
            self.t0 = time.monotonic()
            for name in ("a", "b"):
                self.start(name)
            for name in ("a", "b"):  # (a worker started while the broker is down gives up after 30 s)
                self.wait_running(name)
            producer = threading.Thread(target=self.producer, name="chaos-producer", daemon=True)
            producer.start()
            self.controller()
            while not self.produced_all.is_set():
                self.sleep(1)
            producer.join()
            if self.producer_error is not None:
                raise RuntimeError("producing the log failed") from self.producer_error
            t_last = time.monotonic()
            self.report.caught_up = self.catch_up(timeout=180 if self.short else 600)
            self.report.catch_up_s = time.monotonic() - t_last
            self.stop_workers()
            self.verify()
        finally:
            for name, proc in self.procs.items():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self.broker.stop()
        self.report.wall_s = time.monotonic() - self.t0
        return self.report

    def catch_up(self, timeout: float) -> bool:
        """Until the group's committed offsets stand at the end of every partition (for 3 s).
        The broker may have just come back: its answers are asked for again until it gives them."""
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        s = self.stream.settings
        tps = [TopicPartition(s.topic_interactions, p) for p in range(PARTITIONS)]
        consumer = admin = None
        end = None
        deadline, since = time.monotonic() + timeout, None
        try:
            while time.monotonic() < deadline:
                self.check_crashes()
                try:
                    consumer = consumer or KafkaConnection.from_settings(s).consumer(group_id=None)
                    admin = admin or KafkaConnection.from_settings(s).admin()
                    end = end or consumer.end_offsets(tps)
                    committed = admin.list_group_offsets(s.worker_group).get(s.worker_group, {})
                except KafkaError:  # e.g. CoordinatorLoadInProgressError right after a restart
                    time.sleep(1)
                    continue
                done = all(committed.get(tp) is not None and committed[tp].offset >= end[tp] for tp in tps)
                if done:
                    since = since or time.monotonic()
                    if time.monotonic() - since >= 3:
                        return True
                else:
                    since = None
                time.sleep(1)
            return False
        finally:
            for client in (consumer, admin):
                if client is not None:
                    client.close()

    def stop_workers(self) -> None:
        for name in self.procs:
            self.expected_exit.add(name)
            self.procs[name].send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = "none (killed after 90 s)"
            if code != 0:
                self.report.unclean_exits.append(f"worker {name} exited {code}")

    # the verifier
    def verify(self) -> None:
        stream, r = self.stream, self.report
        fresh = StateStore(self.tmp / "recovered")
        try:
            connection = KafkaConnection.from_settings(stream.settings)
            changelog = Changelog(connection, stream.settings.topic_state_changelog)
            changelog.restore(fresh, range(PARTITIONS))
            records = {rec.user: rec for rec in fresh.records()}
        finally:
            fresh.close()
        r.events = sum(len(seq) for seq in stream.seqs.values())
        r.malformed = len(stream.malformed)
        r.users = len(stream.seqs)
        r.users_missing = len(set(stream.seqs) - set(records))
        r.users_extra = len(set(records) - set(stream.seqs))
        if r.users_missing:
            r.examples.append(f"users without a state: {sorted(set(stream.seqs) - set(records))[:5]}")
        users = sorted(set(stream.seqs) & set(records))
        for user in users:
            applied, expected = records[user].events, len(stream.seqs[user])
            if applied < expected:
                r.lost += expected - applied
                r.users_lost += 1
            elif applied > expected:
                r.doubled += applied - expected
                r.users_doubled += 1
            if applied != expected and len(r.examples) < 8:
                r.examples.append(f"{user}: {applied} events applied, log has {expected}")
            if (records[user].partition, records[user].offset) != stream.last_offset[user]:
                r.position_wrong += 1
        model = stream.model
        for u, expected in parallel_states(model, stream.seqs, users):
            got = model.load_state_bytes(records[u].state)
            good = int(got.num_events[0]) == len(stream.seqs[u]) and torch.allclose(
                got.S[0], expected.S[0], rtol=1e-4, atol=1e-5)
            if not good:
                r.states_wrong += 1
                if len(r.examples) < 8:
                    r.examples.append(f"{u}: stored state differs from model.encode of its {len(stream.seqs[u])} events")

        named: dict[str, set] = {}
        for m in read_topic(stream.settings, stream.settings.topic_recommendations):
            rec = Recommendation.from_bytes(m.value)
            if rec.model_version != model.version or len(rec.items) != 10:
                r.recs_bad += 1
            named.setdefault(rec.user, set()).add((rec.source.partition, rec.source.offset))
        for user in stream.seqs:
            if stream.last_offset[user] not in named.get(user, set()):
                r.recs_missing += 1

        got: dict[tuple[int, int], str] = {}
        for m in read_topic(stream.settings, stream.settings.topic_dead_letter):
            dead = Rejected.from_message(m.key, m.value, m.headers)
            got[(dead.source.partition, dead.source.offset)] = dead.reason
        for where, reason in stream.malformed.items():
            if where not in got:
                r.dead_missing += 1
            elif got[where] != reason:
                r.dead_wrong_reason += 1
                if len(r.examples) < 8:
                    r.examples.append(f"dead letter at {where}: reason {got[where]!r}, expected {reason!r}")
        r.dead_extra = len(set(got) - set(stream.malformed))


def run_soak(tmp_path: Path, seconds: float, seed: int, engine: str = "kafka-python") -> SoakReport:
    """One chaos soak in ``tmp_path``; prints each fault as it happens and the verdict at the end.
    Returns the report (``report.assert_ok()`` asserts the verdict)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    report = Soak(tmp_path, seconds, seed, engine).run()
    print(report.summary(), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90, help="how long faults are injected (default 90)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine", default="kafka-python", choices=["kafka-python", "faust"])
    parser.add_argument("--workdir", type=Path, default=None, help="where to run (default: a new temporary directory)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="linrec-chaos-"))
    print(f"chaos: {platform.machine()}, {os.cpu_count()} cores, broker on the same box; work directory {workdir}",
          flush=True)
    report = run_soak(workdir, args.seconds, args.seed, args.engine)
    if report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    print(f"chaos: work directory kept: {workdir}")
    return 1


if __name__ == "__main__":
    sys.exit(main())

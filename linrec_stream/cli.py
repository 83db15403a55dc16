"""The ``linrec-stream`` command line.

Every subcommand builds one :class:`~linrec_stream.settings.Settings` (defaults, file,
``LINREC_*`` environment, flags) and reports failures as one line on stderr, exit code 2
for usage and settings errors, 1 for runtime failures. No tracebacks for expected errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from linrec_stream.settings import Settings, SettingsError

PROG = "linrec-stream"


class UsageError(Exception):
    """Wrong command-line usage; exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and never exits mid-parse."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _common_options() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("settings")
    g.add_argument("--config", metavar="PATH", help="TOML settings file (else $LINREC_CONFIG)")
    g.add_argument("--bootstrap-servers", metavar="HOST:PORT", help="Kafka bootstrap servers")
    g.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
        help="override any setting (repeatable); see `linrec-stream settings`",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(prog=PROG, description="Streaming, incremental sequential recommender (LinRec).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    kafka = sub.add_parser("kafka", help="run the local Apache Kafka broker")
    ksub = kafka.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    ksub.required = True
    ksub.add_parser("start", parents=[common], help="start it (fetching it once), wait until it answers").set_defaults(
        func=_kafka_start
    )
    ksub.add_parser("stop", parents=[common], help="shut it down cleanly").set_defaults(func=_kafka_stop)
    ksub.add_parser("status", parents=[common], help="is it running, and where").set_defaults(func=_kafka_status)
    check = ksub.add_parser("check", parents=[common], help="produce and consume messages through the broker")
    check.add_argument("--messages", type=int, default=10_000, help="how many (default 10000)")
    check.set_defaults(func=_kafka_check)

    topics = sub.add_parser("topics", help="the project's Kafka topics")
    tsub = topics.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    tsub.required = True
    tsub.add_parser("create", parents=[common], help="create missing topics (idempotent)").set_defaults(
        func=_topics_create
    )

    st = sub.add_parser("settings", parents=[common], help="print the effective settings")
    st.add_argument("--markdown", action="store_true", help="print the settings reference as a Markdown table")
    st.set_defaults(func=_settings)

    data = sub.add_parser("data", help="interaction data sets")
    dsub = data.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    fetch = dsub.add_parser("fetch", parents=[common], help="fetch a MovieLens data set into data_dir (once)")
    fetch.add_argument("name", choices=["ml-1m", "ml-100k"])
    fetch.set_defaults(func=_data_fetch)

    tr = sub.add_parser("train", parents=[common], help="train a model on a log (leave-one-out, full ranking)")
    tr.add_argument("--data", required=True, metavar="ml-1m|ml-100k|PATH",
                    help="a data set name (fetched once) or a .inter / ratings.dat / CSV / TSV file")
    # The architecture flags default to None so that --init-from can tell a flag given from a
    # default: TRAIN_ARCH holds the defaults.
    tr.add_argument("--attention", help="default linrec_decay",
                    choices=["linrec", "linrec_decay", "linrec_seqnorm", "linear", "softmax", "linrec_bidir"])
    tr.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory")
    tr.add_argument("--hidden", type=int, help="default 64")
    tr.add_argument("--layers", type=int, help="default 2")
    tr.add_argument("--heads", type=int, help="default 2")
    tr.add_argument("--inner", type=int, help="feed-forward width, default 256")
    tr.add_argument("--max-len", type=int, help="default 200")
    tr.add_argument("--dropout", type=float, help="default 0.2 (with --init-from: that model's)")
    tr.add_argument("--init-from", type=Path, metavar="DIR",
                    help="start from the best model of this run directory (its architecture and weights; "
                         "items it does not know get fresh rows), e.g. to fine-tune with --history full")
    tr.add_argument("--epochs", type=int, default=200)
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--patience", type=int, default=10, help="early stop after N epochs without a better NDCG@10")
    tr.add_argument("--seed", type=int, default=42)
    tr.add_argument("--max-minutes", type=float, metavar="M",
                    help="wall-clock budget: start no epoch after M minutes (the best checkpoint is kept)")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"])
    tr.add_argument("--history", choices=["window", "full"], default="window",
                    help="train (and validate) on each user's last --max-len events, the protocol, or on "
                         "every event, as a stream worker serves them (causal attentions only)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    tr.add_argument("--skip-malformed", action="store_true", help="skip (and count) malformed lines")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", parents=[common], help="evaluate a trained model")
    ev.add_argument("--model", required=True, type=Path, metavar="DIR")
    ev.add_argument("--data", required=True, metavar="ml-1m|ml-100k|PATH")
    ev.add_argument("--protocol", choices=["full", "pop100"], default="full",
                    help="full ranking (default) or the target vs 100 popularity-sampled negatives")
    ev.add_argument("--split", choices=["test", "valid"], default="test")
    ev.add_argument("--seed", type=int, default=0, help="seed of the pop100 negatives")
    ev.add_argument("--history", choices=["window", "full"], default="window",
                    help="encode the last max-len events (the protocol, as in training) or every "
                         "event (what a stream worker's state holds)")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--skip-malformed", action="store_true")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_evaluate)

    worker = sub.add_parser("worker", parents=[common], help="run a stream worker (Ctrl-C / SIGTERM stops it)")
    worker.add_argument("--model", type=Path, metavar="DIR",
                        help="serve this trained model directory, fixed (default: the registry's version in force, "
                             "swapped without a restart when another is promoted)")
    worker.add_argument("--swap-batch", type=int, default=512, metavar="N",
                        help="users rebuilt per step of the background sweep after a model swap")
    worker.add_argument("--batch-size", type=int, help="most events per micro-batch (setting batch_size)")
    worker.add_argument("--batch-ms", type=int, help="longest wait to fill a micro-batch (setting batch_ms)")
    worker.add_argument("--device", choices=["auto", "cpu", "cuda"])
    worker.add_argument("--state-dir", type=Path, metavar="DIR", help="rocksdict user-state store (setting state_dir)")
    worker.add_argument("--idle-exit", type=float, metavar="S", help="exit after S seconds without events")
    worker.set_defaults(func=_worker)

    models = sub.add_parser("models", help="the model registry: versions, the one in force, promote, rollback")
    msub = models.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    msub.required = True
    ml = msub.add_parser("list", parents=[common], help="every registered version, oldest first (* = in force)")
    ml.add_argument("--json", action="store_true", help="one JSON array of model cards")
    ml.set_defaults(func=_models_list)
    ms = msub.add_parser("show", parents=[common], help="one version's card (a unique prefix will do)")
    ms.add_argument("version", metavar="V")
    ms.set_defaults(func=_models_show)
    ma = msub.add_parser("add", parents=[common], help="register a trained run directory (from `train`)")
    ma.add_argument("run", type=Path, metavar="RUN_DIR")
    ma.add_argument("--promote", action="store_true", help="and put it in force (announced to workers)")
    ma.add_argument("--note", default="", help="free text kept in the card")
    ma.set_defaults(func=_models_add)
    mp = msub.add_parser("promote", parents=[common], help="put a version in force; running workers swap to it")
    mp.add_argument("version", metavar="V")
    mp.set_defaults(func=_models_promote)
    msub.add_parser("rollback", parents=[common], help="go back to the version in force before the current one"
                    ).set_defaults(func=_models_rollback)

    rp = sub.add_parser("replay", parents=[common], help="replay a historical log into Kafka in time order")
    rp.add_argument("--data", required=True, metavar="ml-1m|ml-100k|PATH")
    rp.add_argument("--topic", help="default: the interactions topic")
    pace = rp.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, metavar="N", help="N events/s (default: as fast as possible)")
    pace.add_argument("--speed", type=float, metavar="X", help="X times real time")
    rp.add_argument("--limit", type=int, metavar="N", help="stop after N events")
    rp.add_argument("--from-ts", type=float, metavar="T", help="only events with ts >= T (epoch seconds)")
    rp.add_argument("--to-ts", type=float, metavar="T", help="only events with ts < T (epoch seconds)")
    rp.add_argument("--skip-malformed", action="store_true")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=_replay)

    recs = sub.add_parser("recs", help="recommendations as they arrive")
    rsub = recs.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    rsub.required = True
    tail = rsub.add_parser("tail", parents=[common], help="print recommendations as they arrive")
    tail.add_argument("--json", action="store_true", help="one JSON object per line, as produced")
    tail.add_argument("--max", type=int, metavar="N", help="stop after N recommendations")
    tail.add_argument("--timeout", type=float, default=None, metavar="S", help="stop after S seconds without one")
    tail.add_argument("--from-beginning", action="store_true")
    tail.set_defaults(func=_recs_tail)

    retrain = sub.add_parser(
        "retrain", parents=[common],
        help="retrain on the event archive (warm start), publish the candidate if it is not worse than the current",
    )
    retrain.add_argument("--every", metavar="DURATION",
                         help="repeat on this schedule (30s, 15m, 24h, 2d) until stopped; default: one round")
    retrain.add_argument("--epochs", type=int, default=20)
    retrain.add_argument("--patience", type=int, default=3, help="early stop after N epochs without a better NDCG@10")
    retrain.add_argument("--lr", type=float, default=1e-3)
    retrain.add_argument("--batch-size", type=int, default=128)
    retrain.add_argument("--margin", type=float, default=0.005, metavar="X",
                         help="publish if candidate NDCG@10 >= current NDCG@10 - X (absolute; default 0.005)")
    retrain.add_argument("--from-scratch", action="store_true",
                         help="do not copy the current version's weights (its architecture is kept)")
    retrain.add_argument("--base-data", metavar="ml-1m|ml-100k|PATH",
                         help="an initial log merged with the archive (history never replayed into Kafka)")
    retrain.add_argument("--max-minutes", type=float, metavar="M", help="training time budget per round")
    retrain.add_argument("--history", choices=["window", "full"], default="window",
                         help="train and compare on each user's last max-len events or on every event, as served")
    retrain.add_argument("--seed", type=int, default=42)
    retrain.add_argument("--device", choices=["auto", "cpu", "cuda"])
    retrain.add_argument("--no-progress", action="store_true", help="no progress bars")
    retrain.set_defaults(func=_retrain)

    qs = sub.add_parser(
        "quickstart", parents=[common],
        help="the main job on one machine: broker, ML-1M, a model, a worker, replay, live recommendations",
    )
    qs.add_argument("--data", default="ml-1m", metavar="ml-1m|ml-100k|PATH")
    qs.add_argument("--model", type=Path, metavar="DIR", help="a trained model (default: train a small one once)")
    qs.add_argument("--warm-fraction", type=float, default=0.9, help="share of the log (by time) to warm up with")
    qs.add_argument("--live-rate", type=float, default=1000.0, help="events/s for the rest")
    qs.add_argument("--train-epochs", type=int, default=3)
    qs.add_argument("--no-retrain", action="store_true",
                    help="skip the last stage (a retraining round on the archive, published and hot-swapped)")
    qs.set_defaults(func=_quickstart)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, str] = {}
    for item in args.overrides:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SettingsError(f"--set {item!r}: expected NAME=VALUE")
        overrides[name.strip().replace("-", "_")] = value
    if args.bootstrap_servers:
        overrides["bootstrap_servers"] = args.bootstrap_servers
    return Settings.load(config_file=args.config, overrides=overrides)


# --- commands -------------------------------------------------------------------------------
def _kafka_start(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.broker import LocalBroker

    res = LocalBroker(settings).start(log=_info)
    if res.already_running:
        print(f"already running: {res.status.describe()}")
    else:
        first = " (storage formatted on first use)" if res.formatted else ""
        print(
            f"Kafka {settings.kafka_version} ready at {res.status.bootstrap} in {res.seconds:.1f}s"
            f"{first}; pid {res.status.pid}, files in {res.status.root}"
        )
    return 0


def _kafka_stop(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.broker import LocalBroker

    res = LocalBroker(settings).stop()
    if not res.was_running:
        print("Kafka broker was not running")
    elif res.killed:
        print(f"Kafka broker did not stop within its timeout and was killed ({res.seconds:.1f}s)")
    else:
        print(f"Kafka broker stopped cleanly in {res.seconds:.1f}s")
    return 0


def _kafka_status(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.broker import LocalBroker

    status = LocalBroker(settings).status()
    print(status.describe())
    return 0 if status.running else 3


def _kafka_check(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.roundtrip import roundtrip

    if args.messages < 1:
        raise UsageError("--messages must be >= 1")
    rt = roundtrip(settings, messages=args.messages)
    problems = rt.problems()
    rate = rt.sent / rt.total_s if rt.total_s else float("inf")
    if problems:
        print(f"round trip through {settings.bootstrap_servers} FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(
        f"round trip through {settings.bootstrap_servers}: {rt.sent} keyed messages produced in {rt.produce_s:.2f}s, "
        f"all consumed back in {rt.total_s:.2f}s ({rate:,.0f} msg/s), each exactly once, in order per partition"
    )
    return 0


def _topics_create(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.topics import create_topics

    for t in create_topics(settings):
        print(f"{t.name:<24} {t.partitions:>3} partition(s)  {'created' if t.created else 'exists'}")
    return 0


def _data_fetch(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.data import fetch_dataset

    path = fetch_dataset(args.name, settings.path(settings.data_dir), log=_info)
    print(f"{args.name}: {path}")
    return 0


def _device(settings: Settings, args: argparse.Namespace):
    from linrec_stream.training.train import resolve_device

    try:
        return resolve_device(args.device or settings.device)
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from None


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.training.experiment import prepare, run_training
    from linrec_stream.model import ModelConfig
    from linrec_stream.training.train import TrainConfig

    device = _device(settings, args)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    if not args.resume and (args.out / "last.pt").exists():
        raise UsageError(f"--out {args.out} holds a run already: pass --resume to continue it, or choose another")
    try:
        tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                         seed=args.seed, max_minutes=args.max_minutes, history=args.history)
    except ValueError as exc:
        raise UsageError(f"--{str(exc).split()[0].replace('_', '-')}: {exc}") from None
    given = {flag: getattr(args, flag.replace("-", "_")) for flag in TRAIN_ARCH}
    init = None
    if args.init_from is None:
        prepared = prepare(args.data, settings.path(settings.data_dir), args.skip_malformed, log=_info)
        arch = {TRAIN_ARCH[f][0]: TRAIN_ARCH[f][1] if v is None else v for f, v in given.items()}
        try:
            mc = ModelConfig(num_items=prepared.split.data.num_items, **arch)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        mc, init, prepared = _init_from(settings, args, given)
    _info(f"training {mc.attention} on {device} into {args.out}")
    run_training(prepared, mc, tc, args.out, device, resume=args.resume, progress=not args.no_progress, log=_info,
                 init=init)
    print(f"model: {args.out / 'model.pt'}  curves: {args.out / 'curves.png'}  metrics: {args.out / 'meta.json'}")
    return 0


#: train's architecture flags: the ModelConfig field each sets, and its default.
TRAIN_ARCH = {"attention": ("attention", "linrec_decay"), "hidden": ("hidden_size", 64),
              "layers": ("num_layers", 2), "heads": ("num_heads", 2), "inner": ("inner_size", 256),
              "max-len": ("max_len", 200), "dropout": ("dropout", 0.2)}


def _init_from(settings: Settings, args: argparse.Namespace, given: dict):
    """train --init-from: the model config, the warm start and the data in that model's item ids.
    The architecture is the model's; a flag that contradicts it is a usage error (--dropout,
    which shapes no weight, may change)."""
    import dataclasses

    from linrec_stream.model.run_dir import load_run
    from linrec_stream.training.experiment import init_from_run, prepare

    try:
        parent, vocab = load_run(args.init_from)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--init-from: {exc}") from None
    prepared = prepare(args.data, settings.path(settings.data_dir), args.skip_malformed, log=_info,
                       base_vocab=vocab)
    mc, init = init_from_run(args.init_from, parent, vocab, prepared, args.seed, log=_info)
    for flag, value in given.items():
        field = TRAIN_ARCH[flag][0]
        if value is not None and field != "dropout" and value != getattr(mc, field):
            raise UsageError(f"--{flag} {value}: the model in --init-from {args.init_from} has "
                             f"{field} {getattr(mc, field)} (its architecture is kept; leave the flag out)")
    if given["dropout"] is not None:
        try:
            mc = dataclasses.replace(mc, dropout=given["dropout"])
        except ValueError as exc:
            raise UsageError(f"--dropout: {exc}") from None
    return mc, init, prepared


def _retrain(settings: Settings, args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from linrec_stream.lifecycle.retrain import RetrainConfig, parse_duration, retrain_once, run_every

    every_s = None
    if args.every is not None:
        try:
            every_s = parse_duration(args.every)
        except ValueError as exc:
            raise UsageError(f"--every: {exc}") from None
    try:
        config = RetrainConfig(epochs=args.epochs, patience=args.patience, lr=args.lr, batch_size=args.batch_size,
                               margin=args.margin, from_scratch=args.from_scratch, seed=args.seed,
                               max_minutes=args.max_minutes, base_data=args.base_data, history=args.history)
    except ValueError as exc:
        raise UsageError(f"--{str(exc).split()[0].replace('_', '-')}: {exc}") from None
    device = _device(settings, args)
    # kafka-python logs every failed connection attempt; an unreachable broker is reported once,
    # as this command's own one-line error.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    progress = not args.no_progress
    if every_s is None:
        result = retrain_once(settings, config, device, log=_info, progress=progress)
        print(f"{result.decision} {result.version} (registry {settings.path(settings.registry_dir)}, "
              f"current {(result.version if result.published else result.parent)[:12]})")
        return 0
    def interrupt(*_: object) -> None:
        # Stop at once, also mid-round: the round's clean-up (its work folder) runs on the way
        # out, and the registry's writes are atomic, so no half-written version is left.
        stop.set()
        raise KeyboardInterrupt

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupt)
    _info(f"retrain: every {args.every} on {device}, registry {settings.path(settings.registry_dir)}")
    try:
        rounds = run_every(settings, config, every_s, device, log=_info, stop=stop, progress=progress)
    except KeyboardInterrupt:
        _info("retrain: stopped")
        return 0
    _info(f"retrain: stopped after {rounds} round(s)")
    return 0


def _evaluate(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from linrec_stream.training.evaluate import evaluate, popularity_counts
    from linrec_stream.model.run_dir import load_run
    from linrec_stream.training.experiment import format_metrics, prepare, remap

    device = _device(settings, args)
    model, vocab = load_run(args.model, device)
    log = (lambda m: None) if args.json else _info
    prepared = prepare(args.data, settings.path(settings.data_dir), args.skip_malformed, log=log)
    data, skipped = remap(prepared.split, vocab, args.split)
    if len(data) == 0:
        raise UsageError(f"--data {args.data}: no user's target item is known to the model in {args.model}")
    train_seqs = [s[s != 0] for s in remap(prepared.split, vocab, "valid")[0].inputs]
    pop = popularity_counts(train_seqs, model.config.num_items)
    metrics = evaluate(model, data, protocol=args.protocol, popularity=pop, seed=args.seed, history=args.history)
    result = {"model": str(args.model), "model_version": model.version, "attention": model.config.attention,
              "data": str(prepared.source), "split": args.split, "protocol": args.protocol, "history": args.history,
              "users": len(data), "skipped_users": skipped, **metrics}
    if args.json:
        print(json.dumps(result))
    else:
        label = "full ranking" if args.protocol == "full" else "pop100: target vs 100 popularity-sampled negatives"
        scope = "last max-len events" if args.history == "window" else "whole history, as streamed"
        print(f"{args.split} users: {len(data):,} ({label}; {scope})")
        print(format_metrics(metrics))
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from consumers.worker import StreamWorker, WorkerOptions

    overrides = {"batch_size": args.batch_size, "batch_ms": args.batch_ms}
    settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})
    if settings.batch_size < 1 or settings.batch_ms < 1:
        raise UsageError("--batch-size and --batch-ms must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if args.swap_batch < 1:
        raise UsageError("--swap-batch must be >= 1")
    if args.model is not None and not (args.model / "model.pt").is_file():
        raise UsageError(f"--model {args.model}: no model.pt there (a directory written by `train`)")
    options = WorkerOptions(args.model, settings.path(args.state_dir or settings.state_dir), settings.batch_size,
                            settings.batch_ms, str(_device(settings, args)), swap_batch=args.swap_batch)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    StreamWorker(settings, options).run(stop, idle_exit_s=args.idle_exit)
    return 0


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.data import resolve_data
    from linrec_stream.lifecycle.replay import ReplayPlan, replay

    for name in ("rate", "speed", "limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be > 0")
    path = resolve_data(args.data, settings.path(settings.data_dir), log=_info)
    plan = ReplayPlan(path, args.topic or settings.topic_interactions, args.rate, args.speed, args.limit,
                      args.from_ts, args.to_ts)
    summary = replay(plan, settings.bootstrap_servers, progress=not args.no_progress,
                     skip_malformed=args.skip_malformed)
    print(summary.describe() + f" -> {plan.topic}")
    return 130 if summary.interrupted else 0


def _recs_tail(settings: Settings, args: argparse.Namespace) -> int:
    import json
    import time

    from kafka import KafkaConsumer

    consumer = KafkaConsumer(settings.topic_recommendations, bootstrap_servers=settings.bootstrap_servers,
                             auto_offset_reset="earliest" if args.from_beginning else "latest",
                             enable_auto_commit=False, group_id=None)
    shown, last = 0, time.monotonic()
    try:
        while args.max is None or shown < args.max:
            polled = consumer.poll(timeout_ms=500)
            for records in polled.values():
                for r in records:
                    if args.json:
                        print(r.value.decode("utf-8", "replace"), flush=True)
                    else:
                        rec = json.loads(r.value)
                        print(f"{rec['user']}: " + " | ".join(rec["items"]) + f"  (model {rec['model_version'][:8]})",
                              flush=True)
                    shown += 1
                    last = time.monotonic()
                    if args.max is not None and shown >= args.max:
                        break
            if args.timeout is not None and time.monotonic() - last > args.timeout:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def _settings(settings: Settings, args: argparse.Namespace) -> int:
    if args.markdown:
        print("| setting | environment variable | default | meaning |\n|---|---|---|---|")
        for name, doc, default in Settings.docs():
            print(f"| `{name}` | `LINREC_{name.upper()}` | `{default}` | {doc} |")
        return 0
    for name, _doc, _default in Settings.docs():
        print(f"{name} = {getattr(settings, name)}")
    return 0


def _registry(settings: Settings):
    from linrec_stream.lifecycle.registry import ModelRegistry

    return ModelRegistry(settings.path(settings.registry_dir))


def _models_list(settings: Settings, args: argparse.Namespace) -> int:
    import json
    import time
    from dataclasses import asdict

    reg = _registry(settings)
    cards, current = reg.versions(), reg.current()
    if args.json:
        print(json.dumps([{**asdict(c), "in_force": c.version == current} for c in cards], indent=2))
        return 0
    if not cards:
        print(f"no model versions in {reg.root}")
        return 0
    print(f"{'':1} {'version':12}  {'created (UTC)':19}  {'origin':7}  {'decision':9}  {'attention':14}  "
          f"{'items':>6}  {'NDCG@10':>7}  parent")
    for c in cards:
        ndcg = (c.metrics.get("candidate") or c.metrics.get("test") or {}).get("ndcg@10")
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.created))
        print(f"{'*' if c.version == current else ' '} {c.version[:12]:12}  {created:19}  {c.origin:7}  "
              f"{c.decision:9}  {c.attention:14}  {c.num_items:>6}  {'' if ndcg is None else f'{ndcg:.4f}':>7}  "
              f"{(c.parent or '-')[:12]}")
    return 0


def _models_show(settings: Settings, args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    reg = _registry(settings)
    card = reg.card(args.version)
    print(json.dumps({**asdict(card), "in_force": card.version == reg.current(),
                      "path": str(reg.path(card.version))}, indent=2))
    return 0


def _models_add(settings: Settings, args: argparse.Namespace) -> int:
    import json

    reg = _registry(settings)
    meta_file = args.run / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    card = reg.add(args.run, origin="train", note=args.note, data=meta.get("data", {}),
                   metrics={"test": meta["test_full"]} if "test_full" in meta else {})
    print(f"registered {card.version[:12]} ({card.attention}, {card.num_items} items) in {reg.root}")
    if args.promote:
        _announce(settings, reg.promote(card.version))
    return 0


def _models_promote(settings: Settings, args: argparse.Namespace) -> int:
    _announce(settings, _registry(settings).promote(args.version))
    return 0


def _models_rollback(settings: Settings, args: argparse.Namespace) -> int:
    _announce(settings, _registry(settings).rollback())
    return 0


def _announce(settings: Settings, change) -> None:
    """Tell running workers about a registry change; the registry itself is already updated."""
    from linrec_stream.lifecycle.announce import announce

    prev = (change.previous or "none")[:12]
    print(f"{change.action}: {change.version[:12]} is in force (was {prev})")
    announce(settings, change)
    print(f"announced on {settings.topic_model_updates}")


def _quickstart(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.quickstart import QuickstartOptions, quickstart

    if not 0 < args.warm_fraction < 1:
        raise UsageError("--warm-fraction must be between 0 and 1")
    if args.live_rate <= 0 or args.train_epochs < 1:
        raise UsageError("--live-rate must be > 0 and --train-epochs >= 1")
    if args.model is not None and not (args.model / "model.pt").exists():
        raise UsageError(f"--model {args.model}: no model.pt there")
    opts = QuickstartOptions(args.data, args.model, args.warm_fraction, args.live_rate, args.train_epochs,
                             retrain=not args.no_retrain)
    return quickstart(settings, opts, log=lambda m: print(m, flush=True))


# --- entry point -----------------------------------------------------------------------------
def _info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fail(message: str, detail: str = "") -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if detail:
        print("--- last lines of the log ---\n" + detail, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from linrec_stream.broker.errors import KafkaSetupError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        settings = settings_from_args(args)
        func: Callable[[Settings, argparse.Namespace], int] = args.func
        return func(settings, args)
    except UsageError as exc:
        _fail(str(exc))
        return 2
    except SettingsError as exc:
        _fail(str(exc))
        return 2
    except KafkaSetupError as exc:
        _fail(str(exc), exc.detail)
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except _expected_runtime_errors() as exc:
        # Our own errors read as sentences; a library's keeps its type name for context.
        own = isinstance(exc, (FileNotFoundError, ValueError)) or type(exc).__name__ == "AnnounceError"
        _fail(str(exc) if own else f"{type(exc).__name__}: {exc}")
        return 1


def _expected_runtime_errors() -> tuple[type[BaseException], ...]:
    from kafka.errors import KafkaError

    from linrec_stream.data import DataError
    from linrec_stream.lifecycle.announce import AnnounceError

    # An unreachable or failing broker, a file that cannot be read, bad data: one line, no traceback.
    return (KafkaError, OSError, DataError, ValueError, AnnounceError)


if __name__ == "__main__":
    sys.exit(main())

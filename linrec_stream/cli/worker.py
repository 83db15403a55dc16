"""``worker``: a stream worker (``consumers.worker``). It serves a model; it trains nothing, so
this module imports no training or data-set code, not even to resolve its device."""

from __future__ import annotations

import argparse
from pathlib import Path

from linrec_stream.settings import WORKER_ENGINES, Settings

from ._common import Subparsers, UsageError, add_device_option, device, on_stop_signals, require_model_dir


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``worker`` command."""
    worker = subparsers.add_parser("worker", parents=[common], help="run a stream worker (Ctrl-C / SIGTERM stops it)")
    worker.add_argument("--model", type=Path, metavar="DIR",
                        help="serve this trained model directory, fixed (default: the registry's version in force, "
                             "swapped without a restart when another is promoted)")
    worker.add_argument("--swap-batch", type=int, default=512, metavar="N",
                        help="users rebuilt per step of the background sweep after a model swap")
    worker.add_argument("--engine", choices=WORKER_ENGINES,
                        help="Kafka client engine (setting worker_engine): kafka-python, or faust (faust-streaming's "
                             "app on aiokafka)")
    worker.add_argument("--batch-size", type=int, help="most events per micro-batch (setting batch_size)")
    worker.add_argument("--batch-ms", type=int, help="longest wait to fill a micro-batch (setting batch_ms)")
    add_device_option(worker)
    worker.add_argument("--state-dir", type=Path, metavar="DIR", help="rocksdict user-state store (setting state_dir)")
    worker.add_argument("--refuse-damaged-store", action="store_true",
                        help="stop if the state store is unreadable (default: move it aside and restore the "
                             "states from the changelog)")
    worker.add_argument("--idle-exit", type=float, metavar="S", help="exit after S seconds without events")
    worker.set_defaults(func=_worker)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    import logging
    import sys
    import threading

    from consumers.worker import StreamWorker, WorkerOptions

    overrides = {"batch_size": args.batch_size, "batch_ms": args.batch_ms, "worker_engine": args.engine}
    settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})
    if settings.batch_size < 1 or settings.batch_ms < 1:
        raise UsageError("--batch-size and --batch-ms must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("kafka", "aiokafka", "faust", "mode"):  # clients' own INFO lines: connections, joins
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.swap_batch < 1:
        raise UsageError("--swap-batch must be >= 1")
    if args.model is not None:
        require_model_dir(args.model)
    state_dir = _state_dir(settings, args)
    options = WorkerOptions(args.model, state_dir, settings.batch_size,
                            settings.batch_ms, str(device(settings, args)), swap_batch=args.swap_batch,
                            on_store_damage="refuse" if args.refuse_damaged_store else "move-aside")
    stop = threading.Event()
    on_stop_signals(lambda *_: stop.set())
    StreamWorker(settings, options, stop=stop).run(stop, idle_exit_s=args.idle_exit)
    return 0


def _state_dir(settings: Settings, args: argparse.Namespace) -> Path:
    """The state directory, checked: a wrong one is a one-line usage error naming where it came from."""
    path = settings.path(args.state_dir or settings.state_dir)
    what = "--state-dir" if args.state_dir else "setting state_dir"
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path}: exists and is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot be created ({exc.strerror})") from None
    return path

"""``retrain``: a retraining round on the event archive (warm start from the version in force),
published if not worse, once or on a schedule (``lifecycle.retrain``)."""

from __future__ import annotations

import argparse

from linrec_stream.settings import Settings

from ._common import Subparsers, UsageError, add_device_option, config_usage_error, device, info, on_stop_signals


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``retrain`` command."""
    retrain = subparsers.add_parser(
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
    add_device_option(retrain)
    retrain.add_argument("--no-progress", action="store_true", help="no progress bars")
    retrain.set_defaults(func=_retrain)


def _retrain(settings: Settings, args: argparse.Namespace) -> int:
    import logging
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
        raise config_usage_error(exc) from None
    dev = device(settings, args)
    # kafka-python logs every failed connection attempt; an unreachable broker is reported once,
    # as this command's own one-line error.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    progress = not args.no_progress
    if every_s is None:
        result = retrain_once(settings, config, dev, log=info, progress=progress)
        print(f"{result.decision} {result.version} (registry {settings.path(settings.registry_dir)}, "
              f"current {(result.version if result.published else result.parent)[:12]})")
        return 0

    def interrupt(*_: object) -> None:
        # Stop at once, also mid-round: the round's clean-up (its work folder) runs on the way
        # out, and the registry's writes are atomic, so no half-written version is left.
        stop.set()
        raise KeyboardInterrupt

    stop = threading.Event()
    on_stop_signals(interrupt)
    info(f"retrain: every {args.every} on {dev}, registry {settings.path(settings.registry_dir)}")
    try:
        rounds = run_every(settings, config, every_s, dev, log=info, stop=stop, progress=progress)
    except KeyboardInterrupt:
        info("retrain: stopped")
        return 0
    info(f"retrain: stopped after {rounds} round(s)")
    return 0

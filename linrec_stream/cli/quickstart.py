"""``quickstart``: the main job on one machine, end to end (``linrec_stream.quickstart``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from linrec_stream.settings import Settings

from ._common import Subparsers, UsageError, require_model_dir


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``quickstart`` command."""
    qs = subparsers.add_parser(
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


def _quickstart(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.quickstart import QuickstartOptions, quickstart

    if not 0 < args.warm_fraction < 1:
        raise UsageError("--warm-fraction must be between 0 and 1")
    if args.live_rate <= 0 or args.train_epochs < 1:
        raise UsageError("--live-rate must be > 0 and --train-epochs >= 1")
    if args.model is not None:
        require_model_dir(args.model)
    opts = QuickstartOptions(args.data, args.model, args.warm_fraction, args.live_rate, args.train_epochs,
                             retrain=not args.no_retrain)
    return quickstart(settings, opts, log=lambda m: print(m, flush=True))

"""``evaluate``: a trained model's metrics on a log (``training.experiment.evaluate_run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from linrec_stream.settings import Settings

from ._common import Subparsers, UsageError, add_device_option, device, info


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` command."""
    ev = subparsers.add_parser("evaluate", parents=[common], help="evaluate a trained model")
    ev.add_argument("--model", required=True, type=Path, metavar="DIR")
    ev.add_argument("--data", required=True, metavar="ml-1m|ml-100k|PATH")
    ev.add_argument("--protocol", choices=["full", "pop100"], default="full",
                    help="full ranking (default) or the target vs 100 popularity-sampled negatives")
    ev.add_argument("--split", choices=["test", "valid"], default="test")
    ev.add_argument("--seed", type=int, default=0, help="seed of the pop100 negatives")
    ev.add_argument("--history", choices=["window", "full"], default="window",
                    help="encode the last max-len events (the protocol, as in training) or every "
                         "event (what a stream worker's state holds)")
    add_device_option(ev)
    ev.add_argument("--skip-malformed", action="store_true")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_evaluate)


def _evaluate(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from linrec_stream.model.run_dir import load_run
    from linrec_stream.training.experiment import NothingToEvaluate, evaluate_run, format_metrics, prepare

    # The model first: a wrong --model is reported before any data set is fetched or read.
    model, vocab = load_run(args.model, device(settings, args))
    # With --json, stdout and stderr stay quiet but for the one object.
    log = (lambda m: None) if args.json else info
    prepared = prepare(args.data, settings.path(settings.data_dir), args.skip_malformed, log=log)
    try:
        ev = evaluate_run(model, vocab, prepared, split=args.split, protocol=args.protocol, seed=args.seed,
                          history=args.history)
    except NothingToEvaluate:
        raise UsageError(f"--data {args.data}: no user's target item is known to the model in {args.model}") from None
    if args.json:
        print(json.dumps({"model": str(args.model), **ev.to_dict()}))
    else:
        label = "full ranking" if args.protocol == "full" else "pop100: target vs 100 popularity-sampled negatives"
        scope = "last max-len events" if args.history == "window" else "whole history, as streamed"
        print(f"{args.split} users: {ev.users:,} ({label}; {scope})")
        print(format_metrics(ev.metrics))
    return 0

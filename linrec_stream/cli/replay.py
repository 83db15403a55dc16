"""``replay``: a historical log replayed into Kafka in time order (``lifecycle.replay``)."""

from __future__ import annotations

import argparse

from linrec_stream.settings import Settings

from ._common import Subparsers, UsageError, info


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``replay`` command."""
    rp = subparsers.add_parser("replay", parents=[common], help="replay a historical log into Kafka in time order")
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


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.data import resolve_data
    from linrec_stream.lifecycle.replay import ReplayPlan, replay

    for name in ("rate", "speed", "limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be > 0")
    path = resolve_data(args.data, settings.path(settings.data_dir), log=info)
    plan = ReplayPlan(path, args.topic or settings.topic_interactions, args.rate, args.speed, args.limit,
                      args.from_ts, args.to_ts)
    summary = replay(plan, settings, progress=not args.no_progress,
                     skip_malformed=args.skip_malformed)
    if summary.sent == 0 and not summary.interrupted:
        window = " in the --from-ts/--to-ts range" if args.from_ts is not None or args.to_ts is not None else ""
        raise UsageError(f"nothing to replay: {path} holds no events{window}")
    print(summary.describe() + f" -> {plan.topic}")
    # 130, as for Ctrl-C anywhere else: the replay stopped early (what was sent is reported).
    return 130 if summary.interrupted else 0

"""``recs tail``: recommendations as they arrive (``clients.recommendations``)."""

from __future__ import annotations

import argparse

from linrec_stream.settings import Settings

from ._common import Subparsers, add_group


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``recs`` command group."""
    actions = add_group(subparsers, "recs", "recommendations as they arrive")
    tail = actions.add_parser("tail", parents=[common], help="print recommendations as they arrive")
    tail.add_argument("--json", action="store_true", help="one JSON object per line, as produced")
    tail.add_argument("--max", type=int, metavar="N", help="stop after N recommendations")
    tail.add_argument("--timeout", type=float, default=None, metavar="S", help="stop after S seconds without one")
    tail.add_argument("--from-beginning", action="store_true")
    tail.set_defaults(func=_tail)


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.clients.recommendations import RecommendationReader

    shown = 0
    with RecommendationReader(settings, from_beginning=args.from_beginning) as reader:
        try:
            if args.max is None or args.max > 0:
                for received in reader.follow(idle_timeout_s=args.timeout):
                    if args.json:
                        # As produced: --json passes the bytes on, it need not understand them.
                        print(received.raw.decode("utf-8", "replace"), flush=True)
                    else:
                        rec = received.recommendation
                        print(f"{rec.user}: " + " | ".join(rec.items) + f"  (model {rec.model_version[:8]})",
                              flush=True)
                    shown += 1
                    if args.max is not None and shown >= args.max:
                        break
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a tail without --max or --timeout ends
    return 0

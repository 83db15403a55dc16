"""``topics create``: the project's Kafka topics (the catalogue in ``contracts.topics``)."""

from __future__ import annotations

import argparse

from linrec_stream.settings import Settings

from ._common import Subparsers, add_group


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``topics`` command group."""
    actions = add_group(subparsers, "topics", "the project's Kafka topics")
    actions.add_parser("create", parents=[common], help="create missing topics (idempotent)").set_defaults(
        func=_create
    )


def _create(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.topics import create_topics

    for t in create_topics(settings):
        print(f"{t.name:<24} {t.partitions:>3} partition(s)  {'created' if t.created else 'exists'}")
    return 0

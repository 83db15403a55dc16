"""``data fetch``: MovieLens data sets, fetched once into ``data_dir``."""

from __future__ import annotations

import argparse

from linrec_stream.settings import Settings

from ._common import Subparsers, add_group, info


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``data`` command group."""
    actions = add_group(subparsers, "data", "interaction data sets")
    fetch = actions.add_parser("fetch", parents=[common], help="fetch a MovieLens data set into data_dir (once)")
    fetch.add_argument("name", choices=["ml-1m", "ml-100k"])
    fetch.set_defaults(func=_fetch)


def _fetch(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.data import fetch_dataset

    path = fetch_dataset(args.name, settings.path(settings.data_dir), log=info)
    print(f"{args.name}: {path}")
    return 0

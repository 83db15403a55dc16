"""``models list|show|add|promote|rollback``: the model registry (``lifecycle.registry``); a
change of the version in force is announced to running workers, which swap without a restart."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from linrec_stream.settings import Settings

from ._common import Subparsers, add_group

if TYPE_CHECKING:
    from linrec_stream.lifecycle.registry import Change, ModelRegistry


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``models`` command group."""
    actions = add_group(subparsers, "models", "the model registry: versions, the one in force, promote, rollback")
    ml = actions.add_parser("list", parents=[common], help="every registered version, oldest first (* = in force)")
    ml.add_argument("--json", action="store_true", help="one JSON array of model cards")
    ml.set_defaults(func=_list)
    ms = actions.add_parser("show", parents=[common], help="one version's card (a unique prefix will do)")
    ms.add_argument("version", metavar="V")
    ms.set_defaults(func=_show)
    ma = actions.add_parser("add", parents=[common], help="register a trained run directory (from `train`)")
    ma.add_argument("run", type=Path, metavar="RUN_DIR")
    ma.add_argument("--promote", action="store_true", help="and put it in force (announced to workers)")
    ma.add_argument("--note", default="", help="free text kept in the card")
    ma.set_defaults(func=_add)
    mp = actions.add_parser("promote", parents=[common], help="put a version in force; running workers swap to it")
    mp.add_argument("version", metavar="V")
    mp.set_defaults(func=_promote)
    actions.add_parser("rollback", parents=[common], help="go back to the version in force before the current one"
                       ).set_defaults(func=_rollback)


def _registry(settings: Settings) -> ModelRegistry:
    from linrec_stream.lifecycle.registry import ModelRegistry

    return ModelRegistry(settings.path(settings.registry_dir))


def _list(settings: Settings, args: argparse.Namespace) -> int:
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


def _show(settings: Settings, args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    reg = _registry(settings)
    card = reg.card(args.version)
    print(json.dumps({**asdict(card), "in_force": card.version == reg.current(),
                      "path": str(reg.path(card.version))}, indent=2))
    return 0


def _add(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from linrec_stream.model.run_dir import META_FILE

    reg = _registry(settings)
    meta_file = args.run / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    card = reg.add(args.run, origin="train", note=args.note, data=meta.get("data", {}),
                   metrics={"test": meta["test_full"]} if "test_full" in meta else {})
    print(f"registered {card.version[:12]} ({card.attention}, {card.num_items} items) in {reg.root}")
    if args.promote:
        _announce(settings, reg.promote(card.version))
    return 0


def _promote(settings: Settings, args: argparse.Namespace) -> int:
    _announce(settings, _registry(settings).promote(args.version))
    return 0


def _rollback(settings: Settings, args: argparse.Namespace) -> int:
    _announce(settings, _registry(settings).rollback())
    return 0


def _announce(settings: Settings, change: Change) -> None:
    """Tell running workers about a registry change; the registry itself is already updated."""
    from linrec_stream.lifecycle.announce import announce

    prev = (change.previous or "none")[:12]
    print(f"{change.action}: {change.version[:12]} is in force (was {prev})")
    announce(settings, change)
    print(f"announced on {settings.topic_model_updates}")

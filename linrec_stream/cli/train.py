"""``train``: a model trained on a log (leave-one-out, full ranking), from scratch or from
another run's model (``--init-from``).

The architecture flags have no argparse default, so that ``--init-from`` can tell a flag given
from one left out; their defaults are ``ModelConfig``'s own (the ``default`` preset), written
into ``--help`` when it is shown: reading them while building the parser would import torch for
every command.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from linrec_stream.settings import Settings

from ._common import Subparsers, UsageError, add_device_option, config_usage_error, device, info

if TYPE_CHECKING:
    from linrec_stream.model import ModelConfig
    from linrec_stream.training.experiment import InitFrom, Prepared

#: train's architecture flags and the ModelConfig field each sets.
ARCH_FLAGS: dict[str, str] = {
    "attention": "attention", "hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads",
    "inner": "inner_size", "max-len": "max_len", "dropout": "dropout",
}
_FLAG_OF = {field: flag for flag, field in ARCH_FLAGS.items()}
#: The values of --attention: the attention ops' names (``model.ops.OPS``, which this module does
#: not import at parse time; tests/test_cli_package.py keeps the two the same).
ATTENTIONS = ("linrec", "linrec_decay", "linrec_seqnorm", "linear", "softmax", "linrec_bidir")
_DEFAULT = "{default}"  # in an architecture flag's help: ModelConfig's default for its field


class _ModelDefaultsHelp(argparse.HelpFormatter):
    """Fills ModelConfig's default into an architecture flag's help, only when help is shown."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text is None or _DEFAULT not in text:
            return text
        # "%" would start an argparse placeholder in the text this returns.
        return text.replace(_DEFAULT, str(model_default(_arch_field(action))).replace("%", "%%"))


def _arch_field(action: argparse.Action) -> str:
    return ARCH_FLAGS[action.option_strings[0].removeprefix("--")]


def model_default(field: str) -> object:
    """ModelConfig's default for ``field`` (imports the model, hence torch)."""
    from linrec_stream.model.presets import PRESETS

    return getattr(PRESETS["default"], field)


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``train`` command."""
    tr = subparsers.add_parser("train", parents=[common], formatter_class=_ModelDefaultsHelp,
                               help="train a model on a log (leave-one-out, full ranking)")
    tr.add_argument("--data", required=True, metavar="ml-1m|ml-100k|PATH",
                    help="a data set name (fetched once) or a .inter / ratings.dat / CSV / TSV file")
    tr.add_argument("--attention", choices=ATTENTIONS, help=f"default {_DEFAULT}")
    tr.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory")
    tr.add_argument("--hidden", type=int, help=f"default {_DEFAULT}")
    tr.add_argument("--layers", type=int, help=f"default {_DEFAULT}")
    tr.add_argument("--heads", type=int, help=f"default {_DEFAULT}")
    tr.add_argument("--inner", type=int, help=f"feed-forward width, default {_DEFAULT}")
    tr.add_argument("--max-len", type=int, help=f"default {_DEFAULT}")
    tr.add_argument("--dropout", type=float, help=f"default {_DEFAULT} (with --init-from: that model's)")
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
    add_device_option(tr)
    tr.add_argument("--history", choices=["window", "full"], default="window",
                    help="train (and validate) on each user's last --max-len events, the protocol, or on "
                         "every event, as a stream worker serves them (causal attentions only)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    tr.add_argument("--skip-malformed", action="store_true", help="skip (and count) malformed lines")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(func=_train)


def _train(settings: Settings, args: argparse.Namespace) -> int:
    import dataclasses

    from linrec_stream.model.presets import preset
    from linrec_stream.model.run_dir import CURVES_FILE, META_FILE, MODEL_FILE, RESUME_FILE
    from linrec_stream.training.experiment import prepare, run_training
    from linrec_stream.training.train import TrainConfig

    dev = device(settings, args)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    if not args.resume and (args.out / RESUME_FILE).exists():
        raise UsageError(f"--out {args.out} holds a run already: pass --resume to continue it, or choose another")
    try:
        tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                         seed=args.seed, max_minutes=args.max_minutes, history=args.history)
    except ValueError as exc:
        raise config_usage_error(exc) from None
    # The architecture values given on the command line, as ModelConfig fields.
    given = {field: getattr(args, flag.replace("-", "_")) for flag, field in ARCH_FLAGS.items()}
    given = {field: value for field, value in given.items() if value is not None}
    init = None
    if args.init_from is None:
        prepared = prepare(args.data, settings.path(settings.data_dir), args.skip_malformed, log=info)
        try:
            mc = dataclasses.replace(preset("default", prepared.split.data.num_items), **given)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        mc, init, prepared = _init_from(settings, args, given)
    info(f"training {mc.attention} on {dev} into {args.out}")
    run_training(prepared, mc, tc, args.out, dev, resume=args.resume, progress=not args.no_progress, log=info,
                 init=init)
    print(f"model: {args.out / MODEL_FILE}  curves: {args.out / CURVES_FILE}  metrics: {args.out / META_FILE}")
    return 0


def _init_from(settings: Settings, args: argparse.Namespace,
               given: dict[str, object]) -> tuple[ModelConfig, InitFrom, Prepared]:
    """train --init-from: the model config, the warm start and the data in that model's item ids.
    The architecture is the model's (``experiment.inherit_architecture``); a flag that
    contradicts it is a usage error."""
    from linrec_stream.model.run_dir import load_run
    from linrec_stream.training.experiment import (
        ArchitectureConflict,
        ArchitectureError,
        inherit_architecture,
        init_from_run,
        prepare,
    )

    try:
        parent, vocab = load_run(args.init_from)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--init-from: {exc}") from None
    prepared = prepare(args.data, settings.path(settings.data_dir), args.skip_malformed, log=info,
                       base_vocab=vocab)
    mc, init = init_from_run(args.init_from, parent, vocab, prepared, args.seed, log=info)
    try:
        mc = inherit_architecture(mc, given)
    except ArchitectureConflict as exc:
        raise UsageError(f"--{_FLAG_OF[exc.field]} {exc.value}: the model in --init-from {args.init_from} has "
                         f"{exc.field} {exc.kept} (its architecture is kept; leave the flag out)") from None
    except ArchitectureError as exc:
        raise UsageError(f"--{_FLAG_OF[exc.field]}: {exc}") from None
    return mc, init, prepared

"""What the command modules of the command line share: the parser class whose usage errors are
one line, the settings options every command takes and building the Settings from them, the
stderr log, and the checks and plumbing several commands need (the ``--device`` flag, a model
directory given as a flag, a config object's complaint as a usage error, stop signals).

Imports nothing heavy (argparse and the settings only), so building the parser for any command,
``--help`` included, stays fast; a handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

from linrec_stream.settings import Settings, SettingsError

if TYPE_CHECKING:
    import torch

PROG = "linrec-stream"

#: What ``register`` receives: the top-level parser's subcommands (argparse has no public name
#: for this type).
Subparsers = argparse._SubParsersAction
#: A command's handler: the effective settings and the parsed flags in, the exit code out.
Handler = Callable[[Settings, argparse.Namespace], int]


class UsageError(Exception):
    """Wrong command-line usage; exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and never exits mid-parse."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def common_options() -> argparse.ArgumentParser:
    """The settings options of every command, as a parent parser (``parents=[common]``)."""
    p = Parser(add_help=False)
    add_settings_options(p)
    return p


#: Where the top-level parser keeps the settings options given before the command
#: (``linrec-stream --config F quickstart``); a command's own come after it and win.
TOP = "top_"


def add_settings_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--config``, ``--bootstrap-servers`` and ``--set`` on ``p``, stored under ``prefix``."""
    g = p.add_argument_group("settings")
    g.add_argument("--config", dest=f"{prefix}config", metavar="PATH", help="TOML settings file (else $LINREC_CONFIG)")
    g.add_argument("--bootstrap-servers", dest=f"{prefix}bootstrap_servers", metavar="HOST:PORT",
                   help="Kafka bootstrap servers")
    g.add_argument(
        "--set", dest=f"{prefix}overrides", action="append", default=[], metavar="NAME=VALUE",
        help="override any setting (repeatable); see `linrec-stream settings`",
    )


def add_group(subparsers: Subparsers, name: str, help: str) -> Subparsers:
    """A command group (``kafka start``, ``models list``, ...): its actions' subparsers, one of
    which must be given."""
    group = subparsers.add_parser(name, help=help)
    actions = group.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    actions.required = True
    return actions


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``, for the commands that run a model (default: the ``device`` setting)."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The effective settings: defaults, file, ``LINREC_*`` environment, then ``--set`` and
    ``--bootstrap-servers``. Raises SettingsError (a usage error) on a bad name or value."""
    overrides: dict[str, str] = {}
    for item in [*getattr(args, f"{TOP}overrides", []), *args.overrides]:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SettingsError(f"--set {item!r}: expected NAME=VALUE")
        overrides[name.strip().replace("-", "_")] = value
    servers = args.bootstrap_servers if args.bootstrap_servers is not None else \
        getattr(args, f"{TOP}bootstrap_servers", None)
    if servers is not None:  # "" too: refused by the setting's check
        overrides["bootstrap_servers"] = servers
    config = args.config if args.config is not None else getattr(args, f"{TOP}config", None)
    return Settings.load(config_file=config, overrides=overrides)


def info(msg: str) -> None:
    """Progress and diagnostics: on stderr, so stdout holds only a command's result."""
    print(msg, file=sys.stderr, flush=True)


def device(settings: Settings, args: argparse.Namespace) -> torch.device:
    """The torch device of ``--device`` (else the ``device`` setting); a usage error if there is
    no such device here. From the model layer, so the worker imports no training code."""
    from linrec_stream.model.device import resolve_device

    try:
        return resolve_device(args.device or settings.device)
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from None


def config_usage_error(exc: ValueError) -> UsageError:
    """A usage error for a config object's complaint about one of its fields: the message starts
    with the field's name (``epochs must be ...``), spelled here as the flag that set it."""
    return UsageError(f"--{str(exc).split()[0].replace('_', '-')}: {exc}")


def on_stop_signals(handler: Callable[[int, object], None]) -> None:
    """Call ``handler`` on SIGTERM (``docker stop``, a supervisor) as on Ctrl-C, so a
    long-running command stops the same clean way whichever asked it to."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def require_model_dir(path: Path, flag: str = "--model") -> None:
    """A usage error unless ``path`` (given as ``flag``) holds a model to serve, as `train`
    writes one: caught here, before a command starts a broker, a worker or a training."""
    from linrec_stream.model.run_dir import RunDirError, check_run_dir

    try:
        check_run_dir(path)
    except RunDirError as exc:
        raise UsageError(f"{flag}: {exc}") from None

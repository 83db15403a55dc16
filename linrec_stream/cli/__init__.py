"""The ``linrec-stream`` command line: one module per command group, each adding its subparsers
(``register(subparsers, common)``) and holding its handlers; this package only assembles them
and runs one.

Every subcommand builds one :class:`~linrec_stream.settings.Settings` (defaults, file,
``LINREC_*`` environment, flags) and reports failures as one line on stderr, exit code 2
for usage and settings errors, 1 for runtime failures. No tracebacks for expected errors.

Building the parser imports no model, training or Kafka code (the handlers import what they
need when they run), so ``--help`` and quick commands such as ``kafka status`` stay fast and a
worker loads no training code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from linrec_stream.settings import SettingsError

from . import (
    data,
    evaluate,
    kafka,
    models,
    quickstart,
    recs,
    replay,
    retrain,
    settings_cmd,
    topics,
    train,
    worker,
)
from ._common import PROG, Handler, Parser, UsageError, common_options, settings_from_args

__all__ = ["PROG", "UsageError", "build_parser", "main", "settings_from_args"]

#: The command modules, in the order `--help` lists their commands.
COMMANDS = (kafka, topics, settings_cmd, data, train, evaluate, worker, models, replay, recs, retrain, quickstart)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line's parser; ``args.func`` of a parse is the command's handler."""
    common = common_options()
    parser = Parser(prog=PROG, description="Streaming, incremental sequential recommender (LinRec).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv``, else the process's arguments); returns its exit code."""
    from linrec_stream.broker.errors import KafkaSetupError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        settings = settings_from_args(args)
        func: Handler = args.func
        return func(settings, args)
    except (UsageError, SettingsError) as exc:
        _fail(str(exc))
        return 2
    except KafkaSetupError as exc:
        _fail(str(exc), exc.detail)
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except SystemExit:
        # argparse's own exit (--help): nothing to report. Caught before the next clause, whose
        # expression would import the modules of every runtime error (torch among them).
        raise
    except _wrong_paths() as exc:  # a path or data set that does not exist: a wrong argument
        _fail(str(exc))
        return 2
    except _expected_runtime_errors() as exc:
        # Our own errors read as sentences; a library's keeps its type name for context.
        own = isinstance(exc, (FileNotFoundError, ValueError)) or type(exc).__name__ in ("AnnounceError",
                                                                                          "StateStoreError",
                                                                                          "StateStoreDamaged")
        _fail(str(exc) if own else f"{type(exc).__name__}: {exc}")
        return 1


def _fail(message: str, detail: str = "") -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if detail:
        print("--- last lines of the log ---\n" + detail, file=sys.stderr)


def _wrong_paths() -> tuple[type[BaseException], ...]:
    from linrec_stream.data import MissingDataError

    return (FileNotFoundError, NotADirectoryError, IsADirectoryError, MissingDataError)


def _expected_runtime_errors() -> tuple[type[BaseException], ...]:
    from kafka.errors import KafkaError

    from linrec_stream.data import DataError
    from linrec_stream.lifecycle.announce import AnnounceError

    from state.store import StateStoreError

    # An unreachable or failing broker, a file that cannot be read, bad data, a state store that
    # cannot be used: one line, no traceback.
    return (KafkaError, OSError, DataError, ValueError, AnnounceError, StateStoreError)

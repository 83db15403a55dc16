"""The ``linrec-stream`` command line: one module per command group, each adding its subparsers
(``register(subparsers, common)``) and holding its handlers; this package only assembles them
and runs one.

Every subcommand builds one :class:`~linrec_stream.settings.Settings` (defaults, file,
``LINREC_*`` environment, flags) and reports failures as one line on stderr, exit code 2
for usage and settings errors, 1 for runtime failures. No tracebacks for expected errors; a
cluster that refuses us (authentication, authorization, TLS: linrec_stream/clients/refusal.py)
is reported as the one line naming the cause, whatever error carried it.

Building the parser imports no model, training or Kafka code (the handlers import what they
need when they run), so ``--help`` and quick commands such as ``kafka status`` stay fast and a
worker loads no training code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from linrec_stream.settings import Settings, SettingsError

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
from ._common import PROG, TOP, Handler, Parser, UsageError, add_settings_options, common_options, settings_from_args

__all__ = ["PROG", "UsageError", "build_parser", "main", "settings_from_args"]

#: The command modules, in the order `--help` lists their commands.
COMMANDS = (kafka, topics, settings_cmd, data, train, evaluate, worker, models, replay, recs, retrain, quickstart)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line's parser; ``args.func`` of a parse is the command's handler."""
    common = common_options()
    parser = Parser(prog=PROG, description="Streaming, incremental sequential recommender (LinRec).")
    add_settings_options(parser, TOP)  # before the command too: `linrec-stream --config F quickstart`
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv``, else the process's arguments); returns its exit code."""
    from linrec_stream.broker.errors import KafkaSetupError

    parser = build_parser()
    settings = None
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
        own = isinstance(exc, (FileNotFoundError, ValueError)) or type(exc).__name__ in ("AnnounceError", "ReplayError",
                                                                                          "StateStoreError",
                                                                                          "StateStoreDamaged")
        _fail(_refused(exc, settings) or (str(exc) if own else f"{type(exc).__name__}: {exc}"))
        return 1
    except Exception as exc:
        # Any other error that a refusal caused (a worker's, wrapped): its cause, in one line.
        line = _refused(exc, settings)
        if line is None:
            raise
        _fail(line)
        return 1


def _fail(message: str, detail: str = "") -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if detail:
        print("--- last lines of the log ---\n" + detail, file=sys.stderr)


def _refused(exc: BaseException, settings: Settings | None) -> str | None:
    """The line naming why the cluster refused us, if ``exc`` is (or wraps) such a refusal."""
    from linrec_stream.clients.connection import KafkaConnection
    from linrec_stream.clients.refusal import refusal

    try:  # who we claimed to be, for the line; settings that cannot say are no reason to hide it
        connection = KafkaConnection.from_settings(settings) if settings is not None else None
    except SettingsError:
        connection = None
    return refusal(exc, connection)


def _wrong_paths() -> tuple[type[BaseException], ...]:
    from linrec_stream.data import MissingDataError

    return (FileNotFoundError, NotADirectoryError, IsADirectoryError, MissingDataError)


def _expected_runtime_errors() -> tuple[type[BaseException], ...]:
    from kafka.errors import KafkaError

    from linrec_stream.clients.refusal import KafkaRefusal
    from linrec_stream.data import DataError
    from linrec_stream.lifecycle.announce import AnnounceError
    from linrec_stream.lifecycle.replay import ReplayError

    from state.store import StateStoreError

    # An unreachable, failing or refusing broker, a file that cannot be read, bad data, a state
    # store that cannot be used: one line, no traceback.
    return (KafkaError, KafkaRefusal, OSError, DataError, ValueError, AnnounceError, ReplayError, StateStoreError)

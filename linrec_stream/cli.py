"""The ``linrec-stream`` command line.

Every subcommand builds one :class:`~linrec_stream.settings.Settings` (defaults, file,
``LINREC_*`` environment, flags) and reports failures as one line on stderr, exit code 2
for usage and settings errors, 1 for runtime failures. No tracebacks for expected errors.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

from linrec_stream.settings import Settings, SettingsError

PROG = "linrec-stream"


class UsageError(Exception):
    """Wrong command-line usage; exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and never exits mid-parse."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _common_options() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("settings")
    g.add_argument("--config", metavar="PATH", help="TOML settings file (else $LINREC_CONFIG)")
    g.add_argument("--bootstrap-servers", metavar="HOST:PORT", help="Kafka bootstrap servers")
    g.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
        help="override any setting (repeatable); see `linrec-stream settings`",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(prog=PROG, description="Streaming, incremental sequential recommender (LinRec).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    kafka = sub.add_parser("kafka", help="run the local Apache Kafka broker")
    ksub = kafka.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    ksub.required = True
    ksub.add_parser("start", parents=[common], help="start it (fetching it once), wait until it answers").set_defaults(
        func=_kafka_start
    )
    ksub.add_parser("stop", parents=[common], help="shut it down cleanly").set_defaults(func=_kafka_stop)
    ksub.add_parser("status", parents=[common], help="is it running, and where").set_defaults(func=_kafka_status)
    check = ksub.add_parser("check", parents=[common], help="produce and consume messages through the broker")
    check.add_argument("--messages", type=int, default=10_000, help="how many (default 10000)")
    check.set_defaults(func=_kafka_check)

    topics = sub.add_parser("topics", help="the project's Kafka topics")
    tsub = topics.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    tsub.required = True
    tsub.add_parser("create", parents=[common], help="create missing topics (idempotent)").set_defaults(
        func=_topics_create
    )

    st = sub.add_parser("settings", parents=[common], help="print the effective settings")
    st.add_argument("--markdown", action="store_true", help="print the settings reference as a Markdown table")
    st.set_defaults(func=_settings)

    # Argument contracts of the stream worker (issue #5) and the retraining service (issue #6).
    # docker/docker-compose.yml runs them; until they are built they fail with one clear line.
    worker = sub.add_parser("worker", parents=[common], help="stream worker (not in this build yet: issue #5)")
    worker.add_argument("--model", required=True, metavar="DIR")
    worker.add_argument("--batch-size", type=int, default=256)
    worker.add_argument("--batch-ms", type=int, default=50)
    worker.add_argument("--device", choices=["auto", "cpu", "cuda"])
    worker.add_argument("--state-dir", metavar="DIR")
    worker.set_defaults(func=_not_built("worker", 5))
    retrain = sub.add_parser("retrain", parents=[common], help="periodic retraining (not in this build yet: issue #6)")
    retrain.add_argument("--every", metavar="DURATION")
    retrain.set_defaults(func=_not_built("retrain", 6))

    qs = sub.add_parser(
        "quickstart", parents=[common],
        help="the main job on one machine: local broker, topics, a verified round trip",
    )
    qs.add_argument("--messages", type=int, default=10_000)
    qs.set_defaults(func=_quickstart)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, str] = {}
    for item in args.overrides:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SettingsError(f"--set {item!r}: expected NAME=VALUE")
        overrides[name.strip().replace("-", "_")] = value
    if args.bootstrap_servers:
        overrides["bootstrap_servers"] = args.bootstrap_servers
    return Settings.load(config_file=args.config, overrides=overrides)


# --- commands -------------------------------------------------------------------------------
def _kafka_start(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.kafka.broker import LocalBroker

    res = LocalBroker(settings).start(log=_info)
    if res.already_running:
        print(f"already running: {res.status.describe()}")
    else:
        first = " (storage formatted on first use)" if res.formatted else ""
        print(
            f"Kafka {settings.kafka_version} ready at {res.status.bootstrap} in {res.seconds:.1f}s"
            f"{first}; pid {res.status.pid}, files in {res.status.root}"
        )
    return 0


def _kafka_stop(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.kafka.broker import LocalBroker

    res = LocalBroker(settings).stop()
    if not res.was_running:
        print("Kafka broker was not running")
    elif res.killed:
        print(f"Kafka broker did not stop within its timeout and was killed ({res.seconds:.1f}s)")
    else:
        print(f"Kafka broker stopped cleanly in {res.seconds:.1f}s")
    return 0


def _kafka_status(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.kafka.broker import LocalBroker

    status = LocalBroker(settings).status()
    print(status.describe())
    return 0 if status.running else 3


def _kafka_check(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.kafka.roundtrip import roundtrip

    if args.messages < 1:
        raise UsageError("--messages must be >= 1")
    rt = roundtrip(settings, messages=args.messages)
    problems = rt.problems()
    rate = rt.sent / rt.total_s if rt.total_s else float("inf")
    if problems:
        print(f"round trip through {settings.bootstrap_servers} FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(
        f"round trip through {settings.bootstrap_servers}: {rt.sent} keyed messages produced in {rt.produce_s:.2f}s, "
        f"all consumed back in {rt.total_s:.2f}s ({rate:,.0f} msg/s), each exactly once, in order per partition"
    )
    return 0


def _topics_create(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.kafka.topics import create_topics

    for t in create_topics(settings):
        print(f"{t.name:<24} {t.partitions:>3} partition(s)  {'created' if t.created else 'exists'}")
    return 0


def _settings(settings: Settings, args: argparse.Namespace) -> int:
    if args.markdown:
        print("| setting | environment variable | default | meaning |\n|---|---|---|---|")
        for name, doc, default in Settings.docs():
            print(f"| `{name}` | `LINREC_{name.upper()}` | `{default}` | {doc} |")
        return 0
    for name, _doc, _default in Settings.docs():
        print(f"{name} = {getattr(settings, name)}")
    return 0


def _quickstart(settings: Settings, args: argparse.Namespace) -> int:
    local = settings.bootstrap_servers == settings.local_bootstrap
    if local:
        _kafka_start(settings, args)
    _topics_create(settings, args)
    code = _kafka_check(settings, args)
    if local:
        print("the broker keeps running for the next steps; `linrec-stream kafka stop` stops it")
    return code


def _not_built(command: str, issue: int) -> Callable[[Settings, argparse.Namespace], int]:
    def run(settings: Settings, args: argparse.Namespace) -> int:
        raise NotBuiltError(f"`{command}` is not part of this build yet (tracked in issue #{issue})")

    return run


class NotBuiltError(Exception):
    """A planned subcommand whose implementation has not landed."""


# --- entry point -----------------------------------------------------------------------------
def _info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fail(message: str, detail: str = "") -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if detail:
        print("--- last lines of the log ---\n" + detail, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from linrec_stream.kafka.errors import KafkaSetupError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        settings = settings_from_args(args)
        func: Callable[[Settings, argparse.Namespace], int] = args.func
        return func(settings, args)
    except UsageError as exc:
        _fail(str(exc))
        return 2
    except SettingsError as exc:
        _fail(str(exc))
        return 2
    except NotBuiltError as exc:
        _fail(str(exc))
        return 1
    except KafkaSetupError as exc:
        _fail(str(exc), exc.detail)
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except _expected_runtime_errors() as exc:
        _fail(f"{type(exc).__name__}: {exc}")
        return 1


def _expected_runtime_errors() -> tuple[type[BaseException], ...]:
    from kafka.errors import KafkaError

    # An unreachable or failing broker, a file that cannot be read: one line, no traceback.
    return (KafkaError, OSError)


if __name__ == "__main__":
    sys.exit(main())

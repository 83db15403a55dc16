"""``kafka start|stop|status|check|acls``: the local Apache Kafka broker, and the ACLs of a secure one."""

from __future__ import annotations

import argparse
import sys

from linrec_stream.settings import Settings

from ._common import Subparsers, UsageError, add_group, info


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``kafka`` command group."""
    actions = add_group(subparsers, "kafka", "run the local Apache Kafka broker")
    start = actions.add_parser("start", parents=[common], help="start it (fetching it once), wait until it answers")
    start.add_argument("--secure", action="store_true",
                       help="SASL_SSL with SCRAM users and ACLs; writes client-secure.toml for --config "
                            "(a data directory keeps the mode it was formatted in)")
    start.set_defaults(func=_start)
    actions.add_parser("stop", parents=[common], help="shut it down cleanly").set_defaults(func=_stop)
    actions.add_parser("status", parents=[common], help="is it running, and where").set_defaults(func=_status)
    actions.add_parser("acls", parents=[common],
                       help="create the ACLs of the users linrec and reader on the settings' topics (idempotent), "
                            "as the admin user the settings name; `kafka start --secure` does it itself"
                       ).set_defaults(func=_acls)
    check = actions.add_parser("check", parents=[common], help="produce and consume messages through the broker")
    check.add_argument("--messages", type=int, default=10_000, help="how many (default 10000)")
    check.set_defaults(func=_check)


def _start(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.broker import LocalBroker

    res = LocalBroker(settings).start(log=info, secure=args.secure)
    if res.already_running:
        print(f"already running: {res.status.describe()}")
    else:
        first = " (storage formatted on first use)" if res.formatted else ""
        how = " over SASL_SSL" if res.status.secure else ""
        print(
            f"Kafka {settings.kafka_version} ready at {res.status.bootstrap}{how} in {res.seconds:.1f}s"
            f"{first}; pid {res.status.pid}, files in {res.status.root}"
        )
        if res.status.secure:
            print(f"client settings: --config {res.status.client_config} (user linrec; "
                  f"client-secure-admin.toml and client-secure-reader.toml beside it)")
    return 0


def _stop(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.broker import LocalBroker

    res = LocalBroker(settings).stop()
    if not res.was_running:
        print("Kafka broker was not running")
    elif res.killed:
        print(f"Kafka broker did not stop within its timeout and was killed ({res.seconds:.1f}s)")
    else:
        print(f"Kafka broker stopped cleanly in {res.seconds:.1f}s")
    return 0


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.broker import LocalBroker

    status = LocalBroker(settings).status()
    print(status.describe())
    # Exit 3 when it is not running, so scripts can test for a broker without parsing the line.
    return 0 if status.running else 3


def _acls(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.secure import apply_acls, grants

    n = apply_acls(settings, settings)
    users = sorted({g.user for g in grants(settings)})
    print(f"{n} ACLs in place on {settings.bootstrap_servers} for users {', '.join(users)}")
    return 0


def _check(settings: Settings, args: argparse.Namespace) -> int:
    from linrec_stream.broker.roundtrip import roundtrip

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

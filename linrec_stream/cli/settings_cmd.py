"""``settings``: the effective settings, or their reference as a Markdown table (README's)."""

from __future__ import annotations

import argparse

from linrec_stream.settings import Settings

from ._common import Subparsers


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``settings`` command."""
    st = subparsers.add_parser("settings", parents=[common], help="print the effective settings")
    st.add_argument("--markdown", action="store_true", help="print the settings reference as a Markdown table")
    st.set_defaults(func=_settings)


def _settings(settings: Settings, args: argparse.Namespace) -> int:
    if args.markdown:
        print("| setting | environment variable | default | meaning |\n|---|---|---|---|")
        for name, doc, default in Settings.docs():
            print(f"| `{name}` | `LINREC_{name.upper()}` | `{default}` | {doc} |")
        return 0
    for name, value in settings.shown():  # secrets masked
        print(f"{name} = {value}")
    return 0

"""The ``ate-fast`` command.

Subcommands live beside the code they drive: each module in :data:`SUBCOMMAND_MODULES`
has ``register(subparsers)`` that adds its parser (cheaply: heavy imports happen in the
handler). A module that does not exist yet is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Optional

SUBCOMMAND_MODULES = (
    "ate_fast.align.cli",
    "ate_fast.demo",
    "ate_fast.export.cli",
    "ate_fast.eval.cli",
)


def _cmd_info(args: argparse.Namespace) -> int:
    from ate_fast.system_info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ate-fast", description="Align-Then-stEer, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, backends and why any is missing")
    p.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    p.set_defaults(func=_cmd_info)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # not written yet
            raise
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

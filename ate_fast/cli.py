"""The ``ate-fast`` command.

Subcommands live beside the code they drive: each module in :data:`SUBCOMMAND_MODULES`
has ``register(subparsers)`` that adds its parser (cheaply: heavy imports happen in the
handler). A module that does not exist yet is skipped.

A user's mistake (a bad flag value, a file of the wrong kind or format, an existing
output) ends the command with one line on stderr and exit code 2
(:mod:`ate_fast.cli_errors`); ``ate-fast --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any, Optional

from ate_fast.cli_errors import CommandLineError, run_handler

SUBCOMMAND_MODULES = (
    "ate_fast.align.cli",
    "ate_fast.demo",
    "ate_fast.export.cli",
    "ate_fast.eval.cli",
    "ate_fast.tuning.cli",
)


def require_device(text: str, flag: str = "--device") -> Any:
    """``torch.device(text)`` for a ``--device`` value (:func:`device_flag`), after checking
    that a CUDA device is there; a one-line error where it is not."""
    import torch

    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandLineError(f"{flag} {text}: CUDA is not available")
        if (device.index or 0) >= torch.cuda.device_count():
            raise CommandLineError(
                f"{flag} {text}: there are only {torch.cuda.device_count()} GPU(s)"
            )
    return device


def _cmd_info(args: argparse.Namespace) -> int:
    from ate_fast.system_info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ate-fast", description="Align-Then-stEer, fast.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the full traceback instead of one line",
    )
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


def command_name(args: argparse.Namespace) -> str:
    """``ate-fast align stage1`` etc.: the words that named the command in ``args``."""
    words = ["ate-fast", args.command]
    for dest in ("align_command", "export_command", "simulator"):
        if getattr(args, dest, None):
            words.append(getattr(args, dest))
    return " ".join(words)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ate-fast``; returns the exit code (2 for a user error, see the module doc)."""
    args = build_parser().parse_args(argv)
    return run_handler(args.func, args, command_name(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

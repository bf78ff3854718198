"""The ``ate-fast`` command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from ate_fast.info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ate-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, backends and why any is missing")
    p.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

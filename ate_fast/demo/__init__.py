"""``ate-fast demo``: the whole ATE job on a built-in cross-embodiment shift, on a CPU.

Robot A (pre-training) and robot B (adaptation, a few demonstrations) reach a goal around
an obstacle in a planar point-mass world; B reads its velocity in a rotated, rescaled
frame and has a gripper slot A lacks (one padded action space with masks). The demo
pre-trains a flow policy on A, runs Align (stage-1 VAE, latent prior, stage-2 VAE with
reverse KL), fine-tunes on B directly and with ATE Steer (same budget), evaluates every
policy by receding-horizon rollouts, and times the sampler with and without
inference-time guidance, eager vs captured. No downloads; deterministic for a seed
(except the timings).

Only argparse is imported here; torch and the pipeline load in the handler.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ate_fast.cli import require_device
from ate_fast.cli_errors import CommandLineError, device_flag


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return path


def _check_writable(out: Path, overwrite: bool) -> None:
    """``out`` created if missing and writable, holding no earlier demo's results unless
    ``overwrite``; otherwise a one-line error naming ``--out``."""
    from ate_fast.demo.report import output_names

    earlier = [name for name in output_names() if (out / name).exists()]
    if earlier and not overwrite:
        raise CommandLineError(
            f"--out {out}: holds an earlier run's {', '.join(earlier)} "
            "(pass --overwrite to replace them, or another --out)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".ate-fast-demo-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CommandLineError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to ``ate-fast``'s subparsers."""
    p = subparsers.add_parser(
        "demo",
        help="the whole ATE job on a built-in cross-embodiment task (CPU, ~2 minutes)",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="the run's seed (default 0)")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes (seconds; for tests, numbers meaningless)"
    )
    p.add_argument(
        "--out", type=_out_dir, metavar="DIR", help="write demo.md, demo.json and align.log here"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run's results in --out"
    )
    p.add_argument(
        "--device", type=device_flag, default="cpu", help="cpu (default), cuda or cuda:N"
    )
    p.add_argument(
        "--demos", type=_positive_int, help="robot B demonstrations (default 10; --quick 3)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--verbose", action="store_true", help="also print the Align trainers' epoch lines"
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    require_device(args.device)

    from ate_fast.demo.config import DemoConfig
    from ate_fast.demo.pipeline import run_demo
    from ate_fast.demo.report import render, write_outputs

    overrides: dict[str, Any] = {"seed": args.seed, "device": args.device}
    if args.demos is not None:
        overrides["demos"] = args.demos
    cfg = DemoConfig.quick_run(**overrides) if args.quick else DemoConfig(**overrides)
    if args.out is not None:
        # before the run, not after it (its results would be lost)
        _check_writable(args.out, args.overwrite)
    result = run_demo(cfg, progress=not args.no_progress, verbose=args.verbose)
    print()
    print(render(result))
    if args.out is not None:
        paths = write_outputs(result, args.out)
        print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0

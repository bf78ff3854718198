"""``ate-fast eval metaworld``: the Meta-World cross-embodiment benchmark.

The parser needs only the configs' names; the benchmark (torch, the trainers) loads in
the handler, so that building ``ate-fast``'s parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from ate_fast.cli_errors import CommandLineError, with_flag_names
from ate_fast.eval.metaworld.config import CONFIGS, METHODS, POLICY_KINDS
from ate_fast.eval.metaworld.embodiment import SHIFTS

# run_benchmark's argument names -> the flags that set them (for error messages)
FLAGS = {
    "out_dir": "--out", "cache_dir": "--cache-dir", "workers": "--workers",
    **{name: f"--{name}" for name in ("methods", "policies", "shifts", "demos", "seeds")},
}  # fmt: skip
EVAL_EXTRA = ("metaworld", "mujoco")


def _require_extra() -> None:
    """The [eval] extra is installed, or a one-line error that says how to install it."""
    missing = [name for name in EVAL_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise CommandLineError(
            f"the Meta-World benchmark needs the [eval] extra ({', '.join(missing)} not "
            f"installed): pip install 'ate_fast[eval]'"
        )


@with_flag_names(FLAGS)
def _cmd_metaworld(args: argparse.Namespace) -> int:
    if args.list:
        for name, cfg in CONFIGS.items():
            print(
                f"{name}: targets {list(cfg.target_tasks)}, shifts {list(cfg.shifts)}, policies "
                f"{list(cfg.policies)}, N {list(cfg.demos)}, seeds {list(cfg.seeds)}, "
                f"methods {list(cfg.methods)}"
            )
        return 0
    if args.workers is not None and args.workers < 1:
        raise CommandLineError(f"--workers: expected >= 1, got {args.workers}")
    _require_extra()
    from ate_fast.eval.metaworld.runner import run_benchmark  # deferred: see the docstring

    only = {key: getattr(args, key) for key in ("methods", "policies", "shifts", "demos", "seeds")}
    out = run_benchmark(
        args.config,
        args.out or f"results/metaworld-{args.config}",
        only=only,
        workers=args.workers,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    print(f"results in {out} (summary.md, summary.json, success.png, runs/*.json)")
    return 0


@with_flag_names(FLAGS)
def _cmd_rtc(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise CommandLineError(f"--workers: expected >= 1, got {args.workers}")
    if args.env == "point-mass":
        for flag, value in (("--workers", args.workers), ("--cache-dir", args.cache_dir)):
            if value is not None:  # the point-mass study runs in this process, caches nothing
                raise CommandLineError(f"{flag} does not apply to --env point-mass")
        from ate_fast.demo.realtime_study import (
            point_mass_latency,
            point_mass_settings,
            run_point_mass_study,
        )
        from ate_fast.eval.metaworld.realtime_runner import latency_file, write_realtime_report

        out = args.out or f"results/rtc-point-mass-{args.protocol}"
        run_point_mass_study(args.protocol, out, progress=not args.no_progress)
        latency_file(
            Path(out), lambda: point_mass_latency(args.protocol), point_mass_settings(args.protocol)
        )
        paths = write_realtime_report(out, "the point-mass world")
        print(f"results in {out} ({', '.join(p.name for p in paths.values())}, runs/*.json)")
        return 0
    _require_extra()
    from ate_fast.eval.metaworld.realtime_runner import run_realtime_study  # deferred

    out = run_realtime_study(
        args.protocol,
        args.out or f"results/rtc-{args.protocol}",
        workers=2 if args.workers is None else args.workers,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    print(f"results in {out} (realtime.md, realtime.json, realtime.png, summary.*, runs/*.json)")
    return 0


def _register_rtc(sims: Any) -> None:
    p = sims.add_parser(
        "rtc",
        help="real-time chunking on Meta-World: delays × strategies (needs the [eval] extra)",
        description=(
            "The benchmark's flow policy run as an asynchronous controller with a simulated "
            "inference delay d: naive switching, temporal ensembling, inference-time RTC, "
            "training-time RTC, and RTC with the Steer.recommended policy; success (paired "
            "vs naive, 95% intervals), action jumps at chunk switches, sampler latency. "
            "Reuses the benchmark's cache; resumable: finished runs in --out are skipped."
        ),
    )
    p.add_argument("--protocol", choices=("smoke", "quick", "full"), default="quick")
    p.add_argument(
        "--env",
        choices=("metaworld", "point-mass"),
        default="metaworld",
        help="Meta-World (the benchmark's flow policy; default) or the demo's point-mass "
        "world (no extra needed; no Steer row)",
    )
    p.add_argument(
        "--out", help="output folder (default results/rtc-<protocol>, rtc-point-mass-<protocol>)"
    )
    p.add_argument(
        "--cache-dir", help="the benchmark's artefact cache (as eval metaworld; Meta-World only)"
    )
    p.add_argument("--workers", type=int, help="parallel processes (default 2; Meta-World only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_rtc)


def register(subparsers: Any) -> None:
    evaluation = subparsers.add_parser("eval", help="evaluate adaptation methods on a simulator")
    sims = evaluation.add_subparsers(dest="simulator", required=True)
    p = sims.add_parser(
        "metaworld",
        help="Meta-World cross-embodiment benchmark (needs the [eval] extra)",
        description=(
            "Pre-train on source tasks, adapt to held-out hard tasks on a robot with another "
            "action space with each method, evaluate, report success with 95% bootstrap "
            "intervals. Resumable: finished runs in --out are skipped."
        ),
    )
    p.add_argument("--config", choices=list(CONFIGS), default="quick")
    p.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help="restrict the config's methods"
    )
    p.add_argument("--policies", nargs="+", choices=POLICY_KINDS, help="restrict policies")
    p.add_argument("--shifts", nargs="+", choices=SHIFTS, help="restrict embodiment shifts")
    p.add_argument("--demos", nargs="+", type=int, help="restrict N (demos per task)")
    p.add_argument("--seeds", nargs="+", type=int, help="restrict seeds")
    p.add_argument("--out", help="output folder (default results/metaworld-<config>)")
    p.add_argument(
        "--cache-dir",
        help="artefacts shared by runs: demos, VAEs, pre-trained policies (default "
        "$ATE_FAST_CACHE/metaworld, else ~/.cache/ate_fast/metaworld; shared by configs)",
    )
    p.add_argument("--workers", type=int, help="parallel processes (default: CPUs, at most 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="print the configs and exit")
    p.set_defaults(func=_cmd_metaworld)
    _register_rtc(sims)

"""``ate-fast tune``: the fastest of the package's opt-in paths for a reference head's
captured sampler at the deployed shape, measured on this machine, saved as JSON.

    ate-fast tune --head flow-transformer --config pi0-expert --random-init \\
        --dtype bfloat16 --device cuda --batch 1 --steps 10 \\
        --cond-len 816 --cond-as kv-cache --out tuned.json

The head, sampler and guidance flags are ``ate-fast export onnx``'s; ``--rtc-horizon S``
(with ``--rtc-delay``, ``--rtc-beta``) tunes the real-time-chunking sampler instead (its
step: the head's forward and a VJP through it). Timing does not
depend on the weights, so ``--random-init`` tunes for any checkpoint of that config; the
output is checked against the baseline's either way. Deploy with
``with ate_fast.apply_settings(ate_fast.load_settings("tuned.json")): captured = ...``,
or, for a process started by a shell or a service manager, ``ate-fast settings
tuned.json`` (``export`` lines; ``--format env``: ``VAR=value`` lines).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ate_fast.argument_checks import check_int
from ate_fast.cli import require_device
from ate_fast.cli_errors import (
    CommandLineError,
    check_output_file,
    device_flag,
    flag_of,
    with_flag_names,
)
from ate_fast.export.cli import (
    FLAGS,
    cond_arguments,
    example_cond,
    load_head,
    make_guidance,
    make_sampler,
    policy_arguments,
    require_weights,
)

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: Any) -> None:
    """Add ``tune`` to the ``ate-fast`` parser."""
    p = subparsers.add_parser(
        "tune",
        help="pick the fastest ATE_FAST_* paths for a captured sampler on this GPU (JSON)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    policy_arguments(p)
    g = p.add_argument_group("problem")
    g.add_argument(
        "--device", type=device_flag, help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="head (and VAE) dtype")
    g.add_argument("--batch", type=int, default=1, help="B, as deployed")
    cond_arguments(g)
    g.add_argument("--seed", type=int, default=0, help="random init and example inputs")
    r = p.add_argument_group("real-time chunking (instead of --guidance-vae)")
    r.add_argument(
        "--rtc-horizon", type=int, metavar="S",
        help="tune the RTC-guided sampler (a VJP through the head per step) that executes S "
        "steps of each chunk",
    )  # fmt: skip
    r.add_argument("--rtc-delay", type=int, help="d, the inference delay in steps (default 0)")
    r.add_argument("--rtc-beta", type=float, help="β, the guidance weight's clip (default 5)")
    t = p.add_argument_group("tuning")
    t.add_argument("--out", required=True, help="the JSON settings file to write")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("--rounds", type=int, default=20, help="timed calls per option")
    t.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    t.add_argument("--min-gain", type=float, default=0.02, help="keep an option this much faster")
    t.add_argument(
        "--tolerance", type=float, default=1e-2,
        help="max |Δ| / max|baseline| an option's output may differ by",
    )  # fmt: skip
    t.add_argument("--budget-s", type=float, help="stop trying options after this many s")
    t.add_argument(
        "--exclude", action="append", default=[], metavar="VAR=path",
        help="a path not to try, e.g. ATE_FAST_PREFIX_ATTENTION=flex (its torch.compile per "
        "trial takes minutes); repeat for more",
    )  # fmt: skip
    t.add_argument(
        "--journal", metavar="PATH",
        help="the trials as they finish, to resume an interrupted run from; None: "
        "OUT.journal (removed once OUT is written)",
    )  # fmt: skip
    t.add_argument(
        "--fresh", action="store_true", help="discard an existing journal: measure everything"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=with_flag_names(TUNE_FLAGS)(_cmd_tune))
    show = subparsers.add_parser(
        "settings",
        help="print a tuned settings file's variables for a shell or a service's environment",
    )
    show.add_argument("file", help="the JSON settings file (ate-fast tune --out)")
    show.add_argument(
        "--format", choices=SETTINGS_FORMATS, default="shell",
        help="shell: 'export VAR=value' lines (eval \"$(ate-fast settings F)\"); env: "
        "VAR=value lines (systemd EnvironmentFile=, docker --env-file)",
    )  # fmt: skip
    show.add_argument(
        "--device", type=device_flag,
        help="warn (on stderr) if the file was tuned on another GPU than this one",
    )  # fmt: skip
    show.set_defaults(func=_cmd_settings)


SETTINGS_FORMATS = ("shell", "env")


TUNE_FLAGS = {**FLAGS, "min_gain": "--min-gain", "budget_s": "--budget-s", "exclude": "--exclude",
              "journal": "--journal", "execution_horizon": "--rtc-horizon",
              "delay": "--rtc-delay", "max_guidance_weight": "--rtc-beta"}  # fmt: skip
# The flags that say how to search, not what: a journal resumes across changes to these.
SEARCH_FLAGS = ("out", "overwrite", "rounds", "warmup", "min_gain", "tolerance", "budget_s",
                "exclude", "journal", "fresh", "no_progress", "func")  # fmt: skip


def _cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ate_fast.tuning import autotune
    from ate_fast.tuning.switches import default_choices

    check_output_file(args.out, args.overwrite)  # before the minutes of tuning
    journal = Path(args.journal if args.journal is not None else f"{args.out}.journal")
    require_weights(args)
    device = require_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for flag, value, low in (("--batch", args.batch, 1), ("--rounds", args.rounds, 1),
                             ("--warmup", args.warmup, 0)):  # fmt: skip
        check_int(flag, value, low)  # before the model is built
    default_choices(device.type, exclude=tuple(args.exclude))  # --exclude checked up front
    dtype = getattr(torch, args.dtype)
    try:
        head = load_head(args).to(device=device, dtype=dtype)
        sampler = make_sampler(args, head)
        guidance = make_guidance(args, device, dtype)
    except TypeError as exc:
        raise CommandLineError(str(exc)) from exc
    gen = torch.Generator().manual_seed(args.seed)
    cfg = head.config
    noise = torch.randn(args.batch, cfg.horizon, cfg.action_dim, generator=gen).to(device)
    guidance = _rtc_guidance(args, guidance, noise, gen)
    cond = example_cond(head, args.batch, args, gen, device, dtype)

    def build():
        with torch.no_grad():
            captured = sampler.capture(noise, cond, guidance=guidance, check_finite=False)
        return lambda: captured(noise, cond)

    if args.fresh:
        journal.unlink(missing_ok=True)
    elif journal.is_file():
        print(f"resuming from {journal} (--fresh to measure everything again)", file=sys.stderr)
    latent = getattr(guidance, "encoder", None)  # a LatentGuidance's (RTC reads the head)
    source = None if latent is None else latent.source
    encoder = getattr(source, "arch", None)  # an ActionVAE's: "mlp" or "transformer"
    try:
        result = autotune(
            build, rounds=args.rounds, warmup=args.warmup, min_gain=args.min_gain,
            tolerance=args.tolerance, guided=latent is not None,
            transformer_encoder=encoder == "transformer", budget_s=args.budget_s,
            exclude=tuple(args.exclude), progress=not args.no_progress, journal=journal,
            workload={k: v for k, v in vars(args).items() if k not in SEARCH_FLAGS},
        )  # fmt: skip
    except KeyboardInterrupt:
        if journal.is_file():
            print(f"the trials finished are in {journal}: the same command resumes from "
                  "them", file=sys.stderr)  # fmt: skip
        raise
    print(result.summary())
    path = result.save(args.out)
    journal.unlink(missing_ok=True)  # its trials are in OUT now
    print(f"wrote {path}")
    if result.settings:  # how to deploy them
        import shlex

        print(f"in force while capturing: ate_fast.apply_settings(ate_fast.load_settings("
              f"{str(path)!r})); for a shell or a service: eval \"$(ate-fast settings "
              f"{shlex.quote(str(path))})\"")  # fmt: skip
    return 0


def _rtc_guidance(args: argparse.Namespace, guidance: Any, noise: Any, gen: Any) -> Any:
    """``--rtc-*``'s RTCGuidance toward a random previous chunk like ``noise`` [B, H, D]
    (timing does not depend on it), or ``guidance`` where ``--rtc-horizon`` is not given."""
    import torch

    from ate_fast.realtime import DEFAULT_MAX_GUIDANCE_WEIGHT, RTCGuidance

    if args.rtc_horizon is None:
        given = [flag_of(dest) for dest in ("rtc_delay", "rtc_beta")
                 if getattr(args, dest) is not None]  # fmt: skip
        if given:
            raise CommandLineError(f"{', '.join(given)}: needs --rtc-horizon")
        return guidance
    if guidance is not None:
        raise CommandLineError("--rtc-horizon and --guidance-vae: one guidance at a time")
    prev = torch.randn(noise.shape, generator=gen).to(noise.device)
    beta = DEFAULT_MAX_GUIDANCE_WEIGHT if args.rtc_beta is None else args.rtc_beta
    return RTCGuidance(prev, args.rtc_delay or 0, execution_horizon=args.rtc_horizon,
                       max_guidance_weight=beta)  # fmt: skip


def _cmd_settings(args: argparse.Namespace) -> int:
    import shlex

    from ate_fast.tuning.settings import read_document, warn_if_tuned_elsewhere

    device = None if args.device is None else require_device(args.device)
    document = read_document(args.file)  # checked
    warn_if_tuned_elsewhere(args.file, document, device)
    settings = document["settings"]
    for key in ("device", "torch", "ate_fast"):  # what it was measured on, as a comment
        if document.get(key) is not None:
            print(f"# {key}: {document[key]}")
    for var, value in settings.items():
        if args.format == "shell":
            print(f"export {var}={shlex.quote(value)}")
        else:  # systemd / docker take the rest of the line as the value: no quoting there
            if "\n" in value:
                raise CommandLineError(f"{args.file}: {var}'s value spans lines: {value!r}")
            print(f"{var}={value}")
    return 0

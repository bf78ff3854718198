"""``ate-fast export``: ``onnx`` (a reference head + sampler [+ guidance] -> one ONNX graph)
and ``tensorrt`` (an ONNX graph -> a TensorRT engine).

    ate-fast export onnx --head mlp --ckpt head.safetensors --method euler --steps 10 \\
        --out policy.onnx [--guidance-vae align_ckpt/ [--target prior.safetensors]] --verify
    ate-fast export tensorrt policy.onnx --out policy.plan --precision fp16

Importing this module imports argparse only; the handlers import torch, onnx, tensorrt.
User files are told by their content, not their suffix: ``--ckpt`` is a safetensors or
``torch.save`` file, ``--target`` a LatentPrior file, a safetensors / ``torch.save`` /
``.npy`` tensor; anything else is a one-line error (exit 2) naming what the file is.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

from ate_fast.cli_errors import CommandLineError, check_output_file, flag_of, with_flag_names

HEAD_NAMES = ("mlp", "flow-transformer", "unet1d")
FLOW_METHODS = ("euler", "heun")
DIFFUSION_METHODS = ("ddpm", "ddim", "dpmsolver++")
VERIFY_TOLERANCE = 1e-4
COND_FORMS = ("tokens", "kv-cache", "kv-cache-masked")  # --cond-as


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def register(subparsers: Any) -> None:
    """Add ``export onnx`` and ``export tensorrt`` to the ``ate-fast`` parser."""
    export = subparsers.add_parser(
        "export", help="deployment: a whole sampler as ONNX, and TensorRT engines"
    )
    sub = export.add_subparsers(dest="export_command", required=True)
    _register_onnx(sub)
    _register_tensorrt(sub)


def _register_onnx(sub: Any) -> None:
    p = sub.add_parser(
        "onnx",
        help="export a reference head's K-step sampler (optionally guided) as one ONNX graph",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    policy_arguments(p)
    _graph_arguments(p.add_argument_group("graph"))
    p.set_defaults(func=with_flag_names(FLAGS)(_cmd_onnx))


def policy_arguments(p: Any) -> None:
    """The head, sampler and guidance flags, each in its group (``export onnx``, ``tune``)."""
    head_arguments(p.add_argument_group("policy head"))
    sampler_arguments(p.add_argument_group("sampler"))
    guidance_arguments(
        p.add_argument_group("guidance (LatentGuidance over an `ate-fast align` VAE)")
    )


def head_arguments(g: Any) -> None:
    g.add_argument("--head", required=True, choices=HEAD_NAMES, help="reference head")
    g.add_argument("--config", default="small", help="the head's named config")
    g.add_argument(
        "--set", dest="overrides", action="append", type=_key_value, default=[],
        metavar="KEY=VALUE", help="override a config field (repeatable), e.g. horizon=16",
    )  # fmt: skip
    g.add_argument("--ckpt", help="head weights: .safetensors or a torch state_dict (.pt)")
    g.add_argument(
        "--random-init", action="store_true", help="export untrained weights (no --ckpt)"
    )


def sampler_arguments(g: Any) -> None:
    g.add_argument(
        "--method", default="euler", choices=FLOW_METHODS + DIFFUSION_METHODS,
        help="flow (euler, heun) or diffusion (ddpm, ddim, dpmsolver++) sampler",
    )  # fmt: skip
    g.add_argument("--steps", type=int, default=10, help="K steps")
    # the method-specific flags default to None: one given for a method that ignores it
    # is an error (METHOD_FLAGS), not a graph other than the one asked for
    g.add_argument("--time-grid", help="flow: uniform (default) or diffusers")
    g.add_argument("--shift", type=float, help="flow: the diffusers grid's shift (1.0)")
    g.add_argument("--schedule", help="diffusion: beta schedule (squaredcos_cap_v2)")
    g.add_argument("--train-timesteps", type=int, help="diffusion: N (100)")
    g.add_argument("--prediction-type", help="diffusion: what the head predicts (epsilon)")
    g.add_argument("--timestep-spacing", help="diffusion: leading, trailing or linspace")
    g.add_argument("--eta", type=float, help="DDIM noise weight (0.0)")
    g.add_argument("--solver-order", type=int, help="DPM-Solver++ order (2)")
    g.add_argument("--clip-sample", action="store_true", help="DDPM/DDIM: clip x0 to ±1")


def guidance_arguments(g: Any) -> None:
    g.add_argument("--guidance-vae", help="align checkpoint directory (arch mlp or transformer)")
    g.add_argument("--guidance-scale", type=float, help="λ (2.0)")
    g.add_argument("--guidance-clamp", type=float, help="κ (0.1)")
    g.add_argument("--guidance-mode", help="direct (default) or tweedie")
    g.add_argument(
        "--target",
        help="bake z* into the graph: a LatentPrior file (its mean) or a tensor [d_z] "
        "(safetensors, torch.save or .npy, told by content); without it the graph takes a "
        "`target` input",
    )


def _graph_arguments(g: Any) -> None:
    g.add_argument("--out", required=True, help="the .onnx file to write")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g.add_argument("--batch", type=int, default=1, help="example batch")
    g.add_argument("--static-batch", action="store_true", help="fix the batch to --batch")
    g.add_argument("--max-batch", type=int, default=1 << 16, help="dynamic batch upper bound")
    cond_arguments(g)
    g.add_argument("--opset", type=int, default=18, help="ONNX opset (18..20)")
    g.add_argument("--seed", type=int, default=0, help="random init and example inputs")
    g.add_argument(
        "--verify", action="store_true",
        help=f"run the graph in ONNX Runtime against PyTorch (batch 1 and 8); exit 1 above "
        f"{VERIFY_TOLERANCE:g} relative error",
    )  # fmt: skip


def cond_arguments(g: Any) -> None:
    """``--cond-len`` and ``--cond-as``: the flow-transformer's conditioning."""
    g.add_argument(
        "--cond-len", type=int, default=0,
        help="flow-transformer: conditioning tokens L (0: no cond input)",
    )  # fmt: skip
    g.add_argument(
        "--cond-as", default="tokens", choices=COND_FORMS,
        help="flow-transformer with --cond-len: the graph's conditioning inputs: the tokens "
        "`cond` [B, L, width]; or a VLM's KV cache (a PrefixCache): `cond.keys.<i>` and "
        "`cond.values.<i>` [B, kv_heads, L, head_dim] per block, and with kv-cache-masked "
        "also `cond.mask` bool [B, L] (False: padding, openpi's prefix mask)",
    )  # fmt: skip


def _register_tensorrt(sub: Any) -> None:
    t = sub.add_parser(
        "tensorrt",
        help="build a TensorRT engine from an exported graph",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("onnx", help="the .onnx file from `ate-fast export onnx`")
    t.add_argument("--out", required=True, help="the engine (.plan) to write")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    t.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace, GiB")
    t.add_argument("--min-batch", type=int, default=1)
    t.add_argument("--opt-batch", type=int, help="default: --min-batch")
    t.add_argument(
        "--max-batch", type=int,
        help="default: 8, or the graph's --max-batch when smaller (it may not exceed it)",
    )  # fmt: skip
    t.add_argument(
        "--strongly-typed", action="store_true",
        help="TensorRT 10: build strongly typed from a cast graph (always so on TensorRT 11)",
    )  # fmt: skip
    t.add_argument("--opt-level", type=int, help="builder optimisation level 0..5")
    t.add_argument(
        "--timing-cache", metavar="PATH",
        help="TensorRT's layer-timing cache: read if it exists, updated after the build "
        "(rebuilds of the same shapes skip most tactic timing)",
    )  # fmt: skip
    t.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    t.set_defaults(func=with_flag_names(FLAGS)(_cmd_tensorrt))


# --- handlers (heavy imports live here) -----------------------------------------------
def _torch_load(path: str, flag: str) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CommandLineError(f"{flag} {path}: unreadable torch.save file ({exc})") from exc


def _safetensors(path: str, flag: str) -> tuple[dict, dict]:
    """``(tensors, header metadata)`` of a safetensors file."""
    from ate_fast.align.atomic_io import load_safetensors

    try:
        return load_safetensors(path)
    except ValueError as exc:
        raise CommandLineError(f"{flag} {path}: {exc}") from exc


def _load_state(path: str) -> dict:
    from ate_fast.data.file_format import require_format

    fmt = require_format(path, ("safetensors", "torch"), "--ckpt")
    if fmt == "safetensors":
        return _safetensors(path, "--ckpt")[0]
    state = _torch_load(path, "--ckpt")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--ckpt {path}: expected a state_dict, got {type(state).__name__}")
    return state


def require_weights(args: argparse.Namespace) -> None:
    """Exactly one of ``--ckpt`` and ``--random-init`` given, else a one-line error."""
    if not args.ckpt and not args.random_init:
        raise CommandLineError("give --ckpt (the head's weights) or --random-init")
    if args.ckpt and args.random_init:
        raise CommandLineError("--ckpt and --random-init exclude each other")


def load_head(args: argparse.Namespace) -> Any:
    """The reference head of ``--head`` / ``--config`` / ``--set``, with ``--ckpt``'s
    weights where given (seeded by ``--seed``), in eval mode without gradients."""
    import torch

    from ate_fast.models import make_head

    torch.manual_seed(args.seed)
    try:
        head = make_head(args.head, args.config, **dict(args.overrides))
    except TypeError as exc:
        raise ValueError(f"--set: {exc}") from exc
    if args.ckpt:
        state = _load_state(args.ckpt)
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(
                f"--ckpt {args.ckpt} does not fit --head {args.head} --config {args.config} "
                f"with {dict(args.overrides)}: {exc}"
            ) from exc
    return head.eval().requires_grad_(False)


# Python argument names in the library's errors -> the flags that set them
FLAGS = {
    "num_steps": "--steps", "num_train_timesteps": "--train-timesteps",
    "time_grid": "--time-grid", "timestep_spacing": "--timestep-spacing",
    "prediction_type": "--prediction-type", "solver_order": "--solver-order",
    "clip_sample": "--clip-sample", "eta": "--eta", "shift": "--shift", "opset": "--opset",
    "max_batch": "--max-batch", "min_batch": "--min-batch", "opt_batch": "--opt-batch",
    "workspace_gb": "--workspace-gb", "timing_cache": "--timing-cache",
}  # fmt: skip
# flag dest -> (the methods it applies to, its default)
METHOD_FLAGS: dict[str, tuple[tuple[str, ...], Any]] = {
    "time_grid": (FLOW_METHODS, "uniform"),
    "shift": (FLOW_METHODS, 1.0),
    "schedule": (DIFFUSION_METHODS, "squaredcos_cap_v2"),
    "train_timesteps": (DIFFUSION_METHODS, 100),
    "prediction_type": (DIFFUSION_METHODS, "epsilon"),
    "timestep_spacing": (DIFFUSION_METHODS, None),
    "eta": (("ddim",), 0.0),
    "solver_order": (("dpmsolver++",), 2),
    "clip_sample": (("ddpm", "ddim"), False),
}
GUIDANCE_FLAGS = {"guidance_scale": 2.0, "guidance_clamp": 0.1, "guidance_mode": "direct"}


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Every method flag's value for ``--method`` (its default where not given); raises
    naming a flag given for a method that ignores it."""
    values = {}
    for dest, (methods, default) in METHOD_FLAGS.items():
        given = getattr(args, dest)
        if given not in (None, False) and args.method not in methods:
            raise CommandLineError(
                f"{flag_of(dest)} applies to --method {' / '.join(methods)}, not {args.method}"
            )
        values[dest] = default if given is None else given
    return values


def make_sampler(args: argparse.Namespace, head: Any) -> Any:
    """The sampler of ``--method`` / ``--steps`` and the method's flags over ``head``."""
    from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule

    o = _method_options(args)
    if args.method in FLOW_METHODS:
        return FlowSampler(head, args.steps, args.method, o["time_grid"], o["shift"])
    schedule = NoiseSchedule(o["schedule"], o["train_timesteps"])
    options: dict[str, Any] = {"prediction_type": o["prediction_type"]}
    if o["timestep_spacing"]:
        options["timestep_spacing"] = o["timestep_spacing"]
    if args.method == "ddim":
        options["eta"] = o["eta"]
    if args.method == "dpmsolver++":
        options["solver_order"] = o["solver_order"]
    if o["clip_sample"]:
        options["clip_sample"] = True
    return DiffusionSampler(head, schedule, args.method, args.steps, **options)


def _target(path: str) -> Any:
    import numpy as np
    import torch

    from ate_fast.align import LatentPrior
    from ate_fast.align.prior import OTHER_FORMATS, PRIOR_FORMAT
    from ate_fast.data.file_format import require_format

    fmt = require_format(path, ("safetensors", "torch", "npy"), "--target")
    if fmt == "npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    if fmt == "torch":
        value = _torch_load(path, "--target")
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"--target {path}: expected a tensor [d_z], got {type(value).__name__}"
            )
        return value.float()
    tensors, meta = _safetensors(path, "--target")
    if meta.get("format") == PRIOR_FORMAT:
        return LatentPrior.load(path).mean  # a prior from `ate-fast align prior`, verified
    if meta.get("format") in OTHER_FORMATS:
        raise CommandLineError(
            f"--target {path}: expected a LatentPrior file or a tensor [d_z], got "
            f"{OTHER_FORMATS[meta['format']]}"
        )
    for key in ("target", "mean", "z"):
        if key in tensors:
            return tensors[key].float()
    if len(tensors) == 1:
        return next(iter(tensors.values())).float()
    raise ValueError(f"--target {path}: name the tensor 'target' ({sorted(tensors)} found)")


def make_guidance(args: argparse.Namespace, device: Any = None, dtype: Any = None) -> Any:
    """``--guidance-vae``'s LatentGuidance (``--target``, λ, κ, mode), or None; its VAE
    moved to ``device`` / ``dtype`` where given (the target to ``device``)."""
    import torch

    from ate_fast.align import KIND_STAGE1, KIND_STAGE2, load_checkpoint
    from ate_fast.steer import LatentGuidance

    given = [flag_of(dest) for dest in GUIDANCE_FLAGS if getattr(args, dest) is not None]
    if args.guidance_vae is None:
        if args.target:
            raise ValueError("--target needs --guidance-vae")
        if given:  # an unguided graph would be written
            verb = "needs" if len(given) == 1 else "need"
            raise CommandLineError(f"{', '.join(given)} {verb} --guidance-vae")
        return None
    settings = {d: v if getattr(args, d) is None else getattr(args, d)
                for d, v in GUIDANCE_FLAGS.items()}  # fmt: skip
    try:
        vae = load_checkpoint(args.guidance_vae, kind=(KIND_STAGE1, KIND_STAGE2)).vae
    except ValueError as exc:
        raise CommandLineError(f"--guidance-vae: {exc}") from exc
    target = _target(args.target) if args.target else torch.zeros(vae.latent_dim)
    if target.ndim != 1 or target.shape[0] != vae.latent_dim:
        raise CommandLineError(
            f"--target {args.target}: expected a latent [d_z] = [{vae.latent_dim}] for "
            f"--guidance-vae {args.guidance_vae}, got shape {list(target.shape)}"
        )
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LatentGuidance(vae, target.to(device), settings["guidance_scale"],
                          settings["guidance_clamp"], settings["guidance_mode"])  # fmt: skip


def example_cond(
    head: Any, batch: int, args: argparse.Namespace, generator: Any, device: Any = None,
    dtype: Any = None,
) -> Any:  # fmt: skip
    """An example ``cond`` for ``head`` at ``batch`` (``--cond-len``, ``--cond-as``); a
    masked KV cache pads each sample after a random number (1…L) of real tokens. Drawn on
    the CPU (the same values on any device), then moved to ``device`` / ``dtype``."""
    import torch

    cfg, cond_len = head.config, args.cond_len
    if args.cond_as != "tokens" and not cond_len:
        raise CommandLineError(f"--cond-as {args.cond_as} needs --cond-len (the prefix length)")
    if hasattr(cfg, "cond_dim"):
        if cond_len:
            raise CommandLineError(f"--cond-len applies to the flow-transformer head, not {cfg}")
        if not cfg.cond_dim:
            return None
        return torch.randn(batch, cfg.cond_dim, generator=generator).to(device, dtype)
    if not cond_len:
        return None
    tokens = torch.randn(batch, cond_len, cfg.width, generator=generator).to(device, dtype)
    if args.cond_as == "tokens":
        return tokens
    mask = None
    if args.cond_as == "kv-cache-masked":
        real = torch.randint(1, cond_len + 1, (batch, 1), generator=generator)
        mask = (torch.arange(cond_len)[None, :] < real).to(device)
    with torch.no_grad():
        return head.prefix_cache(tokens, mask)


def _cmd_onnx(args: argparse.Namespace) -> int:
    import torch

    from ate_fast.export import (
        ExportError,
        GuidanceExportError,
        ModelTraceError,
        OnnxRuntimeSampler,
        relative_error,
        to_onnx,
    )

    check_output_file(args.out, args.overwrite)  # before loading and tracing
    require_weights(args)
    try:
        head = load_head(args)
        sampler = make_sampler(args, head)
        guidance = make_guidance(args)
    except TypeError as exc:
        raise CommandLineError(str(exc)) from exc
    gen = torch.Generator().manual_seed(args.seed)
    cfg = head.config
    noise = torch.randn(args.batch, cfg.horizon, cfg.action_dim, generator=gen)
    cond = example_cond(head, args.batch, args, gen)
    try:
        path = to_onnx(
            sampler, args.out, noise, cond, guidance=guidance,
            dynamic_batch=not args.static_batch, opset=args.opset,
            target_input=args.target is None, max_batch=args.max_batch,
        )  # fmt: skip
    except (GuidanceExportError, ModelTraceError, ExportError, TypeError) as exc:
        raise CommandLineError(str(exc)) from exc
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {sampler!r}")
    if not args.verify:
        return 0
    runner = OnnxRuntimeSampler(path)
    worst = 0.0
    for batch in (args.batch,) if args.static_batch else (1, min(8, args.max_batch)):
        noise = torch.randn(batch, cfg.horizon, cfg.action_dim, generator=gen)
        cond = example_cond(head, batch, args, gen)
        seed = int(torch.randint(1 << 30, (1,), generator=gen))
        ref = sampler.sample(
            noise, cond, guidance=guidance, generator=torch.Generator().manual_seed(seed)
        )
        out = runner.sample(
            noise, cond, guidance=guidance, generator=torch.Generator().manual_seed(seed)
        )
        err = relative_error(out, ref)
        worst = max(worst, err)
        print(f"onnxruntime vs PyTorch, batch {batch}: max relative error {err:.2e}")
    return 0 if worst <= VERIFY_TOLERANCE else 1


def _cmd_tensorrt(args: argparse.Namespace) -> int:
    from ate_fast.export import TensorRTUnavailableError, to_tensorrt

    check_output_file(args.out, args.overwrite)
    try:
        path = to_tensorrt(
            args.onnx, args.out, args.precision, args.workspace_gb, args.min_batch,
            args.opt_batch, args.max_batch, strongly_typed=True if args.strongly_typed else None,
            builder_optimization_level=args.opt_level, timing_cache=args.timing_cache,
            verbose=args.verbose,
        )  # fmt: skip
    except TensorRTUnavailableError as exc:
        raise CommandLineError(str(exc)) from exc
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.precision})")
    return 0

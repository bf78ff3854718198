"""``ate-fast align stage1 | prior | stage2``: the Align stage from the command line.

::

    ate-fast align stage1 --data pre.hdf5 --horizon 50 --out pre.ckpt
    ate-fast align prior  --vae pre.ckpt --data pre.hdf5 --kind gmm --k 8 --out prior.safetensors
    ate-fast align stage2 --prior prior.safetensors --data adapt/ --out adapt.ckpt

Stage 2 follows stage 1: without ``--init`` its VAE takes the architecture, sizes,
horizon and unified action dim of the stage-1 VAE recorded in the prior file
(``--horizon``, ``--action-dim``, ``--latent-dim``, ``--arch`` and the size flags override
them; an explicit ``--arch`` may differ from stage 1's, since
only the horizon and the latent size are shared with the prior). With ``--init`` the
weights are copied, so a size flag that contradicts the stage-1 checkpoint is an error.
The command prints what it trains.

Several processes: ``torchrun --nproc_per_node 8 -m ate_fast.cli align stage1 ...``.
Only argparse is imported here; torch and the trainers load inside the handlers.
User errors are reported with the flags' names (:data:`FLAGS`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional

from ate_fast.cli_errors import (
    CommandLineError,
    check_output_file,
    device_flag,
    flag_of,
    with_flag_names,
)

DATA_FORMATS = ("auto", "npz", "npy", "robomimic", "aloha", "lerobot")
# Python argument names (trainer configs, ActionChunkDataset) -> the flags that set them
FLAGS = {
    "out_dir": "--out",
    "max_steps": "--max-steps",
    "batch_size": "--batch-size",
    "weight_decay": "--weight-decay",
    "lr_gamma": "--lr-gamma",
    "lr_floor": "--lr-floor",
    "grad_clip": "--grad-clip",
    "val_fraction": "--val-fraction",
    "val_every": "--val-every",
    "num_workers": "--workers",
    "save_every_epochs": "--save-every-epochs",
    "save_every_steps": "--save-every-steps",
    "save_every_minutes": "--save-every-minutes",
    "log_every_steps": "--log-every-steps",
    "kl_samples": "--kl-samples",
    "init_from": "--init",
    "max_pad": "--max-pad",
    "step_mask": "--mask-padding",
    "normalization": "--norm",
    "action_dim": "--action-dim",
    "dim_index": "--dims",
    "latent_dim": "--latent-dim",
    "filter_key": "--filter-key",
    "num_heads": "--heads",
    "d_model": "--d-model",
    "n_components": "--k",
    "dropout": "--dropout",
    **{name: f"--{name}" for name in ("epochs", "lr", "beta", "gamma", "seed", "precision")},
    **{name: f"--{name}" for name in ("device", "resume", "overwrite", "kl", "horizon")},
    **{name: f"--{name}" for name in ("stride", "pad")},
}
# stage 2's model flags: flag dest -> (ActionVAE keyword, the archs it applies to)
MODEL_FLAGS = {
    "d_model": ("d_model", ("transformer",)),
    "heads": ("num_heads", ("transformer",)),
    "ff_dim": ("ff_dim", ("transformer",)),
    "layers": ("num_layers", ("transformer",)),
    "dropout": ("dropout", ("transformer",)),
    "hidden": ("hidden_dims", ("mlp",)),
    "activation": ("activation", ("transformer", "mlp")),
}


# stage 1's architecture sizes when not given (the paper's Transformer, the MLP's widths)
STAGE1_SIZES = {"d_model": 512, "heads": 4, "ff_dim": 1024, "layers": 9, "dropout": 0.0,
                "hidden": [512, 512]}  # fmt: skip

_with_flag_names = with_flag_names(FLAGS)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None``/flags and where the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _add_data_args(
    p: argparse.ArgumentParser, with_chunking: bool = True, stage2: bool = False
) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="action files or directories: .npz/.npy, HDF5 (robomimic /data/demo_*/actions "
        "or ALOHA /action, one file per episode), LeRobot dataset dir or .parquet",
    )
    g.add_argument("--format", choices=DATA_FORMATS, default="auto", help="file format")
    g.add_argument("--key", help="action array/column name (defaults per format)")
    g.add_argument("--filter-key", help="robomimic: read only the demos in /mask/<key>")
    if not with_chunking:
        return
    g.add_argument("--stride", type=int, default=1, help="steps between chunk starts")
    g.add_argument(
        "--pad",
        choices=("edge", "zero"),
        default="edge",
        help="fill for chunks running past an episode's end (edge = repeat the last action)",
    )
    g.add_argument(
        "--max-pad", type=int, help="most padded steps per chunk (default H-1; 0 = full only)"
    )
    g.add_argument(
        "--mask-padding",
        action="store_true",
        help="leave a chunk's padded steps out of the reconstruction loss (LeRobot's "
        "do_mask_loss_for_padding, ACT's is_pad); default: they count, as the loader fills them",
    )
    g.add_argument(
        "--norm",
        choices=("meanstd", "minmax", "none"),
        help="per-dim normalisation, stats saved in the checkpoint (default meanstd)",
    )
    g.add_argument(
        "--lerobot-policy",
        metavar="DIR",
        help="a saved LeRobot policy (its directory or config.json): cut and normalise the "
        "chunks as it predicts them (its horizon, padded action dim and mask, its action "
        "normalisation with --data's meta/stats.json); --data must be that LeRobot dataset",
    )
    g.add_argument(
        "--action-dim",
        type=int,
        help="unified action dim D (default: "
        + ("the stage-1 VAE's, else the data's)" if stage2 else "the data's)"),
    )
    g.add_argument(
        "--dims",
        type=_int_list,
        help="where the data's dims go in D, comma-separated (default 0..D_r-1)",
    )


def _add_model_args(p: argparse.ArgumentParser, stage2: bool = False) -> None:
    title = (
        "model (default: the stage-1 VAE's, from --init or the prior file; with --init a "
        "flag must agree with it)"
        if stage2
        else "model"
    )
    g = p.add_argument_group(title)

    def default(value: Any) -> Any:  # stage 2: None = follow stage 1
        return None if stage2 else value

    g.add_argument(
        "--arch",
        choices=("transformer", "mlp"),
        default=default("transformer"),
        help="the paper's skip-connected Transformer VAE, or the small MLP VAE",
    )
    g.add_argument(
        "--latent-dim",
        type=int,
        default=default(512),
        help="d_z" + (" (default: the prior's)" if stage2 else ""),
    )

    # one architecture's sizes: None when not given, so that a flag of the other one is
    # refused (stage 1 fills in STAGE1_SIZES; stage 2 follows stage 1)
    def sized(dest: str, text: str) -> str:
        return text if stage2 else f"{text} (default {STAGE1_SIZES[dest]})"

    g.add_argument("--d-model", type=int, help=sized("d_model", "transformer width"))
    g.add_argument("--heads", type=int, help=sized("heads", "transformer heads"))
    g.add_argument("--ff-dim", type=int, help=sized("ff_dim", "feed-forward width"))
    g.add_argument(
        "--layers", type=int,
        help=sized("layers", "transformer layers, odd: k in / 1 middle / k out"),
    )  # fmt: skip
    g.add_argument(
        "--dropout", type=float, help=sized("dropout", "dropout (0 in the released code)")
    )
    g.add_argument(
        "--hidden", type=_int_list, help=sized("hidden", "MLP hidden sizes, comma-separated")
    )
    g.add_argument(
        "--activation",
        choices=("gelu", "silu", "relu", "tanh"),
        default=default("gelu"),
        help="activation (gelu is the exact erf form)",
    )


def _add_train_args(p: argparse.ArgumentParser, stage2: bool) -> None:
    g = p.add_argument_group("training (defaults: the paper / released code)")
    g.add_argument("--out", required=True, help="checkpoint directory to write")
    g.add_argument("--epochs", type=int, default=4000 if stage2 else 500, help="epochs")
    g.add_argument("--max-steps", type=int, help="stop (and save) after this many steps")
    g.add_argument(
        "--batch-size", type=int, default=64, help="global batch (split over torchrun ranks)"
    )
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--lr-gamma", type=float, default=0.95, help="ExponentialLR per epoch")
    g.add_argument("--lr-floor", type=float, default=1e-6, help="lowest learning rate")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 = off")
    g.add_argument("--beta", type=float, default=7.5e-5, help="KL weight")
    g.add_argument("--gamma", type=float, default=1.0, help="MMD weight")
    g.add_argument("--val-fraction", type=float, default=0.1, help="episodes held out")
    g.add_argument("--val-every", type=int, default=1, help="epochs between validations")
    g.add_argument("--seed", type=int, default=0, help="weights, data order and noise")
    g.add_argument(
        "--workers", type=int, default=0,
        help="DataLoader worker processes (each item they fetch draws from generators seeded "
        "by (seed, epoch, index): --resume stays exact, whatever the count)",
    )  # fmt: skip
    g.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="autocast: auto = bf16 on GPU (fp16 if unsupported), fp32 on CPU",
    )
    g.add_argument(
        "--device", type=device_flag, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    g.add_argument("--save-every-epochs", type=int, help="checkpoint every N epochs")
    g.add_argument("--save-every-steps", type=int, help="checkpoint every N steps")
    g.add_argument(
        "--save-every-minutes", type=float, default=10.0, help="checkpoint every M minutes; 0 = off"
    )
    g.add_argument("--log-every-steps", type=int, default=50, help="metrics.jsonl step records")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace a checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    if stage2:
        g.add_argument(
            "--kl",
            choices=("reverse", "forward"),
            default="reverse",
            help="reverse = KL(q||p_pre) + MMD to p_pre (paper); forward = KL(p_pre||q) + MMD "
            "to N(0,I) (released code)",
        )
        g.add_argument("--kl-samples", type=int, default=8, help="MC draws for a GMM prior")
        g.add_argument("--init", help="stage-1 checkpoint to start from (its architecture)")


def register(subparsers: Any) -> None:
    """Add ``align`` with ``stage1``, ``prior`` and ``stage2`` to the ``ate-fast`` parser."""
    align = subparsers.add_parser(
        "align", help="ATE Align: train the action VAEs and the latent prior"
    )
    sub = align.add_subparsers(dest="align_command", required=True)

    s1 = sub.add_parser(
        "stage1",
        help="train the pre-training action VAE",
        formatter_class=_HelpFormatter,
    )
    _add_data_args(s1)
    s1.add_argument(
        "--horizon", type=int, help="chunk length H (required unless --lerobot-policy gives it)"
    )
    _add_model_args(s1)
    _add_train_args(s1, stage2=False)
    s1.set_defaults(func=_with_flag_names(_cmd_stage1))

    pr = sub.add_parser(
        "prior",
        help="summarise the stage-1 latent distribution as the stage-2 prior",
        formatter_class=_HelpFormatter,
    )
    pr.add_argument("--vae", required=True, help="stage-1 checkpoint directory")
    _add_data_args(pr, with_chunking=False)
    pr.add_argument("--stride", type=int, help="steps between chunk starts (default: stage 1's)")
    pr.add_argument(
        "--kind",
        choices=("gaussian", "gaussian-code", "gmm"),
        default="gaussian",
        help="gaussian: law of total variance (paper); gaussian-code: mean of sigmas "
        "(released code); gmm: K-component mixture by EM",
    )
    pr.add_argument("--k", type=int, default=8, help="mixture components for --kind gmm")
    pr.add_argument("--batch-size", type=int, default=256, help="chunks per encoder call")
    pr.add_argument("--seed", type=int, default=0, help="EM initialisation seed")
    pr.add_argument(
        "--device", type=device_flag, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    pr.add_argument(
        "--out", required=True, help="prior file to write (safetensors, e.g. prior.safetensors)"
    )
    pr.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing --out (a stage-2 VAE trained against it no longer matches)",
    )  # fmt: skip
    pr.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    pr.set_defaults(func=_with_flag_names(_cmd_prior))

    s2 = sub.add_parser(
        "stage2",
        help="train the adaptation action VAE against the prior",
        formatter_class=_HelpFormatter,
    )
    s2.add_argument(
        "--prior", required=True, help="prior file from `ate-fast align prior` (safetensors)"
    )
    _add_data_args(s2, stage2=True)
    s2.add_argument(
        "--horizon", type=int, help="chunk length H (default: --init's, else the prior's stage 1)"
    )
    _add_model_args(s2, stage2=True)
    _add_train_args(s2, stage2=True)
    s2.set_defaults(func=_with_flag_names(_cmd_stage2))


# --- handlers (heavy imports live here) -------------------------------------------------
def _dataset(args: argparse.Namespace, horizon: int, stats: Any = None, space: Any = None):
    from ate_fast.data import ActionChunkDataset

    kwargs: dict[str, Any] = {}
    if space is not None:  # the prior reuses the stage-1 unified action space
        kwargs.update(action_dim=space.action_dim, dim_index=space.dim_index.tolist())
    else:
        kwargs.update(action_dim=args.action_dim, dim_index=args.dims)
    return ActionChunkDataset(
        args.data,
        horizon,
        stride=args.stride,
        pad=getattr(args, "pad", "edge"),
        max_pad=getattr(args, "max_pad", None),
        step_mask=bool(getattr(args, "mask_padding", False)),
        normalization=getattr(args, "norm", None) or "meanstd",
        stats=stats,
        format=args.format,
        key=args.key,
        filter_key=args.filter_key,
        **kwargs,
    )


def _lerobot_policy(args: argparse.Namespace, horizon: Optional[int]) -> tuple[int, Any]:
    """(horizon, action normaliser) for ``--lerobot-policy`` (it also sets ``--action-dim``
    and ``--dims``); ``(horizon, None)`` without it. A flag that contradicts the policy is
    an error, not an override."""
    if not getattr(args, "lerobot_policy", None):
        if horizon is None:
            raise CommandLineError("--horizon is required (or --lerobot-policy, which sets it)")
        return horizon, None
    from ate_fast.integrations.lerobot import load_lerobot_stats, vae_spec_from_config

    spec = vae_spec_from_config(args.lerobot_policy)
    given = {"--horizon": (horizon, spec.horizon), "--action-dim": (args.action_dim,
             spec.action_dim), "--dims": (args.dims, spec.dims)}  # fmt: skip
    for flag, (value, wanted) in given.items():
        if value is not None and value != wanted:
            raise CommandLineError(
                f"{flag} {value} contradicts --lerobot-policy {args.lerobot_policy} "
                f"({spec.policy_type}: {wanted}); drop {flag}"
            )
    if args.norm is not None:
        raise CommandLineError(
            f"--norm and --lerobot-policy exclude each other: the policy normalises actions "
            f"with {spec.normalization} and the dataset's meta/stats.json"
        )
    if len(args.data) != 1:
        raise CommandLineError(
            "--lerobot-policy needs exactly one --data: the LeRobot dataset whose "
            "meta/stats.json the policy normalises with"
        )
    args.action_dim, args.dims = spec.action_dim, spec.dims
    normalizer = spec.normalizer(load_lerobot_stats(args.data[0]))
    print(
        f"LeRobot {spec.policy_type} policy: horizon {spec.horizon}, action dim "
        f"{spec.action_dim} ({spec.raw_action_dim} used), {spec.normalization} normalisation"
    )
    return spec.horizon, normalizer


def _arch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 1's ``ActionVAE`` keyword arguments: the given sizes of ``--arch``, its
    defaults for the rest; a size of the other architecture is refused, not dropped."""
    kwargs: dict[str, Any] = {"activation": args.activation}
    for dest, default in STAGE1_SIZES.items():
        keyword, archs = MODEL_FLAGS[dest]
        value = getattr(args, dest)
        if args.arch not in archs:
            if value is not None:
                raise CommandLineError(
                    f"{flag_of(dest)} applies to --arch {archs[0]}, not --arch {args.arch}"
                )
            continue
        kwargs[keyword] = default if value is None else value
    if "hidden_dims" in kwargs:
        kwargs["hidden_dims"] = tuple(kwargs["hidden_dims"])
    return kwargs


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "out_dir": args.out,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "lr_gamma": args.lr_gamma,
        "lr_floor": args.lr_floor,
        "grad_clip": args.grad_clip or None,
        "beta": args.beta,
        "gamma": args.gamma,
        "val_fraction": args.val_fraction,
        "val_every": args.val_every,
        "seed": args.seed,
        "num_workers": args.workers,
        "precision": args.precision,
        "device": args.device,
        "save_every_epochs": args.save_every_epochs,
        "save_every_steps": args.save_every_steps,
        "save_every_minutes": args.save_every_minutes or None,
        "log_every_steps": args.log_every_steps,
        "resume": args.resume,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }


def _summary(result: Any) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result.history:
        last = result.history[-1]
        keys = ("epoch", "loss", "recon", "kl", "mmd", "val_loss", "val_prior_logp")
        print(
            f"wrote {result.checkpoint} ("
            + ", ".join(f"{k}={last[k]:.4g}" for k in keys if k in last)
            + ")"
        )
    else:
        print(f"wrote {result.checkpoint} (stopped before the first epoch ended)")
    print(f"trained {len(result.step_losses)} steps at {result.chunks_per_s:.1f} chunks/s")


def _cmd_stage1(args: argparse.Namespace) -> int:
    import torch

    from ate_fast.align import ActionVAE, Stage1Config, train_stage1

    horizon, stats = _lerobot_policy(args, args.horizon)
    data = _dataset(args, horizon, stats=stats)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    vae = ActionVAE(data.action_dim, horizon, args.latent_dim, args.arch, **_arch_kwargs(args))
    _summary(train_stage1(vae, data, Stage1Config(**_train_kwargs(args))))
    return 0


def _cmd_prior(args: argparse.Namespace) -> int:
    import torch

    from ate_fast.align import KIND_STAGE1, LatentPrior, load_checkpoint

    check_output_file(args.out, args.overwrite)  # refused before the fit, not after
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.vae, map_location=device, kind=KIND_STAGE1)
    if ckpt.normalizer is None:
        raise CommandLineError(f"--vae {args.vae}: the checkpoint has no normalisation statistics")
    chunking = ckpt.config.get("chunking") or {}  # cut the chunks as stage 1 did
    if args.stride is None:
        args.stride = chunking.get("stride", 1)
    args.pad, args.max_pad = chunking.get("pad", "edge"), chunking.get("max_pad")
    data = _dataset(args, ckpt.vae.horizon, stats=ckpt.normalizer, space=ckpt.action_space)
    print(f"prior data: {data.describe()}")
    prior = LatentPrior.fit(
        ckpt.vae,
        data,
        kind=args.kind,
        n_components=args.k,
        batch_size=args.batch_size,
        device=device,
        seed=args.seed,
        progress=not args.no_progress,
    )
    # what stage 2 follows: the stage-1 VAE's shape (architecture, sizes, horizon)
    prior.info.update(vae_checkpoint=str(args.vae), horizon=ckpt.vae.horizon, vae=ckpt.vae.config)
    prior.cpu().save(args.out)
    print(f"wrote {args.out}: {prior.describe()}")
    return 0


def _stage1_vae(args: argparse.Namespace, prior: Any) -> tuple[Optional[dict[str, Any]], str]:
    """``(the stage-1 VAE config stage 2 follows, where it came from)``: ``--init``'s,
    else the one the prior file records (or the checkpoint it names), else ``None``."""
    from ate_fast.align import KIND_STAGE1, CheckpointError, read_checkpoint_config

    if args.init:
        return dict(read_checkpoint_config(args.init, kind=KIND_STAGE1)["vae"]), "--init"
    if isinstance(prior.info.get("vae"), dict):
        return dict(prior.info["vae"]), "the prior's stage-1 VAE"
    path = prior.info.get("vae_checkpoint")  # prior files written before the config was
    if path and Path(path).is_dir():
        try:
            return dict(read_checkpoint_config(path, kind=KIND_STAGE1)["vae"]), str(path)
        except CheckpointError:
            pass
    return None, "the defaults (the prior file records no stage-1 VAE)"


def _arch_settings(args: argparse.Namespace, base: Optional[dict[str, Any]], source: str):
    """``(arch, ActionVAE keyword arguments)`` for stage 2 (see the module docstring)."""
    given = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    base_arch = base["arch"] if base else "transformer"
    arch = args.arch or base_arch
    if args.init and arch != base_arch:
        raise CommandLineError(
            f"--arch {arch} contradicts --init {args.init}, a {base_arch} VAE (its weights "
            f"are copied); drop --arch or --init"
        )
    kwargs: dict[str, Any] = {}
    if base and arch == base_arch:
        kwargs = {kw: base[kw] for kw, archs in MODEL_FLAGS.values() if arch in archs}
    for dest, value in given.items():
        keyword, archs = MODEL_FLAGS[dest]
        flag = flag_of(dest)
        if arch not in archs:
            raise CommandLineError(
                f"{flag} applies to --arch {' or '.join(archs)}, but stage 2 trains a {arch} "
                f"VAE (from {source if arch == base_arch else '--arch'})"
            )
        value = list(value) if isinstance(value, (list, tuple)) else value
        if args.init and kwargs.get(keyword) != value:
            raise CommandLineError(
                f"{flag} {value} contradicts --init {args.init} ({keyword}="
                f"{kwargs.get(keyword)}); drop {flag} or --init"
            )
        kwargs[keyword] = tuple(value) if keyword == "hidden_dims" else value
    if "hidden_dims" in kwargs:
        kwargs["hidden_dims"] = tuple(kwargs["hidden_dims"])
    return arch, kwargs


def _stage2_shape(args: argparse.Namespace, prior: Any) -> dict[str, Any]:
    """The stage-2 VAE's ``horizon``, ``latent_dim``, ``arch``, ``kwargs``, the stage-1
    ``base`` config it follows (or ``None``) and its ``source``."""
    base, source = _stage1_vae(args, prior)
    base_h = base["horizon"] if base else prior.info.get("horizon")
    if args.init and args.horizon is not None and args.horizon != base_h:
        raise CommandLineError(f"--horizon {args.horizon} differs from --init's horizon {base_h}")
    prior_h = prior.info.get("horizon")  # the two VAEs share the horizon and the latent size
    if prior_h is not None and args.horizon is not None and args.horizon != prior_h:
        raise CommandLineError(
            f"--horizon {args.horizon} differs from the prior's stage-1 horizon {prior_h}"
        )
    horizon = args.horizon or base_h
    if horizon is None:
        raise CommandLineError("--horizon is required (the prior file does not record one)")
    latent_dim = args.latent_dim or prior.latent_dim
    if latent_dim != prior.latent_dim:
        raise CommandLineError(
            f"--latent-dim {latent_dim} differs from the prior's {prior.latent_dim}"
        )
    arch, kwargs = _arch_settings(args, base, source)
    return {
        "horizon": int(horizon),
        "latent_dim": int(latent_dim),
        "arch": arch,
        "kwargs": kwargs,
        "base": base,
        "base_source": source,
        "source": "--arch" if args.arch else source,
    }


def _stage2_dataset(args: argparse.Namespace, shape: dict[str, Any]) -> Any:
    """The adaptation chunks, in the stage-1 VAE's unified action dim unless
    ``--action-dim`` says otherwise (the robot's dims go to ``--dims``, default the first)."""
    base = shape["base"]
    if getattr(args, "lerobot_policy", None):
        horizon, stats = _lerobot_policy(args, args.horizon)
        if horizon != shape["horizon"]:
            raise CommandLineError(
                f"--lerobot-policy's horizon {horizon} differs from the stage-1 VAE's "
                f"{shape['horizon']} (from {shape['base_source']})"
            )
        if base is not None and base["action_dim"] != args.action_dim:
            raise CommandLineError(
                f"--lerobot-policy's action dim {args.action_dim} differs from the stage-1 "
                f"VAE's {base['action_dim']} (from {shape['base_source']}): the VAEs must share "
                "the policy's action space"
            )
        return _dataset(args, horizon, stats=stats)
    if args.action_dim is not None or base is None:
        return _dataset(args, shape["horizon"])
    args.action_dim = int(base["action_dim"])
    try:
        return _dataset(args, shape["horizon"])
    except ValueError as exc:
        if "is smaller than the data's action dim" not in str(exc):
            raise
        raise CommandLineError(
            f"the data has more action dims than the stage-1 VAE's unified action dim "
            f"{args.action_dim} (from {shape['base_source']}): pass --action-dim (and --dims)"
        ) from exc


def _describe_stage2(shape: dict[str, Any], action_dim: int, cfg: Any) -> str:
    """One line: what stage 2 trains."""
    sizes = ", ".join(
        f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in shape["kwargs"].items()
    )
    return (
        f"stage 2 VAE: {shape['arch']} (from {shape['source']}), horizon {shape['horizon']}, "
        f"action dim {action_dim}, latent dim {shape['latent_dim']}"
        + (f", {sizes}" if sizes else " (default sizes)")
        + f"; {cfg.epochs} epochs, batch {cfg.batch_size}, KL {cfg.kl}"
    )


def _cmd_stage2(args: argparse.Namespace) -> int:
    import torch

    from ate_fast.align import ActionVAE, LatentPrior, Stage2Config, train_stage2

    prior = LatentPrior.load(args.prior)
    shape = _stage2_shape(args, prior)
    data = _stage2_dataset(args, shape)
    if args.init and shape["base"]["action_dim"] != data.action_dim:
        raise CommandLineError(
            f"--init's action dim {shape['base']['action_dim']} differs from the data's "
            f"{data.action_dim} (use --action-dim/--dims to map into the unified space)"
        )
    torch.manual_seed(args.seed)
    vae = ActionVAE(
        data.action_dim, shape["horizon"], shape["latent_dim"], shape["arch"], **shape["kwargs"]
    )
    cfg = Stage2Config(
        **_train_kwargs(args), kl=args.kl, kl_samples=args.kl_samples, init_from=args.init
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(_describe_stage2(shape, data.action_dim, cfg))
    _summary(train_stage2(vae, data, prior, cfg))
    return 0

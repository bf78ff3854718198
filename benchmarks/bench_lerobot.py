"""LeRobot ``select_action`` latency: LeRobot's own sampling loop vs ``patch_policy``.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv-lerobot/bin/python \\
        benchmarks/bench_lerobot.py --out benchmarks/results/lerobot-cpu-2026-12-02.json

(from the repository root, in an environment with LeRobot 0.4.4; ``--quick`` is a smoke
run: DDIM 10 and SmolVLA only, two rounds.) Offline, random weights; the script puts the
repository root and ``tests_lerobot/`` (for ``tiny_policies``) on ``sys.path`` itself.

What is timed: one ``policy.select_action(batch)`` call right after ``policy.reset()``
(the reset is not timed), batch size 1. With its queues empty, ``select_action`` fills the
observation queue, samples a new chunk (``predict_action_chunk`` → LeRobot's
``DiffusionModel.conditional_sample`` / ``VLAFlowMatching.sample_actions``, or ate_fast's
replacement) and pops the first action: the latency of the chunk-generating call a robot
sees every ``n_action_steps`` steps.

Variants, each a shallow copy of the same policy object (the same modules, so the same
weights and memory; the unpatched one a deep copy of the inner model, because a patched
DiffusionPolicy's U-Net convolutions are re-classed in place as ``ChunkConv1d``), timed in
the same run, one call per variant per round, the order
rotated every round so that load from other processes falls on all alike:

- ``lerobot``: unpatched;
- ``patched``: ``patch_policy(policy)`` (``sampler.sample()`` every call);
- ``patched+capture``: ``patch_policy(policy, capture=True)`` (captured on the first call,
  replayed after: recorded fused steps on the CPU, a CUDA graph on a GPU);
- Diffusion DDIM 10 also ``patched+guidance`` / ``patched+guidance+capture``:
  ``LatentGuidance`` (λ = 2, κ = 0.1, direct) through an ``ActionVAE(arch="mlp")``
  encoder (defaults: d_z 512, hidden 512, 512) built from ``vae_spec(policy)``; the JSON
  also holds ``guidance_gradient_ms_per_step``, one ``guidance.gradient`` timed alone;
- Diffusion DDIM 10 also ``unet-only``: the 10 U-Net calls alone (same B, H, cond, no
  scheduler, no queues) with the patched variants' U-Net (its convolutions
  ``ChunkConv1d``), the floor a patched sampling loop pays, interleaved with the rest.

Policies:

- ``diffusion-ddpm100``: ``DiffusionConfig`` defaults (U-Net down_dims (512, 1024, 2048),
  kernel 5, n_groups 8, step embedding 128, horizon 16, n_obs_steps 2, n_action_steps 8,
  DDPM with ``num_inference_steps=None`` → 100 steps), state-only conditioning
  (``observation.state`` [2] + ``observation.environment_state`` [16], PushT-keypoints
  sized; no images, so no ResNet), action [2]; ``diffusion-ddim10``: the same with DDIM,
  10 steps.
- ``smolvla``: SmolVLA (``chunk_size`` 50, ``num_steps`` 10, ``max_action_dim`` 32,
  ``num_vlm_layers`` 16, ``self_attn_every_n_layers`` 2, ``expert_width_multiplier``
  0.75, cross-attention expert) on a SmolVLM folder whose text model has SmolVLM2-500M's
  geometry (hidden 960, 15 heads / 5 KV heads, head_dim 64, intermediate 2560; 16 layers,
  the ones SmolVLA keeps) and whose vision tower, tokenizer and processor are
  ``tiny_policies``' (32×32 images → 4 tokens per camera; word-level vocabulary), two
  cameras, state [6], action [6], language padded to ``tokenizer_max_length`` 48.

Before timing, the chunk of each variant's first (warm-up) call is compared with
``lerobot``'s for the same seed (``max_rel_diff_vs_lerobot`` in the JSON): ≤ 1e-4 is
required of the unguided variants; for the guided ones it shows how far guidance moved
the chunk.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZE = 1
UNPATCHED = "lerobot"

# SmolVLM2-500M-Video-Instruct's text model (SmolLM2-360M-like); 16 layers = SmolVLA's
# num_vlm_layers (the checkpoint has 32, SmolVLA keeps the first 16).
SMOLVLM2_500M_TEXT = {
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 16,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
}
SMOLVLA_CAMERAS = 2
SMOLVLA_STATE_DIM = 6
SMOLVLA_ACTION_DIM = 6
SMOLVLA_TOKENS = 48


def _setup_paths() -> None:
    for path in (ROOT, ROOT / "tests_lerobot"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shell(policy: Any, inner_name: str, own_modules: bool = False) -> Any:
    """A shallow copy of ``policy`` with its own inner-model object (``policy.diffusion`` /
    ``policy.model``) sharing every submodule: patching it leaves ``policy`` unpatched.
    ``own_modules``: a deep copy of the inner model instead (the unpatched baseline: a
    patch re-classes the U-Net's convolutions in place, which shared modules would see)."""
    shell = copy.copy(policy)
    shell._modules = dict(policy._modules)
    inner = policy._modules[inner_name]
    shell._modules[inner_name] = copy.deepcopy(inner) if own_modules else copy.copy(inner)
    shell.reset()
    return shell


# --- policies ------------------------------------------------------------------------------


def make_diffusion(scheduler: str, num_inference_steps: int | None, seed: int = 0) -> Any:
    """LeRobot's default Diffusion Policy, state-only (see the module docstring)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE

    config = DiffusionConfig(
        device="cpu",
        input_features={
            OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(2,)),
            OBS_ENV_STATE: PolicyFeature(type=FeatureType.ENV, shape=(16,)),
        },
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        noise_scheduler_type=scheduler,
        num_inference_steps=num_inference_steps,
        push_to_hub=False,
    )
    torch.manual_seed(seed)
    return DiffusionPolicy(config).to(device="cpu", dtype=torch.float32).eval()


def make_smolvlm_500m_dir(root: Path) -> Path:
    """``tiny_policies``' SmolVLM folder with SmolVLM2-500M's text model geometry."""
    from tiny_policies import make_tiny_smolvlm_dir
    from transformers import SmolVLMConfig

    folder = make_tiny_smolvlm_dir(root)
    config = SmolVLMConfig.from_pretrained(folder)
    for key, value in SMOLVLM2_500M_TEXT.items():
        setattr(config.text_config, key, value)
    config.save_pretrained(folder)
    return folder


def make_smolvla(root: Path, seed: int = 0) -> Any:
    """SmolVLA with a realistic-size VLM and expert (see the module docstring)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.utils.constants import ACTION, OBS_STATE
    from tiny_policies import TINY_SMOLVLM_IMAGE_SIZE, smolvla_camera_keys

    folder = make_smolvlm_500m_dir(root)
    size = TINY_SMOLVLM_IMAGE_SIZE
    features = {OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(SMOLVLA_STATE_DIM,))}
    for key in smolvla_camera_keys(SMOLVLA_CAMERAS):
        features[key] = PolicyFeature(type=FeatureType.VISUAL, shape=(3, size, size))
    action = PolicyFeature(type=FeatureType.ACTION, shape=(SMOLVLA_ACTION_DIM,))
    config = SmolVLAConfig(
        device="cpu",
        input_features=features,
        output_features={ACTION: action},
        chunk_size=50,
        n_action_steps=50,
        num_steps=10,
        max_state_dim=32,
        max_action_dim=32,
        resize_imgs_with_padding=(size, size),
        tokenizer_max_length=SMOLVLA_TOKENS,
        vlm_model_name=str(folder),
        load_vlm_weights=False,
        num_vlm_layers=16,
        num_expert_layers=-1,
        self_attn_every_n_layers=2,
        expert_width_multiplier=0.75,
        push_to_hub=False,
    )
    torch.manual_seed(seed)
    return SmolVLAPolicy(config).to(device="cpu", dtype=torch.float32).eval()


def smolvla_info(policy: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Parameter counts and the prefix length of ``policy`` on ``batch``."""
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    vwe = policy.model.vlm_with_expert
    vlm = vwe.get_vlm_model()
    text = vlm.text_model
    heads = ("state_proj", "action_in_proj", "action_out_proj")
    heads += ("action_time_mlp_in", "action_time_mlp_out")
    with torch.no_grad():
        images, img_masks = policy.prepare_images(dict(batch))
        state = policy.prepare_state(dict(batch))
        _, pad_masks, _ = policy.model.embed_prefix(
            images,
            img_masks,
            batch[OBS_LANGUAGE_TOKENS],
            batch[OBS_LANGUAGE_ATTENTION_MASK],
            state=state,
        )
        image_tokens = int(vwe.embed_image(images[0]).shape[1])
    return {
        "text_model_params": _count(text),
        "text_model_params_without_embeddings": _count(text) - _count(text.embed_tokens),
        "text_model_layers": len(text.layers),
        "expert_params": _count(vwe.lm_expert),
        "expert_layers": len(vwe.lm_expert.layers),
        "expert_hidden_size": vwe.expert_hidden_size,
        "expert_intermediate_size": vwe.lm_expert.config.intermediate_size,
        "action_projection_params": sum(_count(getattr(policy.model, n)) for n in heads),
        "vision_and_connector_params": _count(vlm.vision_model) + _count(vlm.connector),
        "total_params": _count(policy),
        "prefix_length": int(pad_masks.shape[1]),
        "prefix_valid_tokens": int(pad_masks[0].sum()),
        "image_tokens_per_camera": image_tokens,
        "cameras": SMOLVLA_CAMERAS,
        "language_tokens": int(batch[OBS_LANGUAGE_TOKENS].shape[1]),
        "chunk_size": policy.config.chunk_size,
        "num_steps": policy.config.num_steps,
    }


def latent_guidance(policy: Any) -> Any:
    """``LatentGuidance`` through a default ``ActionVAE(arch="mlp")`` sized by ``vae_spec``."""
    from ate_fast import ActionVAE, LatentGuidance
    from ate_fast.integrations.lerobot import vae_spec

    spec = vae_spec(policy)
    torch.manual_seed(1)
    vae = ActionVAE(spec.action_dim, spec.horizon, arch="mlp").eval()
    target = torch.randn(vae.latent_dim)
    return LatentGuidance(vae, target, scale=2.0, clamp=0.1, mask=spec.mask())


def guidance_gradient_ms(guidance: Any, policy: Any, calls: int = 200) -> float:
    """Median ms of one ``guidance.gradient`` at the policy's chunk shape (B = 1): the
    work guidance adds to each sampling step."""
    from ate_fast.integrations.lerobot import vae_spec

    spec = vae_spec(policy)
    x = torch.randn(BATCH_SIZE, spec.horizon, spec.action_dim)
    ones = torch.ones(BATCH_SIZE)
    times = []
    for i in range(calls + 10):
        t0 = time.perf_counter()
        guidance.gradient(x, x, ones)
        if i >= 10:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# --- timing --------------------------------------------------------------------------------


def chunk_call(policy: Any, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """Seconds of one chunk-generating ``select_action`` (``reset()`` first, untimed)."""

    def call() -> float:
        policy.reset()
        inputs = dict(batch)
        t0 = time.perf_counter()
        policy.select_action(inputs)
        return time.perf_counter() - t0

    return call


def executed_chunk(policy: Any, batch: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """The chunk a fresh ``select_action`` queues: its action and the queued ones."""
    from lerobot.utils.constants import ACTION

    policy.reset()
    torch.manual_seed(seed)
    first = policy.select_action(dict(batch))
    return torch.stack([first, *policy._queues[ACTION]], dim=1).clone()


def unet_floor(policy: Any, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """Seconds of the sampler's ``num_inference_steps`` U-Net calls alone (B, H, cond as
    in ``select_action``; no scheduler, no queues): what a sampling loop must spend
    with this U-Net (timed while the patches are active: their ChunkConv1d layers)."""
    model = policy.diffusion
    policy.reset()
    policy.select_action(dict(batch))
    queued = {k: torch.stack(list(policy._queues[k]), dim=1) for k in batch}
    with torch.no_grad():
        cond = model._prepare_global_conditioning(queued)
    x = torch.randn(BATCH_SIZE, model.config.horizon, model.config.action_feature.shape[0])
    model.noise_scheduler.set_timesteps(model.num_inference_steps)
    steps = [t.reshape(1).expand(BATCH_SIZE) for t in model.noise_scheduler.timesteps]

    def call() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for t in steps:
                model.unet(x, t, global_cond=cond)
        return time.perf_counter() - t0

    return call


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def measure(
    label: str,
    policy: Any,
    inner_name: str,
    batch: dict[str, torch.Tensor],
    variants: dict[str, dict[str, Any] | None],
    repeats: int,
    info: dict[str, Any],
    extra: dict[str, Callable[[], float]] | None = None,
) -> list[dict[str, Any]]:
    """Time every variant (``patch_policy`` kwargs, None = unpatched) of ``policy``, and
    the ``extra`` calls (each returns its seconds), interleaved."""
    from ate_fast.integrations.lerobot import patch_policy

    shells: dict[str, Any] = {}
    patches = []
    for name, kwargs in variants.items():
        shell = _shell(policy, inner_name, own_modules=kwargs is None)
        if kwargs is not None:
            patches.append(patch_policy(shell, **kwargs))
        shells[name] = shell
    # warm-up (and the capture variants' capture), checked against LeRobot's actions
    start = time.perf_counter()
    checks: dict[str, float] = {}
    reference = executed_chunk(shells[UNPATCHED], batch, seed=0)
    for name, shell in shells.items():
        if name == UNPATCHED:
            continue
        out = executed_chunk(shell, batch, seed=0)
        checks[name] = relative_difference(out, reference)  # guided: how much it steers
        if "guidance" not in name and checks[name] > 1e-4:
            raise AssertionError(f"{label} {name}: differs from LeRobot by {checks[name]}")
    calls = {name: chunk_call(shell, batch) for name, shell in shells.items()}
    for name, call in (extra or {}).items():
        call()  # warm-up
        calls[name] = call
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(calls[name]())
    for patch in patches:
        patch.remove()
    print(f"  {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    base = statistics.median(times[UNPATCHED])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        paired = [u / v for u, v in zip(times[UNPATCHED], values)]
        rows.append(
            {
                "policy": label,
                "variant": name,
                "median_ms": median * 1e3,
                "min_ms": min(values) * 1e3,
                "n": len(values),
                "ratio_vs_unpatched": base / median,
                "paired_ratio_median": statistics.median(paired),
                "max_rel_diff_vs_lerobot": checks.get(name),
                "times_ms": [v * 1e3 for v in values],
                **({"config": info} if name == UNPATCHED else {}),
            }
        )
    return rows


# --- report --------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    import importlib.metadata as metadata

    from ate_fast.models import cpu_gemm

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "lerobot": metadata.version("lerobot"),
        "transformers": metadata.version("transformers"),
        "diffusers": metadata.version("diffusers"),
        "python": platform.python_version(),
        "device": "cpu",
        "cpu_gemm": cpu_gemm.selected_gemm(),  # the patched U-Net's chunk-row GEMMs
        "date": datetime.date.today().isoformat(),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| policy | variant | median ms | min ms | n | × unpatched |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['policy']} | {row['variant']} | {row['median_ms']:.1f} | "
            f"{row['min_ms']:.1f} | {row['n']} | {row['ratio_vs_unpatched']:.2f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--quick", action="store_true", help="smoke run (no DDPM 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (DDIM, SmolVLA)")
    parser.add_argument("--ddpm-repeats", type=int, default=3, help="timed rounds, DDPM 100")
    args = parser.parse_args()
    if args.quick:
        args.repeats = args.ddpm_repeats = 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _setup_paths()
    torch.set_num_threads(args.threads)
    from tiny_policies import diffusion_batch, smolvla_batch

    started = time.perf_counter()
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    plain: dict[str, dict[str, Any] | None] = {
        UNPATCHED: None,
        "patched": {},
        "patched+capture": {"capture": True},
    }

    diffusion_runs: list[tuple[str, str, int | None, int]] = []
    if not args.quick:
        diffusion_runs.append(("diffusion-ddpm100", "DDPM", None, args.ddpm_repeats))
    diffusion_runs.append(("diffusion-ddim10", "DDIM", 10, args.repeats))
    for label, scheduler, steps, repeats in diffusion_runs:
        policy = make_diffusion(scheduler, steps)
        variants = dict(plain)
        if scheduler == "DDIM":
            guidance = latent_guidance(policy)
            variants["patched+guidance"] = {"guidance": guidance}
            variants["patched+guidance+capture"] = {"guidance": guidance, "capture": True}
        info = {
            "unet_params": _count(policy.diffusion.unet),
            "total_params": _count(policy),
            "scheduler": scheduler,
            "num_inference_steps": int(policy.diffusion.num_inference_steps),
            "horizon": policy.config.horizon,
            "n_obs_steps": policy.config.n_obs_steps,
            "n_action_steps": policy.config.n_action_steps,
            "down_dims": list(policy.config.down_dims),
        }
        if scheduler == "DDIM":
            info["guidance"] = (
                "LatentGuidance(ActionVAE(D, H, arch='mlp'): d_z 512, hidden (512, 512); "
                "scale 2, clamp 0.1, direct)"
            )
            info["guidance_gradient_ms_per_step"] = guidance_gradient_ms(guidance, policy)
        batch = diffusion_batch(policy, batch_size=BATCH_SIZE)
        extra = {"unet-only": unet_floor(policy, batch)} if scheduler == "DDIM" else None
        rows += measure(label, policy, "diffusion", batch, variants, repeats, info, extra)
        del policy

    with tempfile.TemporaryDirectory() as tmp:
        policy = make_smolvla(Path(tmp))
        batch = smolvla_batch(policy, batch_size=BATCH_SIZE)
        info = smolvla_info(policy, batch)
        rows += measure("smolvla", policy, "model", batch, plain, args.repeats, info)
        del policy

    result = {
        "benchmark": "LeRobot select_action latency (chunk-generating call)",
        "timed": (
            "policy.select_action(batch) right after policy.reset() (not timed), batch "
            "size 1: fills the observation queue, samples a new chunk, pops one action"
        ),
        "ratio_vs_unpatched": "median(lerobot) / median(variant); > 1 = faster",
        "paired_ratio_median": "median over rounds of lerobot / variant (same round)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine_info(args.threads), "loadavg_start": list(load_start)},
        "loadavg_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    table = markdown(rows)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

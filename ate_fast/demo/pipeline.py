"""The demo, end to end: data → pre-train on robot A → Align → fine-tune on robot B
(direct and ATE Steer, the same budget, batches and noise) → rollouts → sampler latency.

:func:`run_demo` returns a :class:`DemoResult` whose ``results`` are a deterministic
function of the config (seed included) and whose ``timings`` are wall-clock measurements.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ate_fast.adaptation.chunks import ChunkData
from ate_fast.adaptation.policy_training import PolicyFit
from ate_fast.demo.align_step import AlignResult, run_align
from ate_fast.demo.config import DemoConfig
from ate_fast.demo.demonstrations import demonstration_chunks
from ate_fast.demo.embodiment import ROBOT_A, ROBOT_B
from ate_fast.demo.flow_policy import make_policy, train_flow
from ate_fast.demo.latency import sampler_latency
from ate_fast.demo.point_mass import (
    DEMO_STREAM,
    EVAL_STREAM,
    PRETRAIN_STREAM,
    PointMassEnv,
    Tasks,
    sample_tasks,
)
from ate_fast.demo.rollout import Rollout, expert_rollout, policy_rollout
from ate_fast.steer import LatentGuidance, Steer

EVAL_SEED = 0  # the evaluation tasks are one fixed set, whatever --seed is

# rows of the results table: key -> label (RUN_ROWS: once per fine-tuning run)
ROWS = {
    "expert": "expert plans, replayed through B's action map",
    "pretrained_on_A": "pre-trained policy, on robot A (sanity check)",
    "pretrained_on_B": "pre-trained policy, no fine-tuning",
    "direct": "direct fine-tuning",
    "steer": "ATE steer fine-tuning",
    "direct_guided": "direct fine-tuning + inference guidance",
    "steer_guided": "ATE steer fine-tuning + inference guidance",
}
RUN_ROWS = ("direct", "direct_guided", "steer", "steer_guided")


@dataclass
class DemoResult:
    """``config``: the settings; ``results``: every deterministic number (data sizes,
    losses, Align statistics, rollouts); ``timings``: wall-clock seconds per phase and the
    sampler latencies; ``log``: the Align trainers' epoch lines."""

    config: dict[str, Any]
    results: dict[str, Any]
    timings: dict[str, Any] = field(default_factory=dict)
    log: str = ""


def run_demo(
    cfg: DemoConfig,
    *,
    progress: bool = True,
    verbose: bool = False,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole demo for ``cfg`` and return its numbers (the global RNG state of the
    caller is restored afterwards)."""
    device = torch.device(cfg.device)
    fork = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        return _run(cfg, device, progress, verbose, echo)


class _Clock:
    """Wall-clock seconds per phase."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name], self.last = now - self.last, now
        return self.phases[name]


def _run(
    cfg: DemoConfig,
    device: torch.device,
    progress: bool,
    verbose: bool,
    echo: Callable[[str], None],
) -> DemoResult:
    clock = _Clock()
    data = _demonstrations(cfg)
    results: dict[str, Any] = {"data": data.stats}
    echo(
        f"[1/6] data: robot A {data.robot_a.episodes} episodes ({len(data.robot_a)} chunks), "
        f"robot B {data.robot_b.episodes} demos ({len(data.robot_b)} chunks), "
        f"{len(data.eval_tasks)} eval episodes ({clock.lap('data'):.1f} s)"
    )

    pretrained, fit = _pretrain(cfg, data.robot_a, device, progress)
    results["pretrain"] = {"steps": fit.steps, "loss": fit.loss}
    echo(
        f"[2/6] pre-trained the flow policy on robot A: {fit.steps} steps, loss "
        f"{fit.loss:.4f} ({clock.lap('pretrain'):.1f} s)"
    )

    aligned = run_align(data.robot_a, data.robot_b, cfg, progress, verbose)
    results["align"] = aligned.stats
    echo(
        f"[3/6] align: stage 1 ({aligned.stats['stage1_steps']} steps, val recon "
        f"{aligned.stats['stage1_val_recon']:.4f}), {aligned.stats['prior']}, stage 2 "
        f"({aligned.stats['stage2_steps']} steps on all of B's chunks, train recon "
        f"{aligned.stats['stage2_train_recon']:.4f}) ({clock.lap('align'):.1f} s)"
    )

    arms = _Arms.build(cfg, data, aligned, device, progress)
    fits, runs, first_finetuned = _fine_tune_runs(cfg, pretrained, data.robot_b, arms, echo)
    results["finetune"] = {
        arm: {**_means(fits[arm]), "runs": fits[arm]} for arm in ("direct", "steer")
    }
    diag = results["finetune"]["steer"]
    echo(
        f"      steer: {diag['clamp_fraction']:.0%} of c·g clamped, |λ·g̃|/|target| "
        f"{diag['correction_ratio']:.3f} ({clock.lap('finetune'):.1f} s)"
    )

    single = _evaluate_baselines(cfg, pretrained, data.eval_tasks, arms.evaluate)
    results["rollouts"] = {key: _aggregate([single[key]]) for key in single}
    results["rollouts"].update({key: _aggregate(runs[key]) for key in RUN_ROWS})
    results["steer_minus_direct"] = [
        s.summary()["success_rate"] - d.summary()["success_rate"]
        for s, d in zip(runs["steer"], runs["direct"])
    ]
    echo(f"[5/6] evaluated the pre-trained policy and the expert ({clock.lap('eval'):.1f} s)")

    latency = sampler_latency(
        first_finetuned,
        torch.from_numpy(PointMassEnv(data.eval_tasks).observe()[:1]).float(),
        arms.guidance,
        horizon=cfg.horizon,
        flow_steps=cfg.flow_steps,
        repeats=cfg.latency_repeats,
        device=device,
        seed=cfg.seed_for(5),
    )
    echo(f"[6/6] sampler latency, batch 1 ({clock.lap('latency'):.1f} s)")
    timings = {
        "phases_s": clock.phases,
        "total_s": time.perf_counter() - clock.start,
        "latency": latency,
    }
    return DemoResult(cfg.to_dict(), results, timings, aligned.log)


@dataclass
class _Data:
    """Robot A's pre-training chunks, robot B's demonstration chunks, the evaluation
    tasks, and the numbers the report shows about them."""

    robot_a: ChunkData
    robot_b: ChunkData
    eval_tasks: Tasks
    stats: dict[str, int]


def _demonstrations(cfg: DemoConfig) -> _Data:
    a_tasks = sample_tasks(PRETRAIN_STREAM, cfg.seed, cfg.pretrain_episodes)
    b_tasks = sample_tasks(DEMO_STREAM, cfg.seed, cfg.demos)
    eval_tasks = sample_tasks(EVAL_STREAM, EVAL_SEED, cfg.eval_episodes)
    a_data = demonstration_chunks(a_tasks, ROBOT_A, cfg.horizon)
    b_data = demonstration_chunks(b_tasks, ROBOT_B, cfg.horizon)
    stats = {
        "robot_A_episodes": a_data.episodes,
        "robot_A_chunks": len(a_data),
        "robot_B_demos": b_data.episodes,
        "robot_B_chunks": len(b_data),
        "robot_B_demos_left": int((b_tasks.side > 0).sum()),
        "eval_episodes": len(eval_tasks),
    }
    return _Data(a_data, b_data, eval_tasks, stats)


def _pretrain(
    cfg: DemoConfig, data: ChunkData, device: torch.device, progress: bool
) -> tuple[nn.Module, PolicyFit]:
    """A fresh flow policy (weights from ``seed_for(1)``) trained on robot A's chunks."""
    torch.manual_seed(cfg.seed_for(1))
    policy = make_policy(cfg.horizon, cfg.policy_hidden, cfg.policy_depth)
    fit = train_flow(
        policy,
        data,
        steps=cfg.pretrain_steps,
        batch=cfg.pretrain_batch,
        lr=cfg.pretrain_lr,
        seed=cfg.seed_for(2),
        device=device,
        desc="pre-train on robot A",
        progress=progress,
    )
    return policy, fit


@dataclass
class _Arms:
    """What fine-tuning and evaluation share: the Steer of the ``steer`` arm, the
    inference-time guidance of the ``*_guided`` rows, and ``evaluate(policy, robot=,
    guidance=, noise_seed=, desc=)`` (rollouts on the evaluation tasks)."""

    steer: Steer
    guidance: LatentGuidance
    evaluate: Callable[..., Rollout]
    device: torch.device
    progress: bool

    @classmethod
    def build(
        cls,
        cfg: DemoConfig,
        data: _Data,
        aligned: AlignResult,
        device: torch.device,
        progress: bool,
    ) -> _Arms:
        mask_b = data.robot_b.mask.to(device)
        steer = Steer(
            aligned.vae2,
            scale=cfg.steer_scale,
            clamp=cfg.steer_clamp,
            reduction="sample",
            mask=mask_b,
        )
        guidance = LatentGuidance(
            aligned.vae2,
            aligned.target,
            scale=cfg.guidance_scale,
            clamp=cfg.guidance_clamp,
            mode="direct",
            mask=mask_b,
        )
        evaluate = functools.partial(
            policy_rollout,
            tasks=data.eval_tasks,
            horizon=cfg.horizon,
            exec_steps=cfg.exec_steps,
            episode_steps=cfg.episode_steps,
            flow_steps=cfg.flow_steps,
            device=device,
            progress=progress,
        )
        return cls(steer, guidance, evaluate, device, progress)


def _fine_tune_runs(
    cfg: DemoConfig,
    pretrained: nn.Module,
    data: ChunkData,
    arms: _Arms,
    echo: Callable[[str], None],
) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[Rollout]], nn.Module]:
    """``finetune_runs`` times: fine-tune copies of ``pretrained`` on robot B directly and
    with Steer (the same batches), and evaluate each without and with guidance (the same
    noise). ``(fits per arm, rollouts per row of RUN_ROWS, the first fine-tuned policy)``."""
    fits: dict[str, list[dict[str, float]]] = {"direct": [], "steer": []}
    runs: dict[str, list[Rollout]] = {key: [] for key in RUN_ROWS}
    first_finetuned = None
    for run in range(cfg.finetune_runs):
        tag = f"run {run + 1}/{cfg.finetune_runs}"
        for arm, arm_steer in (("direct", None), ("steer", arms.steer)):
            policy = copy.deepcopy(pretrained)
            fit = train_flow(
                policy,
                data,
                steps=cfg.finetune_steps,
                batch=cfg.finetune_batch,
                lr=cfg.finetune_lr,
                seed=cfg.seed_for(10 + run),  # the same batches for both arms
                device=arms.device,
                steer=arm_steer,
                desc=f"{tag}: fine-tune ({arm})",
                progress=arms.progress,
            )
            fits[arm].append({"loss": fit.loss, **fit.steer})
            for key, g in ((arm, None), (f"{arm}_guided", arms.guidance)):
                runs[key].append(
                    arms.evaluate(
                        policy,
                        robot=ROBOT_B,
                        guidance=g,
                        noise_seed=cfg.seed_for(20 + run),
                        desc=f"{tag}: eval {key}",
                    )
                )
            if first_finetuned is None:
                first_finetuned = policy
        echo(
            f"[4/6] fine-tuning {tag} ({cfg.finetune_steps} steps per arm): success direct "
            f"{_rate(runs['direct'][-1])}, ATE steer {_rate(runs['steer'][-1])}"
        )
    return fits, runs, first_finetuned


def _evaluate_baselines(
    cfg: DemoConfig,
    pretrained: nn.Module,
    eval_tasks: Tasks,
    evaluate: Callable[..., Rollout],
) -> dict[str, Rollout]:
    """The expert's plans through B's action map, and the pre-trained policy on A and B."""
    noise_seed = cfg.seed_for(20)
    return {
        "expert": expert_rollout(eval_tasks, ROBOT_B, cfg.episode_steps),
        "pretrained_on_A": evaluate(
            pretrained, robot=ROBOT_A, noise_seed=noise_seed, desc="eval: pre-trained on A"
        ),
        "pretrained_on_B": evaluate(
            pretrained, robot=ROBOT_B, noise_seed=noise_seed, desc="eval: pre-trained on B"
        ),
    }


def _rate(rollout: Rollout) -> str:
    return f"{100 * rollout.summary()['success_rate']:.1f}%"


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise means of a list of equal-keyed dicts of floats."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _aggregate(rollouts: list[Rollout]) -> dict[str, Any]:
    """Over runs: mean success rate, final error and collision rate; per-run success."""
    summaries = [r.summary() for r in rollouts]
    keys = ("success_rate", "final_error", "collision_rate")
    return {
        **_means([{k: s[k] for k in keys} for s in summaries]),
        "success_per_run": [s["success_rate"] for s in summaries],
        "runs": len(summaries),
        "episodes": int(summaries[0]["episodes"]),
    }

"""Real-time chunking on the point-mass world (``ate-fast eval rtc --env point-mass``).

Robot A's flow policy (the demo's, smaller) is trained per seed on expert chunks twice
with the same batches, noise and times: plainly (``direct``) and with training-time RTC
(``rtc-trained``, delays uniform in 0..max(delays)); each runs as an asynchronous
controller (:mod:`ate_fast.realtime.controller`) at every delay d on one fixed set of
evaluation tasks with one noise stream per seed: ``naive``, ``ensemble`` and ``rtc``
(the direct policy), ``rtc_training`` (the RTC-trained one with the committed prefix
inpainted). Runs are written in the Meta-World study's format (``shift`` =
``"point-mass/d=<d>"``) and reported by the same code.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ate_fast.adaptation.chunks import ChunkData
from ate_fast.adaptation.objectives import FlowMatching, RTCFlowMatching
from ate_fast.adaptation.policy_training import PolicyFit, train_chunk_policy
from ate_fast.align.atomic_io import atomic_write_json
from ate_fast.demo.demonstrations import demonstration_chunks
from ate_fast.demo.embodiment import ACTION_DIM, ROBOT_A
from ate_fast.demo.flow_policy import make_policy
from ate_fast.demo.point_mass import (
    EVAL_STREAM,
    OBS_DIM,
    PRETRAIN_STREAM,
    PointMassEnv,
    sample_tasks,
)
from ate_fast.realtime import TrainingTimeRTC
from ate_fast.realtime.controller import RealTimeController, SamplerChunks, action_jumps
from ate_fast.realtime.latency import strategy_latency
from ate_fast.sampling import FlowSampler

# run method -> (trained policy, controller strategy)
POINT_MASS_METHODS = {
    "naive": ("direct", "naive"),
    "ensemble": ("direct", "ensemble"),
    "rtc": ("direct", "rtc"),
    "rtc_training": ("rtc-trained", "rtc_training"),
}


@dataclass(frozen=True)
class PointMassRTCConfig:
    """Sizes: ``train_episodes`` expert episodes per seed, ``eval_episodes`` of
    ``episode_steps``; chunk ``horizon``, ``exec_steps`` s; the policy ``hidden`` ×
    ``depth`` trained ``steps`` at ``batch``; ``flow_steps`` Euler steps."""

    name: str = "quick"
    horizon: int = 8
    exec_steps: int = 4
    episode_steps: int = 80
    train_episodes: int = 400
    eval_episodes: int = 200
    hidden: int = 256
    depth: int = 3
    steps: int = 2000
    batch: int = 256
    lr: float = 1e-3
    flow_steps: int = 10
    delays: tuple[int, ...] = (0, 1, 2, 4)
    seeds: tuple[int, ...] = (0, 1, 2)


POINT_MASS_PROTOCOLS = {
    "smoke": PointMassRTCConfig(
        "smoke",
        train_episodes=12,
        eval_episodes=8,
        hidden=32,
        depth=1,
        steps=20,
        batch=32,
        flow_steps=3,
        delays=(0, 2),
        seeds=(0,),
        episode_steps=20,
    ),
    "quick": PointMassRTCConfig(),
    "full": PointMassRTCConfig("full", steps=3000, hidden=384, depth=4),
}


def _train(
    cfg: PointMassRTCConfig, data: ChunkData, trained: str, seed: int, progress: bool = False
) -> tuple:
    with torch.random.fork_rng():
        torch.manual_seed(1000 + seed)
        policy = make_policy(cfg.horizon, cfg.hidden, cfg.depth)
    objective = FlowMatching()
    if trained == "rtc-trained":
        objective = RTCFlowMatching(TrainingTimeRTC(max_delay=max(cfg.delays)), 2000 + seed)
    fit = train_chunk_policy(
        policy, data.chunks, data.obs, data.mask, objective, steps=cfg.steps,
        batch=cfg.batch, lr=cfg.lr, seed=3000 + seed, progress=progress,
        desc=f"train {trained} seed {seed}",
    )  # fmt: skip
    return policy, fit


def evaluate_point_mass(
    cfg: PointMassRTCConfig, policy: nn.Module, method: str, delay: int, seed: int
) -> dict[str, Any]:
    """One controller run on the evaluation tasks: ``{"tasks", "jumps", "latency_ms"}``."""
    tasks = sample_tasks(EVAL_STREAM, 0, cfg.eval_episodes)
    env, n = PointMassEnv(tasks), len(tasks)
    gen = torch.Generator().manual_seed(4000 + seed)
    strategy = POINT_MASS_METHODS[method][1]
    chunks = SamplerChunks(
        FlowSampler(policy.eval(), num_steps=cfg.flow_steps),
        lambda: torch.randn(n, cfg.horizon, ACTION_DIM, generator=gen), strategy=strategy,
        execution_horizon=cfg.exec_steps, max_delay=max(cfg.delays),
    )  # fmt: skip
    ctrl = RealTimeController(chunks, horizon=cfg.horizon, execution_horizon=cfg.exec_steps,
                              delay=delay, strategy=strategy)  # fmt: skip
    with torch.no_grad():
        for _ in range(cfg.episode_steps):
            action = ctrl.act(torch.from_numpy(env.observe()).float()).double().numpy()
            env.step(*ROBOT_A.from_actions(action))
    actions = ctrl.trace.stacked_actions()[:, :, ROBOT_A.mask.astype(bool)]
    switches = np.array(ctrl.trace.switches)
    per_episode = [action_jumps(actions[:, [b]], switches) for b in range(n)]
    lat = 1e3 * np.asarray(ctrl.trace.latencies[1:])
    nan_to_none = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    return {
        "tasks": {"point-mass": {"success": env.success(False).astype(int).tolist()}},
        "jumps": {w: [nan_to_none(j[w]) for j in per_episode] for w in ("switch", "other")},
        "latency_ms": {"mean": float(lat.mean()), "median": float(np.median(lat))},
    }


def _record(cfg, method, delay, seed, result, fit: PolicyFit, seconds) -> dict[str, Any]:
    return {
        "schema": 1, "run_id": f"flow-point-mass-d{delay}-s{seed}-{method}",
        "config": f"point-mass-{cfg.name}", "method": method, "policy": "flow",
        "shift": f"point-mass/d={delay}", "demos": cfg.train_episodes, "seed": seed,
        "delay": delay, **result,
        "success_rate": float(np.mean(result["tasks"]["point-mass"]["success"])),
        "train": {"trained_as": POINT_MASS_METHODS[method][0], "loss": fit.loss,
                  "steps": fit.steps, "seconds": fit.seconds},
        "seconds": seconds, "machine": f"{platform.machine()}, torch {torch.__version__}",
        "settings": asdict(cfg),
    }  # fmt: skip


def run_point_mass_study(
    protocol: str,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Run (or resume: finished runs are skipped) ``protocol`` into ``out_dir/runs``."""
    if protocol not in POINT_MASS_PROTOCOLS:
        raise ValueError(
            f"protocol: expected one of {list(POINT_MASS_PROTOCOLS)}, got {protocol!r}"
        )
    cfg, runs = POINT_MASS_PROTOCOLS[protocol], Path(out_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    _check_resumable(runs, point_mass_settings(protocol))
    jobs = [(seed, t) for seed in cfg.seeds for t in ("direct", "rtc-trained")]
    written = []
    for seed, trained in tqdm(jobs, desc="point-mass rtc", disable=not progress):
        todo = [(m, d) for m, (t, _) in POINT_MASS_METHODS.items() if t == trained
                for d in cfg.delays
                if not (runs / f"flow-point-mass-d{d}-s{seed}-{m}.json").exists()]  # fmt: skip
        if not todo:
            continue
        tasks = sample_tasks(PRETRAIN_STREAM, seed, cfg.train_episodes)
        data = demonstration_chunks(tasks, ROBOT_A, cfg.horizon)
        policy, fit = _train(cfg, data, trained, seed, progress)
        for method, delay in todo:
            t0 = time.perf_counter()
            result = evaluate_point_mass(cfg, policy, method, delay, seed)
            record = _record(cfg, method, delay, seed, result, fit, time.perf_counter() - t0)
            path = runs / f"{record['run_id']}.json"
            atomic_write_json(path, record)  # a kill leaves no half run to skip as finished
            written.append(path)
        echo(f"  seed {seed} {trained}: loss {fit.loss:.4f}, {len(todo)} runs")
    return written


def point_mass_settings(protocol: str) -> dict[str, Any]:
    """The protocol's settings as its runs record them (JSON types)."""
    return json.loads(json.dumps(asdict(POINT_MASS_PROTOCOLS[protocol]), default=list))


def _check_resumable(runs: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into ``runs`` holding runs of other settings (a finished run is
    skipped by name, which names no setting)."""
    for path in sorted(runs.glob("*.json")):
        try:
            saved = json.loads(path.read_text()).get("settings")
        except ValueError as exc:
            raise ValueError(f"out_dir: {path} is no complete run record ({exc})") from exc
        if saved != settings:
            made_by = (saved or {}).get("name", "?")
            raise ValueError(
                f"out_dir: {path} was made with other settings (protocol {made_by!r}); resume "
                "only with the settings that made it, or choose another output folder"
            )


def point_mass_latency(protocol: str) -> dict[str, Any]:
    """The sampler's per-chunk time per strategy (:func:`strategy_latency`) at batch 1
    and at the evaluation's batch, one CPU thread, on a fresh policy of the protocol's
    size (the cost does not depend on the weights)."""
    cfg = POINT_MASS_PROTOCOLS[protocol]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        policy = make_policy(cfg.horizon, cfg.hidden, cfg.depth).eval()
    sampler = FlowSampler(policy, num_steps=cfg.flow_steps)
    out: dict[str, Any] = {"delay": max(cfg.delays), "threads": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in (1, cfg.eval_episodes):
            gen = torch.Generator().manual_seed(batch)
            noise = torch.randn(batch, cfg.horizon, ACTION_DIM, generator=gen)
            cond = torch.randn(batch, OBS_DIM, generator=gen)
            out[f"batch {batch}"] = strategy_latency(
                sampler, noise, cond, execution_horizon=cfg.exec_steps, delay=max(cfg.delays)
            )
    finally:
        torch.set_num_threads(threads)
    return out

"""Real-time chunking on the Meta-World benchmark (``ate-fast eval rtc``): the benchmark's
flow policy run as an asynchronous controller (:mod:`ate_fast.realtime.controller`) with a
simulated inference delay d, for each strategy.

Per seed, three policies are fine-tuned from the benchmark's pre-trained flow policy on
the same target demos with the same batches, noise and times (the benchmark's pipeline
and cache): ``direct`` (plain flow loss), ``rtc-trained`` (training-time RTC,
:class:`~ate_fast.adaptation.RTCFlowMatching`, delays uniform in 0..max(delays)) and
``steer`` (``Steer.recommended``: λ = −2 through the stage-2 VAE). Each is evaluated at
every delay d on the benchmark's evaluation layouts with one noise stream per seed
(common random numbers):

=================  ================  ======================================================
run method         policy            sampling
=================  ================  ======================================================
naive              direct            plain; switch when the chunk arrives
ensemble           direct            plain; temporal ensembling (ACT)
rtc                direct            RTCGuidance (Y = previous chunk, delay d)
rtc_training       rtc-trained       PrefixInpainting (the committed prefix)
rtc+steer          steer             RTCGuidance
=================  ================  ======================================================

A run's JSON follows :mod:`ate_fast.eval.stats`'s schema with the delay in the group:
``shift = "<shift>/d=<d>"``; it adds ``jumps`` (per episode, the mean action jump
‖a_k − a_{k−1}‖ over the robot's action slots at chunk switches and elsewhere) and
``latency_ms`` (the sampler's wall time per chunk, all episodes in one batch).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ate_fast.adaptation.objectives import RTCFlowMatching
from ate_fast.align.atomic_io import atomic_write_json
from ate_fast.eval.metaworld.builders import pretrained_policy, steer_for, target_chunks
from ate_fast.eval.metaworld.cache import SCHEMA, ResultCache
from ate_fast.eval.metaworld.config import METHODS
from ate_fast.eval.metaworld.embodiment import ACTION_DIM, Shift
from ate_fast.eval.metaworld.envs import HAND, LockstepEnvs, task_index
from ate_fast.eval.metaworld.policy import Conditioner, train_policy
from ate_fast.eval.metaworld.seeds import derived_seed, eval_layouts
from ate_fast.realtime import TrainingTimeRTC
from ate_fast.realtime.controller import RealTimeController, SamplerChunks, action_jumps
from ate_fast.sampling import FlowSampler

# run method -> (trained policy, controller strategy)
RTC_METHODS: dict[str, tuple[str, str]] = {
    "naive": ("direct", "naive"),
    "ensemble": ("direct", "ensemble"),
    "rtc": ("direct", "rtc"),
    "rtc_training": ("rtc-trained", "rtc_training"),
    "rtc+steer": ("steer", "rtc"),
}
TRAINED = ("direct", "rtc-trained", "steer")


@dataclass(frozen=True)
class RealtimeTrial:
    """One evaluation: ``method`` (a key of :data:`RTC_METHODS`) at ``delay`` d."""

    method: str
    delay: int


def fine_tune(
    store: ResultCache, trained: str, shift: str, seed: int, max_delay: int
) -> tuple[nn.Module, Conditioner, Any, Any]:
    """The ``trained`` policy (one of :data:`TRAINED`) for ``seed``: fine-tuned from the
    pre-trained flow policy on the target demos (N = the config's first) with the
    benchmark's settings and batches; returns ``(policy, conditioner, fit, data)``."""
    cfg, demos = store.cfg, store.cfg.demos[0]
    data = target_chunks(store, shift, demos, seed)
    policy, conditioner, _ = pretrained_policy(store, "flow")
    steer = steer_for(store, METHODS["ate-flipped"], shift, demos, seed, data.mask)
    objective = None
    if trained == "rtc-trained":
        rtc = TrainingTimeRTC(max_delay=max_delay)
        objective = RTCFlowMatching(rtc, derived_seed("rtc-delays", shift, demos, seed))
    fit = train_policy(
        policy, conditioner, data, kind="flow", steps=cfg.finetune_steps,
        batch=cfg.finetune_batch, lr=cfg.finetune_lr,
        seed=derived_seed("finetune", "flow", shift, demos, seed),
        steer=steer if trained == "steer" else None, objective=objective,
    )  # fmt: skip
    return policy, conditioner, fit, data


def evaluate_realtime(
    store: ResultCache,
    policy: nn.Module,
    conditioner: Conditioner,
    trial: RealtimeTrial,
    *,
    shift: str,
    seed: int,
    slots: torch.Tensor,
    max_delay: int,
) -> dict[str, Any]:
    """Run ``trial`` on the evaluation layouts: ``{"tasks", "jumps", "latency_ms"}``.

    Every episode runs in one lockstep batch; finished episodes keep being sampled (static
    shapes) but are no longer stepped, and their steps do not count in the jumps.
    """
    cfg = store.cfg
    layouts = eval_layouts(cfg)
    tasks = [t for t, seeds in layouts.items() for _ in seeds]
    envs = LockstepEnvs(tasks, np.concatenate(list(layouts.values())), cfg.episode_steps)
    index = task_index()
    task_ids = torch.tensor([index[t] for t in tasks])
    n, robot = len(tasks), Shift(shift)
    gen = torch.Generator().manual_seed(derived_seed("rtc-eval-noise", shift, seed))
    chunks = SamplerChunks(
        FlowSampler(policy.eval(), num_steps=cfg.sampler_steps),
        lambda: torch.randn(n, cfg.horizon, ACTION_DIM, generator=gen),
        strategy=RTC_METHODS[trial.method][1], execution_horizon=cfg.exec_steps,
        max_delay=max_delay, cond=lambda obs: conditioner(obs, task_ids),
    )  # fmt: skip
    ctrl = RealTimeController(
        chunks, horizon=cfg.horizon, execution_horizon=cfg.exec_steps, delay=trial.delay,
        strategy=RTC_METHODS[trial.method][1],
    )  # fmt: skip
    running = []
    with torch.no_grad():
        while not envs.done.all():
            running.append(~envs.done)
            action = ctrl.act(torch.from_numpy(envs.obs).float()).double().numpy()
            envs.step(robot.to_env(action, envs.obs[:, HAND]))
    actions = ctrl.trace.stacked_actions()[:, :, slots.numpy().astype(bool)]
    valid, switches = np.stack(running), np.array(ctrl.trace.switches)
    per_episode = [action_jumps(actions[:, [b]], switches, valid[:, [b]]) for b in range(n)]
    out_tasks: dict[str, dict[str, list]] = {}
    for t in layouts:
        rows = [i for i, name in enumerate(tasks) if name == t]
        out_tasks[t] = {
            "success": envs.success[rows].astype(int).tolist(),
            "steps": envs.steps[rows].tolist(),
        }
    nan_to_none = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    lat = 1e3 * np.asarray(ctrl.trace.latencies[1:])  # the first chunk warms up
    return {
        "tasks": out_tasks,
        "jumps": {
            "switch": [nan_to_none(j["switch"]) for j in per_episode],
            "other": [nan_to_none(j["other"]) for j in per_episode],
        },
        "latency_ms": {"mean": float(lat.mean()), "median": float(np.median(lat))},
    }


def run_record(
    store: ResultCache,
    trial: RealtimeTrial,
    shift: str,
    seed: int,
    result: dict[str, Any],
    fit: Any,
) -> dict[str, Any]:
    """A run's JSON (the :mod:`ate_fast.eval.stats` schema plus jumps and latency)."""
    tasks = result["tasks"]
    per_task = [sum(v["success"]) / len(v["success"]) for v in tasks.values()]
    group = f"{shift}/d={trial.delay}"
    return {
        "schema": SCHEMA,
        "run_id": f"flow-{shift}-d{trial.delay}-s{seed}-{trial.method}",
        "config": store.cfg.name,
        "method": trial.method,
        "policy": "flow",
        "shift": group,
        "demos": store.cfg.demos[0],
        "seed": seed,
        "delay": trial.delay,
        "tasks": tasks,
        "success_rate": sum(per_task) / len(per_task),
        "jumps": result["jumps"],
        "latency_ms": result["latency_ms"],
        "train": {
            "trained_as": RTC_METHODS[trial.method][0],
            "loss": fit.loss,
            "steps": fit.steps,
            "seconds": fit.seconds,
            **fit.steer,
        },
        "seconds": 0.0,
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "settings": store.cfg.to_dict(),
    }


def realtime_job(store: ResultCache, job: tuple) -> str:
    """``job = (trained, shift, seed, delays, max_delay, run dir)``: fine-tune the
    ``trained`` policy and evaluate every method using it at every delay (missing runs
    only); one JSON per run."""
    torch.set_num_threads(1)
    trained, shift, seed, delays, max_delay, runs = job
    trials = [
        RealtimeTrial(m, d) for m, (t, _) in RTC_METHODS.items() if t == trained for d in delays
    ]
    todo = [x for x in trials if not (runs / _name(x, shift, seed)).exists()]
    if not todo:
        return f"{trained} seed {seed} (cached)"
    policy, conditioner, fit, data = fine_tune(store, trained, shift, seed, max_delay)
    for trial in todo:
        t0 = time.perf_counter()
        result = evaluate_realtime(
            store, policy, conditioner, trial, shift=shift, seed=seed, slots=data.mask,
            max_delay=max_delay,
        )  # fmt: skip
        record = run_record(store, trial, shift, seed, result, fit)
        record["seconds"] = time.perf_counter() - t0
        atomic_write_json(runs / _name(trial, shift, seed), record)
    return f"{trained} seed {seed}"


def _name(trial: RealtimeTrial, shift: str, seed: int) -> str:
    return f"flow-{shift}-d{trial.delay}-s{seed}-{trial.method}.json"

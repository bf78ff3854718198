"""What worker processes do: train a stage-2 VAE, or fine-tune one policy and evaluate
every method that uses it (one JSON per run); and the pre-trained policy's check on its
own robot and tasks."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ate_fast.adaptation.policy_training import PolicyFit
from ate_fast.align.atomic_io import atomic_write_json
from ate_fast.eval.metaworld.builders import (
    guidance_for,
    make_stage2,
    policy_spec,
    pretrained_policy,
    source_chunks,
    steer_for,
    target_chunks,
)
from ate_fast.eval.metaworld.cache import SCHEMA, ResultCache
from ate_fast.eval.metaworld.config import METHODS
from ate_fast.eval.metaworld.embodiment import Shift
from ate_fast.eval.metaworld.envs import task_index
from ate_fast.eval.metaworld.experts import ChunkSet
from ate_fast.eval.metaworld.policy import Conditioner, make_policy, train_policy
from ate_fast.eval.metaworld.rollout import evaluate
from ate_fast.eval.metaworld.seeds import derived_seed, eval_layouts

SOURCE_CHECK_EPISODES = 10


def run_id(policy: str, shift: str, demos: int, seed: int, method: str) -> str:
    return f"{policy}-{shift}-n{demos}-s{seed}-{method}"


def outputs(store: ResultCache, job: tuple) -> list[tuple[str, Path]]:
    """``(method, run file)`` of every configured method that uses the policy ``job =
    (policy, shift, demos, seed, trained method)`` trains."""
    kind, shift, demos, seed, trained = job
    return [
        (m, store.runs / f"{run_id(kind, shift, demos, seed, m)}.json")
        for m in store.cfg.methods
        if METHODS[m].training == trained
    ]


def stage2_job(store: ResultCache, job: tuple) -> str:
    """Train (or find) the stage-2 VAE of ``job = (shift, demos, seed, kl)``."""
    torch.set_num_threads(1)
    shift, demos, seed, kl = job
    make_stage2(store, shift, demos, seed, kl)
    return f"stage 2 {shift} N={demos} seed {seed} {kl}"


def run_job(store: ResultCache, job: tuple) -> str:
    """Fine-tune one policy and evaluate every method that uses it (missing JSONs only)."""
    torch.set_num_threads(1)
    kind, shift, demos, seed, trained = job
    cfg, start = store.cfg, time.perf_counter()
    data = target_chunks(store, shift, demos, seed)
    policy, conditioner, fit = _fine_tune(store, job, data)
    trained_s = time.perf_counter() - start
    for name, path in outputs(store, job):
        if path.exists():
            continue
        t0 = time.perf_counter()
        guidance = (
            guidance_for(store, shift, demos, seed, data.mask) if METHODS[name].guided else None
        )
        tasks = evaluate(
            policy, conditioner, kind=kind, shift=Shift(shift),
            layouts=eval_layouts(cfg), task_index=task_index(), horizon=cfg.horizon,
            exec_steps=cfg.exec_steps,
            max_steps=cfg.episode_steps, sampler_steps=cfg.sampler_steps,
            noise_seed=derived_seed("eval-noise", kind, shift, demos, seed), guidance=guidance,
        )  # fmt: skip
        record = _run_record(store, job, name, tasks, fit, trained_s, data)
        record["seconds"] = trained_s + time.perf_counter() - t0
        atomic_write_json(path, record)
    return run_id(kind, shift, demos, seed, trained)


def _fine_tune(
    store: ResultCache, job: tuple, data: ChunkSet
) -> tuple[nn.Module, Conditioner, PolicyFit]:
    """The policy of ``job``'s trained method, fine-tuned on ``data`` (from the
    pre-trained policy, or from scratch), with its conditioner and fit."""
    kind, shift, demos, seed, trained = job
    cfg, method = store.cfg, METHODS[trained]
    # scratch keeps the pre-trained conditioner too: the same observation scaling
    policy, conditioner, _ = pretrained_policy(store, kind)
    if method.init == "scratch":
        with torch.random.fork_rng():
            torch.manual_seed(derived_seed("scratch-init", kind, seed))
            policy = make_policy(policy_spec(cfg, kind))
    steer = steer_for(store, method, shift, demos, seed, data.mask)
    fit = train_policy(
        policy, conditioner, data, kind=kind, steps=cfg.finetune_steps, batch=cfg.finetune_batch,
        lr=cfg.finetune_lr if method.init == "pretrained" else cfg.pretrain_lr,
        seed=derived_seed("finetune", kind, shift, demos, seed), steer=steer,
    )  # fmt: skip
    return policy, conditioner, fit


def _run_record(
    store: ResultCache,
    job: tuple,
    method: str,
    tasks: dict[str, dict[str, list]],
    fit: PolicyFit,
    trained_s: float,
    data: ChunkSet,
) -> dict[str, Any]:
    """A run's JSON (the :mod:`ate_fast.eval.stats` schema), all but the total
    ``seconds``."""
    kind, shift, demos, seed, trained = job
    per_task = [sum(v["success"]) / len(v["success"]) for v in tasks.values()]
    return {
        "schema": SCHEMA,
        "run_id": run_id(kind, shift, demos, seed, method),
        "config": store.cfg.name,
        "method": method,
        "policy": kind,
        "shift": shift,
        "demos": demos,
        "seed": seed,
        "tasks": tasks,
        "success_rate": sum(per_task) / len(per_task),
        "train": {
            "trained_as": trained,
            "loss": fit.loss,
            "steps": fit.steps,
            "seconds": trained_s,
            **fit.steer,
        },
        "data": data.stats,
        "machine": machine(),
        "settings": store.cfg.to_dict(),
    }


def machine() -> str:
    """What ran the job, for the run's JSON."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def source_check(store: ResultCache, kind: str) -> dict:
    """The pre-trained policy on its own robot and tasks (a sanity check that the policy
    class solves Meta-World at all), and the scripted experts' failure counts; written to
    ``out/pretrained-<kind>-on-source.json`` once."""
    path = store.out / f"pretrained-{kind}-on-source.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = store.cfg
    policy, conditioner, pre = pretrained_policy(store, kind)
    count = min(cfg.eval_episodes, SOURCE_CHECK_EPISODES)
    tasks = evaluate(
        policy, conditioner, kind=kind, shift=Shift("source"),
        layouts=eval_layouts(cfg, cfg.source_tasks, count), task_index=task_index(),
        horizon=cfg.horizon, exec_steps=cfg.exec_steps, max_steps=cfg.episode_steps,
        sampler_steps=cfg.sampler_steps, noise_seed=derived_seed("source-check", kind),
    )  # fmt: skip
    rates = {t: sum(v["success"]) / len(v["success"]) for t, v in tasks.items()}
    data = source_chunks(store)
    result = {
        "policy": kind,
        "success_rate": sum(rates.values()) / len(rates),
        "per_task": rates,
        "episodes_per_task": count,
        "pretrain_loss": pre["loss"],
        "pretrain_chunks": pre["chunks"],
        "expert_failures": data.stats["expert_failures"],
        "settings": cfg.to_dict(),
    }
    atomic_write_json(path, result)
    return result

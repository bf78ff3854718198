"""The benchmark's driver: artefacts shared between runs are cached, runs go to worker
processes, finished runs are skipped, and a report is written at the end.

Layout of ``out_dir``::

    runs/    one JSON per (policy, shift, N, seed, method) — the results
    summary.md, summary.json, success.png — written by ``ate_fast.eval.report``

The cache (source demos, the stage-1 VAE + prior, pre-trained policies, target demos,
stage-2 VAEs) lives in ``cache_dir``, by default shared between output folders and
configurations (:func:`~.cache.default_cache_dir`): file names carry a hash of the
settings each artefact depends on, so ``quick``, ``ablation`` and ``full`` reuse one
pre-trained policy.

Phases: (1) source demos → stage-1 VAE → pre-trained policy per kind (main process);
(2) target demos per seed; stage-2 VAEs per (shift, N, seed, KL direction) (workers);
(3) per (policy, shift, N, seed, trained method): fine-tune once, evaluate every method
that uses that policy, write their JSONs (workers). Killing the job loses at most the
runs in flight; rerunning the same command resumes.

Modules: :mod:`.seeds` (derived seeds, evaluation layouts), :mod:`.cache` (where things
are kept: :class:`~.cache.ResultCache`), :mod:`.builders` (the cached artefacts),
:mod:`.jobs` (what workers run), :mod:`.pool` (the worker pool), :mod:`.memory` (how many
workers fit).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ate_fast.eval.metaworld.builders import (
    pretrained,
    source_demos,
    stage1,
    stage2_path,
    target_demos,
)
from ate_fast.eval.metaworld.cache import PRETRAIN_KEYS, ResultCache, default_cache_dir
from ate_fast.eval.metaworld.config import CONFIGS, METHODS, EvalConfig
from ate_fast.eval.metaworld.jobs import outputs, run_job, source_check, stage2_job
from ate_fast.eval.metaworld.memory import default_workers
from ate_fast.eval.metaworld.pool import run_pool
from ate_fast.eval.report import write_report

# settings that do not change a finished run's result
_NOT_RESULT_SETTINGS = ("name", "methods", "seeds", "demos", "shifts", "policies", "extra")
GRID_FIELDS = ("methods", "policies", "shifts", "demos", "seeds")


def check_resumable(store: ResultCache) -> None:
    """Refuse to mix runs made with other settings, or by another config, into
    ``store.out`` (a finished run is skipped by name only; the report compares runs of one
    config only)."""
    cfg = {k: v for k, v in store.cfg.to_dict().items() if k not in _NOT_RESULT_SETTINGS}
    for path in sorted(store.runs.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError as exc:  # runs are written atomically: edited or damaged by hand
            raise ValueError(f"out_dir: {path} is no complete run record ({exc})") from exc
        made_by = record.get("config")
        if made_by is not None and made_by != store.cfg.name:
            raise ValueError(
                f"out_dir: {path} was made by the config {made_by!r}, not {store.cfg.name!r}; "
                "resume only with that config, or choose another output folder"
            )
        saved = record.get("settings", {})
        diff = sorted(
            k
            for k in cfg
            if json.dumps(saved.get(k), default=list) != json.dumps(cfg[k], default=list)
        )
        if diff:
            raise ValueError(
                f"out_dir: {path} was made with other settings ({', '.join(diff)}); resume only "
                "with the settings that made it, or choose another output folder"
            )


def restrict(cfg: EvalConfig, only: dict[str, list]) -> EvalConfig:
    """``cfg`` with its grid fields narrowed to the given subsets (each must be one)."""
    narrowed = {}
    for key, values in only.items():
        if key not in GRID_FIELDS:
            raise ValueError(f"only: keys must be among {list(GRID_FIELDS)}, got {key!r}")
        if not values:
            continue
        outside = [v for v in values if v not in getattr(cfg, key)]
        if outside:
            raise ValueError(
                f"{key}: {outside} not in the {cfg.name} config's {list(getattr(cfg, key))}"
            )
        narrowed[key] = tuple(v for v in getattr(cfg, key) if v in values)
    return cfg.with_overrides(**narrowed) if narrowed else cfg


def plan(cfg: EvalConfig) -> list[tuple]:
    """Training jobs ``(policy, shift, demos, seed, trained method)`` of ``cfg``."""
    trained = list(dict.fromkeys(METHODS[m].training for m in cfg.methods))
    return [
        (k, s, n, seed, t)
        for k in cfg.policies
        for s in cfg.shifts
        for n in cfg.demos
        for seed in cfg.seeds
        for t in trained
    ]


def run_benchmark(
    config: str | EvalConfig = "quick",
    out_dir: str | os.PathLike = "results/metaworld",
    *,
    only: Optional[dict[str, list]] = None,
    workers: Optional[int] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
    report: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) the benchmark ``config`` (a name in ``CONFIGS`` or an EvalConfig)
    into ``out_dir``; returns ``out_dir``.

    ``only`` restricts the config's grid to subsets — keys ``methods``, ``policies``,
    ``shifts``, ``demos``, ``seeds`` — e.g. to split a long config over machines (runs are
    named by these, so the pieces merge into one folder). ``workers`` processes run jobs
    in parallel (default: the CPU count, at most 4, bounded by memory). ``cache_dir``
    holds the artefacts runs share (default :func:`~.cache.default_cache_dir`).
    """
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"config: expected one of {list(CONFIGS)}, got {config!r}")
        config = CONFIGS[config]
    config = restrict(config, only or {})
    if workers is not None and workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    workers = workers or default_workers(config)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    store = ResultCache(config, Path(out_dir), cache)
    check_resumable(store)
    store.cache.mkdir(parents=True, exist_ok=True)
    store.runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over processes: intra-op threads only contend
    try:
        _run_phases(store, workers, progress, echo)
    finally:
        torch.set_num_threads(threads)
    if report:
        paths = write_report(store.out, method_order=list(config.methods))
        echo("  report: " + ", ".join(str(p) for p in paths.values()))
    echo(f"  done ({time.perf_counter() - t0:.0f} s)")
    return store.out


def _run_phases(
    store: ResultCache, workers: int, progress: bool, echo: Callable[[str], None]
) -> None:
    cfg, t0 = store.cfg, time.perf_counter()
    jobs = [j for j in plan(cfg) if not all(p.exists() for _, p in outputs(store, j))]
    echo(
        f"metaworld/{cfg.name}: {len(plan(cfg))} training jobs, {len(jobs)} to run, "
        f"{workers} workers → {store.out} (cache {store.cache})"
    )
    if jobs:
        source_demos(store)
        stage1(store)
        for kind in dict.fromkeys(j[0] for j in jobs):
            pretrained(store, kind, progress)
        echo(f"  source side ready ({time.perf_counter() - t0:.0f} s)")
        for seed in dict.fromkeys(j[3] for j in jobs):
            target_demos(store, seed)
        run_pool(stage2_job, store, _stage2_jobs(store, jobs), workers, "stage-2 VAEs", progress)
        echo(f"  target demos and stage-2 VAEs ready ({time.perf_counter() - t0:.0f} s)")
        run_pool(run_job, store, jobs, workers, "fine-tune + evaluate", progress)
        echo(f"  runs finished ({time.perf_counter() - t0:.0f} s)")
    for kind in cfg.policies:  # the sanity check, wherever its policy is at hand
        if store.artefact_path(f"pretrained-{kind}", PRETRAIN_KEYS).exists():
            check = source_check(store, kind)
            rate = check["success_rate"]
            echo(f"  pre-trained {kind} policy on its own robot and tasks: {rate:.0%} success")


def _stage2_jobs(store: ResultCache, jobs: list[tuple]) -> list[tuple]:
    """The stage-2 VAEs ``(shift, demos, seed, kl)`` the training ``jobs`` need and the
    cache lacks (forward KL only where a method steers through it)."""
    kls = {"reverse"} | {
        "forward"
        for m in store.cfg.methods
        if (METHODS[m].steer or {}).get("encoder") == "stage2-forward-kl"
    }
    needed = sorted({(s, n, seed, kl) for _, s, n, seed, _ in jobs for kl in kls})
    return [j for j in needed if not stage2_path(store, *j).exists()]

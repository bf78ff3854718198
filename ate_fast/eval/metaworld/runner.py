"""The benchmark's driver: artefacts shared between runs are cached, runs go to worker
processes, finished runs are skipped, and a report is written at the end.

Layout of ``out_dir``::

    runs/    one JSON per (policy, shift, N, seed, method) — the results
    summary.md, summary.json, success.png — written by ``ate_fast.eval.report``

The cache (source demos, the stage-1 VAE + prior, pre-trained policies, target demos,
stage-2 VAEs) lives in ``cache_dir``, by default shared between output folders and
configurations (:func:`default_cache_dir`): file names carry a hash of the settings each
artefact depends on, so ``quick``, ``ablation`` and ``full`` reuse one pre-trained policy.

Phases: (1) source demos → stage-1 VAE → pre-trained policy per kind (main process);
(2) target demos per seed; stage-2 VAEs per (shift, N, seed, KL direction) (workers);
(3) per (policy, shift, N, seed, trained method): fine-tune once, evaluate every method
that uses that policy, write their JSONs (workers). Killing the job loses at most the
runs in flight; rerunning the same command resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ate_fast.align import ActionVAE
from ate_fast.align.atomic_io import atomic_path, atomic_write_json
from ate_fast.eval.metaworld.align_vaes import new_vae, train_source_vae, train_target_vae
from ate_fast.eval.metaworld.config import CONFIGS, METHODS, EvalConfig, Method
from ate_fast.eval.metaworld.embodiment import Shift
from ate_fast.eval.metaworld.envs import layout_seeds, task_names
from ate_fast.eval.metaworld.experts import Demonstrations, chunk_set, collect
from ate_fast.eval.metaworld.policy import Conditioner, PolicySpec, make_policy, train_policy
from ate_fast.eval.metaworld.rollout import evaluate
from ate_fast.steer import LatentGuidance, Steer

SCHEMA = 1
EVAL_LAYOUT_SEED = 0  # one fixed evaluation set per task, whatever the run's seed
SOURCE_CHECK_EPISODES = 10

# the cache keys: which settings each artefact depends on
_SOURCE_KEYS = ("source_tasks", "pretrain_demos")
_STAGE1_KEYS = (
    *_SOURCE_KEYS,
    "horizon",
    "latent_dim",
    "vae_hidden",
    "vae_lr",
    "stage1_epochs",
    "vae_batch",
    "prior",
)
_PRETRAIN_KEYS = (
    *_SOURCE_KEYS,
    "horizon",
    "policy_hidden",
    "policy_depth",
    "pretrain_steps",
    "pretrain_batch",
    "pretrain_lr",
)
_TARGET_KEYS = ("target_tasks",)
_STAGE2_KEYS = (*_STAGE1_KEYS, *_TARGET_KEYS, "stage2_epochs")


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") >> 1


def task_index() -> dict[str, int]:
    """Task name → one-hot slot: every Meta-World v3 task, sorted (so a pre-trained policy
    is the same whatever the targets)."""
    return {name: i for i, name in enumerate(task_names())}


def run_id(policy: str, shift: str, demos: int, seed: int, method: str) -> str:
    return f"{policy}-{shift}-n{demos}-s{seed}-{method}"


def _save(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=False)  # our own cache files


def _cached(path: Path, make: Callable[[], Any]) -> Any:
    if path.exists():
        return _load(path)
    obj = make()
    _save(path, obj)
    return obj


def default_cache_dir() -> Path:
    """``$ATE_FAST_CACHE/metaworld``, else ``$XDG_CACHE_HOME/ate_fast/metaworld``, else
    ``~/.cache/ate_fast/metaworld``; the schema version is a sub-folder, so files written
    by an incompatible version are never read."""
    root = os.environ.get("ATE_FAST_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base = Path(xdg).expanduser() / "ate_fast"
    return base / "metaworld" / f"v{SCHEMA}"


@dataclass
class Workspace:
    """The config, the output folder and the cache folder, as passed to worker processes."""

    cfg: EvalConfig
    out: Path
    cache: Path

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    def path(self, stem: str, keys: tuple[str, ...]) -> Path:
        return self.cache / f"{stem}-{self.cfg.digest(*keys)}.pt"


# ---------------------------------------------------------------- phase 1: source side
def _source_demos(ws: Workspace) -> list[Demonstrations]:
    index = task_index()
    return _cached(
        ws.path("source-demos", _SOURCE_KEYS),
        lambda: [
            collect(t, index[t], "pretrain", 0, ws.cfg.pretrain_demos) for t in ws.cfg.source_tasks
        ],
    )


def _source_chunks(ws: Workspace):
    return chunk_set(_source_demos(ws), task_index(), Shift("source"), ws.cfg.horizon)


def _stage1(ws: Workspace) -> dict:
    def make() -> dict:
        vae, prior, stats = train_source_vae(ws.cfg, _source_chunks(ws), derived_seed("stage1"))
        return {"vae": vae.state_dict(), "prior": prior, "stats": stats}

    return _cached(ws.path("stage1", _STAGE1_KEYS), make)


def _spec(cfg: EvalConfig, kind: str) -> PolicySpec:
    return PolicySpec(kind, cfg.horizon, cfg.policy_hidden, cfg.policy_depth, len(task_index()))


def _pretrained_policy(ws: Workspace, kind: str) -> tuple[nn.Module, Conditioner, dict]:
    """The cached pre-trained policy and its conditioner (and the cache entry)."""
    pre = _pretrained(ws, kind)
    policy, conditioner = make_policy(_spec(ws.cfg, kind)), Conditioner(len(task_index()))
    policy.load_state_dict(pre["policy"])
    conditioner.load_state_dict(pre["conditioner"])
    return policy, conditioner, pre


def _pretrained(ws: Workspace, kind: str, progress: bool = False) -> dict:
    def make() -> dict:
        data = _source_chunks(ws)
        with torch.random.fork_rng():
            torch.manual_seed(derived_seed("pretrain-init", kind))
            policy = make_policy(_spec(ws.cfg, kind))
        conditioner = Conditioner(len(task_index()), data.obs)
        cfg = ws.cfg
        fit = train_policy(
            policy, conditioner, data, kind=kind, steps=cfg.pretrain_steps,
            batch=cfg.pretrain_batch, lr=cfg.pretrain_lr, seed=derived_seed("pretrain", kind),
            progress=progress, desc=f"pre-train {kind} policy",
        )  # fmt: skip
        return {
            "policy": policy.state_dict(),
            "conditioner": conditioner.state_dict(),
            "loss": fit.loss,
            "chunks": len(data),
        }

    return _cached(ws.path(f"pretrained-{kind}", _PRETRAIN_KEYS), make)


# ---------------------------------------------------------------- phase 2: target side
def _target_demos(ws: Workspace, seed: int) -> list[Demonstrations]:
    index, n = task_index(), max(ws.cfg.demos)
    path = ws.cache / f"target-demos-s{seed}-n{n}-{ws.cfg.digest(*_TARGET_KEYS)}.pt"
    return _cached(
        path, lambda: [collect(t, index[t], "demo", seed, n) for t in ws.cfg.target_tasks]
    )


def _target_chunks(ws: Workspace, shift: str, demos: int, seed: int):
    first = [
        Demonstrations(d.task, d.episodes[:demos], d.failures) for d in _target_demos(ws, seed)
    ]
    return chunk_set(first, task_index(), Shift(shift), ws.cfg.horizon)


def _stage2_path(ws: Workspace, shift: str, demos: int, seed: int, kl: str) -> Path:
    return ws.path(f"stage2-{shift}-n{demos}-s{seed}-{kl}", _STAGE2_KEYS)


def _stage2_job(ws: Workspace, job: tuple) -> str:
    """Train (or find) the stage-2 VAE of ``job = (shift, demos, seed, kl)``."""
    torch.set_num_threads(1)
    shift, demos, seed, kl = job

    def make() -> dict:
        stage1 = _stage1(ws)
        data = _target_chunks(ws, shift, demos, seed)
        vae, target, stats = train_target_vae(
            ws.cfg, data, stage1["prior"], kl, derived_seed("stage2", shift, demos, seed, kl)
        )
        return {"vae": vae.state_dict(), "target": target, "stats": stats}

    _cached(_stage2_path(ws, shift, demos, seed, kl), make)
    return f"stage 2 {shift} N={demos} seed {seed} {kl}"


def _stage2_vae(
    ws: Workspace, shift: str, demos: int, seed: int, kl: str
) -> tuple[ActionVAE, torch.Tensor]:
    """The cached stage-2 VAE and its mean latent [d_z]."""
    stage2 = _load(_stage2_path(ws, shift, demos, seed, kl))
    vae = new_vae(ws.cfg, 0)
    vae.load_state_dict(stage2["vae"])
    return vae, stage2["target"]


# ---------------------------------------------------------------- phase 3: runs
def _steer_for(
    ws: Workspace, method: Method, shift: str, demos: int, seed: int, mask: torch.Tensor
) -> Optional[Steer]:
    if method.steer is None:
        return None
    encoder = method.steer["encoder"]
    if encoder == "untrained":
        vae = new_vae(ws.cfg, derived_seed("untrained", seed))
    else:
        kl = "forward" if encoder == "stage2-forward-kl" else "reverse"
        vae, _ = _stage2_vae(ws, shift, demos, seed, kl)
    return Steer(
        vae,
        scale=method.steer["scale"],
        clamp=ws.cfg.steer_clamp if method.steer["clamp"] is None else method.steer["clamp"],
        reduction=method.steer["reduction"],
        mask=mask,
    )


def _guidance_for(
    ws: Workspace, shift: str, demos: int, seed: int, mask: torch.Tensor
) -> LatentGuidance:
    vae, target = _stage2_vae(ws, shift, demos, seed, "reverse")
    cfg = ws.cfg
    return LatentGuidance(
        vae,
        target,
        scale=cfg.guidance_scale,
        clamp=cfg.guidance_clamp,
        mode="direct",
        mask=mask,
    )


def _eval_layouts(
    ws: Workspace, tasks: Optional[tuple[str, ...]] = None, count: int = 0
) -> dict[str, Any]:
    index, count = task_index(), count or ws.cfg.eval_episodes
    tasks = tasks or ws.cfg.target_tasks
    return {t: layout_seeds("eval", EVAL_LAYOUT_SEED, index[t], count) for t in tasks}


def _source_check(ws: Workspace, kind: str) -> dict:
    """The pre-trained policy on its own robot and tasks (a sanity check that the policy
    class solves Meta-World at all), and the scripted experts' failure counts."""
    path = ws.out / f"pretrained-{kind}-on-source.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = ws.cfg
    policy, conditioner, pre = _pretrained_policy(ws, kind)
    count = min(cfg.eval_episodes, SOURCE_CHECK_EPISODES)
    tasks = evaluate(
        policy, conditioner, kind=kind, shift=Shift("source"),
        layouts=_eval_layouts(ws, cfg.source_tasks, count), task_index=task_index(),
        horizon=cfg.horizon, exec_steps=cfg.exec_steps, max_steps=cfg.episode_steps,
        sampler_steps=cfg.sampler_steps, noise_seed=derived_seed("source-check", kind),
    )  # fmt: skip
    rates = {t: sum(v["success"]) / len(v["success"]) for t, v in tasks.items()}
    data = _source_chunks(ws)
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


def _outputs(ws: Workspace, job: tuple) -> list[tuple[str, Path]]:
    kind, shift, demos, seed, trained = job
    return [
        (m, ws.runs / f"{run_id(kind, shift, demos, seed, m)}.json")
        for m in ws.cfg.methods
        if METHODS[m].training == trained
    ]


def _run_job(ws: Workspace, job: tuple) -> str:
    """Fine-tune one policy and evaluate every method that uses it (missing JSONs only)."""
    torch.set_num_threads(1)
    kind, shift, demos, seed, trained = job
    cfg, start = ws.cfg, time.perf_counter()
    data = _target_chunks(ws, shift, demos, seed)
    method = METHODS[trained]
    # scratch keeps the pre-trained conditioner too: the same observation scaling
    policy, conditioner, _ = _pretrained_policy(ws, kind)
    if method.init == "scratch":
        with torch.random.fork_rng():
            torch.manual_seed(derived_seed("scratch-init", kind, seed))
            policy = make_policy(_spec(cfg, kind))
    steer = _steer_for(ws, method, shift, demos, seed, data.mask)
    fit = train_policy(
        policy, conditioner, data, kind=kind, steps=cfg.finetune_steps, batch=cfg.finetune_batch,
        lr=cfg.finetune_lr if method.init == "pretrained" else cfg.pretrain_lr,
        seed=derived_seed("finetune", kind, shift, demos, seed), steer=steer,
    )  # fmt: skip
    trained_s = time.perf_counter() - start
    for name, path in _outputs(ws, job):
        if path.exists():
            continue
        t0 = time.perf_counter()
        guidance = (
            _guidance_for(ws, shift, demos, seed, data.mask) if METHODS[name].guided else None
        )
        tasks = evaluate(
            policy, conditioner, kind=kind, shift=Shift(shift),
            layouts=_eval_layouts(ws), task_index=task_index(), horizon=cfg.horizon,
            exec_steps=cfg.exec_steps,
            max_steps=cfg.episode_steps, sampler_steps=cfg.sampler_steps,
            noise_seed=derived_seed("eval-noise", kind, shift, demos, seed), guidance=guidance,
        )  # fmt: skip
        per_task = [sum(v["success"]) / len(v["success"]) for v in tasks.values()]
        atomic_write_json(
            path,
            {
                "schema": SCHEMA,
                "run_id": run_id(kind, shift, demos, seed, name),
                "config": cfg.name,
                "method": name,
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
                "seconds": trained_s + time.perf_counter() - t0,
                "machine": machine(),
                "settings": cfg.to_dict(),
            },
        )
    return run_id(kind, shift, demos, seed, trained)


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


ENV_MEMORY_MB = 40  # one Meta-World environment (~30 MB measured) plus headroom


def default_workers(cfg: EvalConfig) -> int:
    """CPU count, at most 4, and no more than 80 % of the available memory allows: every
    evaluation episode of a run has its own environment (all step in lockstep)."""
    per_worker_mb = 1500 + ENV_MEMORY_MB * cfg.eval_episodes * len(cfg.target_tasks)
    available_mb = _available_memory_mb()
    by_memory = int(0.8 * available_mb // per_worker_mb) if available_mb else 4
    return max(1, min(4, os.cpu_count() or 1, by_memory))


def _available_memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


# settings that do not change a finished run's result
_NOT_RESULT_SETTINGS = ("name", "methods", "seeds", "demos", "shifts", "policies", "extra")


def check_resumable(ws: Workspace) -> None:
    """Refuse to mix runs made with other settings into ``ws.out`` (a finished run is
    skipped by name only)."""
    cfg = {k: v for k, v in ws.cfg.to_dict().items() if k not in _NOT_RESULT_SETTINGS}
    for path in sorted(ws.runs.glob("*.json")):
        saved = json.loads(path.read_text()).get("settings", {})
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


GRID_FIELDS = ("methods", "policies", "shifts", "demos", "seeds")


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


def _pool(
    fn: Callable, ws: Workspace, jobs: list[tuple], workers: int, desc: str, progress: bool
) -> None:
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, dynamic_ncols=True)
    if workers <= 1:
        for job in jobs:
            bar.set_postfix_str(fn(ws, job))
            bar.update()
    else:
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(fn, ws, job) for job in jobs]
            for f in as_completed(futures):
                bar.set_postfix_str(f.result())
                bar.update()
    bar.close()


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
    holds the artefacts runs share (default :func:`default_cache_dir`).
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
    ws = Workspace(config, Path(out_dir), cache)
    check_resumable(ws)
    ws.cache.mkdir(parents=True, exist_ok=True)
    ws.runs.mkdir(parents=True, exist_ok=True)
    cfg, t0 = config, time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over processes: intra-op threads only contend
    try:
        _run_phases(ws, workers, progress, echo)
    finally:
        torch.set_num_threads(threads)
    if report:
        from ate_fast.eval.report import write_report

        paths = write_report(ws.out, method_order=list(cfg.methods))
        echo("  report: " + ", ".join(str(p) for p in paths.values()))
    echo(f"  done ({time.perf_counter() - t0:.0f} s)")
    return ws.out


def _run_phases(ws: Workspace, workers: int, progress: bool, echo: Callable[[str], None]) -> None:
    cfg, t0 = ws.cfg, time.perf_counter()
    jobs = [j for j in plan(cfg) if not all(p.exists() for _, p in _outputs(ws, j))]
    echo(
        f"metaworld/{cfg.name}: {len(plan(cfg))} training jobs, {len(jobs)} to run, "
        f"{workers} workers → {ws.out} (cache {ws.cache})"
    )
    if jobs:
        _source_demos(ws)
        _stage1(ws)
        for kind in dict.fromkeys(j[0] for j in jobs):
            _pretrained(ws, kind, progress)
        echo(f"  source side ready ({time.perf_counter() - t0:.0f} s)")
        for seed in dict.fromkeys(j[3] for j in jobs):
            _target_demos(ws, seed)
        kls = {"reverse"} | {
            "forward"
            for m in cfg.methods
            if (METHODS[m].steer or {}).get("encoder") == "stage2-forward-kl"
        }
        stage2 = sorted({(s, n, seed, kl) for _, s, n, seed, _ in jobs for kl in kls})
        stage2 = [j for j in stage2 if not _stage2_path(ws, *j).exists()]
        _pool(_stage2_job, ws, stage2, workers, "stage-2 VAEs", progress)
        echo(f"  target demos and stage-2 VAEs ready ({time.perf_counter() - t0:.0f} s)")
        _pool(_run_job, ws, jobs, workers, "fine-tune + evaluate", progress)
        echo(f"  runs finished ({time.perf_counter() - t0:.0f} s)")
    for kind in cfg.policies:  # the sanity check, wherever its policy is at hand
        if ws.path(f"pretrained-{kind}", _PRETRAIN_KEYS).exists():
            check = _source_check(ws, kind)
            rate = check["success_rate"]
            echo(f"  pre-trained {kind} policy on its own robot and tasks: {rate:.0%} success")

"""``ate-fast eval rtc``'s driver: protocols, the job plan (resumable from the output
folder, reusing the benchmark's cache), and the report (success with the benchmark's
statistics, action jumps at chunk switches, sampler latency)."""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ate_fast.align.atomic_io import atomic_write_json
from ate_fast.eval.metaworld.builders import (
    make_stage2,
    pretrained,
    pretrained_policy,
    source_demos,
    stage1,
    target_demos,
)
from ate_fast.eval.metaworld.cache import ResultCache, default_cache_dir
from ate_fast.eval.metaworld.config import CONFIGS, EvalConfig
from ate_fast.eval.metaworld.embodiment import ACTION_DIM
from ate_fast.eval.metaworld.envs import OBS_DIM
from ate_fast.eval.metaworld.pool import run_pool
from ate_fast.eval.metaworld.realtime import RTC_METHODS, TRAINED, realtime_job
from ate_fast.eval.metaworld.realtime_report import plot_realtime, realtime_markdown
from ate_fast.eval.metaworld.runner import check_resumable
from ate_fast.eval.report import write_report
from ate_fast.eval.stats import load_runs, paired_difference
from ate_fast.realtime.latency import strategy_latency
from ate_fast.sampling import FlowSampler


@dataclass(frozen=True)
class RealtimeProtocol:
    """The benchmark config ``base`` (its quick settings: targets, N, fine-tuning,
    sampler) evaluated at each of ``delays`` (control steps; also the training-time RTC
    policy's delays, uniform in 0..max) for ``seeds`` on ``shifts``."""

    base: EvalConfig
    delays: tuple[int, ...] = (0, 1, 2, 4)
    seeds: tuple[int, ...] = (0, 1, 2)
    shifts: tuple[str, ...] = ("linear",)


PROTOCOLS: dict[str, RealtimeProtocol] = {
    "smoke": RealtimeProtocol(CONFIGS["smoke"].with_overrides(name="rtc-smoke"), (0, 2), (0,)),
    # ≈ 20 min on 2 cores once the benchmark's cache holds the pre-trained policy
    "quick": RealtimeProtocol(CONFIGS["quick"].with_overrides(name="rtc-quick", eval_episodes=10)),
    "full": RealtimeProtocol(
        CONFIGS["quick"].with_overrides(name="rtc-full"), shifts=("linear", "warp")
    ),
}


def run_realtime_study(
    protocol: str = "quick",
    out_dir: str | os.PathLike = "results/rtc-quick",
    *,
    workers: int = 2,
    cache_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) ``protocol`` into ``out_dir`` and write its report; returns it."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {list(PROTOCOLS)}, got {protocol!r}")
    if workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    proto = PROTOCOLS[protocol]
    cfg = proto.base.with_overrides(shifts=proto.shifts, seeds=proto.seeds)
    store = ResultCache(cfg, Path(out_dir), Path(cache_dir) if cache_dir else default_cache_dir())
    store.cache.mkdir(parents=True, exist_ok=True)
    store.runs.mkdir(parents=True, exist_ok=True)
    t0, max_delay = time.perf_counter(), max(proto.delays)
    jobs = [
        (trained, shift, seed, proto.delays, max_delay, store.runs)
        for seed in proto.seeds
        for shift in proto.shifts
        for trained in TRAINED
    ]
    expected = len(jobs) // len(TRAINED) * len(RTC_METHODS) * len(proto.delays)
    check_resumable(store)  # runs are skipped by name: only this protocol's may be there
    done = len(list(store.runs.glob("*.json")))
    echo(f"rtc/{protocol}: {expected} runs, {done} done, {workers} workers → {store.out}")
    if done < expected:
        source_demos(store)
        stage1(store)
        pretrained(store, "flow", progress)
        for seed in proto.seeds:
            target_demos(store, seed)
            for shift in proto.shifts:
                make_stage2(store, shift, cfg.demos[0], seed, "reverse")
        echo(
            f"  pre-trained policy, demos and stage-2 VAEs ready ({time.perf_counter() - t0:.0f} s)"
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_pool(realtime_job, store, jobs, workers, "fine-tune + evaluate", progress)
        finally:
            torch.set_num_threads(threads)
    latency_file(
        store.out, lambda: _latency(store, proto), {**store.cfg.to_dict(), "delays": proto.delays}
    )
    paths = write_realtime_report(store.out)
    echo("  report: " + ", ".join(str(p) for p in paths.values()))
    echo(f"  done ({time.perf_counter() - t0:.0f} s)")
    return store.out


def latency_file(out: Path, measure: Callable[[], dict[str, Any]], settings: Any) -> Path:
    """``out/latency.json``: ``measure()`` once for ``settings`` (what sized the measured
    sampler; kept when the file holds the same settings, measured again otherwise)."""
    path = out / "latency.json"
    settings = json.loads(json.dumps(settings, default=list))
    try:
        kept = json.loads(path.read_text()).get("settings") == settings
    except (OSError, ValueError):
        kept = False
    if not kept:
        atomic_write_json(path, {**measure(), "settings": settings})
    return path


def _latency(store: ResultCache, proto: RealtimeProtocol) -> dict[str, Any]:
    """The sampler's per-chunk time per strategy at batch 1 (a robot) and at the
    evaluation's batch, on the pre-trained policy (the cost does not depend on weights)."""
    cfg = store.cfg
    policy, conditioner, _ = pretrained_policy(store, "flow")
    sampler = FlowSampler(policy.eval(), num_steps=cfg.sampler_steps)
    out: dict[str, Any] = {"delay": max(proto.delays), "threads": 1}
    batches = (1, cfg.eval_episodes * len(cfg.target_tasks))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            noise = torch.randn(batch, cfg.horizon, ACTION_DIM, generator=gen)
            with torch.no_grad():
                cond = conditioner(
                    torch.zeros(batch, OBS_DIM), torch.zeros(batch, dtype=torch.long)
                )
            out[f"batch {batch}"] = strategy_latency(
                sampler, noise, cond, execution_horizon=cfg.exec_steps, delay=max(proto.delays)
            )
    finally:
        torch.set_num_threads(threads)
    return out


# ------------------------------------------------------------------------- statistics
def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(key.encode()))


def bootstrap_mean(per_seed: list[np.ndarray], n_boot: int, key: str) -> dict[str, Any]:
    """Mean of per-seed means of episode values (NaN ignored) with a 95 % percentile
    interval from resampling seeds, then episodes within each seed."""
    clean = [v[~np.isnan(v)] for v in per_seed]
    clean = [v for v in clean if len(v)]
    if not clean:
        return {"mean": None, "ci": [None, None], "per_seed": []}
    rng = _rng(key)
    boot = np.empty(n_boot)
    for b in range(n_boot):
        seeds = rng.integers(0, len(clean), len(clean))
        boot[b] = np.mean([rng.choice(clean[s], len(clean[s])).mean() for s in seeds])
    return {
        "mean": float(np.mean([v.mean() for v in clean])),
        "ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "per_seed": [float(v.mean()) for v in clean],
    }


def _episode_jumps(run: dict[str, Any], where: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in run["jumps"][where]], dtype=float)


def jump_summary(runs: list[dict[str, Any]], n_boot: int = 2000) -> list[dict[str, Any]]:
    """Per (group, method): the action jump at switches and elsewhere, and the switch
    jump's paired difference with ``naive`` (episode by episode, same seed)."""
    by_cell: dict[tuple[str, str], dict[int, dict]] = {}
    for r in runs:
        by_cell.setdefault((r["shift"], r["method"]), {})[r["seed"]] = r
    out = []
    for (group, method), seeds in sorted(by_cell.items()):
        naive = by_cell.get((group, "naive"), {})
        entry: dict[str, Any] = {"group": group, "method": method, "delay": _delay(group)}
        for where in ("switch", "other"):
            values = [_episode_jumps(seeds[s], where) for s in sorted(seeds)]
            entry[where] = bootstrap_mean(values, n_boot, f"{group}|{method}|{where}")
        common = sorted(set(seeds) & set(naive))
        if method != "naive" and common:
            diffs = [
                _episode_jumps(seeds[s], "switch") - _episode_jumps(naive[s], "switch")
                for s in common
            ]
            entry["switch_vs_naive"] = bootstrap_mean(diffs, n_boot, f"{group}|{method}|diff")
        lat = [seeds[s]["latency_ms"]["mean"] for s in sorted(seeds)]
        entry["latency_ms"] = float(np.mean(lat))
        out.append(entry)
    return out


def _delay(group: str) -> int:
    return int(group.rsplit("=", 1)[1])


def write_realtime_report(out_dir: str | os.PathLike, title: str = "Meta-World") -> dict[str, Path]:
    """The benchmark's report with ``naive`` as the baseline (summary.md/json, success
    and difference plots), plus ``realtime.json``, ``realtime.md`` (headed ``title``) and
    ``realtime.png``."""
    out = Path(out_dir)
    paths = write_report(out, baseline="naive", method_order=list(RTC_METHODS))
    runs = load_runs(out)
    jumps = jump_summary(runs)
    steer = paired_difference(runs, "rtc+steer", baseline="rtc")
    numbers = {"jumps": jumps, "rtc+steer_vs_rtc": steer}
    paths["realtime_json"] = out / "realtime.json"
    paths["realtime_json"].write_text(json.dumps(numbers, indent=2) + "\n")
    paths["realtime_md"] = out / "realtime.md"
    paths["realtime_md"].write_text(realtime_markdown(out, jumps, steer, title))
    paths["realtime_plot"] = plot_realtime(out, jumps, out / "realtime.png")
    return paths

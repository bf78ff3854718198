"""The demo's report: the results table (deterministic for a seed), the latency table
(measured), and the files written by ``--out``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ate_fast.align.atomic_io import atomic_write_json, atomic_write_text
from ate_fast.demo.embodiment import ROBOT_B
from ate_fast.demo.pipeline import ROWS, DemoResult

RESULTS_FILE, JSON_FILE, LOG_FILE = "demo.md", "demo.json", "align.log"


def _percent(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def results_table(result: DemoResult) -> str:
    """Markdown: the setting, then success / final error / collisions per policy, then the
    paired Steer − direct differences. A function of ``config`` and ``results`` only."""
    cfg, res = result.config, result.results
    data, fin = res["data"], res["finetune"]
    runs = cfg["finetune_runs"]
    lines = [
        f"ate-fast demo (seed {cfg['seed']}{', --quick' if cfg['quick'] else ''}): robot A "
        f"{data['robot_A_episodes']} episodes → robot B ({ROBOT_B.scale:g}·R("
        f"{ROBOT_B.rotation_deg:g}°) velocity frame + gripper slot), "
        f"{data['robot_B_demos']} demos ({data['robot_B_demos_left']} left of the obstacle, "
        f"{data['robot_B_demos'] - data['robot_B_demos_left']} right); fine-tuning "
        f"{cfg['finetune_steps']} steps per arm, "
        f"{runs} run(s); {data['eval_episodes']} evaluation episodes.",
        "",
        "| policy (on robot B unless noted) | success | per fine-tuning run | final error "
        "| collisions |",
        "|---|---:|---|---:|---:|",
    ]
    for key, label in ROWS.items():
        r = res["rollouts"][key]
        per_run = ", ".join(f"{100 * v:.1f}" for v in r["success_per_run"]) if r["runs"] > 1 else ""
        lines.append(
            f"| {label} | {_percent(r['success_rate'])} | {per_run} | {r['final_error']:.3f} | "
            f"{_percent(r['collision_rate'])} |"
        )
    diffs = res["steer_minus_direct"]
    steer = fin["steer"]
    lines += [
        "",
        "ATE steer − direct, success per run (same batches and noise): "
        + ", ".join(f"{100 * d:+.1f}" for d in diffs)
        + f" points (mean {100 * sum(diffs) / len(diffs):+.1f}). One run's binomial s.e. over "
        f"{data['eval_episodes']} episodes is up to "
        f"{50 / data['eval_episodes'] ** 0.5:.1f} points.",
        f"Steer: λ={cfg['steer_scale']:g}, κ={cfg['steer_clamp']:g}, per-sample y; "
        f"{_percent(steer['clamp_fraction'])} of c·g clamped, |λ·g̃|/|target| "
        f"{steer['correction_ratio']:.3f}. Inference guidance: λ={cfg['guidance_scale']:g}, "
        f"κ={cfg['guidance_clamp']:g}, toward the mean stage-2 latent.",
    ]
    return "\n".join(lines)


def latency_table(result: DemoResult) -> str:
    """Markdown: median sampler latency, batch 1 (wall-clock; varies between runs)."""
    cfg, lat = result.config, result.timings["latency"]
    lines = [
        f"| sampler, batch 1, {cfg['flow_steps']} Euler steps, {cfg['device']} | sample() | "
        f"capture() | same output |",
        "|---|---:|---:|---|",
    ]
    labels = {
        "unguided": "unguided",
        "guided": f"LatentGuidance (direct, λ={cfg['guidance_scale']:g})",
    }
    for key, label in labels.items():
        row = lat[key]
        lines.append(
            f"| {label} | {row['eager_ms']:.2f} ms | {row['capture_ms']:.2f} ms | "
            f"{'yes' if row['capture_equals_eager'] else 'NO'} |"
        )
    lines.append(
        f"\nMedian of {cfg['latency_repeats']} calls; total demo wall time "
        f"{result.timings['total_s']:.0f} s (timings vary between runs, nothing else does)."
    )
    return "\n".join(lines)


def render(result: DemoResult) -> str:
    return results_table(result) + "\n\n" + latency_table(result)


def output_names() -> tuple[str, ...]:
    """The files :func:`write_outputs` writes, by name."""
    return (RESULTS_FILE, JSON_FILE, LOG_FILE)


def write_outputs(result: DemoResult, out_dir: Path) -> list[Path]:
    """Write ``demo.md`` (both tables), ``demo.json`` (config, results, timings) and
    ``align.log`` into ``out_dir`` (created if needed); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "config": result.config,
        "results": result.results,
        "timings": result.timings,
    }
    paths = [out_dir / name for name in output_names()]
    atomic_write_text(paths[0], render(result) + "\n")
    atomic_write_json(paths[1], payload)
    atomic_write_text(paths[2], result.log)
    return paths

"""``ate_fast.eval.stats`` and ``ate_fast.eval.report`` on synthetic runs whose answer is
known: significance and sign of large effects, exact zero for identical runs, pairing,
a single seed, determinism, the binomial shortcut against explicit index resampling,
schema errors, and the report files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ate_fast.eval.report import plot_success, summary_markdown, write_report
from ate_fast.eval.stats import (
    bootstrap_difference,
    bootstrap_rate,
    cell_summary,
    load_runs,
    order_methods,
    paired_difference,
    pooled_difference,
)

N_BOOT = 2000


def make_run(
    method: str,
    seed: int,
    tasks: dict[str, Any],
    *,
    policy: str = "flow",
    shift: str = "linear",
    demos: int = 10,
    config: str = "quick",
) -> dict[str, Any]:
    success = {t: [int(v) for v in s] for t, s in tasks.items()}
    episodes = [v for s in success.values() for v in s]
    return {
        "schema": 1,
        "run_id": f"{policy}-{shift}-{demos}-{method}-s{seed}",
        "config": config,
        "method": method,
        "policy": policy,
        "shift": shift,
        "demos": demos,
        "seed": seed,
        "tasks": {t: {"success": s} for t, s in success.items()},
        "success_rate": float(np.mean(episodes)),
        "train": {"steps": 10},
        "seconds": 1.5,
        "machine": "test",
    }


def bernoulli_runs(method: str, p: float, seeds=(0, 1, 2), episodes=100, rng_seed=0, **kw):
    rng = np.random.default_rng(rng_seed)
    return [
        make_run(method, s, {t: rng.random(episodes) < p for t in ("reach", "push")}, **kw)
        for s in seeds
    ]


def only(results: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(results) == 1
    return results[0]


# ----------------------------------------------------------------------------- differences


def test_large_effect_is_significant_with_the_right_sign():
    runs = bernoulli_runs("ate", 0.9, rng_seed=1) + bernoulli_runs("direct", 0.1, rng_seed=2)
    up = only(paired_difference(runs, "ate", "direct", n_boot=N_BOOT))
    assert up["seeds"] == 3 and up["seed_values"] == [0, 1, 2]
    assert 0.7 < up["mean"] < 0.9
    assert up["significant"] and up["ci"][0] > 0.5
    assert up["mean"] == pytest.approx(up["method_mean"] - up["baseline_mean"])
    down = only(paired_difference(runs, "direct", "ate", n_boot=N_BOOT))
    assert down["significant"] and down["ci"][1] < -0.5
    assert down["mean"] == pytest.approx(-up["mean"])


def test_identical_runs_give_exact_zero():
    base = bernoulli_runs("direct", 0.5)
    same = [dict(r, method="copy", run_id=r["run_id"] + "-copy") for r in base]
    d = only(paired_difference(base + same, "copy", n_boot=N_BOOT))
    assert d["mean"] == 0.0
    assert d["per_seed"] == [0.0, 0.0, 0.0]
    assert set(d["per_task"].values()) == {0.0}
    assert d["ci"][0] <= 0.0 <= d["ci"][1]
    assert not d["significant"]


def test_no_effect_is_not_significant():
    runs = bernoulli_runs("ate", 0.5, rng_seed=3) + bernoulli_runs("direct", 0.5, rng_seed=4)
    d = only(paired_difference(runs, "ate", n_boot=N_BOOT))
    assert d["ci"][0] < d["mean"] < d["ci"][1]
    assert abs(d["mean"]) < 0.1


def test_pairing_narrows_the_interval():
    """Success is mostly a shared per-episode component (the layout is easy or hard);
    the methods differ on a few episodes only. Pairing removes the shared noise."""
    rng = np.random.default_rng(5)
    runs = []
    for seed in range(3):
        easy = {t: rng.random(200) < 0.5 for t in ("reach", "push", "pick")}
        flips = {t: rng.random(200) < 0.05 for t in easy}
        runs.append(make_run("direct", seed, easy))
        runs.append(make_run("ate", seed, {t: easy[t] | flips[t] for t in easy}))
    paired = only(paired_difference(runs, "ate", n_boot=N_BOOT))
    unpaired = only(paired_difference(runs, "ate", n_boot=N_BOOT, paired=False))
    assert paired["mean"] == unpaired["mean"] > 0
    width = paired["ci"][1] - paired["ci"][0]
    assert width < 0.5 * (unpaired["ci"][1] - unpaired["ci"][0])
    assert paired["significant"]


def test_only_common_seeds_are_paired():
    runs = bernoulli_runs("ate", 0.6, seeds=(0, 1, 2)) + bernoulli_runs(
        "direct", 0.4, seeds=(1, 2, 3)
    )
    d = only(paired_difference(runs, "ate", n_boot=N_BOOT))
    assert d["seed_values"] == [1, 2] and d["seeds"] == 2
    assert d["dropped_seeds"] == {"method": [0], "baseline": [3]}
    # groups without the baseline or without common seeds give no entry
    other = bernoulli_runs("ate", 0.6, demos=50)
    assert len(paired_difference(runs + other, "ate", n_boot=N_BOOT)) == 1
    disjoint = bernoulli_runs("ate", 0.6, seeds=(7,)) + bernoulli_runs("direct", 0.6, seeds=(8,))
    assert paired_difference(disjoint, "ate", n_boot=N_BOOT) == []


def test_paired_runs_must_share_layouts():
    a = make_run("ate", 0, {"reach": [1, 0, 1]})
    b = make_run("direct", 0, {"reach": [1, 0]})
    with pytest.raises(ValueError, match="episodes"):
        paired_difference([a, b], "ate")
    c = make_run("direct", 0, {"push": [1, 0, 1]})
    with pytest.raises(ValueError, match="task sets"):
        paired_difference([a, c], "ate")


# ----------------------------------------------------------------------------- cells


def test_cell_summary_structure_and_ci_contains_mean():
    runs = bernoulli_runs("ate", 0.7) + bernoulli_runs("direct", 0.3, shift="absolute")
    cells = cell_summary(runs, n_boot=N_BOOT)
    assert [(c["shift"], c["method"]) for c in cells] == [("absolute", "direct"), ("linear", "ate")]
    for c in cells:
        assert c["seeds"] == 3 and c["ci_source"] == "seeds+episodes"
        assert c["ci"][0] < c["mean"] < c["ci"][1]
        assert c["mean"] == pytest.approx(np.mean(c["per_seed"]))
        assert set(c["per_task"]) == {"reach", "push"}
        assert c["episodes"] == 3 * 2 * 100 and c["tasks"] == 2
        assert len(c["run_ids"]) == 3 and c["level"] == 0.95 and c["n_boot"] == N_BOOT
    json.dumps(cells)  # plain JSON types


def test_tasks_weigh_equally_whatever_their_episode_count():
    run = make_run("direct", 0, {"reach": [1] * 10, "push": [0] * 100})
    c = only(cell_summary([run], n_boot=100))
    assert c["mean"] == 0.5
    assert c["per_task"] == {"push": 0.0, "reach": 1.0}


def test_single_seed_uses_episodes_only():
    run = make_run("direct", 4, {"reach": [1, 0] * 50, "push": [1, 1, 0, 0, 0] * 20})
    c = only(cell_summary([run], n_boot=N_BOOT))
    assert c["seeds"] == 1 and c["ci_source"] == "episodes" and c["seed_values"] == [4]
    assert c["mean"] == pytest.approx(0.45)
    assert c["ci"][0] < c["mean"] < c["ci"][1]
    # binomial standard error of the mean of two tasks of 100 episodes: ≈ 0.035
    assert 0.08 < c["ci"][1] - c["ci"][0] < 0.2
    other = make_run("ate", 4, {"reach": [1] * 100, "push": [1] * 100})
    d = only(paired_difference([run, other], "ate", n_boot=N_BOOT))
    assert d["seeds"] == 1 and d["ci_source"] == "episodes" and d["significant"]


def test_seed_variation_widens_the_interval():
    """Two seeds at 0.2 and 0.8 with many episodes: the interval spans the seeds."""
    runs = [
        make_run("direct", 0, {"reach": [1] * 200 + [0] * 800}),
        make_run("direct", 1, {"reach": [1] * 800 + [0] * 200}),
    ]
    c = only(cell_summary(runs, n_boot=N_BOOT))
    assert c["mean"] == pytest.approx(0.5)
    assert c["ci"][0] < 0.25 and c["ci"][1] > 0.75


def test_deterministic_given_seed_and_independent_of_other_runs():
    runs = bernoulli_runs("ate", 0.6) + bernoulli_runs("direct", 0.5, rng_seed=9)
    a = cell_summary(runs, n_boot=N_BOOT, seed=3)
    assert a == cell_summary(runs, n_boot=N_BOOT, seed=3)
    assert a != cell_summary(runs, n_boot=N_BOOT, seed=4)
    more = bernoulli_runs("other", 0.2, rng_seed=11)
    b = cell_summary(more + runs[::-1], n_boot=N_BOOT, seed=3)
    assert [c for c in b if c["method"] != "other"] == a
    d = paired_difference(runs, "ate", n_boot=N_BOOT, seed=3)
    assert d == paired_difference(more + runs[::-1], "ate", n_boot=N_BOOT, seed=3)


def test_run_errors():
    run = make_run("direct", 0, {"reach": [1, 0]})
    with pytest.raises(ValueError, match="seed 0 appears twice"):
        cell_summary([run, dict(run)])
    with pytest.raises(ValueError, match="several configs"):
        cell_summary([run, dict(make_run("direct", 1, {"reach": [1]}), config="full")])
    with pytest.raises(ValueError, match="0/1"):
        cell_summary([dict(run, tasks={"reach": {"success": [0.5, 1]}})])
    with pytest.raises(ValueError, match="success"):
        cell_summary([dict(run, tasks={"reach": {"succ": [1]}})])
    assert (
        only(cell_summary([dict(run, tasks={"reach": {"success": [1.0, False]}})]))["mean"] == 0.5
    )
    with pytest.raises(ValueError, match="'demos'"):
        cell_summary([dict(run, demos="10")])
    with pytest.raises(ValueError, match="n_boot"):
        cell_summary([run], n_boot=0)
    # bools and floats were coerced (seed=1.5 ran as seed 1) or failed deep in NumPy
    for kwargs, error, match in [
        ({"seed": 1.5}, TypeError, "seed must be an int, got float"),
        ({"seed": True}, TypeError, "seed must be an int, got bool"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"n_boot": 100.0}, TypeError, "n_boot must be an int"),
        ({"level": 1.5}, ValueError, r"level must be in \(0, 1\)"),
    ]:
        with pytest.raises(error, match=match):
            cell_summary([run], **kwargs)


# ----------------------------------------------------------------------------- bootstrap


def test_binomial_shortcut_matches_explicit_index_resampling():
    """The count draws have the distribution of resampling seeds, then episode indices."""
    rng = np.random.default_rng(0)
    n_boot = 20000
    success = rng.random((3, 2, 40)) < [[[0.2], [0.7]], [[0.5], [0.9]], [[0.4], [0.1]]]
    other = success ^ (rng.random(success.shape) < 0.2)
    s_idx = rng.integers(0, 3, size=(n_boot, 3))
    e_idx = rng.integers(0, 40, size=(n_boot, 3, 2, 40))
    seeds = s_idx[:, :, None, None]
    tasks = np.arange(2)[None, None, :, None]
    explicit_a = success[seeds, tasks, e_idx].mean(axis=(1, 2, 3))
    explicit_d = (success[seeds, tasks, e_idx] * 1.0 - other[seeds, tasks, e_idx]).mean(
        axis=(1, 2, 3)
    )

    k = success.sum(-1)
    n = np.full((3, 2), 40)
    fast_a = bootstrap_rate(k, n, n_boot, np.random.default_rng(1))
    assert fast_a.mean() == pytest.approx(explicit_a.mean(), abs=2e-3)
    assert fast_a.std() == pytest.approx(explicit_a.std(), rel=0.05)

    only_a = (success & ~other).sum(-1)
    only_b = (other & ~success).sum(-1)
    fast_d = bootstrap_difference(
        k, other.sum(-1), n, n_boot, np.random.default_rng(2), only_a=only_a, only_b=only_b
    )
    assert fast_d.mean() == pytest.approx(explicit_d.mean(), abs=2e-3)
    assert fast_d.std() == pytest.approx(explicit_d.std(), rel=0.05)


def test_bootstrap_chunks_do_not_change_the_result(monkeypatch):
    import ate_fast.eval.stats as stats

    k = np.array([[3, 5], [7, 1]])
    n = np.array([[10, 10], [10, 10]])
    whole = bootstrap_rate(k, n, 500, np.random.default_rng(0))
    monkeypatch.setattr(stats, "_CHUNK_DRAWS", 40)  # 10 replicates per chunk
    chunked = bootstrap_rate(k, n, 500, np.random.default_rng(0))
    assert whole.shape == chunked.shape == (500,)
    assert abs(whole.mean() - chunked.mean()) < 0.02


# ----------------------------------------------------------------------------- files


def write_runs(out: Path, runs: list[dict[str, Any]]) -> None:
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for run in runs:
        (out / "runs" / f"{run['run_id']}.json").write_text(json.dumps(run))


def test_load_runs_names_file_and_key(tmp_path):
    runs = bernoulli_runs("direct", 0.5)
    write_runs(tmp_path, runs)
    assert load_runs(tmp_path) == sorted(runs, key=lambda r: r["run_id"])
    broken = dict(runs[0])
    del broken["method"]
    (tmp_path / "runs" / f"{broken['run_id']}.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=rf"{broken['run_id']}\.json.*'method'"):
        load_runs(tmp_path)
    (tmp_path / "runs" / f"{broken['run_id']}.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_runs(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_runs(tmp_path / "nowhere")


def test_load_runs_checks_run_id(tmp_path):
    run = make_run("direct", 0, {"reach": [1]})
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "other.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"other\.json.*'run_id'"):
        load_runs(tmp_path)


def _two_settings(effect_linear: float, effect_warp: float) -> list[dict[str, Any]]:
    runs = []
    for i, (shift, effect) in enumerate((("linear", effect_linear), ("warp", effect_warp))):
        runs += bernoulli_runs("direct", 0.4, rng_seed=10 + i, shift=shift)
        runs += bernoulli_runs("ate", 0.4 + effect, rng_seed=20 + i, shift=shift)
    return runs


def test_pooled_difference_averages_the_settings():
    runs = _two_settings(0.3, 0.1)
    per = paired_difference(runs, "ate", n_boot=N_BOOT)
    pooled = pooled_difference(runs, "ate", n_boot=N_BOOT)
    assert pooled["groups"] == [("flow", "linear", 10), ("flow", "warp", 10)]
    assert pooled["per_group"] == [d["mean"] for d in per]
    assert pooled["mean"] == pytest.approx(np.mean([d["mean"] for d in per]))
    assert pooled["significant"] and pooled["ci"][0] > 0
    # averaging independent settings narrows the interval below either setting's
    width = pooled["ci"][1] - pooled["ci"][0]
    assert width < min(d["ci"][1] - d["ci"][0] for d in per)
    # one setting alone: exactly that setting's replicates, so its interval
    alone = pooled_difference(runs, "ate", groups=[("flow", "warp", 10)], n_boot=N_BOOT)
    assert alone["ci"] == per[1]["ci"] and alone["mean"] == per[1]["mean"]


def test_pooled_difference_opposite_effects_cancel_and_errors():
    pooled = pooled_difference(_two_settings(0.3, -0.3), "ate", n_boot=N_BOOT)
    assert abs(pooled["mean"]) < 0.1 and not pooled["significant"]
    runs = _two_settings(0.1, 0.1)
    with pytest.raises(ValueError, match=r"groups: .*\('flow', 'absolute', 10\)"):
        pooled_difference(runs, "ate", groups=[("flow", "absolute", 10)], n_boot=N_BOOT)
    assert pooled_difference(runs, "nothing", n_boot=N_BOOT) is None
    # groups as summary.json stores them (lists) are the same groups
    as_tuples = pooled_difference(runs, "ate", groups=[("flow", "warp", 10)], n_boot=N_BOOT)
    as_lists = pooled_difference(runs, "ate", groups=[["flow", "warp", 10]], n_boot=N_BOOT)
    assert as_lists == as_tuples


def test_method_order():
    assert order_methods(["c", "direct", "b", "ate"], ["direct", "ate", "zzz"]) == [
        "direct",
        "ate",
        "b",
        "c",
    ]
    assert order_methods(["b", "a"]) == ["a", "b"]


def test_write_report(tmp_path):
    runs = (
        bernoulli_runs("direct", 0.3)
        + bernoulli_runs("ate", 0.8, rng_seed=1)
        + bernoulli_runs("b|pipe", 0.5, rng_seed=2, seeds=(0,))
        + bernoulli_runs("ate", 0.6, policy="diffusion", rng_seed=3)
    )
    write_runs(tmp_path, runs)
    paths = write_report(tmp_path, n_boot=300, method_order=["direct", "ate"])
    assert set(paths) == {"markdown", "json", "plot", "differences"}
    assert all(p.parent == tmp_path and p.is_file() for p in paths.values())
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["differences"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = paths["markdown"].read_text()
    for method in ("direct", "ate", "b\\|pipe"):
        assert f"| {method} |" in md
    flow = md[md.index("## flow") :]
    assert flow.index("| direct |") < flow.index("| ate |") < flow.index("| b\\|pipe |")
    assert "## diffusion · shift linear · 10 demos" in md
    assert "no `direct` runs in this group" in md  # the diffusion group has no baseline
    assert "one seed (0)" in md
    assert "| reach |" in md and "| push |" in md

    numbers = json.loads(paths["json"].read_text())
    assert numbers["runs"] == len(runs) and numbers["baseline"] == "direct"
    assert len(numbers["cells"]) == 4
    assert {d["method"] for d in numbers["differences"]} == {"ate", "b|pipe"}
    ate = next(d for d in numbers["differences"] if d["method"] == "ate")
    assert ate["significant"] and ate["ci"][0] > 0

    assert md == summary_markdown(runs, n_boot=300, method_order=["direct", "ate"])
    assert "## Overview" not in md  # one group with a baseline: nothing to average
    assert [p["method"] for p in numbers["pooled_differences"]] == ["ate", "b|pipe"]


def test_report_overview_across_settings(tmp_path):
    runs = _two_settings(0.3, 0.3) + bernoulli_runs("x", 0.4, shift="warp", rng_seed=5)
    write_runs(tmp_path, runs)
    md = write_report(tmp_path, n_boot=300, method_order=["direct", "ate"])["markdown"]
    md = md.read_text()
    overview = md[md.index("## Overview") : md.index("## flow")]
    assert "| Setting | ate | x |" in overview
    rows = {line.split(" | ")[0]: line for line in overview.splitlines() if line.startswith("|")}
    assert rows["| flow · linear · N=10"].endswith("| — |")  # x ran in warp only
    assert " * |" in rows["| flow · warp · N=10"]  # ate's large effect is significant
    assert "(2) |" in rows["| mean over settings (how many)"]
    assert "(1) |" in rows["| mean over settings (how many)"]
    png = plot_success(runs, tmp_path / "again.png", n_boot=100)
    assert png.is_file()


def test_no_differences_plot_without_a_baseline(tmp_path):
    write_runs(tmp_path, bernoulli_runs("ate", 0.5) + bernoulli_runs("x", 0.5, rng_seed=1))
    paths = write_report(tmp_path, n_boot=100)
    assert "differences" not in paths and not (tmp_path / "differences.png").exists()


def test_write_report_without_runs(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="no runs"):
        write_report(tmp_path)

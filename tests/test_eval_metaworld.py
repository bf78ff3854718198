"""The Meta-World benchmark: embodiment remaps, layout seeds, expert demos through a
remap, the whole pipeline on the smoke config, and resuming. No success-rate thresholds."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from ate_fast.cli import main as cli_main
from ate_fast.eval.metaworld import CONFIGS, METHODS, SHIFTS, Shift, plan, run_benchmark
from ate_fast.eval.metaworld.embodiment import ACTION_DIM, WORKSPACE_HIGH, WORKSPACE_LOW
from ate_fast.eval.metaworld.envs import (
    HAND,
    STREAMS,
    LockstepEnvs,
    layout_seeds,
    make_env,
    reset_layout,
    task_index,
)
from ate_fast.eval.metaworld.experts import Demonstrations, Episode, chunk_set, collect


# ---------------------------------------------------------------- embodiments
@pytest.mark.parametrize("name", SHIFTS)
def test_remap_round_trip(name):
    rng = np.random.default_rng(0)
    env_actions = rng.uniform(-1, 1, (500, 4))
    hand = rng.uniform(WORKSPACE_LOW + 0.05, WORKSPACE_HIGH - 0.05, (500, 3))
    shift = Shift(name)
    robot = shift.to_robot(env_actions, hand)
    assert robot.shape == (500, ACTION_DIM)
    assert np.all(robot[:, 4:] == 0)  # padding slots
    assert np.all(np.abs(robot[:, :4]) <= 1.0 + 1e-12)  # inside the unified box
    np.testing.assert_allclose(shift.to_env(robot, hand), env_actions, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(shift.mask, [1, 1, 1, 1, 0, 0, 0, 0])


def test_remaps_differ_and_nonlinear_ones_are_nonlinear():
    rng = np.random.default_rng(1)
    a, hand = (
        rng.uniform(-0.4, 0.4, (64, 4)),
        rng.uniform(-0.1, 0.1, (64, 3)) + np.array([0, 0.6, 0.2]),
    )
    maps = {n: Shift(n).to_robot(a, hand) for n in SHIFTS}
    for x in SHIFTS:
        for y in SHIFTS:
            if x < y:
                assert not np.allclose(maps[x], maps[y]), (x, y)
    b = rng.uniform(-0.4, 0.4, (64, 4))
    for name in ("source", "linear", "warp"):
        f = Shift(name).to_robot  # (the hand only matters to "absolute")
        additive = np.allclose(f(a + b, hand) - f(b, hand), f(a, hand) - f(0 * a, hand))
        assert additive == Shift(name).linear, name
    # the gripper's sign is flipped by the linear family, kept by the others
    assert np.allclose(maps["linear"][:, 3], -a[:, 3]) and np.allclose(
        maps["absolute"][:, 3], a[:, 3]
    )
    # absolute: the robot's command depends on where the hand is
    moved = Shift("absolute").to_robot(a, hand + 0.05)
    assert not np.allclose(moved[:, :3], maps["absolute"][:, :3])


def test_remap_errors_name_the_argument():
    with pytest.raises(ValueError, match="shift"):
        Shift("rotated")
    with pytest.raises(ValueError, match="env_action"):
        Shift("linear").to_robot(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="hand"):
        Shift("absolute").to_env(np.zeros((2, ACTION_DIM)), np.zeros((2, 2)))


# ---------------------------------------------------------------- layouts
def test_layout_seed_streams_are_disjoint():
    n_tasks = len(task_index())
    seen: dict[int, tuple] = {}
    for stream in STREAMS:
        for seed in range(5):
            for t in range(n_tasks):
                for s in layout_seeds(stream, seed, t, 1000).tolist():
                    assert s not in seen, (s, seen[s], (stream, seed, t))
                    seen[s] = (stream, seed, t)
    with pytest.raises(ValueError, match="stream"):
        layout_seeds("train", 0, 0, 3)
    with pytest.raises(ValueError, match="count"):
        layout_seeds("eval", 0, 0, 10**6)


def test_layouts_are_reproducible_and_differ_between_streams():
    env = make_env("pick-place-wall-v3")
    idx = task_index()["pick-place-wall-v3"]
    demo, ev = layout_seeds("demo", 0, idx, 3), layout_seeds("eval", 0, idx, 3)
    first = np.stack([reset_layout(env, s) for s in demo])
    again = np.stack([reset_layout(env, s) for s in demo])
    other = np.stack([reset_layout(env, s) for s in ev])
    np.testing.assert_array_equal(first, again)
    # object and goal positions (obs 4:7 and 36:39) differ between layouts
    positions = np.concatenate([first, other])[:, np.r_[4:7, 36:39]]
    assert len({tuple(np.round(p, 6)) for p in positions}) == 6


@pytest.mark.parametrize("name", ["linear", "absolute"])
def test_expert_demos_replay_through_the_remap(name):
    """Demos recorded in the new robot's action space, executed back through its map in
    the lockstep environments, succeed as the expert did (the remap is what the env sees)."""
    task = "reach-v3"
    demos = collect(task, task_index()[task], "demo", 0, 2)
    assert len(demos.episodes) == 2 and demos.failures >= 0
    shift = Shift(name)
    data = chunk_set([demos], task_index(), shift, horizon=4)
    assert data.chunks.shape[1:] == (4, ACTION_DIM) and len(data) == sum(
        len(e.obs) for e in demos.episodes
    )
    envs = LockstepEnvs([task, task], np.array([e.layout for e in demos.episodes]), max_steps=500)
    plans = [shift.to_robot(e.env_actions, e.obs[:, HAND]) for e in demos.episodes]
    for k in range(max(len(p) for p in plans)):
        robot = np.stack([p[min(k, len(p) - 1)] for p in plans])
        envs.step(shift.to_env(robot, envs.obs[:, HAND]))
    assert envs.success.all(), envs.steps


def test_first_demos_count_only_their_own_failures():
    """A run with fewer demos than the collection reports the failed tries before its last
    demo, not the whole collection's (layouts 100..106 tried: 101, 104, 105 failed)."""
    empty = np.zeros((1, 4))
    episodes = [Episode(empty, empty, layout) for layout in (100, 102, 103, 106)]
    demos = Demonstrations("reach-v3", episodes, failures=3)
    assert [demos.first(n).failures for n in (1, 2, 3, 4)] == [0, 1, 1, 3]
    assert [e.layout for e in demos.first(2).episodes] == [100, 102]
    with pytest.raises(ValueError, match=r"count: expected 1\.\.4"):
        demos.first(5)


# ---------------------------------------------------------------- configs
def test_config_validation():
    base = CONFIGS["smoke"]
    with pytest.raises(ValueError, match="target_tasks"):
        base.with_overrides(target_tasks=("reach-v3",))
    with pytest.raises(ValueError, match="methods"):
        base.with_overrides(methods=("ate-v2",))
    with pytest.raises(ValueError, match="shifts"):
        base.with_overrides(shifts=("source",))
    with pytest.raises(ValueError, match="unknown config fields"):
        base.with_overrides(lr=1.0)
    # guided methods reuse the policy of the method they name: one training per policy
    jobs = plan(CONFIGS["quick"])
    trained = {j[-1] for j in jobs}
    assert trained == {"direct", "ate", "ate-batch", "ate-flipped"}
    assert all(METHODS[m].training in trained for m in CONFIGS["quick"].methods)


def test_restricting_the_grid():
    from ate_fast.eval.metaworld.runner import restrict

    cfg = restrict(CONFIGS["full"], {"demos": [20], "seeds": [2, 0], "methods": None})
    assert cfg.demos == (20,) and cfg.seeds == (0, 2) and cfg.methods == CONFIGS["full"].methods
    with pytest.raises(ValueError, match="demos"):
        restrict(CONFIGS["quick"], {"demos": [20]})
    with pytest.raises(ValueError, match="only"):
        restrict(CONFIGS["quick"], {"targets": ["x"]})


def test_cli_lists_configs(capsys):
    assert cli_main(["eval", "metaworld", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CONFIGS)


# ---------------------------------------------------------------- the pipeline
def _runs(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def test_smoke_pipeline_and_resume(tmp_path):
    lines: list[str] = []
    cache, out = tmp_path / "cache", tmp_path / "out"
    run = functools.partial(run_benchmark, workers=1, progress=False, cache_dir=cache)
    run("smoke", out, echo=lines.append)
    runs = _runs(out)
    cfg = CONFIGS["smoke"]
    assert set(runs) == {f"flow-linear-n2-s0-{m}" for m in cfg.methods}
    for result in runs.values():
        assert result["schema"] == 1 and result["config"] == "smoke"
        assert set(result["tasks"]) == set(cfg.target_tasks)
        for task in result["tasks"].values():
            assert len(task["success"]) == cfg.eval_episodes
            assert all(0 < s <= cfg.episode_steps for s in task["steps"])
        assert 0.0 <= result["success_rate"] <= 1.0
        assert result["data"]["episodes"] == {"pick-place-wall-v3": 2}
    assert runs["flow-linear-n2-s0-ate"]["train"]["trained_as"] == "ate"
    assert "clamp_fraction" in runs["flow-linear-n2-s0-ate"]["train"]
    assert runs["flow-linear-n2-s0-direct+guided"]["train"]["trained_as"] == "direct"
    summary = (out / "summary.md").read_text()
    assert all(m in summary for m in cfg.methods)
    assert (out / "success.png").stat().st_size > 0

    # a second call finds everything done and runs nothing
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    lines.clear()
    run("smoke", out, echo=lines.append)
    assert "0 to run" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a lost run is redone (only it), from the cache, with the same result
    lost = out / "runs" / "flow-linear-n2-s0-direct+guided.json"
    before = json.loads(lost.read_text())
    lost.unlink()
    lines.clear()
    run("smoke", out, report=False, echo=lines.append)
    assert "1 to run" in lines[0]
    after = json.loads(lost.read_text())
    assert after["tasks"] == before["tasks"] and after["train"]["loss"] == before["train"]["loss"]
    untouched = out / "runs" / "flow-linear-n2-s0-direct.json"
    assert untouched.stat().st_mtime_ns == stamps[untouched]

    # runs made with other settings are never mixed in
    other = CONFIGS["smoke"].with_overrides(finetune_steps=31)
    with pytest.raises(ValueError, match="finetune_steps"):
        run(other, out, echo=lines.append)

    # another output folder reuses the cache (nothing is retrained) and gets the same runs
    cached = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    lines.clear()
    run("smoke", tmp_path / "out2", only={"methods": ["direct"]}, echo=lines.append)
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == cached
    again = _runs(tmp_path / "out2")
    assert set(again) == {"flow-linear-n2-s0-direct"}
    assert again["flow-linear-n2-s0-direct"]["tasks"] == runs["flow-linear-n2-s0-direct"]["tasks"]
    assert not (out / "cache").exists()


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_policy_kinds_train_with_steer_and_evaluate(kind):
    """Both policy kinds: the plain and the Steer loss train (finite, parameters move),
    and the sampler drives the lockstep evaluation through the remap."""
    import torch

    from ate_fast.eval.metaworld.align_vaes import new_vae
    from ate_fast.eval.metaworld.policy import Conditioner, PolicySpec, make_policy, train_policy
    from ate_fast.eval.metaworld.rollout import evaluate
    from ate_fast.steer import LatentGuidance, Steer

    cfg = CONFIGS["smoke"]
    index = task_index()
    demos = collect("reach-v3", index["reach-v3"], "demo", 1, 1)
    shift = Shift("warp")
    data = chunk_set([demos], index, shift, cfg.horizon)
    torch.manual_seed(0)
    policy = make_policy(PolicySpec(kind, cfg.horizon, 32, 1, len(index)))
    conditioner = Conditioner(len(index), data.obs)
    vae = new_vae(cfg, 3)
    before = [p.detach().clone() for p in policy.parameters()]
    for steer in (None, Steer(vae, scale=-2.0, mask=data.mask)):
        fit = train_policy(
            policy, conditioner, data, kind=kind, steps=4, batch=8, lr=1e-3, seed=0, steer=steer
        )
        assert np.isfinite(fit.loss)
    assert set(fit.steer) == {"grad_norm", "clamp_fraction", "correction_ratio"}
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    guidance = LatentGuidance(vae, torch.zeros(cfg.latent_dim), mask=data.mask)
    layouts = {"reach-v3": layout_seeds("eval", 0, index["reach-v3"], 2)}
    out = evaluate(
        policy, conditioner, kind=kind, shift=shift, layouts=layouts, task_index=index,
        horizon=cfg.horizon, exec_steps=3, max_steps=7, sampler_steps=2, noise_seed=0,
        guidance=guidance,
    )  # fmt: skip
    steps, success = out["reach-v3"]["steps"], out["reach-v3"]["success"]
    assert len(steps) == len(success) == 2
    # an episode runs to max_steps unless it succeeded earlier
    assert all(1 <= n <= 7 and (n == 7 or ok) for n, ok in zip(steps, success))


def test_resume_refuses_another_configs_runs(tmp_path):
    """``ablation`` differs from ``quick`` only in grid fields the settings check ignores:
    resuming it in quick's folder reused quick's runs and failed only at the report, after
    all the training ("configs differ"); now refused up front, naming the config."""
    from ate_fast.eval.metaworld.cache import ResultCache
    from ate_fast.eval.metaworld.config import CONFIGS
    from ate_fast.eval.metaworld.runner import check_resumable

    quick = ResultCache(CONFIGS["quick"], tmp_path, tmp_path / "cache")
    quick.runs.mkdir()
    record = {"config": "quick", "settings": CONFIGS["quick"].to_dict()}
    (quick.runs / "flow-linear-n5-s0-direct.json").write_text(json.dumps(record, default=list))
    check_resumable(quick)  # its own runs: fine
    with pytest.raises(ValueError, match="made by the config 'quick', not 'ablation'"):
        check_resumable(ResultCache(CONFIGS["ablation"], tmp_path, tmp_path / "cache"))
    (quick.runs / "flow-linear-n5-s1-direct.json").write_text('{"config": "qu')  # cut short
    with pytest.raises(ValueError, match=r"s1-direct\.json is no complete run record"):
        check_resumable(quick)

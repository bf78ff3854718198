"""``ate-fast demo``: the --quick run end to end (CLI in a subprocess and in process, the
same numbers twice), the environment and the embodiment maps, and bad options."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ate_fast.cli import main
from ate_fast.demo.config import DemoConfig
from ate_fast.demo.demonstrations import demonstration_chunks
from ate_fast.demo.embodiment import ACTION_DIM, GRIPPER_SLOT, ROBOT_A, ROBOT_B, Embodiment
from ate_fast.demo.pipeline import ROWS, run_demo
from ate_fast.demo.point_mass import (
    DEMO_STREAM,
    EVAL_STREAM,
    GOAL_TOLERANCE,
    MAX_STEP,
    PRETRAIN_STREAM,
    PointMassEnv,
    expert_episode,
    sample_tasks,
)
from ate_fast.demo.report import JSON_FILE, RESULTS_FILE, results_table
from ate_fast.demo.rollout import expert_rollout, policy_rollout

QUICK = ["demo", "--quick", "--no-progress"]


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def _results_part(markdown: str) -> str:
    """The deterministic part of demo.md: everything before the latency table."""
    return markdown.split("| sampler, batch 1")[0]


# --------------------------------------------------------------------------- end to end
def test_quick_demo_via_cli_is_deterministic_across_processes(tmp_path):
    sub_dir, main_dir = tmp_path / "sub", tmp_path / "main"
    proc = subprocess.run(
        [sys.executable, "-m", "ate_fast.cli", *QUICK, "--out", str(sub_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| policy (on robot B unless noted) |" in proc.stdout
    assert "| LatentGuidance (direct" in proc.stdout

    rng_before = torch.get_rng_state()
    code, stdout, _ = _run_cli([*QUICK, "--out", str(main_dir)])
    assert code == 0
    assert torch.equal(torch.get_rng_state(), rng_before), "the demo changed the global RNG"

    sub = json.loads((sub_dir / JSON_FILE).read_text())
    here = json.loads((main_dir / JSON_FILE).read_text())
    assert sub["results"] == here["results"]
    assert sub["config"] == here["config"]
    sub_md, here_md = ((d / RESULTS_FILE).read_text() for d in (sub_dir, main_dir))
    assert _results_part(sub_md) == _results_part(here_md)
    assert _results_part(here_md) in stdout

    res = here["results"]
    assert set(res["rollouts"]) == set(ROWS)
    assert res["rollouts"]["expert"]["success_rate"] == 1.0
    for row in res["rollouts"].values():
        assert 0.0 <= row["success_rate"] <= 1.0
        assert np.isfinite(row["final_error"]) and row["final_error"] >= 0.0
    runs = here["config"]["finetune_runs"]
    assert (
        len(res["steer_minus_direct"]) == runs == len(res["rollouts"]["steer"]["success_per_run"])
    )
    assert 0.0 <= res["finetune"]["steer"]["clamp_fraction"] <= 1.0
    latency = here["timings"]["latency"]
    for row in latency.values():
        assert row["capture_equals_eager"] is True
        assert row["eager_ms"] > 0 and row["capture_ms"] > 0


def test_another_seed_gives_other_numbers_and_the_same_eval_set():
    a = run_demo(DemoConfig.quick_run(seed=0), progress=False, echo=lambda _: None)
    b = run_demo(DemoConfig.quick_run(seed=1), progress=False, echo=lambda _: None)
    assert a.results["pretrain"]["loss"] != b.results["pretrain"]["loss"]
    assert results_table(a) != results_table(b)
    assert a.results["data"]["eval_episodes"] == b.results["data"]["eval_episodes"]
    # the expert row is a function of the (fixed) evaluation tasks only
    assert a.results["rollouts"]["expert"] == b.results["rollouts"]["expert"]


def test_one_demonstration_is_enough_to_run():
    cfg = DemoConfig.quick_run(demos=1, stage2_batch=4096, finetune_runs=1)
    res = run_demo(cfg, progress=False, echo=lambda _: None).results
    assert res["data"]["robot_B_demos"] == 1
    assert res["align"]["stage2_steps"] == cfg.stage2_epochs  # one batch of all the chunks


def test_steer_and_direct_fine_tuning_differ_only_by_the_loss():
    res = run_demo(
        DemoConfig.quick_run(finetune_runs=1), progress=False, echo=lambda _: None
    ).results
    direct, steer = res["finetune"]["direct"], res["finetune"]["steer"]
    assert "clamp_fraction" not in direct and "clamp_fraction" in steer
    assert steer["grad_norm"] > 0.0
    assert direct["loss"] != steer["loss"]


# --------------------------------------------------------------------------- embodiments
@pytest.mark.parametrize("robot", [ROBOT_A, ROBOT_B], ids=["A", "B"])
def test_action_maps_are_inverse(robot: Embodiment):
    rng = np.random.default_rng(0)
    velocity = rng.uniform(-1, 1, size=(5, 7, 2))
    closed = rng.random((5, 7)) < 0.5
    actions = robot.to_actions(velocity, closed)
    assert actions.shape == (5, 7, ACTION_DIM)
    back, shut = robot.from_actions(actions)
    np.testing.assert_allclose(back, velocity, rtol=0, atol=1e-12)
    if robot.has_gripper:
        np.testing.assert_array_equal(shut, closed)
        assert set(np.unique(actions[..., GRIPPER_SLOT])) == {-1.0, 1.0}
        # and the other way round, on actions of the robot's own form
        np.testing.assert_allclose(robot.to_actions(*robot.from_actions(actions)), actions)
    else:
        assert shut is None
        assert np.all(actions[..., GRIPPER_SLOT] == 0.0)  # padding
    np.testing.assert_array_equal(robot.mask, [1, 1, 1 if robot.has_gripper else 0])


def test_robot_b_is_a_real_shift_of_robot_a():
    v = np.array([[1.0, 0.0]])
    a, b = ROBOT_A.to_actions(v)[0, :2], ROBOT_B.to_actions(v)[0, :2]
    assert np.linalg.norm(b) == pytest.approx(0.6)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cos == pytest.approx(np.cos(np.radians(120.0)))
    # A's actions executed by B go somewhere else
    wrong, _ = ROBOT_B.from_actions(ROBOT_A.to_actions(v))
    assert np.linalg.norm(wrong - v) > 1.0


def test_bad_action_shapes_and_scale_are_refused():
    with pytest.raises(ValueError, match="velocity"):
        ROBOT_B.to_actions(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="closed"):
        ROBOT_B.to_actions(np.zeros((4, 2)), np.zeros(5, bool))
    with pytest.raises(ValueError, match="actions"):
        ROBOT_B.from_actions(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="scale"):
        Embodiment("C", scale=0.0)


# --------------------------------------------------------------------------- environment
def test_task_streams_are_disjoint_fixed_and_multimodal():
    demo = sample_tasks(DEMO_STREAM, 0, 20)
    evals = sample_tasks(EVAL_STREAM, 0, 50)
    pre = sample_tasks(PRETRAIN_STREAM, 0, 50)
    for other in (evals, pre):
        d = np.linalg.norm(demo.start[:, None] - other.start[None], axis=-1)
        assert d.min() > 0.0  # no demonstration task reappears
    first = sample_tasks(EVAL_STREAM, 0, 10)
    np.testing.assert_array_equal(first.start, evals.start[:10])  # independent of count
    assert (pre.side > 0).any() and (pre.side < 0).any()
    with pytest.raises(ValueError, match="count"):
        sample_tasks(EVAL_STREAM, 0, 0)


@pytest.mark.parametrize("robot", [ROBOT_A, ROBOT_B], ids=["A", "B"])
def test_the_expert_solves_every_task_without_touching_the_obstacle(robot):
    tasks = sample_tasks(EVAL_STREAM, 0, 60)
    for i in range(len(tasks)):
        ep = expert_episode(tasks, i, idle_steps=2)
        clearance = np.linalg.norm(ep.positions - tasks.center[i], axis=1) - tasks.radius[i]
        assert clearance.min() > 0.05
        assert np.linalg.norm(ep.velocity, axis=1).max() <= 1.0 + 1e-9
        assert ep.closed[-1] and not ep.closed[0]
    result = expert_rollout(tasks, robot, DemoConfig().episode_steps)
    assert result.success.all() and not result.collided.any()
    assert result.final_error.max() < 1e-9


def test_env_rules_clip_collide_and_hold_with_a_closed_gripper():
    tasks = sample_tasks(EVAL_STREAM, 0, 3)
    env = PointMassEnv(tasks)
    start = env.position.copy()
    env.step(np.array([[10.0, 0.0], [np.nan, 1.0], [0.0, 1.0]]), np.array([False, False, True]))
    moved = np.linalg.norm(env.position - start, axis=1)
    np.testing.assert_allclose(moved[0], MAX_STEP)  # clipped to the speed limit
    assert moved[1] == 0.0 and moved[2] == 0.0  # non-finite command; gripper closed
    # straight at the obstacle: every mass collides and then stays put
    for _ in range(60):
        heading = tasks.goal - env.position
        env.step(heading / np.linalg.norm(heading, axis=1, keepdims=True))
    assert env.collided.all()
    frozen = env.position.copy()
    env.step(np.ones((3, 2)))
    np.testing.assert_array_equal(env.position, frozen)
    assert not env.success(needs_gripper=False).any()
    # at the goal, robot B also needs its gripper closed
    env = PointMassEnv(tasks)
    env.position = tasks.goal + 0.5 * GOAL_TOLERANCE
    env.step(np.zeros((3, 2)), np.array([True, False, True]))
    np.testing.assert_array_equal(env.success(needs_gripper=True), [True, False, True])
    assert env.success(needs_gripper=False).all()
    with pytest.raises(ValueError, match="velocity"):
        env.step(np.zeros((2, 2)))


def test_demonstration_chunks_follow_the_expert():
    tasks = sample_tasks(DEMO_STREAM, 0, 2)
    horizon = 5
    data = demonstration_chunks(tasks, ROBOT_B, horizon)
    ep = expert_episode(tasks, 0, idle_steps=horizon)
    n0 = len(ep.velocity)
    assert data.chunks.shape[1:] == (horizon, ACTION_DIM) and data.obs.shape[0] == len(data)
    expected = torch.from_numpy(ROBOT_B.to_actions(ep.velocity[:horizon], ep.closed[:horizon]))
    torch.testing.assert_close(data.chunks[0], expected.float())
    torch.testing.assert_close(data.chunks[1, :-1], data.chunks[0, 1:])  # sliding windows
    torch.testing.assert_close(data.chunks[n0 - 1, 1:], data.chunks[n0 - 1, :1].expand(4, -1))
    torch.testing.assert_close(data.obs[1, :2], torch.from_numpy(ep.positions[1]).float())
    a = demonstration_chunks(tasks, ROBOT_A, horizon)
    assert torch.all(a.chunks[..., GRIPPER_SLOT] == 0) and a.mask.tolist() == [1, 1, 0]
    chunk, mask = a.vae_dataset()[3]
    assert chunk.shape == (horizon, ACTION_DIM) and torch.equal(mask, a.mask)
    # episodes are labelled, so Align's validation split keeps them whole
    assert (data.episode[:n0] == 0).all() and (data.episode[n0:] == 1).all()
    np.testing.assert_array_equal(data.vae_dataset().episode_of_chunk, data.episode)


class _StraightToGoal(nn.Module):
    """A flow 'policy' whose sampler output is exactly the chunk 'robot B heads straight
    for the goal, gripper open': v = (x − a*)/t integrates to a* under Euler."""

    def __init__(self, horizon: int) -> None:
        super().__init__()
        self.horizon = horizon
        self.register_buffer("frame", torch.from_numpy(ROBOT_B.frame).float())

    def forward(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        heading = obs[:, 2:4] / obs[:, 2:4].norm(dim=1, keepdim=True)
        u = heading @ self.frame.T
        a = torch.cat([u, -torch.ones_like(u[:, :1])], dim=1)
        return (x - a[:, None, :].expand_as(x)) / t[:, None, None]


def test_receding_horizon_rollout_executes_the_sampled_chunks():
    tasks = sample_tasks(EVAL_STREAM, 0, 6)
    kw = dict(horizon=4, exec_steps=2, flow_steps=3, device=torch.device("cpu"), noise_seed=0)
    straight = _StraightToGoal(4)
    # B's map executes it as intended: straight into the obstacle on every task
    hit = policy_rollout(straight, tasks, ROBOT_B, episode_steps=60, progress=False, **kw)
    assert hit.collided.all() and not hit.success.any()
    # one replanning period: the mass moved exactly 2 steps toward the goal
    short = policy_rollout(straight, tasks, ROBOT_B, episode_steps=2, progress=False, **kw)
    before = np.linalg.norm(tasks.goal - tasks.start, axis=1)
    np.testing.assert_allclose(before - short.final_error, 2 * MAX_STEP, atol=1e-5)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--seed", "-1"], "--seed"),
        (["--seed", "zero"], "--seed"),
        (["--device", "tpu"], "--device"),
        (["--demos", "0"], "--demos"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_options_fail_with_a_message_naming_them(argv, needle):
    code, _, err = _run_cli(["demo", *argv])
    assert code == 2
    assert needle in err


def test_out_must_be_a_directory(tmp_path):
    a_file = tmp_path / "table.md"
    a_file.write_text("x")
    code, _, err = _run_cli([*QUICK, "--out", str(a_file)])
    assert code == 2 and "--out" in err and "not a directory" in err


def test_a_device_that_is_not_there_is_refused_before_any_work():
    code, out, err = _run_cli([*QUICK, "--device", "cuda:99"])
    assert code == 2
    assert "--device cuda:99" in err
    assert "[1/6]" not in out


def test_help_lists_the_options():
    code, out, _ = _run_cli(["demo", "--help"])
    assert code == 0
    for option in ("--seed", "--quick", "--out", "--overwrite", "--device", "--demos"):
        assert option in out


def test_the_quick_config_is_small_and_the_default_is_the_documented_one():
    quick, full = DemoConfig.quick_run(), DemoConfig()
    assert quick.quick and not full.quick
    assert quick.pretrain_steps < full.pretrain_steps and quick.eval_episodes < full.eval_episodes
    assert (full.steer_scale, full.steer_clamp) == (2.0, 0.1)  # the paper's λ, κ


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"demos": 0}, "demos"),
        ({"seed": -1}, "seed"),
        ({"exec_steps": 9}, "exec_steps"),
        ({"finetune_runs": 11}, "finetune_runs"),
        ({"prior": "vamp"}, "prior"),
    ],
)
def test_bad_configs_name_the_field(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        DemoConfig(**overrides)
    seeds = {DemoConfig(seed=s).seed_for(p) for s in range(3) for p in range(100)}
    assert len(seeds) == 300  # every stream of every run has its own seed


def test_an_earlier_runs_results_are_kept_unless_overwrite(tmp_path, capsys, monkeypatch):
    """``--out`` holding an earlier run's demo.json: refused before the run (it was replaced
    without a word); ``--overwrite`` runs and replaces it."""
    import ate_fast.demo.pipeline as pipeline
    import ate_fast.demo.report as report

    ran = []
    monkeypatch.setattr(pipeline, "run_demo", lambda cfg, **kw: ran.append(cfg) or "result")
    monkeypatch.setattr(report, "render", lambda result: "rendered")
    monkeypatch.setattr(
        report, "write_outputs", lambda result, out: [(out / JSON_FILE).write_text("new")]
    )
    (tmp_path / JSON_FILE).write_text("earlier")
    argv = ["demo", "--quick", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 2 and not ran
    assert f"--out {tmp_path}: holds an earlier run's {JSON_FILE}" in capsys.readouterr().err
    assert (tmp_path / JSON_FILE).read_text() == "earlier"
    assert main([*argv, "--overwrite"]) == 0 and len(ran) == 1
    assert (tmp_path / JSON_FILE).read_text() == "new"


def test_an_unwritable_out_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    """``--out`` under a file: refused before the demo runs (it failed after the whole run,
    and the results were lost)."""
    import ate_fast.demo.pipeline as pipeline

    def never(*args, **kwargs):
        raise AssertionError("the demo ran")

    monkeypatch.setattr(pipeline, "run_demo", never)
    (tmp_path / "a-file").write_text("")
    out = str(tmp_path / "a-file" / "sub")
    assert main(["demo", "--quick", "--no-progress", "--out", out]) == 2
    assert f"--out {out}: cannot write there" in capsys.readouterr().err

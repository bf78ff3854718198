"""The demo's world: a planar point mass that reaches a goal around a round obstacle.

Every task puts the obstacle on the straight line from start to goal, so the expert goes
around it on the left or on the right (chosen at random per episode): the demonstrations
are multi-modal. Everything here is NumPy, batched over episodes, and deterministic:

* :func:`sample_tasks` — task ``i`` of a stream is drawn from its own generator seeded with
  ``(stream, seed, i)``, so the pre-training, demonstration and evaluation episodes come
  from disjoint seeds and a set of tasks does not depend on how many are drawn.
* :func:`expert_episode` — the expert's plan for one task: constant speed along a
  quadratic Bézier curve that clears the obstacle, then it stops and closes its gripper.
* :class:`PointMassEnv` — the batched environment (positions, collisions, success).

Units: the arena is ``[-ARENA, ARENA]²``; a step moves the mass by at most ``MAX_STEP``.
Velocities are given in units of ``MAX_STEP`` (norm ≤ 1; larger commands are clipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

ARENA = 1.2
MAX_STEP = 0.05
GOAL_TOLERANCE = 0.06
CLEARANCE = 0.2  # how far outside the obstacle the expert's path passes at its widest
OBS_DIM = 7  # position (2), goal − position (2), obstacle centre − position (2), radius (1)

PRETRAIN_STREAM, DEMO_STREAM, EVAL_STREAM = 0, 1, 2


@dataclass(frozen=True)
class Tasks:
    """A batch of ``N`` tasks (arrays with the episode on the first axis).

    ``start``, ``goal``, ``center``: ``[N, 2]``; ``radius``: ``[N]`` (the obstacle);
    ``side``: ``[N]`` ±1, the way the expert goes round (+1: left of start → goal);
    ``speed``: ``[N]`` the expert's speed as a fraction of ``MAX_STEP``.
    """

    start: np.ndarray
    goal: np.ndarray
    center: np.ndarray
    radius: np.ndarray
    side: np.ndarray
    speed: np.ndarray

    def __len__(self) -> int:
        return int(self.start.shape[0])


def _one_task(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    start = np.array([rng.uniform(-0.9, -0.6), rng.uniform(-0.5, 0.5)])
    goal = np.array([rng.uniform(0.6, 0.9), rng.uniform(-0.5, 0.5)])
    radius = rng.uniform(0.15, 0.3)
    side = 1.0 if rng.random() < 0.5 else -1.0
    speed = rng.uniform(0.8, 1.0)
    return start, goal, 0.5 * (start + goal), radius, side, speed


def sample_tasks(stream: int, seed: int, count: int) -> Tasks:
    """``count`` tasks of ``stream`` (``PRETRAIN_STREAM``, ``DEMO_STREAM``, ``EVAL_STREAM``).

    Task ``i`` comes from ``np.random.default_rng((stream, seed, i))``.
    """
    if count < 1:
        raise ValueError(f"count: expected >= 1 tasks, got {count}")
    rows = [_one_task(np.random.default_rng((stream, seed, i))) for i in range(count)]
    start, goal, center, radius, side, speed = (np.array(col) for col in zip(*rows))
    return Tasks(start, goal, center, radius, side, speed)


def _bezier_path(task: Tasks, i: int, samples: int = 2001) -> np.ndarray:
    """Dense points ``[samples, 2]`` of the expert's curve for task ``i``.

    A quadratic Bézier from start to goal whose control point sits ``2·(r + CLEARANCE)``
    to the ``side`` of the midpoint, so the curve passes ``r + CLEARANCE`` from the
    obstacle's centre at its middle and (the start and goal being far away) never closer.
    """
    start, goal = task.start[i], task.goal[i]
    chord = goal - start
    normal = np.array([-chord[1], chord[0]]) / np.linalg.norm(chord)
    control = task.center[i] + 2.0 * task.side[i] * (task.radius[i] + CLEARANCE) * normal
    u = np.linspace(0.0, 1.0, samples)[:, None]
    return (1 - u) ** 2 * start + 2 * u * (1 - u) * control + u**2 * goal


@dataclass(frozen=True)
class ExpertEpisode:
    """One demonstration: ``positions [L+1, 2]``, ``velocity [L, 2]`` (units of
    ``MAX_STEP``), ``closed [L]`` (gripper command: True once the goal is reached)."""

    positions: np.ndarray
    velocity: np.ndarray
    closed: np.ndarray


def expert_episode(tasks: Tasks, i: int, idle_steps: int) -> ExpertEpisode:
    """The expert's plan for task ``i``: constant speed along its curve, then
    ``idle_steps`` steps at rest at the goal with the gripper closed."""
    path = _bezier_path(tasks, i)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    step = tasks.speed[i] * MAX_STEP
    moving = int(np.ceil(arc[-1] / step))
    s = np.minimum(np.arange(moving + 1 + idle_steps) * step, arc[-1])
    positions = np.stack([np.interp(s, arc, path[:, 0]), np.interp(s, arc, path[:, 1])], axis=1)
    positions[moving:] = tasks.goal[i]
    velocity = np.diff(positions, axis=0) / MAX_STEP
    closed = np.arange(len(velocity)) >= moving
    return ExpertEpisode(positions, velocity, closed)


def observe(position: np.ndarray, goal: np.ndarray, center: np.ndarray, radius) -> np.ndarray:
    """``[N, OBS_DIM]`` observations: position, goal − position, centre − position, radius.

    ``position [N, 2]``; ``goal``/``center`` ``[N, 2]`` or ``[2]``; ``radius`` ``[N]`` or scalar.
    """
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), position.shape[:1])
    return np.concatenate([position, goal - position, center - position, radius[:, None]], axis=1)


class PointMassEnv:
    """``N`` point masses, one per task, stepped together.

    ``step(velocity [N, 2], closed [N] or None)``: each mass moves by
    ``MAX_STEP · velocity`` (the command's norm clipped to 1; a command with a non-finite
    element counts as 0) unless its gripper is closed, which holds it still; positions stay
    inside the arena. A mass whose position enters its obstacle has collided and stops for good.
    """

    def __init__(self, tasks: Tasks) -> None:
        self.tasks = tasks
        self.position = tasks.start.astype(np.float64).copy()
        self.collided = np.zeros(len(tasks), dtype=bool)
        self.closed = np.zeros(len(tasks), dtype=bool)

    def observe(self) -> np.ndarray:
        """``[N, OBS_DIM]``: position, goal − position, centre − position, radius."""
        t = self.tasks
        return observe(self.position, t.goal, t.center, t.radius)

    def step(self, velocity: np.ndarray, closed: Optional[np.ndarray] = None) -> None:
        n = len(self.tasks)
        if velocity.shape != (n, 2):
            raise ValueError(f"velocity: expected [N, 2]=[{n}, 2], got {velocity.shape}")
        finite = np.isfinite(velocity).all(axis=1, keepdims=True)
        v = np.where(finite, velocity, 0.0)
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        v = v / np.maximum(norm, 1.0)
        self.closed = np.zeros(n, dtype=bool) if closed is None else np.asarray(closed, bool)
        move = np.where(self.closed[:, None], 0.0, v * MAX_STEP)
        new = np.clip(self.position + move, -ARENA, ARENA)
        active = ~self.collided
        self.position[active] = new[active]
        inside = np.linalg.norm(self.position - self.tasks.center, axis=1) < self.tasks.radius
        self.collided |= inside

    def final_error(self) -> np.ndarray:
        """``[N]`` distance from each mass to its goal."""
        return np.linalg.norm(self.position - self.tasks.goal, axis=1)

    def success(self, needs_gripper: bool) -> np.ndarray:
        """``[N]`` bool: within ``GOAL_TOLERANCE`` of the goal, no collision, and (for a
        robot with a gripper) the gripper closed at the end."""
        ok = (self.final_error() < GOAL_TOLERANCE) & ~self.collided
        return ok & self.closed if needs_gripper else ok

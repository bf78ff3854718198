"""Demonstrations from Meta-World's scripted experts (``metaworld.policies``), recorded in
a robot's action space and cut into (observation, action chunk) training pairs.

Scripted experts fail a few percent of episodes: only successful episodes are kept, and
layouts are tried in order until ``count`` successes (or ``3·count + 10`` tries); the
number of failures is reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ate_fast.adaptation.chunks import ChunkData, chunk_windows
from ate_fast.eval.metaworld.embodiment import Shift
from ate_fast.eval.metaworld.envs import (
    HAND,
    MAX_EPISODE_STEPS,
    layout_seeds,
    make_env,
    reset_layout,
)


@dataclass
class Episode:
    """One successful expert episode: ``obs [L, 39]`` before each step, ``env_actions
    [L, 4]`` (clipped to [−1, 1], as executed), ``layout`` its layout seed."""

    obs: np.ndarray
    env_actions: np.ndarray
    layout: int


@dataclass
class Demonstrations:
    """A task's expert episodes and how many tries failed."""

    task: str
    episodes: list[Episode]
    failures: int = 0

    def first(self, count: int) -> Demonstrations:
        """The first ``count`` episodes, with the failures among the tries before the
        ``count``-th success (not the whole collection's): :func:`collect` tries consecutive
        layout seeds and stops at its last success, so the tries' first seed is
        ``episodes[-1].layout + 1 - len(episodes) - failures``."""
        if not 1 <= count <= len(self.episodes):
            raise ValueError(f"count: expected 1..{len(self.episodes)} episodes, got {count}")
        start = self.episodes[-1].layout + 1 - len(self.episodes) - self.failures
        failures = self.episodes[count - 1].layout - start + 1 - count
        return Demonstrations(self.task, self.episodes[:count], failures)


def expert_episode(env, policy, layout: int, max_steps: int = MAX_EPISODE_STEPS) -> Episode | None:
    """Run the scripted ``policy`` from layout ``layout``; the episode (up to and including
    the step that succeeded) or None if it did not succeed within ``max_steps``."""
    obs = reset_layout(env, layout)
    seen, actions = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experts warn that their gains saturate
        for _ in range(max_steps):
            action = np.clip(policy.get_action(obs), -1.0, 1.0)
            seen.append(obs)
            actions.append(action)
            obs, _, _, _, info = env.step(action.astype(np.float32))
            if info["success"]:
                return Episode(np.stack(seen), np.stack(actions), int(layout))
    return None


def collect(task: str, task_index: int, stream: str, seed: int, count: int) -> Demonstrations:
    """``count`` successful expert episodes of ``task`` on layouts of ``stream``/``seed``."""
    from metaworld.policies import ENV_POLICY_MAP

    env, policy = make_env(task), ENV_POLICY_MAP[task]()
    tries = 3 * count + 10
    episodes, failures = [], 0
    for layout in layout_seeds(stream, seed, task_index, tries):
        if len(episodes) == count:
            break
        ep = expert_episode(env, policy, int(layout))
        if ep is None:
            failures += 1
        else:
            episodes.append(ep)
    if len(episodes) < count:
        raise RuntimeError(
            f"the scripted expert of {task} succeeded on only {len(episodes)} of {tries} layouts "
            f"({count} needed)"
        )
    return Demonstrations(task, episodes, failures)


@dataclass
class ChunkSet(ChunkData):
    """Training pairs of several tasks in one robot's action space: ``obs [M, 39]``,
    ``chunks [M, H, ACTION_DIM]``, ``mask [ACTION_DIM]``, ``episode [M]`` (a global episode
    id per chunk) as in :class:`~ate_fast.adaptation.ChunkData`, and ``task [M]`` (index
    into the benchmark's task list); ``stats``: episodes and expert failures per task."""

    task: Tensor
    stats: dict = field(default_factory=dict)


def chunk_set(
    demos: list[Demonstrations], task_index: dict[str, int], shift: Shift, horizon: int
) -> ChunkSet:
    """Every step of every episode in ``demos`` as a (observation, chunk) pair, the actions
    mapped into ``shift``'s robot action space (at the hand position of each step)."""
    obs, task, chunks, episode = [], [], [], []
    eid = 0
    for d in demos:
        for ep in d.episodes:
            actions = shift.to_robot(ep.env_actions, ep.obs[:, HAND])  # [L, ACTION_DIM]
            length = len(actions)
            chunks.append(chunk_windows(actions, horizon))
            obs.append(ep.obs)
            task.append(np.full(length, task_index[d.task]))
            episode.append(np.full(length, eid))
            eid += 1
    return ChunkSet(
        obs=torch.from_numpy(np.concatenate(obs)).float(),
        task=torch.from_numpy(np.concatenate(task)).long(),
        chunks=torch.from_numpy(np.concatenate(chunks)).float(),
        mask=torch.from_numpy(shift.mask),
        episode=np.concatenate(episode),
        episodes=eid,
        stats={
            "episodes": {d.task: len(d.episodes) for d in demos},
            "expert_failures": {d.task: d.failures for d in demos},
            "mean_length": float(np.mean([len(e.obs) for d in demos for e in d.episodes])),
        },
    )

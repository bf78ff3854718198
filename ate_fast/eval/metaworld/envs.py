"""Meta-World v3 tasks with seeded layouts, and many episodes stepped in lockstep.

``gym.make("Meta-World/MT1", ...)`` cycles through 50 fixed layouts per task; here every
episode's layout (object and goal positions) comes from its own integer *layout seed*
instead: the task's environment is built once, its random reset is switched on
(``_freeze_rand_vec = False``, sampled from the environment's own seeded generator), and
``env.seed(layout_seed)`` before a reset fixes the layout. Layout seeds are drawn from
disjoint integer ranges per stream (pre-training demos, target demos, evaluation), so
demonstrations and evaluation never share a layout seed.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

import numpy as np

OBS_DIM = 39
HAND = slice(0, 3)  # the hand position (metres) in Meta-World's observation
MAX_EPISODE_STEPS = 500  # Meta-World's max_path_length

# layout-seed streams: disjoint integer ranges (base + seed·STREAM_STRIDE + index)
STREAMS = {"eval": 0, "pretrain": 10**8, "demo": 2 * 10**8}
STREAM_STRIDE = 10**5
MAX_LAYOUTS = STREAM_STRIDE  # episodes per (stream, seed, task)


def _metaworld() -> Any:
    try:
        import metaworld
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError(
            "the Meta-World benchmark needs the [eval] extra: pip install 'ate_fast[eval]' "
            f"(metaworld, mujoco); import failed: {exc}"
        ) from exc
    return metaworld


def task_names() -> list[str]:
    """All Meta-World v3 task names (``"pick-place-wall-v3"``, ...)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    _metaworld()
    return sorted(ALL_V3_ENVIRONMENTS)


def task_index() -> dict[str, int]:
    """Task name → one-hot slot: every Meta-World v3 task, sorted (so a pre-trained policy
    is the same whatever the benchmark's targets)."""
    return {name: i for i, name in enumerate(task_names())}


def check_task(name: str) -> str:
    names = task_names()
    if name not in names:
        raise ValueError(
            f"task: expected a Meta-World v3 task name such as {names[0]!r}, got {name!r}"
        )
    return name


def layout_seeds(stream: str, seed: int, task_index: int, count: int) -> np.ndarray:
    """``count`` layout seeds ``[count]`` int64 of ``stream`` for run ``seed`` and the
    task at ``task_index`` (position in the benchmark's task list)."""
    if stream not in STREAMS:
        raise ValueError(f"stream: expected one of {list(STREAMS)}, got {stream!r}")
    if not 0 <= count <= MAX_LAYOUTS // 64:
        raise ValueError(f"count: expected 0..{MAX_LAYOUTS // 64} layouts, got {count}")
    if seed < 0 or seed >= (STREAMS["pretrain"] // STREAM_STRIDE):
        raise ValueError(
            f"seed: expected 0..{STREAMS['pretrain'] // STREAM_STRIDE - 1}, got {seed}"
        )
    start = STREAMS[stream] + seed * STREAM_STRIDE + task_index * (MAX_LAYOUTS // 64)
    return np.arange(start, start + count, dtype=np.int64)


@cache
def _benchmark(name: str) -> Any:
    metaworld = _metaworld()
    return metaworld.MT1(name, seed=0)


def make_env(name: str) -> Any:
    """The raw (unwrapped) Meta-World environment of task ``name``, with layouts drawn
    from its own generator on every reset (seed it with ``env.seed(layout_seed)``)."""
    check_task(name)
    bench = _benchmark(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = bench.train_classes[name]()
        env.set_task(bench.train_tasks[0])
    env._freeze_rand_vec = False  # a fresh layout at every reset ...
    env.seeded_rand_vec = True  # ... drawn from env.np_random, which env.seed() sets
    return env


_POOL: dict[str, list[Any]] = {}


def _pooled_env(name: str, index: int) -> Any:
    pool = _POOL.setdefault(name, [])
    while len(pool) <= index:
        pool.append(make_env(name))
    return pool[index]


def reset_layout(env: Any, layout_seed: int) -> np.ndarray:
    """Reset ``env`` to the layout of ``layout_seed``; the first observation ``[39]``."""
    env.seed(int(layout_seed))
    obs, _ = env.reset()
    return np.asarray(obs, dtype=np.float64)


class LockstepEnvs:
    """Episodes of several tasks stepped together: ``tasks[i]``'s environment reset to
    ``layouts[i]``. An episode ends at its first success (Meta-World's ``info["success"]``)
    or after ``max_steps`` steps; finished episodes are not stepped again.

    ``obs [N, 39]`` (the last observation of each episode), ``success [N]`` bool,
    ``steps [N]`` int, ``done [N]`` bool.
    """

    def __init__(self, tasks: list[str], layouts: np.ndarray, max_steps: int) -> None:
        if len(tasks) != len(layouts):
            raise ValueError(
                f"layouts: expected {len(tasks)} (one per task entry), got {len(layouts)}"
            )
        if not 1 <= max_steps <= MAX_EPISODE_STEPS:
            raise ValueError(f"max_steps: expected 1..{MAX_EPISODE_STEPS}, got {max_steps}")
        self.max_steps = max_steps
        # one environment per episode (mujoco state is per instance), reused across
        # evaluations in this process: building one costs ~0.1 s
        taken: dict[str, int] = {}
        self.envs = []
        for t in tasks:
            self.envs.append(_pooled_env(t, taken.get(t, 0)))
            taken[t] = taken.get(t, 0) + 1
        self.obs = np.stack([reset_layout(e, s) for e, s in zip(self.envs, layouts)])
        n = len(tasks)
        self.success = np.zeros(n, bool)
        self.steps = np.zeros(n, np.int64)
        self.done = np.zeros(n, bool)

    def step(self, env_actions: np.ndarray) -> None:
        """Apply ``env_actions [N, 4]`` (clipped to [−1, 1]) to the running episodes."""
        actions = np.clip(env_actions, -1.0, 1.0).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in np.flatnonzero(~self.done):
                obs, _, _, _, info = self.envs[i].step(actions[i])
                self.obs[i] = obs
                self.steps[i] += 1
                if info["success"]:
                    self.success[i] = self.done[i] = True
                elif self.steps[i] >= self.max_steps:
                    self.done[i] = True

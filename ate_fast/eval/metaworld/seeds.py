"""The benchmark's random streams: every seed is derived from names and numbers (stable
across processes and Python versions), and evaluation layouts are one fixed set."""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import numpy as np

from ate_fast.eval.metaworld.config import EvalConfig
from ate_fast.eval.metaworld.envs import layout_seeds, task_index

EVAL_LAYOUT_SEED = 0  # one fixed evaluation set per task, whatever the run's seed


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") >> 1


def eval_layouts(
    cfg: EvalConfig, tasks: Optional[tuple[str, ...]] = None, count: int = 0
) -> dict[str, np.ndarray]:
    """Evaluation layout seeds ``{task: [count]}`` of ``tasks`` (default: the config's
    targets; ``count`` default: ``cfg.eval_episodes``)."""
    index, count = task_index(), count or cfg.eval_episodes
    tasks = tasks or cfg.target_tasks
    return {t: layout_seeds("eval", EVAL_LAYOUT_SEED, index[t], count) for t in tasks}

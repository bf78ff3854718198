"""How many worker processes the machine's memory allows."""

from __future__ import annotations

import os

from ate_fast.eval.metaworld.config import EvalConfig

ENV_MEMORY_MB = 40  # one Meta-World environment (~30 MB measured) plus headroom


def default_workers(cfg: EvalConfig) -> int:
    """CPU count, at most 4, and no more than 80 % of the available memory allows: every
    evaluation episode of a run has its own environment (all step in lockstep)."""
    per_worker_mb = 1500 + ENV_MEMORY_MB * cfg.eval_episodes * len(cfg.target_tasks)
    available_mb = available_memory_mb()
    by_memory = int(0.8 * available_mb // per_worker_mb) if available_mb else 4
    return max(1, min(4, os.cpu_count() or 1, by_memory))


def available_memory_mb() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in MB; 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0

"""Real-time chunking's soft mask over the new chunk (Black, Galliker, Levine, 2025, eq. 5).

With chunk length H, execution horizon s and inference delay d (0 ≤ d ≤ H − s), the
previous chunk overlaps the new one on its first H − s steps. The mask W [H] weighs how
strongly step i is pulled toward the previous chunk:

==========  =============  ============================  ==========
schedule    i < d          d ≤ i < H − s                 i ≥ H − s
==========  =============  ============================  ==========
exp         1              c_i·(e^{c_i} − 1)/(e − 1)     0
linear      1              c_i                           0
ones        1              1                             0
zeros       1              0                             0
==========  =============  ============================  ==========

with ``c_i = (H − s − i)/(H − s − d + 1)`` (in (0, 1) on the middle range). ``exp`` is
the paper's; the four names are those of Kinetix's and LeRobot's ``get_prefix_weights``
(whose ``end`` is our H − s). The first d actions are executed while the new chunk is
computed, so they are committed (W = 1); the last s are new (W = 0).
"""

from __future__ import annotations

import math

import numpy as np

from ate_fast.argument_checks import check_choice, check_int

PREFIX_SCHEDULES = ("exp", "linear", "ones", "zeros")


def check_schedule(schedule: object) -> str:
    return check_choice("prefix_schedule", schedule, PREFIX_SCHEDULES)  # type: ignore[return-value]


def prefix_weights(horizon: int, delay: int, execution_horizon: int, schedule: str = "exp"):
    """W [H] float64 for chunk length ``horizon`` H, inference delay ``delay`` d and
    execution horizon ``execution_horizon`` s (1 ≤ s < H, 0 ≤ d ≤ H − s)."""
    horizon = check_int("horizon", horizon, 2, 1 << 20)
    s = check_int("execution_horizon", execution_horizon, 1, horizon - 1, f" (horizon {horizon})")
    end = horizon - s
    d = check_int("delay", delay, 0, end, f" (horizon − execution_horizon = {horizon} − {s})")
    check_schedule(schedule)
    i = np.arange(horizon, dtype=np.float64)
    middle = (i >= d) & (i < end)
    c = (end - i) / (end - d + 1)
    if schedule == "exp":
        ramp = c * np.expm1(c) / (math.e - 1.0)
    elif schedule == "linear":
        ramp = c
    else:
        ramp = np.full(horizon, 1.0 if schedule == "ones" else 0.0)
    return np.where(i < d, 1.0, np.where(middle, ramp, 0.0))


def prefix_weight_table(horizon: int, execution_horizon: int, schedule: str = "exp"):
    """``[H − s + 1, H]`` float64: row d is :func:`prefix_weights` for delay d, so that a
    delay picks its mask with one device-side index (no host work per control tick)."""
    end = horizon - check_int(
        "execution_horizon", execution_horizon, 1, max(horizon - 1, 1), f" (horizon {horizon})"
    )
    return np.stack(
        [prefix_weights(horizon, d, execution_horizon, schedule) for d in range(end + 1)]
    )

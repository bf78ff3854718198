"""examples/lerobot_ate.py runs end to end (datasets → align → LeRobot training with and
without Steer → patched, captured sampling), at a tiny size."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path


def test_example_runs(tmp_path):
    path = Path(__file__).resolve().parents[1] / "examples" / "lerobot_ate.py"
    spec = importlib.util.spec_from_file_location("lerobot_ate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.run(tmp_path, steps=4, epochs=1, seed=0)
    assert set(results) == {"direct", "steer"}
    assert all(math.isfinite(v) and v > 0 for v in results.values())
    assert (tmp_path / "vae2" / "config.json").is_file()

"""examples/steer_recipe.py runs as written (a few steps) and trains."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "steer_recipe.py"


def test_recipe_runs():
    spec = importlib.util.spec_from_file_location("steer_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    history = recipe.main(steps=3, verbose=False)
    assert len(history["flow"]) == 3 and len(history["diffusion"]) == 3
    assert all(math.isfinite(v) for v in history["flow"] + history["diffusion"])
    assert history["sample_finite"] == [1.0]

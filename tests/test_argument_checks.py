"""ate_fast.argument_checks: the scalar checks every layer shares. Each refusal names the
argument; a bool is no int, a float is no int choice, NumPy scalars are the numbers they hold,
NaN is never a float the package takes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ate_fast.argument_checks import check_choice, check_float, check_int, env_choice, is_int
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError


def test_check_int():
    assert check_int("n", 3, 1, 5) == 3
    out = check_int("n", np.int64(4), 1)
    assert out == 4 and type(out) is int
    assert check_int("n", -7) == -7  # no bounds
    for bad in (True, np.bool_(True), 2.0, "3", None):
        with pytest.raises(ArgumentTypeError, match="n must be an int, got"):
            check_int("n", bad, 0, 10)
    with pytest.raises(InvalidArgumentError, match=r"n must be in \[1, 5\] \(why\), got 6"):
        check_int("n", 6, 1, 5, " (why)")
    with pytest.raises(InvalidArgumentError, match="n must be >= 1, got 0"):
        check_int("n", 0, 1)
    with pytest.raises(InvalidArgumentError, match="n must be <= 2, got 3"):
        check_int("n", 3, None, 2)
    assert not is_int(True) and is_int(np.uint8(1)) and not is_int(1.0)


def test_check_choice():
    assert check_choice("mode", "a", ("a", "b")) == "a"
    assert check_choice("order", 2, (1, 2, 3)) == 2
    assert check_choice("order", np.int64(2), (1, 2, 3)) == 2
    assert check_choice("flag", True, (True, False)) is True
    # equal but of another kind: not the choice
    for name, value, choices in [
        ("order", True, (1, 2)),
        ("order", 2.0, (1, 2)),
        ("flag", 1, (True, False)),
        ("mode", b"a", ("a", "b")),
        ("mode", np.array(["a"]), ("a", "b")),  # an array is compared with nothing
        ("mode", None, ("a", "b")),
    ]:
        with pytest.raises(InvalidArgumentError, match=rf"{name} must be one of \("):
            check_choice(name, value, choices)


def test_check_float():
    assert check_float("x", 1) == 1.0 and type(check_float("x", 1)) is float
    assert check_float("x", np.float32(0.5), 0.0) == 0.5
    assert check_float("c", math.inf, 0.0, allow_inf=True) == math.inf
    for bad in (True, "1.0", None, np.array([1.0])):
        with pytest.raises(ArgumentTypeError, match="x must be a float, got"):
            check_float("x", bad)
    for bad, kwargs in [(math.nan, {}), (math.nan, {"allow_inf": True}), (-math.inf, {})]:
        with pytest.raises(InvalidArgumentError, match="x must be finite"):
            check_float("x", bad, **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"x must be >= 0\.0, got -1"):
        check_float("x", -1, 0.0)
    with pytest.raises(InvalidArgumentError, match=r"x must be > 0\.0, got 0"):
        check_float("x", 0, 0.0, above=True)
    with pytest.raises(InvalidArgumentError, match=r"x must be >= 0\.0, got -inf"):
        check_float("x", -math.inf, 0.0, allow_inf=True)


@pytest.mark.parametrize(
    "make,error,match",
    [
        # the public constructors refuse what the shared checks refuse, named by argument
        (lambda a: a.make_head("mlp", True), ArgumentTypeError, "or a MLPHeadConfig, got bool"),
        (lambda a: a.make_head(1), InvalidArgumentError, "name must be one of"),
        (lambda a: a.RTCGuidance(execution_horizon=True), ArgumentTypeError, "execution_horizon"),
        (lambda a: a.RTCGuidance(execution_horizon=4, max_guidance_weight="5"), ArgumentTypeError,
         "max_guidance_weight must be a float"),
        (lambda a: a.TrainingTimeRTC(max_delay=3, exp_decay=math.nan), InvalidArgumentError,
         "exp_decay must be finite"),
        (lambda a: a.NoiseSchedule(num_train_timesteps=True), ArgumentTypeError,
         "num_train_timesteps must be an int"),
    ],
)  # fmt: skip
def test_public_constructors(make, error, match):
    import ate_fast

    with pytest.raises(error, match=match):
        make(ate_fast)


def test_env_choice(monkeypatch):
    """The first choice where unset or blank; trimmed and case-folded; anything else names
    the variable, the choices and what came."""
    var = "ATE_FAST_TEST_CHOICE"
    monkeypatch.delenv(var, raising=False)
    assert env_choice(var, ("off", "on")) == "off"
    monkeypatch.setenv(var, "  ")
    assert env_choice(var, ("off", "on")) == "off"
    monkeypatch.setenv(var, " On ")
    assert env_choice(var, ("off", "on")) == "on"
    monkeypatch.setenv(var, "maybe")
    with pytest.raises(
        InvalidArgumentError,
        match=r"ATE_FAST_TEST_CHOICE: expected one of \['off', 'on'\], got 'maybe'",
    ):
        env_choice(var, ("off", "on"))

"""The exceptions ate_fast raises on purpose: one hierarchy under :class:`AteFastError`.

Each named error also derives from the builtin it replaces, so code (and tests) that
catch ``ValueError``, ``TypeError`` or ``RuntimeError`` keep working, while
``except ate_fast.errors.AteFastError`` catches everything ate_fast refuses.
Messages name the argument, what was expected and what came. docs/errors.md lists
where each is raised.
"""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError",
    "AteFastError",
    "BackendUnavailableError",
    "InvalidArgumentError",
    "LimitExceededError",
    "MissingConditionError",
    "NonFiniteError",
]


class AteFastError(Exception):
    """Base class of every error ate_fast raises on purpose."""


# --- fused ops, samplers, guidance (ate_fast.ops, .sampling, .steer, .guidance, .export) ---
class InvalidArgumentError(AteFastError, ValueError):
    """An argument has the right type but a wrong value, shape, device or layout."""


class ArgumentTypeError(AteFastError, TypeError):
    """An argument has the wrong type or dtype."""


class NonFiniteError(InvalidArgumentError):
    """A NaN or ±inf was found in an input or in a step's output (the message names the
    step and the source: ``model_fn``, ``guidance.gradient``, ``noise``, ``cond``, …)."""


class LimitExceededError(InvalidArgumentError):
    """A size or count is above a documented upper bound (e.g. ``MAX_NUM_STEPS``)."""


class MissingConditionError(InvalidArgumentError):
    """A conditioned model (built with ``cond_dim``) was called without ``cond``."""


class BackendUnavailableError(AteFastError, RuntimeError):
    """A forced backend (``ATE_FAST_BACKEND``) cannot run the given tensors."""


# --- checkpoints and data (ate_fast.align, ate_fast.data) ---

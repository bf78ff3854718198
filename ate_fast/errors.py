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
    "CheckpointError",
    "CheckpointIntegrityError",
    "CheckpointKindError",
    "CommandLineError",
    "DataFormatError",
    "InvalidArgumentError",
    "LimitExceededError",
    "MissingConditionError",
    "NonFiniteError",
    "SingleEpisodeWarning",
    "UnknownFileFormatError",
    "UnsupportedPolicyError",
    "UnsupportedVersionError",
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


# --- integrations with other packages (ate_fast.integrations) ---
class UnsupportedVersionError(AteFastError, RuntimeError):
    """An installed package (e.g. LeRobot) is a version the integration was not built and
    tested against; the message names the version found and the supported ones."""


class UnsupportedPolicyError(AteFastError, TypeError):
    """A policy (class or configuration) the integration does not handle; the message names
    the policy and what is supported."""


# --- checkpoints and data (ate_fast.align, ate_fast.data) ---
class CheckpointError(AteFastError, ValueError):
    """A checkpoint directory or prior file is missing, incomplete, corrupt or foreign."""


class CheckpointKindError(CheckpointError):
    """A checkpoint of another kind than the one asked for (e.g. a stage-2 VAE given
    where a stage-1 VAE is expected). The message names both kinds."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint's content does not match the hash recorded when it was written: a file
    or its metadata (e.g. normaliser statistics in ``config.json``) was modified, or a
    write was torn. The message names the file, the expected and the found hash."""


class DataFormatError(AteFastError, ValueError):
    """A data file is missing a key, has the wrong rank, holds non-finite actions, ...

    The message names the file (and the key or episode) and what was expected.
    """


class UnknownFileFormatError(DataFormatError):
    """A file's content (its first bytes, not its suffix) is none of the formats a loader
    accepts. The message names the file, what was found and what was expected."""


class SingleEpisodeWarning(UserWarning):
    """A data file's flat ``[T, D]`` array has no episode markers and is read as one
    episode (given only when it is all the data read: a folder or list of files, one per
    episode, is that layout)."""


# --- the command line (ate_fast.cli_errors) ---
class CommandLineError(AteFastError, ValueError):
    """A bad combination of flags or a file that does not fit the command; the message
    names the flags."""

"""The named errors of align checkpoints and prior files.

Each subclasses :class:`ValueError` (what the loaders raised before), so existing
``except ValueError`` keeps working.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory or prior file is missing, incomplete, corrupt or foreign."""


class CheckpointKindError(CheckpointError):
    """A checkpoint of another kind than the one asked for (e.g. a stage-2 VAE given
    where a stage-1 VAE is expected). The message names both kinds."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint's content does not match the hash recorded when it was written: a file
    or its metadata (e.g. normaliser statistics in ``config.json``) was modified, or a
    write was torn. The message names the file, the expected and the found hash."""

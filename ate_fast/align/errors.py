"""The named errors of align checkpoints and prior files (defined in :mod:`ate_fast.errors`,
the package's one hierarchy; each is also a :class:`ValueError`, what the loaders raised
before, so existing ``except ValueError`` keeps working).
"""

from __future__ import annotations

from ate_fast.errors import CheckpointError, CheckpointIntegrityError, CheckpointKindError

__all__ = ["CheckpointError", "CheckpointIntegrityError", "CheckpointKindError"]

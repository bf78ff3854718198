"""The exceptions the data readers raise for a file they cannot use (defined in
:mod:`ate_fast.errors`, the package's one hierarchy; each is also a :class:`ValueError`)."""

from __future__ import annotations

from ate_fast.errors import DataFormatError, SingleEpisodeWarning, UnknownFileFormatError

__all__ = ["DataFormatError", "SingleEpisodeWarning", "UnknownFileFormatError"]

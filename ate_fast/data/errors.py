"""The exceptions the data readers raise for a file they cannot use."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A data file is missing a key, has the wrong rank, holds non-finite actions, ...

    The message names the file (and the key or episode) and what was expected.
    """


class UnknownFileFormatError(DataFormatError):
    """A file's content (its first bytes, not its suffix) is none of the formats a loader
    accepts. The message names the file, what was found and what was expected."""

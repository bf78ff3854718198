"""The align step's settings (a plain dataclass: importing it loads no training code)."""

from __future__ import annotations

from dataclasses import dataclass

from ate_fast.argument_checks import check_float, check_int
from ate_fast.errors import ArgumentTypeError


@dataclass(frozen=True)
class AlignSettings:
    """Sizes and settings of ATE Align as the adaptation pipelines run it.

    MLP action VAEs with ``latent_dim`` and ``hidden`` widths; AdamW at ``lr`` decaying to
    a tenth over each stage; stage 1 for ``stage1_epochs`` at ``stage1_batch``, stage 2 for
    ``stage2_epochs`` at ``stage2_batch`` (at most the number of target chunks); the
    stage-1 latent prior of kind ``prior``; fp32 on ``device``, no files, validation (if
    any) once at the end; ``progress`` bars or not.
    """

    latent_dim: int
    hidden: tuple[int, ...]
    lr: float
    stage1_epochs: int
    stage1_batch: int
    stage2_epochs: int
    stage2_batch: int
    prior: str = "gaussian"
    device: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        """Each size and count an int >= 1, ``lr`` a float > 0, ``hidden`` a sequence of
        widths (named here: a 0 epoch count divided by zero deep in the step's schedule)."""
        for name in ("latent_dim", "stage1_epochs", "stage1_batch", "stage2_epochs",
                     "stage2_batch"):  # fmt: skip
            check_int(name, getattr(self, name), 1)
        check_float("lr", self.lr, 0.0, above=True)
        if isinstance(self.hidden, (str, bytes)) or not hasattr(self.hidden, "__iter__"):
            raise ArgumentTypeError(
                f"hidden must be a sequence of widths, got {type(self.hidden).__name__}"
            )
        for i, width in enumerate(self.hidden):
            check_int(f"hidden[{i}]", width, 1)

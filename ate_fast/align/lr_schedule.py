"""ExponentialLR with a floor: ``lr_e = max(lr_0 · γ^e, floor)`` (e = completed epochs)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class ExponentialLRWithFloor(LRScheduler):
    """Multiply the learning rate by ``gamma`` each ``step()``, never going below ``floor``.

    The released code steps ``ExponentialLR(0.95)`` once per epoch while the rate is above
    ``min_lr=1e-6``; this closed form does the same and is exact on resume. A floor above
    a group's initial rate leaves that rate unchanged.
    """

    def __init__(
        self, optimizer: Optimizer, gamma: float, floor: float = 0.0, last_epoch: int = -1
    ) -> None:
        self.gamma = float(gamma)
        self.floor = float(floor)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        e = max(self.last_epoch, 0)
        return [max(base * self.gamma**e, min(self.floor, base)) for base in self.base_lrs]

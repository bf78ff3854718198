"""The two robots' action parameterisations in one padded action space.

The unified action vector has ``ACTION_DIM = 3`` slots: ``[u₀, u₁, gripper]``. A robot
fills the slots it has and its mask marks them; the others are padding (0, masked).

* Robot A (pre-training): ``u`` is the planar velocity in the world frame (units of
  ``MAX_STEP``); no gripper — mask ``[1, 1, 0]``.
* Robot B (adaptation): its controller reads ``u`` in a frame rotated by 120° and scaled
  by 0.6, ``u = 0.6·R(120°)·v``, and it has a gripper slot (−1 open, +1 closed; a closed
  gripper holds the robot still) — mask ``[1, 1, 1]``.

:meth:`Embodiment.to_actions` maps a world velocity (and gripper command) to the robot's
unified action; :meth:`Embodiment.from_actions` is its inverse, used to execute a
policy's actions in :class:`~ate_fast.demo.point_mass.PointMassEnv`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

ACTION_DIM = 3
GRIPPER_SLOT = 2


@dataclass(frozen=True)
class Embodiment:
    """A robot's action map. ``rotation_deg``/``scale``: its velocity frame relative to the
    world's; ``has_gripper``: whether slot 2 is its gripper (else padding)."""

    name: str
    rotation_deg: float = 0.0
    scale: float = 1.0
    has_gripper: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale: expected a finite value > 0, got {self.scale}")

    @property
    def mask(self) -> np.ndarray:
        """``[ACTION_DIM]`` float32: 1 on the slots this robot has."""
        return np.array([1.0, 1.0, 1.0 if self.has_gripper else 0.0], dtype=np.float32)

    @property
    def frame(self) -> np.ndarray:
        """``[2, 2]``: ``scale · R(rotation)``, world velocity → the robot's ``u``."""
        a = math.radians(self.rotation_deg)
        return self.scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])

    def to_actions(self, velocity: np.ndarray, closed: Optional[np.ndarray] = None) -> np.ndarray:
        """World ``velocity [..., 2]`` and gripper ``closed [...]`` (bool; ignored without a
        gripper, all open when None) → unified actions ``[..., ACTION_DIM]``."""
        velocity = np.asarray(velocity, dtype=np.float64)
        if velocity.shape[-1:] != (2,):
            raise ValueError(f"velocity: expected [..., 2], got {velocity.shape}")
        out = np.zeros((*velocity.shape[:-1], ACTION_DIM))
        out[..., :2] = velocity @ self.frame.T
        if self.has_gripper:
            shut = np.zeros(velocity.shape[:-1], bool) if closed is None else np.asarray(closed)
            if shut.shape != velocity.shape[:-1]:
                raise ValueError(
                    f"closed: expected shape {velocity.shape[:-1]} (velocity's leading dims), "
                    f"got {shut.shape}"
                )
            out[..., GRIPPER_SLOT] = np.where(shut, 1.0, -1.0)
        return out

    def from_actions(self, actions: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Unified ``actions [..., ACTION_DIM]`` → (world velocity ``[..., 2]``, gripper
        closed ``[...]`` bool — slot 2 > 0 — or None without a gripper)."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape[-1:] != (ACTION_DIM,):
            raise ValueError(f"actions: expected [..., {ACTION_DIM}], got {actions.shape}")
        velocity = actions[..., :2] @ np.linalg.inv(self.frame).T
        closed = actions[..., GRIPPER_SLOT] > 0 if self.has_gripper else None
        return velocity, closed


ROBOT_A = Embodiment("A", rotation_deg=0.0, scale=1.0, has_gripper=False)
ROBOT_B = Embodiment("B", rotation_deg=120.0, scale=0.6, has_gripper=True)

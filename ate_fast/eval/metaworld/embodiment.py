"""Robot embodiments for the Meta-World benchmark: the pre-training robot and "new"
robots whose action space differs, all in one padded action space.

Meta-World's Sawyer takes ``[dx, dy, dz, grip] ∈ [−1, 1]⁴`` (hand displacement in units
of 1 cm per step, gripper effort). The unified action vector has ``ACTION_DIM = 8``
slots; every robot here fills slots 0–3 and its mask marks them, slots 4–7 are padding
(0, masked), as a multi-robot VLA's unified action space would be.

Shifts (``to_robot`` maps the environment's action to the robot's, ``to_env`` back):

* ``"source"`` — the pre-training robot: the environment's action as is.
* ``"linear"`` — a fixed linear remap: the arm's frame rotated by 120° about z and
  scaled by 0.6, the gripper's sign flipped (the pilot measurement's shift).
* ``"warp"`` — the linear remap followed by an element-wise saturating warp
  ``u ↦ tanh(k·u)/tanh(k)`` (k = 2) of the arm's three commands: a joint-space-like
  non-linear actuator response (small commands amplified ≈2×, large ones compressed).
* ``"absolute"`` — a different control parameterisation: the robot commands the
  absolute target position of its hand, normalised to the workspace box
  ``[−0.5, 0.5] × [0.3, 1.0] × [0.0, 0.5]`` m → ``[−1, 1]³``, instead of a displacement
  (the map depends on the hand position in the observation; non-linear through the
  environment's clipping). The gripper is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACTION_DIM = 8
ENV_ACTION_DIM = 4
ROBOT_SLOTS = slice(0, ENV_ACTION_DIM)
STEP_METRES = 0.01  # Meta-World's action_scale: 1 unit of dx = 1 cm of mocap motion
WORKSPACE_LOW = np.array([-0.5, 0.3, 0.0])
WORKSPACE_HIGH = np.array([0.5, 1.0, 0.5])
WARP_GAIN = 2.0
_EDGE = 1.0 - 1e-6  # |tanh(k·u)/tanh(k)| < 1 keeps the inverse warp finite


def _rotation_z(degrees: float, scale: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return scale * np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Shift:
    """One robot's action map relative to the environment's (see the module docstring).

    ``name`` in :data:`SHIFTS`; ``mask`` ``[ACTION_DIM]`` marks the robot's slots.
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in SHIFTS:
            raise ValueError(f"shift: expected one of {list(SHIFTS)}, got {self.name!r}")

    @property
    def mask(self) -> np.ndarray:
        """``[ACTION_DIM]`` float32: 1 on the robot's slots."""
        out = np.zeros(ACTION_DIM, dtype=np.float32)
        out[ROBOT_SLOTS] = 1.0
        return out

    @property
    def linear(self) -> bool:
        return self.name in ("source", "linear")

    def to_robot(self, env_action: np.ndarray, hand: np.ndarray) -> np.ndarray:
        """Environment actions ``[..., 4]`` (at hand positions ``[..., 3]``, metres) →
        the robot's unified actions ``[..., ACTION_DIM]``."""
        env_action = _last_dim("env_action", env_action, ENV_ACTION_DIM)
        hand = _last_dim("hand", hand, 3)
        arm, grip = env_action[..., :3], env_action[..., 3]
        out = np.zeros((*env_action.shape[:-1], ACTION_DIM))
        if self.name == "source":
            out[..., :3], out[..., 3] = arm, grip
        elif self.name in ("linear", "warp"):
            u = arm @ LINEAR_FRAME.T
            if self.name == "warp":
                u = np.tanh(WARP_GAIN * u) / math.tanh(WARP_GAIN)
            out[..., :3], out[..., 3] = u, -grip
        else:  # absolute
            target = hand + STEP_METRES * arm
            out[..., :3] = 2.0 * (target - WORKSPACE_LOW) / (WORKSPACE_HIGH - WORKSPACE_LOW) - 1.0
            out[..., 3] = grip
        return out

    def to_env(self, robot_action: np.ndarray, hand: np.ndarray) -> np.ndarray:
        """The robot's unified actions ``[..., ACTION_DIM]`` (padding ignored) at hand
        positions ``[..., 3]`` → environment actions ``[..., 4]`` (not clipped: the
        environment clips to [−1, 1])."""
        robot_action = _last_dim("robot_action", robot_action, ACTION_DIM)
        hand = _last_dim("hand", hand, 3)
        u, grip = robot_action[..., :3], robot_action[..., 3]
        out = np.zeros((*robot_action.shape[:-1], ENV_ACTION_DIM))
        if self.name == "source":
            out[..., :3], out[..., 3] = u, grip
        elif self.name in ("linear", "warp"):
            if self.name == "warp":
                u = np.arctanh(np.clip(u * math.tanh(WARP_GAIN), -_EDGE, _EDGE)) / WARP_GAIN
            out[..., :3], out[..., 3] = u @ INVERSE_LINEAR_FRAME.T, -grip
        else:  # absolute
            target = WORKSPACE_LOW + (u + 1.0) * 0.5 * (WORKSPACE_HIGH - WORKSPACE_LOW)
            out[..., :3], out[..., 3] = (target - hand) / STEP_METRES, grip
        return out


def _last_dim(name: str, value: np.ndarray, size: int) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if value.shape[-1:] != (size,):
        raise ValueError(f"{name}: expected shape [..., {size}], got {value.shape}")
    return value


LINEAR_FRAME = _rotation_z(120.0, 0.6)  # environment displacement → the robot's command
INVERSE_LINEAR_FRAME = np.linalg.inv(LINEAR_FRAME)
SHIFTS = ("source", "linear", "warp", "absolute")

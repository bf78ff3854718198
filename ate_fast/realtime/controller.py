"""A chunked policy run as an asynchronous real-time controller, with a simulated
inference delay (docs/rtc.md, "The real-time controller").

Timeline (control steps k = 0, 1, …; chunk length H, execution horizon s, delay d with
0 ≤ d ≤ min(s, H − s): one chunk in flight at a time, and it arrives before the chunk in
force runs out):

- k = 0: the first chunk C₀ is computed from the first observation before anything
  moves (nothing is committed yet); it starts at step 0.
- every s executed steps, at k = n·s (n ≥ 1), chunk Cₙ is requested from the observation
  at that moment; its step i is meant for control step n·s + i. It becomes available d
  steps later, at k = n·s + d; meanwhile the previous chunk keeps executing, so Cₙ's first
  d actions correspond to steps already executed (they are committed: the previous
  chunk's actions for those steps).
- the chunk in force at step k is the last one available; ``naive``, ``rtc`` and
  ``rtc_training`` execute its action for step k (Cₙ runs its steps d … d + s − 1; with
  d = 0 every chunk's first s actions). ``ensemble`` averages the actions for step k of
  every available chunk that covers k (temporal ensembling, ACT: weights ∝ exp(−m·j),
  j = 0 for the oldest chunk).

Strategies (the policy function receives what it needs; :class:`SamplerChunks` builds it
for a ``FlowSampler``): ``naive`` and ``ensemble`` sample plainly; ``rtc`` inpaints with
:class:`~ate_fast.realtime.RTCGuidance` (Y = the previous chunk's remaining actions,
delay d); ``rtc_training`` samples a training-time-RTC policy with
:class:`~ate_fast.realtime.PrefixInpainting` (the committed Y[:, :d]).

A *switch step* is one where a new chunk takes over (k = n·s + d, n ≥ 1);
:func:`action_jumps` compares ‖a_k − a_{k−1}‖ there with the other steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ate_fast.argument_checks import check_choice, check_float, check_int
from ate_fast.errors import InvalidArgumentError
from ate_fast.realtime.prefix_inpainting import PrefixInpainting
from ate_fast.realtime.rtc import RTCGuidance

STRATEGIES = ("naive", "ensemble", "rtc", "rtc_training")
ACT_ENSEMBLE_DECAY = 0.01  # ACT's temporal-ensembling m

# policy(obs, prev, delay) -> chunk [B, H, D]: prev is the previous plan aligned to the new
# chunk (prev[:, i] for step i of the new chunk; None for the first chunk), delay its d
ChunkFn = Callable[[Any, Optional[Tensor], int], Tensor]


def ensemble_weights(count: int, decay: float = ACT_ENSEMBLE_DECAY) -> np.ndarray:
    """``[count]`` float64 weights of ``count`` overlapping predictions, oldest first:
    ∝ exp(−decay·j), normalised to sum to 1 (ACT's temporal ensembling; a negative
    ``decay`` favours the newer predictions)."""
    count = check_int("count", count, 1, 1 << 20)
    exponent = -check_decay(decay) * np.arange(count, dtype=np.float64)
    w = np.exp(exponent - exponent.max())  # any finite decay: no overflow to inf / inf
    return w / w.sum()


def check_decay(decay: object) -> float:
    """``ensemble_decay`` as a finite float (NaN or ±inf would make every action NaN)."""
    return check_float("ensemble_decay", decay)


def align_plan(chunk: Tensor, offset: int) -> Tensor:
    """``chunk`` [B, H, D] seen from ``offset`` steps after its start: its remaining
    actions first, the tail padded with its last action ([B, H, D])."""
    if offset == 0:
        return chunk
    tail = chunk[:, -1:].expand(-1, offset, -1)
    return torch.cat([chunk[:, offset:], tail], dim=1)


@dataclass
class _Chunk:
    start: int  # the control step of the chunk's index 0
    ready: int  # the first step at which it may be executed
    actions: Tensor  # [B, H, D]


@dataclass
class ControllerTrace:
    """What a controller did: per executed step its action ``[B, D]`` (``actions``) and
    whether a new chunk took over (``switches``); per computed chunk the policy call's
    wall time in seconds (``latencies``) and its start step (``starts``)."""

    actions: list[Tensor] = field(default_factory=list)
    switches: list[bool] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    def stacked_actions(self) -> np.ndarray:
        """``[T, B, D]`` float64."""
        return torch.stack(self.actions).double().cpu().numpy()


class RealTimeController:
    """Runs ``policy`` (a :data:`ChunkFn`) as an asynchronous controller with delay d.

    Args:
        policy: ``policy(obs, prev, delay) -> chunk [B, H, D]``.
        horizon: H, the chunk length.
        execution_horizon: s (1 ≤ s ≤ H), steps between chunk requests.
        delay: d (0 ≤ d ≤ min(s, H − s)), the simulated inference delay in control steps
            (one chunk in flight at a time: the next request comes s ≥ d steps later).
        strategy: one of :data:`STRATEGIES` (``"ensemble"`` averages; the others execute
            the chunk in force; the policy decides how it samples).
        ensemble_decay: m of ``"ensemble"``'s weights.
        clock: the timer of :attr:`trace`'s latencies (``time.perf_counter``).

    Call :meth:`act` once per control step with the current observation; it returns the
    action ``[B, D]`` to execute. :meth:`reset` starts a new episode.
    """

    def __init__(
        self,
        policy: ChunkFn,
        *,
        horizon: int,
        execution_horizon: int,
        delay: int,
        strategy: str = "naive",
        ensemble_decay: float = ACT_ENSEMBLE_DECAY,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not callable(policy):
            raise InvalidArgumentError(f"policy must be callable, got {type(policy).__name__}")
        self.horizon = check_int("horizon", horizon, 1, 1 << 20)
        self.s = check_int("execution_horizon", execution_horizon, 1, self.horizon)
        self.delay = check_int(
            "delay", delay, 0, min(self.s, self.horizon - self.s),
            " (min(execution_horizon, horizon − execution_horizon))",
        )  # fmt: skip
        self.policy, self.strategy = policy, check_choice("strategy", strategy, STRATEGIES)
        self.ensemble_decay, self.clock = check_decay(ensemble_decay), clock
        if isinstance(policy, SamplerChunks):
            policy.check_controller(self.strategy, self.s, self.delay)
        self.reset()

    def reset(self) -> None:
        """Start a new episode (an empty :attr:`trace`)."""
        self.step = 0
        self.chunks: list[_Chunk] = []  # available ones, oldest first
        self.pending: Optional[_Chunk] = None
        self.trace = ControllerTrace()

    def _request(self, obs: Any, start: int, prev: Optional[Tensor], delay: int) -> _Chunk:
        t0 = self.clock()
        actions = self.policy(obs, prev, delay)
        self.trace.latencies.append(self.clock() - t0)
        self.trace.starts.append(start)
        if actions.ndim != 3 or actions.shape[1] != self.horizon:
            raise InvalidArgumentError(
                f"policy must return a chunk [B, H = {self.horizon}, D], got {tuple(actions.shape)}"
            )
        return _Chunk(start, start + delay, actions)

    def _arrive(self, k: int) -> bool:
        """Make the pending chunk available if it is ready at step ``k``."""
        if self.pending is None or self.pending.ready != k:
            return False
        self.chunks.append(self.pending)
        self.pending = None
        return True

    def act(self, obs: Any) -> Tensor:
        """The action ``[B, D]`` for this control step, given its observation."""
        k = self.step
        switched = self._arrive(k)  # a chunk requested d steps ago (d = s: before the next)
        if k == 0:
            self.chunks = [self._request(obs, 0, None, 0)]
        elif k % self.s == 0:
            current = self.chunks[-1]
            prev = align_plan(current.actions, k - current.start)
            self.pending = self._request(obs, k, prev, self.delay)
            switched = self._arrive(k) or switched  # d = 0: at once
        # chunks no longer covering step k leave (the newest always covers it)
        self.chunks = [c for c in self.chunks if k - c.start < self.horizon]
        if self.strategy == "ensemble":
            w = ensemble_weights(len(self.chunks), self.ensemble_decay)
            action = sum(float(wj) * c.actions[:, k - c.start] for wj, c in zip(w, self.chunks))
        else:
            current = self.chunks[-1]
            action = current.actions[:, k - current.start]
            self.chunks = [current]
        self.trace.actions.append(action)
        self.trace.switches.append(switched)
        self.step = k + 1
        return action


def run_controller(
    controller: RealTimeController, obs: Any, step: Callable[[Tensor], Any], steps: int
) -> ControllerTrace:
    """Run ``steps`` control steps from observation ``obs``: ``obs = step(action [B, D])``
    after each (a gymnasium-like environment's step, reduced to the observation)."""
    controller.reset()
    for _ in range(check_int("steps", steps, 0, 1 << 40)):
        obs = step(controller.act(obs))
    return controller.trace


def action_jumps(
    actions: np.ndarray, switches: np.ndarray, valid: Optional[np.ndarray] = None
) -> dict[str, float]:
    """Mean ‖a_k − a_{k−1}‖₂ at switch steps and at the other steps (k ≥ 1).

    ``actions`` [T, B, D]; ``switches`` [T] bool (:attr:`ControllerTrace.switches`);
    ``valid`` [T, B] bool (default all): step k of episode b counts when it and step k − 1
    were executed. Returns ``{"switch", "other", "switch_count", "other_count"}`` (NaN
    means where a set is empty).
    """
    actions = np.asarray(actions, dtype=np.float64)
    switches = np.asarray(switches, dtype=bool)
    if actions.ndim != 3 or switches.shape != actions.shape[:1]:
        raise InvalidArgumentError(
            f"actions must be [T, B, D] and switches [T], got {actions.shape} and {switches.shape}"
        )
    ok = np.ones(actions.shape[:2], bool) if valid is None else np.asarray(valid, bool)
    if ok.shape != actions.shape[:2]:
        raise InvalidArgumentError(f"valid must be [T, B] = {actions.shape[:2]}, got {ok.shape}")
    jump = np.linalg.norm(np.diff(actions, axis=0), axis=-1)  # [T − 1, B]
    both = ok[1:] & ok[:-1]
    at = both & switches[1:, None]
    other = both & ~switches[1:, None]
    mean = lambda m: float(jump[m].mean()) if m.any() else float("nan")  # noqa: E731
    return {
        "switch": mean(at),
        "other": mean(other),
        "switch_count": int(at.sum()),
        "other_count": int(other.sum()),
    }


class SamplerChunks:
    """The :data:`ChunkFn` of a ``FlowSampler`` for a strategy.

    Args:
        sampler: an ``ate_fast.FlowSampler`` (any object with ``sample(noise, cond,
            guidance=, inpainting=)``).
        noise: ``noise() -> [B, H, D]``, the initial noise of each chunk.
        cond: ``cond(obs)`` -> the sampler's ``cond`` (default: ``obs`` unchanged).
        strategy: one of :data:`STRATEGIES`.
        execution_horizon: s (``"rtc"``'s mask); ``max_delay``: the largest delay
            (``"rtc_training"``'s mask table).
        rtc: options of :class:`RTCGuidance` (``max_guidance_weight``, ``prefix_schedule``).
    """

    def __init__(
        self,
        sampler: Any,
        noise: Callable[[], Tensor],
        *,
        strategy: str,
        execution_horizon: int,
        max_delay: int,
        cond: Callable[[Any], Any] = lambda obs: obs,
        rtc: Optional[dict[str, Any]] = None,
    ) -> None:
        self.strategy = check_choice("strategy", strategy, STRATEGIES)
        self.sampler, self.noise, self.cond = sampler, noise, cond
        self.guidance: Optional[RTCGuidance] = None
        self.inpainting: Optional[PrefixInpainting] = None
        if strategy == "rtc":
            self.guidance = RTCGuidance(execution_horizon=execution_horizon, **(rtc or {}))
        elif strategy == "rtc_training":
            self.inpainting = PrefixInpainting(max_delay=max_delay)

    def check_controller(self, strategy: str, execution_horizon: int, delay: int) -> None:
        """Refuse a controller that runs this policy with another strategy, s, or a delay
        beyond ``max_delay``: the masks would weight the wrong steps of ``prev`` (past s
        they hold only padding)."""
        if strategy != self.strategy:
            raise InvalidArgumentError(
                f"strategy: the controller's {strategy!r} differs from its policy's "
                f"(SamplerChunks) {self.strategy!r}"
            )
        if self.guidance is not None and execution_horizon != self.guidance.execution_horizon:
            raise InvalidArgumentError(
                f"execution_horizon: the controller's s = {execution_horizon} differs from its "
                f"policy's (SamplerChunks) s = {self.guidance.execution_horizon}, which places "
                "the RTC mask"
            )
        if self.inpainting is not None and delay > self.inpainting.max_delay:
            raise InvalidArgumentError(
                f"delay: the controller's d = {delay} exceeds its policy's (SamplerChunks) "
                f"max_delay = {self.inpainting.max_delay}"
            )

    def __call__(self, obs: Any, prev: Optional[Tensor], delay: int) -> Tensor:
        noise, cond = self.noise(), self.cond(obs)
        prefix = torch.zeros_like(noise) if prev is None else prev.to(noise)
        if self.guidance is not None:
            self.guidance.set_prefix(prefix, delay)
            if prev is None:
                self.guidance.clear_prefix()
            return self.sampler.sample(noise, cond, guidance=self.guidance).clone()
        if self.inpainting is not None:
            self.inpainting.set_prefix(prefix, delay)
            if prev is None:
                self.inpainting.clear_prefix()
            with torch.no_grad():
                return self.sampler.sample(noise, cond, inpainting=self.inpainting).clone()
        with torch.no_grad():
            return self.sampler.sample(noise, cond).clone()

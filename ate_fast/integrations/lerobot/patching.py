"""``patch_policy`` (inference) and ``steer_policy`` (training) for LeRobot policies.

Both replace methods on the policy's inner model *instance* (``policy.diffusion`` of a
DiffusionPolicy, ``policy.model`` of a SmolVLAPolicy) and return a :class:`PolicyPatch`
that puts the originals back (``.remove()``, or leave its ``with`` block). The policy's
own ``select_action`` / ``predict_action_chunk`` / ``forward`` — its observation queues,
action queue, padding and masks — are untouched.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.guidance import Guidance, check_guidance
from ate_fast.integrations.lerobot import diffusion_policy, smolvla_policy
from ate_fast.integrations.lerobot.loop import SamplingLoop
from ate_fast.integrations.lerobot.not_copyable import NotCopyable
from ate_fast.integrations.lerobot.spec import VaeSpec, vae_spec
from ate_fast.integrations.lerobot.steer_fit import check_steer_fits
from ate_fast.integrations.lerobot.version import policy_kind, unwrap
from ate_fast.models.chunk_conv import use_chunk_convs
from ate_fast.steer import LatentGuidance, Steer

_MISSING = object()
_MARK = "_ate_fast_patch"


class PolicyPatch(NotCopyable):
    """What :func:`patch_policy` / :func:`steer_policy` return.

    Attributes:
        policy: the patched LeRobot policy.
        kind: ``"diffusion"`` or ``"smolvla"``.
        loop: the :class:`~ate_fast.integrations.lerobot.loop.SamplingLoop` (inference
            patches; its ``sampler`` is the ate_fast sampler, ``captures`` the captures).
        diagnostics: Steer's latest diagnostics (training patches; detached 0-dim tensors).
        spec: the policy's :class:`~ate_fast.integrations.lerobot.VaeSpec` (training patches).
    """

    def __init__(self, policy: Any, kind: str, target: Any) -> None:
        self.policy = policy
        self.kind = kind
        self.loop: Optional[SamplingLoop] = None
        self.diagnostics: dict[str, Tensor] = {}
        self.spec: Optional[VaeSpec] = None
        self._target = target
        self._saved: list[tuple[str, Any]] = []
        self._cleanups: list[Callable[[], None]] = []
        if getattr(target, _MARK, None) is not None:
            raise InvalidArgumentError(
                f"policy is already patched by ate_fast ({getattr(target, _MARK)!r}); "
                "remove() that patch first"
            )
        object.__setattr__(target, _MARK, self)

    def replace(self, name: str, function: Callable[..., Any]) -> None:
        """Set ``function`` as the instance attribute ``name`` of the inner model."""
        self._saved.append((name, self._target.__dict__.get(name, _MISSING)))
        object.__setattr__(self._target, name, function)

    def on_remove(self, cleanup: Callable[[], None]) -> None:
        self._cleanups.append(cleanup)

    def record(self, diagnostics: dict[str, Tensor]) -> None:
        self.diagnostics = diagnostics

    @property
    def active(self) -> bool:
        return getattr(self._target, _MARK, None) is self

    def remove(self) -> None:
        """Restore the original methods (idempotent)."""
        if not self.active:
            return
        for name, old in reversed(self._saved):
            if old is _MISSING:
                self._target.__dict__.pop(name, None)
            else:
                object.__setattr__(self._target, name, old)
        for cleanup in self._cleanups:
            cleanup()
        self._saved.clear()
        self._cleanups.clear()
        self._target.__dict__.pop(_MARK, None)

    def __enter__(self) -> PolicyPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PolicyPatch({type(unwrap(self.policy)).__name__}, {state})"


def _inner(policy: Any, kind: str) -> Any:
    inner = unwrap(policy)
    return inner.diffusion if kind == "diffusion" else inner.model


def patch_policy(
    policy: Any, guidance: Optional[Guidance] = None, capture: bool = False
) -> PolicyPatch:
    """Sample a LeRobot ``DiffusionPolicy`` or ``SmolVLAPolicy`` with ate_fast.

    The policy's sampling loop is replaced by ate_fast's sampler (same noise draws, same
    result as LeRobot's loop to float rounding); ``select_action`` and its queue are
    unchanged. A DiffusionPolicy's U-Net convolutions become
    :class:`~ate_fast.models.chunk_conv.ChunkConv1d` / ``ChunkConvTranspose1d`` while
    patched (the same layers; at batch 1 on the CPU one row GEMM each, where ATen's path
    is slow). Use the result as a context manager or call ``.remove()``.

    Args:
        policy: the LeRobot policy (a ``torch.compile``'d one too).
        guidance: any :class:`ate_fast.Guidance` applied every step, e.g.
            ``LatentGuidance(vae, target, mask=vae_spec(policy).mask())`` — it sees the
            policy's whole normalised chunk ``[B, H, D]`` (see :func:`vae_spec`).
        capture: capture the loop once per batch size / device / dtype and replay it
            (a CUDA graph on GPU). Don't combine with LeRobot's own ``compile_model``
            (``reduce-overhead`` captures graphs of its own).

    Raises:
        UnsupportedVersionError: LeRobot is not a supported version.
        UnsupportedPolicyError: not a DiffusionPolicy / SmolVLAPolicy, or a configuration
            the sampler does not reproduce.
    """
    kind = policy_kind(policy)
    if guidance is not None:
        check_guidance(guidance)
        if isinstance(guidance, LatentGuidance):  # its VAE must take the policy's chunks
            check_steer_fits(guidance, vae_spec(policy), "guidance")
    if not isinstance(capture, bool):
        raise ArgumentTypeError(f"capture must be a bool, got {type(capture).__name__}")
    inner = _inner(policy, kind)
    if kind == "diffusion":
        loop = SamplingLoop(diffusion_policy.diffusion_sampler(inner), guidance, capture)
        patch = PolicyPatch(policy, kind, inner)
        patch.replace(
            "conditional_sample", diffusion_policy.patched_conditional_sample(inner, loop)
        )
        patch.on_remove(use_chunk_convs(inner.unet))
    else:
        loop = SamplingLoop(smolvla_policy.flow_sampler(inner), guidance, capture)
        patch = PolicyPatch(policy, kind, inner)
        patch.replace("sample_actions", smolvla_policy.patched_sample_actions(inner, loop))
        if capture:
            patch.replace("embed_suffix", smolvla_policy.capturable_embed_suffix(inner))
    patch.loop = loop
    return patch


def steer_policy(policy: Any, steer: Any) -> PolicyPatch:
    """Train a LeRobot ``DiffusionPolicy`` or ``SmolVLAPolicy`` with ATE's Steer loss.

    The policy's loss — ``mse(pred, target)`` per element — becomes ``Steer``'s corrected
    per-element loss; LeRobot's padding masks and reductions apply to it unchanged, so
    ``loss, _ = policy.forward(batch)`` in LeRobot's training loop (``lerobot-train``'s
    ``update_policy`` included) trains with Steer. ``steer`` is any
    :class:`ate_fast.Steer` (``Steer.recommended(vae, mask=vae_spec(policy).mask())``);
    its encoder is frozen and gets no gradient. The latest diagnostics are in the
    returned patch's ``diagnostics``.

    Raises:
        InvalidArgumentError: the Steer's VAE takes another chunk shape than the policy
            predicts, or its mask lets guidance into the policy's padded action dims (and,
            at a forward, its encoder is on another device than the batch).
    """
    kind = policy_kind(policy)
    if not isinstance(steer, Steer):
        raise ArgumentTypeError(f"steer must be an ate_fast.Steer, got {type(steer).__name__}")
    spec = vae_spec(policy)
    check_steer_fits(steer, spec)
    inner = _inner(policy, kind)
    patch = PolicyPatch(policy, kind, inner)
    if kind == "diffusion":
        compute_loss = diffusion_policy.steered_compute_loss(inner, steer, patch.record)
        patch.replace("compute_loss", compute_loss)
    else:
        tap = smolvla_policy.VelocityTap(inner.action_out_proj)
        patch.on_remove(tap.remove)
        original = inner.forward  # LeRobot's (or its torch.compile of it)
        patch.replace(
            "forward", smolvla_policy.steered_forward(inner, original, steer, tap, patch.record)
        )
    patch.spec = spec
    return patch

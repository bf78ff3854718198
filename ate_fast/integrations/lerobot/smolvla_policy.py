"""LeRobot ``SmolVLAPolicy``: its flow sampling loop and its training loss, through ate_fast.

``VLAFlowMatching.sample_actions`` (LeRobot: the prefix KV cache, then ``num_steps``
Euler steps ``x ← x − (1/K)·v`` from t = 1 to 0) becomes: the same prefix cache, then a
:class:`~ate_fast.sampling.FlowSampler` (uniform grid, openpi convention) over
``denoise_step`` with the cache as its ``cond`` — the same noise draw, the same actions.
``VLAFlowMatching.forward``'s loss becomes :meth:`ate_fast.steer.Steer.flow_loss` per
element (``[B, chunk_size, max_action_dim]``), so ``SmolVLAPolicy.forward`` applies its
masks and reductions to it as it does to the MSE.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ate_fast.errors import UnsupportedPolicyError
from ate_fast.integrations.lerobot.loop import SamplingLoop
from ate_fast.integrations.lerobot.not_copyable import NotCopyable
from ate_fast.integrations.lerobot.steer_fit import check_steer_device
from ate_fast.sampling import FlowSampler

_MISSING = object()


def flow_sampler(model: Any) -> FlowSampler:
    """The FlowSampler equal to ``model`` (a LeRobot ``VLAFlowMatching``)'s loop; its
    ``cond`` is ``(prefix_pad_masks [B, P], past_key_values)``."""
    if not model.config.use_cache:
        raise UnsupportedPolicyError(
            "SmolVLA with use_cache=False recomputes the prefix every step; ate_fast "
            "samples with the prefix KV cache only (use_cache=True, LeRobot's default)"
        )

    def model_fn(x: Tensor, t: Tensor, cond: tuple[Tensor, Any]) -> Tensor:
        prefix_pad_masks, past_key_values = cond
        return model.denoise_step(
            prefix_pad_masks=prefix_pad_masks, past_key_values=past_key_values, x_t=x,
            timestep=t,
        )  # fmt: skip

    return FlowSampler(model_fn, num_steps=int(model.config.num_steps), method="euler")


def patched_sample_actions(model: Any, loop: SamplingLoop) -> Callable[..., Tensor]:
    """A drop-in ``VLAFlowMatching.sample_actions`` running ``loop`` after the prefix."""
    from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks

    def sample_actions(
        images: Any,
        img_masks: Any,
        lang_tokens: Tensor,
        lang_masks: Tensor,
        state: Tensor,
        noise: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        if model._rtc_enabled():
            raise UnsupportedPolicyError(
                "SmolVLA's own RTC processor (config.rtc_config) cannot run inside ate_fast's "
                "sampler; unpatch the policy to use it"
            )
        if noise is None:  # LeRobot's draw, so the same seed gives the same actions
            shape = (state.shape[0], model.config.chunk_size, model.config.max_action_dim)
            noise = model.sample_noise(shape, state.device)
        prefix_embs, prefix_pad_masks, prefix_att_masks = model.embed_prefix(
            images, img_masks, lang_tokens, lang_masks, state=state
        )
        _, past_key_values = model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(prefix_pad_masks, prefix_att_masks),
            position_ids=torch.cumsum(prefix_pad_masks, dim=1) - 1,
            past_key_values=None,
            inputs_embeds=[prefix_embs, None],
            use_cache=model.config.use_cache,
            fill_kv_cache=True,
        )
        return loop(noise, (prefix_pad_masks, past_key_values))

    return sample_actions


def capturable_embed_suffix(model: Any) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """``VLAFlowMatching.embed_suffix`` without its per-step ``torch.tensor(list)`` (a
    host-to-device copy, which a CUDA graph cannot capture): the same three outputs."""
    from lerobot.policies.smolvla.modeling_smolvla import create_sinusoidal_pos_embedding

    def embed_suffix(noisy_actions: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        action_emb = model.action_in_proj(noisy_actions)
        bsize, dtype, device = action_emb.shape[0], action_emb.dtype, action_emb.device
        time_emb = create_sinusoidal_pos_embedding(
            timestep, model.vlm_with_expert.expert_hidden_size, model.config.min_period,
            model.config.max_period, device=device,
        ).type(dtype=dtype)  # fmt: skip
        time_emb = time_emb[:, None, :].expand_as(action_emb)
        hidden = model.action_time_mlp_in(torch.cat([action_emb, time_emb], dim=2))
        embs = model.action_time_mlp_out(F.silu(hidden))
        pad_masks = torch.ones(bsize, embs.shape[1], dtype=torch.bool, device=device)
        att_masks = torch.ones(bsize, model.config.chunk_size, dtype=embs.dtype, device=device)
        return embs, pad_masks, att_masks

    return embed_suffix


class VelocityTap(NotCopyable):
    """Keeps the latest output of ``action_out_proj``: the velocity ``v_t`` of
    ``VLAFlowMatching.forward``, which returns only the MSE.

    An instance-attribute ``forward`` on the layer, not a forward hook: ``torch.compile``
    ignores hooks added after it traced the module (its default
    ``skip_nnmodule_hook_guards``), so a policy compiled and run before ``steer_policy``
    never called the hook; a changed ``forward`` attribute makes it trace again.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.value: Optional[Tensor] = None
        self.module = module
        self._saved = module.__dict__.get("forward", _MISSING)
        self.original = module.forward  # the class's (or an instance attribute's), bound
        object.__setattr__(module, "forward", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.value = self.original(*args, **kwargs)
        return self.value

    def take(self) -> Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("action_out_proj did not run in VLAFlowMatching.forward")
        return value

    def remove(self) -> None:
        if self._saved is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            object.__setattr__(self.module, "forward", self._saved)


def steered_forward(
    model: Any, original: Callable[..., Tensor], steer: Any, tap: VelocityTap, record: Any
) -> Callable[..., Tensor]:
    """A drop-in ``VLAFlowMatching.forward`` returning Steer's per-element loss.

    It draws noise and time as LeRobot does, runs the original forward with them (so the
    network, its masks and any ``torch.compile`` stay LeRobot's) and takes ``v_t`` from
    ``tap``; then ``x_t = t·noise + (1−t)·actions`` and ``Steer.flow_loss(v_t, x_t,
    actions, noise, t, "openpi", loss_reduction="none")`` — at ``scale = 0`` exactly
    LeRobot's ``mse_loss(u_t, v_t, reduction="none")``.
    """

    def forward(
        images: Any,
        img_masks: Any,
        lang_tokens: Tensor,
        lang_masks: Tensor,
        state: Tensor,
        actions: Tensor,
        noise: Optional[Tensor] = None,
        time: Optional[Tensor] = None,
    ) -> Tensor:
        check_steer_device(steer, actions)
        if noise is None:
            noise = model.sample_noise(actions.shape, actions.device)
        if time is None:
            time = model.sample_time(actions.shape[0], actions.device)
        original(images, img_masks, lang_tokens, lang_masks, state, actions, noise, time)
        v_t = tap.take()
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        loss, diagnostics = steer.flow_loss(
            v_t, x_t, actions, noise, time, "openpi", loss_reduction="none"
        )
        record(diagnostics)
        return loss

    return forward

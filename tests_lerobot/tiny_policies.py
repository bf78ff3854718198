"""Tiny, offline, randomly initialised LeRobot policies for integration tests.

The LeRobot integration tests must exercise *real* LeRobot policy classes (``SmolVLAPolicy`` and
``DiffusionPolicy``) without touching the network: no Hub downloads, no pretrained weights, and
everything small enough that construction plus one inference call take a few seconds on two CPU
cores. This module builds exactly that:

* :func:`make_tiny_smolvlm_dir` writes a self-contained SmolVLM model folder (``config.json`` with a
  tiny SigLIP-style vision tower and a tiny Llama text model, a word-level tokenizer built locally
  with the ``tokenizers`` library, and the image/video processor configs of a ``SmolVLMProcessor``).
  ``AutoConfig``, ``AutoProcessor`` and ``AutoTokenizer`` ``.from_pretrained(folder)`` all load it
  offline. It holds no weights: SmolVLA with ``load_vlm_weights=False`` instantiates the VLM
  from its config with random weights.
* :func:`make_tiny_smolvla` builds a ``SmolVLAPolicy`` on top of that folder (2 VLM layers, 2 expert
  layers, 32x32 images that give 4 image tokens per camera, few flow-matching steps).
* :func:`make_tiny_diffusion` builds a state-only ``DiffusionPolicy`` (``observation.state`` +
  ``observation.environment_state``, no images, so no ResNet backbone) with a narrow U-Net.
* ``*_batch`` / ``*_train_batch`` build inputs in the format the policies expect *after* LeRobot's
  preprocessor pipeline (normalised state, images in ``[0, 1]``, tokenised language), so tests can
  call ``select_action`` / ``predict_action_chunk`` / ``forward`` directly.

All weights are random (seeded with ``torch.manual_seed``); outputs are meaningless but shapes,
dtypes and code paths are those of the real policies. Policies are returned in eval mode, float32,
on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.utils.constants import (
    ACTION,
    OBS_ENV_STATE,
    OBS_IMAGES,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
    OBS_STATE,
)
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "SMOLVLA_ACTION_PAD_KEY",
    "TINY_SMOLVLM_DIRNAME",
    "TINY_SMOLVLM_IMAGE_SIZE",
    "diffusion_batch",
    "diffusion_train_batch",
    "make_tiny_diffusion",
    "make_tiny_smolvla",
    "make_tiny_smolvlm_dir",
    "smolvla_batch",
    "smolvla_camera_keys",
    "smolvla_train_batch",
]

# Sub-folder of ``root`` that :func:`make_tiny_smolvlm_dir` writes.
TINY_SMOLVLM_DIRNAME = "tiny-smolvlm"

# Vision tower geometry: 32x32 images, 8x8 patches -> 4x4 patches; the connector's pixel shuffle
# (scale factor 2) turns them into 2x2 = 4 image tokens per camera.
TINY_SMOLVLM_IMAGE_SIZE = 32
_PATCH_SIZE = 8
_SCALE_FACTOR = 2
_IMAGE_SEQ_LEN = (TINY_SMOLVLM_IMAGE_SIZE // _PATCH_SIZE) ** 2 // _SCALE_FACTOR**2

# Key that ``SmolVLAPolicy.forward`` reads for the per-step action padding mask. LeRobot 0.4.x
# spells it "actions_id_pad" (sic); datasets produce "action_is_pad", which SmolVLA ignores.
SMOLVLA_ACTION_PAD_KEY = "actions_id_pad"

_PAD, _UNK, _BOS, _EOS = "<|pad|>", "<unk>", "<|im_start|>", "<end_of_utterance>"
_FAKE_IMAGE, _IMAGE, _GLOBAL_IMAGE, _VIDEO = (
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<video>",
)
# Model-specific special tokens SmolVLMProcessor / SmolVLA look up on the tokenizer
# (``tokenizer.fake_image_token_id``, ``tokenizer.global_image_token_id``, ...).
_EXTRA_SPECIAL_TOKENS = {
    "fake_image_token": _FAKE_IMAGE,
    "image_token": _IMAGE,
    "global_image_token": _GLOBAL_IMAGE,
    "end_of_utterance_token": _EOS,
    "video_token": _VIDEO,
}
_ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 3) for c in range(1, 3)]
_IMAGE_TOKENS = [_FAKE_IMAGE, _IMAGE, _GLOBAL_IMAGE, _VIDEO, *_ROW_COL_TOKENS]
_SPECIAL_TOKENS = [_PAD, _UNK, _BOS, _EOS, *_IMAGE_TOKENS]
_WORDS = (
    "pick up put place push pull move grasp open close the a an to of on in into from and with "
    "red green blue yellow black white cube block box cup bowl drawer door left right top bottom "
    "table gripper arm robot task . , : ? ! user assistant"
).split()
_VOCAB = _SPECIAL_TOKENS + _WORDS
_TASKS = ("pick up the red cube", "push the blue block to the left", "open the drawer")


def _build_tokenizer(model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer over ``_VOCAB``, built locally (no download)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab={t: i for i, t in enumerate(_VOCAB)}, unk_token=_UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Register the special tokens as added tokens so "<image>" etc. are never split by the
    # pre-tokenizer (they already are in the vocab, so their ids do not change).
    tok.add_special_tokens(_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_UNK,
        pad_token=_PAD,
        model_max_length=model_max_length,
        padding_side="right",
        extra_special_tokens=dict(_EXTRA_SPECIAL_TOKENS),
    )


def make_tiny_smolvlm_dir(root: Path) -> Path:
    """Write a tiny SmolVLM model folder under ``root`` and return its path.

    The folder contains ``config.json`` (``model_type="smolvlm"``,
    ``SmolVLMForConditionalGeneration``), the tokenizer files and the ``SmolVLMProcessor`` files
    (image processor, video processor, processor config). It has no weights. Idempotent: calling it
    again rewrites the same files.

    Geometry: vision tower 32x32 images, patch 8, hidden 32, 2 layers, 2 heads; pixel shuffle 2 ->
    4 image tokens; text model Llama hidden 64, 2 layers, 4 query heads / 2 KV heads, head_dim 16.
    With SmolVLA's default ``expert_width_multiplier=0.75`` the action expert is 48 wide (its heads
    keep head_dim 16, so any multiplier giving an even width works).
    """
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    folder = Path(root) / TINY_SMOLVLM_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    vocab = tokenizer.get_vocab()
    ids = {name: vocab[name] for name in (_PAD, _BOS, _EOS, _IMAGE)}

    text_config = {
        "model_type": "llama",
        "vocab_size": len(_VOCAB),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "pad_token_id": ids[_PAD],
        "bos_token_id": ids[_BOS],
        "eos_token_id": ids[_EOS],
    }
    vision_config = {
        "model_type": "smolvlm_vision",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_channels": 3,
        "image_size": TINY_SMOLVLM_IMAGE_SIZE,
        "patch_size": _PATCH_SIZE,
    }
    config = SmolVLMConfig(
        vision_config=vision_config,
        text_config=text_config,
        scale_factor=_SCALE_FACTOR,
        image_token_id=ids[_IMAGE],
        pad_token_id=ids[_PAD],
        vocab_size=len(_VOCAB),
        use_cache=True,
        tie_word_embeddings=False,
        architectures=["SmolVLMForConditionalGeneration"],
        torch_dtype="float32",
    )
    config.save_pretrained(folder)

    size = {"longest_edge": TINY_SMOLVLM_IMAGE_SIZE}
    image_processor = SmolVLMImageProcessor(
        do_resize=True,
        size=size,
        do_image_splitting=False,
        max_image_size=size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = SmolVLMVideoProcessor(
        size=size,
        max_image_size=size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=_IMAGE_SEQ_LEN,
    )
    processor.save_pretrained(folder)

    # Marker documenting what this folder is (ignored by transformers).
    (folder / "TINY_MODEL_README.json").write_text(
        json.dumps({"generator": __name__, "weights": "none (random init from config)"}, indent=2)
    )
    return folder


def smolvla_camera_keys(n_cameras: int) -> list[str]:
    """Image feature keys used by :func:`make_tiny_smolvla` (``observation.images.camN``)."""
    return [f"{OBS_IMAGES}.cam{i}" for i in range(n_cameras)]


def make_tiny_smolvla(
    root: Path,
    *,
    action_dim: int = 6,
    state_dim: int = 8,
    chunk_size: int = 10,
    n_action_steps: int = 5,
    num_steps: int = 4,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    n_cameras: int = 1,
    seed: int = 0,
) -> SmolVLAPolicy:
    """Build a randomly initialised ``SmolVLAPolicy`` on a tiny SmolVLM (see module docstring).

    ``root`` receives the tiny SmolVLM folder. Images of any ``image_shape`` are resized with
    padding to the 32x32 the vision tower expects. The policy is in eval mode, float32, on CPU.
    """
    folder = make_tiny_smolvlm_dir(root)
    input_features = {OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(state_dim,))}
    for key in smolvla_camera_keys(n_cameras):
        input_features[key] = PolicyFeature(type=FeatureType.VISUAL, shape=tuple(image_shape))
    config = SmolVLAConfig(
        device="cpu",
        input_features=input_features,
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))},
        chunk_size=chunk_size,
        n_action_steps=n_action_steps,
        num_steps=num_steps,
        max_state_dim=max(32, state_dim),
        max_action_dim=max(32, action_dim),
        resize_imgs_with_padding=(TINY_SMOLVLM_IMAGE_SIZE, TINY_SMOLVLM_IMAGE_SIZE),
        tokenizer_max_length=16,
        vlm_model_name=str(folder),
        load_vlm_weights=False,
        num_vlm_layers=2,
        num_expert_layers=2,
        self_attn_every_n_layers=2,
        expert_width_multiplier=0.75,
        push_to_hub=False,
    )
    torch.manual_seed(seed)
    policy = SmolVLAPolicy(config)
    return policy.to(device="cpu", dtype=torch.float32).eval()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smolvla_batch(policy: SmolVLAPolicy, batch_size: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Inference batch in post-preprocessor format for ``select_action`` / ``predict_action_chunk``.

    Keys: ``observation.state`` [B, state_dim] (normalised, ~N(0, 1)), one
    ``observation.images.camN`` [B, C, H, W] in ``[0, 1]`` per camera, and
    ``observation.language.tokens`` [B, L] (int64) / ``observation.language.attention_mask``
    [B, L] (bool, right padded) produced by the tiny tokenizer, like LeRobot's
    ``TokenizerProcessorStep`` does (task text ending with a newline).
    """
    cfg = policy.config
    gen = _generator(seed)
    batch: dict[str, Tensor] = {
        OBS_STATE: torch.randn(batch_size, cfg.robot_state_feature.shape[0], generator=gen),
    }
    for key, feature in cfg.image_features.items():
        batch[key] = torch.rand(batch_size, *feature.shape, generator=gen)
    tokenizer = policy.model.vlm_with_expert.processor.tokenizer
    tasks = [_TASKS[i % len(_TASKS)] + "\n" for i in range(batch_size)]
    tokens = tokenizer(
        tasks,
        max_length=cfg.tokenizer_max_length,
        truncation=True,
        padding="max_length",
        padding_side="right",
        return_tensors="pt",
    )
    batch[OBS_LANGUAGE_TOKENS] = tokens["input_ids"].to(torch.long)
    batch[OBS_LANGUAGE_ATTENTION_MASK] = tokens["attention_mask"].to(torch.bool)
    return batch


def smolvla_train_batch(
    policy: SmolVLAPolicy, batch_size: int = 2, seed: int = 0
) -> dict[str, Tensor]:
    """:func:`smolvla_batch` plus ``action`` [B, chunk_size, action_dim] and the padding mask.

    The padding mask is stored under both ``"actions_id_pad"`` (the key ``SmolVLAPolicy.forward``
    actually reads in LeRobot 0.4.x) and ``"action_is_pad"`` (what LeRobot datasets emit); the
    last two steps of the last sample are marked as padding.
    """
    cfg = policy.config
    batch = smolvla_batch(policy, batch_size=batch_size, seed=seed)
    gen = _generator(seed + 1)
    batch[ACTION] = torch.randn(
        batch_size, cfg.chunk_size, cfg.action_feature.shape[0], generator=gen
    )
    is_pad = torch.zeros(batch_size, cfg.chunk_size, dtype=torch.bool)
    is_pad[-1, -min(2, cfg.chunk_size) :] = True
    batch[SMOLVLA_ACTION_PAD_KEY] = is_pad
    batch[f"{ACTION}_is_pad"] = is_pad.clone()
    return batch


def make_tiny_diffusion(
    *,
    action_dim: int = 2,
    state_dim: int = 4,
    env_state_dim: int = 6,
    horizon: int = 16,
    n_obs_steps: int = 2,
    n_action_steps: int = 8,
    scheduler: Literal["DDPM", "DDIM"] = "DDPM",
    num_inference_steps: int = 10,
    down_dims: Sequence[int] = (32, 64),
    seed: int = 0,
    do_mask_loss_for_padding: bool = False,
) -> DiffusionPolicy:
    """Build a randomly initialised, state-only ``DiffusionPolicy`` (no vision backbone).

    Inputs are ``observation.state`` and ``observation.environment_state`` (``DiffusionModel``
    needs images or an environment state). ``horizon`` must be a multiple of
    ``2 ** len(down_dims)``. The policy is in eval mode, float32, on CPU.
    """
    config = DiffusionConfig(
        device="cpu",
        input_features={
            OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(state_dim,)),
            OBS_ENV_STATE: PolicyFeature(type=FeatureType.ENV, shape=(env_state_dim,)),
        },
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))},
        horizon=horizon,
        n_obs_steps=n_obs_steps,
        n_action_steps=n_action_steps,
        noise_scheduler_type=scheduler,
        num_inference_steps=num_inference_steps,
        down_dims=tuple(down_dims),
        diffusion_step_embed_dim=32,
        kernel_size=3,
        n_groups=8,
        do_mask_loss_for_padding=do_mask_loss_for_padding,
        push_to_hub=False,
    )
    torch.manual_seed(seed)
    policy = DiffusionPolicy(config)
    return policy.to(device="cpu", dtype=torch.float32).eval()


def diffusion_batch(
    policy: DiffusionPolicy, batch_size: int = 2, seed: int = 0
) -> dict[str, Tensor]:
    """Single-step inference batch for ``DiffusionPolicy.select_action``.

    ``observation.state`` [B, state_dim] and ``observation.environment_state`` [B, env_state_dim],
    normalised to ``[-1, 1]`` (the policy's default MIN_MAX normalisation). ``select_action`` stacks
    the last ``n_obs_steps`` of these in its queues. Note that ``predict_action_chunk`` reads only
    those queues, so call ``select_action`` (or ``populate_queues``) first.
    """
    cfg = policy.config
    gen = _generator(seed)
    return {
        OBS_STATE: torch.rand(batch_size, cfg.robot_state_feature.shape[0], generator=gen) * 2 - 1,
        OBS_ENV_STATE: torch.rand(batch_size, cfg.env_state_feature.shape[0], generator=gen) * 2
        - 1,
    }


def diffusion_train_batch(
    policy: DiffusionPolicy, batch_size: int = 2, seed: int = 0
) -> dict[str, Tensor]:
    """Training batch for ``DiffusionPolicy.forward``.

    ``observation.state`` [B, n_obs_steps, state_dim], ``observation.environment_state``
    [B, n_obs_steps, env_state_dim], ``action`` [B, horizon, action_dim] (all in ``[-1, 1]``) and
    ``action_is_pad`` [B, horizon] (bool; the last few steps of the last sample are padding).
    """
    cfg = policy.config
    gen = _generator(seed)
    b, t, h = batch_size, cfg.n_obs_steps, cfg.horizon
    is_pad = torch.zeros(b, h, dtype=torch.bool)
    is_pad[-1, -min(3, h) :] = True
    return {
        OBS_STATE: torch.rand(b, t, cfg.robot_state_feature.shape[0], generator=gen) * 2 - 1,
        OBS_ENV_STATE: torch.rand(b, t, cfg.env_state_feature.shape[0], generator=gen) * 2 - 1,
        ACTION: torch.rand(b, h, cfg.action_feature.shape[0], generator=gen) * 2 - 1,
        f"{ACTION}_is_pad": is_pad,
    }

"""The artefacts runs share, each made once and cached (:mod:`.cache`): the source side
(demos, the stage-1 VAE and prior, pre-trained policies), the target side (demos per
seed, stage-2 VAEs), and what a run builds from them (its Steer, its guidance)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ate_fast.align import ActionVAE
from ate_fast.eval.metaworld.align_vaes import new_vae, train_source_vae, train_target_vae
from ate_fast.eval.metaworld.cache import (
    PRETRAIN_KEYS,
    SOURCE_KEYS,
    STAGE1_KEYS,
    STAGE2_KEYS,
    TARGET_KEYS,
    ResultCache,
    cached,
    load_artefact,
)
from ate_fast.eval.metaworld.config import EvalConfig, Method
from ate_fast.eval.metaworld.embodiment import Shift
from ate_fast.eval.metaworld.envs import task_index
from ate_fast.eval.metaworld.experts import ChunkSet, Demonstrations, chunk_set, collect
from ate_fast.eval.metaworld.policy import Conditioner, PolicySpec, make_policy, train_policy
from ate_fast.eval.metaworld.seeds import derived_seed
from ate_fast.steer import LatentGuidance, Steer


# ---------------------------------------------------------------- source side
def source_demos(store: ResultCache) -> list[Demonstrations]:
    index = task_index()
    return cached(
        store.artefact_path("source-demos", SOURCE_KEYS),
        lambda: [
            collect(t, index[t], "pretrain", 0, store.cfg.pretrain_demos)
            for t in store.cfg.source_tasks
        ],
    )


def source_chunks(store: ResultCache) -> ChunkSet:
    return chunk_set(source_demos(store), task_index(), Shift("source"), store.cfg.horizon)


def stage1(store: ResultCache) -> dict:
    """``{"vae": state dict, "prior": LatentPrior, "stats"}`` of stage 1."""

    def make() -> dict:
        vae, prior, stats = train_source_vae(
            store.cfg, source_chunks(store), derived_seed("stage1")
        )
        return {"vae": vae.state_dict(), "prior": prior, "stats": stats}

    return cached(store.artefact_path("stage1", STAGE1_KEYS), make)


def policy_spec(cfg: EvalConfig, kind: str) -> PolicySpec:
    return PolicySpec(kind, cfg.horizon, cfg.policy_hidden, cfg.policy_depth, len(task_index()))


def pretrained(store: ResultCache, kind: str, progress: bool = False) -> dict:
    """The cache entry of the ``kind`` policy pre-trained on the source chunks:
    ``{"policy", "conditioner"}`` state dicts, its ``loss`` and number of ``chunks``."""

    def make() -> dict:
        data = source_chunks(store)
        with torch.random.fork_rng():
            torch.manual_seed(derived_seed("pretrain-init", kind))
            policy = make_policy(policy_spec(store.cfg, kind))
        conditioner = Conditioner(len(task_index()), data.obs)
        cfg = store.cfg
        fit = train_policy(
            policy, conditioner, data, kind=kind, steps=cfg.pretrain_steps,
            batch=cfg.pretrain_batch, lr=cfg.pretrain_lr, seed=derived_seed("pretrain", kind),
            progress=progress, desc=f"pre-train {kind} policy",
        )  # fmt: skip
        return {
            "policy": policy.state_dict(),
            "conditioner": conditioner.state_dict(),
            "loss": fit.loss,
            "chunks": len(data),
        }

    return cached(store.artefact_path(f"pretrained-{kind}", PRETRAIN_KEYS), make)


def pretrained_policy(store: ResultCache, kind: str) -> tuple[nn.Module, Conditioner, dict]:
    """The cached pre-trained policy and its conditioner (and the cache entry)."""
    pre = pretrained(store, kind)
    policy, conditioner = make_policy(policy_spec(store.cfg, kind)), Conditioner(len(task_index()))
    policy.load_state_dict(pre["policy"])
    conditioner.load_state_dict(pre["conditioner"])
    return policy, conditioner, pre


# ---------------------------------------------------------------- target side
def target_demos(store: ResultCache, seed: int) -> list[Demonstrations]:
    """The largest N of the config's demos per target task, for run ``seed``."""
    index, n = task_index(), max(store.cfg.demos)
    path = store.cache / f"target-demos-s{seed}-n{n}-{store.cfg.digest(*TARGET_KEYS)}.pt"
    return cached(
        path, lambda: [collect(t, index[t], "demo", seed, n) for t in store.cfg.target_tasks]
    )


def target_chunks(store: ResultCache, shift: str, demos: int, seed: int) -> ChunkSet:
    """The first ``demos`` target demos per task in ``shift``'s action space."""
    first = [d.first(demos) for d in target_demos(store, seed)]
    return chunk_set(first, task_index(), Shift(shift), store.cfg.horizon)


def stage2_path(store: ResultCache, shift: str, demos: int, seed: int, kl: str) -> Path:
    return store.artefact_path(f"stage2-{shift}-n{demos}-s{seed}-{kl}", STAGE2_KEYS)


def make_stage2(store: ResultCache, shift: str, demos: int, seed: int, kl: str) -> None:
    """Train (or find) the stage-2 VAE of ``(shift, demos, seed, kl)``."""

    def make() -> dict:
        prior = stage1(store)["prior"]
        data = target_chunks(store, shift, demos, seed)
        vae, target, stats = train_target_vae(
            store.cfg, data, prior, kl, derived_seed("stage2", shift, demos, seed, kl)
        )
        return {"vae": vae.state_dict(), "target": target, "stats": stats}

    cached(stage2_path(store, shift, demos, seed, kl), make)


def stage2_vae(
    store: ResultCache, shift: str, demos: int, seed: int, kl: str
) -> tuple[ActionVAE, torch.Tensor]:
    """The cached stage-2 VAE and its mean latent [d_z]."""
    entry = load_artefact(stage2_path(store, shift, demos, seed, kl))
    vae = new_vae(store.cfg, 0)
    vae.load_state_dict(entry["vae"])
    return vae, entry["target"]


# ---------------------------------------------------------------- what a run uses
def steer_for(
    store: ResultCache, method: Method, shift: str, demos: int, seed: int, mask: torch.Tensor
) -> Optional[Steer]:
    """``method``'s Steer (None for a plain loss), through the encoder it names."""
    if method.steer is None:
        return None
    encoder = method.steer["encoder"]
    if encoder == "untrained":
        vae = new_vae(store.cfg, derived_seed("untrained", seed))
    else:
        kl = "forward" if encoder == "stage2-forward-kl" else "reverse"
        vae, _ = stage2_vae(store, shift, demos, seed, kl)
    clamp = method.steer["clamp"]
    return Steer(
        vae,
        scale=method.steer["scale"],
        clamp=store.cfg.steer_clamp if clamp is None else clamp,
        reduction=method.steer["reduction"],
        mask=mask,
    )


def guidance_for(
    store: ResultCache, shift: str, demos: int, seed: int, mask: torch.Tensor
) -> LatentGuidance:
    """Inference-time guidance toward the mean latent of the (reverse-KL) stage-2 VAE."""
    vae, target = stage2_vae(store, shift, demos, seed, "reverse")
    cfg = store.cfg
    return LatentGuidance(
        vae,
        target,
        scale=cfg.guidance_scale,
        clamp=cfg.guidance_clamp,
        mode="direct",
        mask=mask,
    )

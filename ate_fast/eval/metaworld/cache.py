"""Where the benchmark keeps things: finished runs in the output folder, and the artefacts
runs share (demos, VAEs, pre-trained policies) in a cache folder whose file names carry a
hash of the settings each artefact depends on (so configurations share them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ate_fast.align.atomic_io import atomic_path
from ate_fast.eval.metaworld.config import EvalConfig

SCHEMA = 1  # of the run files, and the cache folder's version

# the cache keys: which settings each artefact depends on
SOURCE_KEYS = ("source_tasks", "pretrain_demos")
STAGE1_KEYS = (
    *SOURCE_KEYS,
    "horizon",
    "latent_dim",
    "vae_hidden",
    "vae_lr",
    "stage1_epochs",
    "vae_batch",
    "prior",
)
PRETRAIN_KEYS = (
    *SOURCE_KEYS,
    "horizon",
    "policy_hidden",
    "policy_depth",
    "pretrain_steps",
    "pretrain_batch",
    "pretrain_lr",
)
TARGET_KEYS = ("target_tasks",)
STAGE2_KEYS = (*STAGE1_KEYS, *TARGET_KEYS, "stage2_epochs")


def default_cache_dir() -> Path:
    """``$ATE_FAST_CACHE/metaworld``, else ``$XDG_CACHE_HOME/ate_fast/metaworld``, else
    ``~/.cache/ate_fast/metaworld``; the schema version is a sub-folder, so files written
    by an incompatible version are never read."""
    root = os.environ.get("ATE_FAST_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base = Path(xdg).expanduser() / "ate_fast"
    return base / "metaworld" / f"v{SCHEMA}"


@dataclass
class ResultCache:
    """The config, the output folder (finished runs, skipped when rerun) and the artefact
    cache folder: what every worker process is handed."""

    cfg: EvalConfig
    out: Path
    cache: Path

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    def artefact_path(self, stem: str, keys: tuple[str, ...]) -> Path:
        """The cache file of ``stem`` for the config's values of ``keys``."""
        return self.cache / f"{stem}-{self.cfg.digest(*keys)}.pt"


def save_artefact(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_artefact(path: Path) -> Any:
    return torch.load(path, weights_only=False)  # our own cache files


def cached(path: Path, make: Callable[[], Any]) -> Any:
    """The artefact at ``path``, made (and saved) first if missing."""
    if path.exists():
        return load_artefact(path)
    obj = make()
    save_artefact(path, obj)
    return obj

"""Align checkpoints: a directory of safetensors weights + JSON config (+ prior + resume).

Layout of ``out_dir``::

    config.json          VAE config, normalisation statistics, unified action space,
                         chunking, training config, progress, and the SHA-256 of every
                         file below
    model.safetensors    VAE weights
    prior.safetensors    (stage 2) the stage-1 latent prior it was trained against
    resume.safetensors   optimiser, scheduler, RNG states and progress for ``resume=True``

Every file is written atomically (temp file + ``os.replace``), ``config.json`` last: it
records the hashes of the files it goes with, so a load that finds a mismatch (a write
torn by a crash between two files) says so instead of returning mixed weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ate_fast.align.atomic_io import (
    atomic_save_safetensors,
    atomic_write_json,
    file_sha256,
    load_safetensors,
)
from ate_fast.align.prior import LatentPrior
from ate_fast.align.vae import ActionVAE
from ate_fast.data.action_space import ActionSpaceMap
from ate_fast.data.normalization import Normalizer

CHECKPOINT_FORMAT = "ate_fast.align.checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PRIOR_FILE = "prior.safetensors"
RESUME_FILE = "resume.safetensors"
RESUME_FORMAT = "ate_fast.align.resume"

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or of another format."""


@dataclass
class AlignCheckpoint:
    """A loaded checkpoint: the VAE (eval mode) and what is needed to use it."""

    path: Path
    vae: ActionVAE
    config: dict[str, Any]
    normalizer: Optional[Normalizer]
    action_space: Optional[ActionSpaceMap]
    prior: Optional[LatentPrior]

    @property
    def stage(self) -> int:
        return int(self.config["stage"])


def save_checkpoint(
    out_dir: PathLike,
    vae: ActionVAE,
    *,
    stage: int,
    normalizer: Optional[Normalizer] = None,
    action_space: Optional[ActionSpaceMap] = None,
    prior: Optional[LatentPrior] = None,
    train_config: Optional[dict[str, Any]] = None,
    progress: Optional[dict[str, Any]] = None,
    chunking: Optional[dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors`` (+ ``prior.safetensors``), then ``config.json``.

    Returns the checkpoint directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(vae.state_dict(), out / WEIGHTS_FILE, {"format": CHECKPOINT_FORMAT})
    files = {"weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(out / WEIGHTS_FILE)}}
    if prior is not None:
        prior.save(out / PRIOR_FILE)
        files["prior"] = {"file": PRIOR_FILE, "sha256": file_sha256(out / PRIOR_FILE)}
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "stage": int(stage),
        "vae": vae.config,
        "normalizer": None if normalizer is None else normalizer.to_dict(),
        "action_space": None if action_space is None else action_space.to_dict(),
        "chunking": chunking,
        "prior": None if prior is None else {"kind": prior.kind, **prior.info},
        "train": train_config,
        "progress": progress or {},
        "files": files,
    }
    atomic_write_json(out / CONFIG_FILE, config)
    return out


def read_checkpoint_config(path: PathLike) -> dict[str, Any]:
    """The checked ``config.json`` of a checkpoint directory."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: not an align checkpoint (no {CONFIG_FILE})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: corrupt JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{cfg_path}: not an ate_fast align checkpoint config")
    if config.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: checkpoint version {config['version']} is newer than this "
            f"ate_fast supports ({CHECKPOINT_VERSION})"
        )
    return config


def _verified(path: Path, entry: dict[str, str]) -> Path:
    file = path / entry["file"]
    if not file.is_file():
        raise CheckpointError(f"{path}: missing {entry['file']}")
    if file_sha256(file) != entry["sha256"]:
        raise CheckpointError(
            f"{file}: content does not match the hash in {CONFIG_FILE} (a write was "
            f"interrupted or the file was modified)"
        )
    return file


def load_checkpoint(
    path: PathLike, map_location: Union[str, torch.device] = "cpu"
) -> AlignCheckpoint:
    """Load a checkpoint directory written by :func:`save_checkpoint` (or a trainer).

    Raises:
        CheckpointError: missing directory/file, corrupt JSON or weights, hash mismatch,
            weights that do not fit the recorded VAE config.
    """
    path = Path(path)
    config = read_checkpoint_config(path)
    weights_file = _verified(path, config["files"]["weights"])
    tensors, _ = load_safetensors(weights_file, str(map_location))
    vae = ActionVAE.from_config(config["vae"])
    try:
        vae.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights_file}: weights do not match the VAE config ({exc})"
        ) from exc
    vae.to(map_location).eval()
    prior = None
    if "prior" in config["files"]:
        prior = LatentPrior.load(_verified(path, config["files"]["prior"]), str(map_location))
    normalizer = Normalizer.from_dict(config["normalizer"]) if config.get("normalizer") else None
    space = config.get("action_space")
    action_space = ActionSpaceMap.from_dict(space) if space else None
    return AlignCheckpoint(path, vae, config, normalizer, action_space, prior)


# --- resume state ----------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``optim.<param>.<key>``) and JSON."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": _json_safe(state["param_groups"]), "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_resume_state(path: PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """One atomic safetensors file: ``tensors`` plus ``meta`` as JSON in its header."""
    atomic_save_safetensors(
        tensors, path, {"format": RESUME_FORMAT, "state": json.dumps(_json_safe(meta))}
    )


def load_resume_state(
    path: PathLike, map_location: str = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` written by :func:`save_resume_state`."""
    try:
        tensors, header = load_safetensors(path, map_location)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if header.get("format") != RESUME_FORMAT or "state" not in header:
        raise CheckpointError(f"{path}: not an ate_fast resume state")
    return tensors, json.loads(header["state"])

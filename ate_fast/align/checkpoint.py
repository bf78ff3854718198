"""Align checkpoints: a directory of safetensors weights + JSON config (+ prior + resume).

Layout of ``out_dir``::

    config.json          kind, package version, VAE config, normalisation statistics,
                         unified action space, chunking, training config, progress, the
                         SHA-256 of every file below, and a SHA-256 over all of it
    model.safetensors    VAE weights
    prior.safetensors    (stage 2) the stage-1 latent prior it was trained against
    resume.safetensors   optimiser, scheduler, RNG states and progress for ``resume=True``

Every file is written atomically (temp file + ``os.replace``, permissions as ``open()``
would give), ``config.json`` last: it records the hashes of the files it goes with, so a
load that finds a mismatch (a write torn by a crash between two files) says so instead
of returning mixed weights. ``metadata_sha256`` covers the rest of ``config.json`` (and
through the file hashes, the tensors): an edited normaliser statistic is refused.

A checkpoint records its **kind** (``"vae-stage1"`` or ``"vae-stage2"``); a loader asked
for one kind refuses the other with :class:`CheckpointKindError`. Checkpoints of format
version 1 (before kinds and the metadata hash) still load: their kind is inferred from
the recorded ``stage`` (always present, so never ambiguous), and a ``UserWarning`` says
that their ``config.json`` cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ate_fast._version import __version__
from ate_fast.align.atomic_io import (
    atomic_save_safetensors,
    atomic_write_json,
    file_sha256,
    load_safetensors,
)
from ate_fast.align.errors import CheckpointError, CheckpointIntegrityError, CheckpointKindError
from ate_fast.align.prior import LatentPrior
from ate_fast.align.vae import ActionVAE
from ate_fast.data.action_space import ActionSpaceMap
from ate_fast.data.file_format import describe_format, sniff_format
from ate_fast.data.normalization import Normalizer

CHECKPOINT_FORMAT = "ate_fast.align.checkpoint"
CHECKPOINT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PRIOR_FILE = "prior.safetensors"
RESUME_FILE = "resume.safetensors"
RESUME_FORMAT = "ate_fast.align.resume"
METADATA_HASH_KEY = "metadata_sha256"
KIND_STAGE1 = "vae-stage1"
KIND_STAGE2 = "vae-stage2"
STAGE_KINDS = {1: KIND_STAGE1, 2: KIND_STAGE2}
KIND_NAMES = {KIND_STAGE1: "a stage-1 VAE", KIND_STAGE2: "a stage-2 VAE"}

PathLike = Union[str, "os.PathLike[str]"]
KindSpec = Union[str, Sequence[str], None]

__all__ = [
    "AlignCheckpoint",
    "CheckpointError",
    "CheckpointIntegrityError",
    "CheckpointKindError",
    "load_checkpoint",
    "read_checkpoint_config",
    "save_checkpoint",
]


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

    @property
    def kind(self) -> str:
        """``"vae-stage1"`` or ``"vae-stage2"``."""
        return str(self.config["kind"])


def metadata_sha256(config: dict[str, Any]) -> str:
    """Hex SHA-256 of ``config`` without its own hash, as canonical JSON."""
    body = {k: v for k, v in config.items() if k != METADATA_HASH_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
    if stage not in STAGE_KINDS:
        raise ValueError(f"stage: expected 1 or 2, got {stage!r}")
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
        "kind": STAGE_KINDS[int(stage)],
        "package_version": __version__,
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
    config = json.loads(json.dumps(config))  # the hash is over what a reader will parse
    config[METADATA_HASH_KEY] = metadata_sha256(config)
    atomic_write_json(out / CONFIG_FILE, config)
    return out


def _not_a_directory(path: Path) -> CheckpointError:
    fmt = sniff_format(path)
    hint = ""
    if fmt == "safetensors":
        hint = " (a prior file from `ate-fast align prior`, or one file of a checkpoint?)"
    return CheckpointError(
        f"{path}: expected an align checkpoint directory (with {CONFIG_FILE}), but it is "
        f"{describe_format(fmt)}{hint}"
    )


def _parse_config(path: Path) -> dict[str, Any]:
    """``config.json`` parsed, its format and version checked."""
    if path.is_file():
        raise _not_a_directory(path)
    cfg_path = path / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: not an align checkpoint (no such directory)")
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: not an align checkpoint (no {CONFIG_FILE})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: corrupt JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(
            f"{cfg_path}: not an ate_fast align checkpoint config (format "
            f"{CHECKPOINT_FORMAT!r} expected, {found!r} found)"
        )
    version = config.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: checkpoint version {version!r} is newer than this ate_fast "
            f"({__version__}) supports ({CHECKPOINT_VERSION}); upgrade ate_fast"
        )
    return config


def _check_fields(cfg_path: Path, config: dict[str, Any]) -> None:
    """The entries every loader reads are there and have the right shape."""
    files = config.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(
            f"{cfg_path}: missing field 'files' (the checkpoint's files and their SHA-256, "
            f"'files.weights' at least)"
        )
    weights = files.get("weights")
    if not isinstance(weights, dict) or not {"file", "sha256"} <= set(weights):
        raise CheckpointError(
            f"{cfg_path}: missing field 'files.weights' ({{'file': ..., 'sha256': ...}}); "
            f"found {weights!r}"
        )
    if not isinstance(config.get("vae"), dict):
        raise CheckpointError(f"{cfg_path}: missing field 'vae' (the VAE's config)")
    if config.get("stage") not in STAGE_KINDS:
        raise CheckpointError(
            f"{cfg_path}: field 'stage' expected 1 or 2, found {config.get('stage')!r}"
        )


def _check_integrity(cfg_path: Path, config: dict[str, Any]) -> None:
    """Version 2: the metadata hash matches and the recorded kind agrees with the stage.
    Version 1: kind inferred from the stage, with a warning."""
    inferred = STAGE_KINDS[config["stage"]]
    if config.get("version", 0) < 2:
        warnings.warn(
            f"{cfg_path}: written by an older ate_fast (checkpoint version "
            f"{config.get('version', 0)}) without a kind or a metadata hash; loaded as "
            f"{inferred!r} (from its stage), its config.json cannot be verified. Save it "
            f"again (save_checkpoint) to upgrade it.",
            UserWarning,
            stacklevel=4,
        )
        config["kind"] = inferred
        return
    recorded = config.get(METADATA_HASH_KEY)
    actual = metadata_sha256(config)
    if recorded != actual:
        raise CheckpointIntegrityError(
            f"{cfg_path}: metadata hash mismatch: expected {recorded!r} (recorded when it "
            f"was written), found {actual!r}; config.json was edited after it was written "
            f"(e.g. normaliser statistics) or is corrupt"
        )
    if config.get("kind") != inferred:
        raise CheckpointIntegrityError(
            f"{cfg_path}: kind {config.get('kind')!r} does not match stage {config['stage']}"
        )


def _check_kind(path: Path, config: dict[str, Any], kind: KindSpec) -> None:
    if kind is None:
        return
    wanted = [kind] if isinstance(kind, str) else list(kind)
    if config["kind"] not in wanted:
        expected = " or ".join(f"{KIND_NAMES.get(k, k)} ({k!r})" for k in wanted)
        got = config["kind"]
        raise CheckpointKindError(
            f"{path}: expected {expected} checkpoint, got {KIND_NAMES.get(got, got)} ({got!r})"
        )


def read_checkpoint_config(path: PathLike, kind: KindSpec = None) -> dict[str, Any]:
    """The checked ``config.json`` of a checkpoint directory (``"kind"`` filled in for
    version-1 checkpoints).

    Args:
        kind: ``"vae-stage1"``, ``"vae-stage2"``, a list of them, or ``None`` (any).

    Raises:
        CheckpointError: not a checkpoint directory, corrupt or incomplete ``config.json``.
        CheckpointIntegrityError: ``config.json`` does not match its recorded hash.
        CheckpointKindError: a checkpoint of another kind than ``kind``.
    """
    path = Path(path)
    config = _parse_config(path)
    cfg_path = path / CONFIG_FILE
    _check_fields(cfg_path, config)
    _check_integrity(cfg_path, config)
    _check_kind(path, config, kind)
    return config


def _verified(path: Path, entry: dict[str, str]) -> Path:
    file = path / entry["file"]
    if not file.is_file():
        raise CheckpointError(f"{path}: missing {entry['file']}")
    found = file_sha256(file)
    if found != entry["sha256"]:
        raise CheckpointIntegrityError(
            f"{file}: content does not match the hash in {CONFIG_FILE} (expected "
            f"{entry['sha256']!r}, found {found!r}): a write was interrupted or the file "
            f"was modified"
        )
    return file


def _normalizer(cfg_path: Path, data: Any) -> Optional[Normalizer]:
    if not data:
        return None
    try:
        return Normalizer.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: unreadable 'normalizer' entry ({exc!r})") from exc


def load_checkpoint(
    path: PathLike, map_location: Union[str, torch.device] = "cpu", kind: KindSpec = None
) -> AlignCheckpoint:
    """Load a checkpoint directory written by :func:`save_checkpoint` (or a trainer).

    Args:
        kind: the kind(s) accepted (``"vae-stage1"``, ``"vae-stage2"``); ``None``: any.

    Raises:
        CheckpointError: missing directory/file, corrupt or incomplete JSON, weights that
            do not fit the recorded VAE config.
        CheckpointIntegrityError: a file or ``config.json`` does not match its hash.
        CheckpointKindError: a checkpoint of another kind than ``kind``.
    """
    path = Path(path)
    config = read_checkpoint_config(path, kind)
    weights_file = _verified(path, config["files"]["weights"])
    tensors, _ = load_safetensors(weights_file, str(map_location))
    try:
        vae = ActionVAE.from_config(config["vae"])
        vae.load_state_dict(tensors)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{weights_file}: weights do not match the VAE config ({exc})"
        ) from exc
    vae.to(map_location).eval()
    prior = None
    if "prior" in config["files"]:
        prior = LatentPrior.load(_verified(path, config["files"]["prior"]), str(map_location))
    normalizer = _normalizer(path / CONFIG_FILE, config.get("normalizer"))
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

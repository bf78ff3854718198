"""``LatentPrior``: the stage-1 latent distribution summarised for stage 2 (ATE_METHOD.md).

Every prior is stored as a diagonal Gaussian mixture (``K = 1`` for the Gaussian kinds):

- ``gaussian`` (paper): ``N(μ̄, diag v̄)`` with ``μ̄ = mean_i μ_i`` and
  ``v̄ = mean_i(σ_i² + μ_i²) − μ̄²`` — the law of total variance, the aggregate posterior's
  true second moment.
- ``gaussian-code`` (released code): ``μ̄ = mean_i μ_i``, ``σ̄ = mean_i σ_i``; it drops the
  spread of the means. Kept only to reproduce the released code.
- ``gmm``: a ``K``-component diagonal mixture fitted to the ``μ_i`` by EM.
- ``standard``: ``N(0, I)``, the stage-1 prior.

A prior file is one safetensors file whose header records the format, the package
version, how it was fitted (``info``: the stage-1 VAE's config, horizon, ...) and a
SHA-256 over the tensors and that metadata; :meth:`LatentPrior.load` tells the file by
its content and refuses anything else (a torch file, an align checkpoint, edited
metadata) with a named :class:`~ate_fast.align.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ate_fast._version import __version__
from ate_fast.align.atomic_io import atomic_save_safetensors, load_safetensors, tensors_sha256
from ate_fast.align.data_loading import iterate_batches
from ate_fast.align.errors import CheckpointError, CheckpointIntegrityError, CheckpointKindError
from ate_fast.align.gmm import diagonal_log_prob, fit_diagonal_gmm
from ate_fast.data.file_format import describe_format, sniff_format

PRIOR_KINDS = ("gaussian", "gaussian-code", "gmm", "standard")
PRIOR_FORMAT = "ate_fast.latent_prior"
PRIOR_FILE_KIND = "latent-prior"
PRIOR_FILE_VERSION = "2"
CONTENT_HASH_KEY = "content_sha256"
# what other ate_fast safetensors files are, for the message when one is given as a prior
OTHER_FORMATS = {
    "ate_fast.align.checkpoint": "the weights of an align VAE checkpoint (model.safetensors)",
    "ate_fast.align.resume": "the resume state of an align run (resume.safetensors)",
}


class LatentPrior(nn.Module):
    """A diagonal Gaussian mixture over ``R^{d_z}``.

    Buffers (float32): ``weights [K]``, ``means [K, d_z]``, ``variances [K, d_z]``.
    ``info`` holds how it was fitted (kind, number of latents, EM result).
    """

    weights: Tensor
    means: Tensor
    variances: Tensor

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        variances: Tensor,
        kind: str = "gmm",
        info: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if kind not in PRIOR_KINDS:
            raise ValueError(f"kind: expected one of {list(PRIOR_KINDS)}, got {kind!r}")
        if means.dim() != 2 or variances.shape != means.shape or weights.shape != means.shape[:1]:
            raise ValueError(
                "weights/means/variances: expected [K], [K, d], [K, d], got "
                f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(variances.shape)}"
            )
        finite = all(bool(torch.isfinite(t).all()) for t in (weights, means, variances))
        if not finite:  # NaN passes every comparison below
            raise ValueError("weights/means/variances: expected finite values, got NaN or inf")
        if (variances <= 0).any() or (weights < 0).any() or not weights.sum() > 0:
            raise ValueError("variances must be > 0 and weights >= 0 with a positive sum")
        self.kind = kind
        self.info = dict(info or {})
        self.register_buffer("weights", (weights / weights.sum()).float())
        self.register_buffer("means", means.float())
        self.register_buffer("variances", variances.float())

    # --- construction -------------------------------------------------------------------
    @classmethod
    def standard_normal(cls, latent_dim: int) -> LatentPrior:
        """``N(0, I)`` in ``d_z = latent_dim`` dims."""
        return cls(torch.ones(1), torch.zeros(1, latent_dim), torch.ones(1, latent_dim), "standard")

    @classmethod
    def from_latents(
        cls,
        mu: Tensor,
        logvar: Tensor,
        kind: str = "gaussian",
        n_components: int = 8,
        seed: int = 0,
        max_iter: int = 200,
        tol: float = 1e-5,
    ) -> LatentPrior:
        """Summarise the posteriors ``N(μ_i, diag exp(logvar_i))``, each ``[N, d_z]``."""
        if mu.dim() != 2 or logvar.shape != mu.shape:
            raise ValueError(
                f"mu/logvar: expected two [N, d_z] tensors, got {tuple(mu.shape)}, "
                f"{tuple(logvar.shape)}"
            )
        mu64, var64 = mu.detach().double().cpu(), logvar.detach().double().cpu().exp()
        if not (torch.isfinite(mu64).all() and torch.isfinite(var64).all()):
            bad = int((~torch.isfinite(mu64) | ~torch.isfinite(var64)).any(1).sum())
            raise ValueError(
                f"mu/logvar: expected finite latents, got NaN or inf in {bad} of "
                f"{mu.shape[0]} (a diverged encoder?)"
            )
        info: dict[str, Any] = {"n_latents": int(mu.shape[0])}
        if kind == "gaussian":
            mean = mu64.mean(0)
            var = (var64 + mu64**2).mean(0) - mean**2  # law of total variance
            return cls(torch.ones(1), mean[None], var.clamp_min(1e-12)[None], kind, info)
        if kind == "gaussian-code":
            mean, std = mu64.mean(0), var64.sqrt().mean(0)
            return cls(torch.ones(1), mean[None], (std**2)[None], kind, info)
        if kind == "gmm":
            fit = fit_diagonal_gmm(mu64, n_components, max_iter=max_iter, tol=tol, seed=seed)
            info.update(
                n_components=n_components,
                em_iterations=fit.n_iter,
                em_converged=fit.converged,
                em_log_likelihood=fit.log_likelihood,
            )
            return cls(fit.weights, fit.means, fit.variances, kind, info)
        if kind == "standard":
            return cls.standard_normal(mu.shape[1])
        raise ValueError(f"kind: expected one of {list(PRIOR_KINDS)}, got {kind!r}")

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        vae: nn.Module,
        data: Any,
        kind: str = "gaussian",
        n_components: int = 8,
        batch_size: int = 256,
        device: Union[str, torch.device, None] = None,
        seed: int = 0,
        progress: bool = True,
    ) -> LatentPrior:
        """Encode every chunk of ``data`` with ``vae`` (eval mode) and summarise.

        ``data``: a dataset of ``(chunk [H, D], mask [D])`` (or ``(chunk, mask, steps)``)
        or of chunks, or a tensor ``[N, H, D]``.
        """
        was_training = vae.training
        vae.eval()
        device = torch.device(device) if device is not None else next(vae.parameters()).device
        mus, logvars = [], []
        for a, mask, _ in tqdm(  # padded steps are encoded as the loader fills them
            iterate_batches(data, batch_size), desc=f"encoding ({kind} prior)", disable=not progress
        ):
            a = a.to(device)
            mask = None if mask is None else mask.to(device)
            mu, logvar = vae.encode(a, mask)
            mus.append(mu.float().cpu())
            logvars.append(logvar.float().cpu())
        vae.train(was_training)
        if not mus:
            raise ValueError("data: no chunks to encode")
        return cls.from_latents(torch.cat(mus), torch.cat(logvars), kind, n_components, seed)

    # --- the distribution ---------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def is_gaussian(self) -> bool:
        return self.n_components == 1

    @property
    def mean(self) -> Tensor:
        """``[d_z]``: ``Σ_k w_k μ_k``."""
        return self.weights @ self.means

    def marginal_variance(self) -> Tensor:
        """``[d_z]``: the per-dim variance of the mixture (within + between components)."""
        second = self.weights @ (self.variances + self.means**2)
        return second - self.mean**2

    def log_prob(self, z: Tensor) -> Tensor:
        """``z [N, d_z]`` → ``log p(z)`` ``[N]`` (computed in float32 or wider)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z: expected [N, d_z]=[N, {self.latent_dim}], got {tuple(z.shape)}")
        dtype = torch.promote_types(z.dtype, torch.float32)
        joint = diagonal_log_prob(
            z.to(dtype), self.weights.to(dtype), self.means.to(dtype), self.variances.to(dtype)
        )
        return torch.logsumexp(joint, dim=1)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` draws, ``[n, d_z]`` float32, on the prior's device."""
        dev = self.means.device
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.latent_dim, generator=generator, device=dev)
        return self.means[comp] + self.variances[comp].sqrt() * eps

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, K={self.n_components}, d_z={self.latent_dim}"

    # --- files --------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write a safetensors file (tensors + JSON metadata + content hash), atomically."""
        meta = {
            "format": PRIOR_FORMAT,
            "version": PRIOR_FILE_VERSION,
            "checkpoint_kind": PRIOR_FILE_KIND,
            "package_version": __version__,
            "kind": self.kind,
            "info": json.dumps(self.info),
        }
        tensors = {"weights": self.weights, "means": self.means, "variances": self.variances}
        meta[CONTENT_HASH_KEY] = tensors_sha256(tensors, meta)
        atomic_save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location: str = "cpu") -> LatentPrior:
        """Read a file written by :meth:`save` (any version).

        Raises:
            CheckpointError: not a safetensors file (a torch file, a directory, ...).
            CheckpointKindError: another ate_fast file (e.g. checkpoint weights).
            CheckpointIntegrityError: tensors or metadata do not match the recorded hash.
        """
        fmt = sniff_format(path)
        if fmt != "safetensors":
            hint = " (an align checkpoint directory?)" if fmt == "directory" else ""
            raise CheckpointError(
                f"{path}: expected a LatentPrior file (safetensors, from `ate-fast align "
                f"prior`), but it is {describe_format(fmt)}{hint}"
            )
        tensors, meta = load_safetensors(path, map_location)
        _check_prior_file(path, tensors, meta)
        try:
            info = json.loads(meta.get("info", "{}"))
            return cls(
                tensors["weights"], tensors["means"], tensors["variances"], meta["kind"], info
            )
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: unreadable LatentPrior file ({exc})") from exc

    def describe(self) -> str:
        """One line for logs."""
        var = self.marginal_variance()
        return (
            f"{self.kind} prior: K={self.n_components}, d_z={self.latent_dim}, "
            f"|mean|={self.mean.norm().item():.3g}, mean var={var.mean().item():.3g}, "
            f"min var={var.min().item():.3g}"
        )


def _check_prior_file(path: Any, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """The file is a LatentPrior of a known version whose content hash (version 2) holds."""
    found = meta.get("format")
    if found in OTHER_FORMATS:
        raise CheckpointKindError(
            f"{path}: expected a LatentPrior file (kind {PRIOR_FILE_KIND!r}), got "
            f"{OTHER_FORMATS[found]}"
        )
    if found != PRIOR_FORMAT or not {"weights", "means", "variances"} <= set(tensors):
        raise CheckpointError(
            f"{path}: not a LatentPrior file (format {PRIOR_FORMAT!r} expected, {found!r} "
            f"found; tensors {sorted(tensors)})"
        )
    version = meta.get("version", "1")
    if version not in ("1", PRIOR_FILE_VERSION):
        raise CheckpointError(
            f"{path}: LatentPrior file version {version!r} is newer than this ate_fast "
            f"({__version__}) supports ({PRIOR_FILE_VERSION}); upgrade ate_fast"
        )
    if version == "1":
        return  # written before content hashes: nothing to verify
    recorded = meta.get(CONTENT_HASH_KEY)
    actual = tensors_sha256(tensors, {k: v for k, v in meta.items() if k != CONTENT_HASH_KEY})
    if recorded != actual:
        raise CheckpointIntegrityError(
            f"{path}: content hash mismatch: expected {recorded!r} (recorded when it was "
            f"written), found {actual!r}; the prior's tensors or metadata were modified"
        )

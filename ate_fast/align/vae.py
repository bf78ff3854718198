"""``ActionVAE``: an action-chunk VAE, ``[B, H, D]`` ↔ ``[B, d_z]``, in two architectures."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ate_fast.align.mlp_vae import MLPDecoder, MLPEncoder
from ate_fast.align.transformer_vae import TransformerDecoder, TransformerEncoder

ARCHS = ("transformer", "mlp")

_ARCH_MODULES = {
    "transformer": (TransformerEncoder, TransformerDecoder),
    "mlp": (MLPEncoder, MLPDecoder),
}


def _arch_defaults(arch: str) -> dict[str, Any]:
    """The architecture-specific keyword arguments and their defaults."""
    params = inspect.signature(_ARCH_MODULES[arch][0].__init__).parameters
    skip = {"self", "action_dim", "horizon", "latent_dim"}
    return {k: p.default for k, p in params.items() if k not in skip}


class VAEOutput(NamedTuple):
    """``recon [B, H, D]``, ``mu``/``logvar``/``z`` ``[B, d_z]``."""

    recon: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor


def _check_transformer_sizes(kwargs: dict[str, Any]) -> None:
    """The Transformer's sizes named where torch's own check would assert without a name."""
    if "num_heads" not in kwargs:
        return
    d_model, heads = kwargs["d_model"], kwargs["num_heads"]
    if isinstance(heads, int) and heads >= 1 and isinstance(d_model, int) and d_model % heads:
        raise ValueError(f"num_heads: d_model = {d_model} must be divisible by num_heads = {heads}")
    dropout = kwargs.get("dropout", 0.0)
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not (0.0 <= dropout < 1.0)
    ):
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")


class ActionVAE(nn.Module):
    """Action-chunk VAE: ``E(a) → (μ, log σ²)``, ``z = μ + σ ⊙ ε``, ``D(z) → â``.

    Args:
        action_dim: ``D`` (the unified action dim).
        horizon: ``H``.
        latent_dim: ``d_z`` (512 in the paper).
        arch: ``"transformer"`` (the paper's skip-connected Transformer; keyword
            arguments ``d_model=512, num_heads=4, ff_dim=1024, num_layers=9, dropout=0.0,
            activation="gelu"``) or ``"mlp"`` (``hidden_dims=(512, 512),
            activation="gelu"``; decoder hidden sizes mirrored).
        **arch_kwargs: the architecture's keyword arguments above; others are an error.

    ``vae.encoder`` is an ``nn.Module`` with ``encoder(a [B, H, D], mask=None) → (μ, log σ²)``;
    ``vae.decoder(z) → [B, H, D]``. ``vae.config`` rebuilds the model
    (``ActionVAE.from_config``). The released code uses dropout 0, as does the default.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        latent_dim: int = 512,
        arch: str = "transformer",
        **arch_kwargs: Any,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch: expected one of {list(ARCHS)}, got {arch!r}")
        for name, value in (
            ("action_dim", action_dim),
            ("horizon", horizon),
            ("latent_dim", latent_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        defaults = _arch_defaults(arch)
        unknown = sorted(set(arch_kwargs) - set(defaults))
        if unknown:
            raise TypeError(
                f"ActionVAE(arch={arch!r}) got unexpected arguments {unknown}; "
                f"valid: {sorted(defaults)}"
            )
        kwargs = {**defaults, **arch_kwargs}
        _check_transformer_sizes(kwargs)
        if "hidden_dims" in kwargs:
            kwargs["hidden_dims"] = tuple(int(h) for h in kwargs["hidden_dims"])
        self.action_dim, self.horizon, self.latent_dim, self.arch = (
            action_dim,
            horizon,
            latent_dim,
            arch,
        )
        self.arch_kwargs = kwargs
        enc_cls, dec_cls = _ARCH_MODULES[arch]
        self.encoder = enc_cls(action_dim, horizon, latent_dim, **kwargs)
        self.decoder = dec_cls(action_dim, horizon, latent_dim, **kwargs)

    # --- config -------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in self.arch_kwargs.items()}
        return {
            "action_dim": self.action_dim,
            "horizon": self.horizon,
            "latent_dim": self.latent_dim,
            "arch": self.arch,
            **kwargs,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ActionVAE:
        cfg = dict(config)
        return cls(
            cfg.pop("action_dim"), cfg.pop("horizon"), cfg.pop("latent_dim"), cfg.pop("arch"), **cfg
        )

    # --- the VAE ------------------------------------------------------------------------
    def _check_actions(self, a: Tensor) -> None:
        if a.dim() != 3 or a.shape[1] != self.horizon or a.shape[2] != self.action_dim:
            raise ValueError(
                f"a: expected [B, H, D]=[B, {self.horizon}, {self.action_dim}], "
                f"got {tuple(a.shape)}"
            )

    def encode(self, a: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``a [B, H, D]`` → ``(μ, log σ²)``, each ``[B, d_z]``.

        ``mask`` (``[D]`` or ``[B, D]``, 1 on the dims the robot has) zeroes the absent
        dims before encoding.
        """
        self._check_actions(a)
        return self.encoder(a, mask)

    def decode(self, z: Tensor) -> Tensor:
        """``z [B, d_z]`` → ``â [B, H, D]``."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z: expected [B, d_z]=[B, {self.latent_dim}], got {tuple(z.shape)}")
        return self.decoder(z)

    @staticmethod
    def reparameterize(
        mu: Tensor, logvar: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """``z = μ + exp(½ log σ²) ⊙ ε``, ``ε ~ N(0, I)`` (from ``generator`` if given)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(
        self,
        a: Tensor,
        mask: Optional[Tensor] = None,
        sample: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> VAEOutput:
        """Encode, sample ``z`` (or take ``z = μ`` when ``sample=False``), decode."""
        mu, logvar = self.encode(a, mask)
        z = self.reparameterize(mu, logvar, generator) if sample else mu
        return VAEOutput(self.decoder(z), mu, logvar, z)

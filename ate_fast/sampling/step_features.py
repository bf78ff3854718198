"""Step features: what a head computes from (t, cond) alone, once per call for every step.

A head's forward mixes two kinds of work: what depends on the sample ``x`` (every step
must redo it) and what depends only on the time and the conditioning — the time
embedding and its projections, the FiLM scales of a U-Net, the conditioning prefix's
keys and values, rotary tables. A sampler knows all K model times before the first step,
so a head that splits its forward in two lets the sampler compute the second kind once
per call, for all K steps in one batched pass, instead of K times:

- ``head.step_features(x [B, H, D], t [N, B], cond) -> sequence of N feature objects``:
  the x-independent part of the forward at N times at once (one per row of ``t``; ``x``
  is the sample, read for its shape, dtype and device: the head checks its inputs here);
- ``head.forward_features(x [B, H, D], features) -> [B, H, D]``: the rest, with
  ``forward(x, t, cond) == forward_features(x, step_features(x, t[None], cond)[0])``
  (the same ops; only the N-row batching of the x-independent part may round
  differently, and a head may merge GEMMs over a call of N > 1 steps — the flow
  transformer's q and kv projections on a GPU — which rounds like the separate ones to
  the GEMM's summation order).

A head with an input-VJP (``forward_with_vjp``, real-time chunking) may also define
``forward_with_vjp_features(x, features) -> (out, pullback)``, so that a guided loop
through the policy reads the same features as an unguided one. The reference heads
(:mod:`ate_fast.models`) implement it. ``sample()`` and ``capture()``
use it when ``model_fn`` is such a head (:func:`step_features_of`): the features are
computed in each call (in a captured loop: inside the CUDA graph or the CPU replay), so
a change of the weights or of ``cond`` between calls is always seen.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Callable, Optional, Protocol

from torch import Tensor, nn

from ate_fast.module_checks import forward_hooks_active


class StepFeatureHead(Protocol):
    """A head whose forward splits into step features and the x-dependent rest."""

    def step_features(self, x: Tensor, t: Tensor, cond: Any) -> Sequence[Any]: ...

    def forward_features(self, x: Tensor, features: Any) -> Tensor: ...


def own_head_methods(model_fn: Callable, *names: str) -> Optional[nn.Module]:
    """The ``nn.Module`` behind ``model_fn`` when its class defines every method in
    ``names`` next to the ``forward`` that runs, and it has no forward hooks; else None.

    ``model_fn`` may be the module or its bound ``forward`` / ``__call__``. A subclass that
    overrides ``forward`` but not the methods computes another function with them, and
    hooks would be skipped by calling them instead of the module: both get None.
    """
    owner = model_fn
    if inspect.ismethod(model_fn) and model_fn.__name__ in ("forward", "__call__"):
        owner = model_fn.__self__
    if not isinstance(owner, nn.Module):
        return None
    cls = type(owner)
    for name in names:
        home = next((c for c in cls.__mro__ if name in vars(c)), None)
        if home is None or vars(home).get("forward") is not cls.forward:
            return None
    if forward_hooks_active(owner):
        return None
    return owner


def step_features_of(model_fn: Callable) -> Optional[StepFeatureHead]:
    """``model_fn``'s head when it has step features (:class:`StepFeatureHead`), else None."""
    return own_head_methods(model_fn, "step_features", "forward_features")  # type: ignore[return-value]


class StepFeatureCache:
    """One call's step features: computed for a whole table of model times [K, B] the first
    time one of its rows is evaluated, then looked up by row; :meth:`reset` per call.

    Args:
        head: the :class:`StepFeatureHead`.
        blocks: table name -> model times [K, B] (:attr:`StepTables.time_blocks`).
        rows: ``id(row)`` -> (table name, k) for the tables' row tensors.
        cond: the call's conditioning (the capture's static copy on a captured loop).
    """

    def __init__(
        self,
        head: StepFeatureHead,
        blocks: dict[str, Tensor],
        rows: dict[int, tuple[str, int]],
        cond: Any,
    ) -> None:
        self.head = head
        self.blocks = blocks
        self.rows = rows
        self.cond = cond
        self._features: dict[str, Sequence[Any]] = {}
        self._with_vjp = own_head_methods(head, "forward_with_vjp_features") is not None

    def reset(self) -> None:
        """Forget the features: the next call computes them again (weights, cond may change)."""
        self._features.clear()

    def features(self, x: Tensor, t: Tensor) -> Optional[Any]:
        """The features of the table row ``t`` [B] (its table's computed at the first
        request, ``x`` [B, H, D] the sample); None when ``t`` is not a row of the tables."""
        where = self.rows.get(id(t))
        if where is None:
            return None
        name, k = where
        features = self._features.get(name)
        if features is None:
            features = self.head.step_features(x, self.blocks[name], self.cond)
            self._features[name] = features
        return features[k]

    def forward(self, x: Tensor, t: Tensor) -> Optional[Tensor]:
        """The head's output at ``x`` [B, H, D] and the table row ``t`` [B]; None when ``t``
        is not a row of the tables (the caller then calls the head itself)."""
        features = self.features(x, t)
        return None if features is None else self.head.forward_features(x, features)

    def forward_with_vjp(self, x: Tensor, t: Tensor) -> Optional[tuple[Tensor, Callable]]:
        """The head's ``forward_with_vjp_features`` at ``x`` and the table row ``t``; None
        when the head has none or ``t`` is not a row of the tables."""
        if not self._with_vjp:
            return None
        features = self.features(x, t)
        if features is None:
            return None
        return self.head.forward_with_vjp_features(x, features)  # type: ignore[attr-defined]

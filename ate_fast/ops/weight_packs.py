"""A captured CPU sampler's weights, packed once for oneDNN's GEMMs.

Given a plain weight, oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, which
:mod:`ate_fast.models.cpu_gemm` runs the heads' float32 GEMMs on where it selects oneDNN)
reorders it into its blocked layout at every call — for a batch-1 step that copy can cost
more than the product. A captured sampler (``capture()`` on the CPU) calls the same
weights call after call, so it keeps a :class:`WeightPacks`: each ``nn.Parameter`` that
oneDNN multiplies is reordered once (``torch.ops.mkldnn._reorder_linear_weight``, what
Inductor's CPU freezing does) and every later GEMM reads the packed copy — where its
product is the plain weight's bit for bit. Mostly it is (the same kernel on the same
values), but oneDNN may sum in another order for some shapes and layouts, more or fewer
with its build: torch 2.13 for a transposed weight at one row, torch 2.11 for several more
(a flow transformer's captured loop came out 7·10⁻⁷ off ``sample()``; torch 2.4.1 for
bfloat16 copies too, one ulp off ATen's on a few elements). So each copy's product is
compared with the unpacked one on random probe rows, and a copy of the same kind on rows
whose result depends on the order of the adds (:func:`_same_product`: four GEMMs of that
size and one reorder, in the first call), once per kind of copy — shape, strides, dtype,
the reorder's row hint — and row count, which is what oneDNN picks its kernels by; where they
differ that GEMM reads the plain weight: a captured call computes what ``sample()``
computes, bit for bit. Measured on one thread of an AMD EPYC (Zen 4), ``capture()``
with / without packs (``benchmarks/cpu_head_targets.py --unpacked``;
benchmarks/README.md): the Diffusion Policy U-Net (DDIM 10) 1.44×, the small flow
transformer 1.16×, the MLP head 1.04× faster. bfloat16 weights of at least
``cpu_gemm.BF16_MIN_WEIGHT`` elements too (ATen runs bf16 on oneDNN's matmul already, and
reorders them at every call as well; where oneDNN runs bf16 on this CPU:
:func:`bf16_packing_available`): the DP U-Net's bf16 ``capture()`` 1.17×, the small flow
transformer's 1.05× faster (a copy is read where its product is ATen's ``F.linear``'s).

When a packed copy is used again, at the first GEMM of each call that reads it:

* its weight must still be alive and unchanged: the same tensor at the same address, with
  the version counter it had when packed (an optimizer step, ``load_state_dict``, any
  in-place op under ``no_grad`` moves it) and the same values at :data:`PROBES` places
  spread over it (a write through ``.data`` or a NumPy view, which the counter misses);
* otherwise it is packed again from the weight as it is now.

So between calls a model may be trained, loaded or edited as usual; a write through
``.data`` that leaves every probed value as it was would go unseen —
:meth:`WeightPacks.clear` (``CapturedSampler.clear_weight_packs()``) drops every copy.
Only parameters are packed (a tensor made per call would be reordered every call); the
copies live as long as the captured sampler and take the weights' size again (the DP
U-Net: 244 MB). ``ATE_FAST_CPU_WEIGHT_PACKS=off`` turns packing off (read at each call).
``sample()`` packs nothing: it reads the weights as they are at every GEMM.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ate_fast.argument_checks import env_choice

ENV_VAR = "ATE_FAST_CPU_WEIGHT_PACKS"
CHOICES = ("on", "off")
PROBES = 64  # values compared per weight and call: first, last, and evenly between


@functools.cache
def packing_available() -> tuple[bool, str]:
    """``(ok, why not)``: this torch reorders a float32 linear weight for oneDNN and its
    linear op computes ``F.linear`` from the packed copy on a probe."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch was built without oneDNN (torch.backends.mkldnn)"
    try:
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 8, generator=gen), torch.randn(4, 8, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, RuntimeError) as exc:
        return False, f"torch.ops.mkldnn._reorder_linear_weight failed: {exc}"
    if not torch.allclose(got, F.linear(x, w), atol=1e-5):
        return False, "a packed weight's product differs from F.linear on a probe"
    return True, ""


@functools.cache
def bf16_packing_available() -> bool:
    """oneDNN multiplies bfloat16 on this CPU, and a packed bf16 weight's product equals
    ATen's bf16 ``F.linear`` (itself oneDNN's there) on a probe."""
    if not packing_available()[0]:
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        gen = torch.Generator().manual_seed(0)
        x, w = (torch.randn(*s, generator=gen).bfloat16() for s in ((3, 8), (4, 8)))
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return torch.allclose(got.float(), F.linear(x, w).float(), rtol=2**-7, atol=2**-7)


def _probe_places(owner: Tensor) -> Tensor:
    return torch.linspace(0, owner.numel() - 1, min(PROBES, owner.numel())).long()


def _probe_values(owner: Tensor, places: Tensor) -> Tensor:
    values = owner.detach()
    if values.is_contiguous():
        return values.view(-1)[places]
    return values[torch.unravel_index(places, values.shape)]  # no copy of the whole weight


@dataclass
class _Packed:
    owner: weakref.ref  # the parameter the weight is (or views)
    version: int
    places: Tensor
    probes: Tensor
    packed: Tensor
    checked_in: int  # the call (WeightPacks.calls) that last found it current
    hint: int  # the rows the reorder was given (its blocked layout may depend on them)


class WeightPacks:
    """Packed copies of the parameters oneDNN multiplied in a captured sampler's calls
    (the module's docs), keyed by the weight's address, shape and strides."""

    def __init__(self) -> None:
        self._packed: dict[tuple, _Packed] = {}
        # this call's GEMMs that oneDNN ran: (weight's key, rows, dtype) -> (owner, the
        # packed copy or the weight itself); emptied as each call ends (packing)
        self._chosen: dict[tuple, tuple[nn.Parameter, Tensor]] = {}
        # whether a packed copy's product is the plain weight's, by what oneDNN chooses its
        # kernels by — shape, strides, dtype, the reorder's row hint, the rows — not by the
        # values: checked on the first copy of each kind (π0's 126 weights: 7 kinds)
        self._exact: dict[tuple, bool] = {}
        self.calls = 0

    def __len__(self) -> int:
        return len(self._packed)

    def clear(self) -> None:
        """Drop every packed copy: the next call packs the weights as they are then."""
        self._packed.clear()
        self._chosen.clear()
        self._exact.clear()

    def chosen(self, weight: Tensor, rows: int, dtype: torch.dtype) -> Optional[Tensor]:
        """What an earlier GEMM of this call on ``rows`` rows of ``dtype`` input with
        ``weight`` gave oneDNN's op (:meth:`choose`: its packed copy, or the weight itself
        where the copy's product differs), or None: the step's later GEMMs with the same
        weight and rows need not choose again."""
        key = (weight.data_ptr(), weight.shape, weight.stride(), rows, dtype)
        entry = self._chosen.get(key)
        if entry is None or _parameter_of(weight) is not entry[0]:
            return None
        return entry[1]

    def choose(self, weight: Tensor, rows: int, dtype: torch.dtype, packed: Tensor) -> None:
        """Remember for the rest of this call that oneDNN ran ``weight`` on ``rows`` rows of
        ``dtype`` input from ``packed`` (:meth:`weight_for`'s answer in this call: the copy,
        or ``weight`` itself where the copy's product differs — remembered too, or such a
        weight would choose again at every step)."""
        owner = _parameter_of(weight)
        if owner is not None:
            key = (weight.data_ptr(), weight.shape, weight.stride(), rows, dtype)
            self._chosen[key] = (owner, packed)

    def weight_for(self, weight: Tensor, rows: int) -> Tensor:
        """``weight`` [N, K] (or a view of a parameter, e.g. its transpose) as oneDNN's
        linear op should read it for ``rows`` rows of input: a packed copy of it as it is
        now, or ``weight`` itself where it is no parameter (or an inference tensor) or
        where the copy's product on ``rows`` rows differs from the unpacked one
        (:func:`_same_product`, checked once per kind of copy and row count)."""
        copy = self.exact_copy(weight, rows)
        return weight if copy is None else copy

    def exact_copy(self, weight: Tensor, rows: int) -> Optional[Tensor]:
        """:meth:`weight_for`'s packed copy, or None where it returns ``weight`` itself."""
        entry = self._current(weight, rows)
        if entry is None:
            return None
        kind = (tuple(weight.shape), weight.stride(), weight.dtype, entry.hint, rows)
        exact = self._exact.get(kind)
        if exact is None:
            exact = self._exact[kind] = _same_product(weight, entry.packed, rows, entry.hint)
        return entry.packed if exact else None

    def _current(self, weight: Tensor, rows: int) -> Optional[_Packed]:
        """The packed copy of ``weight`` as it is now (made or renewed here; ``rows`` the
        reorder's row hint), or None where ``weight`` is no parameter."""
        owner = _parameter_of(weight)
        if owner is None:
            return None
        key = (weight.data_ptr(), tuple(weight.shape), weight.stride())
        entry = self._packed.get(key)
        if entry is not None and entry.owner() is owner:
            if entry.checked_in == self.calls:
                return entry
            if owner._version == entry.version and torch.equal(
                _probe_values(owner, entry.places), entry.probes
            ):
                entry.checked_in = self.calls
                return entry
        places = _probe_places(owner)
        entry = self._packed[key] = _Packed(
            weakref.ref(owner, self._forget(key)), owner._version, places,
            _probe_values(owner, places), _reorder(weight.detach(), rows), self.calls, rows,
        )  # fmt: skip
        return entry

    def _forget(self, key: tuple) -> Callable[[weakref.ref], None]:
        # the owner's weakref callback: drop its copy when it dies (without keeping the
        # store alive through the callback)
        store = weakref.ref(self)

        def drop(_: weakref.ref) -> None:
            packs = store()
            if packs is not None:
                packs._packed.pop(key, None)

        return drop


_ACTIVE: ContextVar[Optional[WeightPacks]] = ContextVar("ate_fast_weight_packs", default=None)


def packing_enabled() -> bool:
    """``$ATE_FAST_CPU_WEIGHT_PACKS`` is not ``off`` and this torch can pack."""
    return env_choice(ENV_VAR, CHOICES) == "on" and packing_available()[0]


@contextmanager
def packing(packs: WeightPacks) -> Iterator[None]:
    """Run one call with ``packs``: oneDNN's GEMMs inside read parameters from their packed
    copies (made or renewed as needed). Where packing is off (:func:`packing_enabled`), or
    inside another call's scope, nothing changes."""
    if _ACTIVE.get() is not None or not packing_enabled():
        yield
        return
    packs.calls += 1
    token = _ACTIVE.set(packs)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        # the call's choices end with it (the next checks its copies again; a freed
        # parameter is not kept alive)
        packs._chosen.clear()


def active() -> Optional[WeightPacks]:
    """The packs of the captured call running now (a :func:`packing` scope), or None."""
    return _ACTIVE.get()


def _reorder(weight: Tensor, rows: int) -> Tensor:
    """oneDNN's packed copy of ``weight`` [N, K] for ``rows`` rows of input."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _same_product(weight: Tensor, packed: Tensor, rows: int, hint: int) -> bool:
    """Whether oneDNN's product of ``rows`` rows with the packed copy of ``weight`` (reordered
    for ``hint`` rows) is, bit for bit, the product a call without packs computes: oneDNN's
    op on the plain weight for float32, ATen's ``F.linear`` for bfloat16 (``cpu_gemm``'s
    choices outside a call). Two probes, both needed: random rows times the copy itself
    (on rows of zeros any order agrees), and rows that expose the summation order times a
    copy of the same kind (:func:`_order_probe`) — bfloat16's rounding of the output hides
    most reorderings from random rows (torch 2.4.1's oneDNN: a transposed [1024, 256] copy
    at 50 rows put 2 of 12 800 elements one ulp off ATen's, and none on 9 of 30 random
    probes, the one this check used among them)."""
    gen = torch.Generator().manual_seed(rows)
    probe = torch.randn(rows, weight.shape[-1], generator=gen).to(weight.dtype)
    same = _same_on(probe, weight, packed)
    order_weight, order_rows = _order_probe(weight, rows)  # both always: a fixed cost
    return _same_on(order_rows, order_weight, _reorder(order_weight, hint)) and same


def _same_on(x: Tensor, weight: Tensor, packed: Tensor) -> bool:
    """``x`` [rows, K] times the packed copy equals the unpacked product, bit for bit."""
    with torch.no_grad():
        got = _packed_product(x, packed)
        if weight.dtype == torch.bfloat16:
            want = F.linear(x, weight)
        else:
            want = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return torch.equal(got, want)


def _packed_product(x: Tensor, packed: Tensor) -> Tensor:
    """oneDNN's product of ``x`` [rows, K] with a packed copy."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _order_probe(like: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """A weight of ``like``'s shape, strides and dtype (what oneDNN picks its kernel by),
    constant along K — each output row n one value in [1, 2) —, and ``rows`` rows [rows,
    K] of pairs ±a, a = 2ᵉ·m (e in [0, 40], m in [1, 2) with three bits), in random places.
    Every product is exact and each row's exact sum is 0, but a float32 sum keeps what
    its running sum's roundings dropped, which depends on the order of the adds: another
    order (a K split, lanes, pairs summed first) gives another result, of the size of
    the dropped terms — large enough to survive rounding to bfloat16."""
    n, k = like.shape
    gen = torch.Generator().manual_seed(rows)
    scale = 1 + torch.randint(0, 8, (n, 1), generator=gen).float() / 8
    weight = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype)
    weight.copy_(scale.expand(n, k))
    half = k // 2
    size = torch.exp2(torch.randint(0, 41, (rows, half), generator=gen).float())
    size = size * (1 + torch.randint(0, 8, (rows, half), generator=gen).float() / 8)
    terms = torch.cat([size, -size, torch.zeros(rows, k - 2 * half)], dim=1)
    places = torch.argsort(torch.rand(rows, k, generator=gen), dim=1)
    return weight, torch.gather(terms, 1, places).to(like.dtype)


def _parameter_of(weight: Tensor) -> Optional[nn.Parameter]:
    """The parameter ``weight`` is or views, if it is no inference tensor; else None."""
    owner = weight if weight._base is None else weight._base
    return owner if isinstance(owner, nn.Parameter) and not owner.is_inference() else None


def packs_weight(weight: Tensor, rows: int) -> bool:
    """Inside a :func:`packing` scope, whether a GEMM of ``rows`` rows with ``weight`` reads
    a packed copy: ``weight`` is (or views) a parameter that is no inference tensor, and
    the copy's product is the unpacked one's (:meth:`WeightPacks.exact_copy`)."""
    packs = _ACTIVE.get()
    return packs is not None and packs.exact_copy(weight, rows) is not None


def call_weight(x: Tensor, weight: Tensor) -> Tensor:
    """The weight oneDNN's linear op should take for ``x`` [..., K]: its packed copy inside
    a :func:`packing` scope, else ``weight`` itself."""
    packs = _ACTIVE.get()
    if packs is None:
        return weight
    return packs.weight_for(weight, x.numel() // x.shape[-1])

"""The package's opt-in paths as tuning choices: which ``ATE_FAST_*`` variable picks
between which paths, on which device types, and the check that a settings mapping names
only those variables and, for a path variable, one of its paths.

Each path's own module owns its variable and path names (``ENV_VAR`` / ``PATHS``); this
module only gathers them, so that a new path becomes a tuning choice by being listed here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from ate_fast.errors import BackendUnavailableError, InvalidArgumentError
from ate_fast.models import (
    block_epilogues,
    cpu_gemm,
    fused_mlp,
    l2_prefetch,
    skinny_gemm,
    split_kv_attention,
    split_sdpa_attention,
)
from ate_fast.ops import backends, pdl_setting, split_counters
from ate_fast.ops.mlp_guidance import dispatch as mlp_guidance_dispatch
from ate_fast.sampling import guidance_stream
from ate_fast.steer import transformer_vjp

Settings = Mapping[str, str]


@dataclass(frozen=True)
class Switch:
    """One path variable: ``var`` picks one of ``paths``; the path runs on ``device_types``
    (a Triton or CUDA-stream path: ``("cuda",)``); ``needs``: the workload it can change
    (``"any"``, ``"guided"``: a guidance gradient, ``"transformer"``: the Transformer
    encoder's, ``"mlp"``: the MLP encoder's); ``default``: the path in force where ``var``
    is unset, or None where that depends on the device or the shapes; ``effective``: the
    path that runs now on a device type, where the module can say (``auto`` resolved, a
    device's default)."""

    var: str
    paths: tuple[str, ...]
    device_types: tuple[str, ...]
    needs: str = "any"
    default: Optional[str] = None
    effective: Optional[Callable[[str], str]] = None

    def in_force(self, device_type: str = "cpu") -> set[str]:
        """The paths that would run what runs now: ``var``'s value (else :attr:`default`)
        and what it resolves to on ``device_type`` (a setting that raises: none)."""
        paths = {os.environ.get(self.var, "").strip().lower() or self.default}
        if self.effective is not None:
            try:
                paths.add(self.effective(device_type))
            except (InvalidArgumentError, BackendUnavailableError):
                pass  # the baseline's build raises it, naming the variable
        return paths - {None}


# In tuning order: the largest measured shares of π0's step first (attention, then the
# MLP's GEMMs: benchmarks/README.md, "Where the time goes"), so that later choices are
# timed on top of the earlier winners.
# (The selectors built on env_choice take their first path where unset.)
SWITCHES = (
    Switch(split_kv_attention.ENV_VAR, split_kv_attention.PATHS, ("cuda",), default="sdpa"),
    Switch(fused_mlp.ENV_VAR, fused_mlp.PATHS, ("cuda",), default="torch"),
    Switch(
        block_epilogues.ENV_VAR,
        # not "native", the CPU's gated-GELU kernels: ≈ 3× ATen's ops wherever measured
        # (benchmarks/README.md), so a CPU tune leaves them in force
        ("torch", "triton"),
        ("cuda",),
        effective=block_epilogues.selected_path,
    ),
    Switch(l2_prefetch.ENV_VAR, l2_prefetch.PATHS, ("cuda",), default="off"),
    Switch(skinny_gemm.ENV_VAR, skinny_gemm.PATHS, ("cuda",), default="torch"),
    # how the Triton kernels chosen so far launch (Hopper: elsewhere the trial fails)
    Switch(pdl_setting.ENV_VAR, pdl_setting.CHOICES, ("cuda",), default="off"),
    Switch(guidance_stream.ENV_VAR, guidance_stream.PATHS, ("cuda",), "guided", "same"),
    # the MLP-guidance kernel's loop unroll (its cuda backend; bit-equal either way)
    Switch(mlp_guidance_dispatch.UNROLL_VAR, mlp_guidance_dispatch.UNROLLS, ("cuda",), "mlp", "4"),
    # "compiled" left out of the defaults: a torch.compile per trial (pass it in `choices`)
    Switch(transformer_vjp.ENV_VAR, ("autograd", "vjp", "triton"), ("cuda",), "transformer"),
    Switch(transformer_vjp.ENV_VAR, ("autograd", "vjp"), ("cpu",), "transformer"),
    Switch(
        cpu_gemm.ENV_VAR,
        cpu_gemm.CHOICES,
        ("cpu",),
        default="auto",
        effective=lambda _: cpu_gemm.selected_gemm(),
    ),
)
# every path's full set of names (for the check), whatever the device or the defaults
PATH_VARS = {
    split_kv_attention.ENV_VAR: split_kv_attention.PATHS,
    fused_mlp.ENV_VAR: fused_mlp.PATHS,
    block_epilogues.ENV_VAR: block_epilogues.PATHS,
    l2_prefetch.ENV_VAR: l2_prefetch.PATHS,
    skinny_gemm.ENV_VAR: skinny_gemm.PATHS,
    pdl_setting.ENV_VAR: pdl_setting.CHOICES,
    guidance_stream.ENV_VAR: guidance_stream.PATHS,
    transformer_vjp.ENV_VAR: transformer_vjp.PATHS,
    cpu_gemm.ENV_VAR: cpu_gemm.CHOICES,
    mlp_guidance_dispatch.UNROLL_VAR: mlp_guidance_dispatch.UNROLLS,
    backends.ENV_VAR: backends.BACKENDS,
}
# a path's parameters: free text, checked by the path's own parser when it runs
PARAMETER_VARS = (
    split_kv_attention.TILES_VAR,
    split_sdpa_attention.CHUNKS_VAR,
    fused_mlp.TILES_VAR,
    skinny_gemm.BLOCK_N_VAR,
    skinny_gemm.SPLIT_K_VAR,
    split_counters.ENV_VAR,
)
KNOWN_VARS = (*PATH_VARS, *PARAMETER_VARS)
# Other parameters of a path, tried right after its variable's choice: the tiles its own
# bench rows time (bench_realsize's ate_capture_fused_mlp_st3 / _f64_s1024; split-key
# attention: bench_prefix_attention's sweep; the few-row GEMM's other column tiles), each
# with the path selected, so that a path whose default tiles lost can still win with these.
# Split-key attention's default splits the keys until one program runs per SM and was as
# slow in its combine as in its partial kernel on an H200 (2026-12-04): its options are
# fewer, fixed slices (a cheaper combine), and two programs per SM; the fields not given
# (warps, stages) stay the dtype's defaults.
PARAMETER_OPTIONS = {
    (split_kv_attention.ENV_VAR, "split_kv"): (
        (split_kv_attention.TILES_VAR, "block_q=32,block_k=32,splits=4"),
        (split_kv_attention.TILES_VAR, "block_q=16,block_k=32,splits=2"),
        (split_kv_attention.TILES_VAR, "block_q=32,block_k=32,programs_per_sm=2"),
    ),
    (fused_mlp.ENV_VAR, "persistent"): (
        (fused_mlp.TILES_VAR, "stages=3"),
        (fused_mlp.TILES_VAR, "block_f=64,slice=1024"),
    ),
    # the few-row GEMM's other column tiles, K split by the SM count at each (the default
    # tile, 32, is the path's own option), and the split's slices summed by a second kernel
    # (the default in a captured call: by each tile's last program, ops/split_counters.py)
    (skinny_gemm.ENV_VAR, "triton"): (
        (skinny_gemm.BLOCK_N_VAR, "16"),
        (skinny_gemm.BLOCK_N_VAR, "64"),
        (split_counters.ENV_VAR, "kernel"),
    ),
}


# Paths that may win only together, each combination tried as one option before the single
# choices (on CUDA; first, so that a search cut short by its budget still times it): a
# greedy search times each path on its own, on top of the earlier winners, and would drop
# the split-key attention (slower alone than cuDNN's kernel on the H200) before the few-row
# GEMM and PDL that make every kernel of a block a PDL launch are tried; the single choices
# then run on top of a combination that won. The options: the few-row GEMM with PDL (its
# kernels and the epilogues chained; with Transformer guidance the encoder's layers too),
# then with the split-key attention (every kernel of a block), then with the persistent MLP
# as well (five launches a block).
_SKINNY_PDL = {skinny_gemm.ENV_VAR: "triton", pdl_setting.ENV_VAR: "on"}
_TRITON_BLOCK = {split_kv_attention.ENV_VAR: "split_kv", **_SKINNY_PDL}
COMBINATIONS = {
    "Triton block with PDL": (
        _SKINNY_PDL,
        _TRITON_BLOCK,
        {**_TRITON_BLOCK, fused_mlp.ENV_VAR: "persistent"},
    ),
}


@dataclass(frozen=True)
class Choice:
    """One tuning decision: ``options``, each a settings mapping (variable → value), of
    which at most one is kept — none where no option beats what the variables were
    before. E.g. the prefix attention's paths, or one path at several tiles:
    ``Choice("split_kv tiles", ({"ATE_FAST_PREFIX_ATTENTION": "split_kv",
    "ATE_FAST_SPLIT_KV_TILES": "block_q=32,block_k=64,splits=4"}, ...))``."""

    name: str
    options: tuple[Settings, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise InvalidArgumentError(f"Choice {self.name!r}: options must not be empty")
        for option in self.options:
            check_settings(option, f"Choice {self.name!r}: an option")

    @property
    def variables(self) -> frozenset[str]:
        """Every variable an option sets (the ones this choice decides)."""
        return frozenset(var for option in self.options for var in option)


def check_settings(settings: object, what: str = "settings") -> dict[str, str]:
    """``settings`` as a dict, after checking that it maps known ``ATE_FAST_*`` variables
    (:data:`KNOWN_VARS`) to strings, a path variable to one of its paths; raises
    :class:`~ate_fast.errors.InvalidArgumentError` naming the first offender."""
    if not isinstance(settings, Mapping):
        raise InvalidArgumentError(
            f"{what}: expected a mapping of ATE_FAST_* variables to values, "
            f"got {type(settings).__name__}"
        )
    checked = {}
    for var, value in settings.items():
        if var not in KNOWN_VARS:
            raise InvalidArgumentError(
                f"{what}: {var!r} is not one of the package's settings; expected one of "
                f"{sorted(KNOWN_VARS)}"
            )
        if not isinstance(value, str):
            raise InvalidArgumentError(
                f"{what}: {var} must be a string, got {type(value).__name__} {value!r}"
            )
        paths = PATH_VARS.get(var)
        if paths is not None and value.strip().lower() not in paths:
            raise InvalidArgumentError(
                f"{what}: {var} expected one of {list(paths)}, got {value!r}"
            )
        checked[var] = value
    return checked


def default_choices(
    device_type: str,
    guided: bool = False,
    transformer_encoder: bool = False,
    exclude: Sequence[str] = (),
    tiles: bool = True,
) -> list[Choice]:
    """One :class:`Choice` per path variable that runs on ``device_type`` and can change the
    workload (``guided``: the sampler has a latent guidance; ``transformer_encoder``: its
    encoder is a Transformer, else an MLP), in :data:`SWITCHES`' order; its options: each
    path but the one in force now (the variable's value, else its known default: the baseline runs
    that one). ``exclude``: ``"VAR=path"`` entries not to try (e.g.
    ``"ATE_FAST_PREFIX_ATTENTION=flex"``, whose torch.compile outlasts a short budget); a
    choice left with no option is dropped. ``tiles``: after a path's choice, one of its
    other tiles (:data:`PARAMETER_OPTIONS`) where it has some."""
    if device_type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device_type: expected 'cpu' or 'cuda', got {device_type!r}")
    applies = {"any": True, "guided": guided, "transformer": guided and transformer_encoder,
               "mlp": guided and not transformer_encoder}  # fmt: skip
    if isinstance(exclude, str):
        raise InvalidArgumentError(f"exclude: expected a sequence of 'VAR=path', got {exclude!r}")
    for entry in exclude:
        var, _, path = str(entry).partition("=")
        if var not in PATH_VARS or path not in PATH_VARS[var]:
            raise InvalidArgumentError(
                f"exclude: expected 'VAR=path' with VAR one of {sorted(PATH_VARS)} and one of "
                f"its paths, got {entry!r}"
            )
    choices = _combination_choices(exclude) if device_type == "cuda" else []
    for switch in SWITCHES:
        if device_type in switch.device_types and applies[switch.needs]:
            excluded = {e.partition("=")[2] for e in exclude if e.partition("=")[0] == switch.var}
            skip = {*switch.in_force(device_type), *excluded}
            options = tuple({switch.var: p} for p in switch.paths if p not in skip)
            if options:
                choices.append(Choice(switch.var, options))
            choices += _parameter_choices(switch, excluded, tiles)
    return choices


def _combination_choices(exclude: Sequence[str]) -> list[Choice]:
    """A choice per :data:`COMBINATIONS` entry, with the options none of whose paths is
    excluded (``"VAR=path"``); dropped where none is left."""
    excluded = set(exclude)
    choices = []
    for name, combos in COMBINATIONS.items():
        options = tuple(
            combo for combo in combos
            if not any(f"{var}={path}" in excluded for var, path in combo.items())
        )  # fmt: skip
        if options:
            choices.append(Choice(name, options))
    return choices


def _parameter_choices(switch: Switch, excluded: set, tiles: bool) -> list[Choice]:
    """A choice of :data:`PARAMETER_OPTIONS` for each path of ``switch`` not ``excluded``
    (the path in force included: its other tiles are worth a try too)."""
    if not tiles:
        return []
    choices = []
    for path in switch.paths:
        parameters = PARAMETER_OPTIONS.get((switch.var, path), ())
        if parameters and path not in excluded:
            options = tuple({switch.var: path, var: value} for var, value in parameters)
            choices.append(Choice(f"{switch.var}={path} tiles", options))
    return choices


def as_choices(choices: Sequence[object]) -> list[Choice]:
    """``choices`` checked: each a :class:`Choice`; raises naming the first that is not."""
    if isinstance(choices, (str, bytes, Mapping)) or not isinstance(choices, Sequence):
        raise InvalidArgumentError(
            f"choices: expected a sequence of ate_fast.tuning.Choice, got {type(choices).__name__}"
        )
    for i, choice in enumerate(choices):
        if not isinstance(choice, Choice):
            raise InvalidArgumentError(
                f"choices[{i}]: expected an ate_fast.tuning.Choice, got {type(choice).__name__}"
            )
    return list(choices)

"""The contract of an exported sampler graph: its inputs, output and recorded settings.

Every graph :func:`ate_fast.export.to_onnx` writes has

==============  ===========================  =============================================
name            shape                        what
==============  ===========================  =============================================
``noise``       [B, H, D] float32            the initial sample (pure noise)
``cond``        [B, ...]                     the model's conditioning, when it has one; a
                                             dict/list of tensors becomes ``cond.<key>`` /
                                             ``cond.<i>`` inputs, a flow transformer's
                                             ``PrefixCache`` (a VLM's KV cache)
                                             ``cond.keys.<i>``, ``cond.values.<i>`` per
                                             block (and ``cond.mask``, bool [B, L])
``target``      [B, d_z] float32             z*, when guided with ``target_input=True``
``prev_chunk``  [B, H, D] float32            real-time chunking: Y, the previous chunk
                                             aligned to the new one
``delay``       [B] int64                    real-time chunking: d, the inference delay
                                             in steps (0 ≤ d ≤ H − s; picks the mask row)
``step_noise``  [N, B, H, D] float32         the N step-noise draws of a stochastic sampler
                                             (DDPM; DDIM with eta > 0), in the order the
                                             PyTorch sampler draws them
``actions``     [B, H, D] float32            the output
==============  ===========================  =============================================

(B is the symbolic ``batch`` dimension of a dynamic-batch graph.) The settings it was
exported with are stored as JSON in the model's ``metadata_props`` under ``ate_fast``
and read back by :class:`GraphSignature`, which also turns a call's arguments into the
graph's feeds — shared by the ONNX Runtime and TensorRT runners.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from ate_fast.models import PrefixCache

NOISE = "noise"
COND = "cond"
TARGET = "target"
PREV_CHUNK = "prev_chunk"
DELAY = "delay"
STEP_NOISE = "step_noise"
PREFIX_CACHE = "prefix_cache"  # the cond kind of a flow transformer's PrefixCache
ACTIONS = "actions"
BATCH_DIM = "batch"
METADATA_KEY = "ate_fast"
FORMAT = "ate_fast.export.sampler_graph"
FORMAT_VERSION = 1


def cond_leaves(cond: Any, argument: str = "example_cond") -> list[tuple[str, Tensor]]:
    """``cond`` as ``(input name, tensor)`` pairs: None -> [], a Tensor -> [("cond", t)],
    a flat dict of tensors -> ``cond.<key>``, a list/tuple of tensors -> ``cond.<i>``, a
    :class:`~ate_fast.models.PrefixCache` -> ``cond.keys.<i>``, ``cond.values.<i>`` (block
    i) and ``cond.mask`` when it has one.

    Raises TypeError naming ``argument`` for anything else (nested containers, non-tensor
    values: an exported graph has tensor inputs only).
    """
    if cond is None:
        return []
    if isinstance(cond, Tensor):
        return [(COND, cond)]
    if isinstance(cond, PrefixCache):
        return _prefix_cache_leaves(cond, argument)
    if isinstance(cond, dict):
        items = list(cond.items())
    elif isinstance(cond, (list, tuple)):
        items = list(enumerate(cond))
    else:
        raise TypeError(
            f"{argument} must be None, a Tensor, or a flat dict/list/tuple of Tensors for "
            f"export, got {type(cond).__name__}"
        )
    leaves = []
    for key, value in items:
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{argument}[{key!r}] must be a Tensor for export (an exported graph has tensor "
                f"inputs only; bake other values into the model), got {type(value).__name__}"
            )
        if isinstance(key, str) and not key.replace("_", "").isalnum():
            raise ValueError(f"{argument} keys must be alphanumeric (input names), got {key!r}")
        leaves.append((f"{COND}.{key}", value))
    return leaves


def _prefix_cache_leaves(cache: PrefixCache, argument: str) -> list[tuple[str, Tensor]]:
    leaves = []
    for field_name in ("keys", "values"):
        group = getattr(cache, field_name)
        if not isinstance(group, (tuple, list)) or not all(isinstance(t, Tensor) for t in group):
            raise TypeError(
                f"{argument}.{field_name} must be a tuple of Tensors (one per block) for "
                f"export, got {type(group).__name__}"
            )
        leaves += [(f"{COND}.{field_name}.{i}", t) for i, t in enumerate(group)]
    if cache.mask is not None:
        if not isinstance(cache.mask, Tensor):
            raise TypeError(
                f"{argument}.mask must be None or a bool Tensor [B, L] for export, got "
                f"{type(cache.mask).__name__}"
            )
        leaves.append((f"{COND}.mask", cache.mask))
    return leaves


def cond_keys(cond: Any) -> list:
    """The keys :func:`rebuild_cond` takes for ``cond``: a dict's keys, a sequence's
    indices, a PrefixCache's ``keys.<i>``, ``values.<i>`` (and ``mask``); none else."""
    kind = cond_kind(cond)
    if kind in ("none", "tensor"):
        return []
    if kind == "dict":
        return list(cond)
    if kind == PREFIX_CACHE:
        return [name.split(".", 1)[1] for name, _ in cond_leaves(cond)]
    return list(range(len(cond_leaves(cond))))


def rebuild_cond(kind: str, keys: list, tensors: list[Tensor]) -> Any:
    """Inverse of :func:`cond_leaves` for a graph's ``cond`` inputs."""
    if kind == "none":
        return None
    if kind == "tensor":
        return tensors[0]
    if kind == PREFIX_CACHE:
        named = dict(zip(keys, tensors))
        depth = sum(1 for key in keys if key.startswith("keys."))
        return PrefixCache(
            tuple(named[f"keys.{i}"] for i in range(depth)),
            tuple(named[f"values.{i}"] for i in range(depth)),
            named.get("mask"),
        )
    if kind == "dict":
        return dict(zip(keys, tensors))
    return tuple(tensors) if kind == "tuple" else list(tensors)


def cond_kind(cond: Any) -> str:
    if cond is None:
        return "none"
    if isinstance(cond, Tensor):
        return "tensor"
    if isinstance(cond, PrefixCache):  # a NamedTuple: before the tuple
        return PREFIX_CACHE
    return "dict" if isinstance(cond, dict) else ("tuple" if isinstance(cond, tuple) else "list")


@dataclass
class GraphSignature:
    """What an exported graph takes and how it was made (stored in its metadata).

    Attributes:
        horizon, action_dim: H and D of ``noise`` / ``actions``.
        cond_kind, cond_keys: the structure of ``cond`` (see :func:`cond_leaves`).
        cond_shapes: the shape of each ``cond`` input without its batch dim.
        target_dim: d_z when the graph has a ``target`` input, else None.
        prefix_inputs: the graph has the ``prev_chunk`` and ``delay`` inputs (RTC).
        step_noise_draws: N, the number of step-noise draws (0: no ``step_noise`` input).
        dynamic_batch: B is symbolic; else ``batch`` is the only batch size.
        max_batch: the largest B a dynamic graph declares (None: not recorded, a graph
            from an older ate_fast).
        batch: the example batch (the graph's static batch when not dynamic).
        sampler, guidance: ``repr`` of the sampler; the guidance's settings or None.
        num_steps, opset, ate_fast_version: recorded for the reader.
        guidance_known: False when derived from an engine's inputs alone (the guidance
            settings baked into it are then not known).
    """

    horizon: int
    action_dim: int
    cond_kind: str = "none"
    cond_keys: list = field(default_factory=list)
    cond_shapes: list = field(default_factory=list)
    target_dim: Optional[int] = None
    step_noise_draws: int = 0
    dynamic_batch: bool = True
    batch: int = 1
    sampler: str = ""
    num_steps: int = 0
    guidance: Optional[dict] = None
    opset: int = 18
    ate_fast_version: str = ""
    guidance_known: bool = True
    prefix_inputs: bool = False
    max_batch: Optional[int] = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- names ----------------------------------------------------------------------
    @property
    def cond_names(self) -> list[str]:
        if self.cond_kind == "none":
            return []
        if self.cond_kind == "tensor":
            return [COND]
        return [f"{COND}.{key}" for key in self.cond_keys]

    @property
    def input_names(self) -> list[str]:
        names = [NOISE, *self.cond_names]
        if self.target_dim is not None:
            names.append(TARGET)
        if self.prefix_inputs:
            names += [PREV_CHUNK, DELAY]
        if self.step_noise_draws:
            names.append(STEP_NOISE)
        return names

    # -- (de)serialisation ----------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the graph") -> GraphSignature:
        try:
            data = json.loads(text)
        except ValueError as exc:
            message = f"{source}: its {METADATA_KEY!r} metadata is not JSON ({exc})"
            raise ValueError(message) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source} was not written by ate_fast.export.to_onnx")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{source} has export format version {data['format_version']}; this ate_fast "
                f"reads up to {FORMAT_VERSION}: upgrade ate_fast"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_model(cls, model: Any, source: str = "the graph") -> GraphSignature:
        """Read the signature from an ``onnx.ModelProto``'s metadata."""
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                return cls.from_json(prop.value, source)
        raise ValueError(
            f"{source} has no {METADATA_KEY!r} metadata: it was not written by "
            "ate_fast.export.to_onnx (or the metadata was stripped)"
        )

    # -- feeds ----------------------------------------------------------------------
    def _cond_leaves(self, cond: Any) -> list[tuple[str, Tensor]]:
        """``cond``'s ``(name, tensor)`` leaves in the graph's input order (a dict's keys
        may come in any order: a leaf's name holds its key or list index)."""
        leaves = cond_leaves(cond, "cond")
        names = [name for name, _ in leaves]
        if names != self.cond_names and sorted(names) == sorted(self.cond_names):
            by_name = dict(leaves)
            leaves = [(name, by_name[name]) for name in self.cond_names]
            names = list(self.cond_names)
        if names != self.cond_names:
            raise ValueError(
                f"cond must give the graph's inputs {self.cond_names or 'none (cond=None)'}, got "
                f"{names or 'none'}"
            )
        return leaves

    def feeds(
        self,
        noise: Tensor,
        cond: Any = None,
        target: Optional[Tensor] = None,
        step_noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        *,
        prev_chunk: Optional[Tensor] = None,
        delay: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """The graph's inputs for one call, checked (errors name the argument).

        RTC graphs: ``prev_chunk`` [B, H, D] and ``delay`` int64 [B] (or [], broadcast).

        ``target`` [d_z] is broadcast to [B, d_z]. Without ``step_noise``, a stochastic
        graph's draws come from ``generator`` exactly as the PyTorch sampler draws them.
        """
        if not isinstance(noise, Tensor) or noise.ndim != 3:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a tensor [B, H, D], got {got}")
        batch = noise.shape[0]
        if tuple(noise.shape[1:]) != (self.horizon, self.action_dim):
            raise ValueError(
                f"noise must have shape [B, {self.horizon}, {self.action_dim}], got "
                f"{tuple(noise.shape)}"
            )
        if not self.dynamic_batch and batch != self.batch:
            raise ValueError(
                f"noise has batch {batch} but the graph was exported for batch {self.batch} "
                "only (export with dynamic_batch=True for others)"
            )
        if self.dynamic_batch and self.max_batch is not None and batch > self.max_batch:
            raise ValueError(
                f"noise has batch {batch} but the graph was exported for batches up to "
                f"max_batch = {self.max_batch} (export with a larger max_batch)"
            )
        feeds = {NOISE: noise}
        for (name, tensor), shape in zip(self._cond_leaves(cond), self.cond_shapes):
            if tensor.ndim == 0 or tensor.shape[0] != batch or list(tensor.shape[1:]) != shape:
                raise ValueError(
                    f"{name} must have shape [B, {', '.join(map(str, shape))}] with B = {batch}, "
                    f"got {tuple(tensor.shape)}"
                )
            if name == f"{COND}.mask" and tensor.dtype != torch.bool:
                raise ValueError(  # ONNX Runtime named only its tensor(bool); TensorRT cast
                    f"{name} must be a bool tensor [B, L] (True: a real token), got {tensor.dtype}"
                )
            feeds[name] = tensor
        if self.target_dim is not None:
            if target is None:
                raise ValueError(
                    f"this graph is guided: pass target (z*, [d_z] = [{self.target_dim}] or "
                    "[B, d_z]) or a LatentGuidance as guidance="
                )
            if tuple(target.shape) == (self.target_dim,):
                target = target.reshape(1, -1).expand(batch, -1)
            if tuple(target.shape) != (batch, self.target_dim):
                raise ValueError(
                    f"target must be [d_z] = [{self.target_dim}] or [B, d_z] = "
                    f"[{batch}, {self.target_dim}], got {tuple(target.shape)}"
                )
            feeds[TARGET] = target.to(device=noise.device, dtype=noise.dtype)
        elif target is not None:
            raise ValueError("target was given but the graph takes none (unguided or baked)")
        feeds.update(self._prefix_feeds(noise, prev_chunk, delay))
        if self.step_noise_draws:
            if step_noise is None:
                step_noise = draw_step_noise(self.step_noise_draws, noise, generator)
            expected = (self.step_noise_draws, *noise.shape)
            if tuple(step_noise.shape) != expected:
                raise ValueError(
                    f"step_noise must have shape [N, B, H, D] = {list(expected)}, got "
                    f"{tuple(step_noise.shape)}"
                )
            feeds[STEP_NOISE] = step_noise.to(device=noise.device, dtype=noise.dtype)
        elif step_noise is not None:
            raise ValueError("step_noise was given but the sampler is deterministic")
        return feeds

    def _prefix_feeds(
        self, noise: Tensor, prev_chunk: Optional[Tensor], delay: Optional[Tensor]
    ) -> dict[str, Tensor]:
        if not self.prefix_inputs:
            if prev_chunk is not None or delay is not None:
                raise ValueError(
                    "prev_chunk/delay were given but the graph takes none (exported without "
                    "RTCGuidance)"
                )
            return {}
        if not isinstance(prev_chunk, Tensor) or tuple(prev_chunk.shape) != tuple(noise.shape):
            got = tuple(prev_chunk.shape) if isinstance(prev_chunk, Tensor) else prev_chunk
            raise ValueError(
                f"prev_chunk must be the previous chunk [B, H, D] = {list(noise.shape)} (this "
                f"graph does real-time chunking), got {got}"
            )
        if not isinstance(delay, Tensor) or delay.dtype.is_floating_point or delay.ndim > 1:
            raise ValueError(
                "delay must be an integer tensor [B] or [] (d, the inference delay in steps), "
                f"got {delay if not isinstance(delay, Tensor) else (delay.dtype, delay.shape)}"
            )
        delay = delay.to(device=noise.device, dtype=torch.int64).reshape(-1)
        delay = delay.expand(noise.shape[0]) if delay.numel() == 1 else delay
        if delay.shape[0] != noise.shape[0]:
            raise ValueError(f"delay must have B = {noise.shape[0]} entries, got {delay.shape[0]}")
        high = (self.guidance or {}).get("max_delay")
        if high is not None and not bool(((delay >= 0) & (delay <= high)).all()):
            raise ValueError(
                f"delay must be in 0..H − execution_horizon = 0..{high}, got {delay.tolist()}"
            )
        return {
            PREV_CHUNK: prev_chunk.to(device=noise.device, dtype=noise.dtype),
            DELAY: delay.contiguous(),
        }


def draw_step_noise(
    draws: int, noise: Tensor, generator: Optional[torch.Generator] = None
) -> Tensor:
    """``[draws, B, H, D]`` standard normal draws, consumed from ``generator`` (None: the
    global RNG of its device) one ``[B, H, D]`` draw at a time, as the samplers draw them:
    a CPU generator with data on another device draws on the CPU and the draw is moved."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    device = noise.device if generator is None else torch.device(generator.device)
    samples = [
        torch.randn(tuple(noise.shape), generator=generator, dtype=noise.dtype, device=device)
        for _ in range(draws)
    ]
    return torch.stack(samples).to(noise.device)


def signature_from_io(shapes: dict[str, tuple[int, ...]]) -> GraphSignature:
    """A :class:`GraphSignature` derived from a compiled graph's input names and shapes
    (-1 marks the dynamic batch), for engines without their ``.json`` record. Guidance
    settings are then unknown (``guidance_known=False``)."""
    if NOISE not in shapes or len(shapes[NOISE]) != 3:
        raise ValueError(
            f"the engine has no {NOISE!r} input of rank 3 (inputs: {sorted(shapes)}); it was "
            "not built from an ate_fast.export graph"
        )
    batch, horizon, action_dim = shapes[NOISE]
    names = [n for n in shapes if n == COND or n.startswith(f"{COND}.")]
    cache = _prefix_cache_keys(names)
    if names == [COND]:
        kind, keys = "tensor", []
    elif cache is not None:
        kind, keys = PREFIX_CACHE, cache
        names = [f"{COND}.{k}" for k in keys]
    elif names:
        raw = [n.split(".", 1)[1] for n in names]
        if all(k.isdigit() for k in raw):
            kind, keys = "tuple", sorted(int(k) for k in raw)
            names = [f"{COND}.{k}" for k in keys]
        else:
            kind, keys = "dict", raw
    else:
        kind, keys = "none", []
    target = shapes.get(TARGET)
    step = shapes.get(STEP_NOISE)
    prefix = PREV_CHUNK in shapes and DELAY in shapes
    return GraphSignature(
        horizon=int(horizon),
        action_dim=int(action_dim),
        cond_kind=kind,
        cond_keys=keys,
        cond_shapes=[[int(d) for d in shapes[n][1:]] for n in names],
        target_dim=None if target is None else int(target[-1]),
        step_noise_draws=0 if step is None else int(step[0]),
        dynamic_batch=batch < 0,
        batch=max(int(batch), 1),
        guidance_known=False,
        prefix_inputs=prefix,
    )


def _prefix_cache_keys(names: list[str]) -> Optional[list[str]]:
    """The PrefixCache keys (``keys.<i>``, ``values.<i>``, ``mask``) in :func:`cond_leaves`'
    order, when ``names`` are exactly a PrefixCache's inputs for some depth; else None."""
    depth = sum(1 for n in names if n.startswith(f"{COND}.keys."))
    keys = [f"{group}.{i}" for group in ("keys", "values") for i in range(depth)]
    if f"{COND}.mask" in names:
        keys.append("mask")
    if not depth or sorted(f"{COND}.{k}" for k in keys) != sorted(names):
        return None
    return keys

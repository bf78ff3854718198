"""Run an exported sampler graph in ONNX Runtime with the samplers' ``sample`` signature."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ate_fast.argument_checks import check_int
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.export.signature import ACTIONS, GraphSignature
from ate_fast.sampling.inputs import check_cond, check_finite, check_noise

PathLike = Union[str, "os.PathLike[str]"]


def guidance_target(
    signature: GraphSignature, guidance: Any, target: Optional[Tensor]
) -> Optional[Tensor]:
    """The z* a runner feeds: ``target`` if given, else ``guidance.target`` (a
    LatentGuidance) when the graph takes a target input; the guidance's other settings
    are baked into the graph (checked against ``signature``)."""
    check_guidance_matches(signature, guidance)
    if guidance is None:
        return target
    if target is not None:
        raise InvalidArgumentError("pass either guidance or target, not both")
    if signature.target_dim is None:  # the target is baked into the graph
        check_baked_target(signature, guidance)
        return None
    value = getattr(guidance, "target", None)
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(
            "guidance must be the LatentGuidance the graph was exported with (its .target is "
            f"fed as the graph's target input), got {type(guidance).__name__}"
        )
    return value


def check_baked_target(signature: GraphSignature, guidance: Any) -> None:
    """Raise if ``guidance.target`` is not the z* baked into the graph (graphs exported
    before ate_fast recorded it carry no record: nothing to check)."""
    record = (signature.guidance or {}).get("baked_target")
    value = getattr(guidance, "target", None)
    if record is None or not isinstance(value, Tensor):
        return
    baked = torch.tensor(record["values"], dtype=torch.float32).reshape(record["shape"])
    given = value.detach().to("cpu", torch.float32)
    tolerance = 1e-6 * float(baked.abs().max()) if baked.numel() else 0.0
    if given.shape != baked.shape or not torch.allclose(given, baked, rtol=0, atol=tolerance):
        raise InvalidArgumentError(
            f"guidance.target (shape {tuple(given.shape)}) is not the target baked into the "
            f"graph at export (shape {tuple(baked.shape)}): a baked graph always steers "
            "toward that one; export with target_input=True to feed targets"
        )


def prefix_inputs(
    signature: GraphSignature,
    guidance: Any,
    prev_chunk: Optional[Tensor],
    delay: Optional[Tensor],
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The ``(prev_chunk, delay)`` a runner feeds an RTC graph: the arguments if given,
    else the RTCGuidance's own (``guidance.prev_chunk`` and ``guidance.delays``, set by
    its ``set_prefix``)."""
    if guidance is None or not signature.prefix_inputs:
        return prev_chunk, delay
    if prev_chunk is not None or delay is not None:
        raise InvalidArgumentError("pass either guidance or prev_chunk/delay, not both")
    prev_chunk, delay = getattr(guidance, "prev_chunk", None), getattr(guidance, "delays", None)
    if prev_chunk is None or delay is None:
        raise InvalidArgumentError(
            "guidance has no previous chunk and delay to feed: call guidance.set_prefix("
            "prev_chunk, delay) first (after clear_prefix(), sample the unguided graph), or "
            "pass prev_chunk= and delay="
        )
    return prev_chunk, delay


def runner_feeds(
    signature: GraphSignature,
    noise: Tensor,
    cond: Any,
    guidance: Any,
    generator: Optional[torch.Generator],
    *,
    target: Optional[Tensor],
    step_noise: Optional[Tensor],
    prev_chunk: Optional[Tensor],
    delay: Optional[Tensor],
    finite: bool = True,
) -> dict[str, Tensor]:
    """One runner call's graph inputs (both runners): the guidance's target or RTC prefix
    unless given, checked as ``Sampler.sample()`` checks its own (errors name the
    argument); ``finite=False`` skips the NaN/inf checks (a host sync per tensor)."""
    target = guidance_target(signature, guidance, target)
    prev_chunk, delay = prefix_inputs(signature, guidance, prev_chunk, delay)
    feeds = signature.feeds(
        noise, cond, target, step_noise, generator, prev_chunk=prev_chunk, delay=delay
    )
    check_runner_inputs(noise, cond, target, step_noise, finite)
    if prev_chunk is not None and finite:
        check_finite("prev_chunk", prev_chunk)
    return feeds


def check_runner_inputs(
    noise: object,
    cond: Any,
    target: Optional[Tensor],
    step_noise: Optional[Tensor],
    finite: bool = True,
) -> None:
    """The checks ``Sampler.sample()`` makes, made by the exported-graph runners too:
    ``noise`` a floating ``[B, H, D]`` tensor with B ≥ 1 (batch 0 raises
    :class:`~ate_fast.errors.InvalidArgumentError`, as in ``sample()``), no NaN/inf in
    ``noise``, ``cond``, ``target`` or ``step_noise``
    (:class:`~ate_fast.errors.NonFiniteError` naming the argument; unless ``finite=False``)."""
    check_noise(noise, finite)
    if not finite:
        return
    check_cond(cond)
    for name, t in (("target", target), ("step_noise", step_noise)):
        if isinstance(t, Tensor):
            check_finite(name, t)


def check_guidance_matches(signature: GraphSignature, guidance: Any) -> None:
    """Raise if ``guidance``'s scale/clamp/mode differ from the ones baked in."""
    settings = signature.guidance
    if guidance is None or not signature.guidance_known:
        return
    if settings is None:
        raise InvalidArgumentError("guidance was given but the graph was exported unguided")
    clamp = float(settings["clamp"])
    baked_settings = [("scale", settings["scale"]), ("clamp", clamp), ("mode", settings["mode"])]
    if settings.get("guidance") == "rtc":
        names = ("execution_horizon", "max_guidance_weight", "prefix_schedule")
        baked_settings += [(name, settings[name]) for name in names]
    for name, baked in baked_settings:
        value = getattr(guidance, name, None)
        if value != baked:
            raise InvalidArgumentError(
                f"guidance.{name} is {value!r} but the graph was exported with {baked!r}; "
                "guidance settings are baked into the graph: export again to change them"
            )


class OnnxRuntimeSampler:
    """An exported sampler graph in an ``onnxruntime.InferenceSession``.

    Args:
        path: the ``.onnx`` file from :func:`ate_fast.export.to_onnx`.
        providers: ONNX Runtime execution providers, names or (name, options) pairs
            (default: CPU); each must be in this onnxruntime build and start.
        threads: intra-op threads (None: ONNX Runtime's default).
    """

    def __init__(
        self,
        path: PathLike,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: Optional[int] = None,
    ) -> None:
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError(
                "OnnxRuntimeSampler needs onnx and onnxruntime: pip install 'ate_fast[export]'"
            ) from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"path: no ONNX file at {self.path}")
        providers = _check_providers(providers, ort.get_available_providers())
        model = onnx.load(str(self.path), load_external_data=False)
        self.signature = GraphSignature.from_model(model, str(self.path))
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = check_int("threads", threads, 1)
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        # a provider that is built in but fails to start (its CUDA libraries missing) is
        # dropped by ONNX Runtime with a log line only: the graph would run on the CPU
        dropped = [p for p in _names(providers) if p not in self.session.get_providers()]
        if dropped:
            raise InvalidArgumentError(
                f"providers: {dropped} could not start (ONNX Runtime runs this graph with "
                f"{self.session.get_providers()} only); see ONNX Runtime's log above"
            )

    def __repr__(self) -> str:
        return f"OnnxRuntimeSampler({str(self.path)!r}, {self.signature.sampler})"

    def sample(
        self,
        noise: Tensor,
        cond: Any = None,
        guidance: Any = None,
        generator: Optional[torch.Generator] = None,
        *,
        target: Optional[Tensor] = None,
        step_noise: Optional[Tensor] = None,
        prev_chunk: Optional[Tensor] = None,
        delay: Optional[Tensor] = None,
    ) -> Tensor:
        """The actions [B, H, D] for ``noise`` [B, H, D] (CPU tensors; float32 result).

        Real-time chunking graphs: ``guidance`` the RTCGuidance it was exported with (its
        ``prev_chunk`` and ``delays`` are fed), or ``prev_chunk`` [B, H, D] and ``delay``
        (int tensor [B] or [], each in 0..H − s) directly.

        ``guidance``: the LatentGuidance the graph was exported with (its target is fed),
        or pass ``target`` [d_z] / [B, d_z] directly. ``generator``/``step_noise``: the step
        noise of a stochastic sampler, drawn as the PyTorch sampler draws it.

        Raises, as ``Sampler.sample()`` does: ``InvalidArgumentError`` for batch 0 or a
        malformed ``noise``, ``NonFiniteError`` for NaN/inf in ``noise``, ``cond``,
        ``target`` or ``step_noise``.
        """
        feeds = runner_feeds(
            self.signature, noise, cond, guidance, generator, target=target,
            step_noise=step_noise, prev_chunk=prev_chunk, delay=delay,
        )  # fmt: skip
        arrays = {name: _numpy(name, t) for name, t in feeds.items()}
        (actions,) = self.session.run([ACTIONS], arrays)
        return torch.from_numpy(actions)


def _is_provider(p: Any) -> bool:
    """A name, or ONNX Runtime's (name, options) pair."""
    if isinstance(p, str):
        return True
    return isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict)


def _names(providers: list) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def _check_providers(providers: Any, available: Sequence[str]) -> list:
    """``providers`` as a list (names, or (name, options) pairs such as
    ``("CUDAExecutionProvider", {"device_id": 1})``), each one this onnxruntime build has."""
    if isinstance(providers, str) or not all(_is_provider(p) for p in providers):
        raise ArgumentTypeError(
            "providers must be a sequence of provider names or (name, options) pairs, e.g. "
            f"('CUDAExecutionProvider', 'CPUExecutionProvider'); got {providers!r}"
        )
    providers = list(providers)
    missing = [p for p in _names(providers) if p not in available]
    if not providers or missing:
        raise InvalidArgumentError(
            f"providers: {missing or 'none given'} not in this onnxruntime build, which has "
            f"{list(available)} (onnxruntime-gpu has CUDA and TensorRT)"
        )
    return providers


def _numpy(name: str, t: Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        raise InvalidArgumentError(
            f"{name} must be a CPU tensor for ONNX Runtime, got one on {t.device}"
        )
    t = t.detach()
    if t.is_floating_point():
        t = t.to(torch.float32)
    return np.ascontiguousarray(t.numpy())

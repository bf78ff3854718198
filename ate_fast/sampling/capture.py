"""Captured sampling loops: the whole K-step loop replayed for fixed shapes.

CUDA: the loop is captured once into a CUDA graph. Inputs are copied into static
buffers (the conditioning in one multi-tensor copy; a buffer of ``static_cond`` passed back
as itself, written in place by the caller, is not copied), the graph is replayed, and the
result is a static output buffer; a replay allocates nothing. Before capture the loop runs
twice on a side stream (Triton compilation, cuBLAS workspaces, the workspace buffers), and
the generator's state is restored afterwards, so a capture consumes no random numbers.

CPU: there is no graph; the fastest thing measured (benchmarks/bench_sampling.py) is
the same Python loop over preallocated buffers whose fused steps, validated once on
the first call, are replayed straight into the op's C++ kernel (see
:mod:`ate_fast.sampling.launch`). Other devices run the loop over preallocated buffers.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.guidance import Guidance
from ate_fast.ops import split_counters, weight_packs
from ate_fast.sampling.finite import DeferredFiniteCheck
from ate_fast.sampling.inpainting import Inpainting
from ate_fast.sampling.inputs import check_cond, check_finite, copy_into, static_copy
from ate_fast.sampling.launch import Launch, RecordingLaunch, ReplayLaunch
from ate_fast.sampling.workspace import StepBuffers

WARMUP_RUNS = 2


class CapturableSampler(Protocol):
    """What :class:`CapturedSampler` needs of a sampler (:class:`ate_fast.sampling.Sampler`
    provides it; the protocol keeps this module below ``sampler.py``)."""

    def check_inputs(
        self, noise: Tensor, cond: Any, guidance: Optional[Guidance], generator: object,
        inpainting: object = None,
    ) -> tuple[float, float]: ...  # fmt: skip

    num_steps: int

    def new_run(self, ws: StepBuffers, cond: Any, guidance: Optional[Guidance],
                generator: Optional[torch.Generator], launch: Launch, callback: Any = None,
                finite: Optional[DeferredFiniteCheck] = None,
                inpainting: Optional[Inpainting] = None) -> Any: ...  # fmt: skip

    def execute(self, noise: Tensor, run: Any) -> Tensor: ...


class _RngSnapshot:
    """Saves a generator's state (or the device's global RNG) and puts it back."""

    def __init__(self, generator: Optional[torch.Generator], device: torch.device) -> None:
        self.generator = generator
        self.device = device
        if generator is not None:
            self.state = generator.get_state()
        elif device.type == "cuda":
            self.state = torch.cuda.get_rng_state(device)
        else:
            self.state = torch.get_rng_state()

    def restore(self) -> None:
        if self.generator is not None:
            self.generator.set_state(self.state)
        elif self.device.type == "cuda":
            torch.cuda.set_rng_state(self.state, self.device)
        else:
            torch.set_rng_state(self.state)


class CapturedSampler:
    """``captured(noise, cond=None, guidance=None, generator=None) -> actions [B, H, D]``.

    Made by ``sampler.capture(example_noise, example_cond, guidance, generator)``; the
    same results as ``sampler.sample(noise, cond, guidance, generator)`` for the
    guidance and generator given at capture.

    Contract:
        * ``noise`` and the tensors of ``cond`` must have the examples' shapes, dtypes
          and devices (and ``cond`` their structure); their values are copied in.
        * ``guidance``, ``generator`` and ``inpainting`` are bound at capture: pass None
          (or the very same objects). The guidance's scale, clamp and mode must not
          change; an inpainting's buffers may (they are read on every call).
        * The result is the loop's output buffer, overwritten by the next call:
          ``.clone()`` it to keep it.
        * CUDA: ``model_fn`` and the guidance must be capturable (no host sync such as
          ``.item()`` or printing tensors, no new CPU tensors from data, static shapes,
          no data-dependent Python control flow); step noise needs a CUDA generator or
          None (global RNG). A captured stochastic loop advances the generator exactly
          as ``sample()`` would.
        * ``check_finite`` (default True) checks each call's noise and cond for NaN/inf,
          which costs a device synchronisation; pass False at capture to skip it.
        * ``check_finite_steps`` (default False) also checks every step's model output
          and guidance gradient: the captured loop ANDs ``isfinite(...).all()`` into a
          ``[K, 2]`` device flag tensor (no host sync inside the loop or graph), and each
          call reads it once afterwards and raises
          :class:`~ate_fast.errors.NonFiniteError` naming the first bad step and source.
        * CPU: the parameters oneDNN multiplies (float32; bf16 ones of ≥ 2¹⁸ elements)
          are packed once into its blocked layout and kept, each read only where its
          product is the plain weight's bit for bit (:mod:`ate_fast.ops.weight_packs`);
          each is packed again when its version counter moves (training,
          ``load_state_dict``, in-place ops) or one of 64 probed values changed (a write
          through ``.data``). After a write that bypasses the
          counter and changes no probed value, :meth:`clear_weight_packs`.

    Attributes:
        mode: ``"cuda_graph"``, ``"cpu_replay"`` or ``"buffers"`` (other devices).
    """

    def __init__(
        self,
        sampler: CapturableSampler,
        example_noise: Tensor,
        example_cond: Any = None,
        guidance: Optional[Guidance] = None,
        generator: Optional[torch.Generator] = None,
        *,
        check_finite: bool = True,
        check_finite_steps: bool = False,
        inpainting: Optional[Inpainting] = None,
    ) -> None:
        scale, clamp = sampler.check_inputs(
            example_noise, example_cond, guidance, generator, inpainting
        )
        self.sampler = sampler
        self.guidance = guidance
        self.inpainting = inpainting
        self.generator = generator
        self.check_finite = bool(check_finite)
        self._guidance_args = (
            None if guidance is None else (guidance.scale, guidance.clamp, guidance.mode)
        )
        device = example_noise.device
        self.device = device
        self.finite: Optional[DeferredFiniteCheck] = (
            DeferredFiniteCheck(sampler.num_steps, device) if check_finite_steps else None
        )
        self.shape, self.dtype = example_noise.shape, example_noise.dtype
        self.static_cond = static_copy(example_cond)
        self.ws = StepBuffers(example_noise)
        # the CPU replay's oneDNN weights, packed once for all calls (ops.weight_packs)
        self._weight_packs = weight_packs.WeightPacks()
        if device.type == "cuda":
            self.mode = "cuda_graph"
            if generator is not None and torch.device(generator.device).type != "cuda":
                raise InvalidArgumentError(
                    "generator must be a CUDA generator (or None) to capture a CUDA graph: "
                    f"got one on {generator.device}, whose draws cannot be captured"
                )
            self.static_noise = example_noise.detach().clone(memory_format=torch.contiguous_format)
            self._capture_graph(Launch(scale, clamp))
        else:
            self.mode = "cpu_replay" if device.type == "cpu" else "buffers"
            self._recording = RecordingLaunch(scale, clamp)
            self._replay: Optional[ReplayLaunch] = None
            first = self._recording if self.mode == "cpu_replay" else Launch(scale, clamp)
            self._run = sampler.new_run(
                self.ws, self.static_cond, guidance, generator, first, finite=self.finite,
                inpainting=inpainting,
            )  # fmt: skip

    # -- CUDA ------------------------------------------------------------------------------
    def _capture_graph(self, launch: Launch) -> None:
        # on the data's GPU: its streams, and the kernels launched on the current device
        # (Triton's) — another current device would leave them out of the graph
        with torch.cuda.device(self.device):
            self._capture_graph_on_device(launch)

    def _capture_graph_on_device(self, launch: Launch) -> None:
        sampler, device = self.sampler, self.device
        run = sampler.new_run(
            self.ws, self.static_cond, self.guidance, self.generator, launch, finite=self.finite,
            inpainting=self.inpainting,
        )  # fmt: skip
        snapshot = _RngSnapshot(self.generator, device)
        # counters the graph's kernels that sum their split work in-kernel share (zero now,
        # left zero by each launch): lent on the capture stream only, kept as the graph is
        self._split_counters = split_counters.new_buffer(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), split_counters.lend(self._split_counters):
            for _ in range(WARMUP_RUNS):
                sampler.execute(self.static_noise, run)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        snapshot.restore()
        self.graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            self.graph.register_generator_state(self.generator)
        # captured on this device's side stream (torch's shared default capture stream
        # belongs to the device current at a process's first capture)
        with torch.cuda.graph(self.graph, stream=side), split_counters.lend(self._split_counters):
            self.output = sampler.execute(self.static_noise, run)
        torch.cuda.synchronize(device)
        # the graph reads the run's tables (made before the capture, outside its pool) at
        # every replay: they must live as long as it does, not only in the sampler's cache
        # (which evicts them after other batch sizes, dtypes or devices)
        self._run = run

    # -- calls -----------------------------------------------------------------------------
    def _check_call(self, noise: Tensor, cond: Any, guidance: object, generator: object) -> None:
        if not isinstance(noise, Tensor):
            raise ArgumentTypeError(
                f"noise must be a torch.Tensor [B, H, D], got {type(noise).__name__}"
            )
        if noise.shape != self.shape or noise.dtype != self.dtype or noise.device != self.device:
            raise InvalidArgumentError(
                f"noise must match the captured example: shape {tuple(self.shape)}, {self.dtype} "
                f"on {self.device}; got {tuple(noise.shape)}, {noise.dtype} on {noise.device} "
                "(capture again for other shapes)"
            )
        if guidance is not None and guidance is not self.guidance:
            raise InvalidArgumentError(
                "guidance must be None or the object given to capture(): a captured loop "
                "replays the guidance it was captured with (capture again for another)"
            )
        if self.guidance is not None:
            now = (self.guidance.scale, self.guidance.clamp, self.guidance.mode)
            if now != self._guidance_args:
                raise InvalidArgumentError(
                    f"guidance's (scale, clamp, mode) changed from {self._guidance_args} at "
                    f"capture to {now}: they are baked into the captured loop; capture again"
                )
        if generator is not None and generator is not self.generator:
            raise InvalidArgumentError(
                "generator must be None or the generator given to capture() (it is bound to "
                "the captured loop)"
            )
        if self.check_finite:
            check_finite("noise", noise)
            check_cond(cond)

    def __call__(
        self,
        noise: Tensor,
        cond: Any = None,
        guidance: Optional[Guidance] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Run the captured loop on ``noise`` [B, H, D]; returns the reused output buffer."""
        self._check_call(noise, cond, guidance, generator)
        copy_into(self.static_cond, cond)
        out = self._run_loop(noise)
        if self.finite is not None:
            self.finite.raise_if_bad()
        return out

    def _run_loop(self, noise: Tensor) -> Tensor:
        if self.mode == "cuda_graph":
            # no device guard needed with another GPU current: the copy runs on the data's
            # device, and CUDAGraph.replay guards the capture stream's device itself
            self.static_noise.copy_(noise)
            self.graph.replay()
            return self.output
        run = self._run
        if self.mode == "buffers":
            return self.sampler.execute(noise, run)
        with weight_packs.packing(self._weight_packs):
            if self._replay is None:
                # First call: a validated run through the public op, recorded for replay.
                self._recording.calls.clear()
                out = self.sampler.execute(noise, run)
                self._replay = ReplayLaunch(self._recording)
                run.launch = self._replay
                return out
            self._replay.rewind()
            return self.sampler.execute(noise, run)

    def clear_weight_packs(self) -> None:
        """Drop the packed copies of the weights (CPU; :mod:`ate_fast.ops.weight_packs`):
        the next call packs them as they are then. Needed only after a write that bypasses
        the version counter (``.data``) and leaves the probed values as they were."""
        self._weight_packs.clear()

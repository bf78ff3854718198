"""``TensorRTSampler``: a TensorRT engine of an exported sampler, on torch CUDA tensors.

One call binds torch tensors by address (``set_input_shape`` / ``set_tensor_address``)
and enqueues the engine with ``execute_async_v3`` on torch's current CUDA stream, so it
orders with the surrounding torch work without a synchronisation of its own — but the
inputs' NaN/inf checks (one host sync per input tensor, a π0 KV cache's every block
included) run unless ``check_finite=False``, as a control loop at rate wants. With
``cuda_graph=True`` the engine call is captured once per input shape into a CUDA graph
(after one plain call, as TensorRT requires) and replayed; inputs are copied into the
graph's static buffers and the returned tensor is the graph's output buffer, reused by
the next call (clone it to keep it), as with :meth:`ate_fast.sampling.Sampler.capture`.

Written against the TensorRT 10 and 11 runtime API (the named-tensor API both share);
it runs only where ``tensorrt`` and a GPU are present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.export.onnxruntime_runner import runner_feeds
from ate_fast.export.signature import ACTIONS, GraphSignature, signature_from_io
from ate_fast.export.tensorrt_build import (
    TensorRTBuildError,
    import_tensorrt,
    sidecar_path,
)

PathLike = Union[str, "os.PathLike[str]"]


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """TensorRT DataType -> torch dtype (the types an exported graph's I/O can have)."""
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    for name, value in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = value
    if dtype not in table:
        raise TensorRTBuildError(f"the engine has an I/O tensor of unsupported type {dtype}")
    return table[dtype]


class TensorRTSampler:
    """Run a TensorRT engine built by :func:`ate_fast.export.to_tensorrt`.

    Args:
        engine_path: the ``.plan`` file (its ``.plan.json`` record is read if present).
        device: the CUDA device (default: the current one).
        cuda_graph: capture the engine call in a CUDA graph per input shape and replay it.
        check_finite: check the inputs for NaN/inf each call (a host sync per input);
            False in a control loop whose inputs are known finite.
    """

    def __init__(
        self,
        engine_path: PathLike,
        device: Optional[Union[str, torch.device]] = None,
        cuda_graph: bool = False,
        check_finite: bool = True,
    ) -> None:
        trt = import_tensorrt()
        self._trt = trt
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRTSampler needs a CUDA device; torch sees none")
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        if self.device.type != "cuda":
            raise InvalidArgumentError(f"device must be a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"engine_path: no engine file at {self.path}")
        if not isinstance(cuda_graph, bool):
            raise ArgumentTypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        self.cuda_graph = cuda_graph
        if not isinstance(check_finite, bool):
            raise ArgumentTypeError(
                f"check_finite must be a bool, got {type(check_finite).__name__}"
            )
        self.check_finite = check_finite
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise TensorRTBuildError(
                f"TensorRT {trt.__version__} could not load {self.path}: engines only load "
                "with the TensorRT version and GPU they were built for; build it again here"
            )
        self._inputs: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        outputs = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self._dtypes[name] = torch_dtype(trt, self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs[name] = tuple(self.engine.get_tensor_shape(name))
            else:
                outputs.append(name)
        if outputs != [ACTIONS]:
            raise TensorRTBuildError(
                f"{self.path} has outputs {outputs}; an ate_fast sampler engine has one, "
                f"{ACTIONS!r}"
            )
        self.record = self._read_record()
        derived = signature_from_io(self._inputs)
        saved = (self.record or {}).get("signature")
        source = str(sidecar_path(self.path))
        self.signature = GraphSignature.from_json(json.dumps(saved), source) if saved else derived
        if self.signature.input_names != derived.input_names:
            raise TensorRTBuildError(
                f"{sidecar_path(self.path)} describes inputs {self.signature.input_names} but the "
                f"engine has {derived.input_names}: the record belongs to another engine"
            )
        with torch.cuda.device(self.device):
            self._context = self.engine.create_execution_context()
        self._graphs: dict[tuple, tuple] = {}

    def _read_record(self) -> Optional[dict]:
        path = sidecar_path(self.path)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise InvalidArgumentError(f"{path} is not valid JSON ({exc})") from exc

    def __repr__(self) -> str:
        precision = (self.record or {}).get("precision", "?")
        sampler = self.signature.sampler or "sampler unknown"
        return f"TensorRTSampler({str(self.path)!r}, precision={precision}, {sampler})"

    # -- binding ---------------------------------------------------------------------
    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        if -1 not in self._inputs[name]:
            return
        low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
        if any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
            raise InvalidArgumentError(
                f"{name} has shape {shape}, outside the engine's profile {low}..{high}: "
                "build the engine with a wider min_batch/max_batch"
            )

    def _bind(self, context: Any, feeds: dict[str, Tensor]) -> Tensor:
        for name, tensor in feeds.items():
            shape = tuple(tensor.shape)
            self._check_profile(name, shape)
            if not context.set_input_shape(name, shape):
                raise InvalidArgumentError(f"TensorRT rejected the shape {shape} of input {name!r}")
            context.set_tensor_address(name, tensor.data_ptr())
        shape = tuple(context.get_tensor_shape(ACTIONS))
        out = torch.empty(shape, dtype=self._dtypes[ACTIONS], device=self.device)
        context.set_tensor_address(ACTIONS, out.data_ptr())
        return out

    def _enqueue(self, context: Any, stream: torch.cuda.Stream) -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise TensorRTBuildError("TensorRT's execute_async_v3 failed (see its log)")

    def _prepared(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        ready = {}
        for name, tensor in feeds.items():
            if tensor.device != self.device:
                raise InvalidArgumentError(
                    f"{name} must be a CUDA tensor on {self.device}, got one on {tensor.device}"
                )
            ready[name] = tensor.to(self._dtypes[name]).contiguous()
        return ready

    # -- public API ------------------------------------------------------------------
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
        """The actions [B, H, D] for ``noise`` [B, H, D] (CUDA tensors on ``device``).

        Arguments as :meth:`ate_fast.export.OnnxRuntimeSampler.sample` (a real-time
        chunking engine: the RTCGuidance it was exported with, or ``prev_chunk`` and
        ``delay``). Without a CUDA graph the result is a new tensor, ready in stream order
        on torch's current stream; with one it is the graph's output buffer (overwritten by
        the next call). Batch 0 and NaN/inf inputs raise as in ``OnnxRuntimeSampler.sample``.
        """
        feeds = runner_feeds(
            self.signature, noise, cond, guidance, generator, target=target,
            step_noise=step_noise, prev_chunk=prev_chunk, delay=delay,
            finite=self.check_finite,
        )  # fmt: skip
        feeds = self._prepared(feeds)
        with torch.cuda.device(self.device):  # contexts and launches on the engine's GPU
            if self.cuda_graph:
                return self._replay(feeds)
            out = self._bind(self._context, feeds)
            self._enqueue(self._context, torch.cuda.current_stream(self.device))
            return out

    def _replay(self, feeds: dict[str, Tensor]) -> Tensor:
        key = tuple((name, tuple(t.shape)) for name, t in feeds.items())
        entry = self._graphs.get(key)
        current = torch.cuda.current_stream(self.device)
        if entry is None:
            # One execution context per captured shape: the graph keeps its bindings.
            context = self.engine.create_execution_context()
            static = {name: t.clone() for name, t in feeds.items()}
            out = self._bind(context, static)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._enqueue(context, side)  # TensorRT: one plain call before capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self._enqueue(context, side)
            current.wait_stream(side)
            entry = (graph, context, static, out)
            self._graphs[key] = entry
        graph, _, static, out = entry
        for name, tensor in feeds.items():
            static[name].copy_(tensor)
        graph.replay()
        return out

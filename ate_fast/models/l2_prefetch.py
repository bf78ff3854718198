"""The flow-transformer block's MLP weights read into the GPU's L2 cache while its attention
runs (``ATE_FAST_L2_PREFETCH=mlp``), on a second CUDA stream.

At B = 1 π0's step is bound by small GEMMs that read their weights from HBM with few
programs: on an H200 (2026-12-04) the block's four GEMMs ran at 32 % of the copy bandwidth,
while its attention (24.5 µs per block on 7 programs) left HBM idle. The MLP's weights
(W_gate_up and W_down: 25 MB of the block's 33 MB in bf16) fit in the L2 (50 MB on an
H100 / H200; on a GPU whose L2 is under twice the weights — a Jetson AGX Orin's 4 MB —
nothing is prefetched: :func:`fits_l2`). Here, as the block starts its attention, a second
stream reads them once (``l2_prefetch_triton``: loads cached in L2 only, ≈ 6 µs of
full-bandwidth reading), so that the MLP's GEMMs find them there — what L2 holds is the
most recent ≈ 50 MB of reads, and between the prefetch and the MLP only the attention's
keys and values (0.9 MB) and W_o (4 MB) are read. The current stream waits for the
prefetch at the end of the block (long finished by then: no result depends on it). Inside
a captured CUDA graph the two streams are parallel branches. The arithmetic is unchanged —
the same kernels on the same data.

The input-VJP (real-time chunking's guidance through the head) does the same in its
order: during a block's attention VJP, the MLP weights the next block's VJP reads first.
``all``: also, while a block runs, the next block's attention weights (``[W_q; W_kv]`` and
W_o, 9 MB), so that its first GEMMs find them in L2 too (the block's own 33 MB and these
stay within the 50 MB). Unset or ``off``: nothing prefetched — the default, until a GPU
measures them (``bench_realsize.py``'s ``ate_capture_l2_prefetch`` and
``ate_capture_l2_prefetch_all``). **Not run on a GPU yet.** Only on CUDA tensors, outside
a trace (``torch.compile``, export), for contiguous weights.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import Tensor

from ate_fast.argument_checks import env_choice
from ate_fast.models.trace_state import capturing_graph
from ate_fast.ops import backends
from ate_fast.ops.side_streams import side_stream

ENV_VAR = "ATE_FAST_L2_PREFETCH"
PATHS = ("off", "mlp", "all")
# where each path prefetches: "mlp" the block's MLP weights during its attention; "all"
# also the next block's attention weights during this block
SITES = {"off": (), "mlp": ("mlp",), "all": ("mlp", "ahead")}
_L2_BYTES: dict[int, Optional[int]] = {}


def selected_path() -> str:
    """``$ATE_FAST_L2_PREFETCH``: ``off`` (also where unset), ``mlp`` or ``all``."""
    return env_choice(ENV_VAR, PATHS)


def prefetchable(t: Tensor) -> bool:
    """A contiguous CUDA tensor of a whole number of 32-bit words."""
    return t.is_cuda and t.is_contiguous() and (t.numel() * t.element_size()) % 4 == 0


def l2_bytes(device: torch.device) -> Optional[int]:
    """The L2 cache of CUDA ``device`` in bytes (cached: no query inside a capture), or None
    where this torch does not report it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _L2_BYTES:
        props = torch.cuda.get_device_properties(index)
        _L2_BYTES[index] = getattr(props, "L2_cache_size", None)
    return _L2_BYTES[index]


def fits_l2(weights: list[Tensor]) -> bool:
    """Whether ``weights`` take at most half the L2 of their GPU (the rest for what the
    GEMMs and attention read meanwhile): π0's MLP weights, 25 MB in bf16, do on an H100 or
    H200 (50 MB) and an RTX 4090 (72 MB), not on a Jetson AGX Orin (4 MB), where nothing
    is prefetched. True where the size is not reported."""
    total = sum(w.numel() * w.element_size() for w in weights)
    l2 = l2_bytes(weights[0].device)
    return l2 is None or total <= l2 // 2


def start(weights: list[Tensor], site: str = "mlp") -> Optional[tuple]:
    """Read ``weights`` into L2 on the prefetch stream, after what the current stream has
    queued so far, where the selected path prefetches at ``site`` (:data:`SITES`); the
    handle for :func:`join`, or None where nothing is prefetched (not selected, not CUDA, a
    trace, a weight :func:`prefetchable` rejects, more than :func:`fits_l2` allows)."""
    if not os.environ.get(ENV_VAR) or site not in SITES[selected_path()]:
        return None
    if capturing_graph() or not all(prefetchable(w) for w in weights) or not fits_l2(weights):
        return None
    backends.require_triton("cuda", f"{ENV_VAR}={selected_path()}")
    import ate_fast.models.l2_prefetch_triton as kernels  # triton

    device = weights[0].device
    side, main = side_stream(device, "l2_prefetch"), torch.cuda.current_stream(device)
    side.wait_stream(main)  # fork: the prefetch joins the graph here
    with torch.cuda.stream(side):
        sink = torch.empty(kernels.sink_size(weights), dtype=torch.int32, device=device)
        kernels.prefetch(weights, sink)
    return main, side


def attention_weights(block: Any, qkv: Optional[Tensor]) -> list[Tensor]:
    """The weights a flow-transformer block's attention GEMMs read: ``[W_q; W_kv]`` of a
    fused call (``qkv``) or W_q and W_kv, and W_o."""
    first = [qkv] if qkv is not None else [block.q.weight, block.kv.weight]
    return [*first, block.o.weight]


def join(handle: Optional[tuple]) -> None:
    """The current stream waits for :func:`start`'s prefetch (a capture must end joined)."""
    if handle is not None:
        main, side = handle
        main.wait_stream(side)

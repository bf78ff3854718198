"""The guidance gradient beside the model: a second CUDA stream.

A guidance that reads the sample ``x`` alone (``reads_x_only``: :class:`ate_fast.steer.
LatentGuidance` in mode ``"direct"``, ``g = ∇ₓ −(1/N)‖E(x) − z*‖²``) does not need the
model's output: at each evaluation its gradient and the model's forward are independent
given ``x``. At B = 1 both are chains of small kernels that leave most of a GPU idle (on an
H200, π0's attention ran on 7 of 132 SMs; the encoder's kernels on a few each), and one
after the other they add: guidance through the paper's Transformer encoder added 48 % to
π0's captured call (2026-12-04). ``ATE_FAST_GUIDANCE_STREAM=side`` computes the gradient on
a second stream while the model runs on the current one (fork: the side stream waits for
the current one, so ``x`` is written; join: the current stream waits for the side one
before the update reads ``g``). Inside a captured CUDA graph the two become parallel
branches of the graph. The arithmetic is the same kernels on the same data; only their
order across the two streams changes.

Unset or ``same``: one stream, the gradient after the model — the default, until a GPU
measures the side stream (``bench_realsize.py``'s ``ate_capture_side_stream`` rows).
**Not run on a GPU yet.** On the CPU, in an export or a ``torch.compile`` trace, for a
guidance that does not declare ``reads_x_only``, and for ``"policy_vjp"`` guidance (its
gradient differentiates through the model) the one stream runs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ate_fast.argument_checks import env_choice
from ate_fast.ops.side_streams import side_stream

ENV_VAR = "ATE_FAST_GUIDANCE_STREAM"
PATHS = ("same", "side")


def selected_path() -> str:
    """``$ATE_FAST_GUIDANCE_STREAM``: ``same`` (also where unset) or ``side``."""
    return env_choice(ENV_VAR, PATHS)


def reads_x_only(guidance: Any) -> bool:
    """Whether ``guidance`` declares that its gradient reads ``x`` alone (the optional
    ``Guidance.reads_x_only``; a bool, anything else counts as no)."""
    return getattr(guidance, "reads_x_only", False) is True


def side_stream_for(guidance: Any, x: Tensor) -> Optional[torch.cuda.Stream]:
    """The stream for ``guidance``'s gradient at samples like ``x`` [B, H, D] beside the
    model, or None for one stream (the module docstring says when)."""
    if guidance is None or not x.is_cuda or selected_path() != "side":
        return None
    # a trace (torch.compile, export, jit.trace: the ONNX exporters run one) sees one stream
    if not reads_x_only(guidance) or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    return side_stream(x.device, "guidance")


def evaluate_beside(
    side: torch.cuda.Stream,
    x: Tensor,
    gradient: Callable[[Tensor, Any, Any], Tensor],
    model: Callable[[], Tensor],
) -> tuple[Tensor, Tensor]:
    """``(model(), gradient(x, None, None))`` with the gradient on ``side`` while the model
    runs on the current stream; the current stream then waits for both. ``x`` [B, H, D]."""
    main = torch.cuda.current_stream(x.device)
    side.wait_stream(main)  # fork: x and all before it are written
    try:
        with torch.cuda.stream(side), torch.enable_grad():
            g = gradient(x, None, None)
        m = model()
    finally:  # join (the update reads g), also on an error: a capture must end joined
        main.wait_stream(side)
    if isinstance(g, Tensor) and g.is_cuda and not torch.cuda.is_current_stream_capturing():
        # g's memory came from the side stream's pool: not reused before the current stream
        # has read it (inside a capture the graph's own pool and the fork order see to it)
        g.record_stream(main)
    return m, g

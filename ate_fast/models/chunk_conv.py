"""1-D convolutions over a short action chunk at batch 1 on the CPU, as one row-major GEMM.

At batch 1 ATen runs a float32 ``Conv1d`` / ``ConvTranspose1d`` on the CPU through its
native im2col path (``slow_conv2d``: oneDNN only from batch 2 or a large input), whose
GEMM multiplies the weight [C_out, C_in·k] by a few output columns (a Diffusion Policy
U-Net's chunk is 16, 8 and 4 steps long at its three levels) — a shape MKL runs at a
fraction of its speed. The same convolution written as chunk rows times the transposed
weight (``F.linear`` of the im2col rows [L_out, C_in·k]; transposed: the input rows times
the weight [C_in, C_out·k], then an overlap-add) streams the weight once, as a Linear
layer at batch 1 does. Measured on one thread of an AMD EPYC (Zen 4), batch 1:
``Conv1d(512, 512, 5)`` at L = 8 1064 → 317 µs, ``Conv1d(1024, 1024, 5)`` at L = 4
4294 → 1167 µs, ``ConvTranspose1d(512, 512, 4, stride=2)`` at L = 4 2060 → 268 µs (each
with the GroupNorm after it); at L = 16 both forms run at the GEMM's compute rate and
tie, and a small weight (under ≈ 20 k elements per thread) pays more for the im2col copy than it
saves, so those keep ATen's path.

:class:`ChunkConv1d` and :class:`ChunkConvTranspose1d` are ``nn.Conv1d`` /
``nn.ConvTranspose1d`` (same parameters, ``state_dict`` and arguments) that take the row
form exactly there: CPU, float32 (``ChunkConv1d``: bfloat16 too), batch 1, fewer than
``ROWS_BELOW`` output (transposed: input) steps, at least ``MIN_WEIGHT`` weight elements
per torch thread, no groups or dilation, zero padding, and not while ``torch.export`` /
``torch.compile`` / the ONNX exporter traces the module (their graphs keep the convolution
op, which Inductor, ONNX Runtime and TensorRT each lower themselves). Everything else is
the parent class's call. The row GEMMs go through :mod:`~ate_fast.models.cpu_gemm`
(oneDNN where it selects it: AMD Zen 4 / 5). The row form is differentiable (autograd,
``torch.func``) like the convolution; its rounding differs by summation order only.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ate_fast.models.cpu_gemm import linear, times_weight
from ate_fast.models.trace_state import capturing_graph

# Row form below this many output steps: at 16 the two forms tie (compute-bound GEMMs).
ROWS_BELOW = 16
# ... and from this many weight elements per torch thread: on one thread Conv1d(64, 64, 5)
# (20 480) gains, 32 channels or ConvTranspose1d(64, 64, 4) (16 384) lose to the im2col
# copy and the extra op calls; on two, ATen's path runs Conv1d(64, 64, 5) at L = 8 in
# 18 µs to the row form's 23 (from 26 on one), Conv1d(128, 128, 3) ties, larger ones gain.
MIN_WEIGHT = 20_000
# bf16 too for Conv1d: F.linear accumulates in float32 and rounds once, as oneDNN's bf16
# convolution does: the DP U-Net's bf16 capture() (DDIM 10) 323 -> 119 ms. Not for the
# transposed form, whose overlap-add would sum taps already rounded to bf16.
CONV_DTYPES = (torch.float32, torch.bfloat16)


def _row_form_pays(x: Tensor, weight: Tensor, steps: int, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Batch 1 of ``steps`` rows on the CPU in one of ``dtypes``, a weight large enough
    (asked only outside a graph capture: a symbolic batch must not be compared with 1)."""
    return (
        x.device.type == "cpu"
        and x.dtype in dtypes
        and weight.dtype == x.dtype
        and x.dim() == 3
        and x.shape[0] == 1
        and steps < ROWS_BELOW
        and weight.numel() >= MIN_WEIGHT * torch.get_num_threads()
    )


def _plain(layer: Union[nn.Conv1d, nn.ConvTranspose1d]) -> bool:
    """No groups, dilation, padding string or non-zero padding mode: what the row forms do."""
    return (
        layer.groups == 1
        and layer.dilation == (1,)
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def conv1d_rows(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int
) -> Tensor:
    """``F.conv1d(x, weight, bias, stride, padding)`` as im2col rows times the weight.

    ``x`` [B, C_in, L], ``weight`` [C_out, C_in, k] -> [B, C_out, L_out]."""
    batch, channels, _ = x.shape
    out_channels, _, k = weight.shape
    if padding:
        x = F.pad(x, (padding, padding))
    rows = x.unfold(2, k, stride).transpose(1, 2)  # [B, L_out, C_in, k], a view
    rows = rows.reshape(batch, rows.shape[1], channels * k)  # the one im2col copy
    out = linear(rows, weight.reshape(out_channels, channels * k), bias)  # [B, L_out, C_out]
    # channels-major again: the next layer's im2col gathers 10-20x slower from a transposed view
    return out.transpose(1, 2).contiguous()


def conv_transpose1d_rows(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int
) -> Tensor:
    """``F.conv_transpose1d(x, weight, bias, stride, padding)`` as the input rows times
    the weight, then the overlap-add of the k taps (``F.fold``).

    ``x`` [B, C_in, L], ``weight`` [C_in, C_out, k] -> [B, C_out, L_out] with
    L_out = (L − 1)·stride + k − 2·padding."""
    batch, channels, steps = x.shape
    _, out_channels, k = weight.shape
    full = (steps - 1) * stride + k
    rows = x.transpose(1, 2).contiguous()  # [B, L, C_in]
    taps = times_weight(rows, weight.reshape(channels, out_channels * k))  # [B, L, C_out·k]
    columns = taps.transpose(1, 2).contiguous()  # [B, C_out·k, L]: fold's column layout
    out = F.fold(columns, (1, full), (1, k), stride=(1, stride))  # the overlap-add of the taps
    out = out.view(batch, out_channels, full)[:, :, padding : full - padding]
    return out if bias is None else out + bias.view(1, out_channels, 1)


class ChunkConv1d(nn.Conv1d):
    """``nn.Conv1d`` that runs :func:`conv1d_rows` where it pays (module docstring)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if _plain(self) and not capturing_graph():
            (k,), (stride,), (padding,) = self.kernel_size, self.stride, self.padding
            steps = (input.shape[-1] + 2 * padding - k) // stride + 1
            if _row_form_pays(input, weight, steps, CONV_DTYPES):
                return conv1d_rows(input, weight, bias, stride, padding)
        return super()._conv_forward(input, weight, bias)


class ChunkConvTranspose1d(nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` that runs :func:`conv_transpose1d_rows` where it pays."""

    def forward(self, input: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        plain = output_size is None and self.output_padding == (0,) and _plain(self)
        steps = input.shape[-1]
        (k,), (stride,), (padding,) = self.kernel_size, self.stride, self.padding
        # an empty or negative output length: the parent raises "Output size is too small"
        plain = plain and not capturing_graph() and (steps - 1) * stride + k > 2 * padding
        if plain and _row_form_pays(input, self.weight, steps, (torch.float32,)):
            return conv_transpose1d_rows(input, self.weight, self.bias, stride, padding)
        return super().forward(input, output_size)


_CHUNK_CLASSES: dict[type, type] = {
    nn.Conv1d: ChunkConv1d,
    nn.ConvTranspose1d: ChunkConvTranspose1d,
}


def use_chunk_convs(module: nn.Module) -> Callable[[], None]:
    """Make every ``nn.Conv1d`` / ``nn.ConvTranspose1d`` in ``module`` (exactly those
    classes: a subclass may have a forward of its own) a :class:`ChunkConv1d` /
    :class:`ChunkConvTranspose1d` in place — the same objects and parameters, so optimisers,
    hooks and ``state_dict`` see no change. Returns a function that puts the classes back.
    Used by ``ate_fast.integrations.lerobot.patch_policy`` for LeRobot's U-Net."""
    swapped = []
    for layer in module.modules():
        chunk_class = _CHUNK_CLASSES.get(type(layer))
        if chunk_class is not None:
            swapped.append((layer, type(layer)))
            layer.__class__ = chunk_class

    def restore() -> None:
        for layer, original in swapped:
            if type(layer) is _CHUNK_CLASSES[original]:  # not re-classed since
                layer.__class__ = original

    return restore

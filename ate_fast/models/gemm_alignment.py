"""Buffers whose rows start on 16-byte boundaries, for the GEMMs that read or write them.

cuBLAS chooses a kernel by the alignment of its matrices' rows as well as by their shape:
a row stride that is not a multiple of 16 bytes rules out the kernels that load 16 bytes
at a time (Hopper's TMA kernels need it outright) and leaves older CUTLASS kernels named
``…_align2`` (two bf16 elements). The flow transformer's attention input-VJP multiplies
score-sized matrices [rows, N] with N = prefix + H keys: at π0's 816 + 50 = 866 keys a bf16
row is 1732 bytes. On an H200 (2026-12-04, ``bench_realsize.py``, RTC B = 1, the
``…_align2`` kernels in its profile) its five such GEMMs per block took ≈ 7 µs each, 6.1 of
the call's 28.7 ms. :func:`aligned_rows` gives those matrices a row stride padded to 16
bytes (the padding is never read), so the same products run on the aligned kernels;
``ldc`` / ``lda`` are the only change cuBLAS sees (ATen passes a row-major view's row
stride straight through: ``prepare_batch_matrix_for_cublas``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ate_fast.models.trace_state import autocast_active, opaque_ops_may_run

ROW_ALIGN_BYTES = 16  # the widest load cuBLAS's kernels make per thread (and TMA's stride unit)


def padded_length(n: int, element_size: int) -> int:
    """``n`` rounded up to a whole number of :data:`ROW_ALIGN_BYTES` of ``element_size``-byte
    elements (``n`` itself where an element is wider)."""
    per = max(1, ROW_ALIGN_BYTES // element_size)
    return -(-n // per) * per


def aligned_rows(shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` [..., n] with ``like``'s dtype and device whose
    rows start on :data:`ROW_ALIGN_BYTES` boundaries: a view of [..., padded n] (contiguous
    where n already fills whole rows). Each leading dim's stride is the next one's times
    its size, so ``view(-1, n)`` keeps it as rows of one stride."""
    n = shape[-1]
    padded = padded_length(n, like.element_size())
    buffer = like.new_empty((*shape[:-1], padded))
    return buffer if padded == n else buffer[..., :n]


def aligned_writes_may_run(*tensors: Tensor) -> bool:
    """Whether products of ``tensors`` may be written into :func:`aligned_rows` buffers
    (``out=``): an opaque op may run (:func:`~ate_fast.models.trace_state.opaque_ops_may_run`:
    no autograd record, transform or graph trace) and autocast is off for their device (an
    ``out=`` op is not autocast-eligible: it would run in the buffer's dtype, not
    autocast's)."""
    return opaque_ops_may_run(*tensors) and not autocast_active(tensors[0].device.type)


def rows_aligned(t: Tensor) -> bool:
    """Whether ``t`` [..., n]'s rows are unit-stride and start on :data:`ROW_ALIGN_BYTES`
    boundaries (its data pointer and row stride both multiples)."""
    size = t.element_size()
    row = t.stride(-2) if t.dim() >= 2 else t.shape[-1]
    return (
        t.stride(-1) == 1
        and (row * size) % ROW_ALIGN_BYTES == 0
        and t.data_ptr() % ROW_ALIGN_BYTES == 0
    )

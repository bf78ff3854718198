"""A Triton kernel a GPU refuses to launch (``OutOfResources``: more shared memory or
registers per block than the device allows) surfaces as ``BackendUnavailableError``
naming the path, the launcher, the resource, need and limit, and the setting that runs
another path — on every Triton path of the package. The refusal is simulated: the CPU's
interpreter has no resource limits, so each path's kernel is replaced by one whose
launch raises what Triton raises."""

from __future__ import annotations

import pytest
import torch

from ate_fast.ops.backends import MIN_TRITON

pytest.importorskip("triton", minversion=MIN_TRITON)

from triton.runtime.errors import OutOfResources

import ate_fast.ops
from ate_fast.errors import BackendUnavailableError
from ate_fast.models import block_epilogues
from ate_fast.models import block_epilogues_triton as fb
from ate_fast.ops import backends
from ate_fast.steer import transformer_triton as tt

NEED, LIMIT = 69_632, 65_536  # the float64 attention backward on a 64 KB-per-block GPU


class _Refused:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` raises as a launch
    beyond the device's limits does."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise OutOfResources(NEED, LIMIT, "shared memory")

        return launch


def _check(error: pytest.ExceptionInfo, path: str, launcher: str, instead: str) -> None:
    message = str(error.value)
    for part in (path, launcher, f"needs {NEED} of shared memory", f"allows {LIMIT}", instead):
        assert part in message, (part, message)
    assert isinstance(error.value.__cause__, OutOfResources)
    assert isinstance(error.value, RuntimeError)  # BackendUnavailableError's builtin


def test_flow_epilogue_kernels(monkeypatch):
    monkeypatch.setenv(block_epilogues.ENV_VAR, "triton")
    monkeypatch.setattr(fb, "_gated_gelu_kernel", _Refused())
    with pytest.raises(BackendUnavailableError) as error:
        block_epilogues.gated_gelu(torch.randn(2, 5, 16))
    _check(error, "ATE_FAST_FLOW_EPILOGUES=triton", "gated_gelu", "(or set it to torch)")


def test_transformer_guidance_kernels(monkeypatch):
    monkeypatch.setattr(tt, "_attention_backward_kernel", _Refused())
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 12, 32, generator=g, dtype=torch.float64) for _ in range(4))
    _, saved = tt.attention(q, k, v, num_heads=2)  # the forward's kernel launches
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    with pytest.raises(BackendUnavailableError) as error:
        tt.attention_backward(grad, saved, dq, dk, dv)
    _check(error, "ATE_FAST_TRANSFORMER_GUIDANCE=triton", "attention_backward", "set it to vjp")


@pytest.mark.parametrize("op", ["guided_step", "mlp_guidance"])
def test_fused_op_backends(monkeypatch, op):
    monkeypatch.setenv("ATE_FAST_BACKEND", "triton")
    backends.SELECTION_CACHE.clear()
    x = torch.randn(2, 4, 3)
    if op == "guided_step":
        from ate_fast.ops.guided_step import triton as kernels

        monkeypatch.setattr(kernels, "_guided_step_kernel", _Refused())
        call = lambda: ate_fast.guided_step(x, torch.randn(2, 4, 3), a=1.0, b=0.5)  # noqa: E731
    else:
        from ate_fast.ops.mlp_guidance import triton as kernels

        monkeypatch.setattr(kernels, "_forward_kernel", _Refused())
        monkeypatch.setattr(kernels, "_latent_kernel", _Refused())
        weights = [torch.randn(8, 12), torch.randn(4, 8)]
        call = lambda: ate_fast.mlp_guidance(x, weights, [None, None], target=torch.zeros(2))  # noqa: E731
    with pytest.raises(BackendUnavailableError) as error:
        call()
    _check(error, f"{op}'s triton backend", f"{op}_triton_into", "ATE_FAST_BACKEND=cuda")


class _OnGPU(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:<index>`` (this machine has no GPU)."""

    index = 1

    @property
    def device(self):
        return torch.device("cuda", self.index)


def test_launches_on_the_datas_gpu(monkeypatch):
    """Triton launches on the current device; a launcher given tensors on another GPU must
    make theirs current for the launch (else the kernel runs on the wrong GPU)."""
    from ate_fast.ops import triton_resources

    entered = []

    class _Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", _Device)
    seen = []
    launcher = triton_resources.launch_limits("a path", "instead")(lambda *a: seen.append(a))
    on_gpu = torch.zeros(2).as_subclass(_OnGPU)
    launcher(on_gpu, 3)
    assert entered == [torch.device("cuda", 1), "exit"] and len(seen) == 1
    monkeypatch.setattr(_OnGPU, "index", 0)  # the current device: no switch
    launcher(on_gpu)
    launcher(torch.zeros(2), on_gpu)  # CPU data (the interpreter): no switch
    assert entered == [torch.device("cuda", 1), "exit"] and len(seen) == 3

"""Test session set-up.

Triton kernels run on the CPU through the interpreter unless the caller chose
otherwise: ``TRITON_INTERPRET`` must be set before triton is first imported (the GPU
suite sets ``TRITON_INTERPRET=0`` to run them on the GPU). Tests marked ``cuda``
execute CUDA kernels and are skipped only when no GPU is present.
"""

import os
import signal

os.environ.setdefault("TRITON_INTERPRET", "1")

# A process a script started in the background (`cmd &`, as gpu_suite.sh starts its test
# shards, or a runner its whole command) inherits SIGINT ignored, and Python then never
# raises KeyboardInterrupt: the suite's `timeout -s INT` would go unheard until its SIGKILL,
# and pytest would write no JSON / JUnit XML of what it finished. Listen to SIGINT again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest
import torch


def _shard(value: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> (i, n)."""
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise pytest.UsageError(
            f"ATE_FAST_TEST_SHARD: expected 'i/n' with 0 <= i < n, got {value!r}"
        )
    return index, count


FIRST_MODULE = "test_triton_offline_compile.py"  # scheduled before every other module

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # an xdist worker: its share of the cores, not all of them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_configure(config):
    # xdist's --dist loadscope hands out the modules in the collected order, which
    # _scheduled sets, instead of its own (most tests first)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _scheduled(items: list) -> list:
    """``items`` module by module: :data:`FIRST_MODULE` first, then the modules with the
    most tests first (as xdist's reorder does), each in its own order. The offline compile's
    module has two tests, so xdist's reorder handed it out last, and its three compile
    subprocesses (≈ 760 s of CPU) ran alone at the end of the two-core CI run; first, they
    run beside the other tests."""
    modules: dict = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    order = sorted(modules.values(), key=lambda m: (m[0].path.name != FIRST_MODULE, -len(m)))
    return [item for module in order for item in module]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 8 (each holds torch and Triton's
    interpreter, about 1.5 GB)."""
    return max(1, min(os.cpu_count() or 1, 8))


def pytest_collection_modifyitems(config, items):
    # ATE_FAST_TEST_SHARD=i/n keeps every n-th test from the i-th: gpu_suite.sh runs the
    # cuda tests as concurrent shards (their time is mostly Triton compiling, on the CPU)
    shard = os.environ.get("ATE_FAST_TEST_SHARD", "").strip()
    if shard:
        index, count = _shard(shard)
        config.hook.pytest_deselected(items=[t for n, t in enumerate(items) if n % count != index])
        items[:] = [t for n, t in enumerate(items) if n % count == index]
    items[:] = _scheduled(items)
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="cuda test: no GPU present on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_tf32():
    """float32 matmuls in full precision for the test, restored after it."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test, the previous count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

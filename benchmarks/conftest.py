"""Benchmark session set-up: Triton on the GPU (never the interpreter), CUDA timing help."""

import datetime
import json
import os
import platform
import signal
from pathlib import Path
from typing import Optional

os.environ.setdefault("TRITON_INTERPRET", "0")

# A process a script started in the background (`cmd &`, as gpu_suite.sh starts its test
# shards, or a runner its whole command) inherits SIGINT ignored, and Python then never
# raises KeyboardInterrupt: the suite's `timeout -s INT` would go unheard until its SIGKILL,
# and pytest would write no JSON / JUnit XML of what it finished. Listen to SIGINT again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest
import torch

from ate_fast.align.atomic_io import atomic_write_text  # whole or not at all

PARTIAL_SUFFIX = ".partial"  # <--benchmark-json>.partial: the cases finished so far


@pytest.fixture
def cuda_sync():
    """A callable that waits for the GPU (a no-op on the CPU)."""
    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


@pytest.fixture
def time_calls(benchmark):
    """Time ``fn`` on ``device``: on the GPU a round is ``calls`` launches and one
    synchronisation (``extra_info["calls"]`` lets report.py divide); on the CPU, one call."""

    def run_benchmark(fn, device: str, calls: int, rounds: int) -> None:
        if device != "cuda":
            benchmark.extra_info["calls"] = 1
            benchmark(fn)
            return
        benchmark.extra_info["calls"] = calls

        def batch():
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()

        batch()  # warm-up: allocator, kernel caches
        benchmark.pedantic(batch, rounds=rounds, warmup_rounds=2)

    return run_benchmark


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Drop the cases that have no timed round before pytest-benchmark writes its JSON: a
    case interrupted (gpu_suite.sh's SIGINT at a suite's limit) in its warm-up or first
    round has none, and pytest-benchmark's writer then fails (``min() arg is an empty
    sequence``) and writes no JSON at all — losing every case the suite finished."""
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    drop_untimed(benchmark_session)
    yield
    target = _json_path(benchmark_session)
    if target:  # pytest-benchmark wrote the whole JSON: the partial one is not needed
        try:
            json.loads(Path(target).read_text())
        except (OSError, ValueError):
            return
        Path(f"{target}{PARTIAL_SUFFIX}").unlink(missing_ok=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After every case, the timed cases so far into ``<--benchmark-json>.partial``. A suite
    killed outright (SIGKILL after gpu_suite.sh's grace, as bench_rtc twice on the H200)
    never reaches pytest-benchmark's writer: gpu_summary.py then adopts the partial file."""
    yield
    write_partial(getattr(item.config, "_benchmarksession", None))


def _json_path(benchmark_session) -> Optional[str]:
    """The ``--benchmark-json`` path: pytest-benchmark 5 keeps a ``Path``, 4 an open file
    (whose ``.name`` is the path as given; a ``Path``'s ``.name`` is only its last part)."""
    target = getattr(benchmark_session, "json", None)
    if target is None:
        return None
    return str(target.name if hasattr(target, "write") else target)


def write_partial(benchmark_session) -> None:
    """The timed cases of ``benchmark_session`` as pytest-benchmark's JSON (stats, no raw
    data) into ``<--benchmark-json>.partial``, atomically; nothing without --benchmark-json."""
    target = _json_path(benchmark_session)
    cases = [c for c in getattr(benchmark_session, "benchmarks", None) or [] if _timed(c)]
    if not target or not cases:
        return
    data = {
        "partial": True,  # pytest-benchmark's own writer never ran
        "machine_info": {"node": platform.node(), "python_version": platform.python_version()},
        "commit_info": {},
        "benchmarks": [c.as_dict(include_data=False) for c in cases],
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    atomic_write_text(Path(f"{target}{PARTIAL_SUFFIX}"), json.dumps(data, indent=1, default=str))


def drop_untimed(benchmark_session) -> list[str]:
    """Remove the untimed cases from ``benchmark_session.benchmarks``; their names."""
    cases = getattr(benchmark_session, "benchmarks", None)
    if not isinstance(cases, list):
        return []
    untimed = [case for case in cases if not _timed(case)]
    cases[:] = [case for case in cases if _timed(case)]
    return [getattr(case, "fullname", "?") for case in untimed]


def _timed(case) -> bool:
    data = getattr(getattr(case, "stats", None), "data", None)
    return data is None or len(data) > 0  # a layout this does not know: kept

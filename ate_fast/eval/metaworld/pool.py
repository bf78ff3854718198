"""Jobs run in worker processes (or in this one), with a progress bar."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable

import torch
from tqdm.auto import tqdm

from ate_fast.eval.metaworld.cache import ResultCache


def run_pool(
    fn: Callable[[ResultCache, tuple], str],
    store: ResultCache,
    jobs: list[tuple],
    workers: int,
    desc: str,
    progress: bool,
) -> None:
    """``fn(store, job)`` for every job: in this process when ``workers <= 1``, else in
    ``workers`` spawned processes (``fn`` must be a module-level function). Each call's
    return value labels the progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, dynamic_ncols=True)
    if workers <= 1:
        for job in jobs:
            bar.set_postfix_str(fn(store, job))
            bar.update()
    else:
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(fn, store, job) for job in jobs]
            for f in as_completed(futures):
                bar.set_postfix_str(f.result())
                bar.update()
    bar.close()

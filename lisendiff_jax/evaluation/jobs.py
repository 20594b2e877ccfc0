"""Running many independent model conversations at once, each failure kept apart."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def run_jobs(
    jobs: Mapping[K, Callable[[], T]], workers: int
) -> tuple[dict[K, T], dict[K, BaseException]]:
    """Runs `jobs` on `workers` threads: (results, errors), both keyed as `jobs` are. A failing
    job does not stop the others. On an interrupt (Ctrl-C) the jobs not yet started are
    cancelled and the running ones finish, so that their results are not lost."""
    results: dict[K, T] = {}
    errors: dict[K, BaseException] = {}
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        futures = {pool.submit(job): name for name, job in jobs.items()}
        for future in concurrent.futures.as_completed(futures):
            error = future.exception()
            if error is None:
                results[futures[future]] = future.result()
            else:
                errors[futures[future]] = error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results, errors

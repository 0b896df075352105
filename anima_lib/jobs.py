"""A notebook's independent trainings side by side: `run_jobs(params, job, jobs)` calls `job(params, **kwargs)` for
each kwargs of `jobs`, in this process one after another (run.jobs = 1), or in run.jobs spawned worker processes that
share run.threads between them. A worker loads its own models from disk (the job function does that when it is not
handed them), trains with its own atomic checkpoints, and returns what the in-process call returns.

Why: the nano networks are too small for two CPU threads to halve a step. Measured on this 2-core machine
(2026-12-04, rCM with 1-step DMD rollouts): one run 0.56 s/iteration at 2 threads alone; two runs side by side at 1
thread each 0.84 and 0.90 s/iteration: two equal jobs finish in 1.55 units of one job's 2-thread time instead of 2.
A worker must really run its share: two side by side with 2 OpenMP threads each took 2.5-3.2 s/iteration (run.threads
is handed to the job for that: models.load_components sets it).
Only CPU runs: a GPU is one device, spread over it with torchrun instead.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch

from . import report


def _start_worker() -> None:
    report.quiet()  # the same known-benign notices the notebooks filter


def _call(job: Callable, threads: int, params, kwargs: dict):
    # the share goes into run.threads too: models.load_components sets run.threads, and a worker left at the
    # notebook's count runs an OpenMP team per worker on shared cores (measured 4.5x slower than one at a time)
    params = dataclasses.replace(params, run=dataclasses.replace(params.run, threads=threads))
    torch.set_num_threads(threads)
    return job(params, **kwargs)


def thread_shares(total: int, workers: int, n_jobs: int) -> list[int]:
    """Threads of each job: total // workers, but the last n_jobs % workers jobs run when the others have finished
    (the jobs are equal), so they share all threads among themselves."""
    tail = n_jobs % workers
    first = [max(1, total // workers)] * (n_jobs - tail)
    return first + [max(1, total // tail)] * tail if tail else first


def workers_for(params, n_jobs: int) -> int:
    """How many worker processes `n_jobs` jobs get (1: run them in this process)."""
    if params.run.device != "cpu":
        return 1
    return max(1, min(params.run.jobs, n_jobs))


def run_jobs(params, job: Callable, jobs: list[dict], **in_process) -> list:
    """[job(params, **kwargs) for kwargs in jobs], in worker processes when run.jobs > 1 (results in order; a worker's
    error is raised here). `in_process` (already loaded models) is passed only to in-process calls: a worker loads
    its own, so the job function must accept them as optional keywords."""
    workers = workers_for(params, len(jobs))
    if workers == 1:
        return [job(params, **in_process, **kwargs) for kwargs in jobs]
    shares = thread_shares(params.run.threads or torch.get_num_threads(), workers, len(jobs))
    context = multiprocessing.get_context("spawn")  # fork would copy a kernel's threads and open files
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker) as pool:
        futures = [pool.submit(_call, job, threads, params, kwargs) for threads, kwargs in zip(shares, jobs)]
        return [future.result() for future in futures]

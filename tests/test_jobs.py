"""jobs.run_jobs: a notebook's independent trainings in worker processes (results in order, threads shared, errors
raised in the notebook), in-process when run.jobs is 1 or the device is not the CPU."""
import dataclasses
import os

import pytest
import torch

from anima_lib import config, jobs


def _job(params, x, loaded=None):
    if x < 0:
        raise ValueError(f"x = {x}: negative")
    torch.set_num_threads(params.run.threads)   # what models.load_components does in a worker's job
    return {"pid": os.getpid(), "threads": torch.get_num_threads(), "square": x * x, "loaded": loaded}


def test_jobs_run_in_workers_in_order_sharing_the_threads():
    params = config.load_config("nano", ["run.jobs=2", "run.threads=2"])
    results = jobs.run_jobs(params, _job, [{"x": 3}, {"x": 4}, {"x": 5}], loaded="the notebook's models")
    assert [r["square"] for r in results] == [9, 16, 25]
    assert all(r["pid"] != os.getpid() for r in results)
    assert [r["threads"] for r in results] == [1, 1, 2]  # the third runs alone once the first two have finished
    assert all(r["loaded"] is None for r in results)  # a worker loads its own models


def test_one_job_at_a_time_runs_in_this_process_with_its_models():
    params = config.load_config("nano", ["run.jobs=1"])
    results = jobs.run_jobs(params, _job, [{"x": 2}], loaded="models")
    assert results == [{"pid": os.getpid(), "threads": torch.get_num_threads(), "square": 4, "loaded": "models"}]
    assert jobs.workers_for(config.load_config("nano", ["run.jobs=4"]), 1) == 1
    four = config.load_config("nano", ["run.jobs=4"])
    on_gpu = dataclasses.replace(four, run=dataclasses.replace(four.run, device="cuda"))
    assert jobs.workers_for(four, 3) == 3 and jobs.workers_for(on_gpu, 3) == 1  # one GPU: torchrun spreads work


def test_a_workers_error_is_raised_in_the_notebook():
    params = config.load_config("nano", ["run.jobs=2", "run.threads=2"])
    with pytest.raises(ValueError, match="x = -1: negative"):
        jobs.run_jobs(params, _job, [{"x": 1}, {"x": -1}])


def test_run_jobs_must_be_positive():
    with pytest.raises(config.ConfigError, match="run.jobs"):
        config.load_config("nano", ["run.jobs=0"])


def test_thread_shares_give_the_last_round_all_threads():
    assert jobs.thread_shares(2, 2, 4) == [1, 1, 1, 1]
    assert jobs.thread_shares(2, 2, 3) == [1, 1, 2]
    assert jobs.thread_shares(16, 3, 4) == [5, 5, 5, 16]
    assert jobs.thread_shares(1, 2, 2) == [1, 1]

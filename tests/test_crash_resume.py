"""Fault injection: a distillation killed anywhere — between iterations, while staging a checkpoint, between the two
renames of the folder swap — and started again ends with the same EMA, bit for bit, as a run never interrupted.
A time budget only pauses; settings that change what is learned cannot be resumed into."""
import copy
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anima_lib import io, toy
from anima_lib.distill import trainer
from anima_lib.flow_training import FlowMatchingConfig, train_flow_matching

sys.path.insert(0, str(Path(__file__).parent))
import crash_toy_distill  # noqa: E402

SCRIPT = str(Path(__file__).with_name("crash_toy_distill.py"))


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after it runs, no `except Exception` catches it."""


def _finish(folder: Path) -> dict:
    d = crash_toy_distill.distiller(folder)
    d.train(progress=False)
    assert d.state.iteration == crash_toy_distill.ITERATIONS and not d.paused
    return {k: v.clone() for k, v in d.ema.shadow.items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: the resumed EMA differs from the uninterrupted run's"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the killed subprocesses run: bit-for-bit comparisons need the same kernels
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread):
    return _finish(tmp_path_factory.mktemp("straight"))


@pytest.mark.parametrize("kill_at", ["first rename", "second rename", "staging a file"])
def test_killed_inside_a_checkpoint_save_resumes_to_the_same_ema(straight, tmp_path, monkeypatch, kill_at):
    real_rename, real_save = os.rename, trainer.save_file
    calls = {"saves": 0}

    def rename(src, dst):
        src, dst = Path(src), Path(dst)
        if calls["saves"] == 3:   # the swap of the third checkpoint
            if kill_at == "first rename" and (src.name, dst.name) == ("last", ".last.old"):
                raise Killed()
            if kill_at == "second rename" and (src.name, dst.name) == (".last.tmp", "last"):
                raise Killed()
        return real_rename(src, dst)

    def save_file(tensors, path, *a, **kw):
        if Path(path).name == "student.safetensors":
            calls["saves"] += 1
            if kill_at == "staging a file" and calls["saves"] == 3:
                Path(path).write_bytes(b"half a file")   # a torn write in the staging folder
                raise Killed()
        return real_save(tensors, path, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(trainer, "save_file", save_file)
    with pytest.raises(Killed):
        crash_toy_distill.distiller(tmp_path).train(progress=False)
    ck = tmp_path / "ck"
    if kill_at == "second rename":
        assert not (ck / "last").exists() and (ck / ".last.old" / "state.json").is_file()  # the window itself
    monkeypatch.setattr(os, "rename", real_rename)
    monkeypatch.setattr(trainer, "save_file", real_save)
    resumed = crash_toy_distill.distiller(tmp_path)
    assert resumed.state.iteration == 2 * crash_toy_distill.CHECKPOINT_EVERY  # the last complete checkpoint
    _assert_same(_finish(tmp_path), straight)


def test_sigkill_at_random_moments_then_resume_gives_the_same_ema(straight, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(18)
    kills = 0
    for attempt in range(12):
        process = subprocess.Popen([sys.executable, SCRIPT, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        if attempt < 3:  # three kills at random moments after start-up, then let it finish
            process.stdout.readline()                 # "start at iteration N": imports and model are ready
            time.sleep(rng.uniform(0.05, 0.8))
            process.send_signal(signal.SIGKILL)
        out, err = process.communicate(timeout=300)
        if process.returncode == -signal.SIGKILL:
            kills += 1
            continue
        assert process.returncode == 0, err[-2000:]
        if (tmp_path / "ema_final.safetensors").is_file():
            break
    assert kills >= 1
    _assert_same(load_file(tmp_path / "ema_final.safetensors"), straight)


def test_atomic_replace_dir_recovers_the_old_folder_after_a_kill_between_the_renames(tmp_path):
    target, old = tmp_path / "last", tmp_path / ".last.old"
    old.mkdir()
    (old / "state.json").write_text("{}")      # what a kill between the two renames leaves: no last/, only .last.old
    staging = tmp_path / ".last.tmp"
    staging.mkdir()
    (staging / "state.json").write_text('{"new": 1}')
    io.recover_dir(target)
    assert (target / "state.json").read_text() == "{}" and not old.exists()
    io.atomic_replace_dir(staging, target)
    assert (target / "state.json").read_text() == '{"new": 1}' and not old.exists()


def test_a_time_budget_pauses_and_the_resumed_result_does_not_depend_on_it(straight, tmp_path):
    invocations = 0
    while True:
        d = crash_toy_distill.distiller(tmp_path)
        d.cfg.time_budget_s = 0.15     # a very slow machine: every invocation pauses after a few iterations
        d.train(progress=False)
        invocations += 1
        if not d.paused:
            break
        assert (tmp_path / "ck" / "last" / "state.json").is_file()   # a pause always leaves a checkpoint
        assert invocations < 200
    assert invocations > 1
    _assert_same(d.ema.shadow, straight)


@pytest.mark.parametrize("change, param", [("lr", "distill.lr"), ("batch_size", "distill.batch_size"),
                                           ("seed", "run.seed")])
def test_resume_with_changed_settings_is_refused_naming_the_parameter(tmp_path, change, param):
    d = crash_toy_distill.distiller(tmp_path)
    d.train(progress=False, stop_after=8)
    d.save()
    field = toy.GaussianMixtureField.default_2d()
    cfg = copy.deepcopy(d.cfg)
    setattr(cfg, change, getattr(cfg, change) * 2 + 1)
    with pytest.raises(ValueError, match=re.escape(param) + ": checkpoint"):
        trainer.Distiller(field.velocity, toy.ToyVelocityMLP(width=64), lambda m, x, s, c: m(x, s, c),
                          toy.ToyData(field), cfg, tmp_path / "ck")
    fewer = copy.deepcopy(d.cfg)
    fewer.iterations = 4   # a checkpoint past the asked-for steps is never passed off as the shorter run
    with pytest.raises(ValueError, match="trained 8 iterations, more than the 4 asked for"):
        trainer.Distiller(field.velocity, toy.ToyVelocityMLP(width=64), lambda m, x, s, c: m(x, s, c),
                          toy.ToyData(field), fewer, tmp_path / "ck")
    more = copy.deepcopy(d.cfg)
    more.iterations, more.time_budget_s, more.checkpoint_every = 200, 60.0, 50   # when it stops: resumable
    resumed = trainer.Distiller(field.velocity, toy.ToyVelocityMLP(width=64), lambda m, x, s, c: m(x, s, c),
                                toy.ToyData(field), more, tmp_path / "ck")
    assert resumed.state.iteration == 8


def test_flow_matching_budget_pauses_and_resumes_to_the_same_weights(tmp_path):
    field = toy.GaussianMixtureField.default_2d()

    def train(folder, budget):
        model = toy.ToyVelocityMLP(width=32, seed=1)
        cfg = FlowMatchingConfig(steps=60, batch_size=32, lr=1e-3, warmup_steps=5, checkpoint_every=10,
                                 time_budget_s=budget, caption_dropout=0.0)

        def batches(step, generator):
            return field.sample(32, generator).float(), torch.zeros(32, 1, 1)

        return train_flow_matching({"net": model}, lambda x, s, c: model(x, s), batches, torch.zeros(1, 1, 1), cfg,
                                   folder, progress=False)

    full = train(tmp_path / "full", None)
    assert not full["paused"]
    pauses = 0
    while (result := train(tmp_path / "paused", 0.02))["paused"]:
        pauses += 1
        assert pauses < 200
    assert pauses >= 1
    a, b = load_file(tmp_path / "full" / "last" / "ema.safetensors"), load_file(tmp_path / "paused" / "last" / "ema.safetensors")
    _assert_same(a, b)


def test_gradient_accumulation_takes_the_same_steps_as_the_whole_batch(tmp_path):
    runs = {}
    for passes in (1, 4):
        d = crash_toy_distill.distiller(tmp_path / f"accumulate{passes}")
        d.cfg.grad_accumulation = passes   # 64 rows per step as 1 x 64 or 4 x 16: the same draws, the same sums
        d.cfg.iterations = 30
        d.train(progress=False)
        runs[passes] = d
    for name, p in runs[1].ema.shadow.items():
        torch.testing.assert_close(runs[4].ema.shadow[name], p, rtol=1e-4, atol=1e-5)
    for a, b in zip(runs[1].state.history, runs[4].state.history):
        for term in ("scm", "dmd", "critic"):
            if term in a:
                assert abs(a[term] - b[term]) <= 1e-4 * max(1.0, abs(a[term])), (term, a[term], b[term])
    with pytest.raises(ValueError, match="grad_accumulation = 5"):
        bad = crash_toy_distill.distiller(tmp_path / "bad").cfg
        bad.grad_accumulation = 5
        field = toy.GaussianMixtureField.default_2d()
        trainer.Distiller(field.velocity, toy.ToyVelocityMLP(width=64), lambda m, x, s, c: m(x, s, c),
                          toy.ToyData(field), bad, tmp_path / "bad")


def test_snapshot_cadence_and_retention(tmp_path):
    d = crash_toy_distill.distiller(tmp_path)
    d.cfg.iterations, d.cfg.snapshot_every, d.cfg.keep_snapshots = 40, 14, 2   # checkpoints every 7 iterations
    d.train(progress=False)
    names = sorted(p.name for p in (tmp_path / "ck").glob("ema_*.safetensors"))
    assert names == ["ema_000028.safetensors", "ema_000040.safetensors"]   # multiples of 14 and the final one, newest 2

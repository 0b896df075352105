"""Scale-out of the distillation (DESIGN.md §6, issue 16): FSDP2 over 2 gloo processes computes the update of one
process and writes checkpoints that one process resumes; activation checkpointing changes memory, not the update,
and never runs inside the JVP; the jvp tangent is refused with FSDP; the torchrun process set-up."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anima_lib import config, models
from anima_lib.distill import rcm, start_process, trainer

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_toy_distill  # noqa: E402

SCRIPT = str(Path(__file__).with_name("fsdp_toy_distill.py"))
WEIGHTS, MOMENTS = ("student", "ema", "fake_score"), ("optimizer", "fake_optimizer")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the torchrun processes run: same kernels, closer sums
    yield
    torch.set_num_threads(threads)


def _differences(a: Path, b: Path) -> dict:
    """Per checkpoint file: max |a - b|, that relative to max |b|, and how many elements differ by more than 1e-6."""
    out = {}
    for name in WEIGHTS + MOMENTS:
        x, y = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert x.keys() == y.keys(), name
        diff = torch.cat([(x[k].double() - y[k].double()).abs().flatten() for k in y])
        scale = max(float(y[k].double().abs().max()) for k in y)
        out[name] = {"max": float(diff.max()), "relative": float(diff.max()) / scale,
                     "over_1e-6": int((diff > 1e-6).sum()), "elements": diff.numel()}
    return out


def _assert_same_run(diffs: dict, lr: float, student_updates: int) -> None:
    """Gradients (Adam's moments; beta1 = 0 makes exp_avg the last gradient) agree to float32 summation order. Weights
    agree to 1e-6 except a handful of elements: Adam's first steps move every weight by ~lr * g/|g|, so a gradient at
    rounding level whose sign the other summation order flips moves one weight by up to 2 lr per step."""
    for name in MOMENTS:
        assert diffs[name]["relative"] < 1e-4, (name, diffs[name])
    for name in WEIGHTS:
        assert diffs[name]["over_1e-6"] <= 1e-5 * diffs[name]["elements"], (name, diffs[name])
        assert diffs[name]["max"] <= 2 * lr * student_updates, (name, diffs[name])


def test_two_fsdp_ranks_match_one_process_and_checkpoints_resume_across_world_sizes(tmp_path):
    started = time.perf_counter()
    single = fsdp_toy_distill.distiller(tmp_path / "single", 6, parallel="ddp")
    single.train(progress=False)
    shutil.copytree(tmp_path / "single", tmp_path / "to_fsdp")   # a 1-process checkpoint for 2 FSDP ranks to resume
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [str(tmp_path / "fsdp"), "6", str(tmp_path / "to_fsdp"), "10"]   # a fresh run, then a resumption
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--standalone", SCRIPT, *runs], env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    at_6 = _differences(tmp_path / "fsdp" / "last", tmp_path / "single" / "last")
    print(f"2 FSDP ranks (activation checkpointing on) vs 1 process, 6 iterations: {at_6}")
    _assert_same_run(at_6, single.cfg.lr, single.state.student_updates)

    # the FSDP checkpoint (whole tensors, written by rank 0) resumes in one process, the 1-process one in 2 FSDP ranks
    resumed = fsdp_toy_distill.distiller(tmp_path / "fsdp", 10)
    assert resumed.state.iteration == 6 and not resumed.sharded
    resumed.train(progress=False)
    straight = fsdp_toy_distill.distiller(tmp_path / "single", 10, parallel="ddp")
    straight.train(progress=False)
    for name in ("fsdp", "to_fsdp"):
        at_10 = _differences(tmp_path / name / "last", tmp_path / "single" / "last")
        print(f"{name} resumed at 6 {'in 1 process' if name == 'fsdp' else 'by 2 FSDP ranks'}, 10 iterations: {at_10}")
        _assert_same_run(at_10, straight.cfg.lr, straight.state.student_updates)
    kinds = [h["kind"] for h in resumed.state.history]
    assert kinds == [h["kind"] for h in straight.state.history] and {"critic", "student"} <= set(kinds)
    student = trainer.load_student_weights(fsdp_toy_distill.tiny_transformer(seed=1), tmp_path / "fsdp")
    torch.testing.assert_close(dict(student.named_parameters())["proj_out.weight"],
                               resumed.ema.shadow["proj_out.weight"], rtol=0, atol=0)
    print(f"test duration {time.perf_counter() - started:.1f} s")


def test_activation_checkpointing_recomputes_blocks_but_never_inside_the_jvp(tmp_path):
    d = fsdp_toy_distill.distiller(tmp_path, 1, parallel="ddp", activation_checkpointing=True)
    calls = {"n": 0}
    checkpointed = d.student._gradient_checkpointing_func

    def counting(block, *args):
        calls["n"] += 1
        return checkpointed(block, *args)

    d.student._gradient_checkpointing_func = counting
    batch = fsdp_toy_distill.RandomLatents().batch(0, 2)
    t = torch.tensor([0.3, 1.1], dtype=torch.float64)
    x_t = batch["x0"].double()

    def student_fn(x, s, c):
        return models.transformer_velocity(d.student, x, s, c)

    out = rcm.scm_tangent(student_fn, student_fn, x_t, t, batch["context"])   # the JVP: grad is off, so no checkpoint
    assert calls["n"] == 0
    rcm.scm_loss(student_fn, x_t, t, batch["context"], out["g_hat"]).backward()
    assert calls["n"] == fsdp_toy_distill.LAYERS


def test_activation_checkpointing_leaves_the_update_unchanged(tmp_path):
    plain = fsdp_toy_distill.distiller(tmp_path / "plain", 3, parallel="ddp")
    plain.train(progress=False)
    checkpointed = fsdp_toy_distill.distiller(tmp_path / "ac", 3, parallel="ddp", activation_checkpointing=True)
    checkpointed.train(progress=False)
    for name, p in plain.student.named_parameters():
        torch.testing.assert_close(dict(checkpointed.student.named_parameters())[name], p, rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_needs_transformer_blocks():
    from anima_lib import toy
    cfg = trainer.DistillConfig(method="scm", activation_checkpointing=True)
    with pytest.raises(ValueError, match="no transformer blocks"):
        trainer.Distiller(lambda x, s, c: x, toy.ToyVelocityMLP(), lambda m, x, s, c: m(x, s, c), None, cfg,
                          Path("/nonexistent/ck"))


def test_fsdp_with_the_jvp_tangent_is_refused_naming_the_fix():
    with pytest.raises(config.ConfigError, match="set distill.tangent: fd"):
        config.load_config("nano", {"distill.parallel": "fsdp"}, check_paths=False)
    params = config.load_config("nano", {"distill.parallel": "fsdp", "distill.tangent": "fd"}, check_paths=False)
    assert params.distill.fd_delta == 0.02
    with pytest.raises(ValueError, match="set distill.tangent: fd"):
        trainer.DistillConfig(method="rcm", parallel="fsdp")
    trainer.DistillConfig(method="lcm", parallel="fsdp")   # LCM takes no JVP
    with pytest.raises(config.ConfigError, match=r"distill\.fd_delta = 0\.5: must be between"):
        config.load_config("nano", {"distill.tangent": "fd", "distill.fd_delta": 0.5}, check_paths=False)


def test_tangent_settings_are_part_of_the_resume_key_and_parallel_is_not(tmp_path):
    d = fsdp_toy_distill.distiller(tmp_path, 1, parallel="ddp")
    d.train(progress=False)
    changed = fsdp_toy_distill.distiller(tmp_path, 2, parallel="fsdp")   # how it is spread: resumable
    assert changed.state.iteration == 1
    import copy
    for key, value, param in (("tangent", "jvp", "distill.tangent"), ("fd_delta", 0.01, "distill.fd_delta")):
        cfg = copy.deepcopy(d.cfg)
        setattr(cfg.rcm, key, value)
        with pytest.raises(ValueError, match=param + ": checkpoint"):
            trainer.Distiller(d.teacher_fn, fsdp_toy_distill.tiny_transformer(), models.transformer_velocity,
                              fsdp_toy_distill.RandomLatents(), cfg, tmp_path)


def test_start_process_alone_is_rank_0_of_1_on_the_cpu(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    process = start_process("cpu")
    assert (process.rank, process.world_size, process.local_rank, process.device.type) == (0, 1, 0, "cpu")


def test_start_process_on_cuda_selects_the_local_gpu_before_starting_nccl(monkeypatch):
    import torch.distributed as dist
    calls = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    process = start_process("cuda")
    assert calls == [("set_device", 1), ("init", "nccl")]
    assert (process.rank, process.world_size, process.local_rank, str(process.device)) == (3, 4, 1, "cuda:1")

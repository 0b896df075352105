"""rCM correctness: the JVP through the real transformer, the sCM identity, a 2-D toy distilled end to end, exact
resume, divergence handling, and the cache reader's refusals."""
import copy
import math
import os
from pathlib import Path

import pytest
import torch

from anima_lib import config, distill, flow, models, sampler, toy
from anima_lib.distill import rcm, trainer
from anima_lib.nano_world.prompts import vocabulary


def _call(module, x, s, context):
    return module(x, s, context)


@pytest.fixture(scope="module")
def field():
    return toy.GaussianMixtureField.default_2d()


@pytest.fixture(scope="module")
def toy_teacher_copy(field):
    return toy.fit_to_field(toy.ToyVelocityMLP(seed=0), field, steps=800, seed=0)


def _toy_config(**kw):
    cfg = trainer.DistillConfig(batch_size=256, lr=1e-3, fake_lr=2e-4, warmup_steps=20, ema_decay=0.99, **kw)
    cfg.rcm.guidance_scale = 1.0  # an unconditional toy: no CFG
    return cfg


def test_jvp_matches_finite_differences_through_the_transformer():
    torch.manual_seed(0)
    transformer = models.build_nano(vocabulary(), seed=3).transformer.double()
    velocity = lambda x, s, c: models.transformer_velocity(transformer, x, s, c)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 48, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 1.1], dtype=torch.float64)
    context = torch.randn(2, 16, 64, generator=g, dtype=torch.float64)
    tangent_x = torch.randn(x_t.shape, generator=g, dtype=torch.float64)
    tangent_t = torch.tensor([0.7, -0.4], dtype=torch.float64)

    def F(x, time):
        return rcm.trig_F(velocity, x, time, context, torch.float64)

    with torch.no_grad(), rcm.math_attention():
        _, jvp = torch.func.jvp(F, (x_t, t), (tangent_x, tangent_t))
        h = 1e-3  # diffusers runs the time embedding and norms in float32: smaller h is rounding-limited
        fd = (F(x_t + h * tangent_x, t + h * tangent_t) - F(x_t - h * tangent_x, t - h * tangent_t)) / (2 * h)
    rel = float((jvp - fd).norm() / fd.norm())
    print(f"JVP vs central differences through CosmosTransformer3DModel: relative L2 {rel:.2e}")
    assert rel < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_tangent_matches_the_jvp_tangent_through_the_transformer(dtype):
    # the JVP-free tangent (distill.tangent: fd, the one FSDP can take) against forward-mode AD, at the default delta
    transformer = models.build_nano(vocabulary(), seed=3).transformer.to(dtype)
    velocity = lambda x, s, c: models.transformer_velocity(transformer, x, s, c)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 48, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.4, 1.1, 1.5], dtype=torch.float64)
    context = torch.randn(4, 16, 64, generator=g, dtype=torch.float64)
    delta = rcm.RCMConfig().fd_delta

    def tangent(kind, fd_delta=delta):
        return rcm.scm_tangent(velocity, velocity, x_t, t, context, net_dtype=dtype, tangent=kind, fd_delta=fd_delta)

    def relative(a, b):
        return float((a - b).norm() / b.norm())

    jvp, fd = tangent("jvp"), tangent("fd")
    rel_J, rel_g = relative(fd["J"], jvp["J"]), relative(fd["g_hat"], jvp["g_hat"])
    rel_small = relative(tangent("fd", delta / 20)["J"], jvp["J"])  # O(delta^2) until float32 rounding (1/delta)
    print(f"{dtype}: fd vs jvp tangent through CosmosTransformer3DModel, relative L2 of J: {rel_J:.1e} at delta "
          f"{delta} (g_hat {rel_g:.1e}), {rel_small:.1e} at delta {delta / 20}")
    assert rel_J < 1e-3 and rel_g < 3e-3
    assert rel_small < (5e-4 if dtype == torch.float32 else 1e-5)   # float32: rounding-limited at 1e-3
    torch.testing.assert_close(fd["F_minus"], jvp["F_minus"], rtol=1e-5, atol=1e-5)  # JVP primal: math attention


def test_scm_tangent_is_cos_t_times_total_derivative_of_the_consistency_function(field):
    # g (r = 1, before normalisation) = cos t * d/dt f_student(x_t(t), t) along the teacher ODE dx/dt = F_T;
    # the student is another analytic field so everything is float64
    other = toy.GaussianMixtureField(field.means + 0.3, field.stds * 1.5, field.weights.flip(0))
    student = other.velocity
    teacher = field.velocity
    g_ = torch.Generator().manual_seed(1)
    x_t = torch.randn(64, 2, generator=g_, dtype=torch.float64)
    t = torch.rand(64, generator=g_, dtype=torch.float64) * 1.3 + 0.1
    out = rcm.scm_tangent(student, teacher, x_t, t, None, warmup_ratio=1.0, norm_c=0.0, net_dtype=torch.float64)
    g = out["g_hat"] * out["g_norm"][:, None]
    teacher_F = rcm.trig_F(teacher, x_t, t, None, torch.float64)

    def f(x, time):
        return rcm.trig_x0(student, x, time, None, torch.float64)

    h = 1e-5
    with torch.no_grad():
        total_derivative = (f(x_t + h * teacher_F, t + h) - f(x_t - h * teacher_F, t - h)) / (2 * h)
    expected = torch.cos(t)[:, None] * total_derivative
    assert float((g - expected).norm() / expected.norm()) < 1e-6


def test_trig_wrapper_reproduces_rf_x0_and_is_stable_near_zero(field):
    g_ = torch.Generator().manual_seed(2)
    x0, eps = field.sample(16, g_), torch.randn(16, 2, generator=g_, dtype=torch.float64)
    t = torch.tensor([1e-4, 0.05, 0.5, 1.0, 1.4, 1.5707] * 2 + [0.3] * 4, dtype=torch.float64)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * eps
    s = flow.trig_to_rf_time(t)
    x_s = flow.trig_to_rf_state(x_t, t)
    rf_x0 = flow.velocity_to_x0(x_s, field.velocity(x_s, s), s)
    trig = rcm.trig_x0(field.velocity, x_t, t, None, torch.float64)
    assert torch.allclose(trig, rf_x0, atol=1e-10)
    assert torch.isfinite(rcm.trig_F(field.velocity, x_t, t, None, torch.float64)).all()


def _distill_toy_and_compare_to_euler(cfg, field, toy_teacher_copy, folder, label):
    """Energy distances to the mixture of teacher Euler@1 and the trained student@1 (same noise), and the run."""
    distiller = trainer.Distiller(field.velocity, copy.deepcopy(toy_teacher_copy), _call, toy.ToyData(field), cfg,
                                  folder)
    distiller.train(progress=False)
    student = trainer.load_student_weights(copy.deepcopy(toy_teacher_copy), folder)
    g_ = torch.Generator().manual_seed(123)
    reference = field.sample(2000, g_).float()
    noise = torch.randn(2000, 2, generator=g_)
    euler_1 = sampler.euler_sample(field.velocity, noise, flow.teacher_sigmas(1, 3.0))
    student_1 = sampler.consistency_sample(student, [noise], flow.student_trig_times(1, 80.0, []))
    ed_euler, ed_student = toy.energy_distance(euler_1, reference), toy.energy_distance(student_1, reference)
    print(f"energy distance to the mixture: teacher Euler@1 {ed_euler:.4f}, {label} student@1 {ed_student:.4f}")
    return ed_euler, ed_student, distiller


def test_toy_rcm_student_beats_one_step_euler_on_the_teacher(field, toy_teacher_copy, tmp_path):
    cfg = _toy_config(method="rcm", iterations=600, checkpoint_every=600)
    ed_euler, ed_student, distiller = _distill_toy_and_compare_to_euler(cfg, field, toy_teacher_copy,
                                                                        tmp_path / "ck", "rCM")
    assert ed_student < 0.2 * ed_euler
    history = distiller.state.history
    assert {"student", "critic"} == {h["kind"] for h in history}
    assert sum(h["kind"] == "critic" for h in history) == 4 * sum(h["kind"] == "student" for h in history)
    assert {h["rollout_steps"] for h in history if "dmd" in h} == {1, 2, 3, 4}


def test_toy_rcm_with_the_fd_tangent_beats_one_step_euler(field, toy_teacher_copy, tmp_path):
    cfg = _toy_config(method="rcm", iterations=300, checkpoint_every=300, rcm=rcm.RCMConfig(tangent="fd"))
    cfg.rcm.guidance_scale = 1.0
    ed_euler, ed_student, _ = _distill_toy_and_compare_to_euler(cfg, field, toy_teacher_copy, tmp_path / "ck",
                                                                "rCM (fd)")
    assert ed_student < 0.3 * ed_euler


@pytest.mark.parametrize("method", ["rcm", "lcm"])
def test_resume_continues_exactly(field, toy_teacher_copy, tmp_path, method):
    def run(folder, stop_after=None):
        cfg = _toy_config(method=method, iterations=200, checkpoint_every=50)
        d = trainer.Distiller(field.velocity, copy.deepcopy(toy_teacher_copy), _call, toy.ToyData(field), cfg, folder)
        d.train(progress=False, stop_after=stop_after)
        return d

    straight = run(tmp_path / "straight")
    killed = run(tmp_path / "killed", stop_after=117)   # dies mid-way: iterations 101..117 are lost
    assert killed.state.iteration == 117
    resumed = run(tmp_path / "killed")                   # picks up at the checkpoint of iteration 100
    assert resumed.state.iteration == 200
    for name, p in straight.student.named_parameters():
        torch.testing.assert_close(dict(resumed.student.named_parameters())[name], p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(resumed.ema.shadow[name], straight.ema.shadow[name], rtol=1e-5, atol=1e-6)
    assert [h["kind"] for h in resumed.state.history] == [h["kind"] for h in straight.state.history]
    assert len(list((tmp_path / "straight").glob("ema_*.safetensors"))) == 4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(field, toy_teacher_copy, tmp_path):
    calls = {"n": 0}

    def flaky_teacher(x, s, c):
        calls["n"] += 1
        v = field.velocity(x, s)
        return v * float("nan") if calls["n"] > 35 else v

    cfg = _toy_config(method="scm", iterations=100, checkpoint_every=10)
    d = trainer.Distiller(flaky_teacher, copy.deepcopy(toy_teacher_copy), _call, toy.ToyData(field), cfg, tmp_path)
    with pytest.raises(trainer.DivergenceError, match=r"scm loss is nan .* last good checkpoint .*iteration 30"):
        d.train(progress=False)
    assert (tmp_path / "last" / "state.json").is_file()


def test_config_rejects_unknown_method():
    with pytest.raises(ValueError, match="method 'dmd2'"):
        trainer.DistillConfig(method="dmd2")


def test_two_gloo_ranks_compute_the_same_update_as_one_process(tmp_path):
    import subprocess
    import sys
    from safetensors.torch import load_file
    script = str(Path(__file__).with_name("ddp_toy_distill.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    script, str(tmp_path / "ddp")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, script, str(tmp_path / "single")], check=True, env=env, timeout=300)
    rank0, rank1 = (load_file(tmp_path / "ddp" / f"student_rank{r}.safetensors") for r in (0, 1))
    single = load_file(tmp_path / "single" / "student_rank0.safetensors")
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"{name}: ranks drifted apart"
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ddp" / "ck" / "last" / "state.json").is_file()


def test_rollout_times_follow_the_served_schedule_or_p_d():
    served = config.load_config("nano", ["distill.rollout_times=sampler", "sampler.student_mid_times=[1.1,0.7,0.3]",
                                         "distill.rollout_mid_times=null"])
    pinned = config.load_config("nano", ["distill.rollout_times=sampler", "sampler.student_mid_times=[1.1,0.7,0.3]",
                                         "distill.rollout_mid_times=[1.3,1.0,0.6]"])   # trained at others than served
    drawn = config.load_config("nano", ["distill.rollout_times=random"])
    cfg = distill.distill_config(served, "rcm").rcm
    assert cfg.rollout_mid_times == (1.1, 0.7, 0.3) and distill.distill_config(drawn, "rcm").rcm.rollout_mid_times == ()
    assert distill.distill_config(pinned, "rcm").rcm.rollout_mid_times == (1.3, 1.0, 0.6)
    times = rcm.rollout_times(4, torch.Generator().manual_seed(0), cfg, batch=3)
    assert [round(float(t[0]), 6) for t in times] == [round(math.atan(80.0), 6), 1.1, 0.7, 0.3]
    random_times = rcm.rollout_times(4, torch.Generator().manual_seed(0), distill.distill_config(drawn, "rcm").rcm, 3)
    assert all((later <= earlier).all() for earlier, later in zip(random_times, random_times[1:]))
    assert len({round(float(t), 6) for t in random_times[1]}) > 1   # a draw per sample

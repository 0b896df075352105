import math

import pytest
import torch

from anima_lib import flow, sampler
from anima_lib.toy import GaussianMixtureField


def test_teacher_sigmas_match_anima_schedule():
    # Anima's documented 8-step schedule after shift 3 (diffusers FlowMatchEulerDiscreteScheduler).
    expected = [1.0, 0.955, 0.90, 0.833, 0.75, 0.643, 0.5, 0.3, 0.0]
    got = flow.teacher_sigmas(8, shift=3.0).tolist()
    assert got == pytest.approx(expected, abs=1e-3)
    assert len(flow.teacher_sigmas(20)) == 21


def test_teacher_sigmas_match_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    import numpy as np
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20))
    assert torch.allclose(scheduler.sigmas.double(), flow.teacher_sigmas(20, 3.0), atol=1e-6)


def test_rf_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    s = torch.rand(4, generator=g, dtype=torch.float64)
    x_s, v = flow.rf_noisy(x0, eps, s), flow.rf_velocity(x0, eps)
    assert torch.allclose(flow.velocity_to_x0(x_s, v, s), x0, atol=1e-12)
    assert torch.allclose(flow.velocity_to_eps(x_s, v, s), eps, atol=1e-12)


def test_trigflow_maps_round_trip_and_match_definitions():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(6, generator=g, dtype=torch.float64) * (math.pi / 2 - 0.02) + 0.01
    s = flow.trig_to_rf_time(t)
    assert torch.allclose(flow.rf_to_trig_time(s), t, atol=1e-12)
    assert flow.rf_to_trig_time(1.0) == pytest.approx(math.pi / 2)
    assert flow.trig_to_rf_time(1.0) == pytest.approx(0.609, abs=1e-3)   # rCM table: t=1.0 -> s=0.609
    x0, eps = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * eps
    x_s = flow.trig_to_rf_state(x_t, t)
    assert torch.allclose(x_s, flow.rf_noisy(x0, eps, s), atol=1e-12)
    assert torch.allclose(flow.rf_to_trig_state(x_s, t), x_t, atol=1e-12)
    # F = cos t * eps - sin t * x0, from the RF velocity via the closed form
    F = flow.trig_velocity(x_t, flow.rf_velocity(x0, eps), t)
    assert torch.allclose(F, torch.cos(t)[:, None] * eps - torch.sin(t)[:, None] * x0, atol=1e-12)


def test_cfg_convention():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert flow.cfg_velocity(u, c, 4.0).item() == 9.0      # v_u + w (v_c - v_u)
    assert flow.cfg_velocity(u, c, 1.0).item() == 3.0


def test_gmm_velocity_is_exact_posterior_mean():
    field = GaussianMixtureField.default_2d()
    g = torch.Generator().manual_seed(2)
    n = 200_000
    x0, eps = field.sample(n, g), torch.randn(n, 2, generator=g, dtype=torch.float64)
    s = torch.full((n,), 0.5, dtype=torch.float64)
    v = field.velocity(flow.rf_noisy(x0, eps, s), s)
    # Regression on the truth: the residual of the exact conditional mean is orthogonal to it on average.
    target = eps - x0
    assert (target - v).mean(0).abs().max() < 0.02
    assert ((target - v) ** 2).mean() < ((target - target.mean(0)) ** 2).mean()


def test_euler_with_many_steps_reproduces_the_mixture():
    field = GaussianMixtureField.default_2d()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    samples = sampler.euler_sample(field.velocity, noise, flow.teacher_sigmas(200, shift=3.0))
    mean, cov = field.mean_and_covariance()
    assert torch.allclose(samples.mean(0), mean, atol=0.05)
    assert torch.allclose(torch.cov(samples.T), cov, atol=0.08)
    # and the mode weights: nearest-mean assignment
    nearest = torch.cdist(samples, field.means).argmin(1)
    weights = torch.bincount(nearest, minlength=3).double() / len(samples)
    assert torch.allclose(weights, field.weights, atol=0.02)


def test_euler_with_one_step_does_not_reproduce_the_mixture():
    # The same harness must be able to fail: one Euler step collapses to the mean.
    field = GaussianMixtureField.default_2d()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    samples = sampler.euler_sample(field.velocity, noise, flow.teacher_sigmas(1))
    _, cov = field.mean_and_covariance()
    assert not torch.allclose(torch.cov(samples.T), cov, atol=0.08)


def test_euler_trajectory_and_cfg():
    calls = []

    def velocity_fn(x, sigma, context):
        calls.append(x.shape[0])
        return context.expand_as(x) * 1.0

    noise = torch.zeros(3, 2)
    cond, neg = torch.ones(1, 2).expand(3, 2), torch.zeros(1, 2)
    traj = sampler.euler_sample(velocity_fn, noise, flow.teacher_sigmas(4), cond, neg, guidance_scale=4.0,
                                keep_trajectory=True)
    assert traj.states.shape == (5, 3, 2) and traj.velocities.shape == (4, 3, 2)
    assert calls == [6, 6, 6, 6]                     # both CFG branches in one call per step
    assert torch.allclose(traj.velocities, torch.full_like(traj.velocities, 4.0))
    assert torch.allclose(traj.x0, torch.full((3, 2), -4.0))   # integral of v over sigma 1 -> 0


def test_consistency_sampler_uses_injected_noise_and_times():
    field = GaussianMixtureField.default_2d()
    g = torch.Generator().manual_seed(4)
    noises = [torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(4)]
    times = flow.student_trig_times(4, sigma_max=80.0, mid_times=[1.3, 1.0, 0.6])
    assert times[0] == pytest.approx(math.atan(80.0)) and times[-1] == 0.0 and len(times) == 5
    a = sampler.consistency_sample(field.velocity, noises, times)
    b = sampler.consistency_sample(field.velocity, noises, times)
    assert torch.equal(a, b)                              # no hidden RNG
    noises2 = noises[:3] + [noises[3] + 1]
    assert not torch.equal(a, sampler.consistency_sample(field.velocity, noises2, times))
    with pytest.raises(ValueError, match="noise tensors"):
        sampler.consistency_sample(field.velocity, noises[:2], times)


def test_one_step_consistency_sample_is_the_x0_estimate():
    field = GaussianMixtureField.default_2d()
    noise = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    times = flow.student_trig_times(1, 80.0, [1.3, 1.0, 0.6])
    s0 = flow.trig_to_rf_time(times[0])
    x = s0 * noise
    expected = flow.velocity_to_x0(x, field.velocity(x, torch.full((5,), s0, dtype=torch.float64)), s0)
    assert torch.allclose(sampler.consistency_sample(field.velocity, [noise], times), expected)

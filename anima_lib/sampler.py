"""Samplers. All noise comes from the caller (no RNG in here), so another runtime can replay a run exactly.

A `velocity_fn(x, sigma, context) -> v` is any RF velocity predictor: the DiT (networks.velocity_fn(transformer)),
an analytic field in tests, a LoRA-carrying student. `x` is [B, ...], `sigma` is a [B] tensor of RF times.
`student_sample` is the run's few-step student sampler put together once (schedule from params.sampler, the DiT's
velocity, rows in chunks on the student's device): the gate, De-Turbo and the parity fixtures sample through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import flow
from .networks import device_of, velocity_fn as dit_velocity_fn

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class Trajectory:
    sigmas: torch.Tensor       # [N+1] float64, from 1 to 0
    states: torch.Tensor       # [N+1, B, ...] x at every sigma (states[0] is the noise, states[-1] the sample)
    velocities: torch.Tensor   # [N, B, ...] the guided velocity used at each step

    @property
    def x0(self) -> torch.Tensor:
        return self.states[-1]


def guided_velocity(velocity_fn: VelocityFn, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                    negative_context: Optional[torch.Tensor], guidance_scale: float) -> torch.Tensor:
    """CFG on velocities with both branches in one batched call; no CFG when guidance is 1 or there is no negative."""
    if negative_context is None or guidance_scale == 1.0:
        return velocity_fn(x, sigma, context)
    negative_context = negative_context.expand(x.shape[0], *negative_context.shape[1:])
    both = velocity_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([negative_context, context]))
    uncond, cond = both.chunk(2)
    return flow.cfg_velocity(uncond, cond, guidance_scale)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor = None,
                 negative_context: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
                 keep_trajectory: bool = False, progress: bool = False):
    """Teacher sampler: Euler over `sigmas` (flow.teacher_sigmas) from x = noise at sigma 1.

    Returns the final sample, or a Trajectory when keep_trajectory (what the cache stores).
    """
    if float(sigmas[0]) != 1.0 or float(sigmas[-1]) != 0.0:
        raise ValueError("sigmas must run from 1 to 0 (use flow.teacher_sigmas)")
    x = noise
    states, velocities = [x], []
    steps = range(len(sigmas) - 1)
    if progress:
        steps = tqdm(steps, desc=f"euler {len(sigmas) - 1} steps", leave=False)
    for i in steps:
        sigma = torch.full((x.shape[0],), float(sigmas[i]), dtype=x.dtype, device=x.device)
        v = guided_velocity(velocity_fn, x, sigma, context, negative_context, guidance_scale)
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
        if keep_trajectory:
            states.append(x)
            velocities.append(v)
    if not keep_trajectory:
        return x
    return Trajectory(sigmas=sigmas, states=torch.stack(states), velocities=torch.stack(velocities))


@torch.no_grad()
def consistency_sample(velocity_fn: VelocityFn, noises: Sequence[torch.Tensor], trig_times: Sequence[float],
                       context: torch.Tensor = None, trace: Optional[list] = None) -> torch.Tensor:
    """Few-step student sampler (rCM): one network call per step, no CFG, fresh noise between steps.

    trig_times = flow.student_trig_times(k, ...) has k+1 entries ending in 0; noises has k tensors: noises[0] starts
    the chain (x = s0 * eps, the RF state at s0 with the (1-s0)*x0 term dropped, as rCM's samplers do) and noises[i]
    re-noises the i-th x0 estimate to time trig_times[i]. With `trace` (a list), every step appends
    {"x": network input, "sigma", "velocity", "x0": the step's x0 estimate} (what parity fixtures record).
    """
    num_steps = len(trig_times) - 1
    if num_steps < 1 or trig_times[-1] != 0.0:
        raise ValueError("trig_times must hold at least two times and end at 0")
    if len(noises) != num_steps:
        raise ValueError(f"{num_steps} steps need {num_steps} noise tensors (got {len(noises)})")
    rf_times = [flow.trig_to_rf_time(t) for t in trig_times]
    x = rf_times[0] * noises[0]
    for k in range(num_steps):
        sigma = torch.full((x.shape[0],), rf_times[k], dtype=x.dtype, device=x.device)
        velocity = velocity_fn(x, sigma, context)
        x0_estimate = flow.velocity_to_x0(x, velocity, rf_times[k])
        if trace is not None:
            trace.append({"x": x, "sigma": sigma, "velocity": velocity, "x0": x0_estimate})
        if k + 1 == num_steps:
            return x0_estimate
        x = flow.rf_noisy(x0_estimate, noises[k + 1], rf_times[k + 1])
    raise AssertionError("unreachable")


def student_times(params, num_steps: int) -> list[float]:
    """The run's few-step schedule in TrigFlow time: flow.student_trig_times at params.sampler's sigma_max and
    student_mid_times (num_steps + 1 entries ending in 0)."""
    return flow.student_trig_times(num_steps, params.sampler.sigma_max, params.sampler.student_mid_times)


@torch.no_grad()
def student_sample(student: torch.nn.Module, noises: Sequence[torch.Tensor], context: torch.Tensor, params,
                   batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                   trace: Optional[list] = None) -> torch.Tensor:
    """Latents from a few-step student DiT: len(noises) steps of consistency_sample at student_times(params, k).

    Rows go `batch_size` at a time (None: all at once), moved to the student's device and, when given, to `dtype`
    (the dtype the chain runs in; None keeps the noises'). `trace` as in consistency_sample (with one batch).
    """
    trig_times = student_times(params, len(noises))
    velocity, device = dit_velocity_fn(student), device_of(student)
    rows = len(context)
    if rows == 0 or any(len(n) != rows for n in noises):
        raise ValueError(f"noises have {[len(n) for n in noises]} rows, the context {rows}")
    batch_size = batch_size or rows
    if trace is not None and batch_size < rows:
        raise ValueError(f"a trace records one batch: batch_size {batch_size} < {rows} rows")
    latents = []
    for start in range(0, rows, batch_size):
        sl = slice(start, start + batch_size)
        latents.append(consistency_sample(velocity, [n[sl].to(device, dtype) for n in noises], trig_times,
                                          context[sl].to(device, dtype), trace=trace))
    return torch.cat(latents)

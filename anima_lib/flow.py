"""Flow conventions, all in one place (Anima / Cosmos-Predict2 as diffusers 0.42.1 runs them).

Rectified flow (RF), the teacher's space:
    x_s = (1 - s) * x0 + s * eps,  s in [0, 1] is the RF sigma and exactly the DiT `timestep`
    v   = eps - x0                 the DiT output (velocity)
    x0  = x_s - s * v,  eps = x_s + (1 - s) * v
Teacher schedule: s_i = linspace(1, 1/N, N) shifted by shift*s/(1+(shift-1)*s) (shift 3), then 0.
Euler: x <- x + (s_next - s) * v.
CFG on velocities, Anima's convention: v = v_u + w * (v_c - v_u) (w = 4; w = 1 is plain conditional).

TrigFlow (rCM's space, sigma_d = 1): x_t = cos t * x0 + sin t * eps, t in [0, pi/2], matched by SNR:
    s = sin t / (sin t + cos t),  t = arctan(s / (1 - s)),  x_s = x_t / (cos t + sin t)
    F = dx_t/dt = cos t * eps - sin t * x0 = ((cos t - sin t) * x_t + v) / (cos t + sin t)
EDM sigma = tan t (the student's first step uses t0 = arctan(sigma_max)).
"""
from __future__ import annotations

import math

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def teacher_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """num_steps + 1 RF sigmas from 1 down to 0, float64, as Anima's FlowMatchEulerDiscreteScheduler makes them."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    return torch.cat([shift_sigmas(base, shift), torch.zeros(1, dtype=torch.float64)])


def broadcast_time(s, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample [B] time as a tensor in `like`'s dtype and device, shaped to broadcast against it."""
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device)
    return s.reshape(-1, *([1] * (like.ndim - 1))) if s.ndim == 1 else s


def rf_noisy(x0: torch.Tensor, eps: torch.Tensor, s) -> torch.Tensor:
    s = broadcast_time(s, x0)
    return (1 - s) * x0 + s * eps


def rf_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def velocity_to_x0(x_s: torch.Tensor, velocity: torch.Tensor, s) -> torch.Tensor:
    return x_s - broadcast_time(s, x_s) * velocity


def velocity_to_eps(x_s: torch.Tensor, velocity: torch.Tensor, s) -> torch.Tensor:
    return x_s + (1 - broadcast_time(s, x_s)) * velocity


def cfg_velocity(uncond_velocity: torch.Tensor, cond_velocity: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    return uncond_velocity + guidance_scale * (cond_velocity - uncond_velocity)


# --- TrigFlow time maps --------------------------------------------------------------------------------------------

def trig_to_rf_time(trig_time):
    """s = sin t / (sin t + cos t); works on floats and tensors."""
    if isinstance(trig_time, torch.Tensor):
        return torch.sin(trig_time) / (torch.sin(trig_time) + torch.cos(trig_time))
    return math.sin(trig_time) / (math.sin(trig_time) + math.cos(trig_time))


def rf_to_trig_time(s):
    """t = arctan(s / (1 - s)), written with atan2 so s = 1 maps to pi/2 exactly."""
    if isinstance(s, torch.Tensor):
        return torch.atan2(s, 1 - s)
    return math.atan2(s, 1 - s)


def trig_to_rf_state(x_t: torch.Tensor, trig_time) -> torch.Tensor:
    t = broadcast_time(trig_time, x_t)
    return x_t / (torch.cos(t) + torch.sin(t))


def rf_to_trig_state(x_s: torch.Tensor, trig_time) -> torch.Tensor:
    t = broadcast_time(trig_time, x_s)
    return x_s * (torch.cos(t) + torch.sin(t))


def trig_velocity(x_t: torch.Tensor, rf_velocity_: torch.Tensor, trig_time) -> torch.Tensor:
    """TrigFlow velocity F from the RF velocity at the matched time; the closed form has no 1/sin t blow-up."""
    t = broadcast_time(trig_time, x_t)
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    return ((cos_t - sin_t) * x_t + rf_velocity_) / (cos_t + sin_t)


def student_trig_times(num_steps: int, sigma_max: float, mid_times: list[float]) -> list[float]:
    """rCM's few-step schedule: [arctan sigma_max, mid_times[:num_steps-1]..., 0] in TrigFlow time."""
    if num_steps < 1 or num_steps - 1 > len(mid_times):
        raise ValueError(f"num_steps={num_steps} needs {num_steps - 1} mid times (have {len(mid_times)})")
    return [math.atan(sigma_max), *mid_times[: num_steps - 1], 0.0]

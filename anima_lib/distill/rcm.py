"""rCM: sCM (continuous-time consistency along the CFG-guided teacher ODE, via a JVP) + DMD score regularization.

Spec: shared/research/rcm-deturbo.md §1-5 (NVlabs/rcm, arXiv 2510.08431). Everything here is in TrigFlow time
t in [0, pi/2] with sigma_d = 1 (flow.py has the maps); every network is an RF velocity predictor
`velocity_fn(x_rf, s, context)` and is wrapped so that

    F(x_t, t) = ((cos t - sin t) x_t + v(x_t / (cos t + sin t), s(t), c)) / (cos t + sin t)    (fp64 arithmetic)
    f(x_t, t) = cos t x_t - sin t F(x_t, t)                                                      (the x0 estimate)

sCM target direction (r = tangent warm-up ratio, J = cos t sin t dF_student/dt along the teacher ODE, taken by a JVP
(`tangent="jvp"`) or a central finite difference (`tangent="fd"`, the JVP-free form that composes with FSDP2):
    g = -cos t sqrt(1 - r^2 sin^2 t) (F^- - F_T^w) - (r cos t sin t x_t + J),  g <- g / (||g|| + c)
    L_sCM = sum (F - sg F - g)^2
DMD (student rollout x0_hat, re-noised to t_D ~ p_D):
    delta = (f_fake - f_T^w) / mean|x0_hat - f_T^w|,   L_DMD = sum (x0_hat - sg(x0_hat - delta))^2
Student loss = scm_weight * L_sCM + dmd_weight * L_DMD (100 and 1: the paper's lambda = 0.01, sum reductions); the
"dmd" method (07's LoRA transfer) drops L_sCM and may add regression_weight * sum (f_1step(eps) - x0_T(eps))^2 on cached
teacher samples.
Critic (fake score) loss = sum ||F_fake(x_t, t) - (cos t eps - sin t x0_hat)||^2 on student rollouts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..sampler import guided_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class RCMConfig:
    guidance_scale: float = 4.0      # teacher CFG for tangents and the DMD target (Anima's v_u + w (v_c - v_u))
    p_g_mean: float = -0.8           # sCM times: log(tan t) ~ N(mean, std^2), the low-noise emphasis of Cosmos T2I
    p_g_std: float = 1.6
    p_d_mean: float = 0.0            # DMD / critic times
    p_d_std: float = 1.6
    tangent_warmup: int = 0          # H (student steps); 0 as rCM does for Cosmos
    tangent_norm: float = 0.1        # c in g / (||g|| + c)
    scm_weight: float = 100.0
    dmd_weight: float = 1.0          # 0 = the sCM-only ablation (no critic, every iteration a student step)
    max_rollout: int = 4
    sigma_max: float = 80.0          # rollouts start at t0 = arctan(sigma_max), as the student sampler does
    t_min: float = 1e-4              # clamp: keeps 1/sin t out of every path
    tangent: str = "jvp"             # jvp (forward-mode AD, one device or DDP) | fd (finite difference, FSDP-safe)
    fd_delta: float = 0.02           # fd: TrigFlow time step of the central difference (see fd_time_derivative)
    rollout_mid_times: tuple = ()    # rollouts at the student sampler's times [arctan sigma_max, these...] (the LoRA
                                     # transfer); empty: rCM's random times, t_n = min(t_hat_n, t_{n-1}), t_hat ~ p_D
    regression_weight: float = 0.0   # > 0: the student's 1-step output from batch["regression_noise"] is regressed
                                     # (sum of squares) onto batch["x0"], the teacher's sample from that noise


# --- times -------------------------------------------------------------------------------------------------------------

def sample_trig_times(n: int, mean: float, std: float, generator: torch.Generator, t_min: float,
                      t_max: float = math.pi / 2) -> torch.Tensor:
    """t = arctan(sigma), log sigma ~ N(mean, std^2), clamped to [t_min, t_max]; float64."""
    log_sigma = mean + std * torch.randn(n, generator=generator, dtype=torch.float64)
    return torch.atan(torch.exp(log_sigma)).clamp(t_min, t_max)


def as_column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] time as [B, 1, ..., 1] against `like`, in t's own dtype (flow.broadcast_time casts to like's)."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


# --- the TrigFlow wrapper --------------------------------------------------------------------------------------------

def trig_F(velocity_fn: VelocityFn, x_t: torch.Tensor, t: torch.Tensor, context, net_dtype=torch.float32) -> torch.Tensor:
    """TrigFlow velocity F(x_t, t) from an RF velocity network; wrapper arithmetic in float64, network in net_dtype."""
    x_t, t = x_t.double(), t.double()
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    rf_time = sin_t / (sin_t + cos_t)
    x_rf = x_t / as_column(cos_t + sin_t, x_t)
    v = velocity_fn(x_rf.to(net_dtype), rf_time.to(net_dtype), context).double()
    return ((as_column(cos_t - sin_t, x_t)) * x_t + v) / as_column(cos_t + sin_t, x_t)


def trig_x0(velocity_fn: VelocityFn, x_t: torch.Tensor, t: torch.Tensor, context, net_dtype=torch.float32):
    """The consistency function f(x_t, t) = cos t x_t - sin t F (the x0 estimate)."""
    F = trig_F(velocity_fn, x_t, t, context, net_dtype)
    return as_column(torch.cos(t.double()), x_t) * x_t.double() - as_column(torch.sin(t.double()), x_t) * F


def guided(velocity_fn: VelocityFn, negative_context, guidance_scale: float) -> VelocityFn:
    """A velocity function with CFG on velocities baked in (both branches in one batched call)."""

    def fn(x, s, context):
        return guided_velocity(velocity_fn, x, s, context, negative_context, guidance_scale)
    return fn


def math_attention():
    """Forward-mode AD needs the math SDPA kernel (the CPU flash and the CUDA flash/efficient kernels lack it)."""
    return sdpa_kernel([SDPBackend.MATH])


# --- sCM ---------------------------------------------------------------------------------------------------------------

TANGENTS = ("jvp", "fd")


def jvp_time_derivative(student_F, x_t: torch.Tensor, t: torch.Tensor, teacher_F: torch.Tensor):
    """(F^-, J): J = jvp of F_student along the tangent (cos t sin t F_T, cos t sin t), by forward-mode AD."""
    cos_t, sin_t = as_column(torch.cos(t), x_t), as_column(torch.sin(t), x_t)
    with math_attention():
        return torch.func.jvp(student_F, (x_t, t), (cos_t * sin_t * teacher_F, torch.cos(t) * torch.sin(t)))


def fd_time_derivative(student_F, x_t: torch.Tensor, t: torch.Tensor, teacher_F: torch.Tensor, delta: float):
    """(F^-, J) with J = cos t sin t [F(x_t + d F_T, t + d) - F(x_t - d F_T, t - d)] / 2d: the same J as the JVP, from
    plain no-grad forwards (any attention kernel, FSDP-sharded modules). Central, not forward: its O(d^2) error allows
    a d large enough to rise above bf16 rounding (which grows like 1/d) for one extra forward. The stencil may step
    d outside [0, pi/2]: the wrapper is smooth there (cos t + sin t > 0)."""
    cos_t, sin_t = as_column(torch.cos(t), x_t), as_column(torch.sin(t), x_t)
    F_minus = student_F(x_t, t)
    ahead = student_F(x_t + delta * teacher_F, t + delta)
    behind = student_F(x_t - delta * teacher_F, t - delta)
    return F_minus, cos_t * sin_t * (ahead - behind) / (2 * delta)


@torch.no_grad()
def scm_tangent(student_fn: VelocityFn, teacher_guided_fn: VelocityFn, x_t: torch.Tensor, t: torch.Tensor, context,
                warmup_ratio: float = 1.0, norm_c: float = 0.1, net_dtype=torch.float32, tangent: str = "jvp",
                fd_delta: float = 0.02) -> dict:
    """The normalized sCM target direction g_hat (float64) and diagnostics; no gradient flows from here."""
    if tangent not in TANGENTS:
        raise ValueError(f"tangent {tangent!r}: allowed {list(TANGENTS)}")
    x_t, t = x_t.double(), t.double()
    cos_t, sin_t = as_column(torch.cos(t), x_t), as_column(torch.sin(t), x_t)
    teacher_F = trig_F(teacher_guided_fn, x_t, t, context, net_dtype)

    def student_F(x, time):
        return trig_F(student_fn, x, time, context, net_dtype)

    if tangent == "jvp":
        F_minus, J = jvp_time_derivative(student_F, x_t, t, teacher_F)
    else:
        F_minus, J = fd_time_derivative(student_F, x_t, t, teacher_F, fd_delta)
    r = warmup_ratio
    g = -cos_t * torch.sqrt(1 - r ** 2 * sin_t ** 2) * (F_minus - teacher_F) - (r * cos_t * sin_t * x_t + J)
    g_norm = g.flatten(1).norm(dim=1)
    g_hat = g / as_column(g_norm + norm_c, g)
    return {"g_hat": g_hat, "g_norm": g_norm, "F_minus": F_minus, "teacher_F": teacher_F, "J": J}


def scm_loss(student_fn: VelocityFn, x_t: torch.Tensor, t: torch.Tensor, context, g_hat: torch.Tensor,
             net_dtype=torch.float32) -> torch.Tensor:
    """sum (F - sg F - g_hat)^2: its value is ~||g_hat||^2 and its gradient is -2 g_hat dF/dtheta."""
    F = trig_F(student_fn, x_t, t, context, net_dtype)
    return ((F - F.detach() - g_hat) ** 2).sum()


# --- rollouts and DMD --------------------------------------------------------------------------------------------------

def rollout_times(num_steps: int, generator: torch.Generator, cfg: RCMConfig, batch: int) -> list[torch.Tensor]:
    """[t_0 = arctan sigma_max, t_1, ..., t_{N-1}] per sample: t_n = min(t_hat_n, t_{n-1}), t_hat ~ p_D, or the
    sampler's cfg.rollout_mid_times when given (no random draw then)."""
    times = [torch.full((batch,), math.atan(cfg.sigma_max), dtype=torch.float64)]
    for n in range(num_steps - 1):
        if cfg.rollout_mid_times:
            times.append(torch.full((batch,), float(cfg.rollout_mid_times[n]), dtype=torch.float64))
            continue
        t_hat = sample_trig_times(batch, cfg.p_d_mean, cfg.p_d_std, generator, cfg.t_min)
        times.append(torch.minimum(t_hat, times[-1]))
    return times


def student_rollout(student_fn: VelocityFn, noises: Sequence[torch.Tensor], times: Sequence[torch.Tensor], context,
                    grad_last: bool, net_dtype=torch.float32) -> torch.Tensor:
    """The few-step student chain in TrigFlow space; only the last denoising call may carry gradient."""
    x = as_column(torch.sin(times[0]), noises[0]) * noises[0].double()
    for n, t in enumerate(times):
        last = n == len(times) - 1
        with torch.set_grad_enabled(grad_last and last):
            x0_hat = trig_x0(student_fn, x, t, context, net_dtype)
        if last:
            return x0_hat
        next_t = times[n + 1]
        x = (as_column(torch.cos(next_t), x0_hat) * x0_hat.detach()
             + as_column(torch.sin(next_t), x0_hat) * noises[n + 1].double())
    raise AssertionError("unreachable")


def dmd_loss(x0_hat: torch.Tensor, t_d: torch.Tensor, noise: torch.Tensor, fake_fn: VelocityFn,
             teacher_guided_fn: VelocityFn, context, net_dtype=torch.float32) -> tuple[torch.Tensor, dict]:
    """DMD generator loss: gradient 2*delta pushes x0_hat from the fake score's x0 toward the guided teacher's."""
    with torch.no_grad():
        x_d = as_column(torch.cos(t_d), x0_hat) * x0_hat.detach() + as_column(torch.sin(t_d), x0_hat) * noise.double()
        fake_x0 = trig_x0(fake_fn, x_d, t_d, context, net_dtype)
        teacher_x0 = trig_x0(teacher_guided_fn, x_d, t_d, context, net_dtype)
        scale = (x0_hat.detach() - teacher_x0).abs().flatten(1).mean(1).clamp_min(1e-5)
        delta = (fake_x0 - teacher_x0) / as_column(scale, x0_hat)
    loss = ((x0_hat - (x0_hat - delta).detach()) ** 2).sum()
    return loss, {"delta_norm": delta.flatten(1).norm(dim=1).mean().item()}


def critic_loss(fake_fn: VelocityFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, context,
                net_dtype=torch.float32) -> torch.Tensor:
    """Flow matching of the fake score on student samples, in TrigFlow form, sum-reduced."""
    x0, noise = x0.detach().double(), noise.double()
    cos_t, sin_t = as_column(torch.cos(t), x0), as_column(torch.sin(t), x0)
    x_t = cos_t * x0 + sin_t * noise
    F = trig_F(fake_fn, x_t, t, context, net_dtype)
    return ((F - (cos_t * noise - sin_t * x0)) ** 2).sum()

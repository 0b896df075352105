"""LCM-style consistency distillation (Luo et al. 2023) written for an RF teacher: the published baseline.

On a grid of teacher sigmas (shifted like the sampler), a pair s_hi > s_lo = the next grid point:
    x_lo_hat = x_hi - (s_hi - s_lo) v_T^w(x_hi, s_hi)            one guided teacher Euler step (fixed w, as LCM-LoRA)
    f(x, s)  = x - s v(x, s)                                    the RF x0 estimate (f(x, 0) = x)
    L_LCM    = pseudo_huber( f_theta(x_hi, s_hi) - f_target(x_lo_hat, s_lo) ),  target = EMA of the student (mu 0.95)
It samples with the same few-step chain as the rCM student (sampler.consistency_sample).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import flow
from .rcm import VelocityFn


@dataclass
class LCMConfig:
    grid_steps: int = 50          # teacher-solver grid (LCM: 1000 DDPM steps with skip 20 = 50 intervals)
    shift: float = 3.0
    huber_c: float = 0.03         # pseudo-Huber c (iCT: 0.00054 sqrt(d); d = 3072 for nano latents)
    target_ema: float = 0.95      # mu of the target network


def pseudo_huber(diff: torch.Tensor, c: float) -> torch.Tensor:
    """Per sample sqrt(||d||^2 + c^2) - c."""
    return torch.sqrt(diff.flatten(1).pow(2).sum(1) + c * c) - c


def lcm_loss(student_fn: VelocityFn, target_fn: VelocityFn, teacher_guided_fn: VelocityFn, x0: torch.Tensor,
             noise: torch.Tensor, context, grid_index: torch.Tensor, cfg: LCMConfig) -> torch.Tensor:
    """grid_index [B] in [0, grid_steps): which interval of the sigma grid each sample uses."""
    sigmas = flow.teacher_sigmas(cfg.grid_steps, cfg.shift).to(x0.device)  # indexed by the device-side grid index
    index = grid_index
    s_hi, s_lo = sigmas[index].to(x0.dtype), sigmas[index + 1].to(x0.dtype)
    x_hi = flow.rf_noisy(x0, noise, s_hi)
    with torch.no_grad():
        x_lo = x_hi + flow.broadcast_time(s_lo - s_hi, x_hi) * teacher_guided_fn(x_hi, s_hi, context)
        target = flow.velocity_to_x0(x_lo, target_fn(x_lo, s_lo, context), s_lo)  # s_lo = 0 gives x_lo itself
    prediction = flow.velocity_to_x0(x_hi, student_fn(x_hi, s_hi, context), s_hi)
    return pseudo_huber(prediction - target, cfg.huber_c).sum()

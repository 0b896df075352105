"""The quality gate's harness: fixed prompts and seeds, every model and step count sampled from the same noise,
metrics per row ("teacher@20", "teacher@1", ...).

Metrics available now (pixel space, no learned features; names say exactly that):
  rmse_to_reference   RMSE in [0,1] pixels between a row's image and the reference row's image for the same
                      prompt and seed (the reference is the teacher at sampler.teacher_steps)
  pixel_diversity     mean pairwise pixel RMSE between the seeds of one prompt, averaged over prompts
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import flow, sampler
from .nano_world.prompts import sample_creatures

GATE_PROMPT_SEED_OFFSET = 1_000  # gate prompts never coincide with training prompts drawn from run.seed


@dataclass
class GateSet:
    prompts: list[str]          # n_prompts entries
    attributes: list[dict]      # ground truth per prompt (nano world)
    image_prompt: list[int]     # prompt index of each image (n_prompts * seeds_per_prompt images)
    image_seed: list[int]       # seed index of each image within its prompt


def gate_set(params) -> GateSet:
    creatures = sample_creatures(params.gate.n_prompts, seed=params.run.seed + GATE_PROMPT_SEED_OFFSET)
    k = params.gate.seeds_per_prompt
    return GateSet(prompts=[c.prompt() for c in creatures], attributes=[c.to_dict() for c in creatures],
                   image_prompt=[i for i in range(len(creatures)) for _ in range(k)],
                   image_seed=[j for _ in creatures for j in range(k)])


def gate_noise(params, latent_shape: tuple, gate: GateSet, draw: int = 0) -> torch.Tensor:
    """[n_images, *latent_shape] noise; image (prompt i, seed j) gets the same noise in every row and every run.

    `draw` numbers extra noises for multi-step students (draw 0 starts every chain; 1.. are re-noising draws).
    """
    noises = []
    for i, j in zip(gate.image_prompt, gate.image_seed):
        generator = torch.Generator().manual_seed(((params.run.seed * 100_003 + i) * 1_009 + j) * 17 + draw)
        noises.append(torch.randn(latent_shape, generator=generator))
    return torch.stack(noises)


@torch.no_grad()
def sample_teacher(components, params, gate: GateSet, steps: int, batch_size: int = 64) -> torch.Tensor:
    """Images [n_images, 3, H, W] in [0,1] from the teacher's Euler sampler with CFG."""
    device, dtype = components.transformer.device, components.transformer.dtype
    latent_shape = components.latent_shape(params.gate.image_size)
    noise = gate_noise(params, latent_shape, gate)
    context = components.encode_prompts(gate.prompts)[gate.image_prompt]
    negative = components.encode_prompts([params.sampler.negative_prompt])
    sigmas = flow.teacher_sigmas(steps, params.sampler.shift)
    images = []
    for start in range(0, len(noise), batch_size):
        sl = slice(start, start + batch_size)
        latents = sampler.euler_sample(components.velocity, noise[sl].to(device, dtype), sigmas, context[sl],
                                       negative, params.sampler.guidance_scale)
        images.append(components.codec.decode(latents).float().cpu())
    return torch.cat(images)


def rmse_to_reference(images: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((images - reference) ** 2).flatten(1).mean(1).sqrt().mean())


def pixel_diversity(images: torch.Tensor, gate: GateSet) -> float:
    """Mean pairwise RMSE between seeds of the same prompt (0 means every seed gives the same image)."""
    prompt_ids = torch.tensor(gate.image_prompt)
    per_prompt = []
    for i in range(len(gate.prompts)):
        group = images[prompt_ids == i].flatten(1)
        if len(group) < 2:
            continue
        d = torch.cdist(group, group) / group.shape[1] ** 0.5
        per_prompt.append(d.sum() / (len(group) * (len(group) - 1)))
    return float(torch.stack(per_prompt).mean()) if per_prompt else float("nan")


def score_rows(samples: dict[str, torch.Tensor], reference_row: str, gate: GateSet) -> dict[str, dict[str, float]]:
    reference = samples[reference_row]
    return {row: {"rmse_to_reference": rmse_to_reference(images, reference),
                  "pixel_diversity": pixel_diversity(images, gate),
                  "n_images": int(images.shape[0])}
            for row, images in samples.items()}

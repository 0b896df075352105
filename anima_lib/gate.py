"""The quality gate's harness: fixed prompts and seeds, every model and step count sampled from the same noise,
metrics per row ("teacher@20", "teacher@1", ...; "renderer" is the nano world's ground truth).

Per row (see anima_lib.metrics for the probe metrics):
  fd_probe              Fréchet distance in probe features to renderer images of the same prompts (absolute)
  fd_probe_vs_teacher   the same, to teacher@<sampler.teacher_steps> samples drawn with *other* seeds; on the
                        teacher row itself this is the noise floor a student is judged against
  alignment (+ per attribute, CI), diversity (CI), style_score, clean_rate, n_images
  rmse_to_reference     RMSE in [0,1] pixels to the reference row's image with the same prompt and seed
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import flow, metrics, models, sampler
from .nano_world.prompts import sample_creatures
from .nano_world.renderer import render_batch

GATE_PROMPT_SEED_OFFSET = 1_000   # gate prompts never coincide with prompts drawn from run.seed elsewhere
RENDER_SEED_OFFSET = 500_000      # jitter seeds of the renderer reference, outside the teacher's training pool
MAIN, NOISE_FLOOR = 0, 1          # noise streams: the gate's seeds, and the other seeds of the noise floor


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


def gate_noise(params, latent_shape: tuple, gate: GateSet, stream: int = MAIN) -> torch.Tensor:
    """[n_images, *latent_shape]; image (prompt i, seed j) gets the same noise in every row and every run.

    `stream` separates independent noise sets: MAIN, NOISE_FLOOR, and 2+k for a student's k-th re-noising draw.
    """
    noises = []
    for i, j in zip(gate.image_prompt, gate.image_seed):
        generator = torch.Generator().manual_seed(((params.run.seed * 100_003 + i) * 1_009 + j) * 17 + stream)
        noises.append(torch.randn(latent_shape, generator=generator))
    return torch.stack(noises)


def render_reference(params, gate: GateSet, stream: int = MAIN, style: bool = False) -> torch.Tensor:
    """Renderer images of the gate prompts (one jitter seed per gate seed): the absolute reference (`style`: in the
    renderer's style mode, the reference of a style LoRA)."""
    from .nano_world.prompts import Creature
    creatures = [Creature(**gate.attributes[p]) for p in gate.image_prompt]
    seeds = [RENDER_SEED_OFFSET + stream * 100_000 + p * 100 + s for p, s in zip(gate.image_prompt, gate.image_seed)]
    return render_batch(creatures, seeds, params.gate.image_size, style)


@torch.no_grad()
def sample_teacher(components, params, gate: GateSet, steps: int, stream: int = MAIN,
                   batch_size: int = 128) -> torch.Tensor:
    """Images [n_images, 3, H, W] in [0,1] from the teacher's Euler sampler with CFG."""
    device, dtype = components.transformer.device, components.transformer.dtype
    noise = gate_noise(params, components.latent_shape(params.gate.image_size), gate, stream)
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


@torch.no_grad()
def sample_student(student, components, params, gate: GateSet, steps: int, precision: str = "q8_0",
                   batch_size: int = 128) -> torch.Tensor:
    """Images from a few-step student (rCM sampler, no CFG): the first noise is the teacher rows' (stream MAIN) and
    re-noising draw k uses stream 2+k, so every step count and every model sees the same noise per image.
    The prompt goes through the text path at `precision` (Q8_0: what the student was distilled on and the phone runs).
    """
    from . import text
    shape = components.latent_shape(params.gate.image_size)
    noises = [gate_noise(params, shape, gate, MAIN)] + [gate_noise(params, shape, gate, 2 + k) for k in range(steps - 1)]
    context = text.text_path_at(components, precision).encode_prompts(gate.prompts).float()[gate.image_prompt]
    trig_times = flow.student_trig_times(steps, params.sampler.sigma_max, params.sampler.student_mid_times)
    device, dtype = next(student.parameters()).device, next(student.parameters()).dtype

    def velocity(x, sigma, ctx):
        return models.transformer_velocity(student, x, sigma, ctx)

    images = []
    for start in range(0, len(noises[0]), batch_size):
        sl = slice(start, start + batch_size)
        latents = sampler.consistency_sample(velocity, [n[sl].to(device, dtype) for n in noises], trig_times,
                                             context[sl].to(device, dtype))
        images.append(components.codec.decode(latents).float().cpu())
    return torch.cat(images)


def rmse_to_reference(images: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((images - reference) ** 2).flatten(1).mean(1).sqrt().mean())


def score_rows(samples: dict[str, torch.Tensor], reference_row: str, noise_floor_images: torch.Tensor,
               renders: torch.Tensor, other_renders: torch.Tensor, gate: GateSet, probe) -> dict[str, dict]:
    """Every row's metrics; `samples` maps row names to image sets aligned with gate.image_prompt/image_seed.

    The "renderer" row scores `other_renders` (other jitter seeds): its fd_probe is the renderer's own floor.
    """
    reader = metrics.ProbeReader(probe)
    rows = {}
    for row, images in {"renderer": other_renders, **samples}.items():
        scores = metrics.score_images(reader.read(images), gate.attributes, gate.image_prompt)
        scores["fd_probe"] = metrics.fd_probe(renders, images, probe)
        scores["fd_probe_vs_teacher"] = metrics.fd_probe(noise_floor_images, images, probe)
        if row != "renderer":
            scores["rmse_to_reference"] = rmse_to_reference(images, samples[reference_row])
        rows[row] = scores
    return rows

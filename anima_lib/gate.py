"""The quality gate's harness: fixed prompts and seeds, every model and step count sampled from the same noise,
metrics per row ("teacher@20", "teacher@1", ...; "renderer" is the nano world's ground truth).

The prompts come from the evaluation world (anima_lib.worlds): on nano presets the creature sampler (with ground-truth
attributes), on a real preset the JSONL files of gate.prompts_file (never creatures). This module samples; the world's
readers score.

Per nano row (see anima_lib.metrics for the probe metrics):
  fd_probe              Fréchet distance in probe features to renderer images of the same prompts (absolute)
  fd_probe_vs_teacher   the same, to teacher@<sampler.teacher_steps> samples drawn with *other* seeds; on the
                        teacher row itself this is the noise floor a student is judged against
  alignment (+ per attribute, CI), diversity (CI), style_score, clean_rate, n_images
  rmse_to_reference     RMSE in [0,1] pixels to the reference row's image with the same prompt and seed
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save as safetensors_save

from . import flow, metrics, models, sampler, text
from .cache import CacheError, read_prompts_jsonl
from .config import ConfigError, gate_prompt_files, resolve_path
from .io import NonFiniteWeightsError, atomic_write_bytes, atomic_write_json, load_finite, sha256_file

GATE_PROMPT_SEED_OFFSET = 1_000   # gate prompts never coincide with prompts drawn from run.seed elsewhere
RENDER_SEED_OFFSET = 500_000      # jitter seeds of the renderer reference, outside the teacher's training pool
MAIN, NOISE_FLOOR = 0, 1          # noise streams: the gate's seeds, and the other seeds of the noise floor


@dataclass
class GateSet:
    prompts: list[str]          # n_prompts entries
    attributes: Optional[list[dict]]  # ground truth per prompt (nano world); None in a real world
    image_prompt: list[int]     # prompt index of each image (n_prompts * seeds_per_prompt images)
    image_seed: list[int]       # seed index of each image within its prompt
    ids: Optional[list[str]] = None         # prompt ids (real world: from the prompt files)
    categories: Optional[list[str]] = None  # per prompt: the file's "category" field, else the file's name
    sources: list[str] = field(default_factory=list)  # where the prompts came from


def _images_of(n_prompts: int, k: int) -> tuple[list[int], list[int]]:
    return [i for i in range(n_prompts) for _ in range(k)], [j for _ in range(n_prompts) for j in range(k)]


def gate_set(params, n_prompts: Optional[int] = None, seeds_per_prompt: Optional[int] = None) -> GateSet:
    """The gate's prompts and image layout. Nano presets: creatures drawn from run.seed; any other preset: the
    evaluation prompt files (gate.prompts_file), never creatures.

    `n_prompts` / `seeds_per_prompt` (default gate.n_prompts / gate.seeds_per_prompt) give the same kind of set at
    another size, e.g. previews and 04's calibration inputs, without copying `params`: the nano sampler draws any
    number (the set is exactly the gate's at that size), a real world spreads `n_prompts` evenly over its files and
    takes at most as many as they hold."""
    n = params.gate.n_prompts if n_prompts is None else n_prompts
    k = params.gate.seeds_per_prompt if seeds_per_prompt is None else seeds_per_prompt
    if n < 1 or k < 1:
        raise ValueError(f"gate_set: n_prompts = {n} and seeds_per_prompt = {k} must be >= 1")
    if params.model.preset != "nano":
        return real_gate_set(params, n, k, at_most=n_prompts is not None)
    from .nano_world.prompts import sample_creatures
    creatures = sample_creatures(n, seed=params.run.seed + GATE_PROMPT_SEED_OFFSET)
    image_prompt, image_seed = _images_of(len(creatures), k)
    return GateSet(prompts=[c.prompt() for c in creatures], attributes=[c.to_dict() for c in creatures],
                   image_prompt=image_prompt, image_seed=image_seed,
                   sources=[f"nano creature sampler (seed {params.run.seed + GATE_PROMPT_SEED_OFFSET})"])


def prompt_subset(gate: GateSet, keep: list[int]) -> tuple[GateSet, torch.Tensor]:
    """The gate set restricted to the prompts `keep` (indices into gate.prompts, renumbered in that order) and the
    indices of their images in the full set's image order, e.g. 07's leakage on prompts the style data never had."""
    if not keep:
        raise ValueError("prompt_subset: keep names no prompt")
    new_index = {old: new for new, old in enumerate(keep)}
    images = [i for i, p in enumerate(gate.image_prompt) if p in new_index]
    pick = lambda values: None if values is None else [values[i] for i in keep]
    subset = dataclasses.replace(gate, prompts=pick(gate.prompts), attributes=pick(gate.attributes),
                                 ids=pick(gate.ids), categories=pick(gate.categories),
                                 image_prompt=[new_index[gate.image_prompt[i]] for i in images],
                                 image_seed=[gate.image_seed[i] for i in images])
    return subset, torch.tensor(images, dtype=torch.long)


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    prompt: str
    category: str


def normalized_prompt(text: str) -> str:
    """What makes two prompts the same prompt: case, spacing and punctuation do not count."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def read_eval_prompts(paths) -> list[EvalPrompt]:
    """Every prompt of the evaluation files, in file order. The files are a fixed protocol, so anything the cache's
    reader would skip (an empty prompt) is an error here, as are per-prompt negatives (the gate samples every row
    with sampler.negative_prompt) and ids repeated across files."""
    out, first_seen = [], {}
    for path in paths:
        try:
            records, skipped = read_prompts_jsonl(path)
        except CacheError as exc:  # a malformed line: the file is a parameter
            raise ConfigError(f"gate.prompts_file: {exc}") from None
        if skipped:
            raise ConfigError(f"gate.prompts_file: {path}: {len(skipped)} unusable line(s), e.g. {skipped[0]}")
        rows = {}
        for line in path.read_bytes().split(b"\n"):
            if line.strip():
                row = json.loads(line)
                rows[str(row["id"])] = row
        for r in records:
            if r.negative is not None:
                raise ConfigError(f"gate.prompts_file: {path}:{r.line}: id {r.id!r} has a 'negative'; the gate samples "
                                  f"every prompt with sampler.negative_prompt (remove it)")
            if r.id in first_seen:
                raise ConfigError(f"gate.prompts_file: id {r.id!r} is in {first_seen[r.id]} and in {path}")
            first_seen[r.id] = path
            category = rows[r.id].get("category", path.stem)
            out.append(EvalPrompt(r.id, r.prompt, str(category)))
    return out


def _check_disjoint(params, prompts: list[EvalPrompt]) -> None:
    """No evaluation prompt may be one the student was distilled on (cache.prompts_file)."""
    if params.cache.prompts_file is None:
        return
    training, _ = read_prompts_jsonl(resolve_path(params.cache.prompts_file))
    seen = {normalized_prompt(r.prompt): r.id for r in training}
    shared = [f"{p.id} = {seen[normalized_prompt(p.prompt)]}" for p in prompts if normalized_prompt(p.prompt) in seen]
    if shared:
        raise ConfigError(f"gate.prompts_file and cache.prompts_file share {len(shared)} prompt(s) ({'; '.join(shared[:5])}): "
                          f"the evaluation set must be disjoint from the training prompts")


def select_evenly(n_available: int, n: int) -> list[int]:
    """n indices spread evenly over n_available (all of them, in order, when n == n_available)."""
    return [(i * n_available) // n for i in range(n)]


def real_gate_set(params, n_prompts: Optional[int] = None, seeds_per_prompt: Optional[int] = None,
                  at_most: bool = False) -> GateSet:
    """gate_set of a real preset; `at_most`: a smaller set asked for by size takes at most the prompts the files
    hold (gate.n_prompts itself must fit)."""
    n = params.gate.n_prompts if n_prompts is None else n_prompts
    k = params.gate.seeds_per_prompt if seeds_per_prompt is None else seeds_per_prompt
    paths = gate_prompt_files(params)
    if not paths:
        raise ConfigError(f"{params.source}: gate.prompts_file is required with model.preset = "
                          f"{params.model.preset!r} (the gate never draws nano creatures on a real model)")
    prompts = read_eval_prompts(paths)
    if at_most:
        n = min(n, len(prompts))
    if n > len(prompts):
        raise ConfigError(f"{params.source}: gate.n_prompts = {n} but gate.prompts_file holds "
                          f"{len(prompts)} prompts")
    _check_disjoint(params, prompts)
    chosen = [prompts[i] for i in select_evenly(len(prompts), n)]
    image_prompt, image_seed = _images_of(len(chosen), k)
    return GateSet(prompts=[p.prompt for p in chosen], attributes=None, image_prompt=image_prompt,
                   image_seed=image_seed, ids=[p.id for p in chosen], categories=[p.category for p in chosen],
                   sources=[str(p) for p in paths])


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
    from .nano_world.renderer import render_batch
    if gate.attributes is None:
        raise ValueError("render_reference: this gate set has no nano attributes (a real world has no renderer)")
    creatures = [Creature(**gate.attributes[p]) for p in gate.image_prompt]
    seeds = [RENDER_SEED_OFFSET + stream * 100_000 + p * 100 + s for p, s in zip(gate.image_prompt, gate.image_seed)]
    return render_batch(creatures, seeds, params.gate.image_size, style)


def samples_folder(params) -> Path:
    return params.output_path() / "samples"


def _teacher_row_key(components, params, gate: GateSet, steps: int, stream: int) -> str:
    """Everything a teacher-sampler row depends on: the DiT's weights, the model preset (text encoder, VAE), the
    sampler settings, the gate set and the noise stream."""
    what = {"transformer": models.weights_digest(components.transformer), "model": dataclasses.asdict(params.model),
            "steps": steps, "shift": params.sampler.shift, "guidance_scale": params.sampler.guidance_scale,
            "negative_prompt": params.sampler.negative_prompt, "image_size": params.gate.image_size,
            "seed": params.run.seed, "stream": stream, "prompts": gate.prompts, "image_prompt": gate.image_prompt,
            "image_seed": gate.image_seed}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _reused_row(path: Path) -> Optional[torch.Tensor]:
    """A stored row, if its file matches the sha256 recorded beside it (anything else is recomputed)."""
    record = path.with_suffix(".json")
    try:
        if path.is_file() and record.is_file() and json.loads(record.read_text())["sha256"] == sha256_file(path):
            return load_finite(path)["images"]
    except (ValueError, KeyError, OSError, NonFiniteWeightsError):
        pass
    return None


def check_begins_with(gate: GateSet, prefix: GateSet) -> int:
    """The number of images of `prefix` when `gate` begins with exactly its prompts and images (so with its noise:
    gate_noise is keyed by prompt and seed index), e.g. gate_set at a larger n_prompts; else ValueError."""
    n, m = len(prefix.prompts), len(prefix.image_prompt)
    if (gate.prompts[:n] != prefix.prompts or gate.image_prompt[:m] != prefix.image_prompt
            or gate.image_seed[:m] != prefix.image_seed):
        raise ValueError(f"the gate set of {len(gate.prompts)} prompts does not begin with the {n} prompts and {m} "
                         f"images of the smaller set (draw both with gate_set from the same parameters)")
    return m


@torch.no_grad()
def sample_teacher(components, params, gate: GateSet, steps: int, stream: int = MAIN,
                   batch_size: int = 128, extends: Optional[GateSet] = None) -> torch.Tensor:
    """Images [n_images, 3, H, W] in [0,1] from the teacher's Euler sampler with CFG. With gate.reuse_samples, a row
    is sampled once per run and read back bit-identical by every later notebook (03, 05 and 06 share teacher@T).
    `extends`: a set `gate` begins with (check_begins_with): its row (read back when stored) is the first images,
    only the rest is sampled."""
    if extends is not None:
        n = check_begins_with(gate, extends)
        rest = dataclasses.replace(gate, image_prompt=gate.image_prompt[n:], image_seed=gate.image_seed[n:])
        sample = lambda: torch.cat([sample_teacher(components, params, extends, steps, stream, batch_size),
                                    _sample_teacher(components, params, rest, steps, stream, batch_size)])
    else:
        sample = lambda: _sample_teacher(components, params, gate, steps, stream, batch_size)
    if not params.gate.reuse_samples:
        return sample()
    path = samples_folder(params) / f"teacher-{_teacher_row_key(components, params, gate, steps, stream)}.safetensors"
    images = _reused_row(path)
    if images is None:
        images = sample()
        atomic_write_bytes(path, safetensors_save({"images": images.contiguous()}))
        atomic_write_json(path.with_suffix(".json"), {"sha256": sha256_file(path), "steps": steps, "stream": stream,
                                                     "n_images": len(images)})
    return images


@torch.no_grad()
def teacher_images_per_s(components, params, gate: GateSet, steps: int, batch_size: int = 128) -> float:
    """The teacher sampler's speed, timed now on the gate set's first batch (never read back: a row that
    reuse_samples reads from disk took no sampling time, and 05 once reported student@1 as "x0 faster")."""
    n = min(batch_size, len(gate.image_prompt))
    first = dataclasses.replace(gate, image_prompt=gate.image_prompt[:n], image_seed=gate.image_seed[:n])
    started = time.perf_counter()
    _sample_teacher(components, params, first, steps, MAIN, batch_size)
    return n / (time.perf_counter() - started)


def _sample_teacher(components, params, gate: GateSet, steps: int, stream: int, batch_size: int) -> torch.Tensor:
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
    shape = components.latent_shape(params.gate.image_size)
    noises = [gate_noise(params, shape, gate, MAIN)] + [gate_noise(params, shape, gate, 2 + k) for k in range(steps - 1)]
    context = text.text_path_at(components, precision).encode_prompts(gate.prompts).float()[gate.image_prompt]
    dtype = next(student.parameters()).dtype
    images = []
    for start in range(0, len(noises[0]), batch_size):   # decoded per batch: only one batch of latents at a time
        sl = slice(start, start + batch_size)
        latents = sampler.student_sample(student, [n[sl] for n in noises], context[sl], params, dtype=dtype)
        images.append(components.codec.decode(latents).float().cpu())
    return torch.cat(images)


def rmse_to_reference(images: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((images - reference) ** 2).flatten(1).mean(1).sqrt().mean())


def score_rows(samples: dict[str, torch.Tensor], reference_row: str, noise_floor_images: torch.Tensor,
               renders: torch.Tensor, other_renders: torch.Tensor, gate: GateSet, probe,
               details: Optional[dict] = None) -> dict[str, dict]:
    """Every row's metrics; `samples` maps row names to image sets aligned with gate.image_prompt/image_seed.

    The "renderer" row scores `other_renders` (other jitter seeds): its fd_probe is the renderer's own floor.
    Beside the probe's columns, the detail-strict reader's `strict_*` columns (nano_world.detail_reader: eyes
    confident and right, an "other" class for damaged eye rows); `details` (a dict) receives each row's confusion
    matrices, calibration curves and per-image strict reads.
    """
    from .nano_world import detail_reader   # nano only: the real world never imports the nano readers
    reader = metrics.ProbeReader(probe)
    strict = detail_reader.load_detail_reader()
    rows = {}
    for row, images in {"renderer": other_renders, **samples}.items():
        scores = metrics.score_images(reader.read(images), gate.attributes, gate.image_prompt)
        reading = detail_reader.score_details(strict, metrics.as_float(images), gate.attributes, gate.image_prompt)
        scores.update(reading["scores"])
        if details is not None:
            details[row] = {k: v for k, v in reading.items() if k != "scores"}
        scores["fd_probe"] = metrics.fd_probe(renders, images, probe)
        scores["fd_probe_vs_teacher"] = metrics.fd_probe(noise_floor_images, images, probe)
        if row != "renderer":
            scores["rmse_to_reference"] = rmse_to_reference(images, samples[reference_row])
        rows[row] = scores
    return rows

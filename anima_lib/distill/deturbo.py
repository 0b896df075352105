"""De-Turbo: an adapter A (a LoRA on the student's attention and MLP linears, the student frozen) that makes the
few-step student a multi-step velocity model like the teacher again, so style LoRAs can be trained through it
(`shared/research/rcm-deturbo.md` §6.3):

    L_A = E || v_{S+A}(x_s, s, c~) - v_T(x_s, s, c~) ||^2,   x_s = (1 - s) x0 + s eps
    c~    the prompt's context, or the negative prompt's with p = caption_dropout: the target is the teacher's
          *unguided* velocity for both, so ordinary CFG works on S+A
    x0    the cache's teacher latents (1 - student_fraction of each batch) and the student's own 4-step samples
          (student_fraction), so A is right on the student's manifold too
    s     the teacher's training-time distribution, with uniform_fraction drawn uniformly (the ends)
    init  'svd': A starts as the rank-r truncated SVD of W_teacher - W_student on its target linears (the part of
          the distillation a LoRA can undo exactly), 'zeros': peft's default (A = no change)

A lives only as a LoRA: the student's weights are never modified, so dropping A gives the student back bit-exactly.
Artifacts: outputs/<run>/lora/deturbo-<key>/ (the LoRA files + manifest, see anima_lib.lora) and its -train/ folder
(resumable checkpoints).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .. import flow, lora, models, sampler
from ..cache import CacheBatches, cache_folder
from ..checks import Check
from ..config import BUDGET_KEYS


class DeturboError(RuntimeError):
    """The De-Turbo adapter is missing or was trained for another student."""


NOT_IN_ADAPTER_KEY = BUDGET_KEYS + ("eval_rows",)  # deturbo.* keys that do not change what the adapter learns


def deturbo_settings(params, teacher: torch.nn.Module, student: torch.nn.Module) -> dict:
    d = params.deturbo
    return {"student_sha256": models.weights_digest(student), "teacher_sha256": models.weights_digest(teacher),
            "cache_precision": params.cache.precision,
            "deturbo": {k: getattr(d, k) for k in d.__dataclass_fields__ if k not in NOT_IN_ADAPTER_KEY}}


def deturbo_folder(params, teacher: torch.nn.Module, student: torch.nn.Module) -> Path:
    """outputs/<run>/lora/deturbo-<key>: the key hashes the student, the teacher and the adapter's settings, so an ad
    hoc run with another rank trains its own adapter and 06 finds the one that matches its parameters."""
    settings = deturbo_settings(params, teacher, student)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return params.output_path() / "lora" / f"deturbo-{key}"


@torch.no_grad()
def svd_init(teacher: torch.nn.Module, student: torch.nn.Module, rank: int, alpha: float) -> lora.LoraWeights:
    """The rank-r LoRA closest (Frobenius) to teacher - student on every target linear."""
    teacher_linears, down, up = lora.target_linears(teacher), {}, {}
    scale = alpha / rank
    for name, module in lora.target_linears(student).items():
        difference = teacher_linears[name].weight.double() - module.weight.double()
        u, s, vh = torch.linalg.svd(difference, full_matrices=False)
        root = s[:rank].sqrt()
        up[name] = (u[:, :rank] * root / scale ** 0.5).float()
        down[name] = (root[:, None] * vh[:rank] / scale ** 0.5).float()
    return lora.LoraWeights(down, up, rank, alpha)


@torch.no_grad()
def student_samples(student: torch.nn.Module, contexts: torch.Tensor, latent_shape: tuple, params, seed: int
                    ) -> torch.Tensor:
    """The student's own 4-step samples (latents) for the given contexts, fresh noise from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(contexts), *latent_shape)
    noises = [models.randn(shape, generator, models.device_of(student)) for _ in range(4)]
    return sampler.student_sample(student, noises, contexts, params, batch_size=128)


def train_deturbo(params, components, student: torch.nn.Module, progress: bool = True) -> tuple[lora.LoraWeights, dict]:
    """Train A for `student` (or resume, or find it finished); returns A and the manifest."""
    d = params.deturbo
    folder = deturbo_folder(params, components.transformer, student)
    settings = deturbo_settings(params, components.transformer, student)
    manifest = lora.read_manifest(folder)
    if manifest is not None and manifest.get("settings") == settings and manifest.get("finished", True):
        return lora.read_lora(folder), manifest
    teacher = components.transformer.eval().requires_grad_(False)
    data = CacheBatches(cache_folder(params), precision=params.cache.precision, seed=params.run.seed,
                        teacher_sha256=models.weights_digest(teacher), device=models.device_of(student))
    pool_rows = data.batch(0, d.student_samples)  # contexts of the student's own samples (cache prompts)
    pool_context = pool_rows["context"]
    pool_x0 = student_samples(student, pool_context, pool_rows["x0"].shape[1:], params, seed=params.run.seed + 77)
    negative = pool_rows["negative"]
    n_student = round(d.batch_size * d.student_fraction)

    def batches(step, generator):
        rows = data.batch(step, d.batch_size - n_student)
        pick = torch.randint(len(pool_x0), (n_student,), generator=generator).to(pool_x0.device)
        return torch.cat([rows["x0"], pool_x0[pick]]), torch.cat([rows["context"], pool_context[pick]])

    init = svd_init(teacher, student, d.rank, d.alpha) if d.init == "svd" else None
    cfg = lora.adapter_training_config(params, d, d.uniform_fraction)
    adapter, result = lora.train_lora(student, batches, negative, cfg, d.rank, d.alpha,
                                      folder.parent / f"{folder.name}-train", init=init,
                                      target_fn=models.velocity_fn(teacher),
                                      progress=progress, desc="De-Turbo")
    last_losses = result["losses"][-50:]
    record = {"kind": "deturbo", "settings": settings, "steps": result["step"], "wall_s": result["wall_s"],
              "finished": result["step"] >= d.steps, "final_loss": sum(last_losses) / max(1, len(last_losses)),
              "base": "student", "targets": list(lora.TARGET_MODULES), "losses": result["losses"]}
    if result["paused"]:  # the time budget paused training: nothing half-trained is saved as the adapter
        return adapter, record
    lora.save_lora(adapter, folder, record)
    return adapter, lora.read_manifest(folder)


def load_deturbo(params, components, student: torch.nn.Module) -> lora.LoraWeights:
    """A as 03_deturbo saved it for this student, teacher and `deturbo` settings."""
    folder = deturbo_folder(params, components.transformer, student)
    if lora.read_manifest(folder) is None:
        raise DeturboError(f"{folder}: no De-Turbo adapter for this student and these deturbo.* settings; run notebook "
                           f"03_deturbo first (`anima run <preset> --only 03_deturbo`, with the same --set deturbo.*)")
    return lora.read_lora(folder)


@torch.no_grad()
def velocity_error_by_time(velocity_fns: dict, teacher_fn, x0: torch.Tensor, context: torch.Tensor,
                           negative: torch.Tensor, buckets: int = 10, seed: int = 0) -> dict[str, list[float]]:
    """Relative velocity error ||v - v_T|| / ||v_T|| per time bucket (s in [k/B, (k+1)/B)), for each named velocity
    function, with the prompt ("<name>") and with the negative prompt ("<name> uncond"). Same x_s for every model."""
    generator = torch.Generator().manual_seed(seed)
    n = len(x0)
    out = {}
    for bucket in range(buckets):
        sigma = ((bucket + torch.rand(n, generator=generator)) / buckets).clamp(1e-3, 1 - 1e-3).to(x0.device)
        noise = models.randn(x0.shape, generator, x0.device)
        x_s = flow.rf_noisy(x0, noise, sigma)
        for label, ctx in (("", context), (" uncond", negative.expand_as(context))):
            target = teacher_fn(x_s, sigma, ctx).double()
            for name, fn in velocity_fns.items():
                error = (fn(x_s, sigma, ctx).double() - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1)
                out.setdefault(f"{name}{label}", []).append(float(error.mean()))
    return out


# --- 03_deturbo's checks ----------------------------------------------------------------------------------------------

NOISE_FLOOR_RATIO_MAX = 1.2      # student+A sampled like the teacher: its distance to teacher@T within 1.2x the floor
ADAPTER_FILE_MAX_ABS_DV = 1e-4   # A loaded from its diffusers-format file reproduces the in-memory A's velocity


def noise_floor_ratio(rows: dict[str, dict], floor_metric: str, steps: int) -> tuple[float, float, float]:
    """(student+deturbo@T's floor metric, teacher@T's = the noise floor, their ratio; inf when the floor is 0)."""
    ours, floor = rows[f"student+deturbo@{steps}"][floor_metric], rows[f"teacher@{steps}"][floor_metric]
    return ours, floor, (ours / floor if floor > 0 else float("inf"))


def judge(rows: dict[str, dict], floor_metric: str, steps: int, mean_error: dict[str, float], digest_unchanged: bool,
          dropped_bit_identical: bool, file_max_abs_dv: float) -> list[Check]:
    """03's checks. `rows`: the world's scores of teacher@T and student+deturbo@T; `mean_error`: the mean relative
    velocity error of "student" and "student+A", each also with " uncond" (the negative prompt's branch);
    `digest_unchanged`: the student's weights digest is what it was and what the adapter was trained on;
    `dropped_bit_identical`: deleting the peft-loaded A gives the student's outputs bit for bit;
    `file_max_abs_dv`: max |v(diffusers-loaded A) - v(fused A)|."""
    ours, floor, ratio = noise_floor_ratio(rows, floor_metric, steps)
    before, after = mean_error["student"], mean_error["student+A"]
    before_u, after_u = mean_error["student uncond"], mean_error["student+A uncond"]
    return [
        Check(f"student+A@{steps} {floor_metric} within {NOISE_FLOOR_RATIO_MAX} x the noise floor ({ours:.2f} vs "
              f"{floor:.2f}, x{ratio:.2f})", ours <= NOISE_FLOOR_RATIO_MAX * floor),
        Check(f"A lowers the mean relative velocity error ({before:.3f} -> {after:.3f}; uncond {before_u:.3f} -> "
              f"{after_u:.3f})", after < before and after_u < before_u),
        Check("dropping A gives the student back bit-exactly", digest_unchanged and dropped_bit_identical),
        Check(f"the diffusers-format file reproduces the adapter (max |Δv| {file_max_abs_dv:.2g} < "
              f"{ADAPTER_FILE_MAX_ABS_DV:g})", file_max_abs_dv < ADAPTER_FILE_MAX_ABS_DV),
    ]

"""LoRA transfer (07_lora_transfer): a style LoRA `L` made for the teacher becomes `L'` for the few-step student, so
that student+L' at 1/2/4 steps matches teacher+L at the teacher's step count with CFG.

The objective is DMD as rCM uses it (anima_lib.distill.rcm; normalized, no JVP), run by the distillation loop itself
(anima_lib.distill.trainer, method "dmd", adapters_only): resumable atomic checkpoints, progress bar, NaN stop, and
`generator_steps` deciding what is trained while `minutes` only pauses an invocation.

    real score  teacher+L (the model L was trained on, L fused in), CFG at sampler.guidance_scale
    fake score  teacher+L plus a trainable LoRA (rank fake_rank), flow matching on the generator's own rollouts
    generator   the frozen student plus the trainable L' (init: L itself, or zeros), rollouts of 1..max_rollout steps
                at the student sampler's times, gradient through the last step only; fake_updates fake-score updates
                per generator update
    regression  (optional) the generator's 1-step output regressed onto teacher+L's sample from the same noise
                (cached once, regression_samples of them)
Prompts: the style folder's captions and as many generic prompts (nano: creatures; a real preset: cache prompts), the
caption dropped to the negative prompt with p = caption_dropout so the unconditional branch (CFG's) stays styled.

A source LoRA is refused when it was made for another base model: its manifest names the base's sha256 (a bare file
from elsewhere carries none, and is checked by its shapes), or its matrices do not fit the model.
Files: outputs/<run>/lora/transfer-<key>/ (lora.save_lora: diffusers + ComfyUI + manifest with the source LoRA's and
the student's digests, the settings and the wall time) and transfer-<key>-train/ (checkpoints).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import distill, flow, gate, lora, lora_survival, metrics, models, report, sampler, text, worlds
from .distill import deturbo
from .cache import cache_records, nano_prompts
from .checks import Check
from .config import BUDGET_KEYS
from .distill.rcm import RCMConfig
from .distill.trainer import DistillConfig, Distiller
from .io import atomic_write_json, atomic_write_text

FAKE_ADAPTER = "fake"
INITS = ("lora", "zeros")
ABLATIONS = ("init", "regression")   # each: one more transfer of the first source with that setting flipped
SOURCE_KINDS = ("teacher", "deturbo")
NOT_IN_TRANSFER_KEY = BUDGET_KEYS + ("sources", "ablations", "second_times")  # lora_transfer.* keys: not what L' learns
PARAM_NAMES = {  # DistillConfig field -> the parameter a user sets (refusals to resume name these)
    "batch_size": "lora_transfer.batch_size", "lr": "lora_transfer.lr", "fake_lr": "lora_transfer.fake_lr",
    "student_every": "lora_transfer.fake_updates", "ema_decay": "lora_transfer.ema_decay", "seed": "run.seed",
    "rcm.guidance_scale": "sampler.guidance_scale", "rcm.p_d_mean": "distill.p_d[0]", "rcm.p_d_std": "distill.p_d[1]",
    "rcm.max_rollout": "lora_transfer.max_rollout", "rcm.sigma_max": "sampler.sigma_max",
    "rcm.rollout_mid_times": "sampler.student_mid_times", "rcm.regression_weight": "lora_transfer.regression_weight"}


class TransferError(lora.LoraError):
    """A source LoRA this transfer cannot take (made for another base model, already a student LoRA, ...)."""


# --- the transfer on any velocity networks ------------------------------------------------------------------------------

def transfer_networks(real_base: torch.nn.Module, source: lora.LoraWeights, student: torch.nn.Module, init: str,
                      fake_rank: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(real, generator, fake): real = real_base with L fused in (frozen); generator = a copy of the student with the
    trainable adapter L' (same rank and alpha as L; init L or zeros); fake = a copy of real with a trainable LoRA of
    rank fake_rank (peft's init: it starts as real). None of the inputs is modified."""
    if init not in INITS:
        raise ValueError(f"init {init!r}: allowed {list(INITS)}")
    real = lora.fused(real_base, [(source, 1.0)]).float().eval().requires_grad_(False)
    generator = copy.deepcopy(student).float()
    lora.add_adapter(generator, source.rank, source.alpha, seed=seed)
    if init == "lora":
        lora.set_adapter(generator, source)
    fake = copy.deepcopy(real)
    lora.add_adapter(fake, fake_rank, float(fake_rank), name=FAKE_ADAPTER, seed=seed + 1)
    return real, generator, fake


def run_transfer(real_base: torch.nn.Module, source: lora.LoraWeights, student: torch.nn.Module, data,
                 cfg: DistillConfig, checkpoint_dir: Path, call: Callable, init: str = "lora", fake_rank: int = 8,
                 progress: bool = True, log: Optional[Callable[[dict], None]] = None
                 ) -> tuple[lora.LoraWeights, Distiller]:
    """Train L' (or resume, or find the run finished in checkpoint_dir) and return it as the EMA of the adapter, with
    the Distiller (state, history, `paused`). `data.batch(i, batch_size, rank, world_size)` gives {"x0", "context",
    "negative"} (x0 is read for its shape by DMD; with regression, the teacher's samples from "regression_noise");
    call(module, x, sigma, context) -> velocity."""
    if cfg.method != "dmd" or not cfg.adapters_only:
        raise ValueError("run_transfer needs DistillConfig(method='dmd', adapters_only=True) (transfer_config)")
    real, generator, fake = transfer_networks(real_base, source, student, init, fake_rank, cfg.seed)

    def real_fn(x, s, context):
        return call(real, x, s, context)

    distiller = Distiller(real_fn, generator, call, data, cfg, checkpoint_dir, fake=fake, param_names=PARAM_NAMES,
                          log=log)
    distiller.train(progress=progress)
    with torch.no_grad():   # L' is the EMA of the adapter (what the other trainers ship too)
        for name, p in generator.named_parameters():
            if name in distiller.ema.shadow:
                p.copy_(distiller.ema.shadow[name].to(p.dtype))
    return lora.from_adapter(generator, source.rank, source.alpha), distiller


def transfer_config(iterations_per_update: int, generator_steps: int, batch_size: int, lr: float, fake_lr: float,
                    ema_decay: float, guidance_scale: float, sigma_max: float, mid_times, max_rollout: int,
                    p_d: tuple[float, float], regression_weight: float, checkpoint_every: int,
                    time_budget_s: Optional[float], seed: int, warmup_steps: int = 20) -> DistillConfig:
    """The loop's settings for a transfer: DMD only, adapters only, rollouts at the sampler's times."""
    rcm_cfg = RCMConfig(guidance_scale=guidance_scale, p_d_mean=p_d[0], p_d_std=p_d[1], scm_weight=0.0,
                        dmd_weight=1.0, max_rollout=max_rollout, sigma_max=sigma_max,
                        rollout_mid_times=tuple(mid_times[: max_rollout - 1]), regression_weight=regression_weight)
    return DistillConfig(method="dmd", iterations=generator_steps * iterations_per_update, batch_size=batch_size,
                         lr=lr, fake_lr=fake_lr, warmup_steps=warmup_steps, weight_decay=0.0,
                         student_every=iterations_per_update, ema_decay=ema_decay, checkpoint_every=checkpoint_every,
                         time_budget_s=time_budget_s, seed=seed, adapters_only=True, rcm=rcm_cfg)


# --- sources: which LoRA, made for which model ---------------------------------------------------------------------------

@dataclass
class SourceLora:
    lora: lora.LoraWeights
    kind: str                      # the model it was trained on: "teacher", or "deturbo" (student + De-Turbo adapter)
    label: str                     # what tables and folders call it
    path: Optional[Path] = None
    manifest: Optional[dict] = None   # None: a bare file from elsewhere (no record of its base model)


def source_kind(manifest: Optional[dict], where) -> str:
    """The model a LoRA was made for, from its manifest: 06's ways record it; a bare file is a LoRA for the base
    model (the teacher), as every LoRA trainer makes them. Student LoRAs (06's 'student' way, a transfer's L', the
    De-Turbo adapter itself) are refused."""
    if manifest is None:
        return "teacher"
    kind = manifest.get("kind")
    if kind == "transfer":
        raise TransferError(f"{where}: already a transferred student LoRA (L'); transfer takes a LoRA made for the "
                            f"teacher")
    if kind == "deturbo":
        raise TransferError(f"{where}: the De-Turbo adapter itself, not a style LoRA")
    way = manifest.get("settings", {}).get("way", "teacher")
    if way == "student":
        raise TransferError(f"{where}: trained directly on the student (06's 'student' way): already a student LoRA; "
                            f"transfer takes a LoRA made for the teacher")
    if way not in SOURCE_KINDS:
        raise TransferError(f"{where}: a LoRA of way {way!r}; transfer takes {list(SOURCE_KINDS)}")
    return way


def read_source(path, label: Optional[str] = None) -> SourceLora:
    """A source LoRA from a folder written by lora.save_lora (hash-verified, with its manifest) or a .safetensors file
    with diffusers or ComfyUI keys."""
    path = Path(path)
    weights = lora.read_lora(path)   # missing, corrupt, non-finite or non-LoRA files are refused here
    manifest = lora.read_manifest(path) if path.is_dir() else None
    return SourceLora(weights, source_kind(manifest, path), label or path.stem, path, manifest)


def source_base(source: SourceLora, components, student: torch.nn.Module,
                deturbo_adapter: Optional[lora.LoraWeights] = None) -> torch.nn.Module:
    """The model `source` was made for, checked against this run: the teacher, or student + De-Turbo adapter. A
    manifest's base digests must be this run's (else TransferError naming both); the matrices must fit the model's
    layers (else TransferError naming the modules and shapes)."""
    where = source.path or source.label
    recorded = (source.manifest or {}).get("settings", {})
    if source.kind == "deturbo":
        if deturbo_adapter is None:
            raise TransferError(f"{where}: trained through De-Turbo; its transfer needs the De-Turbo adapter "
                                f"(03_deturbo)")
        expected = {"base_sha256": ("this run's student", models.weights_digest(student)),
                    "adapter_sha256": ("this run's De-Turbo adapter", deturbo_adapter.digest())}
        base = lora.fused(student, [(deturbo_adapter, 1.0)])
    else:
        expected = {"base_sha256": ("this run's teacher", models.weights_digest(components.transformer))}
        base = components.transformer
    for key, (what, digest) in expected.items():
        if key in recorded and recorded[key] != digest:
            raise TransferError(f"{where}: made for another base model: its manifest records {key} "
                                f"{str(recorded[key])[:16]}..., {what} is {digest[:16]}...")
    try:
        lora.check_keys(base, source.lora)
    except lora.LoraError as exc:
        raise TransferError(f"{where}: made for another base model (its matrices do not fit this model's layers): "
                            f"{exc}") from None
    return base


def style_source(params, components, student, way: str, deturbo_adapter=None) -> SourceLora:
    """06's LoRA of `way` for this run (found finished; trained when missing) as a source."""
    weights, manifest = lora_survival.train_style_lora(params, components, way, student, deturbo_adapter,
                                                       progress=False)
    if not manifest.get("finished", True):
        raise TransferError(f"06's {way} LoRA is not finished ({manifest['steps']}/{params.lora.steps} steps); run "
                            f"06_lora_survival to the end first")
    return SourceLora(weights, source_kind(manifest, f"06's {way} LoRA"), way, None, manifest)


# --- prompts and batches --------------------------------------------------------------------------------------------------

GENERIC_PROMPT_SEED_OFFSET = 5_000   # nano generic prompts: a draw of their own (gate: +1_000, style data: +3_000)


def transfer_prompts(params, captions: list[str]) -> list[str]:
    """The style folder's captions (each once) and lora_transfer.generic_prompts generic prompts: nano creatures of
    their own draw, or a real preset's cache prompts taken evenly."""
    n = params.lora_transfer.generic_prompts
    if params.model.preset == "nano":
        generic = [r.prompt for r in nano_prompts(n, seed=params.run.seed + GENERIC_PROMPT_SEED_OFFSET)]
    else:
        records, _ = cache_records(params)
        generic = [records[i].prompt for i in gate.select_evenly(len(records), min(n, len(records)))]
    return list(dict.fromkeys(sorted(set(captions)) + generic))


class PromptBatches:
    """Batches for the transfer's loop: batch(index, batch_size, rank, world_size) is a pure function of the index
    (drawn for the global batch, rows rank::world_size). Without a regression pool: prompts drawn from `contexts`, each
    replaced by the negative prompt with p = caption_dropout, and x0 = zeros (DMD reads only its shape). With one:
    rows of the pool (its contexts already dropped out when it was made), x0 = teacher+L's samples from
    "regression_noise"."""

    def __init__(self, contexts: torch.Tensor, negative: torch.Tensor, latent_shape: tuple, caption_dropout: float,
                 seed: int, pool: Optional[dict] = None):
        self.contexts, self.negative, self.latent_shape = contexts, negative, tuple(latent_shape)
        self.caption_dropout, self.seed, self.pool = caption_dropout, seed, pool

    def batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.pool is None:
            pick = torch.randint(len(self.contexts), (batch_size,), generator=generator)
            drop = torch.rand(batch_size, generator=generator) < self.caption_dropout
            rows = {"context": torch.where(drop[:, None, None], self.negative.expand(batch_size, *self.negative.shape[1:]),
                                           self.contexts[pick]),
                    "x0": torch.zeros(batch_size, *self.latent_shape)}
        else:
            pick = torch.randint(len(self.pool["context"]), (batch_size,), generator=generator)
            rows = {"context": self.pool["context"][pick], "x0": self.pool["x0"][pick],
                    "regression_noise": self.pool["noise"][pick]}
        return {**{k: v[rank::world_size] for k, v in rows.items()}, "negative": self.negative}


@torch.no_grad()
def regression_pool(real: torch.nn.Module, contexts: torch.Tensor, negative: torch.Tensor, latent_shape: tuple,
                    params, n: int, seed: int, batch_size: int = 128) -> dict:
    """n (context, noise, teacher+L sample) rows, made once: prompts drawn from `contexts` (dropped out to the negative
    prompt with p = caption_dropout), the teacher's Euler sampler at sampler.teacher_steps with CFG."""
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(contexts), (n,), generator=generator)
    drop = torch.rand(n, generator=generator) < params.lora_transfer.caption_dropout
    context = torch.where(drop[:, None, None], negative.expand(n, *negative.shape[1:]), contexts[pick])
    noise = torch.randn((n, *latent_shape), generator=generator)
    sigmas = flow.teacher_sigmas(params.sampler.teacher_steps, params.sampler.shift)
    device, velocity = models.device_of(real), models.velocity_fn(real)
    x0 = [sampler.euler_sample(velocity, noise[s].to(device), sigmas, context[s].to(device), negative.to(device),
                               params.sampler.guidance_scale).cpu()
          for s in (slice(i, i + batch_size) for i in range(0, n, batch_size))]
    return {"context": context, "noise": noise, "x0": torch.cat(x0)}


# --- one transfer of a run ------------------------------------------------------------------------------------------------

def transfer_settings(params, source: SourceLora, student: torch.nn.Module, base: torch.nn.Module, prompts: list[str],
                      init: str, regression: bool) -> dict:
    """Everything that changes what L' learns (its folder key)."""
    t, s = params.lora_transfer, params.sampler
    return {"source_lora_sha256": source.lora.digest(), "source_kind": source.kind,
            "base_sha256": models.weights_digest(base), "student_sha256": models.weights_digest(student),
            "init": init, "regression": regression, "text_precision": params.cache.precision,
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "sampler": {k: getattr(s, k) for k in ("guidance_scale", "sigma_max", "student_mid_times",
                                                   "teacher_steps", "shift", "negative_prompt")},
            "p_d": list(params.distill.p_d), "image_size": params.gate.image_size,
            "lora_transfer": {k: getattr(t, k) for k in t.__dataclass_fields__
                              if k not in NOT_IN_TRANSFER_KEY + ("init", "regression")}}


def transfer_folder(params, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return params.output_path() / "lora" / f"transfer-{key}"


def transfer_style_lora(params, components, student: torch.nn.Module, source: SourceLora,
                        deturbo_adapter: Optional[lora.LoraWeights] = None, init: Optional[str] = None,
                        regression: Optional[bool] = None, progress: bool = True) -> tuple[lora.LoraWeights, dict]:
    """L' for `source` on this run's student: trained, resumed, or found finished in outputs/<run>/lora/transfer-<key>.
    Returns L' and its manifest (a paused run: the EMA so far and a record with finished False; nothing is saved as
    L'). init / regression default to lora_transfer.init / .regression (07's ablations flip them)."""
    t = params.lora_transfer
    init = t.init if init is None else init
    regression = t.regression if regression is None else regression
    base = source_base(source, components, student, deturbo_adapter)   # refusals before any compute
    _, captions, style_folder = lora_survival.load_style_data(params, components)
    prompts = transfer_prompts(params, captions)
    settings = transfer_settings(params, source, student, base, prompts, init, regression)
    folder = transfer_folder(params, settings)
    manifest = lora.read_manifest(folder)
    if manifest is not None and manifest.get("settings") == settings:
        return lora.read_lora(folder), manifest
    text_path = text.text_path_at(components, params.cache.precision)
    contexts = text_path.encode_prompts(prompts).float().cpu()
    negative = text_path.encode_prompts([params.sampler.negative_prompt]).float().cpu()
    latent_shape = components.latent_shape(params.gate.image_size)
    pool, pool_s = None, 0.0
    if regression:
        started = time.perf_counter()
        real = lora.fused(base, [(source.lora, 1.0)])
        pool = regression_pool(real, contexts, negative, latent_shape, params, t.regression_samples,
                               seed=params.run.seed + 7_000)
        del real
        pool_s = time.perf_counter() - started
    data = PromptBatches(contexts, negative, latent_shape, t.caption_dropout, params.run.seed, pool)
    cfg = transfer_config(t.fake_updates + 1, t.generator_steps, t.batch_size, t.lr, t.fake_lr, t.ema_decay,
                          params.sampler.guidance_scale, params.sampler.sigma_max, params.sampler.student_mid_times,
                          t.max_rollout, tuple(params.distill.p_d), t.regression_weight if regression else 0.0,
                          t.checkpoint_every, t.minutes * 60, params.run.seed)
    train_dir = folder.parent / f"{folder.name}-train"

    def log(record):
        train_dir.mkdir(parents=True, exist_ok=True)
        with open(train_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    transferred, distiller = run_transfer(base, source.lora, student, data, cfg, train_dir / "checkpoints",
                                          models.transformer_velocity, init, t.fake_rank, progress, log)
    state = distiller.state
    source_wall_s = (source.manifest or {}).get("wall_s")
    wall_s = state.wall_s + pool_s
    record = {"kind": "transfer", "settings": settings, "style_folder": str(style_folder), "prompts": len(prompts),
              "source": {"label": source.label, "kind": source.kind, "path": str(source.path) if source.path else None,
                         "lora_sha256": source.lora.digest(), "base_sha256": settings["base_sha256"],
                         "wall_s": source_wall_s, "steps": (source.manifest or {}).get("steps")},
              "student_sha256": settings["student_sha256"], "generator_steps": state.student_updates,
              "iterations": state.iteration, "finished": not distiller.paused, "wall_s": wall_s,
              "regression_pool_s": pool_s,
              "cost_vs_source": wall_s / source_wall_s if source_wall_s else None,
              "losses": {kind: [round(h[key], 6) for h in state.history if key in h]
                         for kind, key in (("dmd", "dmd"), ("critic", "critic"), ("regression", "regression"))}}
    if distiller.paused:
        return transferred, {**record, "parameters": transferred.num_parameters()}
    lora.save_lora(transferred, folder, record)
    return lora.read_lora(folder), lora.read_manifest(folder)


def transfer_job(params, way: str, init: Optional[str] = None, regression: Optional[bool] = None, components=None,
                 student: Optional[torch.nn.Module] = None, deturbo_adapter: Optional[lora.LoraWeights] = None
                 ) -> tuple[lora.LoraWeights, dict]:
    """`transfer_style_lora` of 06's `way` LoRA as a `jobs.run_jobs` job (a worker process loads the run's models)."""
    if components is None:
        components = models.load_components(params)
        student = distill.load_student(params, components, "rcm", params.distill.checkpoint)
        deturbo_adapter = deturbo.load_deturbo(params, components, student) if way == "deturbo" else None
    source = style_source(params, components, student, way, deturbo_adapter)
    return transfer_style_lora(params, components, student, source, deturbo_adapter, init=init, regression=regression,
                               progress=False)


# --- what 07_lora_transfer shows and checks -----------------------------------------------------------------------------

ROW_PREFIX = "student+transfer_"   # rows "student+transfer_<arm>@<k>"; 06's stacked rows keep their names
STYLE_TARGETS = {1: 0.80, 2: 0.90, 4: 0.95}   # issue 17: style vs teacher+L@T at 1 / 2 / 4 steps
CONTENT_TARGET = 0.95                          # content (nano: attribute_alignment) vs teacher+L@T's
COST_TARGET = 1.5                              # transfer wall time vs training L itself


def arm_label(source: str, flipped: Optional[str] = None, params=None) -> str:
    """'teacher', 'deturbo', and for an ablation of the first source the setting it flips: 'teacher_zeros' (init
    zeros instead of lora, or 'teacher_lora' the other way), 'teacher_regression' / 'teacher_no_regression'."""
    if flipped is None:
        return source
    t = params.lora_transfer
    if flipped == "init":
        return f"{source}_{flip_init(t.init)}"
    if flipped == "regression":
        return f"{source}_{'no_regression' if t.regression else 'regression'}"
    raise ValueError(f"ablation {flipped!r}: allowed {list(ABLATIONS)}")


def flip_init(init: str) -> str:
    return "zeros" if init == "lora" else "lora"


def with_second_time(params, second_time: float):
    """The run's parameters with the 2-step sampler's second TrigFlow time replaced (07's zero-cost arm); nothing
    else changes (the 1-step sampler has no second time, 4 steps keep the later ones)."""
    mid = [second_time, *params.sampler.student_mid_times[1:]]
    return dataclasses.replace(params, sampler=dataclasses.replace(params.sampler, student_mid_times=mid))


def transfer_table(rows: dict, reference_row: str, arms: dict[str, str], steps, names: dict) -> dict[str, dict]:
    """Per '<arm>@<k>' (arms: label -> row prefix, e.g. {"stacked": "student+lora_teacher", "teacher":
    "student+transfer_teacher"}): style and content relative to the reference teacher+L@T; diversity relative to
    student@k; the distance to the reference's other seeds. Leakage is leakage_table's (on unseen prompts only)."""
    style, content, diversity, distance = names["style"], names["content"], names["diversity"], names["distance"]
    ref = rows[reference_row]
    table = {}
    for arm, prefix in arms.items():
        for k in steps:
            row, bare = rows[f"{prefix}@{k}"], rows[f"student@{k}"]
            table[f"{arm}@{k}"] = {
                "style_ratio": row[style] / max(ref[style], 1e-9), "content_ratio": row[content] / max(ref[content], 1e-9),
                "diversity_ratio": row[diversity] / max(bare[diversity], 1e-9), distance: row[distance],
                **lora_survival.graded_style_ratio(row, ref, names)}
    return table


def unseen_prompts(gate_prompts: list[str], captions: list[str]) -> list[int]:
    """Indices of the gate prompts that are none of the style data's captions (the same prompt up to case, spacing
    and punctuation counts as seen): leakage is read on these only."""
    seen = {gate.normalized_prompt(c) for c in captions}
    return [i for i, p in enumerate(gate_prompts) if gate.normalized_prompt(p) not in seen]


def leakage_table(world, samples: dict, arms: dict[str, str], steps, names: dict, unseen: list[int],
                  source: Optional[tuple[str, str]] = None) -> dict[str, dict]:
    """Per '<arm>@<k>': the content change of the arm's row from the bare student@k on the unseen gate prompts only
    (world.on_prompts(unseen); samples: row -> images of the full gate set), the noise floor (half the bare row's
    content CI over those prompts: the check) and the paired 90% interval of the change (same prompt and noise per
    image: whether the change is there beyond sampling noise at all). A style must not cost content on prompts it
    was never shown.
    source = (reference row, bare teacher row), e.g. ("teacher+lora@20", "teacher@20"): one more entry, what L itself
    costs the teacher there — the content change a transfer that matches teacher+L inherits."""
    if not unseen:
        raise ValueError("leakage: every gate prompt is among the style data's captions; there is no unseen prompt "
                         "to measure leakage on (use more gate.n_prompts or other style captions)")
    content = names["content"]
    unseen_world, images = world.on_prompts(unseen)
    scored, per_image = {}, {}

    def change(row: str, bare_row: str) -> dict:
        for r in (row, bare_row):
            if r not in scored:
                per_image[r] = {}
                scored[r] = unseen_world.score_set(samples[r][images], per_image=per_image[r])
        low, high = scored[bare_row][f"{content}_ci"]
        paired = metrics.paired_difference(per_image[row][content], per_image[bare_row][content],
                                           unseen_world.gate.image_prompt)
        return {"content_change": scored[row][content] - scored[bare_row][content], "content_floor": (high - low) / 2,
                "paired_ci": [round(v, 4) for v in paired["ci"]], "prompts": len(unseen)}

    table = {f"{arm}@{k}": change(f"{prefix}@{k}", f"student@{k}") for k in steps for arm, prefix in arms.items()}
    if source is not None:
        table[f"{source[0]} vs {source[1]}"] = change(*source)
    return table


def judge(table: dict[str, dict], arm: str, steps, reference: list[Check], cost_ratio: Optional[float],
          generator_steps: dict[str, int], wanted_steps: int, leakage: dict[str, dict]) -> list[Check]:
    """07's checks on the transferred `arm` (the first source): style ≥ STYLE_TARGETS[k] × and content ≥ CONTENT_TARGET
    × teacher+L@T at every k; no leakage (content no lower than the bare student's beyond its noise floor: a style
    must not cost content; a gain is no leak; leakage: leakage_table's, on prompts the style data never had) and
    diversity ≥ lora_survival.DIVERSITY_TARGET × the bare student's; cost ≤ COST_TARGET × training L; every
    transfer trained its generator steps; the reference checks (lora_survival.reference_checks)."""
    out = list(reference)
    source_rows = [row for row in leakage if " vs " in row]   # leakage_table's source row: what L costs the teacher
    inherited = "".join(f"; {row}: {leakage[row]['content_change']:+.3f}, what a transfer matching teacher+L inherits"
                        for row in source_rows)
    trained = ", ".join(f"{a} {n}" for a, n in generator_steps.items())
    out.append(Check(f"every transfer trained its {wanted_steps} generator steps ({trained})",
                     all(n == wanted_steps for n in generator_steps.values())))
    for k in steps:
        e = table[f"{arm}@{k}"]
        out.append(Check(f"{arm}@{k}: style x{e['style_ratio']:.2f} of the reference (≥ {STYLE_TARGETS[k]})",
                         e["style_ratio"] >= STYLE_TARGETS[k]))
        if "graded_style_ratio" in e:  # the same target on the reading that does not saturate
            out.append(Check(f"{arm}@{k}: graded style x{e['graded_style_ratio']:.2f} of the reference (≥ "
                             f"{STYLE_TARGETS[k]})", e["graded_style_ratio"] >= STYLE_TARGETS[k]))
        out.append(Check(f"{arm}@{k}: content x{e['content_ratio']:.2f} of the reference (≥ {CONTENT_TARGET})",
                         e["content_ratio"] >= CONTENT_TARGET))
        leak = leakage[f"{arm}@{k}"]
        out.append(Check(f"{arm}@{k}: no leakage, content change {leak['content_change']:+.3f} from the bare student "
                         f"on {leak['prompts']} prompts the style data never had (a drop must stay within its noise "
                         f"floor {leak['content_floor']:.3f}{inherited})", leak["content_change"] >= -leak["content_floor"]))
        out.append(Check(f"{arm}@{k}: diversity x{e['diversity_ratio']:.2f} of the bare student's (≥ "
                         f"{lora_survival.DIVERSITY_TARGET}; DMD's mode seeking must not collapse it)",
                         e["diversity_ratio"] >= lora_survival.DIVERSITY_TARGET))
    out.append(Check(f"transfer cost x{cost_ratio:.2f} of training L (≤ {COST_TARGET})" if cost_ratio is not None
                     else "transfer cost: the source LoRA records no training time", cost_ratio is not None
                     and cost_ratio <= COST_TARGET))
    return out


def transfer_verdict(table: dict[str, dict], arms: list[str], steps, zero_cost: Optional[dict] = None,
                     costs: Optional[dict] = None) -> str:
    """One line: style / content ratios of every arm at each k and the best schedule of the zero-cost arm (zero_cost:
    second time -> style ratio at 2 steps)."""
    at = "/".join(map(str, steps))

    def cells(arm, key):
        return "/".join(f"{table[f'{arm}@{k}'][key]:.2f}" for k in steps)

    parts = [f"{arm}: style x{cells(arm, 'style_ratio')}"
             + (f" (graded x{cells(arm, 'graded_style_ratio')})" if "graded_style_ratio" in table[f"{arm}@{steps[0]}"]
                else "") + f", content x{cells(arm, 'content_ratio')}, diversity "
             f"x{cells(arm, 'diversity_ratio')}"
             + (f", cost x{costs[arm]:.2f}" if costs and costs.get(arm) is not None else "") for arm in arms]
    line = f"@{at} steps vs the reference — " + "; ".join(parts)
    if zero_cost:
        best = max(zero_cost, key=zero_cost.get)
        line += f"; zero-cost arm (2-step second time, untransferred L): best t={best:g}, style x{zero_cost[best]:.2f}"
    return line


# --- the CLI's ad hoc transfer (`anima lora transfer`) --------------------------------------------------------------------

REPORT_PROMPTS, REPORT_SEEDS = 16, 2   # the short report's gate subset


def transfer_report(params, components, student: torch.nn.Module, source: SourceLora,
                    deturbo_adapter: Optional[lora.LoraWeights] = None, progress: bool = True) -> dict:
    """Transfer `source` (or resume, or find it finished) and, once finished, score stacked L vs L' at the gate's step
    counts on a small gate subset against teacher+L@T; writes reports/<date>/<run>[-<tag>]/lora_transfer-<label>.md
    and .json. Returns {"folder", "manifest", "finished", and when finished "table", "verdict", "report"}."""
    transferred, manifest = transfer_style_lora(params, components, student, source, deturbo_adapter,
                                                progress=progress)
    folder = transfer_folder(params, manifest["settings"])
    out = {"folder": folder, "manifest": manifest, "finished": manifest["finished"]}
    if not manifest["finished"]:
        return out
    world = worlds.load_world(params).with_gate(min(REPORT_PROMPTS, params.gate.n_prompts), REPORT_SEEDS)
    names = lora_survival.SURVIVAL_METRICS[world.kind]
    base = source_base(source, components, student, deturbo_adapter)
    arms = {"student+lora": lora.fused(student, [(source.lora, params.lora.strength)]),
            "student+transfer": lora.fused(student, [(transferred, 1.0)])}
    steps = params.gate.student_steps
    rows, _ = lora_survival.styled_rows(params, components, world, lora.fused(base, [(source.lora, 1.0)]), student, arms,
                                        steps)
    table = transfer_table(rows, f"teacher+lora@{params.sampler.teacher_steps}",
                           {"stacked": "student+lora", "transferred": "student+transfer"}, steps, names)
    verdict = transfer_verdict(table, ["stacked", "transferred"], steps,
                               costs={"transferred": manifest["cost_vs_source"]})
    page = (f"# LoRA transfer: {source.label}\n\nsource `{source.path}` ({source.kind}, sha256 "
            f"{source.lora.digest()[:16]}...) -> `{folder}`\n\n{manifest['generator_steps']} generator steps in "
            f"{manifest['wall_s'] / 60:.1f} min; scored on {len(world.gate.prompts)} gate prompts x {REPORT_SEEDS} seeds "
            f"({world.kind} world)\n\n{report.markdown_table(table)}\n\n{verdict}\n")
    where = params.report_root() / datetime.date.today().isoformat() / params.report_name()
    atomic_write_text(where / f"lora_transfer-{source.label}.md", page)
    atomic_write_json(where / f"lora_transfer-{source.label}.json", {"source": manifest["source"], "folder": str(folder),
                                                                   "rows": rows, "table": table, "verdict": verdict})
    return {**out, "table": table, "verdict": verdict, "report": where / f"lora_transfer-{source.label}.md"}

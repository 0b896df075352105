"""Typed run parameters: presets in params/*.yaml, `--set section.key=value` overrides, validation before any compute.

Every error is a `ConfigError` whose message names the key, the file and what is allowed, e.g.
    params/nano.yaml: gate.student_steps = [3]: each entry must be one of [1, 2, 4]
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .nano_world.prompts import vocabulary  # the nano tokenizer's word list (models.nano_tokenizer); no torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = REPO_ROOT / "params"

STUDENT_STEPS = (1, 2, 4)  # one student serves exactly these step counts
DTYPES = ("float32", "bfloat16", "float16")
MODEL_PRESETS = ("nano", "anima-2b")
# Sanity ceilings shared by many keys: anything above is a typo, not a plan.
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_MINUTES = 7 * 24 * 60  # a week
MAX_LR = 1.0
NAME_CHARS = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # one plain path component: no '/', no '..', not hidden
# Keys of the training sections (distill, deturbo, lora, lora_transfer) that pace one invocation (time budget,
# checkpoint cadence) but never change what is learned, so no adapter/LoRA folder key includes them. Each trainer's
# set of keys left out of its folder key (deturbo.NOT_IN_ADAPTER_KEY, lora_survival.NOT_IN_LORA_KEY,
# lora_transfer.NOT_IN_TRANSFER_KEY) is these plus its section's own (eval rows, strengths, sources, ...).
BUDGET_KEYS = ("minutes", "checkpoint_every")
# Keys renamed in a preset, --set override or papermill parameter: the old name is refused with a message naming the
# new one (never silently mapped, never "unknown key"). Kept for one release after each rename, then dropped.
RENAMED_KEYS = {
    "distill.student_steps": "distill.student_updates",  # counts optimizer updates; gate.student_steps = sampler steps
}


class ConfigError(ValueError):
    """A parameter is unknown, mistyped or impossible; raised before any compute."""


def _spec(default=None, *, help: str, allowed=None, check=None, bounds=None, default_factory=None):
    """A field with its documentation, optional allowed values, predicate (value -> error or None) and, for numbers
    (or lists of numbers), the closed range [min, max] every value must lie in."""
    meta = {"help": help, "allowed": allowed, "check": check, "bounds": bounds}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _path_component(v, empty_ok=False):
    if v == "" and empty_ok:
        return None
    if len(v) > 100 or not NAME_CHARS.fullmatch(v):
        return ("must be one plain folder name of 1-100 letters, digits, '.', '_' or '-', not starting with '.' "
                "(no '/', no '..')" + (", or empty" if empty_ok else ""))
    return None


def _teacher_steps(v):
    return None if 1 <= v <= 1000 else "must be between 1 and 1000"


def _each_in(allowed):
    def check(values):
        bad = [x for x in values if x not in allowed]
        if bad:
            return f"each entry must be one of {list(allowed)} (got {bad})"
        if len(set(values)) != len(values) or not values:
            return "must be a non-empty list without repeats"
        return None
    return check


def _each_teacher_steps(values):
    if not values or any(not (1 <= x <= 1000) for x in values):
        return "must be a non-empty list of step counts between 1 and 1000"
    return None


def _trig_mid_times(values):
    if len(values) < max(STUDENT_STEPS) - 1:
        return f"needs at least {max(STUDENT_STEPS) - 1} TrigFlow times (one per extra student step)"
    if any(not (0 < t < 1.5707963) for t in values) or list(values) != sorted(values, reverse=True):
        return "must be decreasing TrigFlow times strictly inside (0, pi/2)"
    return None


INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's v0.2.0 release asset
CLIP_CHECKPOINT_FILE = "open_clip_pytorch_model.bin"  # what an open_clip ViT repo ships (or a .safetensors of it)


def _prompt_files(value):
    files = [value] if isinstance(value, str) else value
    if not files or any(not f.strip() for f in files):
        return "must be a JSONL file or a non-empty list of them"
    if len(set(files)) != len(files):
        return "must not list a file twice"
    return None


@dataclass
class RunParams:
    name: str = _spec("nano", help="run name: artifacts go to <output_dir>/<name>, reports to <report_dir>/<date>/<name>",
                      check=_path_component)
    tag: str = _spec("", help="label of an ad hoc run (e.g. 06 with another style folder or rank): its report goes "
                               "to <report_dir>/<date>/<name>-<tag>; artifacts are still read from <output_dir>/<name>",
                     check=lambda v: _path_component(v, empty_ok=True))
    output_dir: str = _spec("outputs", help="root folder for run artifacts (relative paths are from the repo root)")
    report_dir: str = _spec("reports", help="root folder for dated HTML reports")
    seed: int = _spec(0, help="master seed; every random draw derives from it", check=_non_negative,
                      bounds=(0, 2**32 - 1))
    device: str = _spec("cpu", help="torch device", allowed=("cpu", "cuda"))
    threads: int = _spec(0, help="torch CPU threads (0 = torch default)", check=_non_negative, bounds=(0, 1024))
    jobs: int = _spec(1, help="CPU runs: worker processes for a notebook's independent trainings (06's LoRA ways, "
                              "07's transfers), sharing run.threads; 1 = one after another in the notebook",
                      check=_positive, bounds=(1, 64))


@dataclass
class ModelParams:
    preset: str = _spec("nano", help="model family", allowed=MODEL_PRESETS)
    dtype: str = _spec("float32", help="weights and activations dtype for sampling", allowed=DTYPES)
    nano_weights: str = _spec(
        "shipped", help="nano preset: 'shipped' (the trained teacher in the repo, or the one 00_nano_teacher trained "
                        "when teacher.train is true), 'random' (random init from run.seed) or a weights folder")
    diffusers_dir: Optional[str] = _spec(
        None, help="anima-2b: local diffusers folder (Anima-Base-v1.0-Diffusers layout)")
    comfy_diffusion_model: Optional[str] = _spec(
        None, help="anima-2b: ComfyUI diffusion model .safetensors (DiT + llm_adapter)")
    comfy_text_encoder: Optional[str] = _spec(None, help="anima-2b: ComfyUI qwen_3_06b_base .safetensors")
    comfy_vae: Optional[str] = _spec(None, help="anima-2b: ComfyUI qwen_image_vae .safetensors")
    tokenizer_dir: Optional[str] = _spec(
        None, help="anima-2b with ComfyUI files: folder holding tokenizer/ (Qwen) and t5_tokenizer/ (T5)")


@dataclass
class SamplerParams:
    teacher_steps: int = _spec(20, help="teacher Euler steps", check=_teacher_steps, bounds=(1, 1000))
    shift: float = _spec(3.0, help="Anima sigma shift: s' = shift*s/(1+(shift-1)*s)", check=_positive,
                         bounds=(0, 100))
    guidance_scale: float = _spec(4.0, help="CFG on velocities: v_u + w*(v_c - v_u)", check=_non_negative,
                                  bounds=(0, 100))
    negative_prompt: str = _spec("", help="prompt used for the unconditional branch of CFG (nano: words of the nano "
                                          "vocabulary only)")
    sigma_max: float = _spec(80.0, help="student: EDM sigma of the first step (t0 = arctan sigma_max)", check=_positive,
                             bounds=(0, 1000))
    student_mid_times: list[float] = _spec(
        help="student: TrigFlow times of steps 2..4 (rCM paper list)", check=_trig_mid_times, bounds=(0, math.pi / 2),
        default_factory=lambda: [1.3, 1.0, 0.6])


@dataclass
class GateParams:
    teacher_steps: list[int] = _spec(
        help="teacher step counts sampled by the gate; must include sampler.teacher_steps (the reference row)", check=_each_teacher_steps,
        bounds=(1, 1000), default_factory=lambda: [1, 2, 4, 20])
    student_steps: list[int] = _spec(
        help="student step counts scored by the gate", check=_each_in(STUDENT_STEPS), bounds=(1, max(STUDENT_STEPS)),
        default_factory=lambda: list(STUDENT_STEPS))
    n_prompts: int = _spec(8, help="prompts in the gate set (nano: drawn from the creature sampler; a real preset: taken "
                                    "evenly spaced from gate.prompts_file, at most as many as the files hold)",
                           check=_positive, bounds=(1, 1_000_000))
    seeds_per_prompt: int = _spec(4, help="images per prompt (fixed seeds)", check=_positive, bounds=(1, 1000))
    strict_prompts: int = _spec(0, help="nano: prompts (x seeds_per_prompt) on which 05 decides the detail-strict "
                                        "targets (student vs teacher@T, @4 vs @1, 4-bit vs full precision); the set "
                                        "begins with the gate's own images, so only teacher@T and the students are "
                                        "sampled on the rest; 0 (or <= n_prompts): the gate set itself. Real "
                                        "presets: unused",
                                bounds=(0, 1_000_000))
    image_size: int = _spec(32, help="image side in pixels of every gate sample (nano 32, anima-2b 1024)",
                            check=lambda v: None if v % 16 == 0 and v > 0 else "must be a positive multiple of 16",
                            bounds=(16, 4096))
    batch_size: int = _spec(128, help="images sampled per batch (teacher and student rows); numbers do not depend on it",
                            check=_positive, bounds=(1, MAX_BATCH))
    reuse_samples: bool = _spec(False, help="store each teacher-sampler row (outputs/<run>/samples, sha256-checked) so "
                                            "later notebooks read it instead of sampling it again (nano: 03, 05 and 06 "
                                            "share teacher@T); off for 1024² images (≈12 MB each)")
    prompts_file: Optional[typing.Union[str, list[str]]] = _spec(
        None, help="real presets: the evaluation prompts, one JSONL file or a list of them (id, prompt, optional "
                   "category per line; ids unique across files; no prompt of cache.prompts_file); required when "
                   "model.preset is not nano; unused by nano (its gate draws creatures)",
        check=_prompt_files)
    inception_weights: Optional[str] = _spec(
        None, help=f"FID: local InceptionV3 weights of torch-fidelity ({INCEPTION_WEIGHTS_FILE}); required on a real "
                   f"preset; nano: unused")
    clip_model: str = _spec("ViT-B-32", help="CLIP score, diversity and style readers: open_clip model name of "
                                             "clip_checkpoint")
    clip_checkpoint: Optional[str] = _spec(
        None, help="CLIP readers: local open_clip checkpoint (.safetensors or .bin, e.g. open_clip_pytorch_model.bin) "
                   "for clip_model; required on a real preset; nano: unused")


@dataclass
class TeacherParams:
    train: bool = _spec(False, help="00_nano_teacher: retrain the nano teacher instead of loading the shipped one")
    minutes: float = _spec(60.0, help="time budget of one invocation: training pauses after a checkpoint (the "
                                      "notebook ends incomplete; rerun to resume); teacher.steps decides what is trained",
                           check=_positive, bounds=(0, MAX_MINUTES))
    steps: int = _spec(7_200, help="optimizer steps (what is trained; the time budget only pauses)", check=_positive,
                       bounds=(1, MAX_STEPS))
    batch_size: int = _spec(64, help="images per step", check=_positive, bounds=(1, MAX_BATCH))
    lr: float = _spec(4e-4, help="AdamW learning rate (after warm-up)", check=_positive, bounds=(0, MAX_LR))
    caption_dropout: float = _spec(0.1, help="fraction of empty-prompt examples (so CFG works)",
                                   check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)", bounds=(0, 1))
    jitter_seeds: int = _spec(16, help="renders per attribute combination in the training pool", check=_positive,
                              bounds=(1, 10_000))
    logit_std: float = _spec(1.4, help="training times s = sigmoid(N(logit_mean, logit_std)); wider reaches the ends",
                             check=_positive, bounds=(0, 10))
    logit_mean: float = _spec(0.0, help="centre of the logit-normal training times; below 0 favours low noise (detail)",
                              bounds=(-10, 10))
    init: str = _spec("scratch", help="'scratch' (random init from run.seed) or 'shipped' (fine-tune the shipped teacher)",
                      allowed=("scratch", "shipped"))


@dataclass
class CacheParams:
    n_prompts: int = _spec(512, help="nano: prompts drawn from the nano world (ignored when prompts_file is set)",
                           check=_positive, bounds=(1, 10_000_000))
    prompts_file: Optional[str] = _spec(None, help="JSONL with id, prompt and optional negative per line (the training "
                                                   "prompts; required on a real preset, else the nano sampler draws them)")
    shard_size: int = _spec(64, help="prompts per shard file", check=_positive, bounds=(1, 100_000))
    dtype: str = _spec("bfloat16", help="dtype of the stored trajectories", allowed=DTYPES)
    precision: str = _spec("q8_0", help="text-embedding precision the distillation reader yields",
                           allowed=("f16", "bf16", "q8_0"))


def _each_method(values):
    unknown = [v for v in values if v not in ("scm", "lcm")]
    if unknown:
        return f"each entry must be one of ['scm', 'lcm'] (got {unknown})"
    return "must not repeat a method" if len(set(values)) != len(values) else None


@dataclass
class DistillParams:
    student_updates: int = _spec(400, help="student optimizer updates of every method (rCM adds student_every-1 "
                                           "critic updates per student update)", check=_positive, bounds=(1, MAX_STEPS))
    minutes: float = _spec(20.0, help="time budget per method and invocation: training pauses after a checkpoint "
                                      "(the notebook ends incomplete; rerun to resume); distill.student_updates decides "
                                      "what is trained",
                           check=_positive, bounds=(0, MAX_MINUTES))
    batch_size: int = _spec(32, help="global batch (split across torchrun ranks)", check=_positive,
                            bounds=(1, MAX_BATCH))
    lr: float = _spec(1e-4, help="student AdamW learning rate, betas (0, 0.999), no clipping", check=_positive,
                      bounds=(0, MAX_LR))
    fake_lr: float = _spec(2e-5, help="fake-score (critic) learning rate; rCM uses 5x below the student's",
                           check=_positive, bounds=(0, MAX_LR))
    student_every: int = _spec(5, help="rCM: one student step every N iterations, the rest train the critic (F)",
                               check=_positive, bounds=(1, 1000))
    ema_decay: float = _spec(0.99, help="EMA of the student (what the gate scores)",
                             check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)", bounds=(0, 1))
    checkpoint_every: int = _spec(100, help="iterations between atomic checkpoints (and EMA snapshots)",
                                  check=_positive, bounds=(1, MAX_STEPS))
    scm_weight: float = _spec(100.0, help="weight of the sum-reduced sCM loss", check=_positive, bounds=(0, 1e6))
    dmd_weight: float = _spec(1.0, help="weight of the sum-reduced DMD loss (lambda = dmd/scm = 0.01); 0 = sCM only",
                              check=_non_negative, bounds=(0, 1e6))
    max_rollout: int = _spec(4, help="student rollouts of 1..N steps for DMD and the critic", check=_positive,
                             bounds=(1, 64))
    rollout_times: str = _spec("sampler", help="times of the DMD/critic rollouts: 'random' (t_n ~ p_D, rCM's draw) or "
                                              "'sampler' (sampler.student_mid_times, the times the student is "
                                              "served at, as DMD2's backward simulation does)",
                               allowed=("random", "sampler"))
    rollout_mid_times: Optional[list[float]] = _spec(
        None, help="rollout_times: sampler: the rollouts' TrigFlow times of steps 2..4; null: "
                   "sampler.student_mid_times (train where the student is served)", check=lambda v: None if v is None else _trig_mid_times(v),
        bounds=(0, math.pi / 2))
    tangent_warmup: int = _spec(0, help="H: student steps of tangent warm-up (0 as rCM for Cosmos)",
                                check=_non_negative, bounds=(0, MAX_STEPS))
    p_g: list[float] = _spec(help="sCM times: [mean, std] of log(tan t)", bounds=(-10, 10),
                             default_factory=lambda: [-0.8, 1.6])
    p_d: list[float] = _spec(help="DMD/critic times: [mean, std] of log(tan t)", bounds=(-10, 10),
                             default_factory=lambda: [0.0, 1.6])
    baselines: list[str] = _spec(help="also train these for the gate: 'scm' (rCM without DMD), 'lcm' (LCM-style)",
                                 check=_each_method, default_factory=lambda: ["scm", "lcm"])
    checkpoint: str = _spec("last", help="what 05_quality_gate scores: 'last' (the final EMA) or a path to an "
                                         "ema_<iteration>.safetensors snapshot of the rCM run")
    tangent: str = _spec("jvp", help="sCM time derivative of the student: 'jvp' (forward-mode AD, math attention) or "
                                     "'fd' (central finite difference: plain forwards, any attention kernel, FSDP)",
                         allowed=("jvp", "fd"))
    fd_delta: float = _spec(0.02, help="fd: TrigFlow time step of the central difference; its error grows like "
                                       "delta^2, bf16 rounding like 1/delta (nano DiT vs a float64 JVP: fp32 0.3-2% at "
                                       "0.02, best ~3e-4 at 1e-3; bf16 ~10% at 0.05, the better choice there)",
                            bounds=(1e-4, 0.1))
    parallel: str = _spec("ddp", help="under torchrun: 'ddp' (whole networks on every rank) or 'fsdp' (student and "
                                      "fake score sharded per transformer block with FSDP2, bf16 compute on CUDA; "
                                      "needs distill.tangent: fd)", allowed=("ddp", "fsdp"))
    activation_checkpointing: bool = _spec(False, help="recompute each transformer block in backward instead of "
                                                       "storing its activations (less memory, ~1/3 more compute)")
    grad_accumulation: int = _spec(1, help="passes per optimizer step, each over 1/N of a rank's rows (the losses "
                                           "are sums, so the step is the whole batch's): global batch = batch_size = "
                                           "ranks x rows per pass x N; must divide batch_size / ranks",
                                   check=_positive, bounds=(1, 1024))
    snapshot_every: int = _spec(0, help="iterations between ema_<iteration>.safetensors snapshots (0: with every "
                                        "checkpoint; a 2B snapshot is 7.8 GB)", bounds=(0, MAX_STEPS))
    keep_snapshots: int = _spec(0, help="keep only the newest N snapshots (0: all)", bounds=(0, 100_000))

    def __post_init__(self):
        if self.parallel == "fsdp" and self.tangent == "jvp":  # a cross-key rule: checked when the section is built
            raise ConfigError("distill.parallel = 'fsdp' cannot take distill.tangent = 'jvp' (forward-mode AD does not "
                              "pass through FSDP-sharded modules); set distill.tangent: fd")


REFINE_VALIDATION_FRACTION = 0.25   # of quant.refine_prompts: never trained on, they decide keep / discard


def refine_split(prompts: int) -> tuple[int, int]:
    """(prompts 04's refinement trains on, prompts it validates on) of `prompts`."""
    validation = max(1, round(prompts * REFINE_VALIDATION_FRACTION))
    return prompts - validation, validation


@dataclass
class QuantParams:
    bits: int = _spec(4, help="MLX-affine bits of the DiT's default layers", allowed=(3, 4, 8), bounds=(3, 8))
    group_size: int = _spec(32, help="MLX-affine group size (consecutive input features sharing a scale and bias)",
                            allowed=(32, 64, 128), bounds=(32, 128))
    method: str = _spec("awq_gptq", help="how codes and scales are chosen, all in the same MLX-affine file: 'minmax' "
                                       "(exactly mlx.core.quantize), 'rerround' (codes re-chosen with the stored "
                                       "scale/bias), 'search' (clip search + least-squares refit), 'awq' (activation-"
                                       "aware: scales folded into to_v/to_out, activation-weighted fit) or 'gptq' "
                                       "(error feedback through each layer's input Hessian) or 'awq_gptq' (awq's "
                                       "scales folded, then gptq); the calibrated ones use the student's own "
                                       "sampler inputs",
                        allowed=("minmax", "rerround", "search", "awq", "gptq", "awq_gptq"))
    sensitivity_threshold: float = _spec(
        0.999, help="a layer whose single-layer output cosine at the default format is below this goes to 8 bits",
        check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]", bounds=(0, 1))
    sensitivity: str = _spec("cosine", help="which layers go to 8 bits: 'cosine' (single-layer output cosine below "
                                            "sensitivity_threshold) or 'detail' (also each block role whose 4-bit "
                                            "alone drops the detail-strict reader's prompted-eyes probability on the "
                                            "student's 1/2/4-step images of held-out prompts by more than "
                                            "detail_threshold, within the 2.5 GB ledger; nano worlds only)",
                             allowed=("cosine", "detail"))
    detail_threshold: float = _spec(0.0, help="quant.sensitivity: detail: a role goes to 8 bits when the low end of "
                                               "the 90% interval of its eyes-probability drop (0-1) is above this",
                                    check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]", bounds=(0, 1))
    refine_updates: int = _spec(300, help="after the codes are chosen, Adam updates of every quantized layer's group "
                                          "scales and biases (codes frozen, same file) so the 4-bit student's 1/2/4-"
                                          "step samples match full precision's from the same noise (0: off)",
                                bounds=(0, 100_000))
    refine_lr: float = _spec(1e-3, help="refinement learning rate, in units of each group's own scale",
                             check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]", bounds=(0, 1))
    refine_prompts: int = _spec(128, help="held-out prompts (one noise each) the refinement fits (3/4) and validates "
                                          "on (1/4: kept only if their error went down)", bounds=(4, 100_000))
    refine_batch: int = _spec(16, help="prompts per refinement update", bounds=(1, 100_000))
    text_encoder: str = _spec("q8_0", help="text encoder format on the phone", allowed=("q8_0",))

    def __post_init__(self):
        trained, _ = refine_split(self.refine_prompts)
        if self.refine_batch > trained:
            raise ConfigError(f"quant.refine_batch = {self.refine_batch} is more than the {trained} prompts the "
                              f"refinement trains on (3/4 of quant.refine_prompts = {self.refine_prompts}); lower it "
                              f"or raise quant.refine_prompts")


def _fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _lora_rank(v):
    # a sanity range only: the model's own bound (its narrowest target layer) is checked when the adapter is built
    return None if 1 <= v <= 512 else "must be between 1 and 512 (a LoRA rank is a small positive integer)"


def _strengths(values):
    if not values or any(not (0 < v <= 4) for v in values) or len(set(values)) != len(values):
        return "must be a non-empty list of distinct strengths in (0, 4]"
    return None


@dataclass
class DeturboParams:
    rank: int = _spec(64, help="LoRA rank of the De-Turbo adapter A on the student's attention and MLP linears",
                      check=_lora_rank, bounds=(1, 512))
    alpha: float = _spec(64.0, help="LoRA alpha (scale = alpha / rank)", check=lambda v: None if 0 < v <= 4096
                         else "must be in (0, 4096]", bounds=(0, 4096))
    init: str = _spec("svd", help="'svd' (A starts as the rank-r SVD of teacher - student weights on its targets) "
                                  "or 'zeros' (peft's default: A starts as no change)", allowed=("svd", "zeros"))
    steps: int = _spec(1500, help="optimizer steps", check=_positive, bounds=(1, MAX_STEPS))
    minutes: float = _spec(8.0, help="time budget of one invocation: training pauses after a checkpoint (rerun to "
                                      "resume); deturbo.steps decides what is trained", check=_positive, bounds=(0, MAX_MINUTES))
    batch_size: int = _spec(32, help="examples per step", check=_positive, bounds=(1, MAX_BATCH))
    lr: float = _spec(5e-4, help="AdamW learning rate of the adapter", check=_positive, bounds=(0, MAX_LR))
    caption_dropout: float = _spec(0.15, help="fraction of examples whose context (and target) is the negative "
                                              "prompt's, so CFG works on student+A", check=_fraction, bounds=(0, 1))
    student_fraction: float = _spec(0.25, help="fraction of each batch from the student's own 4-step samples (the "
                                               "rest: the cache's teacher latents)", check=_fraction, bounds=(0, 1))
    uniform_fraction: float = _spec(0.1, help="fraction of training times drawn uniformly (coverage of the ends)",
                                    check=_fraction, bounds=(0, 1))
    student_samples: int = _spec(512, help="4-step student samples drawn once on the cache prompts for the mix",
                                 check=_positive, bounds=(1, 1_000_000))
    checkpoint_every: int = _spec(100, help="steps between atomic checkpoints", check=_positive,
                                  bounds=(1, MAX_STEPS))
    eval_rows: int = _spec(128, help="03: held-out cache rows of the per-time velocity error table (each costs "
                                     "20 x 4 DiT calls; rows repeat when the cache holds fewer prompts)",
                           check=_positive, bounds=(1, 100_000))


@dataclass
class LoraParams:
    style_folder: Optional[str] = _spec(
        None, help="style data: a folder of images with same-name .txt captions; null = the nano renderer's style mode "
                   "written to outputs/<run>/style_data")
    style_images: int = _spec(256, help="nano style data: images rendered in 'our style' (prompts x 2 jitter seeds)",
                              check=_positive, bounds=(1, 1_000_000))
    ways: list[str] = _spec(help="which LoRAs 06 trains: 'teacher' (on the teacher), 'deturbo' (on student+A), "
                                 "'student' (directly on the student)", check=_each_in(("teacher", "deturbo", "student")),
                            default_factory=lambda: ["teacher", "deturbo", "student"])
    rank: int = _spec(8, help="style LoRA rank", check=_lora_rank, bounds=(1, 512))
    alpha: float = _spec(8.0, help="style LoRA alpha (scale = alpha / rank)",
                         check=lambda v: None if 0 < v <= 4096 else "must be in (0, 4096]", bounds=(0, 4096))
    steps: int = _spec(600, help="optimizer steps per LoRA (each way gets the same)", check=_positive,
                       bounds=(1, MAX_STEPS))
    minutes: float = _spec(5.0, help="time budget per LoRA and invocation: training pauses after a checkpoint "
                                      "(rerun to resume); lora.steps decides what is trained", check=_positive,
                           bounds=(0, MAX_MINUTES))
    batch_size: int = _spec(32, help="images per step", check=_positive, bounds=(1, MAX_BATCH))
    lr: float = _spec(1e-3, help="AdamW learning rate", check=_positive, bounds=(0, MAX_LR))
    caption_dropout: float = _spec(0.1, help="fraction of empty-prompt examples (CFG on the teacher+LoRA)",
                                   check=_fraction, bounds=(0, 1))
    strength: float = _spec(1.0, help="LoRA strength of the main comparison rows", check=lambda v: _strengths([v]),
                            bounds=(0, 4))
    strengths: list[float] = _spec(help="the strength sweep of 06", check=_strengths, bounds=(0, 4),
                                   default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    checkpoint_every: int = _spec(100, help="steps between atomic checkpoints", check=_positive,
                                  bounds=(1, MAX_STEPS))


def _subset_of(allowed):
    def check(values):
        bad = [x for x in values if x not in allowed]
        if bad:
            return f"each entry must be one of {list(allowed)} (got {bad})"
        return "must not repeat an entry" if len(set(values)) != len(values) else None
    return check


def _second_times(values):
    if not values or any(not (0 < t < 1.5707963) for t in values) or len(set(values)) != len(values):
        return "must be a non-empty list of distinct TrigFlow times strictly inside (0, pi/2)"
    return None


@dataclass
class LoraTransferParams:
    sources: list[str] = _spec(help="which of 06's LoRAs 07 transfers to the student: 'teacher' (trained on the "
                                    "teacher), 'deturbo' (trained on student+A)", check=_each_in(("teacher", "deturbo")),
                               default_factory=lambda: ["teacher", "deturbo"])
    init: str = _spec("lora", help="L' starts as the source LoRA ('lora') or as no change ('zeros')",
                      allowed=("lora", "zeros"))
    ablations: list[str] = _spec(help="extra transfers of the first source, each with one setting flipped: 'init' "
                                      "(lora <-> zeros), 'regression' (on <-> off); [] for none",
                                 check=_subset_of(("init", "regression")), default_factory=lambda: ["init", "regression"])
    generator_steps: int = _spec(200, help="optimizer steps of L' (each after fake_updates fake-score steps); decides "
                                           "what is trained", check=_positive, bounds=(1, MAX_STEPS))
    fake_updates: int = _spec(4, help="fake-score LoRA updates per L' update (rCM's F - 1)", check=_positive,
                              bounds=(1, 100))
    minutes: float = _spec(30.0, help="time budget per transfer and invocation: training pauses after a checkpoint "
                                      "(rerun to resume); generator_steps decides what is trained", check=_positive,
                           bounds=(0, MAX_MINUTES))
    batch_size: int = _spec(32, help="prompts per step", check=_positive, bounds=(1, MAX_BATCH))
    lr: float = _spec(1e-3, help="AdamW learning rate of L'", check=_positive, bounds=(0, MAX_LR))
    fake_lr: float = _spec(1e-3, help="AdamW learning rate of the fake-score LoRA", check=_positive,
                           bounds=(0, MAX_LR))
    fake_rank: int = _spec(16, help="rank (= alpha) of the fake-score LoRA on teacher+L", check=_lora_rank,
                           bounds=(1, 512))
    ema_decay: float = _spec(0.95, help="EMA of L' (what is saved)",
                             check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)", bounds=(0, 1))
    max_rollout: int = _spec(4, help="generator rollouts of 1..N steps at the student sampler's times (gradient "
                                     "through the last step only)", check=_positive, bounds=(1, 4))
    caption_dropout: float = _spec(0.1, help="fraction of prompts replaced by the negative prompt (keeps the "
                                             "unconditional branch styled, so CFG stays meaningful)",
                                   check=_fraction, bounds=(0, 1))
    generic_prompts: int = _spec(128, help="generic prompts beside the style captions (nano: creatures of their own "
                                           "draw; a real preset: cache prompts)", check=_non_negative,
                                 bounds=(0, 1_000_000))
    regression: bool = _spec(False, help="add the regression of L''s 1-step output onto teacher+L samples from the "
                                         "same noise (cached once)")
    regression_weight: float = _spec(0.1, help="weight of the sum-reduced regression term (DMD's weight is 1; on the "
                                               "2-D toy 0.1 helped at 1 step, 1.0 hurt)",
                                     check=_positive, bounds=(0, 1e6))
    regression_samples: int = _spec(256, help="teacher+L samples made once for the regression",
                                    check=_positive, bounds=(1, 1_000_000))
    second_times: list[float] = _spec(help="07's zero-cost arm: 2-step sampler second times swept with the "
                                           "untransferred LoRA", check=_second_times, bounds=(0, math.pi / 2),
                                      default_factory=lambda: [1.3, 1.0, 0.8, 0.6])
    checkpoint_every: int = _spec(100, help="iterations (L' and fake-score steps) between atomic checkpoints",
                                  check=_positive, bounds=(1, MAX_STEPS))


@dataclass
class Params:
    run: RunParams = field(default_factory=RunParams)
    model: ModelParams = field(default_factory=ModelParams)
    sampler: SamplerParams = field(default_factory=SamplerParams)
    gate: GateParams = field(default_factory=GateParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    cache: CacheParams = field(default_factory=CacheParams)
    distill: DistillParams = field(default_factory=DistillParams)
    quant: QuantParams = field(default_factory=QuantParams)
    deturbo: DeturboParams = field(default_factory=DeturboParams)
    lora: LoraParams = field(default_factory=LoraParams)
    lora_transfer: LoraTransferParams = field(default_factory=LoraTransferParams)
    source: str = "<defaults>"  # the file the values came from, for messages

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "source"}

    # Resolved locations, relative paths taken from the repo root so notebooks and the CLI agree.
    def output_path(self) -> Path:
        return resolve_path(self.run.output_dir) / self.run.name

    def report_root(self) -> Path:
        return resolve_path(self.run.report_dir)

    def report_name(self) -> str:
        return f"{self.run.name}-{self.run.tag}" if self.run.tag else self.run.name


def resolve_path(p: str) -> Path:
    """A path parameter as a path: `~` expanded, a relative path taken from the repository root."""
    path = Path(os.path.expanduser(p))
    return path if path.is_absolute() else REPO_ROOT / path


SECTIONS = {f.name: f.type for f in dataclasses.fields(Params) if f.name != "source"}
_SECTION_CLASSES = {"run": RunParams, "model": ModelParams, "sampler": SamplerParams, "gate": GateParams,
                    "teacher": TeacherParams, "cache": CacheParams, "distill": DistillParams,
                    "quant": QuantParams, "deturbo": DeturboParams, "lora": LoraParams,
                    "lora_transfer": LoraTransferParams}


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    return "null" if annotation is type(None) else annotation.__name__


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4, 1E5 and 2.5e3 as floats (YAML 1.1 wants a dot and a signed exponent)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def _check_duplicates(node, where: str, prefix: str = "") -> None:
    """PyYAML keeps the last of two equal keys silently; a repeated key is almost always an editing mistake."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            if key in seen:
                raise ConfigError(f"{where}: line {key_node.start_mark.line + 1}: duplicate key {key}; "
                                  f"each key may appear once")
            seen.add(key)
            _check_duplicates(value_node, where, f"{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(item, where, prefix)


def _yaml_load(text: str, where: str) -> Any:
    """YAML with scientific-notation floats and no duplicate keys; errors are one-line ConfigErrors naming `where`."""
    try:
        loader = _Loader(text)  # its reader already rejects control characters
        node = loader.get_single_node()
        _check_duplicates(node, where)
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line for the CLI's one-line error
        raise ConfigError(f"{where}: not valid YAML: {problem}{at}") from None


def _numbers(value) -> list:
    """The numeric entries of a value (itself, or the items of a list), for the finiteness and range checks."""
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _build_section(name: str, raw: Any, source: str):
    cls = _SECTION_CLASSES[name]
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {name} must be a mapping of keys (got {type(raw).__name__})")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{name}.{key}" in RENAMED_KEYS:
            raise ConfigError(f"{source}: {name}.{key} is now {RENAMED_KEYS[f'{name}.{key}']} (renamed; update your "
                              f"preset or --set)")
        if key not in known:
            raise ConfigError(f"{source}: unknown key {name}.{key}; allowed keys in '{name}': {sorted(known)}")
    values = {}
    for key, value in raw.items():
        annotation, meta = hints[key], known[key].metadata
        if not _type_ok(value, annotation):
            raise ConfigError(f"{source}: {name}.{key} = {value!r} has type {type(value).__name__}; "
                              f"expected {_type_name(annotation)} ({meta['help']})")
        if isinstance(annotation, type) and annotation is float:
            value = float(value)
        if typing.get_origin(annotation) is list and typing.get_args(annotation)[0] is float:
            value = [float(v) for v in value]
        if any(not math.isfinite(v) for v in _numbers(value)):  # .inf/.nan would pass every comparison-based check
            raise ConfigError(f"{source}: {name}.{key} = {value!r} must be finite (no .inf or .nan) ({meta['help']})")
        if meta.get("allowed") is not None and value not in meta["allowed"]:
            raise ConfigError(f"{source}: {name}.{key} = {value!r} is not allowed; allowed: {list(meta['allowed'])}")
        if meta.get("check") is not None and value is not None:
            problem = meta["check"](value)
            if problem:
                raise ConfigError(f"{source}: {name}.{key} = {value!r} {problem} ({meta['help']})")
        if meta.get("bounds") is not None and value is not None:
            low, high = meta["bounds"]
            if any(not (low <= v <= high) for v in _numbers(value)):
                each = "each entry " if isinstance(value, list) else ""
                raise ConfigError(f"{source}: {name}.{key} = {value!r}: {each}must be between {low} and {high} "
                                  f"({meta['help']})")
        values[key] = value
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'distill.steps=200' -> (['distill', 'steps'], 200); the value is read as YAML (numbers, lists, null, strings)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, _, raw_value = text.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"--set {text!r}: the key must be section.key (sections: {sorted(SECTIONS)})")
    value = _yaml_load(raw_value, f"--set {text!r}") if raw_value.strip() else ""
    return path, value


def resolve_preset(preset: str | os.PathLike) -> Path:
    """A preset name ('nano') or a path to a YAML file."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PARAMS_DIR / f"{preset}.yaml"
    elif not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        names = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ConfigError(f"preset {str(preset)!r}: no such file {path}; presets: {names} or a path to a .yaml")
    return path


def load_config(preset: str | os.PathLike = "nano", overrides: list[str] | dict | None = None,
                check_paths: bool = True) -> Params:
    """Read a preset, apply overrides, validate types, values, checkpoint paths and the output folder."""
    path = resolve_preset(preset)
    source = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read ({exc.strerror})") from None
    raw = _yaml_load(text, source)
    if raw is None or raw == {}:  # code defaults differ from every preset: an empty file would silently run them
        raise ConfigError(f"{source}: the file is empty (no sections); start from a preset: copy params/nano.yaml "
                          f"and edit it, or use a preset with --set section.key=value overrides")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections {sorted(SECTIONS)}")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; allowed sections: {sorted(SECTIONS)}")
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in (overrides or [])]
    for key_path, value in items:
        if isinstance(key_path, str):
            key_path = key_path.split(".")
        section, key = key_path
        if section not in SECTIONS:
            raise ConfigError(f"--set {'.'.join(key_path)}: unknown section {section!r}; allowed: {sorted(SECTIONS)}")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: {section} must be a mapping")
        raw[section][key] = value
        source_note = " (with --set overrides)"
        if not source.endswith(source_note):
            source += source_note
    params = Params(**{name: _build_section(name, raw.get(name, {}), source) for name in SECTIONS}, source=source)
    if params.cache.prompts_file is not None and not resolve_path(params.cache.prompts_file).is_file():
        raise ConfigError(f"{source}: cache.prompts_file = {params.cache.prompts_file!r}: no such file")
    for key in ("p_g", "p_d"):
        value = getattr(params.distill, key)
        if len(value) != 2 or value[1] <= 0:
            raise ConfigError(f"{source}: distill.{key} = {value} must be [mean, std] with std > 0")
    if params.distill.checkpoint != "last" and not resolve_path(params.distill.checkpoint).is_file():
        raise ConfigError(f"{source}: distill.checkpoint = {params.distill.checkpoint!r}: no such file (use 'last' or "
                          f"an ema_<iteration>.safetensors written by 02_distill)")
    if params.model.preset == "nano":
        _check_nano_negative_prompt(params)
    elif params.quant.sensitivity == "detail":  # the detail-strict reader reads nano creatures only
        raise ConfigError(f"{source}: quant.sensitivity = 'detail' needs the nano world's detail-strict reader; with "
                          f"model.preset = {params.model.preset!r} use quant.sensitivity: cosine")
    if params.sampler.teacher_steps not in params.gate.teacher_steps:
        raise ConfigError(f"{source}: gate.teacher_steps = {params.gate.teacher_steps} must include "
                          f"sampler.teacher_steps = {params.sampler.teacher_steps} (the gate's reference row)")
    for path in gate_prompt_files(params):
        if not path.is_file():
            raise ConfigError(f"{source}: gate.prompts_file: {str(path)!r}: no such file")
    if check_paths:
        _check_model_paths(params)
        _check_evaluation_world(params)
        _check_writable(params)
    if params.run.device == "cuda":
        import torch  # only here: validating a CPU preset stays instant
        if not torch.cuda.is_available():
            raise ConfigError(f"{source}: run.device = 'cuda' but this machine has no CUDA device; use cpu")
    return params


def gate_prompt_files(params) -> list[Path]:
    """gate.prompts_file as a list of resolved paths (one file or a list of them; none on nano presets)."""
    value = params.gate.prompts_file
    return [resolve_path(f) for f in ([value] if isinstance(value, str) else value or [])]


def _check_evaluation_world(p: Params) -> None:
    """Paths of the evaluation world. A real preset scores with its own prompts and readers from local weights,
    required here, before any compute: nothing falls back to the nano world's creatures or probe, and no metric is
    quietly "not computed"."""
    src, g = p.source, p.gate
    if p.model.preset != "nano":
        real = f"model.preset = {p.model.preset!r}"
        if p.cache.prompts_file is None:
            raise ConfigError(f"{src}: cache.prompts_file is required with {real} (the training prompts, a JSONL of id "
                              f"and prompt; without it the cache would draw nano creature prompts), e.g. "
                              f"params/prompts/train.jsonl")
        if g.prompts_file is None:
            raise ConfigError(f"{src}: gate.prompts_file is required with {real} (the evaluation prompts, one JSONL or a "
                              f"list, disjoint from cache.prompts_file; the nano gate would draw creatures), e.g. "
                              f"[params/prompts/eval_geneval_style.jsonl, params/prompts/eval_studio.jsonl]")
        expected = {"gate.inception_weights": f"torch-fidelity's InceptionV3 weights, {INCEPTION_WEIGHTS_FILE}",
                    "gate.clip_checkpoint": f"an open_clip checkpoint of gate.clip_model = {g.clip_model!r}, e.g. "
                                            f"{CLIP_CHECKPOINT_FILE}"}
        missing = [f"{key} ({what})" for key, what in expected.items() if getattr(g, key.split(".")[1]) is None]
        if missing:
            raise ConfigError(f"{src}: {real} scores the gate with FID and CLIP readers from local weights; set "
                              f"{' and '.join(missing)}; nothing is downloaded")
        held = sum(sum(1 for line in path.read_bytes().split(b"\n") if line.strip()) for path in gate_prompt_files(p))
        if g.n_prompts > held:
            raise ConfigError(f"{src}: gate.n_prompts = {g.n_prompts} but gate.prompts_file holds {held} prompts; "
                              f"use at most {held} (or add prompts)")
    for key, name in (("inception_weights", INCEPTION_WEIGHTS_FILE), ("clip_checkpoint", CLIP_CHECKPOINT_FILE)):
        value = getattr(g, key)
        if value is not None and not resolve_path(value).is_file():
            raise ConfigError(f"{src}: gate.{key} = {value!r}: no such file (expected a local {name}; nothing is "
                              f"downloaded)")
    if p.lora.style_folder is not None and not resolve_path(p.lora.style_folder).is_dir():
        raise ConfigError(f"{src}: lora.style_folder = {p.lora.style_folder!r}: no such folder (a folder of "
                          f"images with same-name .txt captions, or null for the nano renderer's style mode)")


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _check_nano_negative_prompt(p: Params) -> None:
    """The nano tokenizer is word-level over a closed vocabulary: say so now, not after loading the models."""
    allowed = vocabulary()
    unknown = sorted({w for w in p.sampler.negative_prompt.split() if w not in allowed})
    if unknown:
        raise ConfigError(f"{p.source}: sampler.negative_prompt = {p.sampler.negative_prompt!r}: words outside the nano "
                          f"vocabulary {unknown}; allowed words: {allowed} (or empty)")


def _check_model_paths(p: Params) -> None:
    m, src = p.model, p.source
    if m.preset == "nano":
        if m.nano_weights not in ("shipped", "random") and not resolve_path(m.nano_weights).is_dir():
            raise ConfigError(f"{src}: model.nano_weights = {m.nano_weights!r}: no such folder "
                              f"(allowed: 'shipped', 'random' or a weights folder)")
        return
    comfy = {"model.comfy_diffusion_model": m.comfy_diffusion_model, "model.comfy_text_encoder": m.comfy_text_encoder,
             "model.comfy_vae": m.comfy_vae, "model.tokenizer_dir": m.tokenizer_dir}
    if m.diffusers_dir is None and all(v is None for v in comfy.values()):
        raise ConfigError(f"{src}: model.preset = 'anima-2b' needs local checkpoint paths: set model.diffusers_dir "
                          f"(Anima-Base-v1.0-Diffusers folder) or all of {sorted(comfy)}; nothing is downloaded")
    if m.diffusers_dir is not None:
        if not resolve_path(m.diffusers_dir).is_dir():
            raise ConfigError(f"{src}: model.diffusers_dir = {m.diffusers_dir!r}: no such folder")
        return
    for key, value in comfy.items():
        if value is None:
            raise ConfigError(f"{src}: {key} is missing; ComfyUI split files need all of {sorted(comfy)}")
        exists = resolve_path(value).is_dir() if key == "model.tokenizer_dir" else resolve_path(value).is_file()
        if not exists:
            raise ConfigError(f"{src}: {key} = {value!r}: no such {'folder' if key.endswith('dir') else 'file'}")


def _check_writable(p: Params) -> None:
    """Validation creates nothing: the folder, or its nearest existing ancestor, must be a writable directory."""
    for key, folder in (("run.output_dir", resolve_path(p.run.output_dir)),
                        ("run.report_dir", resolve_path(p.run.report_dir))):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            problem = f"{existing} is not a folder"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"no write permission on {existing}"
        else:
            continue
        raise ConfigError(f"{p.source}: {key} = {str(folder)!r} is not writable ({problem})")


def describe() -> str:
    """Every parameter with its default and help, for README and `anima params`."""
    lines = []
    for name, cls in _SECTION_CLASSES.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = f" (allowed: {list(f.metadata['allowed'])})" if f.metadata.get("allowed") else ""
            if f.metadata.get("bounds") and not allowed:
                allowed = " (range: {} .. {})".format(*f.metadata["bounds"])
            lines.append(f"  {f.name}: {default!r}  # {f.metadata['help']}{allowed}")
    return "\n".join(lines)

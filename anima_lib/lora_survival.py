"""06's experiment: style data, the three ways of getting a style LoRA onto the few-step student, and the survival
table, verdict and checks.

Style data is a folder of images with same-name .txt captions (what LoRA trainers use), checked up front; the nano
preset writes one from the renderer's style mode. `train_style_lora(params, components, way, student)` trains (or
finds finished) one way's LoRA in outputs/<run>/lora/style-<key>/<way> with the flow-matching LoRA trainer of
anima_lib.lora; `survival_table` / `survival_verdict` / `judge` turn 06's rows into ratios, one line and checks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import distill, gate, models, text
from .distill import deturbo
from .checks import Check
from .config import BUDGET_KEYS, resolve_path
from .io import atomic_replace_dir, sha256_file
from .lora import (LoraWeights, adapter_training_config, read_lora, read_manifest, save_lora, style_batches,
                   train_lora)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class StyleDataError(ValueError):
    """A style folder with unreadable images, missing or bad captions, or images of the wrong size."""


# --- style data --------------------------------------------------------------------------------------------------------

def _list_problems(problems: list[str], folder: Path) -> str:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{folder}: {len(problems)} problem(s) in the style folder:\n  {shown}{more}"


def validate_style_folder(folder, image_size: int, check_caption: Optional[Callable[[str], Optional[str]]] = None
                          ) -> list[tuple[Path, str]]:
    """[(image path, caption)] of a style folder, or StyleDataError listing every problem at once: unreadable images,
    missing or empty captions, sizes other than image_size², captions `check_caption` rejects, captions without images."""
    from PIL import Image
    folder = Path(folder)
    if not folder.is_dir():
        raise StyleDataError(f"{folder}: no such style folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise StyleDataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) with same-name .txt captions")
    problems, items = [], []
    for path in images:
        caption_path = path.with_suffix(".txt")
        try:
            with Image.open(path) as img:
                img.load()
                size = img.size
        except Exception as exc:  # PIL raises many kinds for a broken file; all mean "unreadable"
            problems.append(f"{path.name}: unreadable image ({type(exc).__name__})")
            continue
        if size != (image_size, image_size):
            problems.append(f"{path.name}: size {size[0]}x{size[1]}, expected {image_size}x{image_size}")
        if not caption_path.is_file():
            problems.append(f"{path.name}: missing caption {caption_path.name}")
            continue
        caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            problems.append(f"{caption_path.name}: empty caption")
            continue
        problem = check_caption(caption) if check_caption is not None else None
        if problem:
            problems.append(f"{caption_path.name}: {problem}")
        items.append((path, caption))
    stems = {p.stem for p in images}
    problems += [f"{t.name}: caption without an image" for t in sorted(folder.glob("*.txt")) if t.stem not in stems]
    if problems:
        raise StyleDataError(_list_problems(problems, folder))
    return items


def load_style_folder(folder, image_size: int, check_caption=None) -> tuple[torch.Tensor, list[str]]:
    """uint8 images [N, 3, H, W] (RGB) and their captions, after validate_style_folder."""
    from PIL import Image
    items = validate_style_folder(folder, image_size, check_caption)
    images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p, _ in items]
    return torch.stack(images), [caption for _, caption in items]


def folder_digest(folder) -> str:
    """sha256 over the style folder's file names and bytes (identifies the dataset a LoRA was trained on)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            h.update(path.name.encode())
            h.update(sha256_file(path).encode())
    return h.hexdigest()


def write_nano_style_folder(folder, n_images: int, seed: int, image_size: int = 32) -> Path:
    """The nano style dataset: creatures rendered in "our style" (n_images // 2 prompts x 2 jitter seeds) as PNG +
    caption files; written atomically, kept when already complete with the same settings."""
    from PIL import Image
    from .nano_world.prompts import sample_creatures
    from .nano_world.renderer import render
    folder = Path(folder)
    settings = {"n_images": n_images, "seed": seed, "image_size": image_size}
    if (folder / "dataset.json").is_file() and json.loads((folder / "dataset.json").read_text()) == settings:
        return folder
    staging = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    creatures = sample_creatures(max(1, n_images // 2), seed=seed)
    for i in range(n_images):
        creature = creatures[i // 2]
        Image.fromarray(render(creature, seed=10_000 + i, size=image_size, style=True)).save(staging / f"{i:05d}.png")
        (staging / f"{i:05d}.txt").write_text(creature.prompt() + "\n")
    (staging / "dataset.json").write_text(json.dumps(settings))
    return atomic_replace_dir(staging, folder)


# --- what 06_lora_survival and the CLI call ----------------------------------------------------------------------------

WAYS = {"teacher": "trained on the teacher, applied to the student",
        "deturbo": "trained on student + De-Turbo adapter, applied to the student without it",
        "student": "trained directly on the student (the collapse baseline)"}
WAY_ROWS = {"teacher": "student+lora_teacher", "deturbo": "student+lora_deturbo", "student": "student+lora_student"}
NOT_IN_LORA_KEY = BUDGET_KEYS + ("strength", "strengths", "ways")  # lora.* keys that do not change what a LoRA learns


def nano_caption_check(components) -> Optional[Callable[[str], Optional[str]]]:
    if components.preset != "nano":
        return None
    vocab = components.tokenizer.get_vocab()

    def check(caption: str) -> Optional[str]:
        unknown = sorted({w for w in caption.split() if w not in vocab})
        return f"words outside the nano vocabulary {unknown}" if unknown else None
    return check


def style_folder(params) -> Path:
    """The style data of this run: lora.style_folder, or (nano presets only) the nano renderer's style mode written
    under outputs/<run>. A real preset without lora.style_folder is a StyleDataError naming the key: renders of nano
    creatures are no style for a real model."""
    if params.lora.style_folder:
        return resolve_path(params.lora.style_folder)
    if params.model.preset != "nano":
        raise StyleDataError(f"lora.style_folder is required with model.preset = {params.model.preset!r}: a folder "
                             f"of the studio's style images ({params.gate.image_size}x{params.gate.image_size}, PNG/"
                             f"JPEG) with same-name .txt captions (the nano renderer's style mode is not a style for a "
                             f"real model)")
    return write_nano_style_folder(params.output_path() / "style_data" / "nano", params.lora.style_images,
                                   seed=params.run.seed + 3_000, image_size=params.gate.image_size)


def load_style_data(params, components) -> tuple[torch.Tensor, list[str], Path]:
    """Images, captions and folder of the style data, validated before any training (errors list every problem)."""
    folder = style_folder(params)
    try:
        images, captions = load_style_folder(folder, params.gate.image_size, nano_caption_check(components))
    except StyleDataError as exc:
        hint = ""
        if components.preset == "nano" and "vocabulary" in str(exc):
            hint = f"\nnano vocabulary: {sorted(w for w in components.tokenizer.get_vocab() if not w.startswith('['))}"
        raise StyleDataError(f"{exc}{hint}\n(lora.style_folder: a folder of {params.gate.image_size}x"
                             f"{params.gate.image_size} images with same-name .txt captions)") from None
    return images, captions, folder


def train_style_lora(params, components, way: str, student: torch.nn.Module,
                     deturbo_adapter: Optional[LoraWeights] = None, progress: bool = True) -> tuple[LoraWeights, dict]:
    """One style LoRA of 06 (`way` in WAYS), trained or found finished in outputs/<run>/lora/style-<key>/<way>
    (`deturbo-<adapter digest>` for the De-Turbo way).

    The key hashes everything that changes what the LoRA learns (data, base weights, adapter, rank, steps, ...), so
    an ad hoc run with other settings trains its own LoRAs next to the default ones.
    """
    if way not in WAYS:
        raise ValueError(f"way {way!r}: allowed {list(WAYS)}")
    if way == "deturbo" and deturbo_adapter is None:
        raise ValueError("way 'deturbo' needs the De-Turbo adapter (03_deturbo)")
    images, captions, folder = load_style_data(params, components)
    base = components.transformer if way == "teacher" else student
    frozen = ((deturbo_adapter, 1.0),) if way == "deturbo" else ()
    settings = {"way": way, "base_sha256": models.weights_digest(base),
                "adapter_sha256": deturbo_adapter.digest() if way == "deturbo" else None,
                "data_sha256": folder_digest(folder), "data_images": len(images),
                "text_precision": params.cache.precision,
                "lora": {k: getattr(params.lora, k) for k in params.lora.__dataclass_fields__ if k not in NOT_IN_LORA_KEY}}
    shared = {"teacher": models.weights_digest(components.transformer), "student": models.weights_digest(student),
              **{k: settings[k] for k in ("data_sha256", "text_precision", "lora")}}  # the same for all three ways
    key = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:10]
    # the De-Turbo way also depends on the adapter: one folder per adapter, so another adapter never overwrites it
    folder_name = f"deturbo-{deturbo_adapter.digest()[:8]}" if way == "deturbo" else way
    out = params.output_path() / "lora" / f"style-{key}" / folder_name
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("settings") == settings and manifest.get("finished", True):
        return read_lora(out), manifest
    text_path = text.text_path_at(components, params.cache.precision)
    unique = sorted(set(captions))
    contexts = text_path.encode_prompts(unique).float()[[unique.index(c) for c in captions]]
    empty = text_path.encode_prompts([params.sampler.negative_prompt]).float()
    batches = style_batches(images, contexts, components.codec, params.lora.batch_size)
    style, result = train_lora(base, batches, empty, adapter_training_config(params, params.lora), params.lora.rank,
                               params.lora.alpha, out.parent / f"{folder_name}-train", frozen=frozen, progress=progress,
                               desc=f"LoRA ({way})")
    losses = result["losses"][-50:]
    record = {"kind": "style", "settings": settings, "data_folder": str(folder), "steps": result["step"],
              "wall_s": result["wall_s"], "finished": result["step"] >= params.lora.steps,
              "final_loss": sum(losses) / max(1, len(losses)), "losses": result["losses"]}
    if result["paused"]:  # the time budget paused training: nothing half-trained is saved as the LoRA
        return style, {**record, "parameters": style.num_parameters()}
    save_lora(style, out, record)
    return style, read_manifest(out)


def style_lora_job(params, way: str, components=None, student: Optional[torch.nn.Module] = None,
                   deturbo_adapter: Optional[LoraWeights] = None) -> tuple[LoraWeights, dict]:
    """`train_style_lora` as a `jobs.run_jobs` job: a worker process is handed nothing and loads the run's models."""
    if components is None:
        components = models.load_components(params)
        student = distill.load_student(params, components, "rcm", params.distill.checkpoint)
        deturbo_adapter = deturbo.load_deturbo(params, components, student) if way == "deturbo" else None
    return train_style_lora(params, components, way, student, deturbo_adapter if way == "deturbo" else None,
                            progress=False)


def styled_rows(params, components, world, reference: torch.nn.Module, student: torch.nn.Module,
                arms: dict[str, torch.nn.Module], steps) -> tuple[dict[str, dict], dict]:
    """06's and 07's table: samples of teacher@T, the reference teacher+lora@T (`reference`: the model the style LoRA
    was made for, with it fused), student@k and every arm '<row prefix>@k' (arms: row prefix -> a student with its
    LoRA fused) on the world's gate set, scored with style=True against the reference (distances to its other seeds)
    and renamed by world.lora_rows. Returns (rows, samples)."""
    T = params.sampler.teacher_steps
    gate_set = world.gate
    styled = dataclasses.replace(components, transformer=reference)
    reference_row = f"teacher+lora@{T}"
    samples = {f"teacher@{T}": gate.sample_teacher(components, params, gate_set, T),
               reference_row: gate.sample_teacher(styled, params, gate_set, T)}
    other_seeds = gate.sample_teacher(styled, params, gate_set, T, stream=gate.NOISE_FLOOR)
    for k in steps:
        samples[f"student@{k}"] = gate.sample_student(student, components, params, gate_set, k)
        for prefix, model in arms.items():
            samples[f"{prefix}@{k}"] = gate.sample_student(model, components, params, gate_set, k)
    # style=True: nano scores against renders in the style mode, real against the style folder's CLIP centroid
    scored = world.score_rows({row: world.keep(images) for row, images in samples.items()}, reference_row,
                              world.keep(other_seeds), style=True)
    return world.lora_rows(scored), samples


STYLE_TARGETS = {1: 0.8, 2: 0.8, 4: 0.9}   # issue 7: style score vs teacher+LoRA@20 at 1 (and 2) and 4 steps
CONTENT_TARGET, DIVERSITY_TARGET = 0.9, 0.8   # relative to the student's own rows (no LoRA), same step count


# The metric names of 06's survival table per evaluation world (anima_lib.worlds): style, content and diversity are
# compared as ratios; `distance` is to the styled reference's other seeds; `report` is copied into the table as found;
# `graded_style` (None: the world has none) is a style reading that does not saturate, compared as a ratio beside style.
SURVIVAL_METRICS = {
    "nano": {"style": "style_score", "graded_style": "style_stripes", "content": "attribute_alignment",
             "diversity": "diversity",
             "distance": "fd_probe_vs_reference", "distance_label": "fd_vs_ref", "distance_format": "{:.0f}",
             "report": ("clean_rate", "fd_probe_vs_reference")},
    "real": {"style": "style_clip", "graded_style": None, "content": "clip_score", "diversity": "diversity_clip",
             "distance": "fid_vs_reference", "distance_label": "fid_vs_ref", "distance_format": "{:.1f}",
             "report": ("fid_vs_reference",)},
}


def graded_style_ratio(row: dict, reference: dict, names: dict) -> dict:
    """{"graded_style_ratio": the world's graded style reading of `row` over the reference's} (empty where the world
    has none): the saturating style score cannot tell "some style" from "the reference's style" (issue 17)."""
    graded = names.get("graded_style")
    return {"graded_style_ratio": row[graded] / max(reference[graded], 1e-9)} if graded else {}


def survival_table(rows: dict, reference_row: str, ways, steps, names: Optional[dict] = None) -> dict[str, dict]:
    """Per '<way>@<k>': style relative to the reference, content (nano: attribute_alignment, every prompt attribute
    read right however cleanly drawn; real: CLIP score) and diversity relative to the student's own row at k steps,
    whether all three meet the targets ("survives"), and, as found, the `report` metrics (nano: clean_rate and
    fd_probe_vs_reference). Rows as 06 writes them; `names`: SURVIVAL_METRICS of the world (default nano)."""
    names = names or SURVIVAL_METRICS["nano"]
    style, content, diversity = names["style"], names["content"], names["diversity"]
    reference = rows[reference_row][style]
    table = {}
    for way in ways:
        for k in steps:
            row, own = rows[f"{WAY_ROWS[way]}@{k}"], rows[f"student@{k}"]
            entry = {"style_ratio": row[style] / max(reference, 1e-9),
                     "content_ratio": row[content] / max(own[content], 1e-9),
                     "diversity_ratio": row[diversity] / max(own[diversity], 1e-9)}
            entry.update(graded_style_ratio(row, rows[reference_row], names))
            entry["survives"] = bool(entry["style_ratio"] >= STYLE_TARGETS[k] and entry["content_ratio"] >= CONTENT_TARGET
                                     and entry["diversity_ratio"] >= DIVERSITY_TARGET)
            entry.update({key: row[key] for key in names["report"]})
            table[f"{way}@{k}"] = entry
    return table


def survival_verdict(table: dict[str, dict], ways, steps, names: Optional[dict] = None) -> str:
    """One line: at which step counts style survives with which way, whether direct training collapses (and how), and
    how the teacher-LoRA transfer compares with De-Turbo."""
    names = names or SURVIVAL_METRICS["nano"]
    distance = names["distance"]

    def cells(way, key, fmt):
        return "/".join(fmt.format(table[f"{way}@{k}"][key]) for k in steps)

    def mean(way, key):
        return sum(table[f"{way}@{k}"][key] for k in steps) / len(steps)

    at = "/".join(map(str, steps))
    parts = []
    for way in ways:
        ok = [k for k in steps if table[f"{way}@{k}"]["survives"]]
        graded = (f" (graded x{cells(way, 'graded_style_ratio', '{:.2f}')})"
                  if "graded_style_ratio" in table[f"{way}@{steps[0]}"] else "")
        parts.append(f"{way}: {'survives at ' + '/'.join(map(str, ok)) + ' steps' if ok else 'does not survive'} "
                     f"(@{at}: style x{cells(way, 'style_ratio', '{:.2f}')}{graded}, content x"
                     f"{cells(way, 'content_ratio', '{:.2f}')}, diversity x{cells(way, 'diversity_ratio', '{:.2f}')}, "
                     f"{names['distance_label']} {cells(way, distance, names['distance_format'])})")
    if "student" in ways:
        how = []
        if any(table[f"student@{k}"]["diversity_ratio"] < DIVERSITY_TARGET for k in steps):
            how.append("diversity drops")
        if any(table[f"student@{k}"]["content_ratio"] < CONTENT_TARGET for k in steps):
            how.append("content drops")
        if "teacher" in ways and mean("student", distance) > 1.5 * mean("teacher", distance):
            how.append(f"its samples sit x{mean('student', distance) / mean('teacher', distance):.1f} "
                       f"farther from the styled reference than the teacher-LoRA's")
        parts.append("direct training: " + ("; ".join(how) if how else "no collapse seen"))
    if "teacher" in ways and "deturbo" in ways:
        style = {w: mean(w, "style_ratio") for w in ("teacher", "deturbo")}
        if style["deturbo"] - style["teacher"] > 0.05:
            parts.append(f"De-Turbo (the control) carries more style than stacking the teacher's LoRA (mean "
                         f"x{style['deturbo']:.2f} vs x{style['teacher']:.2f})")
        else:
            parts.append(f"De-Turbo (the control) is no better than stacking the teacher's LoRA (mean "
                         f"x{style['deturbo']:.2f} vs x{style['teacher']:.2f})")
    return "; ".join(parts)


# The reference must carry the style before any ratio to it means anything (issue 17): teacher+LoRA@T's own style
# score (nano: probe probability of "our style"; a real world's style_clip has no absolute scale, so there it must
# only beat the bare teacher's) and its content relative to the bare teacher@T.
REFERENCE_STYLE_MIN = {"nano": 0.8}
REFERENCE_CONTENT_RATIO = 0.95


def reference_checks(rows: dict, reference_row: str, teacher_row: str, names: dict, kind: str) -> list[Check]:
    """Whether teacher+LoRA@T is a real styled reference: style at least REFERENCE_STYLE_MIN (or above the bare
    teacher's where the world has no absolute style scale) and content ≥ REFERENCE_CONTENT_RATIO × the bare teacher's."""
    style, content = names["style"], names["content"]
    ref, bare = rows[reference_row], rows[teacher_row]
    if kind in REFERENCE_STYLE_MIN:
        style_check = Check(f"reference {reference_row} carries the style: {style} {ref[style]:.3f} "
                            f"(≥ {REFERENCE_STYLE_MIN[kind]})", ref[style] >= REFERENCE_STYLE_MIN[kind])
    else:
        style_check = Check(f"reference {reference_row} carries the style: {style} {ref[style]:.3f} above the bare "
                            f"{teacher_row}'s {bare[style]:.3f}", ref[style] > bare[style])
    ratio = ref[content] / max(bare[content], 1e-9)
    return [style_check, Check(f"reference {reference_row} keeps the content: {content} x{ratio:.3f} of "
                               f"{teacher_row} (≥ {REFERENCE_CONTENT_RATIO})", ratio >= REFERENCE_CONTENT_RATIO)]


def judge(rows: dict, reference_row: str, teacher_row: str, training_steps: dict[str, int], lora_steps: int,
          names: Optional[dict] = None, kind: str = "nano") -> list[Check]:
    """06's checks: every way trained the same `lora_steps` (steps decide, not minutes) and the reference is real.
    Survival itself is measured and named in the verdict, not checked here: De-Turbo is the control, and the 1-2
    step targets are 07_lora_transfer's (lora_transfer.judge)."""
    names = names or SURVIVAL_METRICS[kind]
    steps = ", ".join(f"{way} {n}" for way, n in training_steps.items())
    return [Check(f"every LoRA trained its {lora_steps} steps ({steps})",
                  all(n == lora_steps for n in training_steps.values())),
            *reference_checks(rows, reference_row, teacher_row, names, kind)]

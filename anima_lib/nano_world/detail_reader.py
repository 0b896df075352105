"""The detail-strict reader: a second, small CNN that reads every attribute and is strict on the finest detail at 32x32,
the eye row, where few-step and quantized samples lose quality first (issue 20 item 1).

Why a second reader rather than retraining the probe's eye head:
  * The probe is the gate's continuity: its alignment, fd_probe (its features) and diversity are in every past
    metrics.json. Retraining it with hard negatives would move every old number at once; a separate reader adds
    `strict_*` columns next to the old ones and keeps `alignment` comparable across runs.
  * A reader dedicated to detail can look at detail: two full-resolution 3x3 layers before any stride (an eye is about
    3 px across, a pupil 1-2 px), where the probe strides early for its 128-d feature space.
  * It is small (about 100k parameters, stored as float16: ~200 KB) and trains in minutes on a CPU.

Labels. The eyes head has four classes, one / two / three / other. "other" means "not a clean row of 1, 2 or 3 eyes
as the renderer draws it" (an eye blurred into the body, two eyes merged, an extra faint eye, an eye off the row,
gross blur, noise or blends). We do not label damage with "what is visibly there" (the count of blobs): a half-blurred
or half-merged eye has no well-defined count, so such labels would be arbitrary; the renderer's damage parameters
define "damaged" exactly, and no damage kind at full severity looks like a clean creature with another eye count.
The target is soft, so confidence tracks damage instead of jumping at an arbitrary cut:
  p(other) = ramp(severity; 0.15 -> 0.45) * min(1, visible / 1.0)
where `visible` is how much the damage changed the 32x32 render (sum over pixels of the largest channel change, in
[0,1] units): damage below 0.15 severity is within what clean samples show (the augmentation blurs whole images by up
to 0.7 px) and keeps the prompted count; damage that posterization or a same-coloured body hides stays clean too.
Every damaged training image comes paired with the clean render of the same creature and jitter seed, so only the
eyes differ. The other heads (colour, shape, size, position, background) are trained on both; damage never changes them.

Calibration (after training, on jitter seeds never trained on; both are buffers inside the shipped weights, so the
sha256 covers them): `temperatures`, one per head, fitted by NLL on clean + damaged renders with hard labels ("other"
where p(other) >= 0.5); then `thresholds`, per attribute the 1% quantile of the confidence on correctly read, mildly
augmented clean renders (capped at 0.9): "confident" means as confident as the reader is on 99% of clean renders.

Metrics (all take images [N,3,32,32] in [0,1] read by `read_details`, plus the gate's `attributes` (ground truth per
prompt) and `image_prompt` (prompt index per image), exactly as metrics.score_images does):
  strict_alignment           every attribute read as prompted AND the eyes read confidently (>= threshold)
  strict_accuracy_<attr>     read == prompted
  strict_confident_<attr>    read == prompted and confidence >= the attribute's threshold ("confident and right")
  strict_ece_<attr>          expected calibration error (10 equal-width confidence bins) against read == prompted
  strict_eyes_other_rate     fraction of images whose eyes are read as "other"
  + `confusion_matrices` (prompted value x read value; eyes: 3 x 4 with "other") and `calibration_curves`
    (reliability: per confidence bin, count, mean confidence and accuracy) as JSON-able data for plots.

    python -m anima_lib.nano_world.detail_reader --minutes 8 [--ship]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..metrics import prompt_interval
from ..io import NonFiniteWeightsError, WeightsError, atomic_write_bytes, atomic_write_json, load_finite, sha256_file
from .probes import blur  # the probe's Gaussian blur (also used to build test sets)
from .prompts import ATTRIBUTES, Creature
from .renderer import EYE_DAMAGE_KINDS, EyeDamage, render

SHIPPED_DETAIL_READER = Path(__file__).resolve().parent.parent / "assets" / "detail_reader"
WEIGHTS_FILE = "detail_reader.safetensors"
OTHER = "other"
READ_VALUES: dict[str, tuple[str, ...]] = {name: values + ((OTHER,) if name == "eyes" else ())
                                          for name, values in ATTRIBUTES.items()}
NAMES = list(ATTRIBUTES)
TRAIN_SEED_LIMIT = 400_000      # training jitter seeds; the gate renders from 500_000 (gate.RENDER_SEED_OFFSET)
CALIBRATION_SEED_BASE = 1_000_000   # thresholds are calibrated here (never trained on)
HELD_OUT_SEED_BASE = 2_000_000      # held-out numbers in the manifest and the tests (never trained or calibrated on)
DAMAGE_RAMP = (0.15, 0.45)      # p(other) rises from 0 to 1 over this severity range
VISIBLE_MASS = 1.0              # ... scaled down when the damage changed less than this much of the 32x32 image
THRESHOLD_QUANTILE, THRESHOLD_CAP = 0.01, 0.9
REGENERATE = "python -m anima_lib.nano_world.detail_reader --minutes 8 --ship"


class DetailReader(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin, cout, stride, groups):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(groups, cout), nn.SiLU())
        # two full-resolution layers first: the eye row is the finest detail of a 32x32 creature
        self.body = nn.Sequential(block(3, 16, 1, 4), block(16, 24, 1, 4), block(24, 32, 2, 8), block(32, 48, 1, 8),
                                  block(48, 64, 2, 8), block(64, 32, 2, 8))
        self.proj = nn.Linear(32 * 4 * 4, 64)
        self.heads = nn.ModuleDict({name: nn.Linear(64, len(values)) for name, values in READ_VALUES.items()})
        self.register_buffer("temperatures", torch.ones(len(NAMES)))   # fitted after training (calibrate)
        self.register_buffer("thresholds", torch.full((len(NAMES),), 0.5))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B,3,32,32] in [0,1] -> logits per attribute (eyes: one, two, three, other)."""
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        feats = F.silu(self.proj(self.body(images.float() * 2 - 1).flatten(1)))
        return {name: head(feats) / self.temperatures[NAMES.index(name)] for name, head in self.heads.items()}

    def threshold(self, name: str) -> float:
        return float(self.thresholds[NAMES.index(name)])


# ---------------------------------------------------------------------------------------------------------- reading

@dataclass
class DetailReading:
    """What the reader says about each image: per attribute the class index into READ_VALUES[name], its probability
    (the confidence) and the full distribution, plus the reader's confidence thresholds."""
    pred: dict[str, torch.Tensor]
    confidence: dict[str, torch.Tensor]
    probs: dict[str, torch.Tensor]
    thresholds: dict[str, float]

    def __len__(self) -> int:
        return len(self.pred[NAMES[0]])

    def read_values(self, name: str) -> list[str]:
        return [READ_VALUES[name][i] for i in self.pred[name].tolist()]


@torch.no_grad()
def read_details(reader: DetailReader, images: torch.Tensor, batch_size: int = 256) -> DetailReading:
    """Run the reader once over images [N,3,32,32] in [0,1] (uint8 is accepted and scaled)."""
    probs = {name: [] for name in NAMES}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        for name, logits in reader(batch).items():
            probs[name].append(logits.softmax(1))
    probs = {k: torch.cat(v) for k, v in probs.items()}
    confidence, pred = {}, {}
    for name, p in probs.items():
        confidence[name], pred[name] = p.max(1)
    return DetailReading(pred, confidence, probs, {name: reader.threshold(name) for name in NAMES})


def _targets(attributes: list[dict], image_prompt: list[int]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([READ_VALUES[name].index(attributes[p][name]) for p in image_prompt])
            for name in NAMES}


def per_image_strict(reading: DetailReading, attributes: list[dict],
                     image_prompt: list[int]) -> dict[str, torch.Tensor]:
    """Per image (float 0/1): right_<attr>, confident_<attr> (right and confidence >= threshold), strict_aligned."""
    if len(reading) != len(image_prompt):
        raise ValueError(f"{len(reading)} images read but {len(image_prompt)} entries in image_prompt")
    targets = _targets(attributes, image_prompt)
    out, all_right = {}, torch.ones(len(image_prompt), dtype=torch.bool)
    for name in NAMES:
        right = reading.pred[name] == targets[name]
        out[f"right_{name}"] = right.float()
        out[f"confident_{name}"] = (right & (reading.confidence[name] >= reading.thresholds[name])).float()
        all_right &= right
    out["strict_aligned"] = (all_right & out["confident_eyes"].bool()).float()
    out["eyes_other"] = (reading.pred["eyes"] == READ_VALUES["eyes"].index(OTHER)).float()
    return out


def calibration_curves(reading: DetailReading, attributes: list[dict], image_prompt: list[int],
                       n_bins: int = 10) -> dict[str, dict]:
    """Reliability data per attribute: equal-width confidence bins with count, mean confidence and accuracy (read ==
    prompted; None in empty bins), and the ECE (sum over bins of |accuracy - confidence| weighted by count)."""
    targets = _targets(attributes, image_prompt)
    edges = torch.linspace(0, 1, n_bins + 1)
    out = {}
    for name in NAMES:
        conf, right = reading.confidence[name], (reading.pred[name] == targets[name]).float()
        index = (conf * n_bins).long().clamp(max=n_bins - 1)
        counts, confidence, accuracy, ece = [], [], [], 0.0
        for b in range(n_bins):
            sel = index == b
            n = int(sel.sum())
            counts.append(n)
            confidence.append(float(conf[sel].mean()) if n else None)
            accuracy.append(float(right[sel].mean()) if n else None)
            if n:
                ece += n / len(conf) * abs(accuracy[-1] - confidence[-1])
        out[name] = {"bin_edges": edges.tolist(), "count": counts, "confidence": confidence, "accuracy": accuracy,
                     "ece": ece}
    return out


def confusion_matrices(reading: DetailReading, attributes: list[dict], image_prompt: list[int]) -> dict[str, dict]:
    """Per attribute: counts[i][j] = images prompted with `prompted[i]` and read as `read[j]` (eyes: 3 x 4, "other"
    last)."""
    targets = _targets(attributes, image_prompt)
    out = {}
    for name in NAMES:
        counts = torch.zeros(len(ATTRIBUTES[name]), len(READ_VALUES[name]), dtype=torch.long)
        counts.index_put_((targets[name], reading.pred[name]), torch.ones(len(image_prompt), dtype=torch.long),
                          accumulate=True)
        out[name] = {"prompted": list(ATTRIBUTES[name]), "read": list(READ_VALUES[name]), "counts": counts.tolist()}
    return out


def detail_scores(reading: DetailReading, attributes: list[dict], image_prompt: list[int]) -> dict:
    """The flat `strict_*` metrics of one row (names stable, for metrics.json), with 90% CIs over prompts; every key
    starts with "strict_", so `scores.update(detail_scores(...))` never overwrites a metrics.score_images key."""
    per_image = per_image_strict(reading, attributes, image_prompt)
    calibration = calibration_curves(reading, attributes, image_prompt)
    out: dict = {"strict_alignment": float(per_image["strict_aligned"].mean()),
                 "strict_alignment_ci": prompt_interval(per_image["strict_aligned"], image_prompt),
                 "strict_confident_eyes_ci": prompt_interval(per_image["confident_eyes"], image_prompt)}
    for name in NAMES:
        out[f"strict_accuracy_{name}"] = float(per_image[f"right_{name}"].mean())
        out[f"strict_confident_{name}"] = float(per_image[f"confident_{name}"].mean())
        out[f"strict_ece_{name}"] = calibration[name]["ece"]
    out["strict_eyes_other_rate"] = float(per_image["eyes_other"].mean())
    return out


def score_details(reader: DetailReader, images: torch.Tensor, attributes: list[dict], image_prompt: list[int]) -> dict:
    """Everything the gate needs for one row, JSON-able: {"scores": detail_scores, "confusion": ..., "calibration":
    ..., "thresholds": {attr: confidence threshold}, "per_image": {"eyes_read", "eyes_confidence", "strict_aligned"}}.
    """
    reading = read_details(reader, images)
    per_image = per_image_strict(reading, attributes, image_prompt)
    return {"scores": detail_scores(reading, attributes, image_prompt),
            "confusion": confusion_matrices(reading, attributes, image_prompt),
            "calibration": calibration_curves(reading, attributes, image_prompt),
            "thresholds": dict(reading.thresholds),
            "per_image": {"eyes_read": reading.read_values("eyes"),
                          "eyes_confidence": [round(v, 4) for v in reading.confidence["eyes"].tolist()],
                          "strict_aligned": per_image["strict_aligned"].int().tolist()}}


# ------------------------------------------------------------------------------------------- damaged image sets

def render_images(creatures: list[Creature], seeds: list[int], styles: list[bool] | bool = False,
                  damages: list[EyeDamage | None] | None = None) -> torch.Tensor:
    """float32 [N,3,32,32] in [0,1], each image with its own style flag and eye damage (None: clean)."""
    styles = styles if isinstance(styles, (list, tuple)) else [styles] * len(creatures)
    damages = damages if damages is not None else [None] * len(creatures)
    arrays = np.stack([render(c, s, 32, st, d) for c, s, st, d in zip(creatures, seeds, styles, damages)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def random_damages(n: int, fraction: float, severity: tuple[float, float], seed: int,
                   kinds: tuple[str, ...] = EYE_DAMAGE_KINDS) -> list[EyeDamage | None]:
    """A damage (kind uniform over `kinds`, severity uniform in `severity`) for a `fraction` of n images, else None."""
    rng = random.Random(seed)
    return [EyeDamage(rng.choice(kinds), rng.uniform(*severity)) if rng.random() < fraction else None
            for _ in range(n)]


# ------------------------------------------------------------------------------------------------------ training

def augment_clean(images: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The usual mild changes of good samples (the probe's augmentation), per image; determined by `rng`."""
    generator, out = torch.Generator().manual_seed(rng.randrange(2 ** 63)), []
    for image in images.split(1):
        if rng.random() < 0.4:
            image = blur(image, rng.uniform(0.3, 0.7))
        noise = torch.randn(image.shape, generator=generator)
        out.append(image * rng.uniform(0.95, 1.05) + noise * rng.uniform(0.0, 0.03))
    return torch.cat(out).clamp(0, 1)


def degrade(images: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Gross failures (no readable eye row): heavy blur, heavy noise, a blend of two creatures; determined by `rng`."""
    generator, out = torch.Generator().manual_seed(rng.randrange(2 ** 63)), []
    for i, image in enumerate(images.split(1)):
        kind = rng.choice(["blur", "noise", "blend"])
        if kind == "blur":
            image = blur(image, rng.uniform(1.4, 3.0))
        elif kind == "noise":
            image = image + torch.randn(image.shape, generator=generator) * rng.uniform(0.15, 0.35)
        else:
            image = 0.5 * image + 0.5 * images[(i + 1) % len(images)].unsqueeze(0)
        out.append(image)
    return torch.cat(out).clamp(0, 1)


def other_probability(severity: float, visible: float) -> float:
    """The soft eyes target of a damaged render: p(other) (the rest goes to the prompted count)."""
    lo, hi = DAMAGE_RAMP
    return min(1.0, max(0.0, (severity - lo) / (hi - lo))) * min(1.0, visible / VISIBLE_MASS)


def render_training_pool(n_pairs: int, seed: int = 0, log=print):
    """n_pairs (clean, damaged) renders of random creatures, jitter seeds < TRAIN_SEED_LIMIT, plain or style; uint8."""
    rng = random.Random(seed)
    clean, damaged, labels, p_other = [], [], {name: [] for name in NAMES}, []
    started = time.perf_counter()
    for k in range(n_pairs):
        creature = Creature(**{name: rng.choice(values) for name, values in ATTRIBUTES.items()})
        jitter, style = rng.randrange(TRAIN_SEED_LIMIT), rng.random() < 0.5
        damage = EyeDamage(rng.choice(EYE_DAMAGE_KINDS), rng.random())
        a, b = render(creature, jitter, 32, style), render(creature, jitter, 32, style, damage)
        visible = float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max(-1).sum() / 255)
        clean.append(a)
        damaged.append(b)
        p_other.append(other_probability(damage.severity, visible))
        for name in NAMES:
            labels[name].append(ATTRIBUTES[name].index(getattr(creature, name)))
        if (k + 1) % 4000 == 0:
            log(f"pool {k + 1}/{n_pairs} pairs ({time.perf_counter() - started:.0f} s)")
    as_tensor = lambda arrays: torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return as_tensor(clean), as_tensor(damaged), {k: torch.tensor(v) for k, v in labels.items()}, torch.tensor(p_other)


def _soft_eyes_target(eyes: torch.Tensor, p_other: torch.Tensor) -> torch.Tensor:
    target = F.one_hot(eyes, len(READ_VALUES["eyes"])).float() * (1 - p_other)[:, None]
    target[:, -1] += p_other
    return target


def train_detail_reader(minutes: float, n_pairs: int = 24_000, batch_size: int = 192, lr: float = 3e-3,
                        seed: int = 0, log=print) -> tuple[DetailReader, dict]:
    """Train for `minutes` (the training loop; rendering the pool comes first and is reported apart)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool_started = time.perf_counter()
    clean_pool, damaged_pool, labels, p_other = render_training_pool(n_pairs, seed, log)
    pool_s = time.perf_counter() - pool_started
    reader = DetailReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
    n_clean, n_damaged = batch_size // 2, batch_size * 3 // 8
    n_bad = batch_size - n_clean - n_damaged
    other = len(READ_VALUES["eyes"]) - 1
    started, step, history = time.perf_counter(), 0, []
    budget = minutes * 60
    while time.perf_counter() - started < budget:
        progress = min(1.0, (time.perf_counter() - started) / budget)
        for group in optimizer.param_groups:  # short warm-up, then cosine decay over the time budget
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
        pick_clean = torch.randint(len(clean_pool), (n_clean,))
        pick_damaged = pick_clean[:n_damaged]   # the damaged twins of part of the clean images: only the eyes differ
        clean = augment_clean(clean_pool[pick_clean].float() / 255, rng)
        damaged = augment_clean(damaged_pool[pick_damaged].float() / 255, rng)
        bad = degrade(clean_pool[torch.randint(len(clean_pool), (n_bad,))].float() / 255, rng)
        logits = reader(torch.cat([clean, damaged, bad]))
        n_good = n_clean + n_damaged
        loss = 0.0
        for name in NAMES:
            target = torch.cat([labels[name][pick_clean], labels[name][pick_damaged]])
            if name == "eyes":
                soft = torch.cat([_soft_eyes_target(target[:n_clean], torch.zeros(n_clean)),
                                  _soft_eyes_target(target[n_clean:], p_other[pick_damaged]),
                                  F.one_hot(torch.full((n_bad,), other), other + 1).float()])
                loss = loss + 2.0 * F.cross_entropy(logits[name], soft)   # the head this reader exists for
            else:
                loss = loss + F.cross_entropy(logits[name][:n_good], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        history.append(loss.item())
        if step % 100 == 0:
            log(f"detail reader step {step} loss {sum(history[-100:]) / 100:.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    reader.eval()
    return reader, {"steps": step, "train_s": round(time.perf_counter() - started, 1), "pool_s": round(pool_s, 1),
                    "pool_pairs": n_pairs, "batch_size": batch_size,
                    "final_loss": sum(history[-100:]) / max(1, len(history[-100:]))}


# ------------------------------------------------------------------------------------------ calibration, held out

def clean_set_styles(n: int) -> list[bool]:
    return [i % 2 == 1 for i in range(n)]


def clean_set(n: int, seed: int, seed_base: int, augment: bool = True):
    """n random creatures, plain and style mode alternating (clean_set_styles), jitter seeds seed_base + i, mildly
    augmented: images, attributes, image_prompt (one image per prompt)."""
    rng = random.Random(seed)
    creatures = [Creature(**{k: rng.choice(v) for k, v in ATTRIBUTES.items()}) for _ in range(n)]
    images = render_images(creatures, [seed_base + i for i in range(n)], clean_set_styles(n))
    if augment:
        images = augment_clean(images, rng)
    return images, [c.to_dict() for c in creatures], list(range(n))


def damaged_twins(attributes: list[dict], seed_base: int, seed: int,
                  severity: tuple[float, float] = (0.0, 1.0)):
    """Damaged renders of the creatures of a clean_set (same jitter seeds and styles), mildly augmented, and the hard
    eyes label each should be read as (index into READ_VALUES["eyes"]: "other" where p(other) >= 0.5)."""
    rng = random.Random(seed)
    creatures = [Creature(**a) for a in attributes]
    damages = [EyeDamage(rng.choice(EYE_DAMAGE_KINDS), rng.uniform(*severity)) for _ in creatures]
    seeds, styles = [seed_base + i for i in range(len(creatures))], clean_set_styles(len(creatures))
    clean = render_images(creatures, seeds, styles)
    damaged = render_images(creatures, seeds, styles, damages)
    visible = (clean - damaged).abs().amax(1).flatten(1).sum(1)
    labels = torch.tensor([len(READ_VALUES["eyes"]) - 1 if other_probability(d.severity, float(v)) >= 0.5
                           else ATTRIBUTES["eyes"].index(c.eyes) for c, d, v in zip(creatures, damages, visible)])
    return augment_clean(damaged, rng), labels


@torch.no_grad()
def calibrate(reader: DetailReader, n: int = 1024, seed: int = 7) -> dict[str, dict[str, float]]:
    """Fit a temperature per head (NLL on clean + damaged calibration renders, hard labels), then the confidence
    threshold per attribute: the THRESHOLD_QUANTILE quantile of confidence over correct reads of the clean renders
    (capped at THRESHOLD_CAP). Both go into the reader's buffers (so into the weights file and its sha256)."""
    images, attributes, image_prompt = clean_set(n, seed, CALIBRATION_SEED_BASE)
    damaged, damaged_eyes = damaged_twins(attributes, CALIBRATION_SEED_BASE, seed + 1)
    targets = _targets(attributes, image_prompt)
    reader.temperatures.fill_(1.0)
    logits = reader(torch.cat([images, damaged]))
    grid = torch.exp(torch.linspace(math.log(0.5), math.log(3.0), 37))   # a head right on every image wants T -> 0
    temperatures = {}
    for i, name in enumerate(NAMES):
        labels = torch.cat([targets[name], damaged_eyes if name == "eyes" else targets[name]])
        nll = torch.stack([F.cross_entropy(logits[name] / t, labels) for t in grid])
        temperatures[name] = float(torch.tensor(float(grid[nll.argmin()])).half())  # as float16 stores it
        reader.temperatures[i] = temperatures[name]
    reading = read_details(reader, images)
    targets = _targets(attributes, image_prompt)
    out = {}
    for i, name in enumerate(NAMES):
        right = reading.pred[name] == targets[name]
        q = float(reading.confidence[name][right].quantile(THRESHOLD_QUANTILE)) if right.any() else 0.5
        out[name] = float(torch.tensor(min(THRESHOLD_CAP, q)).half())   # as the float16 weights file stores it
        reader.thresholds[i] = out[name]
    return {"temperatures": temperatures, "thresholds": out}


@torch.no_grad()
def held_out_report(reader: DetailReader, n: int = 1024, seed: int = 11) -> dict:
    """Held-out numbers (jitter seeds never trained or calibrated on): on clean renders accuracy, confident-and-right
    and ECE per attribute and the strict alignment; on clean + damaged twins (severity uniform, hard labels as in
    calibrate) the eyes accuracy and ECE; per damage kind and severity how often the eyes are still read confidently
    as prompted, and how often as "other"; on gross degradations how often the eyes are read as "other"."""
    images, attributes, image_prompt = clean_set(n, seed, HELD_OUT_SEED_BASE)
    reading = read_details(reader, images)
    scores = detail_scores(reading, attributes, image_prompt)
    report: dict = {"clean": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()
                              if k != "strict_confident_eyes_ci"}}
    damaged, damaged_eyes = damaged_twins(attributes, HELD_OUT_SEED_BASE, seed + 1)
    mixed = read_details(reader, torch.cat([images, damaged]))
    labels = torch.cat([_targets(attributes, image_prompt)["eyes"], damaged_eyes])
    right = (mixed.pred["eyes"] == labels).float()
    conf = mixed.confidence["eyes"]
    index = (conf * 10).long().clamp(max=9)
    ece = sum(float((index == b).float().mean()) * abs(float(right[index == b].mean() - conf[index == b].mean()))
              for b in range(10) if (index == b).any())
    report["clean_and_damaged_eyes"] = {"n": len(labels), "accuracy": round(float(right.mean()), 4),
                                        "ece": round(ece, 4)}
    rng = random.Random(seed + 2)
    creatures = [Creature(**a) for a in attributes[:256]]
    seeds, styles = [HELD_OUT_SEED_BASE + i for i in range(256)], clean_set_styles(256)
    by_damage: dict = {}
    for kind in EYE_DAMAGE_KINDS:
        for severity in (0.3, 0.6, 1.0):
            imgs = augment_clean(render_images(creatures, seeds, styles, [EyeDamage(kind, severity)] * 256), rng)
            per_image = per_image_strict(read_details(reader, imgs), attributes[:256], image_prompt[:256])
            by_damage[f"{kind}@{severity}"] = {"confident_eyes": round(float(per_image["confident_eyes"].mean()), 4),
                                               "eyes_other": round(float(per_image["eyes_other"].mean()), 4)}
    report["damaged"] = by_damage
    bad = degrade(images[:256], rng)
    report["degraded_eyes_other"] = round(float(per_image_strict(read_details(reader, bad), attributes[:256],
                                                                 image_prompt[:256])["eyes_other"].mean()), 4)
    return report


# --------------------------------------------------------------------------------------------------- ship / load

def save_detail_reader(reader: DetailReader, folder: Path, manifest: dict) -> Path:
    """float16 weights (inference upcasts) + manifest.json with their sha256; each file written atomically."""
    from safetensors.torch import save
    folder = Path(folder)
    atomic_write_bytes(folder / WEIGHTS_FILE,
                       save({k: v.detach().to(torch.float16).contiguous() for k, v in reader.state_dict().items()}))
    atomic_write_json(folder / "manifest.json", {**manifest,
                                                 "read_values": {k: list(v) for k, v in READ_VALUES.items()},
                                                 "files": {WEIGHTS_FILE: sha256_file(folder / WEIGHTS_FILE)}})
    return folder


def load_detail_reader(folder: Path = SHIPPED_DETAIL_READER) -> DetailReader:
    """The shipped reader, verified against manifest.json's sha256 (WeightsError with the command that rebuilds it)."""
    folder = Path(folder)
    manifest_path, weights = folder / "manifest.json", folder / WEIGHTS_FILE
    if not manifest_path.is_file() or not weights.is_file():
        raise WeightsError(f"{folder}: detail reader weights or manifest missing; regenerate with `{REGENERATE}`")
    if sha256_file(weights) != json.loads(manifest_path.read_text())["files"].get(WEIGHTS_FILE):
        raise WeightsError(f"{weights}: sha256 does not match manifest.json; regenerate with `{REGENERATE}`")
    try:
        state = load_finite(weights)
    except NonFiniteWeightsError as exc:
        raise WeightsError(f"{exc}; regenerate with `{REGENERATE}`") from None
    reader = DetailReader()
    reader.load_state_dict({k: v.float() for k, v in state.items()})
    return reader.eval().requires_grad_(False)


def _round_trip(reader: DetailReader) -> DetailReader:
    """The reader as it will be loaded (float16 weights), so the reported numbers are the shipped reader's."""
    copy = DetailReader()
    copy.load_state_dict({k: v.to(torch.float16).float() for k, v in reader.state_dict().items()})
    return copy.eval().requires_grad_(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0, help="training-loop budget (the pool renders first)")
    parser.add_argument("--pairs", type=int, default=24_000, help="(clean, damaged) render pairs in the pool")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core CPU, 2 threads ran 3x slower per step)")
    parser.add_argument("--out", type=Path, default=Path("outputs/detail_reader"))
    parser.add_argument("--ship", action="store_true", help=f"write to {SHIPPED_DETAIL_READER}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    reader, result = train_detail_reader(args.minutes, n_pairs=args.pairs)
    reader = _round_trip(reader)
    calibration = calibrate(reader)
    report = held_out_report(reader)
    print(json.dumps({**calibration, **report}, indent=2))
    target = SHIPPED_DETAIL_READER if args.ship else args.out
    save_detail_reader(reader, target, {"what": "nano detail-strict reader (eyes: one/two/three/other)",
                                        "command": REGENERATE, **result,
                                        "wall_s": round(time.perf_counter() - started, 1),
                                        "parameters": sum(p.numel() for p in reader.parameters()),
                                        "damage_ramp": DAMAGE_RAMP, "visible_mass": VISIBLE_MASS,
                                        **calibration, "held_out": report})
    print(f"saved {target}")


if __name__ == "__main__":
    main()

"""Image-set metrics, named for what they measure.

Nano backend (probe network, anima_lib.nano_world.probes):
  fd_probe        Fréchet distance between probe-feature Gaussians (torchmetrics FrechetInceptionDistance with the
                  probe as its feature extractor) — an FID-like number, not FID
  alignment       fraction of images that the probe reads as a clean creature AND whose every predicted attribute
                  matches the prompt (GenEval-like); alignment_<attribute> per attribute
  attribute_alignment  the same without the clean-creature condition: is the content right, however it is drawn
                  (what a style LoRA must keep: its rendering artifacts are counted by clean_rate instead)
  diversity       mean pairwise L2 distance of probe features between seeds of one prompt, averaged over prompts
  style_score     mean probe probability of "our style"
  clean_rate      fraction of images read as clean creatures
Uncertainty: a bootstrap over prompts (images of one prompt move together), reported as <metric>_ci = [lo, hi] (90%).
Production backends (Inception FID, open_clip CLIP score from local weights) are not written yet.
"""
from __future__ import annotations

from typing import Optional

import torch

from .nano_world.prompts import ATTRIBUTES


class ProbeReader:
    """Runs the probe once per image set and keeps what every metric needs."""

    def __init__(self, probe, batch_size: int = 256):
        self.probe = probe
        self.batch_size = batch_size

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, preds, style_p, clean_p = [], {k: [] for k in ATTRIBUTES}, [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size].float()
            f = self.probe.features(batch)
            feats.append(f)
            for name in ATTRIBUTES:
                preds[name].append(self.probe.heads[name](f).argmax(1))
            style_p.append(self.probe.heads["style"](f).softmax(1)[:, 1])
            clean_p.append(self.probe.heads["clean"](f).softmax(1)[:, 1])
        return {"features": torch.cat(feats), **{k: torch.cat(v) for k, v in preds.items()},
                "style_p": torch.cat(style_p), "clean_p": torch.cat(clean_p)}


def fd_probe(images_a: torch.Tensor, images_b: torch.Tensor, probe) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from .nano_world.probes import ProbeFeatures
    metric = FrechetInceptionDistance(feature=ProbeFeatures(probe), normalize=True)
    metric.update(images_a.float(), real=True)
    metric.update(images_b.float(), real=False)
    return float(metric.compute())


def _per_image_aligned(reading: dict, attributes: list[dict], image_prompt: list[int]) -> dict[str, torch.Tensor]:
    out = {}
    attributes_ok = torch.ones(len(image_prompt), dtype=torch.bool)
    for name, values in ATTRIBUTES.items():
        target = torch.tensor([values.index(attributes[p][name]) for p in image_prompt])
        ok = reading[name] == target
        out[f"alignment_{name}"] = ok.float()
        attributes_ok = attributes_ok & ok
    out["alignment"] = (attributes_ok & (reading["clean_p"] > 0.5)).float()
    out["attribute_alignment"] = attributes_ok.float()
    return out


def _diversity_per_prompt(features: torch.Tensor, image_prompt: torch.Tensor) -> torch.Tensor:
    values = []
    for p in image_prompt.unique():
        group = features[image_prompt == p]
        if len(group) > 1:
            d = torch.cdist(group, group)
            values.append(d.sum() / (len(group) * (len(group) - 1)))
    return torch.stack(values)


def _bootstrap_ci(per_prompt: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(per_prompt), (n_boot, len(per_prompt)), generator=generator)
    means = per_prompt[idx].mean(1)
    return [float(means.quantile(0.05)), float(means.quantile(0.95))]


def score_images(reading: dict, attributes: list[dict], image_prompt: list[int]) -> dict:
    """Alignment, per-attribute alignment, diversity, style score, clean rate, with bootstrap CIs over prompts."""
    prompt_ids = torch.tensor(image_prompt)
    prompts = prompt_ids.unique()
    per_image = _per_image_aligned(reading, attributes, image_prompt)
    per_image["style_score"] = reading["style_p"]
    per_image["clean_rate"] = (reading["clean_p"] > 0.5).float()
    out: dict = {}
    for name, values in per_image.items():
        per_prompt = torch.stack([values[prompt_ids == p].mean() for p in prompts])
        out[name] = float(values.mean())
        if name in ("alignment", "attribute_alignment", "style_score"):
            out[f"{name}_ci"] = _bootstrap_ci(per_prompt)
    diversity = _diversity_per_prompt(reading["features"], prompt_ids)
    out["diversity"] = float(diversity.mean())
    out["diversity_ci"] = _bootstrap_ci(diversity)
    out["n_images"] = len(image_prompt)
    return out


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

Production backends, from local weights only (nothing is downloaded; absent weights -> MetricUnavailable, which the
report prints as "not computed" with the reason, never replaced by another metric):
  fid_inception   FID: torchmetrics FrechetInceptionDistance with torch-fidelity's InceptionV3 (the standard
                  TF-ported pool3 2048-d features), weights from `gate.inception_weights`
  clip_scores     CLIP score per image: 100 * max(cos(image, prompt), 0) with an open_clip model (`gate.clip_model`)
                  from `gate.clip_checkpoint` (torchmetrics' CLIPScore definition)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

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


def _per_prompt_means(per_image: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([per_image[prompt_ids == p].mean() for p in prompt_ids.unique()])


def _bootstrap_ci(per_prompt: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(per_prompt), (n_boot, len(per_prompt)), generator=generator)
    means = per_prompt[idx].mean(1)
    return [float(means.quantile(0.05)), float(means.quantile(0.95))]


def score_images(reading: dict, attributes: list[dict], image_prompt: list[int]) -> dict:
    """Alignment, per-attribute alignment, diversity, style score, clean rate, with bootstrap CIs over prompts."""
    prompt_ids = torch.tensor(image_prompt)
    per_image = _per_image_aligned(reading, attributes, image_prompt)
    per_image["style_score"] = reading["style_p"]
    per_image["clean_rate"] = (reading["clean_p"] > 0.5).float()
    out: dict = {}
    for name, values in per_image.items():
        per_prompt = _per_prompt_means(values, prompt_ids)
        out[name] = float(values.mean())
        if name in ("alignment", "attribute_alignment", "style_score"):
            out[f"{name}_ci"] = _bootstrap_ci(per_prompt)
    diversity = _diversity_per_prompt(reading["features"], prompt_ids)
    out["diversity"] = float(diversity.mean())
    out["diversity_ci"] = _bootstrap_ci(diversity)
    out["n_images"] = len(image_prompt)
    return out



class MetricUnavailable(RuntimeError):
    """A production metric's weights are not on this machine: the report says so instead of showing a number."""


def _local_file(path, key: str) -> Path:
    if path is None:
        raise MetricUnavailable(f"not computed: {key} is not set (a local weights file; nothing is downloaded)")
    if not Path(path).is_file():
        raise MetricUnavailable(f"not computed: {key} = {str(path)!r}: no such file")
    return Path(path)


def fid_inception(reference: torch.Tensor, image_sets: dict[str, torch.Tensor], weights_path,
                  batch_size: int = 64) -> dict[str, float]:
    """FID of each image set against `reference` (images in [0,1], resized to 299 inside the metric) with the
    standard InceptionV3; the reference's features are computed once."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    path = _local_file(weights_path, "gate.inception_weights")
    metric = FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                      feature_extractor_weights_path=str(path))
    for start in range(0, len(reference), batch_size):
        metric.update(reference[start:start + batch_size].float(), real=True)
    out = {}
    for name, images in image_sets.items():
        for start in range(0, len(images), batch_size):
            metric.update(images[start:start + batch_size].float(), real=False)
        out[name] = float(metric.compute())
        metric.reset()  # drops this set's features, keeps the reference's
    return out


class ClipScorer:
    """An open_clip model from a local checkpoint; scores images against their prompts."""

    def __init__(self, model_name: str, checkpoint):
        import open_clip
        path = _local_file(checkpoint, "gate.clip_checkpoint")
        self.model = open_clip.create_model(model_name, pretrained=str(path)).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """[N] CLIP scores, 100 * max(cos, 0), of images in [0,1] against their prompts (one prompt per image)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for start in range(0, len(images), batch_size):
            batch = F.interpolate(images[start:start + batch_size].float(), size=self.size, mode="bicubic",
                                  align_corners=False).clamp(0, 1)
            image_features = F.normalize(self.model.encode_image((batch - self.mean) / self.std), dim=-1)
            text_features = F.normalize(self.model.encode_text(self.tokenizer(prompts[start:start + batch_size])),
                                        dim=-1)
            out.append(100 * (image_features * text_features).sum(-1).clamp(min=0))
        return torch.cat(out)


def production_metrics(samples: dict[str, torch.Tensor], reference_row: str, prompts: list[str],
                       image_prompt: list[int], inception_weights=None, clip_model: str = "ViT-B-32",
                       clip_checkpoint=None) -> tuple[dict[str, dict], dict[str, str]]:
    """Per row: fid_vs_<reference_row> and clip_score (+ CI over prompts) where the weights are present;
    `status` says for each metric whether it was computed and why not."""
    rows: dict[str, dict] = {row: {} for row in samples}
    status = {}
    try:
        others = {row: images for row, images in samples.items() if row != reference_row}
        for row, value in fid_inception(samples[reference_row], others, inception_weights).items():
            rows[row]["fid_vs_reference"] = value
        status["fid"] = f"computed (InceptionV3 from {inception_weights}), against {reference_row}"
    except MetricUnavailable as missing:
        status["fid"] = str(missing)
    try:
        scorer = ClipScorer(clip_model, clip_checkpoint)
        prompt_ids = torch.tensor(image_prompt)
        for row, images in samples.items():
            per_image = scorer.scores(images, [prompts[p] for p in image_prompt])
            rows[row]["clip_score"] = float(per_image.mean())
            rows[row]["clip_score_ci"] = _bootstrap_ci(_per_prompt_means(per_image, prompt_ids))
        status["clip_score"] = f"computed (open_clip {clip_model} from {clip_checkpoint})"
    except MetricUnavailable as missing:
        status["clip_score"] = str(missing)
    return rows, status

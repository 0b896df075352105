"""Image-set metrics, named for what they measure.

Nano backend (probe network, anima_lib.nano_world.probes):
  fd_probe        Fréchet distance between probe-feature Gaussians (torchmetrics FrechetInceptionDistance with the
                  probe as its feature extractor) — an FID-like number, not FID
  alignment       fraction of images that the probe reads as a clean creature AND whose every predicted attribute
                  matches the prompt (GenEval-like); alignment_<attribute> per attribute
  attribute_alignment  the same without the clean-creature condition: is the content right, however it is drawn
                  (what a style LoRA must keep: its rendering artifacts are counted by clean_rate instead)
  diversity       mean pairwise L2 distance of probe features between seeds of one prompt, averaged over prompts
  style_score     mean probe probability of "our style" (saturates: near 1 once a style is there at all)
  style_stripes   mean stripe contrast of the style mode's diagonal background stripes, read from pixels
                  (nano_world.renderer.stripe_contrast): a graded style reading, ~0.25 on styled renders, ~0 on plain
  clean_rate      fraction of images read as clean creatures
Uncertainty: a bootstrap over prompts (images of one prompt move together), reported as <metric>_ci = [lo, hi] (90%).

Production readers of the real evaluation world (anima_lib.worlds), from local weights only (nothing is downloaded;
a real preset without them is a parameter error before any compute, see config). Every reader is a plain callable
images -> features, so the metric arithmetic below is tested with small deterministic stand-ins:
  InceptionFeatures  torch-fidelity's InceptionV3 pool3 (2048-d) exactly as torchmetrics' FrechetInceptionDistance
                     builds it (`gate.inception_weights`); fid_from_features is torchmetrics' FID arithmetic
  OpenClipEncoder    an open_clip model (`gate.clip_model`) from `gate.clip_checkpoint`: unit image / text embeddings
  clip_score_per_image  100 * max(cos(image, its prompt), 0) (torchmetrics' CLIPScore definition)
  cosine_diversity_per_prompt  mean pairwise cosine distance (1 - cos) between seeds of one prompt in CLIP image space
  style_similarity   cosine of each image to the centroid of the style folder's images in CLIP image space
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .nano_world.prompts import ATTRIBUTES


class ProbeReader:
    """Runs the probe once per image set and keeps what every metric needs (and the stripe contrast, from pixels)."""

    def __init__(self, probe, batch_size: int = 256):
        self.probe = probe
        self.batch_size = batch_size

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from .nano_world.renderer import stripe_contrast   # nano only: the real world never imports the renderer
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
                "style_p": torch.cat(style_p), "clean_p": torch.cat(clean_p),
                "stripe_contrast": stripe_contrast(images)}


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


def per_prompt_means(per_image: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """One mean per prompt over its images (the unit the bootstrap resamples)."""
    return torch.stack([per_image[prompt_ids == p].mean() for p in prompt_ids.unique()])


def bootstrap_interval(per_prompt: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """90% bootstrap interval [5%, 95%] of the mean of per-prompt values."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(per_prompt), (n_boot, len(per_prompt)), generator=generator)
    means = per_prompt[idx].mean(1)
    return [float(means.quantile(0.05)), float(means.quantile(0.95))]


def prompt_interval(per_image: torch.Tensor, image_prompt: list[int]) -> list[float]:
    """90% bootstrap interval of a per-image value's mean, resampling prompts (images of one prompt move together)."""
    return bootstrap_interval(per_prompt_means(per_image, torch.tensor(image_prompt)))


def paired_difference(values: torch.Tensor, other: torch.Tensor, image_prompt: list[int]) -> dict:
    """Mean of values - other over images drawn with the same prompt and noise, and its 90% bootstrap interval over
    prompts (paired: tighter than the rows' own intervals as far as the rows share their noise — ±0.02 for q4 vs fp
    on the nano gate, but ±0.05 for student vs teacher, whose samples from one noise differ more)."""
    if values.shape != other.shape or len(values) != len(image_prompt):
        raise ValueError(f"paired_difference: {tuple(values.shape)} and {tuple(other.shape)} values for "
                         f"{len(image_prompt)} images; both rows must hold one value per gate image")
    difference = values.double() - other.double()
    return {"difference": float(difference.mean()), "ci": prompt_interval(difference, image_prompt)}


def interval_reading(paired: dict, low_bar: float, high_bar: float = float("inf")) -> str:
    """What a paired difference's 90% interval says of a target `low_bar <= difference <= high_bar`: "met" (the whole
    interval inside), "missed" (the whole interval outside) or "undecided" (it straddles a bar: more images decide)."""
    low, high = paired["ci"]
    if low >= low_bar and high <= high_bar:
        return "met"
    if high < low_bar or low > high_bar:
        return "missed"
    return "undecided"


def score_images(reading: dict, attributes: list[dict], image_prompt: list[int],
                 per_image_out: Optional[dict] = None) -> dict:
    """Alignment, per-attribute alignment, diversity, style score, clean rate, with bootstrap CIs over prompts.
    per_image_out (a dict) receives the per-image values behind the means (for paired differences)."""
    prompt_ids = torch.tensor(image_prompt)
    per_image = _per_image_aligned(reading, attributes, image_prompt)
    per_image["style_score"] = reading["style_p"]
    per_image["style_stripes"] = reading["stripe_contrast"]
    per_image["clean_rate"] = (reading["clean_p"] > 0.5).float()
    out: dict = {}
    for name, values in per_image.items():
        per_prompt = per_prompt_means(values, prompt_ids)
        out[name] = float(values.mean())
        if name in ("alignment", "attribute_alignment", "style_score", "style_stripes"):
            out[f"{name}_ci"] = bootstrap_interval(per_prompt)
    diversity = _diversity_per_prompt(reading["features"], prompt_ids)
    out["diversity"] = float(diversity.mean())
    out["diversity_ci"] = bootstrap_interval(diversity)
    out["n_images"] = len(image_prompt)
    if per_image_out is not None:
        per_image_out.update(per_image)
    return out



class MetricUnavailable(RuntimeError):
    """A production reader's weights are not on this machine (config refuses a real preset without them first)."""


def _local_file(path, key: str) -> Path:
    if path is None:
        raise MetricUnavailable(f"{key} is not set (a local weights file; nothing is downloaded)")
    if not Path(path).is_file():
        raise MetricUnavailable(f"{key} = {str(path)!r}: no such file")
    return Path(path)


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as they are; float images in [0,1] as torchmetrics' FID quantizes them (normalize=True)."""
    return images if images.dtype == torch.uint8 else (images.float() * 255).byte()


def as_float(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0,1] (uint8 / 255)."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def to_png_range(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0,1] -> uint8 rounded as a PNG stores them (a quarter of the memory of float32)."""
    return images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().byte()


class InceptionFeatures:
    """images [N,3,H,W] (float in [0,1] or uint8) -> [N, 2048] float64 pool3 features of torch-fidelity's InceptionV3,
    built and fed exactly as torchmetrics' FrechetInceptionDistance(feature=2048, normalize=True) does."""

    def __init__(self, weights_path, device="cpu", batch_size: int = 64):
        from torchmetrics.image.fid import NoTrainInceptionV3
        path = _local_file(weights_path, "gate.inception_weights")
        self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                        feature_extractor_weights_path=str(path)).to(device)
        self.device, self.batch_size = device, batch_size
        self.name = f"FID: torchmetrics InceptionV3 (torch-fidelity, pool3 2048-d) from {path}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = [self.model(as_uint8(images[i:i + self.batch_size]).to(self.device)).double().cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)


def fid_from_features(reference: torch.Tensor, features: torch.Tensor) -> float:
    """FID between two feature sets with torchmetrics' arithmetic (float64 sums, unbiased covariances, eigvals)."""
    from torchmetrics.image.fid import _compute_fid
    if len(reference) < 2 or len(features) < 2:
        raise ValueError("FID needs at least two images on each side")

    def stats(f):
        f = f.double()
        mean = f.sum(0, keepdim=True) / len(f)
        cov = (f.t().mm(f) - len(f) * mean.t().mm(mean)) / (len(f) - 1)
        return mean.squeeze(0), cov

    (mu1, sigma1), (mu2, sigma2) = stats(reference), stats(features)
    return float(_compute_fid(mu1, sigma1, mu2, sigma2))


def fid_inception(reference: torch.Tensor, image_sets: dict[str, torch.Tensor], weights_path,
                  batch_size: int = 64) -> dict[str, float]:
    """FID of each image set against `reference` through torchmetrics' FrechetInceptionDistance module itself (the
    cross-check of InceptionFeatures + fid_from_features, which the gate uses so each set is read once)."""
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


class OpenClipEncoder:
    """An open_clip model from a local checkpoint: unit-norm image and text embeddings."""

    def __init__(self, model_name: str, checkpoint, device="cpu", batch_size: int = 64):
        import open_clip
        path = _local_file(checkpoint, "gate.clip_checkpoint")
        self.model = open_clip.create_model(model_name, pretrained=str(path)).eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1).to(device)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1).to(device)
        self.device, self.batch_size = device, batch_size
        self.name = f"CLIP: open_clip {model_name} from {path}"

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, e] unit embeddings of images [N,3,H,W] (float in [0,1] or uint8), bicubic-resized to the model's size."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = as_float(images[start:start + self.batch_size]).to(self.device)
            batch = F.interpolate(batch, size=self.size, mode="bicubic", align_corners=False).clamp(0, 1)
            out.append(F.normalize(self.model.encode_image((batch - self.mean) / self.std).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[start:start + self.batch_size]).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)


def clip_score_per_image(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """[N] 100 * max(cos, 0) of each image with its own prompt (rows aligned)."""
    cos = (F.normalize(image_embeddings.float(), dim=-1) * F.normalize(text_embeddings.float(), dim=-1)).sum(-1)
    return 100 * cos.clamp(min=0)


def cosine_diversity_per_prompt(embeddings: torch.Tensor, image_prompt: torch.Tensor) -> torch.Tensor:
    """Per prompt (with 2+ images): mean pairwise cosine distance 1 - cos between its images' embeddings."""
    unit = F.normalize(embeddings.float(), dim=-1)
    values = []
    for p in image_prompt.unique():
        group = unit[image_prompt == p]
        if len(group) > 1:
            distance = 1 - group @ group.t()
            values.append(distance.sum() / (len(group) * (len(group) - 1)))  # the diagonal is 0
    return torch.stack(values)


def style_similarity(image_embeddings: torch.Tensor, style_embeddings: torch.Tensor) -> torch.Tensor:
    """[N] cosine of each image to the (unit) centroid of the style images' unit embeddings."""
    centroid = F.normalize(F.normalize(style_embeddings.float(), dim=-1).mean(0), dim=0)
    return F.normalize(image_embeddings.float(), dim=-1) @ centroid


class ClipScorer:
    """CLIP scores of images against their prompts with an OpenClipEncoder."""

    def __init__(self, model_name: str, checkpoint, device="cpu"):
        self.encoder = OpenClipEncoder(model_name, checkpoint, device)

    def scores(self, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """[N] CLIP scores, 100 * max(cos, 0), of images in [0,1] against their prompts (one prompt per image)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        self.encoder.batch_size = batch_size
        return clip_score_per_image(self.encoder.images(images), self.encoder.texts(prompts))

"""Probe network: a small CNN that reads every attribute, the style, and whether an image is a clean creature at all.

Its penultimate features give fd_probe and diversity; its heads give alignment and style score (anima_lib.metrics).
Trained on renderer images with mild augmentation (noise, slight blur, brightness) so it reads generated images
fairly, and with *degraded negatives* (heavy blur, heavy noise, blends of two creatures, cut-outs) labelled
"not clean": a lenient probe would rate blurry one-step samples as well aligned as sharp ones.

    python -m anima_lib.nano_world.probes --minutes 8 [--ship]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import NonFiniteWeightsError, WeightsError, atomic_write_json, load_finite, sha256_file
from .prompts import ATTRIBUTES, Creature, all_creatures
from .renderer import render_batch

SHIPPED_PROBE = Path(__file__).resolve().parent.parent / "assets" / "nano_probe"
HEADS = {**{name: len(values) for name, values in ATTRIBUTES.items()}, "style": 2, "clean": 2}
HELD_OUT_SEED_BASE = 1_000_000  # jitter seeds >= this are never trained on
REGENERATE = "python -m anima_lib.nano_world.probes --ship"


class Probe(nn.Module):
    feature_dim = 128

    def __init__(self):
        super().__init__()
        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())
        self.body = nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2),
                                  block(128, 128, 2))
        self.features_proj = nn.Linear(128 * 4 * 4, self.feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, n) for name, n in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,32,32] in [0,1] -> [B,128] penultimate features."""
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return F.silu(self.features_proj(self.body(images * 2 - 1).flatten(1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}


class ProbeFeatures(nn.Module):
    """The feature extractor torchmetrics' FrechetInceptionDistance(feature=...) calls: images in [0,1] -> [B,128]."""

    def __init__(self, probe: Probe):
        super().__init__()
        self.probe = probe
        self.num_features = Probe.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe.features(images.float())


def attribute_labels(creatures: list[Creature]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(c, name)) for c in creatures]) for name, values in ATTRIBUTES.items()}


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding), per channel."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment_clean(images: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Mild changes a generator's good samples show; the attributes stay readable."""
    if rng.random() < 0.4:
        images = blur(images, rng.uniform(0.3, 0.7))
    images = images * rng.uniform(0.95, 1.05) + torch.randn_like(images) * rng.uniform(0.0, 0.03)
    return images.clamp(0, 1)


def degrade(images: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Failures a generator shows that a gate must not accept as creatures."""
    kind = rng.choice(["blur", "noise", "blend", "cutout"])
    if kind == "blur":
        return blur(images, rng.uniform(1.4, 3.0))
    if kind == "noise":
        return (images + torch.randn_like(images) * rng.uniform(0.15, 0.35)).clamp(0, 1)
    if kind == "blend":
        return 0.5 * images + 0.5 * images.roll(1, dims=0)
    out = images.clone()
    h = images.shape[-1]
    y, x = rng.randrange(h // 2), rng.randrange(h // 2)
    out[:, :, y:y + h // 2, x:x + h // 2] = out.roll(1, dims=0)[:, :, y:y + h // 2, x:x + h // 2]
    return out


def sample_training_batch(n: int, rng: random.Random, seed_offset: int = 0):
    creatures = [Creature(**{k: rng.choice(v) for k, v in ATTRIBUTES.items()}) for _ in range(n)]
    seeds = [rng.randrange(HELD_OUT_SEED_BASE) + seed_offset for _ in range(n)]
    styles = [rng.random() < 0.5 for _ in range(n)]
    images = torch.cat([render_batch([c], [s], 32, st) for c, s, st in zip(creatures, seeds, styles)])
    labels = attribute_labels(creatures)
    labels["style"] = torch.tensor(styles, dtype=torch.long)
    return images, labels


def render_training_pool(jitter_seeds: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every attribute combination x jitter seeds x {plain, style}: uint8 images and labels (seeds < held-out base)."""
    creatures = all_creatures()
    images, labels = [], {name: [] for name in list(ATTRIBUTES) + ["style"]}
    for seed in range(jitter_seeds):
        for style in (False, True):
            images.append((render_batch(creatures, [seed] * len(creatures), 32, style) * 255).round().to(torch.uint8))
            for name, values in attribute_labels(creatures).items():
                labels[name].append(values)
            labels["style"].append(torch.full((len(creatures),), int(style)))
    return torch.cat(images), {k: torch.cat(v) for k, v in labels.items()}


def train_probe(minutes: float, batch_size: int = 128, lr: float = 2e-3, jitter_seeds: int = 8, seed: int = 0,
                log=print) -> tuple[Probe, dict]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool, pool_labels = render_training_pool(jitter_seeds)
    probe = Probe()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    started, step, history = time.perf_counter(), 0, []
    budget = minutes * 60
    while time.perf_counter() - started < budget:
        for group in optimizer.param_groups:  # cosine decay over the time budget: a settled probe at the end
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.perf_counter() - started) / budget)))
        pick = torch.randint(len(pool), (batch_size,))
        images, labels = pool[pick].float() / 255, {k: v[pick] for k, v in pool_labels.items()}
        clean = augment_clean(images, rng)
        n_bad = batch_size // 4
        bad = degrade(images[:n_bad], rng)
        logits = probe(torch.cat([clean, bad]))
        loss = sum(F.cross_entropy(logits[name][:batch_size], labels[name]) for name in list(ATTRIBUTES) + ["style"])
        clean_target = torch.cat([torch.ones(batch_size), torch.zeros(n_bad)]).long()
        loss = loss + F.cross_entropy(logits["clean"], clean_target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        history.append(loss.item())
        if step % 100 == 0:
            log(f"probe step {step} loss {sum(history[-100:]) / 100:.4f} ({time.perf_counter() - started:.0f} s)")
    probe.eval()
    return probe, {"steps": step, "wall_s": time.perf_counter() - started, "final_loss": sum(history[-100:]) / 100,
                   "pool_images": len(pool)}


@torch.no_grad()
def held_out_accuracy(probe: Probe, n: int = 512, seed: int = 12345) -> dict[str, float]:
    """Accuracy per attribute and for style on renders with jitter seeds never seen in training."""
    rng = random.Random(seed)
    images, labels = sample_training_batch(n, rng, seed_offset=HELD_OUT_SEED_BASE)
    logits = probe(images)
    acc = {name: float((logits[name].argmax(1) == labels[name]).float().mean()) for name in list(ATTRIBUTES) + ["style"]}
    acc["clean_on_renders"] = float((logits["clean"].argmax(1) == 1).float().mean())
    acc["clean_on_degraded"] = float((probe(degrade(images, rng))["clean"].argmax(1) == 0).float().mean())
    return acc


def save_probe(probe: Probe, folder: Path, manifest: dict) -> Path:
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".probe.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, tmp)
    tmp.replace(folder / "probe.safetensors")
    atomic_write_json(folder / "manifest.json", {**manifest, "heads": HEADS,
                                                 "files": {"probe.safetensors": sha256_file(folder / "probe.safetensors")}})
    return folder


def load_probe(folder: Path = SHIPPED_PROBE) -> Probe:
    class NonFiniteProbeError(WeightsError, NonFiniteWeightsError):
        """Probe weights holding NaN/Inf (caught as either parent)."""
    folder = Path(folder)
    manifest_path, weights = folder / "manifest.json", folder / "probe.safetensors"
    if not manifest_path.is_file() or not weights.is_file():
        raise WeightsError(f"{folder}: probe weights or manifest missing; regenerate with `{REGENERATE}`")
    if sha256_file(weights) != json.loads(manifest_path.read_text())["files"]["probe.safetensors"]:
        raise WeightsError(f"{weights}: sha256 does not match manifest.json; regenerate with `{REGENERATE}`")
    try:
        state = load_finite(weights)
    except NonFiniteWeightsError as exc:
        raise NonFiniteProbeError(f"{exc}; regenerate with `{REGENERATE}`") from None
    probe = Probe()
    probe.load_state_dict(state)
    return probe.eval().requires_grad_(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/nano_probe"))
    parser.add_argument("--ship", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    probe, result = train_probe(args.minutes)
    accuracy = held_out_accuracy(probe)
    print(json.dumps(accuracy, indent=2))
    target = SHIPPED_PROBE if args.ship else args.out
    save_probe(probe, target, {"what": "nano probe", **result, "held_out_accuracy": accuracy})
    print(f"saved {target}")


if __name__ == "__main__":
    main()

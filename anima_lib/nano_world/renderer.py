"""Deterministic procedural creatures: attributes (+ a jitter seed) -> a small RGB image.

Drawn with PIL at 4x the target size and downsampled (antialiasing). Two modes:
  plain  soft body shading, thin dark outline, plain background with faint texture
  style  "our style", the stand-in for the studio's art style a LoRA must carry: thick ink outline, flat posterized
         colours, diagonally striped background
Jitter (position +-1.5 px, size +-6%, colour +-6%, background texture) carries no attribute information, so one
prompt has many valid images while the probes can still read every attribute.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .prompts import ATTRIBUTES, Creature

SUPERSAMPLE = 4
BODY_RGB = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
            "blue": (40, 80, 220), "purple": (150, 50, 190)}
BACKGROUND_RGB = {"dark": ((28, 28, 44), (28, 28, 44)), "light": ((232, 232, 222), (232, 232, 222)),
                  "grassy": ((196, 222, 236), (96, 150, 60)), "sky": ((90, 160, 230), (170, 210, 245))}
RADIUS = {"small": 0.21, "big": 0.32}            # fraction of the image side
CENTRE_X = {"left": 0.27, "centre": 0.5, "right": 0.73}
EYE_COUNT = {"one": 1, "two": 2, "three": 3}


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.9
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - 1.15 * r), (cx + 1.15 * r, cy + 0.85 * r), (cx - 1.15 * r, cy + 0.85 * r)]
    if shape == "cross":
        a, b = r, r * 0.42
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    return None  # round


def _background(creature: Creature, size: int, style: bool, rng: random.Random) -> Image.Image:
    top, bottom = BACKGROUND_RGB[creature.background]
    ys = np.linspace(0, 1, size)[:, None, None]
    if creature.background == "grassy":  # a horizon: sky above, grass below
        horizon = 0.62 + rng.uniform(-0.03, 0.03)
        mix = (ys > horizon).astype(np.float64)
    else:
        mix = ys
    pixels = (1 - mix) * np.array(top) + mix * np.array(bottom)
    pixels = np.broadcast_to(pixels, (size, size, 3)).copy()
    if style:  # diagonal stripes, posterized: the pattern is part of the style
        xs = np.arange(size)[None, :]
        stripes = (((xs + np.arange(size)[:, None]) // (3 * SUPERSAMPLE)) % 2).astype(bool)
        pixels[stripes] = pixels[stripes] * 0.78
    else:
        noise = np.random.default_rng(rng.randrange(2 ** 32)).normal(0, 4, (size // SUPERSAMPLE, size // SUPERSAMPLE, 1))
        pixels += np.kron(noise, np.ones((SUPERSAMPLE, SUPERSAMPLE, 1)))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def render(creature: Creature, seed: int, size: int = 32, style: bool = False) -> np.ndarray:
    """uint8 [size, size, 3]; the same (creature, seed, size, style) always gives the same pixels."""
    for name, values in ATTRIBUTES.items():
        if getattr(creature, name) not in values:
            raise ValueError(f"{name}={getattr(creature, name)!r} is not a known value; allowed: {list(values)}")
    rng = random.Random(f"{seed}-{creature}-{size}-{style}")
    big = size * SUPERSAMPLE
    image = _background(creature, big, style, rng)
    draw = ImageDraw.Draw(image)
    jitter = lambda amount: rng.uniform(-amount, amount)  # noqa: E731
    r = RADIUS[creature.size] * big * (1 + jitter(0.06))
    cx = CENTRE_X[creature.position] * big + jitter(1.5) * SUPERSAMPLE
    cy = 0.56 * big + jitter(1.5) * SUPERSAMPLE
    colour = tuple(int(np.clip(c * (1 + jitter(0.06)), 0, 255)) for c in BODY_RGB[creature.color])
    outline_w = (2.2 if style else 0.8) * SUPERSAMPLE
    ink = (15, 12, 20)
    polygon = _shape_polygon(creature.shape, cx, cy, r)

    def body(fill, grow=0.0):
        if polygon is None:
            draw.ellipse([cx - r - grow, cy - r - grow, cx + r + grow, cy + r + grow], fill=fill)
        else:
            scale = (r + grow) / r
            draw.polygon([(cx + (x - cx) * scale, cy + (y - cy) * scale) for x, y in polygon], fill=fill)

    body(ink, grow=outline_w)          # the outline is the body grown by the line width, in ink
    body(colour)
    if not style:  # soft shading: a lighter highlight up-left (style mode stays flat)
        highlight = tuple(min(255, int(c * 0.6 + 255 * 0.4)) for c in colour)
        layer = Image.new("L", image.size, 0)
        ImageDraw.Draw(layer).ellipse([cx - 0.75 * r, cy - 0.8 * r, cx + 0.05 * r, cy - 0.05 * r], fill=110)
        mask = Image.new("L", image.size, 0)
        body_mask = ImageDraw.Draw(mask)
        if polygon is None:
            body_mask.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            body_mask.polygon(polygon, fill=255)
        layer = Image.fromarray(np.minimum(np.asarray(layer.filter(ImageFilter.GaussianBlur(2 * SUPERSAMPLE))),
                                           np.asarray(mask)))
        image.paste(Image.new("RGB", image.size, highlight), (0, 0), layer)
        draw = ImageDraw.Draw(image)
    # eyes: a row across the upper body, white with a dark pupil, spaced widely so the count is readable
    n_eyes = EYE_COUNT[creature.eyes]
    eye_r = max(1.6 * SUPERSAMPLE, 0.2 * r) * (1.0 if n_eyes < 3 else 0.85)
    spacing = 2.6 * eye_r
    eye_y = cy - 0.15 * r if creature.shape != "triangle" else cy + 0.1 * r
    for i in range(n_eyes):
        ex = cx + (i - (n_eyes - 1) / 2) * spacing
        draw.ellipse([ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r], fill=(250, 250, 250),
                     outline=ink if style else None, width=int(SUPERSAMPLE * (1.0 if style else 0)))
        pupil = eye_r * 0.5
        draw.ellipse([ex - pupil, eye_y - pupil + 0.2 * eye_r, ex + pupil, eye_y + pupil + 0.2 * eye_r], fill=ink)
    small = image.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(small)
    if style:  # posterize: flat colour levels are part of the style
        pixels = (np.round(pixels / 255 * 5) / 5 * 255).astype(np.uint8)
    return pixels


def render_batch(creatures: list[Creature], seeds: list[int], size: int = 32, style: bool = False):
    """float32 tensor [B, 3, size, size] in [0, 1]."""
    import torch
    arrays = np.stack([render(c, s, size, style) for c, s in zip(creatures, seeds)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0

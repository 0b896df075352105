"""Deterministic procedural creatures: attributes (+ a jitter seed) -> a small RGB image.

Drawn with PIL at 4x the target size and downsampled (antialiasing). Two modes:
  plain  soft body shading, thin dark outline, plain background with faint texture
  style  "our style", the stand-in for the studio's art style a LoRA must carry: thick ink outline, flat posterized
         colours, diagonally striped background
Jitter (position +-1.5 px, size +-6%, colour +-6%, background texture) carries no attribute information, so one
prompt has many valid images while the probes can still read every attribute.

Controlled eye damage (`eye_damage=EyeDamage(kind, severity)`): the hard negatives of the detail-strict reader
(anima_lib.nano_world.detail_reader) and of tests that need "a render with controlled eye damage". The creature,
its jitter and every pixel away from the eye row are those of the clean render with the same seed; only the eyes
change. Kinds (what few-step samples show at 32x32):
  blur   one eye blurred into the body: blurred with sigma up to 1.2 eye radii and faded up to 55% towards what lies
         under it (a smudge stays: never a clean creature with one eye fewer)
  merge  two neighbouring eyes pulled together and bridged into one white blob (a lone eye is smeared sideways)
  extra  an extra faint eye (opacity up to 0.6: never a clean eye) on the row beyond one end, or just below the row
         where the row's end has no body left
  shift  one eye moved off the row, up or down, by up to 1.8 eye radii
`severity` in [0, 1] scales the damage continuously; 0 is the clean render bit for bit. Which eye, and which side or
direction, is drawn from the seed (not the severity), so a severity sweep damages the same eye more and more. No kind
at severity 1 looks like a clean creature with another eye count. With eye_damage=None (the default) the renderer
draws exactly what it drew before damage existed (tests/test_detail_reader.py pins hashes).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .prompts import ATTRIBUTES, Creature

SUPERSAMPLE = 4
STRIPE_PERIOD = 6      # style mode's diagonal background stripes: one light + one dark band along x + y, in output px
STRIPE_DARKEN = 0.78
BODY_RGB = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
            "blue": (40, 80, 220), "purple": (150, 50, 190)}
BACKGROUND_RGB = {"dark": ((28, 28, 44), (28, 28, 44)), "light": ((232, 232, 222), (232, 232, 222)),
                  "grassy": ((196, 222, 236), (96, 150, 60)), "sky": ((90, 160, 230), (170, 210, 245))}
RADIUS = {"small": 0.21, "big": 0.32}            # fraction of the image side
CENTRE_X = {"left": 0.27, "centre": 0.5, "right": 0.73}
EYE_COUNT = {"one": 1, "two": 2, "three": 3}
EYE_DAMAGE_KINDS = ("blur", "merge", "extra", "shift")


@dataclass(frozen=True)
class EyeDamage:
    """Controlled eye damage for `render`: a kind (EYE_DAMAGE_KINDS) and a severity in [0, 1]."""
    kind: str
    severity: float

    def __post_init__(self):
        if self.kind not in EYE_DAMAGE_KINDS:
            raise ValueError(f"eye damage kind {self.kind!r} is not known; allowed: {list(EYE_DAMAGE_KINDS)}")
        if not 0.0 <= float(self.severity) <= 1.0:
            raise ValueError(f"eye damage severity {self.severity!r} is outside [0, 1]")


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
        stripes = (((xs + np.arange(size)[:, None]) // (STRIPE_PERIOD // 2 * SUPERSAMPLE)) % 2).astype(bool)
        pixels[stripes] = pixels[stripes] * STRIPE_DARKEN
    else:
        noise = np.random.default_rng(rng.randrange(2 ** 32)).normal(0, 4, (size // SUPERSAMPLE, size // SUPERSAMPLE, 1))
        pixels += np.kron(noise, np.ones((SUPERSAMPLE, SUPERSAMPLE, 1)))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _draw_eye(draw: ImageDraw.ImageDraw, ex: float, ey: float, eye_r: float, style: bool, ink, white=(250, 250, 250),
              stretch: float = 1.0) -> None:
    """One eye as the clean renderer draws it (`stretch` widens it sideways)."""
    w = eye_r * stretch
    draw.ellipse([ex - w, ey - eye_r, ex + w, ey + eye_r], fill=white, outline=ink if style else None,
                 width=int(SUPERSAMPLE * (1.0 if style else 0)))
    pupil = eye_r * 0.5
    draw.ellipse([ex - pupil * stretch, ey - pupil + 0.2 * eye_r, ex + pupil * stretch, ey + pupil + 0.2 * eye_r],
                 fill=ink)


def _damaged_eyes(image: Image.Image, damage: EyeDamage, rng: random.Random, cx: float, eye_y: float, eye_r: float,
                  spacing: float, n_eyes: int, style: bool, ink, r: float) -> Image.Image:
    """The eye row with one controlled defect (see the module docstring); returns the new image."""
    s = float(damage.severity)
    xs = [cx + (i - (n_eyes - 1) / 2) * spacing for i in range(n_eyes)]
    ys = [eye_y] * n_eyes
    which = rng.randrange(n_eyes)
    sign = rng.choice((-1, 1))
    draw = ImageDraw.Draw(image)
    if damage.kind == "shift":
        ys[which] += sign * 1.8 * s * eye_r
    if damage.kind == "merge":
        if n_eyes == 1:  # nothing to merge with: the lone eye smears sideways as if a second one fused into it
            _draw_eye(draw, xs[0], ys[0], eye_r, style, ink, stretch=1 + 1.2 * s)
            return image
        j = rng.randrange(n_eyes - 1)
        mid = (xs[j] + xs[j + 1]) / 2
        half = (1 - 0.75 * s) * spacing / 2
        xs[j], xs[j + 1] = mid - half, mid + half
        for i in range(n_eyes):
            _draw_eye(draw, xs[i], ys[i], eye_r, style, ink)
        bridge = eye_r * min(1.0, 1.6 * s)     # a white bridge over the gap (and over the inner outlines in style)
        draw.rectangle([xs[j], eye_y - bridge, xs[j + 1], eye_y + bridge], fill=(250, 250, 250))
        pupil = eye_r * 0.5
        for x in (xs[j], xs[j + 1]):
            draw.ellipse([x - pupil, eye_y - pupil + 0.2 * eye_r, x + pupil, eye_y + pupil + 0.2 * eye_r], fill=ink)
        return image
    if damage.kind == "blur":
        for i in range(n_eyes):
            if i != which:
                _draw_eye(draw, xs[i], ys[i], eye_r, style, ink)
        with_eye = image.copy()
        _draw_eye(ImageDraw.Draw(with_eye), xs[which], ys[which], eye_r, style, ink)
        blurred = with_eye.filter(ImageFilter.GaussianBlur(1.2 * s * eye_r))
        faded = Image.blend(blurred, image, 0.55 * s)           # towards what lies under the eye (the body)
        mask = Image.new("L", image.size, 0)
        reach = eye_r * (1 + 1.5 * s)
        ImageDraw.Draw(mask).ellipse([xs[which] - reach, ys[which] - reach, xs[which] + reach, ys[which] + reach],
                                     fill=255)
        mask = mask.filter(ImageFilter.GaussianBlur(0.5 * eye_r))
        image.paste(faded, (0, 0), mask)
        return image
    for i in range(n_eyes):
        _draw_eye(draw, xs[i], ys[i], eye_r, style, ink)
    if damage.kind == "extra":
        layer = image.copy()
        x = (xs[-1] if sign > 0 else xs[0]) + sign * spacing
        y = eye_y
        if abs(x - cx) > 0.8 * r:        # no body left beyond the row's end: just below the row, under one eye
            x, y = xs[which], eye_y + 2.3 * eye_r
        _draw_eye(ImageDraw.Draw(layer), x, y, eye_r, style, ink)
        image = Image.blend(image, layer, 0.6 * s)
    return image


def render(creature: Creature, seed: int, size: int = 32, style: bool = False,
           eye_damage: EyeDamage | None = None) -> np.ndarray:
    """uint8 [size, size, 3]; the same (creature, seed, size, style, eye_damage) always gives the same pixels.

    `eye_damage` (an EyeDamage) spoils the eye row in a controlled way; None (or severity 0) is the clean render."""
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
    if eye_damage is None or eye_damage.severity == 0:
        for i in range(n_eyes):
            ex = cx + (i - (n_eyes - 1) / 2) * spacing
            draw.ellipse([ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r], fill=(250, 250, 250),
                         outline=ink if style else None, width=int(SUPERSAMPLE * (1.0 if style else 0)))
            pupil = eye_r * 0.5
            draw.ellipse([ex - pupil, eye_y - pupil + 0.2 * eye_r, ex + pupil, eye_y + pupil + 0.2 * eye_r], fill=ink)
    else:
        damage_rng = random.Random(f"eye-damage-{seed}-{creature}-{size}-{style}-{eye_damage.kind}")
        image = _damaged_eyes(image, eye_damage, damage_rng, cx, eye_y, eye_r, spacing, n_eyes, style, ink, r)
    small = image.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(small)
    if style:  # posterize: flat colour levels are part of the style
        pixels = (np.round(pixels / 255 * 5) / 5 * 255).astype(np.uint8)
    return pixels


def render_batch(creatures: list[Creature], seeds: list[int], size: int = 32, style: bool = False,
                 eye_damage: EyeDamage | list[EyeDamage | None] | None = None):
    """float32 tensor [B, 3, size, size] in [0, 1]; `eye_damage`: one for all images or one (or None) per image."""
    import torch
    damages = eye_damage if isinstance(eye_damage, (list, tuple)) else [eye_damage] * len(creatures)
    if len(damages) != len(creatures):
        raise ValueError(f"{len(damages)} eye damages for {len(creatures)} creatures")
    arrays = np.stack([render(c, s, size, style, d) for c, s, d in zip(creatures, seeds, damages)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def stripe_contrast(images) -> "torch.Tensor":
    """Per image, how strongly the style mode's diagonal stripes are there, read from pixels: (mean luminance of the
    light band - of the dark band) / mean luminance, the bands being the phases of x + y modulo STRIPE_PERIOD as
    `_background` draws them. A graded style reading (06/07 `style_stripes`): ~0.25 on styled renders, ~0 on plain
    ones, linear in a blend of the two, negative for stripes of the wrong phase, ~0 for other orientations; it reads
    one element of the style (outline, flat shading and posterization are the probe's style head's)."""
    import torch
    luminance = images.float().mean(1)                                   # [N, H, W]
    h, w = luminance.shape[-2:]
    phase = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % STRIPE_PERIOD
    light = luminance[:, phase < STRIPE_PERIOD // 2].mean(1)
    dark = luminance[:, phase >= STRIPE_PERIOD // 2].mean(1)
    return (light - dark) / luminance.mean((1, 2)).clamp_min(1e-3)

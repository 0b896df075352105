"""The graded style reading (`style_stripes`, nano_world.renderer.stripe_contrast), attacked with the images that
would fool it: the probe's style score saturates (issue 17), so this reading must move with how much of the style is
there, and must not move for things that are not the style's stripes."""
import torch

from anima_lib.nano_world.prompts import sample_creatures
from anima_lib.nano_world.renderer import STRIPE_PERIOD, render_batch, stripe_contrast

N = 48


def _renders(style: bool) -> torch.Tensor:
    creatures = sample_creatures(N, seed=3)
    return render_batch(creatures, list(range(100, 100 + N)), style=style)


def test_styled_renders_read_high_and_plain_renders_read_zero():
    styled, plain = stripe_contrast(_renders(True)), stripe_contrast(_renders(False))
    assert 0.15 < float(styled.mean()) < 0.35
    assert abs(float(plain.mean())) < 0.01 and float(plain.abs().max()) < 0.06
    assert float((styled > 0.05).float().mean()) > 0.85   # per image, not only on average


def test_reading_is_graded_in_a_blend_of_styled_and_plain():
    styled, plain = _renders(True), _renders(False)
    full = float(stripe_contrast(styled).mean())
    readings = [float(stripe_contrast(a * styled + (1 - a) * plain).mean()) / full for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert readings == sorted(readings)                         # monotone in how much style is there
    for a, r in zip((0.0, 0.25, 0.5, 0.75, 1.0), readings):
        assert abs(r - a) < 0.12, (a, r)                         # and close to linear: a graded reading, not a switch


def test_stripes_of_the_wrong_phase_or_orientation_do_not_count():
    styled = _renders(True)
    half_period = torch.roll(styled, shifts=STRIPE_PERIOD // 2, dims=-1)   # light and dark bands swapped
    assert float(stripe_contrast(half_period).mean()) < -0.1
    plain = _renders(False)
    rows = torch.arange(32)[:, None].expand(32, 32)
    horizontal = plain * torch.where((rows % STRIPE_PERIOD) < STRIPE_PERIOD // 2, 1.0, 0.78)   # same period, other axis
    assert abs(float(stripe_contrast(horizontal).mean())) < 0.02


def test_reading_survives_noise_and_brightness_but_not_a_blur_that_removes_the_stripes():
    styled = _renders(True)
    full = float(stripe_contrast(styled).mean())
    noisy = (styled + 0.05 * torch.randn(styled.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert abs(float(stripe_contrast(noisy).mean()) - full) < 0.1 * full
    assert abs(float(stripe_contrast(styled * 0.7).mean()) - full) < 0.02 * full   # relative to the image's luminance
    blurred = torch.nn.functional.avg_pool2d(styled, STRIPE_PERIOD, stride=1, padding=STRIPE_PERIOD // 2,
                                             count_include_pad=False)[..., :32, :32]  # one period wide: no stripes left
    assert float(stripe_contrast(blurred).mean()) < 0.25 * full


def test_the_other_style_elements_alone_do_not_read_as_stripes():
    """Posterization (another element of the style) on a plain render reads ~0: the stripe reading is one element;
    the probe's style head reads the rest, and both columns are reported."""
    plain = _renders(False)
    posterized = torch.round(plain * 5) / 5
    assert abs(float(stripe_contrast(posterized).mean())) < 0.02

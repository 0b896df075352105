"""Controlled eye damage in the renderer and the detail-strict reader (issue 20 item 1): the strict reader reads clean
renders right, its reading falls with eye damage where the old probe stays lenient, and it ranks image sets that stand
for teacher@20 > student@1 > student_q4@1 beyond sampling noise. Needs anima_lib/assets (probe and detail reader)."""
import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch

from anima_lib import io, metrics
from anima_lib.nano_world import detail_reader as dr
from anima_lib.nano_world import probes, renderer
from anima_lib.nano_world.prompts import ATTRIBUTES, Creature, sample_creatures
from anima_lib.nano_world.renderer import EYE_DAMAGE_KINDS, EyeDamage

TEST_SEED_BASE = dr.HELD_OUT_SEED_BASE + 500_000   # never trained on, calibrated on, or in the manifest's report
SEVERITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

# sha256[:16] of renders drawn by the renderer as it was before eye damage existed (commit 24b3b59)
BEFORE_DAMAGE = [
    ((Creature("red", "round", "one", "small", "left", "dark"), 3, 32, False), "b92eac48a0eaaa6e"),
    ((Creature("blue", "square", "two", "big", "centre", "light"), 17, 32, True), "1a119b78c9adf691"),
    ((Creature("yellow", "triangle", "three", "small", "right", "grassy"), 250_001, 32, False), "44bb89ceb497b6f3"),
    ((Creature("purple", "cross", "three", "big", "centre", "sky"), 500_123, 32, True), "73d36d2135367852"),
    ((Creature("green", "round", "two", "big", "right", "grassy"), 9, 64, False), "caec372625e0426c"),
    ((Creature("orange", "triangle", "one", "small", "left", "sky"), 42, 64, True), "a7494957101ba4e0"),
]
BEFORE_DAMAGE_96 = "eb5f3f6767cc64e7"  # 96 creatures (sample_creatures(96, 2020)), seeds 700_000+i, style on odd i


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def reader():
    return dr.load_detail_reader()


@pytest.fixture(scope="module")
def old_reader():
    return metrics.ProbeReader(probes.load_probe())


def test_renders_without_damage_are_bit_identical_to_before():
    for (creature, seed, size, style), digest in BEFORE_DAMAGE:
        assert _sha(renderer.render(creature, seed, size, style)) == digest, (creature, seed, size, style)
        assert _sha(renderer.render(creature, seed, size, style, None)) == digest
    h = hashlib.sha256()
    for i, creature in enumerate(sample_creatures(96, 2020)):
        h.update(renderer.render(creature, 700_000 + i, 32, i % 2 == 1).tobytes())
    assert h.hexdigest()[:16] == BEFORE_DAMAGE_96
    batch = renderer.render_batch([c for (c, *_), _ in BEFORE_DAMAGE[:4]], [s for (_, s, *_), _ in BEFORE_DAMAGE[:4]])
    assert torch.equal(batch, renderer.render_batch([c for (c, *_), _ in BEFORE_DAMAGE[:4]],
                                                    [s for (_, s, *_), _ in BEFORE_DAMAGE[:4]], eye_damage=None))


def test_eye_damage_is_controlled():
    creatures = sample_creatures(12, 5)
    for i, creature in enumerate(creatures):
        style = i % 2 == 0
        clean = renderer.render(creature, i, 32, style)
        for kind in EYE_DAMAGE_KINDS:
            assert np.array_equal(renderer.render(creature, i, 32, style, EyeDamage(kind, 0.0)), clean)
            full = renderer.render(creature, i, 32, style, EyeDamage(kind, 1.0))
            assert np.array_equal(full, renderer.render(creature, i, 32, style, EyeDamage(kind, 1.0)))  # deterministic
            diff = np.abs(full.astype(int) - clean.astype(int)).max(-1)
            assert diff.sum() > 0, (creature, kind)
            # only the eyes' band changes: the top rows (above any eye) and the bottom rows stay untouched
            assert diff[:4].sum() == 0 and diff[30:].sum() == 0, (creature, kind)
            # more severity, more change (the same eye, the same side: drawn from the seed, not the severity)
            changes = [np.abs(renderer.render(creature, i, 32, style, EyeDamage(kind, s)).astype(int)
                              - clean.astype(int)).sum() for s in (0.3, 1.0)]
            assert changes[0] < changes[1], (creature, kind, changes)
    with pytest.raises(ValueError, match="kind"):
        EyeDamage("melt", 0.5)
    with pytest.raises(ValueError, match="severity"):
        EyeDamage("blur", 1.5)
    damages = [EyeDamage("merge", 0.7), None]
    batch = renderer.render_batch(creatures[:2], [0, 1], eye_damage=damages)
    assert torch.equal(batch[1], renderer.render_batch(creatures[1:2], [1])[0])


def test_strict_reader_reads_clean_renders(reader):
    images, attributes, image_prompt = dr.clean_set(384, seed=101, seed_base=TEST_SEED_BASE)
    reading = dr.read_details(reader, images)
    scores = dr.detail_scores(reading, attributes, image_prompt)
    print("clean held-out:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()})
    assert scores["strict_accuracy_eyes"] >= 0.97
    assert scores["strict_alignment"] >= 0.95
    for name in ATTRIBUTES:
        assert scores[f"strict_accuracy_{name}"] >= 0.97, name
    # the outputs the gate plots: a 3 x 4 eyes confusion matrix and reliability bins that add up
    confusion = dr.confusion_matrices(reading, attributes, image_prompt)["eyes"]
    assert confusion["read"] == ["one", "two", "three", "other"] and len(confusion["counts"]) == 3
    assert sum(map(sum, confusion["counts"])) == len(images)
    curve = dr.calibration_curves(reading, attributes, image_prompt)["eyes"]
    assert sum(curve["count"]) == len(images) and 0 <= curve["ece"] <= 0.05
    # what the gate stores per row: JSON-able, and only strict_* keys next to metrics.score_images' own
    details = dr.score_details(reader, images[:16], attributes, image_prompt[:16])
    json.dumps(details)
    assert all(key.startswith("strict_") for key in details["scores"])
    assert len(details["per_image"]["strict_aligned"]) == 16 and details["thresholds"]["eyes"] > 0.5


def _old_scores(old_reader, images, attributes, image_prompt):
    return metrics.score_images(old_reader.read(images), attributes, image_prompt)


def test_strict_reading_falls_with_eye_damage_where_the_old_probe_stays_lenient(reader, old_reader):
    n_prompts, k = 48, 2                      # metrics.score_images wants 2+ seeds per prompt (diversity)
    rng = random.Random(3)
    prompts = sample_creatures(n_prompts, 303)
    attributes, image_prompt = [c.to_dict() for c in prompts], [p for p in range(n_prompts) for _ in range(k)]
    creatures, n = [prompts[p] for p in image_prompt], len(image_prompt)
    seeds = [TEST_SEED_BASE + 10_000 + i for i in range(n)]
    styles = [i % 4 >= 2 for i in range(n)]
    kinds = [EYE_DAMAGE_KINDS[(i // 2) % len(EYE_DAMAGE_KINDS)] for i in range(n)]   # every kind, every eye count
    rows = {}
    for severity in SEVERITIES:
        damages = [EyeDamage(kind, severity) for kind in kinds]
        images = dr.augment_clean(dr.render_images(creatures, seeds, styles, damages), rng)
        strict = dr.per_image_strict(dr.read_details(reader, images), attributes, image_prompt)
        old = _old_scores(old_reader, images, attributes, image_prompt)
        per_kind = {kind: float(strict["confident_eyes"][[k == kind for k in kinds]].mean())
                    for kind in EYE_DAMAGE_KINDS}
        rows[severity] = {"old_eyes": old["alignment_eyes"], "old_alignment": old["alignment"],
                          "strict_eyes": float(strict["confident_eyes"].mean()),
                          "strict_alignment": float(strict["strict_aligned"].mean()), **per_kind}
    print(f"\n{'severity':>8} {'old eyes':>9} {'old align':>9} {'strict eyes':>11} {'strict align':>12}  "
          + "  ".join(f"{k:>6}" for k in EYE_DAMAGE_KINDS))
    for severity, r in rows.items():
        print(f"{severity:8.1f} {r['old_eyes']:9.3f} {r['old_alignment']:9.3f} {r['strict_eyes']:11.3f} "
              f"{r['strict_alignment']:12.3f}  " + "  ".join(f"{r[k]:6.3f}" for k in EYE_DAMAGE_KINDS))
    strict = [rows[s]["strict_alignment"] for s in SEVERITIES]
    assert strict[0] >= 0.9
    assert all(later <= earlier + 0.02 for earlier, later in zip(strict, strict[1:])), strict   # falls monotonically
    assert strict[2] <= 0.5 * strict[0] and strict[-1] <= 0.1, strict
    # the old probe is lenient exactly there: it still reads most damaged eye rows as the prompted count
    assert rows[0.4]["old_eyes"] >= 0.8 and rows[0.6]["old_eyes"] >= 0.6, rows
    assert rows[0.6]["old_eyes"] - rows[0.6]["strict_eyes"] >= 0.4


def test_strict_reading_ranks_teacher_over_student_over_quantized(reader, old_reader):
    """Three sets from the same prompts and seeds: teacher@20 (clean renders, light blur), student@1 (25% of images
    with eye damage) and student_q4@1 (55%); severities uniform in [0.4, 1]."""
    n_prompts, k = 64, 2
    creatures = sample_creatures(n_prompts, 404)
    attributes = [c.to_dict() for c in creatures]
    image_prompt = [p for p in range(n_prompts) for _ in range(k)]
    seeds = [TEST_SEED_BASE + 20_000 + p * 10 + j for p in range(n_prompts) for j in range(k)]
    images_of = [creatures[p] for p in image_prompt]
    n = len(image_prompt)
    sets = {"teacher@20": dr.random_damages(n, 0.0, (0.4, 1.0), seed=1),
            "student@1": dr.random_damages(n, 0.25, (0.4, 1.0), seed=2),
            "student_q4@1": dr.random_damages(n, 0.55, (0.4, 1.0), seed=3)}
    per_image, table = {}, {}
    for row, damages in sets.items():
        rng = random.Random(row)
        images = dr.render_images(images_of, seeds, False, damages)
        images = torch.cat([dr.blur(im, rng.uniform(0.3, 0.5)) for im in images.split(1)])
        reading = dr.read_details(reader, images)
        per_image[row] = dr.per_image_strict(reading, attributes, image_prompt)["strict_aligned"]
        scores = dr.detail_scores(reading, attributes, image_prompt)
        old = _old_scores(old_reader, images, attributes, image_prompt)
        table[row] = (old["alignment"], old["alignment_eyes"], scores["strict_alignment"],
                      scores["strict_alignment_ci"], scores["strict_confident_eyes"],
                      sum(d is not None for d in damages) / n)
    print(f"\n{'row':>13} {'alignment (old)':>15} {'old eyes':>8} {'strict_alignment':>16} {'90% CI':>14} "
          f"{'strict eyes':>11} {'damaged':>7}")
    for row, (old, old_eyes, strict, ci, eyes, damaged) in table.items():
        print(f"{row:>13} {old:15.3f} {old_eyes:8.3f} {strict:16.3f} [{ci[0]:.3f}, {ci[1]:.3f}] {eyes:11.3f} "
              f"{damaged:7.2f}")
    for better, worse in (("teacher@20", "student@1"), ("student@1", "student_q4@1")):
        paired = metrics.paired_difference(per_image[better], per_image[worse], image_prompt)
        gap, ci = paired["difference"], paired["ci"]
        print(f"{better} - {worse}: {gap:.3f} (paired 90% CI [{ci[0]:.3f}, {ci[1]:.3f}])")
        assert ci[0] > 0, (better, worse, gap, ci)


def test_detail_reader_weights_are_verified(tmp_path):
    manifest = (dr.SHIPPED_DETAIL_READER / "manifest.json").read_text()
    weights = dr.SHIPPED_DETAIL_READER / dr.WEIGHTS_FILE
    assert weights.stat().st_size < 400_000
    assert '"thresholds"' in manifest
    copy = tmp_path / "detail_reader"
    shutil.copytree(dr.SHIPPED_DETAIL_READER, copy)
    assert dr.load_detail_reader(copy).threshold("eyes") > 0.5
    data = bytearray((copy / dr.WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (copy / dr.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(io.WeightsError, match="sha256 does not match.*detail_reader --minutes"):
        dr.load_detail_reader(copy)
    (copy / dr.WEIGHTS_FILE).unlink()
    with pytest.raises(io.WeightsError, match="missing; regenerate"):
        dr.load_detail_reader(copy)

import numpy as np
import pytest
import torch

from anima_lib import models
from anima_lib.nano_world import renderer
from anima_lib.nano_world.prompts import ATTRIBUTES, Creature, sample_creatures, vocabulary
from anima_lib.nano_world.teacher import all_creatures


def test_every_prompt_is_in_vocabulary_and_fits_the_context():
    tokenizer = models.nano_tokenizer(vocabulary())
    creatures = all_creatures()
    assert len(creatures) == np.prod([len(v) for v in ATTRIBUTES.values()]) == 1728
    for c in creatures:
        ids = tokenizer(c.prompt()).input_ids
        assert tokenizer.unk_token_id not in ids, c.prompt()
        assert len(ids) <= models.NANO_MAX_TOKENS


def test_render_is_deterministic_and_jitter_varies():
    c = sample_creatures(1, seed=3)[0]
    a, b, other = renderer.render(c, 7), renderer.render(c, 7), renderer.render(c, 8)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, other)
    assert not np.array_equal(a, renderer.render(c, 7, style=True))


def test_attributes_change_the_image():
    c = Creature("red", "round", "two", "big", "left", "dark")
    base = renderer.render(c, 0).astype(int)
    for name, values in ATTRIBUTES.items():
        other = Creature(**{**c.to_dict(), name: next(v for v in values if v != getattr(c, name))})
        assert np.abs(renderer.render(other, 0).astype(int) - base).sum() > 500, name


def test_unknown_attribute_value_is_rejected_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"color='teal' is not a known value; allowed: \['red'"):
        renderer.render(Creature("teal", "round", "two", "big", "left", "dark"), 0)


def test_render_batch_is_a_float_tensor():
    batch = renderer.render_batch(sample_creatures(3, 0), [0, 1, 2])
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1

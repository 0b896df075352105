import torch

from anima_lib import models, text
from anima_lib.nano_world.prompts import sample_creatures, vocabulary


def test_precisions_differ_but_agree():
    components = models.build_nano(vocabulary(), seed=0)
    prompts = [c.prompt() for c in sample_creatures(6, 0)]
    contexts = text.encode_all_precisions(components, prompts)
    reference = contexts["f32"]
    assert torch.equal(reference, components.encode_prompts(prompts))
    for precision in ("f16", "bf16", "q8_0"):
        assert not torch.equal(contexts[precision], reference), precision
        cosine = text.worst_row_cosine(contexts[precision], reference)
        assert cosine >= 0.999 if precision != "bf16" else cosine >= 0.99, (precision, cosine)
    assert text.worst_row_cosine(contexts["q8_0"], contexts["bf16"]) > 0.99
    # the DiT is shared, not copied; the original text path is untouched
    assert text.text_path_at(components, "q8_0").transformer is components.transformer
    assert torch.equal(components.encode_prompts(prompts), reference)

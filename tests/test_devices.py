"""Every tensor is made where the model lives: the DiT on the meta device (a stand-in for cuda:N that a CPU has)
turns any stray CPU tensor that meets it into "Tensor on device cpu is not on the expected device meta"."""
import dataclasses

import pytest
import torch

from anima_lib import cache, models, sampler, flow
from anima_lib.distill import deturbo
from anima_lib.nano_world.prompts import vocabulary


@pytest.fixture(scope="module")
def on_meta():
    components = models.build_nano(vocabulary(), seed=0)
    context = components.encode_prompts(["a blue round creature with two eyes"])   # the text path runs on the CPU
    components.transformer.to("meta")
    assert components.device.type == "meta"

    def encode_on_meta(prompts):   # the text path's output as it arrives on the model's device
        return torch.zeros(len(prompts), *context.shape[1:], device="meta")

    text_on_meta = dataclasses.replace(components)
    object.__setattr__(text_on_meta, "encode_prompts", encode_on_meta)
    return text_on_meta


def test_cache_shard_is_computed_on_the_models_device(on_meta):
    records = cache.nano_prompts(3, seed=0)
    cfg = cache.CacheConfig(steps=3, shift=3.0, guidance_scale=4.0, negative_prompt="", image_size=32, shard_size=3,
                            dtype="bfloat16", teacher="nano")
    tensors = cache.shard_tensors(on_meta, records, cfg, text_path_at=lambda precision: on_meta)
    assert tensors["noise"].device.type == "meta" and tensors["x0"].device.type == "meta"


def test_student_samples_and_velocity_errors_run_on_the_models_device(on_meta):
    class Params:
        class sampler:
            sigma_max, student_mid_times = 80.0, [1.3, 1.0, 0.6]
    contexts = torch.zeros(2, 16, 64)   # from the cache: host memory
    latents = deturbo.student_samples(on_meta.transformer, contexts, on_meta.latent_shape(32), Params, seed=0)
    assert latents.device.type == "meta"
    velocity = lambda x, s, c: models.transformer_velocity(on_meta.transformer, x, s, c)  # noqa: E731
    x0 = torch.zeros(2, *on_meta.latent_shape(32), device="meta")
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta"):  # only the final float() needs numbers
        deturbo.velocity_error_by_time({"student": velocity}, velocity, x0, contexts.to("meta"),
                                       contexts[:1].to("meta"), buckets=1)


def test_cache_batches_come_on_the_requested_device(tmp_path):
    components = models.build_nano(vocabulary(), seed=0)
    params_cfg = cache.CacheConfig(steps=2, shift=3.0, guidance_scale=4.0, negative_prompt="", image_size=32,
                                   shard_size=4, dtype="bfloat16", teacher="nano")
    cache.build_cache(components, cache.nano_prompts(4, seed=0), params_cfg, tmp_path, progress=False)
    batch = cache.CacheBatches(tmp_path, device="meta").batch(0, 2)
    assert {t.device.type for t in batch.values()} == {"meta"}


def test_randn_draws_the_same_numbers_whatever_the_device():
    a = models.randn((3, 4), torch.Generator().manual_seed(5), "cpu")
    b = models.randn((3, 4), torch.Generator().manual_seed(5), "meta")
    assert b.device.type == "meta" and torch.equal(a, torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))

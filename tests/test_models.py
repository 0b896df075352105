import copy
import math

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from anima_lib import checkpoints, flow, models
from anima_lib.nano_world.prompts import sample_creatures, vocabulary

PROMPTS = [c.prompt() for c in sample_creatures(3, seed=0)]


@pytest.fixture(scope="module")
def nano():
    return models.build_nano(vocabulary(), seed=0)


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(base_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def test_real_anima_sizes_on_meta_device():
    meta = models.build_meta_anima_2b()
    assert models.count_parameters(meta["transformer"]) == models.ANIMA_2B_TRANSFORMER_PARAMS == 1_956_405_248
    assert models.count_parameters(meta["text_encoder"]) == 596_049_920
    assert models.count_parameters(meta["text_conditioner"]) == 134_663_680
    assert models.count_parameters(meta["vae"]) == 126_892_531
    assert all(p.device.type == "meta" for p in meta["transformer"].parameters())


def test_nano_is_deterministic_in_seed():
    a, b, c = (models.build_nano(vocabulary(), seed=s) for s in (0, 0, 1))
    sa, sb, sc = (m.transformer.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_nano_text_path_and_velocity_shapes(nano):
    context = nano.encode_prompts(PROMPTS)
    assert context.shape == (3, models.NANO_MAX_TOKENS, models.NANO_CONDITIONER["target_dim"])
    # the conditioner zeroes padded query positions; real prompts are shorter than the pad length
    n_tokens = len(PROMPTS[0].split())
    assert context[0, n_tokens:].abs().sum() == 0 and context[0, :n_tokens].abs().sum() > 0
    x = torch.randn(3, *nano.latent_shape(32))
    v = nano.velocity(x, torch.tensor([0.2, 0.5, 1.0]), context)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # conditioning matters and time matters
    assert not torch.allclose(v[0], nano.velocity(x, torch.tensor([0.2, 0.5, 1.0]), context.flip(0))[0])
    assert not torch.allclose(v, nano.velocity(x, torch.tensor([0.3, 0.5, 1.0]), context))


def test_empty_negative_prompt_is_a_zero_context(nano):
    negative = nano.encode_prompts([""])
    assert negative.shape[0] == 1 and negative.abs().sum() == 0


def test_unknown_words_are_an_error_listing_the_vocabulary(nano):
    with pytest.raises(ValueError, match=r"words outside the nano vocabulary \['zebra'\]; allowed words: \[.*'blue'"):
        nano.encode_prompts(["a zebra creature"])
    with pytest.raises(ValueError, match="the nano context holds"):
        nano.encode_prompts([" ".join(["a"] * 40)])


def test_pixel_shuffle_codec_is_exact():
    codec = models.PixelShuffleCodec(4)
    images = torch.rand(2, 3, 32, 32)
    latents = codec.encode(images)
    assert latents.shape == (2, 48, 1, 8, 8)
    assert torch.allclose(codec.decode(latents), images, atol=1e-7)
    with pytest.raises(ValueError, match="multiple of 4"):
        codec.encode(torch.rand(1, 3, 30, 30))


def test_vae_codec_normalizes_with_latent_stats():
    vae = tiny_vae()
    codec = models.VAECodec(vae)
    images = torch.rand(1, 3, 32, 32)
    latents = codec.encode(images)
    assert latents.shape == (1, 16, 1, 4, 4) and codec.factor == 8
    raw = vae.encode((images * 2 - 1).unsqueeze(2)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-5)
    decoded = codec.decode(latents)
    expected = ((vae.decode(raw).sample[:, :, 0] + 1) / 2).clamp(0, 1)
    assert torch.allclose(decoded, expected, atol=1e-5)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_diffusers_folder_round_trip_is_bit_exact(nano, tmp_path):
    with_vae = models.AnimaComponents(**{**nano.__dict__, "codec": models.VAECodec(tiny_vae()), "preset": "anima-2b"})
    for components, name in ((nano, "nano"), (with_vae, "anima")):
        folder = checkpoints.save_diffusers_folder(components, tmp_path / name)
        loaded = checkpoints.load_diffusers_folder(folder)
        for part in ("transformer", "text_encoder", "text_conditioner"):
            _assert_same_weights(getattr(components, part), getattr(loaded, part))
        if name == "anima":
            _assert_same_weights(components.vae, loaded.vae)
        assert torch.equal(components.encode_prompts(PROMPTS), loaded.encode_prompts(PROMPTS))
        assert loaded.preset == ("nano" if name == "nano" else "anima-2b")


def test_diffusers_loader_names_missing_parts(nano, tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no such local folder"):
        checkpoints.load_diffusers_folder(tmp_path / "nowhere")
    folder = checkpoints.save_diffusers_folder(nano, tmp_path / "nano")
    import shutil
    shutil.rmtree(folder / "text_conditioner")
    with pytest.raises(checkpoints.CheckpointError, match=r"missing component folder\(s\) \['text_conditioner'\]"):
        checkpoints.load_diffusers_folder(folder)


# --- ComfyUI split files ----------------------------------------------------------------------------------------------
from anima_lib import comfy_keys  # noqa: E402


def test_comfy_dit_key_map_matches_the_original_cosmos_names():
    state = models.build_meta_anima_2b()["transformer"].state_dict()
    comfy = {comfy_keys.dit_key_to_comfy(k): k for k in state}
    assert len(comfy) == len(state) == 567                      # a bijection on the real 2B keys
    for original in ("x_embedder.proj.1.weight", "t_embedder.1.linear_2.weight", "t_embedding_norm.weight",
                     "final_layer.linear.weight", "final_layer.adaln_modulation.2.weight",
                     "blocks.27.self_attn.output_proj.weight", "blocks.0.cross_attn.k_norm.weight",
                     "blocks.3.mlp.layer1.weight", "blocks.3.adaln_modulation_cross_attn.1.weight"):
        assert original in comfy, original
    assert all(comfy_keys.dit_key_to_diffusers(k) == v for k, v in comfy.items())


def test_comfy_vae_key_map_on_the_real_vae():
    state = models.build_meta_anima_2b()["vae"].state_dict()
    comfy = {comfy_keys.vae_key_to_comfy(k, 2): k for k in state}
    assert len(comfy) == len(state) == 194
    for original in ("conv1.weight", "conv2.bias", "encoder.conv1.weight", "decoder.head.2.weight",
                     "encoder.downsamples.3.shortcut.weight", "encoder.downsamples.5.time_conv.weight",
                     "decoder.upsamples.3.resample.1.weight", "decoder.upsamples.7.time_conv.weight",
                     "decoder.upsamples.4.shortcut.weight", "decoder.middle.1.to_qkv.weight"):
        assert original in comfy, original
    shapes = {k: torch.empty(state[v].shape, device="meta") for k, v in comfy.items()}
    config = comfy_keys.vae_config_from_comfy(shapes)
    assert config == dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                          temperal_downsample=[False, True, True])


def tiny_anima(nano):
    """Tiny random modules with the real model's non-shape settings (rope scale, no extra pos-embed, ...)."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel
    torch.manual_seed(1)
    transformer = CosmosTransformer3DModel(**{**models.ANIMA_2B_TRANSFORMER, "num_attention_heads": 2,
                                              "attention_head_dim": 16, "num_layers": 2, "text_embed_dim": 64,
                                              "adaln_lora_dim": 8})
    conditioner = AnimaTextConditioner(**{**models.ANIMA_2B_CONDITIONER, "source_dim": 64, "target_dim": 64,
                                          "model_dim": 64, "num_layers": 2, "num_attention_heads": 4,
                                          "target_vocab_size": len(nano.tokenizer)})
    from transformers import Qwen3Config, Qwen3Model
    text_encoder = Qwen3Model(Qwen3Config(**{**models.ANIMA_2B_TEXT_ENCODER, "vocab_size": len(nano.tokenizer),
                                             "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}))
    return models.AnimaComponents(transformer=transformer, text_encoder=text_encoder.eval(),
                                  text_conditioner=conditioner, tokenizer=nano.tokenizer,
                                  t5_tokenizer=nano.t5_tokenizer, codec=models.VAECodec(tiny_vae()), preset="anima-2b")


def test_comfy_split_round_trip_is_bit_exact(nano, tmp_path):
    original = tiny_anima(nano)
    paths = checkpoints.save_comfy_split(original, tmp_path / "comfy")
    from safetensors.torch import load_file
    dit_keys = set(load_file(paths["comfy_diffusion_model"]))
    assert "net.blocks.0.self_attn.q_proj.weight" in dit_keys and "net.llm_adapter.blocks.0.self_attn.q_proj.weight" in dit_keys
    assert "model.embed_tokens.weight" in load_file(paths["comfy_text_encoder"])
    loaded = checkpoints.load_comfy_split(paths["comfy_diffusion_model"], paths["comfy_text_encoder"],
                                          paths["comfy_vae"], paths["tokenizer_dir"])
    for part in ("transformer", "text_encoder", "text_conditioner", "vae"):
        _assert_same_weights(getattr(original, part), getattr(loaded, part))
    context = original.encode_prompts(PROMPTS)
    assert torch.equal(context, loaded.encode_prompts(PROMPTS))
    x = torch.randn(3, *original.latent_shape(32))
    sigma = torch.tensor([0.3, 0.6, 0.9])
    assert torch.equal(original.velocity(x, sigma, context), loaded.velocity(x, sigma, context))
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(original.codec.decode(original.codec.encode(images)), loaded.codec.decode(loaded.codec.encode(images)))


def test_comfy_loader_errors_name_the_file(nano, tmp_path):
    paths = checkpoints.save_comfy_split(tiny_anima(nano), tmp_path / "comfy")
    with pytest.raises(checkpoints.CheckpointError, match="model.comfy_vae: no such local file"):
        checkpoints.load_comfy_split(paths["comfy_diffusion_model"], paths["comfy_text_encoder"],
                                     tmp_path / "missing.safetensors", paths["tokenizer_dir"])
    from safetensors.torch import load_file, save_file
    state = load_file(paths["comfy_diffusion_model"])
    state.pop("net.blocks.1.mlp.layer2.weight")
    broken = tmp_path / "broken.safetensors"
    save_file(state, broken)
    with pytest.raises(checkpoints.CheckpointError, match=r"missing \['transformer_blocks.1.ff.net.2.weight'\]"):
        checkpoints.load_comfy_split(broken, paths["comfy_text_encoder"], paths["comfy_vae"], paths["tokenizer_dir"])


def test_bf16_loads_keep_the_float32_modules_float32_without_the_cast_warning(nano, tmp_path, capfd):
    from diffusers import CosmosTransformer3DModel
    transformer = CosmosTransformer3DModel(**{**models.NANO_TRANSFORMER, "extra_pos_embed_type": "learnable"})
    transformer.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    loaded = CosmosTransformer3DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.bfloat16)
    components = models.AnimaComponents(transformer=copy.deepcopy(transformer), text_encoder=nano.text_encoder,
                                        text_conditioner=nano.text_conditioner, tokenizer=nano.tokenizer,
                                        t5_tokenizer=nano.t5_tokenizer, codec=nano.codec, preset="nano")
    capfd.readouterr()
    components.to(dtype=torch.bfloat16)
    assert "should be kept in float32" not in capfd.readouterr().err   # diffusers' logger writes to stderr
    for cast in (loaded, components.transformer):   # diffusers' loader and our cast agree, tensor by tensor
        dtypes = {name: p.dtype for name, p in cast.named_parameters()}
        assert all(d == torch.float32 for n, d in dtypes.items() if n.startswith("learnable_pos_embed."))
        assert any(n.startswith("learnable_pos_embed.") for n in dtypes)
        assert all(d == torch.bfloat16 for n, d in dtypes.items() if not n.startswith("learnable_pos_embed."))
    nano.to(dtype=torch.float32)


# --- loading at the run's dtype: float32-kept modules stay float32, no diffusers cast notice --------------------------
import logging  # noqa: E402

from anima_lib import config, sampler, text  # noqa: E402
from anima_lib.nano_world import teacher as nano_teacher  # noqa: E402

FP32_NOTICE = "should be kept in float32"


class _Notices(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_notices():
    handler = _Notices()
    logging.getLogger("diffusers").addHandler(handler)
    yield handler.messages
    logging.getLogger("diffusers").removeHandler(handler)


def test_bf16_run_loads_the_nano_teacher_at_bf16_with_learnable_pos_embed_float32(nano, tmp_path, diffusers_notices):
    from diffusers import CosmosTransformer3DModel
    torch.manual_seed(2)   # a nano teacher whose DiT has the float32-kept module (Cosmos' learnable_pos_embed)
    transformer = CosmosTransformer3DModel(**{**models.NANO_TRANSFORMER, "extra_pos_embed_type": "learnable"})
    saved = {k: v.clone() for k, v in transformer.state_dict().items()}
    folder = nano_teacher.save_teacher(models.AnimaComponents(**{**nano.__dict__, "transformer": transformer}),
                                       tmp_path / "teacher", {"what": "test teacher"})
    params = config.load_config("nano", [f"model.nano_weights={folder}", "model.dtype=bfloat16"])
    components = models.load_components(params)
    state = components.transformer.state_dict()
    pos = [k for k in state if k.startswith("learnable_pos_embed.")]
    assert pos and all(state[k].dtype == torch.float32 and torch.equal(state[k], saved[k]) for k in pos)
    assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], saved[k].to(torch.bfloat16))
               for k in state if k not in pos and saved[k].is_floating_point())
    assert components.text_conditioner.dtype == components.text_encoder.dtype == torch.bfloat16
    for precision in ("bf16", "f16"):   # the cache's text paths: cast without diffusers' .to() notice
        assert text.text_path_at(components, precision).text_conditioner.dtype != torch.float32
    assert [m for m in diffusers_notices if FP32_NOTICE in m] == []
    copy.deepcopy(components.text_conditioner).to(torch.float16)   # the notice a .to(dtype) cast does log
    assert any(FP32_NOTICE in m for m in diffusers_notices), "the handler no longer sees diffusers' notice"


def test_text_path_cast_equals_a_plain_cast(nano):
    """text_path_at casts with cast_floating (no notice); for the text modules it is exactly .to(dtype)."""
    for precision, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        path = text.text_path_at(nano, precision)
        for name in ("text_encoder", "text_conditioner"):
            plain = copy.deepcopy(getattr(nano, name)).float().to(dtype).state_dict()
            cast = getattr(path, name).state_dict()
            assert all(cast[k].dtype == plain[k].dtype and torch.equal(cast[k], plain[k]) for k in plain), name


# --- the student's few-step sampler, put together once ----------------------------------------------------------------

def test_velocity_fn_is_the_dit_call(nano):
    x, sigma = torch.randn(2, *nano.latent_shape(32)), torch.tensor([0.3, 0.8])
    context = nano.encode_prompts(PROMPTS[:2])
    assert torch.equal(models.velocity_fn(nano.transformer)(x, sigma, context),
                       models.transformer_velocity(nano.transformer, x, sigma, context))
    assert copy.deepcopy(models.velocity_fn(nano.transformer)).__closure__[0].cell_contents is nano.transformer


def test_student_sample_is_the_run_schedule_batched(nano):
    params = config.load_config("nano")
    generator = torch.Generator().manual_seed(0)
    context = nano.encode_prompts(PROMPTS)
    noises = [torch.randn(3, *nano.latent_shape(32), generator=generator) for _ in range(2)]
    times = sampler.student_times(params, 2)
    assert times == [math.atan(params.sampler.sigma_max), params.sampler.student_mid_times[0], 0.0]
    by_hand = sampler.consistency_sample(models.velocity_fn(nano.transformer), noises, times, context)
    assert torch.equal(sampler.student_sample(nano.transformer, noises, context, params), by_hand)
    batched = sampler.student_sample(nano.transformer, noises, context, params, batch_size=2)
    assert torch.allclose(batched, by_hand, atol=1e-5)   # row chunks change only the matmul blocking
    trace: list = []
    sampler.student_sample(nano.transformer, noises, context, params, trace=trace)
    assert [float(t["sigma"][0]) for t in trace] == pytest.approx([flow.trig_to_rf_time(t) for t in times[:-1]])
    with pytest.raises(ValueError, match="a trace records one batch"):
        sampler.student_sample(nano.transformer, noises, context, params, batch_size=2, trace=[])
    with pytest.raises(ValueError, match=r"noises have \[3, 2\] rows, the context 3"):
        sampler.student_sample(nano.transformer, [noises[0], noises[1][:2]], context, params)
    as_f64 = sampler.student_sample(nano.transformer, noises, context, params, dtype=torch.float64)
    assert as_f64.dtype == torch.float64   # the chain runs in `dtype`; the DiT call casts to its own

"""The Anima networks with the real diffusers/transformers classes, at nano size or at the real 2B size.

  transformer       CosmosTransformer3DModel   latents [B,C,1,H,W] + RF sigma + context -> RF velocity
  text_encoder      transformers Qwen3Model    frozen; last_hidden_state feeds the conditioner
  text_conditioner  AnimaTextConditioner       the "LLM adapter": T5-vocabulary queries cross-attend to Qwen states
  codec             images <-> normalized latents: the Qwen-Image VAE (real) or an exact pixel-shuffle codec (nano)

The bottom of the loading stack: `checkpoints` (files) builds on this module and `models.load_components` (what
notebooks call) sits above both, re-exporting every name defined here.
"""
from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub: every load is from a local path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# --- The real Anima configs (Cosmos-Predict2-2B DiT, Qwen3-0.6B body, LLM adapter defaults, Qwen-Image VAE defaults) ---
ANIMA_2B_TRANSFORMER = dict(
    in_channels=16, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28, mlp_ratio=4.0,
    text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2),
    rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True, extra_pos_embed_type=None)
ANIMA_2B_TEXT_ENCODER = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
    tie_word_embeddings=True)
ANIMA_2B_CONDITIONER = dict(
    source_dim=1024, target_dim=1024, model_dim=1024, num_layers=6, num_attention_heads=16, mlp_ratio=4.0,
    target_vocab_size=32128, use_self_attention=True, use_layer_norm=False, min_sequence_length=512)
ANIMA_2B_VAE: dict[str, Any] = {}  # AutoencoderKLQwenImage() defaults are the real VAE
ANIMA_2B_TRANSFORMER_PARAMS = 1_956_405_248  # diffusers 0.42.1 on the meta device

# --- The nano family: the same classes at tiny sizes (32x32 RGB images, 4x pixel-shuffle codec -> 48x8x8 latents) ---
# patch 1: 64 tokens of 4x4 pixels (48 values) under hidden 128, so each token's noise fits through the width to the
# velocity (patch 2 put 192 values under hidden 192: samples kept visible noise and smeared eyes)
NANO_CODEC_FACTOR = 4
NANO_TRANSFORMER = dict(
    in_channels=3 * NANO_CODEC_FACTOR ** 2, out_channels=3 * NANO_CODEC_FACTOR ** 2, num_attention_heads=4,
    attention_head_dim=32, num_layers=6, mlp_ratio=4.0, text_embed_dim=64, adaln_lora_dim=32, max_size=(4, 32, 32),
    patch_size=(1, 1, 1), rope_scale=(1.0, 1.0, 1.0), concat_padding_mask=True, extra_pos_embed_type=None)
NANO_TEXT_ENCODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, rope_theta=10_000.0, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
NANO_CONDITIONER = dict(
    source_dim=64, target_dim=64, model_dim=64, num_layers=2, num_attention_heads=4, mlp_ratio=4.0,
    use_self_attention=True, use_layer_norm=False, min_sequence_length=16)
NANO_MAX_TOKENS = 16  # prompt length limit (the longest nano prompt has 14 words); contexts are padded to it


class PixelShuffleCodec:
    """The nano stand-in for the VAE: an exact, invertible space-to-depth map (no learning, no loss).

    images [B,3,H,W] in [0,1] -> latents [B, 3*f*f, 1, H/f, W/f] in [-1,1]; decode(encode(x)) == x exactly.
    """

    def __init__(self, factor: int = NANO_CODEC_FACTOR):
        self.factor = factor
        self.latent_channels = 3 * factor * factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {self.factor}")
        return F.pixel_unshuffle(images * 2 - 1, self.factor).unsqueeze(2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((F.pixel_shuffle(latents.squeeze(2), self.factor) + 1) / 2).clamp(0, 1)


class VAECodec:
    """The real codec: AutoencoderKLQwenImage with Anima's per-channel latent normalization (z - mean) / std."""

    def __init__(self, vae: AutoencoderKLQwenImage):
        self.vae = vae
        self.latent_channels = vae.config.z_dim
        self.factor = 2 ** (len(vae.config.dim_mult) - 1)

    def _stats(self, like: torch.Tensor):
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode((images * 2 - 1).unsqueeze(2).to(self.vae.dtype)).latent_dist.mode()
        mean, std = self._stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        images = self.vae.decode((latents * std + mean).to(self.vae.dtype)).sample[:, :, 0]
        return ((images.float() + 1) / 2).clamp(0, 1)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a network's weights live: every tensor it is fed is made or moved there."""
    return next(module.parameters()).device


def randn(shape, generator: torch.Generator, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise from a CPU generator (the same numbers whatever the device, so seeds mean the same on a GPU box), put
    where the model lives. The one way this code draws noise for a model."""
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters and buffers to `dtype`, except under the modules the class keeps in float32
    (`_keep_in_fp32_modules`, e.g. Cosmos' learnable_pos_embed), as diffusers' loader does with torch_dtype — a plain
    `.to(dtype)` would cast those too (and diffusers warns that it does)."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, sub in module.named_modules():
            target = torch.float32 if keep & set(name.split(".")) else dtype
            for tensors in (sub._parameters, sub._buffers):
                for key, value in tensors.items():
                    if value is not None and value.is_floating_point() and value.dtype != target:
                        if isinstance(value, torch.nn.Parameter):
                            value.data = value.data.to(target)
                        else:
                            tensors[key] = value.to(target)
    return module


@dataclass
class AnimaComponents:
    transformer: CosmosTransformer3DModel
    text_encoder: Qwen3Model
    text_conditioner: AnimaTextConditioner
    tokenizer: Any              # Qwen side (Qwen2Tokenizer for the real model)
    t5_tokenizer: Any           # T5 side: ids for the conditioner's query embeddings
    codec: Any                  # PixelShuffleCodec or VAECodec
    preset: str
    max_tokens: int = 512

    @property
    def device(self) -> torch.device:
        return device_of(self.transformer)

    @property
    def vae(self) -> Optional[AutoencoderKLQwenImage]:
        return self.codec.vae if isinstance(self.codec, VAECodec) else None

    def to(self, device=None, dtype=None) -> "AnimaComponents":
        for module in (self.transformer, self.text_encoder, self.text_conditioner, self.vae):
            if module is not None:
                module.to(device=device)
                if dtype is not None:
                    cast_floating(module, dtype)
        return self

    def eval(self) -> "AnimaComponents":
        for module in (self.transformer, self.text_encoder, self.text_conditioner, self.vae):
            if module is not None:
                module.eval().requires_grad_(False)
        return self

    def latent_shape(self, image_size: int) -> tuple[int, int, int, int]:
        side = image_size // self.codec.factor
        return (self.codec.latent_channels, 1, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The exact context the DiT consumes: Qwen3 last_hidden_state (masked) -> conditioner -> [B, L_pad, D]."""
        return encode_prompts(self, prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return transformer_velocity(self.transformer, x, sigma, context)


def transformer_velocity(transformer: CosmosTransformer3DModel, x: torch.Tensor, sigma: torch.Tensor,
                         context: torch.Tensor) -> torch.Tensor:
    """One DiT call in Anima's convention: timestep = RF sigma in [0,1], a zero padding mask, output = RF velocity."""
    dtype = transformer.dtype
    padding_mask = torch.zeros(1, 1, x.shape[-2], x.shape[-1], device=x.device, dtype=dtype)
    out = transformer(hidden_states=x.to(dtype), timestep=sigma.to(dtype), encoder_hidden_states=context.to(dtype),
                      padding_mask=padding_mask, return_dict=False)[0]
    return out.to(x.dtype)


def velocity_fn(transformer: CosmosTransformer3DModel) -> Callable:
    """The `velocity_fn(x, sigma, context)` a sampler or loss takes, for one DiT (teacher, student, LoRA-carrying).
    A closure, not functools.partial: copy.deepcopy of it keeps the DiT shared instead of copying it."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return transformer_velocity(transformer, x, sigma, context)

    return velocity


def encode_prompts(components: AnimaComponents, prompts: list[str]) -> torch.Tensor:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if components.preset == "nano":
        check_nano_prompts(components, prompts)
    device = components.text_encoder.device
    qwen = components.tokenizer(prompts, padding="longest", max_length=components.max_tokens, truncation=True,
                                return_tensors="pt").to(device)
    t5 = components.t5_tokenizer(prompts, padding="longest", max_length=components.max_tokens, truncation=True,
                                 return_tensors="pt").to(device)
    qwen_ids, qwen_mask = qwen.input_ids, qwen.attention_mask
    if qwen_ids.shape[-1] == 0:  # an empty negative prompt: one masked token, as the Anima pipeline does
        qwen_ids, qwen_mask = qwen_ids.new_zeros(len(prompts), 1), qwen_mask.new_zeros(len(prompts), 1)
    hidden = components.text_encoder(input_ids=qwen_ids, attention_mask=qwen_mask).last_hidden_state
    hidden = hidden * qwen_mask.to(hidden).unsqueeze(-1)
    t5_ids, t5_mask = t5.input_ids, t5.attention_mask
    if t5_ids.shape[-1] == 0:
        t5_ids, t5_mask = t5_ids.new_zeros(len(prompts), 1), t5_mask.new_zeros(len(prompts), 1)
    return components.text_conditioner(source_hidden_states=hidden.to(components.text_conditioner.dtype),
                                       target_input_ids=t5_ids, target_attention_mask=t5_mask,
                                       source_attention_mask=qwen_mask)


def check_nano_prompts(components: AnimaComponents, prompts: list[str]) -> None:
    """The nano vocabulary is closed: unknown words or over-long prompts are errors, never silent <unk>/truncation."""
    vocab = components.tokenizer.get_vocab()
    for prompt in prompts:
        words = prompt.split()
        unknown = sorted({w for w in words if w not in vocab})
        if unknown:
            allowed = sorted(w for w in vocab if not w.startswith("["))
            raise ValueError(f"prompt {prompt!r}: words outside the nano vocabulary {unknown}; allowed words: {allowed}")
        if len(words) > components.max_tokens:
            raise ValueError(f"prompt {prompt!r}: {len(words)} words, the nano context holds {components.max_tokens}")


# --- builders ------------------------------------------------------------------------------------------------------

def nano_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the nano prompt vocabulary; used for both the Qwen-side and the T5-side ids."""
    specials = ["[PAD]", "[UNK]"]
    vocab = {word: i for i, word in enumerate(specials + sorted(set(vocabulary) - set(specials)))}
    tok = Tokenizer(tokenizer_models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=NANO_MAX_TOKENS)


def build_nano(vocabulary: list[str], seed: int = 0) -> AnimaComponents:
    """Random-init nano components, deterministic in `seed`."""
    tokenizer = nano_tokenizer(vocabulary)
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                          **NANO_TEXT_ENCODER))
    conditioner = AnimaTextConditioner(target_vocab_size=len(tokenizer), **NANO_CONDITIONER)
    transformer = CosmosTransformer3DModel(**NANO_TRANSFORMER)
    return AnimaComponents(transformer=transformer, text_encoder=text_encoder, text_conditioner=conditioner,
                           tokenizer=tokenizer, t5_tokenizer=copy.deepcopy(tokenizer), codec=PixelShuffleCodec(),
                           preset="nano", max_tokens=NANO_MAX_TOKENS).eval()


def build_meta_anima_2b() -> dict[str, torch.nn.Module]:
    """The real 2B-class modules on the meta device: exact shapes and parameter counts, no memory."""
    with init_empty_weights():
        return {
            "transformer": CosmosTransformer3DModel(**ANIMA_2B_TRANSFORMER),
            "text_encoder": Qwen3Model(Qwen3Config(**ANIMA_2B_TEXT_ENCODER)),
            "text_conditioner": AnimaTextConditioner(**ANIMA_2B_CONDITIONER),
            "vae": AutoencoderKLQwenImage(**ANIMA_2B_VAE),
        }


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): which teacher a cache or student came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

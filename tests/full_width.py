"""A full-width Anima for tests of the real (anima-2b) code path, with nothing downloaded.

  transformer       CosmosTransformer3DModel at the real config (hidden 2048 = 16 x 128 heads, text dim 1024, adaLN-LoRA
                    256, patch (1, 2, 2), rope scale (1, 4, 4)) with `dit_blocks` blocks instead of 28
  text_encoder      Qwen3 at the real widths and vocabulary (hidden 1024, 16/8 heads of 128, vocab 151,936) with
                    `text_layers` layers instead of 28
  text_conditioner  AnimaTextConditioner at the real config (6 blocks, T5 vocabulary 32,128, pads to 512)
  codec             the real Qwen-Image VAE config (AutoencoderKLQwenImage() defaults), or a narrow one (`vae="narrow"`)
  tokenizers        in the real formats, trained here with the `tokenizers` library on the shipped prompt files: a
                    Qwen2Tokenizer (byte-level BPE with Qwen's split regex) and a T5Tokenizer (unigram, </s> appended,
                    100 extra ids), both written by save_pretrained as tokenizer.json + tokenizer_config.json

Weights are random (seeded). Also here: tiny random metric weights (torch-fidelity's InceptionV3 layout; an open_clip
model in a `local-dir:` folder), small prompt files, a style folder, a preset extending params/anima-2b.yaml at tiny
work sizes, and the nano guard: a sitecustomize that makes importing the nano renderer or probe, or calling
sample_creatures, raise (and logs it) in every Python process that starts with it on PYTHONPATH.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from anima_lib import config, models

REPO_ROOT = config.REPO_ROOT
DIT_BLOCKS, TEXT_LAYERS = 2, 2
IMAGE_SIZE = 64   # VAE 8x down, patch 2: 4 x 4 DiT tokens

TRAIN_PROMPTS = [{"id": "fw-train-0", "prompt": "A red fox asleep on a mossy stone, soft morning light."},
                 {"id": "fw-train-1", "prompt": "two knights guarding a castle gate at dusk — game art"}]
EVAL_PROMPTS = [{"id": "fw-eval-0", "category": "colors", "prompt": "a blue teapot next to a yellow cup"},
                {"id": "fw-eval-1", "category": "studio", "prompt": "a small dragon made of leaves, 3/4 view"}]
STYLE_CAPTIONS = ["a tree in our style", "a house in our style", "a cat in our style", "a boat in our style"]


# --- tokenizers in the real formats --------------------------------------------------------------------------------

def _corpus() -> list[str]:
    texts = [p["prompt"] for p in TRAIN_PROMPTS + EVAL_PROMPTS] + STYLE_CAPTIONS
    for path in sorted((REPO_ROOT / "params" / "prompts").glob("*.jsonl")):
        texts += [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return texts


def qwen_tokenizer(vocab_size: int = 1000):
    """A Qwen2Tokenizer (Qwen3's class): byte-level BPE under Qwen's pre-tokenizer, <|endoftext|> as pad/eos."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    backend = Qwen2Tokenizer().backend_tokenizer  # Qwen's normalizer, split regex and byte-level mapping
    backend.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    model = json.loads(backend.to_str())["model"]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def t5_tokenizer(vocab_size: int = 800):
    """A T5Tokenizer: unigram pieces with scores, <pad>=0 </s>=1 <unk>=2, </s> appended, 100 extra ids."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers, trainers
    from transformers import T5Tokenizer
    unigram = Tokenizer(tmodels.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(_corpus(), trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    return T5Tokenizer(vocab=[tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]])


# --- the components ----------------------------------------------------------------------------------------------------

def narrow_vae():
    from diffusers import AutoencoderKLQwenImage
    return AutoencoderKLQwenImage(base_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def build_components(seed: int = 0, dit_blocks: int = DIT_BLOCKS, text_layers: int = TEXT_LAYERS,
                     vae: str = "real") -> models.AnimaComponents:
    """Random full-width components (float32, eval mode), deterministic in `seed`."""
    from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
    from transformers import Qwen3Config, Qwen3Model
    qwen, t5 = qwen_tokenizer(), t5_tokenizer()
    assert len(qwen) <= models.ANIMA_2B_TEXT_ENCODER["vocab_size"] and len(t5) <= models.ANIMA_2B_CONDITIONER[
        "target_vocab_size"]
    torch.manual_seed(seed)
    transformer = CosmosTransformer3DModel(**{**models.ANIMA_2B_TRANSFORMER, "num_layers": dit_blocks})
    text_encoder = Qwen3Model(Qwen3Config(**{**models.ANIMA_2B_TEXT_ENCODER, "num_hidden_layers": text_layers,
                                             "pad_token_id": qwen.pad_token_id}))
    conditioner = AnimaTextConditioner(**models.ANIMA_2B_CONDITIONER)
    codec = models.VAECodec(AutoencoderKLQwenImage(**models.ANIMA_2B_VAE) if vae == "real" else narrow_vae())
    return models.AnimaComponents(transformer=transformer, text_encoder=text_encoder, text_conditioner=conditioner,
                                  tokenizer=qwen, t5_tokenizer=t5, codec=codec, preset="anima-2b").eval()


def write_checkpoints(components: models.AnimaComponents, folder: Path, dtype=torch.bfloat16) -> dict[str, dict]:
    """The same weights as a diffusers folder and as ComfyUI split files (stored in `dtype`, as releases are);
    returns the model.* parameters of each layout."""
    from anima_lib import checkpoints
    components.to(dtype=dtype)
    try:
        diffusers_dir = checkpoints.save_diffusers_folder(components, Path(folder) / "Anima-Diffusers")
        comfy = checkpoints.save_comfy_split(components, Path(folder) / "comfy")
    finally:
        components.to(dtype=torch.float32)
    return {"diffusers": {"diffusers_dir": str(diffusers_dir)},
            "comfy": {"diffusers_dir": None, **{k: str(v) for k, v in comfy.items()}}}


# --- the evaluation world's files ----------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_inception_weights(path: Path) -> Path:
    """torch-fidelity's InceptionV3 layout with random (variance-preserving) weights, saved as the real .pth is."""
    import pytest
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    with pytest.MonkeyPatch.context() as patch:  # build the architecture without fetching the real weights
        patch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_clip(folder: Path) -> tuple[str, Path]:
    """A tiny random open_clip model as a `local-dir:` folder (open_clip_config.json + weights): (model name, file)."""
    import open_clip
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    path = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return f"local-dir:{folder}", path


def write_style_folder(folder: Path, size: int = IMAGE_SIZE) -> Path:
    """Four flat-coloured images with a dark outline and same-name captions (the studio's style folder format)."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(STYLE_CAPTIONS):
        image = np.zeros((size, size, 3), np.uint8)
        image[4:-4, 4:-4] = (40 + 50 * i, 200 - 40 * i, 120)
        Image.fromarray(image).save(folder / f"style_{i}.png")
        (folder / f"style_{i}.txt").write_text(caption + "\n")
    return folder


def write_world(folder: Path) -> dict:
    folder = Path(folder)
    clip_model, clip_checkpoint = write_clip(folder / "clip")
    return {"train": write_jsonl(folder / "train.jsonl", TRAIN_PROMPTS),
            "eval": write_jsonl(folder / "eval.jsonl", EVAL_PROMPTS),
            "inception": write_inception_weights(folder / config.INCEPTION_WEIGHTS_FILE),
            "clip_model": clip_model, "clip_checkpoint": clip_checkpoint,
            "style": write_style_folder(folder / "style")}


# --- the preset --------------------------------------------------------------------------------------------------------

def preset_values(model: dict, world: dict, out: Path, name: str = "fullwidth", threads: int = 2) -> dict:
    """params/anima-2b.yaml with local paths and tiny work sizes (everything else, e.g. distill.tangent fd, bf16 cache
    data, activation checkpointing, quant search, is the anima-2b preset's)."""
    values = yaml.safe_load((REPO_ROOT / "params" / "anima-2b.yaml").read_text())
    small = {
        "run": {"name": name, "device": "cpu", "threads": threads, "output_dir": str(out / "outputs"),
                "report_dir": str(out / "reports")},
        "model": {"dtype": "float32", **model},
        "sampler": {"teacher_steps": 3},
        "gate": {"teacher_steps": [1, 3], "prompts_file": [str(world["eval"])], "n_prompts": 2,
                 "seeds_per_prompt": 2, "image_size": IMAGE_SIZE, "batch_size": 4,
                 "inception_weights": str(world["inception"]), "clip_model": world["clip_model"],
                 "clip_checkpoint": str(world["clip_checkpoint"])},
        "cache": {"prompts_file": str(world["train"]), "shard_size": 2},
        "distill": {"student_updates": 2, "student_every": 2, "batch_size": 2, "checkpoint_every": 2, "minutes": 120,
                    "parallel": "ddp"},
        "deturbo": {"steps": 2, "batch_size": 2, "student_samples": 2, "checkpoint_every": 2, "minutes": 120,
                    "eval_rows": 2},
        "lora": {"style_folder": str(world["style"]), "steps": 2, "batch_size": 2, "checkpoint_every": 2,
                 "minutes": 120, "strengths": [1.0]},
        "quant": {"refine_updates": 2, "refine_prompts": 4, "refine_batch": 2},
    }
    for section, keys in small.items():
        values.setdefault(section, {}).update(keys)
    return values


def write_preset(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# --- the nano guard ------------------------------------------------------------------------------------------------------

NANO_ONLY_MODULES = ("anima_lib.nano_world.renderer", "anima_lib.nano_world.probes",
                     "anima_lib.nano_world.detail_reader")
GUARD_LOG_ENV = "ANIMA_NANO_GUARD_LOG"

_SITECUSTOMIZE = '''\
"""Test guard (tests/full_width.py): on a real preset nothing may import the nano renderer or probe or draw nano
creatures. Importing them raises ImportError, calling sample_creatures raises RuntimeError; each attempt is logged to
${LOG_ENV} with the process and the stack, so a caught exception is still seen."""
import importlib.abc
import importlib.machinery
import os
import sys
import traceback

_LOG = os.environ.get("${LOG_ENV}")
_FORBIDDEN = ${FORBIDDEN}
_PROMPTS = "anima_lib.nano_world.prompts"


def _log(line):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(line + "\\n")


def _violation(what):
    stack = "".join(traceback.format_stack(limit=12)[:-2])
    _log(f"VIOLATION pid {os.getpid()} {' '.join(sys.orig_argv)[:200]!r}: {what}\\n{stack}")


class _Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in _FORBIDDEN:
            _violation(f"import {name}")
            raise ImportError(f"nano-only module {name} imported on a real preset (tests/full_width.py guard)")
        if name == _PROMPTS:
            spec = importlib.machinery.PathFinder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                original = loader.exec_module

                def exec_module(module):
                    original(module)

                    def sample_creatures(*args, **kwargs):
                        _violation("sample_creatures()")
                        raise RuntimeError("nano creatures drawn on a real preset (tests/full_width.py guard)")
                    module.sample_creatures = sample_creatures
                loader.exec_module = exec_module
            return spec
        return None


if _LOG:
    sys.meta_path.insert(0, _Guard())
    _log(f"ACTIVE pid {os.getpid()} {' '.join(sys.orig_argv)[:200]!r}")
'''


def write_guard(folder: Path) -> Path:
    """A folder holding the guard's sitecustomize.py: put it on PYTHONPATH with ANIMA_NANO_GUARD_LOG set."""
    folder.mkdir(parents=True, exist_ok=True)
    text = (_SITECUSTOMIZE.replace("${LOG_ENV}", GUARD_LOG_ENV).replace("${FORBIDDEN}", repr(NANO_ONLY_MODULES)))
    (folder / "sitecustomize.py").write_text(text)
    return folder

"""The distillation cache: prompts, their text embeddings at three precisions, and the teacher's trajectories.

Layout of a cache folder:
    manifest.json          config hash, code version, prompt ids, per-shard {file, sha256, bytes, count, ids}
    shard_00000.safetensors ...   K prompts each:
        context.f16 [K,L,D] float16, context.bf16 [K,L,D] bfloat16, context.q8_0 [K,L,D] float32
        negative.f16 / negative.bf16 / negative.q8_0 [1,L,D]   (the negative prompt's embedding)
        noise [K,C,1,H,W] float32          (seeded by prompt id)
        states [K,N+1,C,1,H,W] <dtype>      x at every teacher sigma (states[:,0] = noise, states[:,-1] = x0)
        velocities [K,N,C,1,H,W] <dtype>    the CFG-guided velocity of every Euler step
        x0 [K,C,1,H,W] <dtype>
        sigmas [N+1] float64
Writes are atomic (temp file + rename; the manifest is rewritten after each shard), so a shard exists complete or
not at all; a run resumes by skipping shards whose file matches the manifest's sha256. Everything is
deterministic in (config, prompt ids), so a resumed cache is byte-identical to an uninterrupted one.
Multi-process (torchrun): rank r writes shards r, r+W, ...; rank 0 merges the manifests.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors.torch import load_file, save

from . import flow, models, sampler, text
from .config import resolve_path
from .checks import Check
from .io import atomic_write_bytes, atomic_write_json, sha256_file

CACHE_PRECISIONS = ("f16", "bf16", "q8_0")
_STORE_DTYPE = {"f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.float32}
MANIFEST = "manifest.json"


class CacheError(RuntimeError):
    """The cache cannot be built or read as asked; the message says what and how to fix it."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    negative: Optional[str] = None
    line: Optional[int] = field(default=None, compare=False)  # where it came from, for skip reasons


# --- prompts in ------------------------------------------------------------------------------------------------------

# More characters than this per token of the limit is over the limit for real text (a 16-word nano prompt is at most
# 175 characters, 2B prompts average ~4 per Qwen token): such a line is refused before tokenizing.
CHARS_PER_TOKEN_CAP = 12


def read_prompts_jsonl(path: Path, max_words: Optional[int] = None,
                       max_chars: Optional[int] = None) -> tuple[list[PromptRecord], list[str]]:
    """Records and a list of skipped lines with reasons. Duplicate ids are an error (which one is meant?)."""
    records, skipped, seen = [], [], {}
    for line_no, raw in enumerate(Path(path).read_bytes().split(b"\n"), 1):  # JSONL lines end at \n only
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CacheError(f"{path}:{line_no}: not valid UTF-8 (byte {exc.start} of the line)") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CacheError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "id" not in row or "prompt" not in row:
            raise CacheError(f"{path}:{line_no}: each line needs 'id' and 'prompt' (optional 'negative')")
        pid, prompt, negative = str(row["id"]), row["prompt"], row.get("negative")
        if negative is not None and not isinstance(negative, str):
            raise CacheError(f"{path}:{line_no}: 'negative' must be a string (got {type(negative).__name__})")
        if pid in seen:
            raise CacheError(f"{path}:{line_no}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = line_no
        if not isinstance(prompt, str) or not prompt.strip():
            skipped.append(f"line {line_no} id {pid!r}: empty prompt")
            continue
        if max_chars is not None and max(len(prompt), len(negative or "")) > max_chars:
            skipped.append(f"line {line_no} id {pid!r}: {max(len(prompt), len(negative or '')):,} characters "
                           f"> {max_chars:,}")
            continue
        if max_words is not None and len(prompt.split()) > max_words:
            skipped.append(f"line {line_no} id {pid!r}: {len(prompt.split())} words > {max_words}")
            continue
        records.append(PromptRecord(pid, prompt, negative, line=line_no))
    return records, skipped


def cap_by_tokens(records: list[PromptRecord], count_tokens: Callable[[str], int],
                  max_tokens: int) -> tuple[list[PromptRecord], list[str]]:
    """Records whose prompt and negative fit the text path's `max_tokens`, and skip reasons for the others (the
    tokenizers would silently truncate them)."""
    kept, skipped = [], []
    for r in records:
        over = [(what, n) for what, text_ in (("prompt", r.prompt), ("negative", r.negative))
                if text_ and (n := count_tokens(text_)) > max_tokens]
        if over:
            where = f"line {r.line} id {r.id!r}" if r.line else f"id {r.id!r}"
            skipped.append(f"{where}: " + ", ".join(f"{what} of {n} tokens" for what, n in over)
                           + f" > {max_tokens} (the text path's limit)")
        else:
            kept.append(r)
    return kept, skipped


def token_counter(components) -> Callable[[str], int]:
    """Tokens the text path sees for a text, untruncated: the longer of its Qwen and T5 tokenizations."""
    def count(text_: str) -> int:
        return max(len(tok(text_)["input_ids"]) for tok in (components.tokenizer, components.t5_tokenizer))
    return count


def require_prompts(records: list[PromptRecord], skipped: list[str], source) -> None:
    """No usable prompt is an error before any compute (later it would be an IndexError)."""
    if not records:
        raise CacheError(f"{source}: no usable prompts ({len(skipped)} skipped; first: {'; '.join(skipped[:3])})")


def nano_prompts(n: int, seed: int) -> list[PromptRecord]:
    from .nano_world.prompts import sample_creatures
    return [PromptRecord(f"nano-{seed}-{i:06d}", c.prompt()) for i, c in enumerate(sample_creatures(n, seed))]


def prompt_seed(prompt_id: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "little") & ((1 << 63) - 1)


# --- sizes -----------------------------------------------------------------------------------------------------------

def human_size(n_bytes: float) -> str:
    """Bytes for people: a nearly full disk reads "3.10 MB", not "0.00 GB"."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"


def bytes_per_prompt(latent_shape: tuple, steps: int, context_shape: tuple, dtype_bytes: int = 2) -> dict[str, int]:
    """The arithmetic of one prompt's cache entry, by tensor group."""
    latent = int(torch.tensor(latent_shape).prod())
    tokens = int(torch.tensor(context_shape).prod())
    return {"states": (steps + 1) * latent * dtype_bytes, "velocities": steps * latent * dtype_bytes,
            "x0": latent * dtype_bytes, "noise": latent * 4,
            "contexts": tokens * (2 + 2 + 4)}  # f16 + bf16 + q8_0 (stored as float32)


def projection_text(per_prompt: dict[str, int], counts=(100_000, 250_000)) -> str:
    total = sum(per_prompt.values())
    lines = [f"  {k}: {v:,} B" for k, v in per_prompt.items()] + [f"  total: {total:,} B per prompt"]
    for n in counts:
        lines.append(f"  x {n:,} prompts = {total * n / 1e12:.2f} TB ({total * n / 2 ** 40:.2f} TiB)")
    return "\n".join(lines)


# --- writing ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheConfig:
    steps: int
    shift: float
    guidance_scale: float
    negative_prompt: str
    image_size: int
    shard_size: int
    dtype: str                      # trajectory dtype: "bfloat16" | "float16" | "float32"
    teacher: str                    # what produced the trajectories (a path or "random:<seed>")
    teacher_sha256: str = ""        # models.weights_digest of the teacher DiT: distillation refuses another teacher

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _code_version() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def shard_ids(records: list[PromptRecord], shard_size: int) -> list[list[PromptRecord]]:
    return [records[i:i + shard_size] for i in range(0, len(records), shard_size)]


@torch.no_grad()
def compute_shard(components, records: list[PromptRecord], cfg: CacheConfig,
                  text_path_at: Optional[Callable] = None) -> dict:
    """All tensors of one shard, in host memory (what is written); deterministic in (components, records, cfg)."""
    return {name: value.cpu() for name, value in shard_tensors(components, records, cfg, text_path_at).items()}


def shard_tensors(components, records: list[PromptRecord], cfg: CacheConfig,
                  text_path_at: Optional[Callable] = None) -> dict:
    """compute_shard's tensors where the model lives (every draw is moved there before it meets the model).
    text_path_at(precision) -> components whose text path runs at that precision (default `text.text_path_at`):
    one copy of the text encoder at a time, freed before the next (three at once do not fit beside a 2B DiT)."""
    text_path_at = text_path_at or (lambda precision: text.text_path_at(components, precision))
    prompts = [r.prompt for r in records]
    negatives = {r.negative or cfg.negative_prompt for r in records}
    if len(negatives) > 1:
        raise CacheError("per-prompt negatives in one shard differ; this cache stores one negative per shard")
    negative_prompt = negatives.pop()
    tensors: dict[str, torch.Tensor] = {}
    for precision in CACHE_PRECISIONS:
        path = text_path_at(precision)
        tensors[f"context.{precision}"] = path.encode_prompts(prompts).float().to(_STORE_DTYPE[precision])
        tensors[f"negative.{precision}"] = path.encode_prompts([negative_prompt]).float().to(_STORE_DTYPE[precision])
        del path
    latent_shape = components.latent_shape(cfg.image_size)
    noise = torch.stack([models.randn(latent_shape, torch.Generator().manual_seed(prompt_seed(r.id)), components.device)
                         for r in records])
    context = components.encode_prompts(prompts)          # the teacher's own (full-precision) text path
    negative = components.encode_prompts([negative_prompt])
    sigmas = flow.teacher_sigmas(cfg.steps, cfg.shift)
    trajectory = sampler.euler_sample(components.velocity, noise, sigmas, context, negative, cfg.guidance_scale,
                                      keep_trajectory=True)
    dtype = getattr(torch, cfg.dtype)
    tensors.update(noise=noise, states=trajectory.states.transpose(0, 1).to(dtype).contiguous(),
                   velocities=trajectory.velocities.transpose(0, 1).to(dtype).contiguous(),
                   x0=trajectory.x0.to(dtype).contiguous(), sigmas=sigmas)
    return tensors


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _load_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path}: unreadable manifest ({exc}); delete the folder and rebuild the cache") from None


def _shard_ok(folder: Path, entry: Optional[dict]) -> bool:
    if entry is None:
        return False
    path = folder / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


def check_disk(folder: Path, needed_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed_bytes > free:
        raise CacheError(f"{folder}: the cache needs about {human_size(needed_bytes)} but only {human_size(free)} "
                         f"are free; free space, choose another folder, or cache fewer prompts")


def build_cache(components, records: list[PromptRecord], cfg: CacheConfig, folder: Path, rank: int = 0,
                world_size: int = 1, progress: bool = True, only_shards: Optional[set[int]] = None) -> dict:
    """Write (or resume) the cache; rank r writes shards r, r+W, ... and its own manifest part."""
    folder = Path(folder)
    shards = shard_ids(records, cfg.shard_size)
    latent_shape = components.latent_shape(cfg.image_size)
    context_shape = tuple(components.encode_prompts([records[0].prompt]).shape[1:])
    per_prompt = bytes_per_prompt(latent_shape, cfg.steps, context_shape,
                                  torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size())
    check_disk(folder, sum(per_prompt.values()) * len(records) // world_size)
    manifest_name = MANIFEST if world_size == 1 else f"manifest.rank{rank}.json"
    existing = _load_manifest(folder) or {}
    if existing and existing.get("config_hash") not in (None, cfg.digest()):
        raise CacheError(f"{folder}: holds a cache built with other settings (config hash "
                         f"{existing['config_hash']} != {cfg.digest()}); use a new folder or delete it")
    if existing and existing.get("prompt_ids") != [r.id for r in records]:
        raise CacheError(f"{folder}: holds a cache of another prompt list ({len(existing['prompt_ids'])} prompts, "
                         f"asked for {len(records)}); use another run.name or delete the folder")
    entries = {e["index"]: e for e in existing.get("shards", [])}
    if world_size > 1 and (folder / manifest_name).is_file():
        entries.update({e["index"]: e for e in json.loads((folder / manifest_name).read_text())["shards"]})
    mine = [i for i in range(len(shards)) if i % world_size == rank and (only_shards is None or i in only_shards)]
    stats = {"written": 0, "skipped": 0, "sample_s": 0.0, "write_s": 0.0}
    iterator = mine
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(mine, desc=f"cache rank {rank}", mininterval=5)
    for index in iterator:
        if only_shards is None and _shard_ok(folder, entries.get(index)):
            stats["skipped"] += 1
            continue
        t0 = time.perf_counter()
        tensors = compute_shard(components, shards[index], cfg)
        t1 = time.perf_counter()
        ids = [r.id for r in shards[index]]
        # one metadata key: safetensors orders several keys differently per process, which would break byte identity
        blob = save(tensors, metadata={"cache": json.dumps({"ids": ids, "config_hash": cfg.digest()}, sort_keys=True)})
        atomic_write_bytes(folder / _shard_name(index), blob)
        entries[index] = {"index": index, "file": _shard_name(index), "sha256": hashlib.sha256(blob).hexdigest(),
                          "bytes": len(blob), "count": len(ids), "ids": ids}
        _write_manifest(folder / manifest_name, cfg, records, entries, per_prompt)
        stats["sample_s"] += t1 - t0
        stats["write_s"] += time.perf_counter() - t1
        stats["written"] += 1
    if stats["written"] == 0 and not (folder / manifest_name).is_file():
        _write_manifest(folder / manifest_name, cfg, records, entries, per_prompt)
    return {**stats, "bytes_per_prompt": per_prompt, "shards": len(shards), "mine": len(mine)}


def _write_manifest(path: Path, cfg: CacheConfig, records, entries: dict, per_prompt: dict) -> None:
    atomic_write_json(path, {"config_hash": cfg.digest(), "config": asdict(cfg), "code_version": _code_version(),
                             "prompt_ids": [r.id for r in records], "prompts": {r.id: r.prompt for r in records},
                             "bytes_per_prompt": per_prompt,
                             "shards": [entries[i] for i in sorted(entries)]})


def merge_rank_manifests(folder: Path, world_size: int) -> dict:
    """Rank 0, after a barrier: one manifest.json from the per-rank parts (then the parts are removed)."""
    folder = Path(folder)
    parts = [json.loads((folder / f"manifest.rank{r}.json").read_text()) for r in range(world_size)]
    hashes = {p["config_hash"] for p in parts}
    if len(hashes) != 1:
        raise CacheError(f"{folder}: ranks wrote with different settings {sorted(hashes)}")
    merged = {**parts[0], "shards": sorted((e for p in parts for e in p["shards"]), key=lambda e: e["index"])}
    atomic_write_json(folder / MANIFEST, merged)
    for r in range(world_size):
        (folder / f"manifest.rank{r}.json").unlink()
    return merged


# --- verification ----------------------------------------------------------------------------------------------------

def verify_cache(folder: Path) -> dict:
    """{'ok': [...], 'bad': {index: reason}} for every shard the manifest expects."""
    folder = Path(folder)
    manifest = _load_manifest(folder)
    if manifest is None:
        raise CacheError(f"{folder}: no {MANIFEST}; build the cache with notebook 01_cache")
    n_expected = -(-len(manifest["prompt_ids"]) // manifest["config"]["shard_size"])
    entries = {e["index"]: e for e in manifest["shards"]}
    ok, bad = [], {}
    for index in range(n_expected):
        entry = entries.get(index)
        path = folder / _shard_name(index)
        if entry is None or not path.is_file():
            bad[index] = "missing"
        elif path.stat().st_size != entry["bytes"]:
            bad[index] = f"truncated or grown: {path.stat().st_size} bytes, manifest says {entry['bytes']}"
        elif sha256_file(path) != entry["sha256"]:
            bad[index] = "corrupt: sha256 differs from the manifest"
        else:
            ok.append(index)
    return {"ok": ok, "bad": bad, "expected": n_expected}


# --- reading ---------------------------------------------------------------------------------------------------------

class CacheDataset(torch.utils.data.IterableDataset):
    """Streams verified shards in a seeded order and yields examples through a shuffle buffer.

    Each example: {"id", "context" (chosen precision), "negative", "noise", "states", "velocities", "x0", "sigmas"}.
    """

    def __init__(self, folder: Path, precision: str = "q8_0", shuffle_buffer: int = 256, seed: int = 0,
                 verify: bool = True):
        if precision not in CACHE_PRECISIONS:
            raise CacheError(f"precision {precision!r}: the cache holds {list(CACHE_PRECISIONS)}")
        self.folder, self.precision, self.buffer, self.seed = Path(folder), precision, shuffle_buffer, seed
        self.manifest = _load_manifest(self.folder)
        if self.manifest is None:
            raise CacheError(f"{folder}: no {MANIFEST}; run notebook 01_cache first")
        if verify:
            report = verify_cache(self.folder)
            if report["bad"]:
                raise CacheError(f"{folder}: shards {sorted(report['bad'])} fail verification "
                                 f"({next(iter(report['bad'].values()))}); run `anima cache verify {folder} --repair`")
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        shards = self.manifest["shards"]
        worker = torch.utils.data.get_worker_info()
        order = torch.randperm(len(shards), generator=generator).tolist()
        if worker is not None:
            order = order[worker.id::worker.num_workers]
        buffer: list[dict] = []
        for index in order:
            entry = shards[index]
            tensors = load_file(self.folder / entry["file"])
            for k, pid in enumerate(entry["ids"]):
                buffer.append({"id": pid, "context": tensors[f"context.{self.precision}"][k],
                               "negative": tensors[f"negative.{self.precision}"][0], "noise": tensors["noise"][k],
                               "states": tensors["states"][k], "velocities": tensors["velocities"][k],
                               "x0": tensors["x0"][k], "sigmas": tensors["sigmas"]})
                if len(buffer) >= self.buffer:
                    yield buffer.pop(int(torch.randint(len(buffer), (1,), generator=generator)))
        while buffer:
            yield buffer.pop(int(torch.randint(len(buffer), (1,), generator=generator)))


class CacheBatches:
    """Random-access batches for distillation: batch b is a pure function of (seed, b), so a resumed run reads exactly
    what an uninterrupted one would. Rows are read from the memory-mapped shards (only x0 and the text embeddings).

    Checks up front, each naming 01_cache: the folder holds a complete, verified cache; it has `precision`; it was
    built by the teacher whose weights digest is `teacher_sha256` (when given).
    """

    def __init__(self, folder: Path, precision: str = "q8_0", seed: int = 0, teacher_sha256: Optional[str] = None,
                 verify: bool = True, device="cpu"):
        self.folder, self.precision, self.seed, self.device = Path(folder), precision, seed, torch.device(device)
        manifest = _load_manifest(self.folder)
        if manifest is None:
            raise CacheError(f"{self.folder}: no distillation cache here ({MANIFEST} missing); run notebook 01_cache "
                             f"first (`anima run <preset> --only 01_cache`)")
        if precision not in CACHE_PRECISIONS:
            raise CacheError(f"precision {precision!r}: a cache written by 01_cache holds {list(CACHE_PRECISIONS)}")
        built_by = manifest["config"].get("teacher_sha256", "")
        if teacher_sha256 is not None and built_by != teacher_sha256:
            raise CacheError(f"{self.folder}: built by another teacher (weights digest {built_by or 'unrecorded'}, "
                             f"this run's teacher is {teacher_sha256}); re-run notebook 01_cache for this teacher")
        if verify:
            report = verify_cache(self.folder)
            if report["bad"]:
                raise CacheError(f"{self.folder}: shards {sorted(report['bad'])} fail verification; re-run notebook "
                                 f"01_cache or `anima cache verify {self.folder} --repair <preset>`")
        self.manifest = manifest
        self.rows = [(e["file"], k) for e in sorted(manifest["shards"], key=lambda e: e["index"])
                     for k in range(e["count"])]
        self.config = manifest["config"]

    def __len__(self) -> int:
        return len(self.rows)

    def indices(self, batch_index: int, batch_size: int) -> list[int]:
        """Rows of batch `batch_index`: consecutive slices of a seeded permutation per epoch."""
        start = batch_index * batch_size
        out = []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), len(self.rows))
            perm = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            out.extend(perm[offset: offset + batch_size - len(out)].tolist())
        return out

    def batch(self, batch_index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
        """{"x0" [b,...] float32, "context" [b,L,D] float32, "negative" [1,L,D] float32}; rank r takes rows r::W."""
        from safetensors import safe_open
        rows = [self.rows[i] for i in self.indices(batch_index, batch_size)][rank::world_size]
        read, negative = {}, None
        for file in dict.fromkeys(f for f, _ in rows):  # each shard opened once
            with safe_open(self.folder / file, framework="pt") as f:
                x0_all, ctx_all = f.get_slice("x0"), f.get_slice(f"context.{self.precision}")
                for _, k in (row for row in rows if row[0] == file):
                    read[file, k] = (x0_all[k:k + 1].float(), ctx_all[k:k + 1].float())
                if negative is None:
                    negative = f.get_tensor(f"negative.{self.precision}").float()
        return {"x0": torch.cat([read[row][0] for row in rows]).to(self.device),
                "context": torch.cat([read[row][1] for row in rows]).to(self.device),
                "negative": negative.to(self.device)}


def env_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# --- what the notebook, the CLI and torchrun call ----------------------------------------------------------------------

def cache_folder(params) -> Path:
    return params.output_path() / "cache"


def cache_records(params, components=None) -> tuple[list[PromptRecord], list[str]]:
    """The run's prompts and skip reasons; with `components`, prompts over the text path's token limit are skipped too.
    No usable prompt left is a CacheError."""
    source = params.cache.prompts_file or "cache.n_prompts"
    if not params.cache.prompts_file and params.model.preset != "nano":
        raise CacheError(f"cache.prompts_file is required with model.preset = {params.model.preset!r} (a JSONL of id "
                         f"and prompt: the training prompts); a real model's cache never draws nano creature prompts")
    if params.cache.prompts_file:
        nano = params.model.preset == "nano"
        limit = models.NANO_MAX_TOKENS if nano else models.AnimaComponents.max_tokens
        records, skipped = read_prompts_jsonl(resolve_path(params.cache.prompts_file),
                                              max_words=limit if nano else None, max_chars=CHARS_PER_TOKEN_CAP * limit)
    else:
        records, skipped = nano_prompts(params.cache.n_prompts, seed=params.run.seed), []
    if components is not None:
        records, over = cap_by_tokens(records, token_counter(components), components.max_tokens)
        skipped = skipped + over
    require_prompts(records, skipped, source)
    return records, skipped


def cache_config(params, teacher_name: str, teacher_sha256: str = "") -> CacheConfig:
    return CacheConfig(steps=params.sampler.teacher_steps, shift=params.sampler.shift,
                       guidance_scale=params.sampler.guidance_scale, negative_prompt=params.sampler.negative_prompt,
                       image_size=params.gate.image_size, shard_size=params.cache.shard_size, dtype=params.cache.dtype,
                       teacher=teacher_name, teacher_sha256=teacher_sha256)


def teacher_name(params) -> str:
    if params.model.preset == "nano":
        return ("random:%d" % params.run.seed if params.model.nano_weights == "random"
                else str(models.nano_teacher_folder(params)))
    return params.model.diffusers_dir or params.model.comfy_diffusion_model


def run_cache(params, repair: bool = False, progress: bool = True) -> dict:
    """Build (or resume, or repair) this run's cache; under torchrun every rank takes its shards, rank 0 merges."""
    rank, world_size = env_rank()
    if world_size > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    cache_records(params)  # a prompts file with nothing usable fails here, before the models load
    components = models.load_components(params)
    records, skipped = cache_records(params, components)
    if params.model.preset == "nano":
        try:
            models.check_nano_prompts(components, [r.prompt for r in records])
        except ValueError as exc:  # a prompts-file problem, not a bug: the CLI shows it as one line
            raise CacheError(f"{params.cache.prompts_file or 'cache.n_prompts'}: {exc}") from None
    folder = cache_folder(params)
    only = set(verify_cache(folder)["bad"]) if repair else None
    cfg = cache_config(params, teacher_name(params), models.weights_digest(components.transformer))
    stats = build_cache(components, records, cfg, folder, rank=rank,
                        world_size=world_size, progress=progress, only_shards=only)
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()
        if rank == 0:
            merge_rank_manifests(folder, world_size)
        dist.barrier()
    return {**stats, "skipped_prompts": skipped, "folder": str(folder), "world_size": world_size}


# --- 01_cache's checks ------------------------------------------------------------------------------------------------

Q8_0_MIN_WORST_ROW_COSINE = 0.999  # the phone's 8-bit text path keeps every token's context direction to this cosine


def judge(n_cached: int, n_prompts: int, verified: dict, q8_0_worst_row_cosine: float) -> list[Check]:
    """01's checks: every prompt is cached, every shard verifies (`verify_cache`'s report), and the Q8_0 contexts'
    worst-row cosine to the full-precision text path is at least Q8_0_MIN_WORST_ROW_COSINE."""
    return [Check(f"every prompt cached ({n_cached}/{n_prompts})", n_cached == n_prompts),
            Check(f"every shard verifies ({len(verified['ok'])}/{verified['expected']})", not verified["bad"]),
            Check(f"Q8_0 worst-row cosine ≥ {Q8_0_MIN_WORST_ROW_COSINE} ({q8_0_worst_row_cosine:.6f})",
                  q8_0_worst_row_cosine >= Q8_0_MIN_WORST_ROW_COSINE)]

"""Atomic, verifiable file writes: a file appears under its name only when complete (temp file + fsync + rename).

Files get the mode the process umask allows (as `open` would), not mkstemp's 0600, so a shared box's other users can
read reports, metrics and shards. Weight readers go through `load_finite`, which refuses NaN/Inf tensors by name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


class NonFiniteWeightsError(ValueError):
    """A weights file holds NaN or Inf; the message names the file and the tensor."""


def _umask_mode(base: int = 0o666) -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it, then put it back
    os.umask(mask)
    return base & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Raise NonFiniteWeightsError naming the first tensor with a NaN/Inf; return `tensors` unchanged."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise NonFiniteWeightsError(f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN/Inf); "
                                        f"refusing to load it")
    return tensors


def load_finite(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file that refuses NaN/Inf tensors (user-supplied weights, checkpoints, packed files)."""
    from safetensors.torch import load_file
    return check_finite(load_file(path), str(path))


def _old_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(target: str | os.PathLike) -> Path:
    """Undo a crash inside `atomic_replace_dir`: if `target` is gone but its `.old` copy is there (killed between the
    two renames), the old copy is the last complete one — put it back."""
    target = Path(target)
    old = _old_of(target)
    if not target.exists() and old.is_dir():
        old.rename(target)
    return target


def atomic_replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Swap a fully written staging folder in for `target`: a reader sees the old folder or the new, never a mix.
    A kill between the two renames leaves `.<target>.old`; `recover_dir` (called here and by every resume) restores
    it, so a crash never loses the last complete folder."""
    staging, target = Path(staging), Path(target)
    recover_dir(target)
    old = _old_of(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)
    return target


class WeightsError(RuntimeError):
    """A shipped weight file (nano teacher, probe) is missing or does not match its recorded hash. Defined here so the
    CLI can name it without importing the nano world."""

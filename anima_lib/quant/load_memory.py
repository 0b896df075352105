"""Peak and steady memory of loading a DiT checkpoint, measured in a fresh process (the parent's heap and its peak
would hide the load's): RSS above the process's baseline after imports, then every tensor touched as a first forward
would, so the steady figure counts every page the weights occupy.

    python -m anima_lib.quant.load_memory packed <folder> [--threads N]      # a pre-packed checkpoint (packed.py)
    python -m anima_lib.quant.load_memory bf16 <file.safetensors> --policy-json '<policy>' [--threads N]
                                                           # the alternative: read bf16, quantize in memory
The model is built from the folder's config.json (`model_config`, a diffusers transformer config), or for a bf16 file
from the real Anima 2B config. `measure(...)` runs this in a subprocess and returns the numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    """VmRSS / VmHWM of this process's own address space in bytes (ru_maxrss would inherit the parent's at fork)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("packed", "bf16"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--policy-json", default=None, help="bf16: the policy to quantize with at load")
    args = parser.parse_args(argv)
    import torch
    from diffusers import CosmosTransformer3DModel
    from anima_lib.quant import packed
    if args.threads:
        torch.set_num_threads(args.threads)
    gc.collect()
    base, started = _status("VmRSS"), time.perf_counter()
    if args.kind == "packed":
        model = packed.load_packed(args.path, lambda cfg: CosmosTransformer3DModel.from_config(cfg))
    else:  # quantize at load: a bf16 checkpoint is read whole, then quantized in memory
        from safetensors.torch import load_file
        from anima_lib.networks import ANIMA_2B_TRANSFORMER
        with torch.device("meta"):
            model = CosmosTransformer3DModel(**ANIMA_2B_TRANSFORMER)
        model.load_state_dict(load_file(args.path), assign=True)
        model, _, _ = packed.quantize_model(model, json.loads(args.policy_json))
    load_s = time.perf_counter() - started
    gc.collect()
    after_load = _status("VmRSS")
    with torch.no_grad():  # touch one byte per 4 KiB page of every tensor, as a first forward would: all resident
        sum(int(t.detach().contiguous().reshape(-1).view(torch.uint8)[::4096].sum()) for t in model.state_dict().values())
    gc.collect()
    print(json.dumps({"base": base, "after_load": after_load, "steady": _status("VmRSS"), "peak": _status("VmHWM"),
                      "load_s": load_s}))


def measure(kind: str, path: Path, threads: int = 0, policy: dict | None = None) -> dict:
    """{"base", "after_load", "steady", "peak" (bytes), "load_s"} of loading `path` in a fresh interpreter."""
    command = [sys.executable, "-m", "anima_lib.quant.load_memory", kind, str(path), "--threads", str(threads)]
    if policy is not None:
        command += ["--policy-json", json.dumps(policy)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"load_memory {kind} {path} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    _main()

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anima_lib import cache, models, text
from anima_lib.nano_world.prompts import vocabulary

CFG = cache.CacheConfig(steps=4, shift=3.0, guidance_scale=4.0, negative_prompt="", image_size=32, shard_size=2,
                        dtype="bfloat16", teacher="random:0")
RECORDS = cache.nano_prompts(5, seed=0)
BUILD_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from anima_lib import cache, models
from anima_lib.nano_world.prompts import vocabulary
cfg = cache.CacheConfig(steps=4, shift=3.0, guidance_scale=4.0, negative_prompt="", image_size=32, shard_size=2,
                        dtype="bfloat16", teacher="random:0")
components = models.build_nano(vocabulary(), seed=0)
slow = components.velocity
def velocity(*a):  # slow enough to be killed mid-shard
    import time; time.sleep(0.3); return slow(*a)
components.velocity = velocity
cache.build_cache(components, cache.nano_prompts(5, seed=0), cfg, sys.argv[1], progress=False)
"""


@pytest.fixture(scope="module")
def components():
    torch.set_num_threads(1)  # the subprocess uses one thread too: identical arithmetic, identical bytes
    return models.build_nano(vocabulary(), seed=0)


@pytest.fixture(scope="module")
def built(components, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "a"
    stats = cache.build_cache(components, RECORDS, CFG, folder, progress=False)
    return folder, stats


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard_*.safetensors"))}


def test_layout_and_contents(built, components):
    folder, stats = built
    assert stats["written"] == 3 and stats["shards"] == 3
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["prompt_ids"] == [r.id for r in RECORDS] and len(manifest["shards"]) == 3
    shard = load_file(folder / "shard_00000.safetensors")
    assert shard["states"].shape == (2, 5, 48, 1, 8, 8) and shard["states"].dtype == torch.bfloat16
    assert shard["velocities"].shape == (2, 4, 48, 1, 8, 8)
    assert torch.equal(shard["states"][:, -1], shard["x0"]) and torch.equal(shard["states"][:, 0].float(),
                                                                          shard["noise"].bfloat16().float())
    assert shard["context.f16"].dtype == torch.float16 and shard["context.bf16"].dtype == torch.bfloat16
    reference = components.encode_prompts([r.prompt for r in RECORDS[:2]])
    for precision in ("f16", "bf16", "q8_0"):
        stored = shard[f"context.{precision}"].float()
        assert not torch.equal(stored, reference)
        assert text.worst_row_cosine(stored, reference) >= 0.999, precision


def test_resume_skips_verified_shards(built, components):
    folder, _ = built
    again = cache.build_cache(components, RECORDS, CFG, folder, progress=False)
    assert again["written"] == 0 and again["skipped"] == 3


def test_sigkill_mid_shard_resumes_byte_identical(built, components, tmp_path):
    folder_a, _ = built
    folder_b = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(folder_b)], env=env)
    deadline = time.time() + 120
    while not (folder_b / "shard_00000.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)                                   # now inside shard 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = shard_bytes(folder_b)
    assert 1 <= len(partial) < 3
    stats = cache.build_cache(components, RECORDS, CFG, folder_b, progress=False)
    assert stats["skipped"] == len(partial)
    resumed, uninterrupted = shard_bytes(folder_b), shard_bytes(folder_a)
    assert resumed.keys() == uninterrupted.keys()
    differing = [name for name in resumed if resumed[name] != uninterrupted[name]]
    assert differing == []
    assert cache.verify_cache(folder_b)["bad"] == {}


def test_verify_detects_and_repair_fixes(built, components, tmp_path):
    import shutil
    folder = tmp_path / "c"
    shutil.copytree(built[0], folder)
    original = shard_bytes(folder)
    (folder / "shard_00000.safetensors").write_bytes(original["shard_00000.safetensors"][:-100])   # truncated
    data = bytearray(original["shard_00001.safetensors"])
    data[len(data) // 2] ^= 1
    (folder / "shard_00001.safetensors").write_bytes(bytes(data))                                  # corrupt
    (folder / "shard_00002.safetensors").unlink()                                                   # missing
    report = cache.verify_cache(folder)
    assert report["ok"] == []
    assert "truncated" in report["bad"][0] and "corrupt" in report["bad"][1] and report["bad"][2] == "missing"
    with pytest.raises(cache.CacheError, match="fail verification"):
        cache.CacheDataset(folder)
    cache.build_cache(components, RECORDS, CFG, folder, progress=False, only_shards=set(report["bad"]))
    assert cache.verify_cache(folder)["bad"] == {} and shard_bytes(folder) == original


def test_reader_yields_exactly_the_stored_tensors(built):
    folder, _ = built
    examples = list(cache.CacheDataset(folder, precision="bf16", shuffle_buffer=3, seed=1))
    assert sorted(e["id"] for e in examples) == sorted(r.id for r in RECORDS)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        shard = load_file(folder / entry["file"])
        for k, pid in enumerate(entry["ids"]):
            example = next(e for e in examples if e["id"] == pid)
            assert torch.equal(example["context"], shard["context.bf16"][k])
            assert torch.equal(example["states"], shard["states"][k]) and torch.equal(example["x0"], shard["x0"][k])
    order_a = [e["id"] for e in cache.CacheDataset(folder, seed=1)]
    order_b = [e["id"] for e in cache.CacheDataset(folder, seed=2)]
    assert sorted(order_a) == sorted(order_b) and order_a != order_b or len(order_a) < 3


def test_prompt_file_validation(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "a red round creature"}\n{"id": "b", "prompt": "  "}\n'
                    '{"id": "c", "prompt": "a a a a a a"}\n')
    records, skipped = cache.read_prompts_jsonl(path, max_words=5)
    assert [r.id for r in records] == ["a"] and len(skipped) == 2 and "empty prompt" in skipped[0]
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(cache.CacheError, match="duplicate id 'a' \\(first on line 1\\)"):
        cache.read_prompts_jsonl(path)


def test_projection_reproduces_the_terabyte_scale():
    per_prompt = cache.bytes_per_prompt((16, 1, 128, 128), 20, (512, 1024), dtype_bytes=2)
    assert per_prompt["states"] == 21 * 16 * 128 * 128 * 2              # 11.0 MB: x at every sigma
    total = sum(per_prompt.values())
    assert 1e12 < total * 100_000 < 5e12                                 # TB order at 100k prompts
    assert "TB" in cache.projection_text(per_prompt)


def test_refuses_a_different_prompt_list(built, components):
    with pytest.raises(cache.CacheError, match="another prompt list \\(5 prompts, asked for 4\\)"):
        cache.build_cache(components, RECORDS[:4], CFG, built[0], progress=False)


def test_refuses_when_the_disk_is_too_small(tmp_path):
    with pytest.raises(cache.CacheError, match=r"needs about 1000000\.00 TB but only .* are free"):
        cache.check_disk(tmp_path, 10 ** 18)


def test_sizes_read_in_mb_below_a_gigabyte():
    # a nearly full disk used to read "needs about 0.00 GB but only 0.00 GB are free"
    assert cache.human_size(3_100_000) == "3.10 MB" and cache.human_size(800_000) == "800.00 kB"
    assert cache.human_size(2.5e9) == "2.50 GB" and cache.human_size(512) == "512 B"


def _cli(args, tmp_path, runner):
    overrides = ["model.nano_weights=random", "cache.n_prompts=6", "cache.shard_size=2", "sampler.teacher_steps=4",
                 "gate.teacher_steps=[4]", "run.threads=1", f"run.report_dir={tmp_path}/r"]
    command = runner + ["cache", "build", "nano"] + [a for o in overrides for a in ("--set", o)] + args
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process(tmp_path):
    bin_dir = Path(sys.executable).parent
    one = _cli(["--set", f"run.output_dir={tmp_path}/one"], tmp_path, [str(bin_dir / "anima")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(["--set", f"run.output_dir={tmp_path}/two"], tmp_path,
               [str(bin_dir / "torchrun"), "--nproc_per_node=2", "--master_port=29531", "-m", "anima_lib.cli"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = tmp_path / "one" / "nano" / "cache", tmp_path / "two" / "nano" / "cache"
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) == 3
    manifest_a, manifest_b = (json.loads((f / "manifest.json").read_text()) for f in (a, b))
    assert manifest_a["shards"] == manifest_b["shards"] and not list(b.glob("manifest.rank*"))
    verify = subprocess.run([str(bin_dir / "anima"), "cache", "verify", str(b)], capture_output=True, text=True)
    assert verify.returncode == 0 and "3/3 shards verified" in verify.stdout


def test_distillation_reader_is_deterministic_and_matches_the_shards(built):
    folder, _ = built
    reader = cache.CacheBatches(folder, precision="q8_0", seed=3)
    first, again = reader.batch(4, 3), cache.CacheBatches(folder, precision="q8_0", seed=3).batch(4, 3)
    assert all(torch.equal(first[k], again[k]) for k in ("x0", "context", "negative"))
    rows = [reader.rows[i] for i in reader.indices(4, 3)]
    for k, (file, row) in enumerate(rows):
        stored = load_file(folder / file)
        assert torch.equal(first["x0"][k], stored["x0"][row].float())
        assert torch.equal(first["context"][k], stored["context.q8_0"][row].float())
    halves = [reader.batch(4, 3, rank=r, world_size=2)["x0"] for r in (0, 1)]
    assert torch.equal(halves[0], first["x0"][0::2]) and torch.equal(halves[1], first["x0"][1::2])
    epoch = [i for b in range(5) for i in reader.indices(b, 1)]  # 5 prompts: one epoch is a permutation
    assert sorted(epoch) == list(range(5))


def test_distillation_reader_refuses_missing_or_foreign_caches(built, tmp_path):
    folder, _ = built
    with pytest.raises(cache.CacheError, match="run notebook 01_cache first"):
        cache.CacheBatches(tmp_path / "nothing")
    with pytest.raises(cache.CacheError, match="built by another teacher .* re-run notebook 01_cache"):
        cache.CacheBatches(folder, teacher_sha256="0123456789abcdef")
    with pytest.raises(cache.CacheError, match="precision 'int4'.*01_cache"):
        cache.CacheBatches(folder, precision="int4")

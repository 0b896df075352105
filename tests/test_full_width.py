"""The real (anima-2b) code path at full width (issue 16 item 6): a random Anima with the real widths but 2 DiT blocks
(tests/full_width.py), real tokenizer formats, the real VAE config, read from a diffusers folder and from ComfyUI split
files, scored with production readers on tiny random weights; no nano-only code may run.

Fast (make test): one 01-style cache shard and one gate scoring call in this process, plus the pieces the notebooks
use on a real world. Slow (make smoke): `anima run` 01 -> 06 on a preset extending anima-2b at tiny work sizes, with a
sitecustomize guard in every kernel that makes importing the nano renderer or probe (or drawing creatures) raise.
"""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import full_width as fw
from anima_lib import cache, config, gate, lora, lora_survival, metrics, models, worlds

BIN = os.path.dirname(sys.executable)
NOTEBOOKS = ("01_cache", "02_distill", "03_deturbo", "04_quantize", "05_quality_gate", "06_lora_survival")


# --- fast: the real-width model through a cache shard and the real world's scoring --------------------------------------

@pytest.fixture
def forbid_nano(monkeypatch):
    """Every nano-only entry point fails the test if called (the slow test does the same with an import guard)."""
    from anima_lib.nano_world import probes, prompts, renderer

    def forbidden(*args, **kwargs):
        raise AssertionError("the real path called into the nano world")
    for module, name in ((renderer, "render"), (renderer, "render_batch"), (prompts, "sample_creatures"),
                         (probes, "load_probe"), (metrics, "ProbeReader"), (metrics, "fd_probe"),
                         (gate, "render_reference"), (gate, "score_rows"), (models, "check_nano_prompts"),
                         (cache, "nano_prompts"), (lora_survival, "write_nano_style_folder")):
        monkeypatch.setattr(module, name, forbidden)


def real_params(tmp_path, world: dict, **model):
    model = model or {"diffusers_dir": str(tmp_path)}  # checked for presence only: the fast test builds in memory
    values = fw.preset_values(model, world, tmp_path, threads=0)
    return config.load_config(fw.write_preset(tmp_path / "fullwidth.yaml", values))


def test_full_width_shard_and_gate_scoring_on_the_real_world(tmp_path, forbid_nano):
    """Real widths (narrow VAE here: the VAE is not what this checks), real tokenizer formats, a 01 shard with all
    three text precisions and a teacher trajectory, then teacher@1 scored by the production readers."""
    components = fw.build_components(vae="narrow")
    assert models.count_parameters(components.transformer) > 150e6  # 2 blocks at hidden 2048
    assert components.transformer.config.num_attention_heads * components.transformer.config.attention_head_dim == 2048
    assert components.text_encoder.config.vocab_size == 151_936 and components.text_encoder.config.hidden_size == 1024
    assert components.text_conditioner.config.target_vocab_size == 32_128
    assert type(components.tokenizer).__name__ == "Qwen2Tokenizer" and type(components.t5_tokenizer).__name__ == "T5Tokenizer"
    params = real_params(tmp_path, fw.write_world(tmp_path / "world"))

    records, skipped = cache.cache_records(params, components)
    assert [r.id for r in records] == [p["id"] for p in fw.TRAIN_PROMPTS] and not skipped
    cfg = cache.cache_config(params, "full-width random")
    shard = cache.compute_shard(components, records, cfg)
    steps, latent = params.sampler.teacher_steps, components.latent_shape(params.gate.image_size)
    assert latent == (16, 1, fw.IMAGE_SIZE // 8, fw.IMAGE_SIZE // 8)
    for precision in cache.CACHE_PRECISIONS:
        assert shard[f"context.{precision}"].shape == (2, 512, 1024)   # the conditioner pads to 512 tokens
        assert shard[f"negative.{precision}"].shape == (1, 512, 1024)
    assert shard["states"].shape == (2, steps + 1, *latent) and shard["states"].dtype == torch.bfloat16
    assert torch.equal(shard["states"][:, 0], shard["noise"].to(torch.bfloat16))
    assert all(torch.isfinite(t.float()).all() for t in shard.values())
    from anima_lib import text
    assert text.worst_row_cosine(shard["context.q8_0"].float(), components.encode_prompts([r.prompt for r in records])) > 0.99

    world = worlds.load_world(params)  # the production readers: InceptionV3 and open_clip from local files
    assert isinstance(world, worlds.RealWorld) and world.gate.ids == [p["id"] for p in fw.EVAL_PROMPTS]
    samples = {"teacher@1": world.keep(gate.sample_teacher(components, params, world.gate, 1))}
    floor = world.keep(gate.sample_teacher(components, params, world.gate, 1, stream=gate.NOISE_FLOOR))
    rows = world.score_rows(samples, "teacher@1", floor)
    row = rows["teacher@1"]
    assert samples["teacher@1"].shape == (4, 3, fw.IMAGE_SIZE, fw.IMAGE_SIZE)
    assert row["n_images"] == 4 and row["rmse_to_reference"] == 0 and row["fid_vs_teacher"] > 0
    assert {"clip_score", "clip_score_colors", "clip_score_studio", "diversity_clip"} <= set(row)


# --- fast: what the notebooks call on a real world (stand-in readers) ----------------------------------------------------

@pytest.fixture
def stand_in_world(tmp_path):
    from test_real_world_gate import fake_readers
    world_files = {"train": fw.write_jsonl(tmp_path / "train.jsonl", fw.TRAIN_PROMPTS),
                   "eval": fw.write_jsonl(tmp_path / "eval.jsonl", fw.EVAL_PROMPTS),
                   "inception": tmp_path / config.INCEPTION_WEIGHTS_FILE, "clip_model": "ViT-B-32",
                   "clip_checkpoint": tmp_path / config.CLIP_CHECKPOINT_FILE,
                   "style": fw.write_style_folder(tmp_path / "style")}
    for key in ("inception", "clip_checkpoint"):
        world_files[key].write_bytes(b"stand-in")  # present; never loaded (stand-in readers)
    params = real_params(tmp_path, world_files)
    return params, worlds.load_world(params, readers=fake_readers())


def test_real_world_rows_for_02_03_and_06(stand_in_world, forbid_nano):
    params, world = stand_in_world
    g = torch.Generator().manual_seed(0)
    images = {row: torch.rand(4, 3, 16, 16, generator=g) for row in ("teacher@1", "student@1", "teacher+lora@3")}
    floor_calls = []
    rows = world.score_samples(images, lambda: floor_calls.append(1) or torch.rand(4, 3, 16, 16, generator=g))
    assert floor_calls == [1] and set(rows["student@1"]) == {"fid_vs_teacher", "clip_score", "clip_score_ci",
                                                              "diversity_clip", "n_images"}
    checks = world.beats(rows, "student@1", "teacher@1", "teacher Euler@1")
    assert [k.split(" (")[0] for k in checks] == ["student@1 fid_vs_teacher below teacher Euler@1",
                                                   "student@1 clip_score above teacher Euler@1"]
    assert worlds.step_summary(world, rows["student@1"]).startswith("clip_score ")
    scored = world.score_rows(images, "teacher+lora@3", images["teacher@1"], style=True)
    lora_rows = world.lora_rows(scored)
    assert "fid_vs_reference" in lora_rows["student@1"] and "fid_vs_teacher" not in lora_rows["student@1"]
    assert "style_clip" in lora_rows["student@1"] and set(lora_rows["student@1"]) <= set(world.lora_columns)
    per_image = {}
    one = world.score_set(images["student@1"], style=True, per_image=per_image)
    assert float(per_image["clip_score"].mean()) == pytest.approx(one["clip_score"])   # 07's paired leakage reads these
    assert one["style_clip"] == pytest.approx(scored["student@1"]["style_clip"])
    assert one["clip_score"] == pytest.approx(scored["student@1"]["clip_score"])


def test_survival_table_reads_the_real_world_metrics():
    names = lora_survival.SURVIVAL_METRICS["real"]
    rows = {"teacher+lora@3": {"style_clip": 0.5}, "student@1": {"clip_score": 30.0, "diversity_clip": 0.2}}
    rows["student+lora_deturbo@1"] = {"style_clip": 0.45, "clip_score": 29.0, "diversity_clip": 0.19,
                                      "fid_vs_reference": 12.5}
    table = lora_survival.survival_table(rows, "teacher+lora@3", ["deturbo"], [1], names)
    assert table["deturbo@1"]["survives"] and table["deturbo@1"]["fid_vs_reference"] == 12.5
    assert "fid_vs_ref 12.5" in lora_survival.survival_verdict(table, ["deturbo"], [1], names)


def test_smaller_gate_sets_take_at_most_the_prompts_the_files_hold(stand_in_world):
    params, world = stand_in_world
    subset = gate.gate_set(params, n_prompts=16, seeds_per_prompt=1)
    assert (len(subset.prompts), subset.image_prompt, subset.image_seed) == (2, [0, 1], [0, 0])
    assert world.with_gate(n_prompts=16, seeds_per_prompt=1).gate.image_prompt == [0, 1]
    nano = gate.gate_set(config.load_config("smoke", check_paths=False), n_prompts=16, seeds_per_prompt=1)
    assert (len(nano.prompts), len(nano.image_prompt)) == (16, 16)  # the creature sampler draws any number


def test_nano_only_fallbacks_refuse_a_real_preset(stand_in_world):
    params, _ = stand_in_world
    params.cache.prompts_file = ""   # empty on a real preset: an error, never creature prompts
    with pytest.raises(cache.CacheError, match=r"cache\.prompts_file is required with model\.preset = 'anima-2b'"):
        cache.cache_records(params)
    params.lora.style_folder = None  # no nano renders as a real model's style data
    with pytest.raises(lora_survival.StyleDataError, match=r"lora\.style_folder is required with model\.preset = 'anima-2b'"):
        lora_survival.style_folder(params)
    assert not (params.output_path() / "style_data").exists()


def test_loading_the_nano_world_leaves_the_global_rng_alone():
    """The probe's random init must not shift what a notebook draws next from the global RNG (peft's LoRA init), so
    02/03/06 give the same numbers with the world loaded first."""
    params = config.load_config("smoke")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    worlds.load_world(params)
    assert torch.equal(torch.rand(3), expected)


def test_guard_blocks_nano_only_code_and_logs_it(tmp_path):
    guard, log = fw.write_guard(tmp_path / "guard"), tmp_path / "guard.log"
    script = """
import anima_lib.nano_world.prompts as prompts
assert prompts.vocabulary()  # the word list is not nano-only code
for attempt in (lambda: __import__("anima_lib.nano_world.renderer"), lambda: prompts.sample_creatures(2, 0)):
    try:
        attempt()
        print("NOT BLOCKED")
    except (ImportError, RuntimeError) as exc:
        print("BLOCKED", type(exc).__name__)
"""
    env = {**os.environ, "PYTHONPATH": str(guard), fw.GUARD_LOG_ENV: str(log)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            cwd=config.REPO_ROOT)
    assert result.stdout.split("\n")[:2] == ["BLOCKED ImportError", "BLOCKED RuntimeError"], result.stderr[-2000:]
    lines = log.read_text()
    assert lines.startswith("ACTIVE ") and "VIOLATION" in lines and "import anima_lib.nano_world.renderer" in lines
    assert "sample_creatures()" in lines


# --- slow: `anima run` 01 -> 06 on both checkpoint layouts ---------------------------------------------------------------

def _tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
            total += int(rss.split()[1]) * 1024
        except (OSError, StopIteration):
            pass
        todo += children.get(pid, [])
    return total


def run_measured(args, env, timeout) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run a command; return it, its wall time and the peak resident memory of its process tree (kernels included)."""
    started, peak = time.perf_counter(), [0]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=config.REPO_ROOT)
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(process.pid))
            done.wait(0.5)
    sampler_thread = threading.Thread(target=sample, daemon=True)
    sampler_thread.start()
    try:
        stdout, _ = process.communicate(timeout=timeout)
    finally:
        done.set()
        process.kill()
    sampler_thread.join()
    return subprocess.CompletedProcess(args, process.returncode, stdout, ""), time.perf_counter() - started, peak[0]


def gathered_metrics(report_root: Path, run_name: str) -> dict:
    day = next(report_root.iterdir())
    return json.loads((day / run_name / "metrics.json").read_text())


@pytest.mark.slow
def test_full_width_real_path_end_to_end(tmp_path):
    """01 -> 06 with the anima-2b code path on the diffusers folder, 01 on the ComfyUI split files of the same
    weights (the two caches must agree), with the nano guard in every process."""
    t0 = time.perf_counter()
    components = fw.build_components(vae="real")
    layouts = fw.write_checkpoints(components, tmp_path / "checkpoints")
    del components
    world = fw.write_world(tmp_path / "world")
    guard, log = fw.write_guard(tmp_path / "guard"), tmp_path / "guard.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")])),
           fw.GUARD_LOG_ENV: str(log)}
    setup_s = time.perf_counter() - t0
    measured = {"setup_s": setup_s}
    results = {}
    for layout, only in (("diffusers", NOTEBOOKS), ("comfy", ("01_cache",))):
        preset = fw.write_preset(tmp_path / f"{layout}.yaml",
                                 fw.preset_values(layouts[layout], world, tmp_path / layout, name=f"fw-{layout}"))
        selected = ("00_nano_teacher", *only) if len(only) > 1 else only   # 00 reports "skipped"; 07 is not run
        args = [f"{BIN}/anima", "run", str(preset)] + [arg for name in selected for arg in ("--only", name)]
        result, wall_s, peak = run_measured(args, env, timeout=3600)
        measured[layout] = {"wall_s": round(wall_s, 1), "peak_rss_GB": round(peak / 1e9, 2)}
        statuses = {name: nb["status"] for name, nb in gathered_metrics(tmp_path / layout / "reports",
                                                                       f"fw-{layout}").items()}
        results[layout] = (result, statuses)
        # every notebook ran and scored: pass or fail on random weights, never error or skipped
        assert all(statuses.get(name) in ("pass", "fail") for name in only), (layout, statuses, result.stdout[-4000:])
    print(f"\nfull-width smoke: {json.dumps(measured)}")
    Path(tmp_path / "measured.json").write_text(json.dumps(measured))

    statuses = results["diffusers"][1]
    assert statuses["00_nano_teacher"] == "skipped"   # does not apply to anima-2b
    assert statuses["01_cache"] == "pass" and statuses["04_quantize"] == "pass"
    gathered = gathered_metrics(tmp_path / "diffusers" / "reports", "fw-diffusers")
    students = {f"{m}@{k}" for m in ("student", "student_q4") for k in (1, 2, 4)}
    assert set(gathered["05_quality_gate"]["rows"]) == {"teacher@1", "teacher@3"} | students
    assert "alignment" not in json.dumps(gathered)  # no probe metric anywhere: the real world's names
    lora_rows = gathered["06_lora_survival"]["rows"]
    assert {"style_clip", "clip_score", "diversity_clip", "fid_vs_reference"} <= set(lora_rows["student+lora_deturbo@1"])

    # the guard ran in the runner and every kernel, and nothing nano-only was imported or called
    text = log.read_text()
    assert text.count("ipykernel_launcher") >= len(NOTEBOOKS) + 1, text[:2000]
    assert "VIOLATION" not in text, text[text.index("VIOLATION"):][:4000]

    # the two layouts hold the same weights: their caches agree tensor for tensor
    from safetensors.torch import load_file
    shards = [load_file(tmp_path / layout / "outputs" / f"fw-{layout}" / "cache" / "shard_00000.safetensors")
              for layout in ("diffusers", "comfy")]
    assert shards[0].keys() == shards[1].keys()
    for key in shards[0]:
        assert torch.equal(shards[0][key], shards[1][key]), key


def test_nano_world_gives_02_and_06_their_old_numbers(tmp_path):
    """What 02 and 06 computed inline with the probe before they took a world, exactly."""
    from anima_lib.nano_world import probes
    params = config.load_config("nano", ["gate.n_prompts=4", "gate.seeds_per_prompt=2", f"run.output_dir={tmp_path}/o",
                                         f"run.report_dir={tmp_path}/r"])
    probe = probes.load_probe()
    world = worlds.load_world(params, probe=probe)
    renders = gate.render_reference(params, world.gate)
    others = gate.render_reference(params, world.gate, stream=gate.NOISE_FLOOR)
    samples = {"teacher@1": probes.blur(others, 1.5), "student@1": others.flip(-1)}
    reader, old = metrics.ProbeReader(probe), {}
    for row, images in samples.items():   # 02's cell, as it was
        scores = metrics.score_images(reader.read(images), world.gate.attributes, world.gate.image_prompt)
        old[row] = {"alignment": scores["alignment"], "alignment_ci": scores["alignment_ci"],
                    "diversity": scores["diversity"], "clean_rate": scores["clean_rate"],
                    "fd_probe": metrics.fd_probe(renders, images, probe), "n_images": scores["n_images"]}
    assert world.score_samples(samples) == old
    assert list(world.beats(old, "student@1", "teacher@1", "teacher Euler@1")) == [
        f"student@1 fd_probe below teacher Euler@1 ({old['student@1']['fd_probe']:.2f} vs {old['teacher@1']['fd_probe']:.2f})",
        f"student@1 alignment above teacher Euler@1 ({old['student@1']['alignment']:.3f} vs "
        f"{old['teacher@1']['alignment']:.3f})"]
    styled = gate.render_reference(params, world.gate, style=True)
    scored = gate.score_rows(samples, "teacher@1", others, styled,
                             gate.render_reference(params, world.gate, stream=gate.NOISE_FLOOR, style=True),
                             world.gate, probe)
    assert world.score_rows(samples, "teacher@1", others, style=True) == scored
    rename = {"fd_probe": "fd_probe_styled", "fd_probe_vs_teacher": "fd_probe_vs_reference"}   # 06's cell, as it was
    shown = ["style_score", "style_score_ci", "style_stripes", "style_stripes_ci", "attribute_alignment", "attribute_alignment_ci", "alignment",
             "clean_rate", "diversity", "fd_probe_vs_reference", "fd_probe_styled", "n_images"]
    assert world.lora_rows(scored) == {row: {k: s[o] for o, k in [(o, rename.get(o, o)) for o in s] if k in shown}
                                       for row, s in scored.items() if row != "renderer"}
    assert world.score_set(samples["student@1"]) == metrics.score_images(
        reader.read(samples["student@1"]), world.gate.attributes, world.gate.image_prompt)


def test_seeded_lora_init_is_the_same_in_every_process():
    """torch seeds its global RNG at random per process, and peft draws lora_A from it: 06's LoRAs differed from run
    to run. With a seed, the init is a function of the seed and the global RNG is left as it was."""
    from anima_lib.nano_world.prompts import vocabulary
    base = models.build_nano(vocabulary(), seed=0).transformer

    def init(seed):
        model = lora.fused(base, [])
        lora.add_adapter(model, rank=4, alpha=4.0, seed=seed)
        return lora.from_adapter(model, 4, 4.0).down

    state = torch.random.get_rng_state()
    a, b, c = init(7), init(7), init(8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)

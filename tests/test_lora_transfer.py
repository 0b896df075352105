"""LoRA transfer (07): on a 2-D toy with a known style shift, DMD against teacher+L moves the 1-step student's samples
to teacher+L's distribution far better than stacking L; L' files round-trip through diffusers' loader with a manifest
naming the source and the student; LoRAs for another base model and bad settings are refused; 07's checks."""
import copy

import pytest
import torch
from diffusers.models.attention import FeedForward
from safetensors.torch import load_file

from anima_lib import checks, config, flow, gate, lora, lora_survival, lora_transfer, models, sampler, toy, worlds
from anima_lib.nano_world.prompts import vocabulary


class ToyStyleNet(torch.nn.Module):
    """A 2-D RF velocity network whose hidden Linears carry the DiT's LoRA target names (blocks.N.ff.net.0.proj,
    blocks.N.ff.net.2), so lora.add_adapter / fused / from_adapter work on it unchanged."""

    def __init__(self, width: int = 64, blocks: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Linear(2 + 16, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(blocks))
        for block in self.blocks:
            block.ff = FeedForward(width, mult=2, activation_fn="gelu")
        self.out = torch.nn.Linear(width, 2)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, 4.0, 8)))

    def forward(self, x, sigma, context=None):
        angles = sigma.float()[:, None] * self.freqs * 3.0
        h = self.embed(torch.cat([x.float(), torch.sin(angles), torch.cos(angles)], 1))
        for block in self.blocks:
            h = h + block.ff(h)
        return self.out(h).to(x.dtype)


def _call(module, x, s, context):
    return module(x, s, context)


class _NoPrompts:
    """The toy is unconditional: only x0's shape is read."""

    def batch(self, index, batch_size, rank=0, world_size=1):
        return {"x0": torch.zeros(batch_size, 2)[rank::world_size], "context": None, "negative": None}


@pytest.fixture(scope="module")
def toy_world():
    """teacher (fit to the 3-mode mixture), L (rank 4 on the teacher, fit to the mixture shifted by (1, 0.8) with 0.7x
    the spread: the "style"), and a 1-step student (the teacher regressed onto its own 16-step ODE endpoints)."""
    base = toy.GaussianMixtureField.default_2d()
    styled = toy.GaussianMixtureField(base.means + torch.tensor([1.0, 0.8]), base.stds * 0.7, base.weights)
    teacher = toy.fit_to_field(ToyStyleNet(seed=0), base, steps=250, seed=0)
    with_adapter = copy.deepcopy(teacher)
    lora.add_adapter(with_adapter, 4, 4.0, seed=0)
    source = lora.from_adapter(toy.fit_to_field(with_adapter, styled, steps=250, seed=1), 4, 4.0)
    s0 = flow.trig_to_rf_time(flow.student_trig_times(1, 80.0, [])[0])
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2048, 2, generator=g)
    endpoints = sampler.euler_sample(teacher, noise, flow.teacher_sigmas(16, 3.0))
    student = copy.deepcopy(teacher).train()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(150):
        pick = torch.randint(2048, (256,), generator=g)
        x, sigma = s0 * noise[pick], torch.full((256,), s0)
        loss = ((flow.velocity_to_x0(x, student(x, sigma), s0) - endpoints[pick]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher, source, student.eval().requires_grad_(False)


def test_transfer_moves_the_one_step_student_to_teacher_plus_lora_far_better_than_stacking(toy_world, tmp_path):
    teacher, source, student = toy_world
    g = torch.Generator().manual_seed(123)
    reference = sampler.euler_sample(lora.fused(teacher, [(source, 1.0)]), torch.randn(2000, 2, generator=g),
                                     flow.teacher_sigmas(32, 3.0))
    noises = [torch.randn(2000, 2, generator=g) for _ in range(2)]

    def distance(model, k):
        samples = sampler.consistency_sample(model, noises[:k], flow.student_trig_times(k, 80.0, [1.0]))
        return toy.energy_distance(samples, reference)

    cfg = lora_transfer.transfer_config(5, 60, 256, 2e-3, 2e-3, 0.9, 1.0, 80.0, [1.0], 2, (0.0, 1.6), 0.0, 150, None, 0)
    transferred, distiller = lora_transfer.run_transfer(teacher, source, student, _NoPrompts(), cfg, tmp_path / "ck",
                                                        _call, init="lora", fake_rank=8, progress=False)
    stacked, moved = lora.fused(student, [(source, 1.0)]), lora.fused(student, [(transferred, 1.0)])
    before, after = {k: distance(stacked, k) for k in (1, 2)}, {k: distance(moved, k) for k in (1, 2)}
    print(f"energy distance to teacher+L@32: stacked L @1 {before[1]:.4f} @2 {before[2]:.4f}; transferred L' "
          f"@1 {after[1]:.4f} @2 {after[2]:.4f}; bare student @1 {distance(student, 1):.4f}")
    assert after[1] < 0.4 * before[1] and after[2] < 0.5 * before[2]
    history = distiller.state.history   # the rCM loop, DMD only: 4 fake-score steps per L' step, rollouts of 1 and 2
    assert sum(h["kind"] == "critic" for h in history) == 4 * sum(h["kind"] == "student" for h in history) == 240
    assert {h["rollout_steps"] for h in history if "dmd" in h} == {1, 2} and not any("scm" in h for h in history)
    saved = load_file(tmp_path / "ck" / "last" / "student.safetensors")  # adapters_only: only L' is checkpointed
    assert saved and all(".lora_" in name for name in saved)
    assert set(load_file(tmp_path / "ck" / "last" / "fake_score.safetensors")) == {
        n for n, p in distiller.fake.named_parameters() if p.requires_grad}
    again, resumed = lora_transfer.run_transfer(teacher, source, student, _NoPrompts(), cfg, tmp_path / "ck", _call,
                                                init="lora", fake_rank=8, progress=False)   # finished: nothing trains
    assert resumed.state.iteration == 300 and len(resumed.state.history) == 300
    assert all(torch.equal(again.down[n], transferred.down[n]) for n in transferred.down)
    assert transferred.digest() != source.digest() and transferred.rank == source.rank


def test_the_rollout_times_are_the_samplers_and_the_method_refuses_nothing_to_train():
    cfg = lora_transfer.transfer_config(5, 1, 4, 1e-3, 1e-3, 0.9, 4.0, 80.0, [1.3, 1.0, 0.6], 2, (0.0, 1.6), 0.0, 1,
                                        None, 0)
    from anima_lib.distill import rcm, trainer
    times = rcm.rollout_times(2, torch.Generator().manual_seed(0), cfg.rcm, 3)
    assert torch.allclose(times[1], torch.full((3,), 1.3, dtype=torch.float64))
    with pytest.raises(ValueError, match="nothing to train"):
        trainer.DistillConfig(method="dmd", rcm=rcm.RCMConfig(dmd_weight=0.0))
    with pytest.raises(ValueError, match="need 3 times"):
        trainer.DistillConfig(method="dmd", rcm=rcm.RCMConfig(max_rollout=4, rollout_mid_times=(1.3,)))


# --- the DiT: files, manifest, refusals ----------------------------------------------------------------------------

PROMPT = "a big green cross creature with one eye on the right , sky background"


@pytest.fixture(scope="module")
def nano():
    return models.build_nano(vocabulary(), seed=5)


def _random_lora(transformer, rank=2, seed=0, std=0.05, in_extra=0):
    g = torch.Generator().manual_seed(seed)
    linears = lora.target_linears(transformer)
    down = {n: torch.randn(rank, m.in_features + in_extra, generator=g) * std for n, m in linears.items()}
    up = {n: torch.randn(m.out_features, rank, generator=g) * std for n, m in linears.items()}
    return lora.LoraWeights(down, up, rank, float(rank))


def _params(tmp_path, *overrides):
    return config.load_config("smoke", [f"run.output_dir={tmp_path}", "lora.style_images=4", "gate.image_size=32",
                                        "lora_transfer.generator_steps=2", "lora_transfer.fake_updates=1",
                                        "lora_transfer.batch_size=2", "lora_transfer.generic_prompts=2",
                                        "lora_transfer.checkpoint_every=2", "lora_transfer.fake_rank=2",
                                        "lora_transfer.regression_samples=4", *overrides])


def _teacher_lora_folder(nano, tmp_path, base_sha256=None, way="teacher", kind="style", in_extra=0):
    weights = _random_lora(nano.transformer, seed=1, in_extra=in_extra)
    settings = {"way": way, "base_sha256": base_sha256 or models.weights_digest(nano.transformer)}
    return lora.save_lora(weights, tmp_path / f"src-{way}-{kind}-{in_extra}", {"kind": kind, "settings": settings,
                                                                             "wall_s": 10.0, "steps": 3})


def test_transferred_lora_round_trips_through_diffusers_with_a_manifest_naming_source_and_student(nano, tmp_path):
    params = _params(tmp_path)
    student = lora.fused(nano.transformer, [(_random_lora(nano.transformer, seed=4, std=0.02), 1.0)])
    source = lora_transfer.read_source(_teacher_lora_folder(nano, tmp_path))
    transferred, manifest = lora_transfer.transfer_style_lora(params, nano, student, source, progress=False)
    folder = lora_transfer.transfer_folder(params, manifest["settings"])
    assert manifest["kind"] == "transfer" and manifest["finished"] and manifest["generator_steps"] == 2
    assert manifest["source"]["lora_sha256"] == source.lora.digest() and manifest["source"]["kind"] == "teacher"
    assert manifest["student_sha256"] == models.weights_digest(student)
    assert manifest["settings"]["lora_transfer"]["generator_steps"] == 2 and manifest["wall_s"] > 0
    assert manifest["cost_vs_source"] == pytest.approx(manifest["wall_s"] / 10.0)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, *nano.latent_shape(32), generator=g), torch.tensor([0.9, 0.3])
    context = nano.encode_prompts([PROMPT] * 2)
    loaded = copy.deepcopy(student)
    lora.load_with_diffusers(loaded, folder, adapter_name="style")   # AnimaLoraLoaderMixin.load_lora_weights
    with torch.no_grad():
        expected = models.transformer_velocity(lora.fused(student, [(transferred, 1.0)]), x, sigma, context)
        assert torch.allclose(models.transformer_velocity(loaded, x, sigma, context), expected, atol=1e-5)
    from_comfy = lora.read_lora(folder / lora.COMFY_FILE)
    assert all(torch.allclose(from_comfy.delta(n), transferred.delta(n), atol=1e-6) for n in transferred.down)
    again, same = lora_transfer.transfer_style_lora(params, nano, student, source, progress=False)  # found finished
    assert same == manifest
    _, with_regression = lora_transfer.transfer_style_lora(params, nano, student, source, regression=True,
                                                           progress=False)
    assert with_regression["settings"]["regression"] and with_regression["regression_pool_s"] > 0
    assert with_regression["losses"]["regression"]


def test_a_lora_for_another_base_model_or_a_student_lora_is_refused(nano, tmp_path):
    student = copy.deepcopy(nano.transformer)
    other = lora_transfer.read_source(_teacher_lora_folder(nano, tmp_path, base_sha256="ab" * 32))
    with pytest.raises(lora_transfer.TransferError, match=r"made for another base model: its manifest records "
                                                          r"base_sha256 abababab.*this run's teacher is"):
        lora_transfer.source_base(other, nano, student)
    misshapen = lora_transfer.read_source(_teacher_lora_folder(nano, tmp_path, in_extra=3))
    with pytest.raises(lora_transfer.TransferError, match=r"do not fit this model's layers.*vs Linear"):
        lora_transfer.source_base(misshapen, nano, student)
    with pytest.raises(lora_transfer.TransferError, match="already a student LoRA"):
        lora_transfer.read_source(_teacher_lora_folder(nano, tmp_path, way="student"))
    with pytest.raises(lora_transfer.TransferError, match="already a transferred student LoRA"):
        lora_transfer.read_source(_teacher_lora_folder(nano, tmp_path, kind="transfer"))
    deturbo = lora_transfer.read_source(_teacher_lora_folder(nano, tmp_path, way="deturbo"))
    with pytest.raises(lora_transfer.TransferError, match="needs the De-Turbo adapter"):
        lora_transfer.source_base(deturbo, nano, student)
    bare = lora_transfer.read_source(_teacher_lora_folder(nano, tmp_path) / lora.COMFY_FILE)   # ComfyUI keys, no manifest
    assert bare.kind == "teacher" and bare.manifest is None
    assert lora_transfer.source_base(bare, nano, student) is nano.transformer
    with pytest.raises(lora.LoraError, match="no such LoRA file"):
        lora_transfer.read_source(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("override, message", [
    ("lora_transfer.init=svd", "lora_transfer.init = 'svd' is not allowed"),
    ("lora_transfer.ablations=[init, init]", "must not repeat"),
    ("lora_transfer.ablations=[dropout]", "each entry must be one of"),
    ("lora_transfer.sources=[student]", "lora_transfer.sources"),
    ("lora_transfer.second_times=[1.0, 1.6]", "strictly inside"),
    ("lora_transfer.generator_steps=0", "must be > 0"),
    ("lora_transfer.max_rollout=5", "between 1 and 4"),
])
def test_bad_transfer_settings_are_refused_before_any_compute(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load_config("smoke", [override])


def test_prompt_batches_are_a_function_of_the_index_and_split_by_rank():
    contexts, negative = torch.arange(10.0).reshape(10, 1, 1) + 1, torch.zeros(1, 1, 1)
    data = lora_transfer.PromptBatches(contexts, negative, (3,), caption_dropout=0.25, seed=4)
    whole = data.batch(7, 400)
    assert torch.equal(whole["context"], data.batch(7, 400)["context"])
    assert not torch.equal(whole["context"], data.batch(8, 400)["context"])
    assert torch.equal(data.batch(7, 400, rank=1, world_size=2)["context"], whole["context"][1::2])
    assert 0.18 < float((whole["context"] == 0).float().mean()) < 0.32 and whole["x0"].shape == (400, 3)


def _rows(style, content, bare_content=0.70, ci=(0.66, 0.74), stripes=None):
    rows = {"teacher@20": {"style_score": 0.0, "attribute_alignment": 0.80, "style_stripes": 0.0},
            "teacher+lora@20": {"style_score": 0.90, "attribute_alignment": 0.78, "style_stripes": 0.20}}
    for k in (1, 2, 4):
        rows[f"student@{k}"] = {"style_score": 0.0, "attribute_alignment": bare_content, "style_stripes": 0.0,
                                "attribute_alignment_ci": list(ci), "diversity": 10.0, "fd_probe_vs_reference": 9.0}
        rows[f"student+transfer_teacher@{k}"] = {"style_score": style[k], "attribute_alignment": content,
                                                 "diversity": 9.0, "fd_probe_vs_reference": 5.0,
                                                 "style_stripes": (stripes or {}).get(k, 0.20)}
    return rows


def test_judge_of_07_on_synthetic_rows():
    names = lora_survival.SURVIVAL_METRICS["nano"]

    def judged(rows, cost=1.2, steps=None, change=0.05, floor=0.04, source_change=None):
        table = lora_transfer.transfer_table(rows, "teacher+lora@20", {"teacher": "student+transfer_teacher"},
                                             [1, 2, 4], names)
        reference = lora_survival.reference_checks(rows, "teacher+lora@20", "teacher@20", names, "nano")
        leakage = {f"teacher@{k}": {"content_change": change, "content_floor": floor, "prompts": 115} for k in (1, 2, 4)}
        if source_change is not None:   # leakage_table's source row
            leakage["teacher+lora@20 vs teacher@20"] = {"content_change": source_change, "content_floor": floor}
        return table, lora_transfer.judge(table, "teacher", [1, 2, 4], reference, cost, steps or {"teacher": 200},
                                          200, leakage)

    table, good = judged(_rows({1: 0.73, 2: 0.82, 4: 0.86}, 0.75))
    assert checks.all_passed(good), [c.name for c in good if not c.passed]
    assert table["teacher@1"]["style_ratio"] == pytest.approx(0.73 / 0.90)
    failed = {c.name for c in judged(_rows({1: 0.71, 2: 0.82, 4: 0.86}, 0.75))[1] if not c.passed}
    assert failed == {"teacher@1: style x0.79 of the reference (≥ 0.8)"}
    failed = {c.name for c in judged(_rows({1: 0.9, 2: 0.9, 4: 0.9}, 0.75), change=-0.05)[1] if not c.passed}
    assert failed == {f"teacher@{k}: no leakage, content change -0.050 from the bare student on 115 prompts the style "
                      f"data never had (a drop must stay within its noise floor 0.040)" for k in (1, 2, 4)}
    failed = [c.name for c in judged(_rows({1: 0.9, 2: 0.9, 4: 0.9}, 0.75), change=-0.05, source_change=-0.046)[1]
              if not c.passed]   # the check names what L itself costs the teacher: why a transfer stops there
    assert len(failed) == 3 and all(name.endswith("floor 0.040; teacher+lora@20 vs teacher@20: -0.046, what a transfer "
                                                  "matching teacher+L inherits)") for name in failed)
    assert checks.all_passed(judged(_rows({1: 0.9, 2: 0.9, 4: 0.9}, 0.75), change=-0.04)[1])  # the floor itself passes
    assert {c.name for c in judged(_rows({1: 0.9, 2: 0.9, 4: 0.9}, 0.70, bare_content=0.70), cost=1.6)[1]
            if not c.passed} == {"transfer cost x1.60 of training L (≤ 1.5)",
                                 *{f"teacher@{k}: content x0.90 of the reference (≥ 0.95)" for k in (1, 2, 4)}}
    assert not checks.all_passed(judged(_rows({1: 0.9, 2: 0.9, 4: 0.9}, 0.75), steps={"teacher": 150})[1])
    collapsed = _rows({1: 0.9, 2: 0.9, 4: 0.9}, 0.75)
    collapsed["student+transfer_teacher@1"]["diversity"] = 7.9   # < 0.8 x the bare student's 10
    assert {c.name for c in judged(collapsed)[1] if not c.passed} == {
        "teacher@1: diversity x0.79 of the bare student's (≥ 0.8; DMD's mode seeking must not collapse it)"}
    # the probe's style score saturates: a row that reads "styled" but carries a fifth of the reference's stripes fails
    saturated = _rows({1: 0.9, 2: 0.9, 4: 0.9}, 0.75, stripes={1: 0.04, 2: 0.19, 4: 0.20})
    assert {c.name for c in judged(saturated)[1] if not c.passed} == {
        "teacher@1: graded style x0.20 of the reference (≥ 0.8)"}
    verdict = lora_transfer.transfer_verdict(table, ["teacher"], [1, 2, 4], {1.3: 0.5, 0.8: 0.6}, {"teacher": 1.2})
    assert verdict == ("@1/2/4 steps vs the reference — teacher: style x0.81/0.91/0.96 (graded x1.00/1.00/1.00), "
                       "content x0.96/0.96/0.96, "
                       "diversity x0.90/0.90/0.90, cost x1.20; zero-cost arm (2-step second time, untransferred L): best "
                       "t=0.8, style x0.60")


def test_leakage_is_read_on_the_unseen_prompts_only():
    """A style that wrecks the prompts it was trained on is no leak; one that wrecks a prompt it never saw is. Rows are
    renders of the gate set (the probe reads them right), with some prompts' images swapped for other creatures'."""
    params = config.load_config("smoke")
    world = worlds.load_world(params)
    prompts = world.gate.prompts
    captions = [prompts[0].upper(), prompts[1] + " ,", "a caption the gate never drew"]   # seen up to case/punctuation
    unseen = lora_transfer.unseen_prompts(prompts, captions)
    assert unseen == list(range(2, len(prompts)))
    subset, images = gate.prompt_subset(world.gate, unseen)
    assert subset.prompts == prompts[2:] and subset.attributes == world.gate.attributes[2:]
    assert [subset.image_prompt[i] + 2 for i in range(len(images))] == [world.gate.image_prompt[i] for i in images]

    renders = world.renders()
    wrong = renders.roll(2 * params.gate.seeds_per_prompt, dims=0)   # every image drawn from another prompt's render

    def damaged(prompt_indices):
        out = renders.clone()
        for i, p in enumerate(world.gate.image_prompt):
            if p in prompt_indices:
                out[i] = wrong[i]
        return out

    samples = {"student@1": renders, "student+seen_only@1": damaged({0, 1}), "student+unseen@1": damaged({2, 3, 4}),
               "teacher@20": renders, "teacher+lora@20": damaged({5})}
    arms = {"seen_only": "student+seen_only", "unseen": "student+unseen"}
    names = lora_survival.SURVIVAL_METRICS["nano"]
    leakage = lora_transfer.leakage_table(world, samples, arms, [1], names, unseen, ("teacher+lora@20", "teacher@20"))
    inherited = leakage["teacher+lora@20 vs teacher@20"]["content_change"]   # what L costs the teacher: one prompt
    assert leakage["unseen@1"]["content_change"] < inherited < 0
    assert leakage["seen_only@1"]["content_change"] == pytest.approx(0.0, abs=1e-9)
    assert leakage["unseen@1"]["content_change"] < min(-leakage["unseen@1"]["content_floor"], -0.05)
    assert leakage["unseen@1"]["prompts"] == len(prompts) - 2
    assert leakage["unseen@1"]["paired_ci"][1] < 0            # the paired interval sees the wreck: 3 prompts of all
    assert leakage["seen_only@1"]["paired_ci"] == [0.0, 0.0]  # identical images on every unseen prompt
    with pytest.raises(ValueError, match="no unseen prompt"):
        lora_transfer.leakage_table(world, samples, arms, [1], names, [])


def test_zero_cost_arm_changes_only_the_two_step_second_time():
    params = config.load_config("smoke")
    swept = lora_transfer.with_second_time(params, 0.8)
    assert swept.sampler.student_mid_times == [0.8, *params.sampler.student_mid_times[1:]]
    assert params.sampler.student_mid_times[0] == 1.3   # the run's own parameters are untouched
    assert sampler.student_times(swept, 2)[1] == 0.8 and sampler.student_times(swept, 1) == sampler.student_times(
        params, 1)


def test_the_cli_refuses_a_student_lora_before_loading_any_model(nano, tmp_path, capsys):
    from anima_lib import cli
    folder = _teacher_lora_folder(nano, tmp_path, way="student")
    assert cli.main(["lora", "transfer", "smoke", "--lora", str(folder), "--set", f"run.output_dir={tmp_path}"]) == 1
    assert "already a student LoRA" in capsys.readouterr().err
    assert cli.main(["lora", "transfer", "smoke", "--lora", str(tmp_path / "none.safetensors")]) == 1
    assert "no such LoRA file" in capsys.readouterr().err


def test_a_real_world_on_some_prompts_keeps_its_readers_and_their_cached_embeddings():
    """07's leakage on a real preset: the subset world reads the same style embeddings and the kept prompts' text
    embeddings (rows of the cached ones, nothing re-read)."""
    full = gate.GateSet(prompts=["a", "b", "c"], attributes=None, image_prompt=[0, 0, 1, 1, 2, 2],
                        image_seed=[0, 1, 0, 1, 0, 1], ids=["p0", "p1", "p2"], categories=["x", "y", "x"])
    world = worlds.RealWorld(config.load_config("smoke"), full, readers=None)
    world._text, world._style_embeddings = torch.arange(3.0)[:, None], torch.ones(2, 1)
    subset, images = world.on_prompts([2, 0])
    assert subset.gate.prompts == ["c", "a"] and subset.gate.ids == ["p2", "p0"] and subset.gate.categories == ["x", "x"]
    assert images.tolist() == [0, 1, 4, 5] and subset.gate.image_prompt == [1, 1, 0, 0]
    assert subset._text.flatten().tolist() == [2.0, 0.0] and subset._style_embeddings is world._style_embeddings

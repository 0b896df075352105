"""The quantization stage (notebook 04) as library code: the distilled student's DiT quantized with MLX affine under a
measured policy and written as a pre-packed checkpoint (what the engine loads), the text encoder as Q8_0 GGUF, the
memory ledger of the real Anima, the engine's parity fixtures, and `judge`, the stage's pass/fail rules.

Inputs the student really sees: `CALIBRATION_PROMPTS` gate prompts, its 4-step chain with the gate's noise, every
step's (x, σ, context) — the calibration of awq/gptq, the output-cosine sensitivity and the fidelity table. The detail
sensitivity (quant.sensitivity: detail, nano worlds) quantizes one role of the transformer blocks at a time (e.g.
every block's attn2.to_out.0: one pattern, which carries over to the 2B DiT's 28 blocks), samples `DETAIL_PROMPTS`
prompts at the served step counts (gate.student_steps) and reads the images with the detail-strict reader; its prompts
and noise are held out from the gate's (run.seed + `DETAIL_SEED_OFFSET`), so 05 does not score the images the policy
was chosen on. Roles whose
drop exceeds quant.detail_threshold go to 8 bits, largest drop first, as long as the planned 2B ledger stays within
`LEDGER_BUDGET_GB`. With quant.refine_updates > 0 the quantized layers' group scales and biases are then fitted end to
end on cache prompts (`refine_quantized`, quant/refine.py), codes and file format unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import cache, gate, metrics, parity_fixtures, sampler, text
from ..checks import Check
from ..distill.parallel import checkpoint_activations
from ..networks import transformer_velocity
from . import calibrated, ledger, load_memory, mlx_affine, packed, policy as quant_policy, q8_0, refine

QUANTIZED = "quantized"            # outputs/<run>/quantized: the packed student and the text encoder GGUF
STUDENT_FOLDER = "student"
REFINE_CHECKPOINTS = "refine"     # outputs/<run>/quantized/refine/last: the refinement, resumable (same model + settings)
TEXT_ENCODER_GGUF = "text_encoder_q8_0.gguf"
CALIBRATION_PROMPTS = 16           # gate prompts (one seed each) whose 4-step student chains calibrate and probe
CALIBRATION_STEPS = 4
DETAIL_PROMPTS = 128               # prompts (one seed each) the detail sensitivity samples, per unit measured
DETAIL_SEED_OFFSET = 7_919         # ... drawn from run.seed + this: held out from the gate's prompts and noise
WEIGHT_ERROR_BITS = (3, 8)         # besides quant.bits: the widths of the data-free method table
FIXTURE_PROMPTS = 4

# judge's thresholds
LEDGER_BUDGET_GB = 2.5             # the Anima weights (this run's DiT policy at 2B + Q8_0 text encoder + bf16 VAE
                                   # decoder) must fit
SEARCH_OVER_MINMAX_MAX = 1.0       # clip search's weight error / min-max's at quant.bits must be below this
GGUF_READBACK_MAX_DIFF = 0.0       # gguf-py must read back exactly what we wrote
REPLAY_MIN_COSINE = parity_fixtures.WORST_ROW_COSINE_GATE   # the parity fixtures replay through the quantized student


def quantized_root(params) -> Path:
    return params.output_path() / QUANTIZED


def quantized_dir(params) -> Path:
    """The pre-packed student checkpoint (MLX layout) 04 writes and 05 scores as student_q<bits>."""
    return quantized_root(params) / STUDENT_FOLDER


def text_encoder_gguf(params) -> Path:
    return quantized_root(params) / TEXT_ENCODER_GGUF


def load_quantized_student(params, float32: bool = True) -> Optional[torch.nn.Module]:
    """The packed student (packed words stay packed; `float32`: scales and kept weights cast to fp32 for compute, as
    the gate scores it), or None when 04 has not written it."""
    folder = quantized_dir(params)
    if not (folder / packed.CONFIG).is_file():
        return None
    from diffusers import CosmosTransformer3DModel
    model = packed.load_packed(folder, lambda cfg: CosmosTransformer3DModel.from_config(cfg))
    return model.float() if float32 else model


# --- the student's own inputs -----------------------------------------------------------------------------------------

@dataclass
class StudentInputs:
    """The student's sampler inputs on a few gate prompts: `noises` (the gate's, one per step), the Q8_0 `context`,
    and the `trace` of the full-precision student's 4-step chain ({"x", "sigma", ...} per step)."""
    params: object
    gate_set: gate.GateSet   # the few gate prompts (gate.gate_set at that size)
    noises: list
    context: torch.Tensor
    trace: list = field(default_factory=list)

    def chain(self, model: torch.nn.Module, steps: int) -> torch.Tensor:
        """Final latents of `model`'s `steps`-step chain from the same noise."""
        return sampler.student_sample(model, self.noises[:steps], self.context, self.params)

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> torch.Tensor:
        """`model`'s velocity at every traced step (the full-precision chain's inputs), concatenated."""
        return torch.cat([transformer_velocity(model, step["x"], step["sigma"], self.context) for step in self.trace])


def gate_subset_inputs(params, components, n_prompts: int, steps: int) -> tuple[gate.GateSet, list, torch.Tensor]:
    """(the gate set at `n_prompts` prompts x 1 seed, its noises for `steps` steps, the Q8_0 context)."""
    gate_set = gate.gate_set(params, n_prompts=n_prompts, seeds_per_prompt=1)
    shape = components.latent_shape(params.gate.image_size)
    noises = [gate.gate_noise(params, shape, gate_set, gate.MAIN).to(components.device)] + [
        gate.gate_noise(params, shape, gate_set, 2 + k).to(components.device) for k in range(steps - 1)]
    context = text.text_path_at(components, "q8_0").encode_prompts(gate_set.prompts).float()
    return gate_set, noises, context


def student_inputs(params, components, student: torch.nn.Module, n_prompts: int = CALIBRATION_PROMPTS,
                   steps: int = CALIBRATION_STEPS) -> StudentInputs:
    gate_set, noises, context = gate_subset_inputs(params, components, n_prompts, steps)
    inputs = StudentInputs(params, gate_set, noises, context)
    sampler.student_sample(student, noises, context, params, trace=inputs.trace)
    return inputs


def refine_inputs(params, components, steps: int) -> tuple[list, torch.Tensor]:
    """The refinement's prompts and noise: the first quant.refine_prompts prompts the student was distilled on (the
    cache's list: creatures on nano, cache.prompts_file on a real model; never the gate's), their Q8_0 context (what
    the phone encodes), and `steps` noise tensors drawn from run.seed + refine.REFINE_SEED_OFFSET."""
    records, _ = cache.cache_records(params, components)
    prompts = [r.prompt for r in records[:params.quant.refine_prompts]]
    context = text.text_path_at(components, "q8_0").encode_prompts(prompts).float()
    generator = torch.Generator().manual_seed(params.run.seed + refine.REFINE_SEED_OFFSET)
    shape = components.latent_shape(params.gate.image_size)
    noises = [torch.randn(len(prompts), *shape, generator=generator).to(components.device) for _ in range(steps)]
    return noises, context


def refine_quantized(params, components, student: torch.nn.Module, quantized: torch.nn.Module) -> dict:
    """refine.refine_affine on a float copy of `quantized` (the numerics the gate scores), then the fitted scales and
    biases — rounded to the checkpoint's bf16 — copied into `quantized` when the validation prompts kept them."""
    q, steps = params.quant, tuple(params.gate.student_steps)
    noises, context = refine_inputs(params, components, max(steps))
    as_float = copy.deepcopy(quantized).float()
    if params.distill.activation_checkpointing:   # 2B: a 4-step chain keeps ~73 GB of activations per prompt without
        checkpoint_activations(as_float)           # (652 MB per block and sample at 1024², README "Training memory")
    result = refine.refine_affine(as_float, student, noises, context, params, steps, q.refine_updates, q.refine_lr,
                                  q.refine_batch, stored=torch.bfloat16,
                                  checkpoint_dir=quantized_root(params) / REFINE_CHECKPOINTS)
    if result["kept"]:
        fitted = dict(as_float.named_modules())
        with torch.no_grad():
            for name, layer in quantized.named_modules():
                if isinstance(layer, packed.QuantizedLinear):
                    layer.scales.copy_(fitted[name].scales)
                    layer.biases.copy_(fitted[name].biases)
    if len(context) < q.refine_prompts:
        result["note"] = (f"{len(context)} prompts: the cache's list holds no more (quant.refine_prompts asks "
                          f"{q.refine_prompts})")
    return result


def refine_table(refinement: dict) -> dict[str, dict]:
    """Mean squared error of the 4-bit student's final latents against full precision's, same noise, per step count:
    before and after refinement, on the prompts fitted and on the validation prompts never trained on."""
    return {f"{split}, {when}": {f"@{k}": v for k, v in refinement[when][split].items()}
            for split in ("train", "validation") for when in ("before", "after")}


# --- tables -----------------------------------------------------------------------------------------------------------

def quantizable_linears(model: torch.nn.Module, group_size: int) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % group_size == 0}


def method_errors(model: torch.nn.Module, group_size: int, bits_list) -> dict[str, dict]:
    """Relative weight error ‖Ŵ − W‖/‖W‖ of the data-free methods over every Linear of row length divisible by the
    group size, bf16 weights as stored: {"<bits>-bit g<gs>": {method: error, "search vs minmax": ratio}}."""
    linears = quantizable_linears(model, group_size)
    table = {}
    for bits in sorted(set(bits_list)):
        row = {}
        for method in mlx_affine.METHODS:
            num = den = 0.0
            for layer in linears.values():
                w = layer.weight.detach().to(torch.bfloat16)
                deq = mlx_affine.dequantize(*mlx_affine.quantize(w, group_size, bits, method), group_size, bits,
                                            torch.float32)
                num += float((deq - w.float()).pow(2).sum())
                den += float(w.float().pow(2).sum())
            row[method] = (num / den) ** 0.5
        row["search vs minmax"] = row["search"] / row["minmax"]
        table[f"{bits}-bit g{group_size}"] = row
    return table


def policy_rows(model: torch.nn.Module, chosen: dict, kept: dict, default_fmt: dict, sensitivity: dict,
                detail: Optional[dict] = None) -> dict[str, dict]:
    """Per Linear: its format, why, its parameter count and the measured sensitivities (`detail`: per role)."""
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            f = chosen.get(name)
            rows[name] = {"format": f"{f['bits']}-bit g{f['group_size']}" if f else "bf16",
                          "why": kept.get(name, "sensitive" if f and f != default_fmt else "default"),
                          "params": module.weight.numel(),
                          "single-layer cosine": sensitivity.get(name, float("nan"))}
            if detail is not None:
                rows[name]["its role's eyes drop"] = detail.get(quant_policy.role_patterns([name])[0], float("nan"))
    return rows


def detail_table(result: "QuantizeResult") -> dict[str, dict]:
    """Per block role measured: its mean eyes-probability drop, the interval's low end and the format it got."""
    formats = {}
    for name, fmt in result.chosen.items():
        formats.setdefault(quant_policy.role_patterns([name])[0], fmt)
    return {role: {"mean drop": drop, "90% low end": result.detail_drop_low[role],
                   "format": f"{formats[role]['bits']}-bit g{formats[role]['group_size']}" if role in formats else "bf16"}
            for role, drop in sorted(result.detail_drop.items(), key=lambda kv: -result.detail_drop_low[kv[0]])}


def params_by_format(rows: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, int] = {}
    for r in rows.values():
        out[r["format"]] = out.get(r["format"], 0) + r["params"]
    return {k: {"Linear params": v} for k, v in out.items()}


def eyes_score(params, components, n_prompts: int = DETAIL_PROMPTS,
               steps=None) -> Callable[[torch.nn.Module], float]:
    """score(model) = per image, the detail-strict reader's probability of the prompted eye count on the student
    images `model` samples at `steps` (mean over steps; default gate.student_steps, every step count the phone serves:
    on 2,048 held-out images 4-bit chosen at 1 step alone cost strict alignment 0.006 / 0.030 / 0.016 at 1 / 2 / 4),
    on prompts and noise held out from the gate's (nano worlds only: the reader reads creatures)."""
    from ..nano_world import detail_reader
    steps = tuple(steps or params.gate.student_steps)
    held_out = dataclasses.replace(params, run=dataclasses.replace(params.run, seed=params.run.seed + DETAIL_SEED_OFFSET))
    gate_set, noises, context = gate_subset_inputs(held_out, components, n_prompts, max(steps))
    reader = detail_reader.load_detail_reader()
    eyes = detail_reader.READ_VALUES["eyes"]
    target = torch.tensor([eyes.index(gate_set.attributes[p]["eyes"]) for p in gate_set.image_prompt])

    @torch.no_grad()
    def score(model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(len(target))
        for k in steps:
            images = components.codec.decode(sampler.student_sample(model, noises[:k], context, held_out)).float().cpu()
            total += detail_reader.read_details(reader, images).probs["eyes"].gather(1, target[:, None])[:, 0]
        return total / len(steps)
    return score


def drop_lower_bounds(per_image_drops: dict[str, torch.Tensor]) -> dict[str, float]:
    """{unit: the low end of the 90% bootstrap interval of its mean per-image drop}: a role goes to 8 bits only when
    its drop is there beyond sampling noise (on 32 images the role ranking of two held-out sets disagreed)."""
    return {unit: metrics.prompt_interval(d, list(range(len(d))))[0] for unit, d in per_image_drops.items()}


def fidelity(student: torch.nn.Module, inputs: StudentInputs, options: dict[str, Callable[[], torch.nn.Module]],
             steps) -> dict[str, dict]:
    """Per option: final-latent cosine to the full-precision student after k steps (mean and worst image)."""
    reference = {k: inputs.chain(student, k) for k in steps}
    table = {}
    for label, build in options.items():
        model, row = build(), {}
        for k in steps:
            cos = torch.nn.functional.cosine_similarity(inputs.chain(model, k).flatten(1).double(),
                                                        reference[k].flatten(1).double(), dim=1)
            row[f"@{k} mean"], row[f"@{k} worst"] = float(cos.mean()), float(cos.min())
        table[label] = row
    return table


def ledger_table(rows: dict[str, dict]) -> dict[str, dict]:
    return {name: {**{p: row[p] / ledger.GB for p in ledger.PARTS}, "total GB": row["total_GB"],
                   "total GiB": row["total_GiB"], f"≤ {LEDGER_BUDGET_GB} GB": row["total_GB"] <= LEDGER_BUDGET_GB,
                   "≤ 2.0 GB": row["total_GB"] <= 2.0}
            for name, row in rows.items()}


def gguf_readback(text_encoder: torch.nn.Module, path: Path) -> tuple[dict, float]:
    """Write the text encoder as Q8_0 GGUF and read it back with gguf-py: (write stats, max |gguf-py − ours|)."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize as gguf_dequantize
    stats = q8_0.write_text_encoder_gguf(text_encoder, path)
    by_gguf_name = {q8_0.gguf_tensor_name(k): v for k, v in text_encoder.state_dict().items()}
    diff = 0.0
    for tensor in GGUFReader(path).tensors:
        ours = by_gguf_name[tensor.name].float()
        if tensor.tensor_type == GGMLQuantizationType.Q8_0:
            ours = q8_0.fake_quantize(ours)
            theirs = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type)).reshape(ours.shape)
        else:
            theirs = torch.from_numpy(tensor.data.copy()).reshape(ours.shape)
        diff = max(diff, float((ours - theirs).abs().max()))
    return stats, diff


# --- the stage --------------------------------------------------------------------------------------------------------

@dataclass
class QuantizeResult:
    fmt: dict                      # the default {"bits", "group_size"}
    method: str
    policy: dict                   # the DiT policy written into the checkpoint
    chosen: dict                   # {layer: format} quantized
    kept: dict                     # {layer: reason} left in bf16
    method_error: dict             # data-free methods' weight error (table)
    sensitivity: dict              # {layer: single-layer output cosine}
    detail_drop: Optional[dict]    # {role: mean eyes-probability drop, that role alone at 4 bits} (sensitivity: detail)
    detail_drop_low: Optional[dict]  # {role: the 90% interval's low end of that drop}: what the policy decides on
    refinement: Optional[dict]     # refine.refine_affine's record (quant.refine_updates > 0)
    policy_rows: dict
    load_row: dict                 # packed size, bit-exact reload, load memory
    fidelity: dict                 # latent cosine per option
    chosen_label: str
    ledger_rows: dict              # anima_ledger(...) raw rows (bytes)
    gguf_stats: dict
    gguf_readback_diff: float
    fixture_dir: Path
    fixture_index: dict
    replayed: dict                 # {fixture output: worst-row cosine}
    quantized: torch.nn.Module = field(repr=False)

    @property
    def policy_scenario(self) -> str:
        """The ledger row of this run's DiT policy carried to the 2B blocks."""
        return policy_scenario_name(self.method)

    @property
    def reloaded_exact(self) -> bool:
        return bool(self.load_row["reloaded == in-memory (bit-exact outputs)"])

    @property
    def packed_over_bf16(self) -> float:
        return self.load_row["packed / bf16"]


def policy_scenario_name(method: str) -> str:
    return f"this run's DiT policy ({method}) at 2B, TE Q8_0"


def run_quantize(params, components, student: torch.nn.Module, progress: Callable[[str], None] = lambda s: None
                 ) -> QuantizeResult:
    """Everything notebook 04 shows, computed: see the module docstring."""
    q = params.quant
    fmt = {"bits": q.bits, "group_size": q.group_size}
    inputs = student_inputs(params, components, student)
    progress("method errors")
    method_error = method_errors(student, q.group_size, (q.bits, *WEIGHT_ERROR_BITS))
    base_policy = {**ledger.DIT_POLICY, **fmt}
    # awq / gptq calibrate on each layer's inputs; a nano run also compares every method (full statistics are small
    # there), a real one only its own (a 2B DiT's full Σ x xᵀ of every layer would take ~11 GB)
    every_linear = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)]
    nano = params.model.preset == "nano"
    compared = calibrated.METHODS if nano else tuple(dict.fromkeys((*mlx_affine.METHODS, q.method)))
    calibration = calibrated.collect_grams(
        student, inputs.run, every_linear,
        full=every_linear if nano else calibrated.full_statistics_for(student, q.method, every_linear))
    progress("sensitivity")
    measured_on, measured_grams = student, calibration   # awq: measured where its scales are folded in
    if q.method in calibrated.FOLDING:
        measured_on, measured_grams = calibrated.awq_folded(student, calibration,
                                                            packed.resolve_policy(student, base_policy)[0])
    sensitivity = quant_policy.layer_sensitivity(measured_on, inputs.run, fmt, q.method, measured_grams)
    dit_policy = quant_policy.policy_from_sensitivity(sensitivity, base_policy, q.sensitivity_threshold)
    drops = drops_low = None
    if q.sensitivity == "detail":   # each role the policy puts at the default format, quantized alone
        default_layers = [n for n, f in packed.resolve_policy(student, dit_policy)[0].items() if f == fmt]
        per_image = quant_policy.detail_drop(measured_on, eyes_score(params, components), fmt, q.method,
                                             measured_grams, quant_policy.role_patterns(default_layers))
        drops = {unit: float(d.mean()) for unit, d in per_image.items()}
        drops_low = drop_lower_bounds(per_image)
        n_blocks = len(student.transformer_blocks)
        dit_policy = quant_policy.policy_from_detail(
            drops_low, dit_policy, q.detail_threshold,
            fits=lambda pol: ledger.planned_total_gb(pol, n_blocks) <= LEDGER_BUDGET_GB)

    progress("quantize and pack")
    quantized, chosen, kept = packed.quantize_model(copy.deepcopy(student), dit_policy, q.method, torch.bfloat16,
                                                    calibration)
    unrefined, refinement = quantized, None
    if q.refine_updates:
        progress("refine scales and biases")
        unrefined = copy.deepcopy(quantized)
        refinement = refine_quantized(params, components, student, quantized)
    folder = quantized_dir(params)
    packed.save_packed(quantized, folder, dit_policy, chosen, kept, dict(components.transformer.config))
    reloaded, step = load_quantized_student(params, float32=False), inputs.trace[0]
    same = torch.equal(transformer_velocity(reloaded, step["x"], step["sigma"], inputs.context),
                       transformer_velocity(quantized, step["x"], step["sigma"], inputs.context))
    size = (folder / packed.WEIGHTS).stat().st_size
    fp_bytes = 2 * sum(p.numel() for p in student.parameters())
    rss = load_memory.measure("packed", folder, threads=params.run.threads)
    load_row = {"packed file bytes": size, "bf16 bytes (2 B/param)": fp_bytes, "packed / bf16": size / fp_bytes,
                "reloaded == in-memory (bit-exact outputs)": same,
                "load: RSS above base, peak MB": (rss["peak"] - rss["base"]) / 1e6,
                "load: RSS above base, steady MB": (rss["steady"] - rss["base"]) / 1e6}

    progress("fidelity")
    chosen_label = f"policy, {q.method}{' + refined' if refinement and refinement['kept'] else ''} (chosen)"

    def build(pol, method):
        return lambda: packed.quantize_model(copy.deepcopy(student), pol, method, torch.bfloat16, calibration)[0]

    options = {(chosen_label if m == q.method else f"policy, {m}"):
               ((lambda: quantized) if m == q.method else build(dit_policy, m)) for m in compared}
    if refinement is not None and refinement["kept"]:
        options[f"policy, {q.method}, unrefined"] = lambda: unrefined
    options.update({
        "all eligible 4-bit g32 (no policy)": build({"bits": 4, "group_size": 32, "layers": {}}, q.method),
        "mixed 3/4-bit (MLP 3-bit)": build({**dit_policy, "layers": {
            **dit_policy["layers"], "transformer_blocks.*.ff.*": {"bits": 3, "group_size": 32}}}, q.method),
        "3-bit g32 policy": build({**dit_policy, "bits": 3}, q.method)})
    fidelity_table = fidelity(student, inputs, options, params.gate.student_steps)

    progress("ledger")
    scenarios = {**ledger.SCENARIOS, policy_scenario_name(q.method): {
        **ledger.SCENARIOS[ledger.PLANNED],
        "transformer": ledger.policy_for_blocks(dit_policy, len(student.transformer_blocks), ledger.ANIMA_2B_BLOCKS)}}
    ledger_rows = ledger.anima_ledger(scenarios)

    progress("text encoder GGUF")
    gguf_stats, readback_diff = gguf_readback(components.text_encoder, text_encoder_gguf(params))

    progress("parity fixtures")
    fixture_dir = params.output_path() / "fixtures"
    as_float = copy.deepcopy(quantized).float()
    index = parity_fixtures.write(fixture_dir, components, as_float, inputs.gate_set.prompts[:FIXTURE_PROMPTS],
                           params)
    replayed = parity_fixtures.replay(fixture_dir, components, as_float)
    return QuantizeResult(
        fmt=fmt, method=q.method, policy=dit_policy, chosen=chosen, kept=kept, method_error=method_error,
        sensitivity=sensitivity, detail_drop=drops, detail_drop_low=drops_low, refinement=refinement,
        policy_rows=policy_rows(student, chosen, kept, fmt, sensitivity, drops), load_row=load_row,
        fidelity=fidelity_table, chosen_label=chosen_label, ledger_rows=ledger_rows, gguf_stats=gguf_stats,
        gguf_readback_diff=readback_diff, fixture_dir=fixture_dir, fixture_index=index, replayed=replayed,
        quantized=quantized)


# --- pass / fail --------------------------------------------------------------------------------------------------------

def judge(reloaded_exact: bool, replay_worst_cosine: float, gguf_readback_diff: float, policy_ledger_gb: float,
          search_over_minmax: float, bits: int) -> list[Check]:
    """The stage's checks, each naming the measured value and its threshold."""
    return [
        Check("pre-packed checkpoint reloads bit-exactly", bool(reloaded_exact)),
        Check(f"fixtures replay ≥ {REPLAY_MIN_COSINE} (worst {replay_worst_cosine:.6f})",
              replay_worst_cosine >= REPLAY_MIN_COSINE),
        Check(f"GGUF text encoder reads back exactly (max diff {gguf_readback_diff})",
              gguf_readback_diff <= GGUF_READBACK_MAX_DIFF),
        Check(f"Anima ledger with this run's DiT policy ≤ {LEDGER_BUDGET_GB} GB ({policy_ledger_gb:.3f} GB)",
              policy_ledger_gb <= LEDGER_BUDGET_GB),
        Check(f"search beats min-max at {bits} bits (×{search_over_minmax:.3f})",
              search_over_minmax < SEARCH_OVER_MINMAX_MAX),
    ]


def judge_result(result: QuantizeResult) -> list[Check]:
    bits, gs = result.fmt["bits"], result.fmt["group_size"]
    return judge(result.reloaded_exact, min(result.replayed.values()), result.gguf_readback_diff,
                 result.ledger_rows[result.policy_scenario]["total_GB"],
                 result.method_error[f"{bits}-bit g{gs}"]["search vs minmax"], bits)


def summary(result: QuantizeResult, steps) -> tuple[dict, str, dict, dict]:
    """(rows for metrics.json, verdict line, headline, extra records: the policy and the detail drops) of a run."""
    bits, gs = result.fmt["bits"], result.fmt["group_size"]
    chosen_fid = result.fidelity[result.chosen_label]
    ours = result.ledger_rows[result.policy_scenario]
    rows = {f"student_q{bits}@{k}": {"latent_cosine_mean": chosen_fid[f"@{k} mean"],
                                     "latent_cosine_worst": chosen_fid[f"@{k} worst"]} for k in steps}
    promoted = len([f for f in result.chosen.values() if f != result.fmt])
    verdict = (f"DiT {bits}-bit g{gs} ({result.method}) + {promoted} layers at 8 bits, {len(result.kept)} kept bf16; "
               f"packed/bf16 {result.packed_over_bf16:.3f}; latent cosine @4 "
               f"{chosen_fid.get('@4 mean', float('nan')):.5f} (worst {chosen_fid.get('@4 worst', float('nan')):.5f}); "
               f"Anima ledger {ours['total_GB']:.3f} GB ({ours['total_GiB']:.3f} GiB) with this policy")
    headline = {"ledger_GB": ours["total_GB"], "packed_over_bf16": result.packed_over_bf16,
                "latent_cosine@4": chosen_fid.get("@4 mean")}
    extra = {"policy": result.policy, "method": result.method}
    if result.detail_drop is not None:
        extra["detail_drop"] = {"mean": result.detail_drop, "low_90": result.detail_drop_low}
    if result.refinement is not None:
        extra["refinement"] = {k: v for k, v in result.refinement.items() if k != "loss"}
        verdict += (f"; scales/biases refined ({result.refinement['updates']} updates, "
                    f"{'kept' if result.refinement['kept'] else 'discarded: validation error did not fall'})")
    return rows, verdict, headline, extra

"""The quantization stage's library parts: its pass/fail rules (judge) on synthetic values, where it writes, the
policy rules (promotion by cosine or by detail drop, per-layer overrides carried to the 2B block count)."""
import pytest
import torch

from anima_lib import config
from anima_lib.quant import ledger, packed, policy, stage

GOOD = dict(reloaded_exact=True, replay_worst_cosine=0.99999, gguf_readback_diff=0.0, policy_ledger_gb=2.26,
            search_over_minmax=0.9, bits=4)


def test_judge_passes_good_values_and_names_every_threshold():
    checks = stage.judge(**GOOD)
    assert [c.passed for c in checks] == [True] * 5
    names = " | ".join(c.name for c in checks)
    for shown in (f"≥ {stage.REPLAY_MIN_COSINE}", f"≤ {stage.LEDGER_BUDGET_GB} GB (2.260 GB)", "×0.900",
                  "max diff 0.0"):
        assert shown in names


@pytest.mark.parametrize("key,value,failing", [
    ("reloaded_exact", False, 0),
    ("replay_worst_cosine", stage.REPLAY_MIN_COSINE - 1e-6, 1),
    ("gguf_readback_diff", 1e-7, 2),
    ("policy_ledger_gb", stage.LEDGER_BUDGET_GB + 0.001, 3),
    ("search_over_minmax", stage.SEARCH_OVER_MINMAX_MAX, 4),
])
def test_judge_fails_exactly_the_broken_check(key, value, failing):
    checks = stage.judge(**{**GOOD, key: value})
    assert [i for i, c in enumerate(checks) if not c.passed] == [failing]


def test_judge_at_the_thresholds():
    edge = stage.judge(**{**GOOD, "replay_worst_cosine": stage.REPLAY_MIN_COSINE,
                          "policy_ledger_gb": stage.LEDGER_BUDGET_GB})
    assert all(c.passed for c in edge)


def test_quantized_paths_live_under_the_run():
    params = config.load_config("nano", ["run.output_dir=/tmp/anima-q-test", "run.name=r1"])
    assert stage.quantized_dir(params) == params.output_path() / "quantized" / "student"
    assert stage.text_encoder_gguf(params).parent == stage.quantized_dir(params).parent
    assert stage.load_quantized_student(params) is None            # nothing written there yet


def test_promotion_by_cosine_and_by_detail_keeps_the_base_rules():
    base = {"bits": 4, "group_size": 32, "layers": {"proj_out": "keep", "b.*.norm": {"bits": 8, "group_size": 32}}}
    by_cosine = policy.policy_from_sensitivity({"a": 0.99, "b.0.norm": 0.5, "c": 0.9999}, base, 0.999)
    assert by_cosine["layers"]["a"] == policy.PROMOTED_FORMAT and "c" not in by_cosine["layers"]
    assert by_cosine["layers"]["b.*.norm"] == {"bits": 8, "group_size": 32} and "b.0.norm" not in by_cosine["layers"]
    by_detail = policy.policy_from_detail({"a": 0.02, "c": 0.005, "proj_out": 0.5}, base, 0.01)
    assert set(by_detail["layers"]) == {"a", "proj_out", "b.*.norm"} and by_detail["layers"]["proj_out"] == "keep"


def test_detail_drop_quantizes_one_layer_at_a_time():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    x = torch.randn(16, 64)
    reference = model(x).detach()
    seen = []

    def score(m):  # higher is better: minus the output error; records which layers were quantized at each call
        seen.append(tuple(isinstance(layer, packed.QuantizedLinear) for layer in m))
        return -float(((m(x) - reference) ** 2).mean())
    drops = policy.detail_drop(model, score, {"bits": 4, "group_size": 32}, "search")
    assert seen == [(False, False), (True, False), (False, True)]
    assert set(drops) == {"0", "1"} and all(d > 0 for d in drops.values())
    assert all(isinstance(layer, torch.nn.Linear) for layer in model)   # the model is given back unquantized


def test_a_measured_policy_reaches_the_2b_blocks_at_the_same_depth():
    measured = {**ledger.DIT_POLICY, "layers": {"transformer_blocks.0.attn2.to_v": {"bits": 8, "group_size": 32},
                                                "transformer_blocks.5.ff.net.2": {"bits": 8, "group_size": 32},
                                                **ledger.DIT_POLICY["layers"]}}
    scaled = ledger.policy_for_blocks(measured, 6, 28)
    assert [k for k in scaled["layers"] if k.endswith("attn2.to_v")] == [
        f"transformer_blocks.{j}.attn2.to_v" for j in range(4)]
    assert [k for k in scaled["layers"] if k.endswith("ff.net.2")] == [
        f"transformer_blocks.{j}.ff.net.2" for j in range(23, 28)]
    assert scaled["layers"]["transformer_blocks.*.norm*.linear_*"] == {"bits": 8, "group_size": 32}
    rows = ledger.anima_ledger({"planned": ledger.SCENARIOS[ledger.PLANNED],
                                "measured": {**ledger.SCENARIOS[ledger.PLANNED], "transformer": scaled}})
    extra = rows["measured"]["transformer"] - rows["planned"]["transformer"]
    # 4 cross-attention to_v (1024 -> 2048) and 5 MLP down projections (8192 -> 2048) moved from 4-bit g32 (5 bits
    # per weight with the bf16 scale and bias) to 8-bit g32 (9 bits): 4 more bits per weight
    assert extra == (4 * 2048 * 1024 + 5 * 2048 * 8192) * 4 // 8


def test_detail_sensitivity_is_a_nano_only_parameter():
    assert config.load_config("nano", ["quant.sensitivity=detail", "quant.method=gptq"]).quant.method == "gptq"
    with pytest.raises(config.ConfigError, match="quant.sensitivity = 'detail' needs the nano world"):
        config.load_config("anima-2b", ["quant.sensitivity=detail"], check_paths=False)
    with pytest.raises(config.ConfigError, match="quant.method"):
        config.load_config("nano", ["quant.method=nf4"])


def test_role_units_group_a_role_across_blocks_and_must_match():
    names = ["transformer_blocks.0.attn2.to_q", "transformer_blocks.1.attn2.to_q", "transformer_blocks.0.ff.net.2",
             "proj_out"]
    assert policy.role_patterns(names) == ["transformer_blocks.*.attn2.to_q", "transformer_blocks.*.ff.net.2",
                                           "proj_out"]
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    seen = []
    effects = policy.unit_effects(model, lambda m: seen.append(sum(isinstance(x, packed.QuantizedLinear) for x in m))
                                  or 0.0, {"bits": 4, "group_size": 32}, units=["*"])
    assert effects == {"*": 0.0} and seen == [2]
    with pytest.raises(ValueError, match="unit 'nothing' matches no Linear"):
        policy.unit_effects(model, lambda m: 0.0, {"bits": 4, "group_size": 32}, units=["nothing"])


def test_detail_promotion_goes_largest_drop_first_within_the_budget():
    base = {"bits": 4, "group_size": 32, "layers": {}}
    drops = {"small": 0.015, "big": 0.2, "middle": 0.05, "noise": -0.03}
    assert list(policy.policy_from_detail(drops, base, 0.01)["layers"]) == ["small", "middle", "big"]
    one_only = policy.policy_from_detail(drops, base, 0.01, fits=lambda pol: len(pol["layers"]) <= 1)
    assert list(one_only["layers"]) == ["big"]
    assert policy.policy_from_detail(drops, base, 0.3) == base


def test_planned_total_prices_a_measured_policy_at_2b():
    measured = {**ledger.DIT_POLICY, "layers": {"transformer_blocks.*.attn2.to_out.0": {"bits": 8, "group_size": 32},
                                                **ledger.DIT_POLICY["layers"]}}
    planned = ledger.anima_ledger({"p": ledger.SCENARIOS[ledger.PLANNED]})["p"]["total_GB"]
    assert ledger.planned_total_gb(ledger.DIT_POLICY, 6) == planned
    assert ledger.planned_total_gb(measured, 6) == pytest.approx(planned + 28 * 2048 * 2048 * 4 / 8 / 1e9)


def test_a_role_is_promoted_on_the_interval_not_on_a_noisy_mean():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(128, generator=g) * 0.1            # mean ~0, wide: its low end is below 0
    real = 0.05 + torch.randn(128, generator=g) * 0.02     # a consistent drop
    low = stage.drop_lower_bounds({"noise": noise, "real": real})
    assert low["noise"] < 0 < 0.04 < low["real"] < 0.05
    chosen = policy.policy_from_detail(low, {"bits": 4, "group_size": 32, "layers": {}}, 0.01)
    assert list(chosen["layers"]) == ["real"]

"""The training-memory ledger (anima_lib.distill.memory): the real DiT's parameter count on the meta device, the
per-rank state arithmetic, the activation measurement on a tiny block (linear in batch, checkpointing keeps only
the input, math attention keeps N x N, composition into a model, extrapolation to a larger token count), and the
fits / largest-batch / global-batch logic."""
import pytest
import torch

from anima_lib.distill import memory as M

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=4.0,
            text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 32, 32), patch_size=(1, 2, 2),
            rope_scale=(1.0, 1.0, 1.0), concat_padding_mask=True, extra_pos_embed_type=None)
TINY_HIDDEN = 32
TEXT = 8
SIDES = (6, 8, 10)                # 36, 64, 100 tokens: none equals another dim of TINY
TOY = M.ParamCounts(total=1_000_000, per_block=100_000, blocks=8)   # 200,000 outside the blocks


def _flat(value: float) -> M.PeakFit:
    return M.PeakFit([value], [0.0], [0.0], 0.0, True)


def hand_acts(saved=0.0, checkpointed=0.0, outside=0.0, backward=0.0, forward=0.0, jvp=0.0) -> M.Activations:
    """Activations with known per-sample bytes, independent of the token count (hidden 0: no input bytes)."""
    return M.Activations(dtype="bfloat16", hidden=0, text_tokens=0, text_dim=0, tokens_measured=[],
                         saved=M.Fit(saved, 0.0), saved_math=M.Fit(saved, 0.0),
                         saved_checkpointed=M.Fit(checkpointed, 0.0), outside=M.Fit(outside, 0.0),
                         backward=_flat(backward), forward=_flat(forward), jvp=_flat(jvp))


@pytest.fixture(scope="module")
def tiny():
    return M.measure_activations(TINY, sides=SIDES, dtype=torch.float32, text_tokens=TEXT, threads=1)


def test_real_dit_parameter_count_on_meta_device():
    counts = M.parameter_counts()
    assert counts.total == 1_956_405_248
    assert counts.per_block == 69_206_528 and counts.blocks == 28
    assert counts.outside_blocks == 18_622_464


def test_states_ddp_replicate_16_bytes_per_trainable_param():
    row = M.rank_ledger(TOY, hand_acts(), "ddp", 1, 1, False, "fd")
    student = sum(v for k, v in row["states"].items() if k.startswith("student"))
    fake = sum(v for k, v in row["states"].items() if k.startswith("fake score"))
    assert student == fake == 16 * TOY.total
    assert row["states"]["EMA (fp32)"] == 4 * TOY.total and row["states"]["teacher (bf16)"] == 2 * TOY.total
    assert row["states GB"] * M.GB == pytest.approx(38 * TOY.total)
    assert row["buffers"] == {} and row["total GB"] * M.GB == pytest.approx(38 * TOY.total)
    eight = M.rank_ledger(TOY, hand_acts(), "ddp", 8, 1, False, "fd")
    assert eight["states"] == row["states"]                                   # replicated: W does not help
    assert eight["buffers"] == {"grad all-reduce buffer": 2 * TOY.total}      # one bf16 grad-sized bucket copy


def test_states_fsdp_divide_by_world_size():
    row = M.rank_ledger(TOY, hand_acts(), "fsdp", 8, 1, False, "fd")
    student = sum(v for k, v in row["states"].items() if k.startswith("student"))
    assert student == pytest.approx(16 * TOY.total / 8)
    assert row["states"]["EMA (fp32)"] == pytest.approx(4 * TOY.total / 8)
    assert row["states"]["teacher (bf16)"] == 2 * TOY.total                   # replicated by default
    sharded = M.rank_ledger(TOY, hand_acts(), "fsdp", 8, 1, False, "fd", teacher_sharded=True)
    assert sharded["states"]["teacher (bf16)"] == pytest.approx(2 * TOY.total / 8)
    assert sharded["teacher"] == "sharded" and row["teacher"] == "replicated"
    # unsharded buffers: 2 gathered bf16 blocks + the root params, one block's bf16 grads + fp32 reduce copy
    assert sum(row["buffers"].values()) == (2 * 100_000 + 200_000) * 2 + 100_000 * 6
    assert M.rank_ledger(TOY, hand_acts(), "fsdp", 1, 1, False, "fd")["states GB"] == pytest.approx(
        38 * TOY.total / M.GB)
    with pytest.raises(ValueError, match="strategy"):
        M.rank_ledger(TOY, hand_acts(), "zero3", 8, 1, False, "fd")


def test_activation_phases_arithmetic():
    acts = hand_acts(saved=10, checkpointed=1, outside=5, backward=3, forward=2, jvp=50)
    layers, b = 4, 3
    off = M.activation_bytes(acts, b, False, "jvp", tokens=7, layers=layers)
    assert off["graphs"] == 2 * b * (layers * 10 + 5)                         # two graphs (sCM + DMD rollout)
    assert off["graph phase"] == off["graphs"] + max(2 * b * 2, b * 3)
    assert off["tangent phase"] == b * 50 and off["peak"] == max(off["graph phase"], b * 50)
    on = M.activation_bytes(acts, b, True, "jvp", tokens=7, layers=layers)
    assert on["graphs"] == 2 * b * (layers * 1 + 5)
    assert on["graph phase"] == on["graphs"] + b * (10 + 3)                   # one block recomputed + its backward
    assert on["peak"] == b * 50                                               # the JVP transient dominates here
    fd = M.activation_bytes(acts, b, True, "fd", tokens=7, layers=layers)
    assert fd["tangent phase"] == 2 * b * 2 and fd["peak"] == on["graph phase"]
    with pytest.raises(ValueError, match="tangent"):
        M.activation_bytes(acts, 1, True, "spsa")


def test_tiny_block_saved_bytes_linear_in_batch_and_checkpointing_keeps_only_the_input(tiny):
    two = M.measure_activations(TINY, sides=SIDES, dtype=torch.float32, text_tokens=TEXT, batch=2, jvp=False,
                                threads=1)
    for n in tiny.tokens_measured:
        # per-sample coefficients from batch 2 match batch 1: saved(batch 2) = 2 x saved(batch 1)
        ratio = 2 * two.measured[n]["saved"] / tiny.measured[n]["saved"]
        assert ratio == pytest.approx(2.0, rel=0.03), (n, ratio)
        assert tiny.measured[n]["saved_checkpointed"] == n * TINY_HIDDEN * 4      # fp32 block input, nothing else
        assert tiny.measured[n]["saved_checkpointed"] < tiny.measured[n]["saved"] / 5
    assert tiny.saved.per_token2 == 0 and tiny.saved.max_rel_residual < 1e-6
    assert tiny.saved_math.per_token2 == pytest.approx(TINY["num_attention_heads"] * 4)   # the N x N softmax, fp32
    assert tiny.jvp(256) > tiny.forward(256) > 0
    with pytest.raises(ValueError, match="another dimension"):
        M.measure_activations(TINY, sides=(4,), text_tokens=TEXT)          # 16 tokens = head_dim 16
    for value in tiny.checks.values():   # the live-bytes tracker agrees with the saved-tensor hooks
        assert value == pytest.approx(1.0, abs=0.01)


def test_tiny_block_composes_into_the_model(tiny):
    check = M.validate_composition(tiny, TINY, layers=2, side=6, dtype=torch.float32, threads=1)
    assert check["ratio"] == pytest.approx(1.0, abs=0.05), check


def test_tiny_block_extrapolates_to_more_tokens(tiny):
    check = M.check_extrapolation(tiny, TINY, side=14, dtype=torch.float32, threads=1)  # 196 tokens, fitted 36..100
    for quantity, c in check.items():
        assert c["ratio"] == pytest.approx(1.0, abs=0.01), (quantity, c)


def test_fits_with_headroom():
    usable_80 = 0.9 * 80e9
    assert M.fits(usable_80)["80 GB"] and not M.fits(usable_80 + 1)["80 GB"]
    assert M.fits(usable_80 + 1)["141 GB"] and not M.fits(0.9 * 141e9 + 1)["141 GB"]
    assert M.fits(80e9, headroom=0.0)["80 GB"] and not M.fits(80e9, headroom=0.05)["80 GB"]


def test_largest_batch_and_global_batch_plan():
    # toy: 38 MB of states, activations 1 GB per sample in the graph phase -> a 10 GB card with 10% headroom
    acts = hand_acts(saved=0.5e9 / 4, outside=0)          # 2 graphs x 4 layers x 0.125 GB = 1 GB per sample
    counts = M.ParamCounts(total=1_000_000, per_block=250_000, blocks=4)
    caps = {"10 GB": 10.0}
    b = M.max_batch_per_rank(counts, acts, "ddp", 1, False, "fd", "10 GB", capacities=caps)
    assert b == 8                                           # 8 x 1 GB + 0.038 GB <= 9 GB < 9 x 1 GB
    assert M.max_batch_per_rank(counts, hand_acts(saved=1e10), "ddp", 1, False, "fd", "10 GB", capacities=caps) == 0
    assert M.global_batch_plan(8, 32) == {"ranks": 8, "batch/rank": 32, "accumulation": 2, "global": 512}
    assert M.global_batch_plan(8, 63)["batch/rank"] == 32
    assert M.global_batch_plan(8, 1000)["batch/rank"] == 64 and M.global_batch_plan(8, 1000)["accumulation"] == 1
    assert M.global_batch_plan(1, 9) == {"ranks": 1, "batch/rank": 8, "accumulation": 64, "global": 512}
    assert M.global_batch_plan(8, 0) is None
    rows = M.fit_summary(counts, acts, strategies=("ddp",), world_sizes=(1,), checkpointing=(False,),
                         tangents=("fd",), capacities=caps)
    assert rows[0]["max batch/rank 10 GB"] == 8 and rows[0]["to 512 on 10 GB"] == "1 x 8 x 64 accum"


def test_table_covers_every_configuration_and_renders():
    rows = M.ledger_table(TOY, hand_acts(saved=1e6))
    assert len(rows) == 2 * 2 * 5 * 2 * 2
    table = M.markdown(rows, M.TABLE_COLUMNS)
    assert table.count("\n") == len(rows) + 1 and "| fits 80 GB | fits 141 GB |" in table.splitlines()[0]
    assert "| yes | yes |" in table

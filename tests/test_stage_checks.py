"""The pass/fail rules of 00_nano_teacher, 01_cache, 02_distill and 03_deturbo on synthetic rows: each threshold is
pinned by a case just inside and one just outside it, so changing a threshold or breaking a check fails here."""
import pytest

from anima_lib import cache, checks, distill, worlds
from anima_lib.distill import deturbo
from anima_lib.nano_world import teacher as nano_teacher


def passed(result: list[checks.Check]) -> list[bool]:
    assert all(isinstance(c, checks.Check) for c in result)
    return [c.passed for c in result]


# --- 00_nano_teacher --------------------------------------------------------------------------------------------------

def test_teacher_judge_needs_a_manifest_that_lists_weight_files():
    assert passed(nano_teacher.judge({"files": {"transformer/model.safetensors": "ab" * 32}})) == [True]
    assert passed(nano_teacher.judge({"files": {}})) == [False]      # verify_teacher would have checked nothing
    assert passed(nano_teacher.judge({})) == [False]


def test_teacher_judge_passes_the_shipped_teacher():
    result = nano_teacher.judge(nano_teacher.verify_teacher())
    assert passed(result) == [True] and "files)" in result[0].name


# --- 01_cache ---------------------------------------------------------------------------------------------------------

VERIFIED = {"ok": [0, 1], "bad": {}, "expected": 2}


def test_cache_judge_q8_0_cosine_threshold():
    assert cache.Q8_0_MIN_WORST_ROW_COSINE == 0.999
    assert passed(cache.judge(16, 16, VERIFIED, 0.999)) == [True, True, True]     # the threshold itself passes
    assert passed(cache.judge(16, 16, VERIFIED, 0.9989)) == [True, True, False]
    assert "0.998900" in cache.judge(16, 16, VERIFIED, 0.9989)[2].name          # the measured value is named


def test_cache_judge_every_prompt_and_every_shard():
    assert passed(cache.judge(15, 16, VERIFIED, 1.0)) == [False, True, True]
    assert passed(cache.judge(17, 16, VERIFIED, 1.0)) == [False, True, True]
    bad = {"ok": [0], "bad": {1: "corrupt: sha256 differs from the manifest"}, "expected": 2}
    result = cache.judge(16, 16, bad, 1.0)
    assert passed(result) == [True, False, True] and "(1/2)" in result[1].name


# --- 02_distill -------------------------------------------------------------------------------------------------------

NANO_WORLD, REAL_WORLD = worlds.NanoWorld(None, None, None), worlds.RealWorld(None, None, None)  # beats reads rows only


def nano_rows(student_fd, student_alignment, teacher_fd=100.0, teacher_alignment=0.5):
    return {"teacher@1": {"fd_probe": teacher_fd, "alignment": teacher_alignment},
            "student@1": {"fd_probe": student_fd, "alignment": student_alignment},
            "student@4": {"fd_probe": 1e9, "alignment": 0.0}}   # other rows are not judged


def test_distill_judge_the_one_step_student_beats_the_one_step_teacher_strictly():
    assert (distill.JUDGED_ROW, distill.BASELINE_ROW) == ("student@1", "teacher@1")
    assert passed(distill.judge(nano_rows(99.9, 0.51), NANO_WORLD)) == [True, True]
    assert passed(distill.judge(nano_rows(100.0, 0.51), NANO_WORLD)) == [False, True]   # a tie is not a win
    assert passed(distill.judge(nano_rows(99.9, 0.5), NANO_WORLD)) == [True, False]
    assert passed(distill.judge(nano_rows(100.1, 0.49), NANO_WORLD)) == [False, False]
    names = [c.name for c in distill.judge(nano_rows(99.9, 0.51), NANO_WORLD)]
    assert names == ["student@1 fd_probe below teacher Euler@1 (99.90 vs 100.00)",
                     "student@1 alignment above teacher Euler@1 (0.510 vs 0.500)"]


def test_distill_judge_in_the_real_world_reads_fid_and_clip_score():
    rows = {"teacher@1": {"fid_vs_teacher": 40.0, "clip_score": 25.0},
            "student@1": {"fid_vs_teacher": 39.0, "clip_score": 25.5}}
    assert passed(distill.judge(rows, REAL_WORLD)) == [True, True]
    rows["student@1"] = {"fid_vs_teacher": 41.0, "clip_score": 25.0}
    assert passed(distill.judge(rows, REAL_WORLD)) == [False, False]


# --- 03_deturbo -------------------------------------------------------------------------------------------------------

def deturbo_rows(ours, floor=10.0, steps=20):
    return {f"teacher@{steps}": {"fd_probe_vs_teacher": floor}, f"student+deturbo@{steps}": {"fd_probe_vs_teacher": ours}}


LOWERED = {"student": 0.5, "student+A": 0.1, "student uncond": 0.6, "student+A uncond": 0.2}


def deturbo_judge(ours=10.0, floor=10.0, mean_error=LOWERED, digest=True, dropped=True, dv=0.0):
    return passed(deturbo.judge(deturbo_rows(ours, floor), "fd_probe_vs_teacher", 20, mean_error,
                                digest_unchanged=digest, dropped_bit_identical=dropped, file_max_abs_dv=dv))


def test_deturbo_judge_noise_floor_ratio_threshold():
    assert deturbo.NOISE_FLOOR_RATIO_MAX == 1.2
    assert deturbo_judge(ours=12.0) == [True, True, True, True]       # 1.2 x the floor itself passes
    assert deturbo_judge(ours=12.01) == [False, True, True, True]
    assert deturbo.noise_floor_ratio(deturbo_rows(12.0), "fd_probe_vs_teacher", 20) == (12.0, 10.0, pytest.approx(1.2))
    assert deturbo.noise_floor_ratio(deturbo_rows(1.0, floor=0.0), "fd_probe_vs_teacher", 20)[2] == float("inf")


def test_deturbo_judge_velocity_error_must_drop_for_both_branches():
    assert deturbo_judge(mean_error={**LOWERED, "student+A": 0.5})[1] is False             # equal is not lower
    assert deturbo_judge(mean_error={**LOWERED, "student+A uncond": 0.7})[1] is False       # the CFG branch too
    name = deturbo.judge(deturbo_rows(10.0), "fd_probe_vs_teacher", 20, LOWERED, True, True, 0.0)[1].name
    assert "0.500 -> 0.100" in name and "uncond 0.600 -> 0.200" in name


def test_deturbo_judge_dropping_a_is_bit_exact():
    assert deturbo_judge(digest=False)[2] is False
    assert deturbo_judge(dropped=False)[2] is False


def test_deturbo_judge_adapter_file_threshold():
    assert deturbo.ADAPTER_FILE_MAX_ABS_DV == 1e-4
    assert deturbo_judge(dv=0.99e-4)[3] is True
    assert deturbo_judge(dv=1e-4)[3] is False          # strictly below

"""The nano quality gate's checks (worlds.NanoWorld.verdict, thresholds in worlds.NANO_TARGETS) on synthetic rows: each
threshold is probed just inside and just outside with literal numbers, so a changed threshold or a broken check fails."""
import copy

import pytest

from anima_lib import checks, config, gate, worlds

PASSING = {
    "renderer": {"alignment": 0.95, "alignment_color": 1.0, "alignment_eyes": 1.0, "diversity": 10.0},
    "teacher@20": {"alignment": 0.9, "alignment_color": 0.95, "alignment_eyes": 0.95, "diversity": 5.0, "fd_probe": 5.0,
                   "fd_probe_vs_teacher": 5.0, "strict_alignment": 0.8, "strict_accuracy_eyes": 0.8},
    "teacher@1": {"alignment": 0.3, "fd_probe": 50.0, "fd_probe_vs_teacher": 50.0},
}
for _steps in (1, 4):
    for _row in ("student", "student_q4"):
        PASSING[f"{_row}@{_steps}"] = {"alignment": 0.9, "diversity": 5.0, "fd_probe_vs_teacher": 5.0,
                                       "strict_alignment": 0.8, "strict_accuracy_eyes": 0.8}
SPEED = {"student@1": 100.0, "teacher@20": 1.0}


@pytest.fixture(scope="module")
def world():
    params = config.load_config("smoke", ["gate.student_steps=[1,4]", "quant.bits=4"], check_paths=False)
    return worlds.NanoWorld(params, gate.gate_set(params), None)


def judge(world, rows, speed=SPEED):
    found, verdict, _ = world.verdict(rows, speed, "teacher@20")
    return {c.name.split(" (")[0]: c.passed for c in found}, verdict


def test_the_passing_rows_pass_every_check(world):
    found, verdict = judge(world, PASSING)
    assert all(found.values()) and len(found) == 20, found
    assert "FAILED" not in verdict


def test_the_thresholds_are_the_documented_ones():
    assert worlds.NANO_TARGETS == {
        "reference_alignment": 0.85, "attribute_alignment": 0.93, "diversity_vs_renderer": 0.25, "teacher1_fd_ratio": 1.5,
        "student1_alignment": 0.90, "student1_diversity": 0.7, "student1_fd_vs_teacher1": 0.5, "speedup_1": 25.0,
        "student4_alignment": 0.97, "quant_alignment_drop": 0.01, "quant_fd_ratio": 1.10, "strict_alignment": 0.97,
        "quant_strict_drop": 0.01}


# (rows changed together, metric, a value just inside, one just outside, the check that must flip)
BOUNDARIES = [
    (["teacher@20"], "alignment", 0.8501, 0.8499, "teacher@20 alignment ≥ 0.85"),
    (["teacher@20"], "alignment_color", 0.9301, 0.9299, "every attribute ≥ 0.93"),
    (["teacher@20"], "diversity", 2.501, 2.499, "diversity ≥ 0.25 × renderer"),
    (["teacher@1"], "fd_probe", 7.51, 7.5, "teacher@1 worse than teacher@20"),
    (["student@1", "student_q4@1"], "alignment", 0.8101, 0.8099, "student@1 alignment ≥ 0.9 × reference"),
    (["student@1", "student_q4@1"], "diversity", 3.501, 3.499, "student@1 diversity ≥ 0.7 × reference"),
    (["student@1", "student_q4@1"], "fd_probe_vs_teacher", 24.99, 25.01, "student@1 fd_probe_vs_teacher ≤ 0.5 × teacher@1's"),
    (["student@4", "student_q4@4"], "alignment", 0.8731, 0.8729, "student@4 alignment ≥ 0.97 × reference"),
    (["student_q4@1"], "alignment", 0.8901, 0.8899, "student_q4@1 alignment within 0.01 of full precision"),
    (["student_q4@1"], "fd_probe_vs_teacher", 5.499, 5.501, "student_q4@1 fd_probe_vs_teacher within 10% of full precision"),
    (["student@1", "student_q4@1"], "strict_alignment", 0.7761, 0.7759, "student@1 strict alignment ≥ 0.97 × reference"),
    (["student_q4@4"], "strict_alignment", 0.7901, 0.7899, "student_q4@4 strict alignment within 0.01 of full precision"),
    (["student_q4@1"], "strict_accuracy_eyes", 0.7901, 0.7899, "student_q4@1 eye count within 0.01 of full precision"),
    (["student@4", "student_q4@4"], "strict_alignment", 0.8, 0.7999, "student@4 ≥ student@1 on strict alignment"),
]


@pytest.mark.parametrize("changed, metric, inside, outside, name", BOUNDARIES, ids=[b[4] for b in BOUNDARIES])
def test_each_check_flips_at_its_threshold(world, changed, metric, inside, outside, name):
    for value, expected in ((inside, True), (outside, False)):
        rows = copy.deepcopy(PASSING)
        for row in changed:
            rows[row][metric] = value
        found, verdict = judge(world, rows)
        assert found[name] is expected, (value, found)
        assert [n for n, ok in found.items() if not ok] == ([] if expected else [name]), found  # only this one
        assert ("FAILED" in verdict) is (not expected)


def test_speedup_check_flips_at_25x(world):
    assert judge(world, PASSING, {"student@1": 25.0, "teacher@20": 1.0})[0]["student@1 ≥ 25× faster than teacher@20"]
    assert not judge(world, PASSING, {"student@1": 24.9, "teacher@20": 1.0})[0]["student@1 ≥ 25× faster than teacher@20"]


def test_finish_records_the_checks_and_marks_in_plain_text(tmp_path, world):
    params = config.load_config("smoke", [f"run.output_dir={tmp_path}"], check_paths=False)
    found, verdict, headline = world.verdict(PASSING, SPEED, "teacher@20")
    failing = [*found, checks.Check("a failing check", False)]
    from anima_lib import report
    shown = report.finish(params, "05_quality_gate", rows={"teacher@20": {"alignment": 0.9}}, checks=failing,
                          verdict=verdict, headline=headline)
    record = __import__("json").loads(report.metrics_file(params, "05_quality_gate").read_text())
    assert record["passed"] is False and record["checks"]["a failing check"] is False
    assert "**FAIL** a failing check" in shown.data and "**FAIL** —" in shown.data
    assert "✅" not in shown.data and "❌" not in shown.data

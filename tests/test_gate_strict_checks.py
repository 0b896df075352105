"""The nano gate's detail-strict checks (issue 20) on synthetic rows: a changed threshold or a broken check fails here."""
from anima_lib import config, gate, worlds

BASE = {"alignment": .9, "alignment_color": 1.0, "diversity": 10, "fd_probe": 5, "fd_probe_vs_teacher": 5,
        "strict_alignment": 0.8}


def _strict_checks(student1, student4, quantized1):
    params = config.load_config("smoke", check_paths=False)
    world = worlds.NanoWorld(params, gate.gate_set(params), None)
    rows = {"renderer": dict(BASE), "teacher@20": dict(BASE), "teacher@1": {**BASE, "fd_probe": 50, "alignment": .3},
            "student@1": {**BASE, "strict_alignment": student1}, "student@4": {**BASE, "strict_alignment": student4},
            "student_q4@1": {**BASE, "strict_alignment": quantized1}}
    checks, _, headline = world.verdict(rows, {"student@1": 100.0, "teacher@20": 1.0}, "teacher@20")
    assert headline["teacher@20.strict_alignment"] == 0.8
    return {c.name.split(" (")[0]: c.passed for c in checks if "strict" in c.name}


def test_strict_checks_pass_at_their_thresholds():
    checks = _strict_checks(student1=0.776, student4=0.776, quantized1=0.767)   # 0.97 x 0.8 = 0.776; 0.01 below
    assert all(checks.values()) and len(checks) == 4, checks


def test_strict_checks_fail_just_past_them():
    checks = _strict_checks(student1=0.775, student4=0.774, quantized1=0.764)
    assert not checks["student@1 strict alignment ≥ 0.97 × reference"]
    assert not checks["student@4 ≥ student@1 on strict alignment"]
    assert not checks["student_q4@1 strict alignment within 0.01 of full precision"]


def test_a_larger_detail_set_decides_the_strict_checks():
    params = config.load_config("smoke", ["gate.strict_prompts=16"], check_paths=False)
    world = worlds.NanoWorld(params, gate.gate_set(params), None)
    larger = world.detail_world()
    assert len(larger.gate.prompts) == 16 and larger.gate.prompts[:8] == world.gate.prompts
    rows = {"renderer": dict(BASE), "teacher@20": dict(BASE), "teacher@1": {**BASE, "fd_probe": 50, "alignment": .3},
            "student@1": {**BASE, "strict_alignment": 0.70}, "student@4": {**BASE, "strict_alignment": 0.60}}
    strict_rows = {"teacher@20": {"strict_alignment": 0.8, "n_images": 32},
                   "student@1": {"strict_alignment": 0.78, "n_images": 32},
                   "student@4": {"strict_alignment": 0.79, "n_images": 32}}
    checks, _, headline = world.verdict(rows, {"student@1": 100.0, "teacher@20": 1.0}, "teacher@20",
                                        strict_rows=strict_rows)
    strict = {c.name.split(" (")[0]: c.passed for c in checks if "strict" in c.name}
    assert strict == {"student@1 strict alignment ≥ 0.97 × reference on 32 images": True,
                      "student@4 strict alignment ≥ 0.97 × reference on 32 images": True,
                      "student@4 ≥ student@1 on strict alignment on 32 images": True}, strict
    assert headline["student@4.strict_alignment"] == 0.79


def test_no_larger_set_by_default_nor_when_the_gate_set_is_as_large():
    for overrides in ([], ["gate.strict_prompts=4"], ["gate.strict_prompts=8"]):   # smoke: gate.n_prompts = 8
        params = config.load_config("smoke", overrides, check_paths=False)
        assert worlds.NanoWorld(params, gate.gate_set(params), None).detail_world() is None

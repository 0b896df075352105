"""End to end, the README way: `anima run params/smoke.yaml` through the real notebooks (slow; `make smoke`)."""
import json
import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)


@pytest.mark.slow
def test_anima_run_smoke_preset(tmp_path):
    result = subprocess.run([f"{BIN}/anima", "run", "params/smoke.yaml", "--set", f"run.output_dir={tmp_path}/out",
                             "--set", f"run.report_dir={tmp_path}/rep"], capture_output=True, text=True, timeout=1800,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    day = next((tmp_path / "rep").iterdir())
    gathered = json.loads((day / "smoke" / "metrics.json").read_text())
    assert gathered["05_quality_gate"]["status"] == "pass"
    rows = gathered["05_quality_gate"]["rows"]
    assert set(rows) == {"teacher@1", "teacher@2", "teacher@8"} and rows["teacher@8"]["rmse_to_reference"] == 0
    page = (day / "smoke" / "05_quality_gate.html").read_text()
    assert page.count("data:image/png;base64,") >= 2   # same-seed grid and the steps plot
    assert (day / "index.html").is_file()

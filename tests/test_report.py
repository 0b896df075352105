"""The runner end to end on tiny notebooks: papermill, HTML export, statuses, skipping, exit codes."""
import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from anima_lib import report
from anima_lib.report import Step, run_pipeline

PARAMS_CELL = 'preset = "nano"\noverrides = []'
WORK = """
import matplotlib.pyplot as plt
from anima_lib import config, report
params = config.load_config(preset, overrides)
fig, ax = plt.subplots(); ax.plot([1, 2, 4], [3, 2, 1])
"""


def make_notebook(folder: Path, name: str, body: str):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params_cell = nbformat.v4.new_code_cell(PARAMS_CELL)
    params_cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), params_cell, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, folder / f"{name}.ipynb")


def metrics_code(name, passed=True):
    return (WORK + f"report.write_metrics(params, {name!r}, rows={{'teacher@4': {{'rmse_to_reference': 0.5}}}}, "
            f"verdict='checked', passed={passed}, headline={{'rmse@4': 0.5}})\n")


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"run:\n  name: t\n  output_dir: {tmp_path}/out\n  report_dir: {tmp_path}/rep\n")
    return path


def run(tmp_path, preset, steps, **kw):
    lines = []
    code = run_pipeline(str(preset), pipeline=steps, notebook_dir=tmp_path, log=lines.append, **kw)
    day = next((tmp_path / "rep").iterdir())
    summary = json.loads((day / "t" / "summary.json").read_text())
    return code, day, {n["name"]: n for n in summary["notebooks"]}, lines


def test_passing_pipeline_writes_self_contained_reports(tmp_path, preset):
    make_notebook(tmp_path, "00_a", metrics_code("00_a"))
    make_notebook(tmp_path, "01_b", metrics_code("01_b"))
    code, day, notebooks, lines = run(tmp_path, preset, (Step("00_a"), Step("01_b", needs=("00_a",))))
    assert code == 0
    assert [n["status"] for n in notebooks.values()] == ["pass", "pass"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", day.name)
    html_page = (day / "t" / "00_a.html").read_text()
    assert "data:image/png;base64," in html_page                  # the plot is embedded
    assert not re.search(r"<script[^>]+src=[\"']?https?:", html_page)  # no CDN scripts
    assert not re.search(r"<link[^>]+href=[\"']?https?:", html_page)
    assert 'preset = "nano"' not in html_page                      # parameter cells hidden
    index = (day / "index.html").read_text()
    assert "00_a.html" in index and "rmse@4" in index and "checked" in index and "git" in index
    gathered = json.loads((day / "t" / "metrics.json").read_text())
    assert gathered["01_b"]["rows"]["teacher@4"]["rmse_to_reference"] == 0.5
    assert any("report:" in line for line in lines)


def test_error_keeps_html_skips_dependents_and_exits_nonzero(tmp_path, preset):
    make_notebook(tmp_path, "00_a", WORK + "raise ValueError('the teacher exploded')\n")
    make_notebook(tmp_path, "01_b", metrics_code("01_b"))
    make_notebook(tmp_path, "02_c", metrics_code("02_c"))
    code, day, notebooks, _ = run(tmp_path, preset, (Step("00_a"), Step("01_b", needs=("00_a",)), Step("02_c")))
    assert code == 1
    assert notebooks["00_a"]["status"] == "error" and "the teacher exploded" in notebooks["00_a"]["verdict"]
    assert notebooks["01_b"]["status"] == "skipped" and "00_a (error)" in notebooks["01_b"]["verdict"]
    assert notebooks["02_c"]["status"] == "pass"                  # independent work still runs
    assert "the teacher exploded" in (day / "t" / "00_a.html").read_text()


def test_failed_check_is_fail_not_error_and_dependents_still_report(tmp_path, preset):
    make_notebook(tmp_path, "00_a", metrics_code("00_a", passed=False))
    make_notebook(tmp_path, "01_b", metrics_code("01_b"))
    code, _, notebooks, _ = run(tmp_path, preset, (Step("00_a"), Step("01_b", needs=("00_a",))))
    assert code == 1 and notebooks["00_a"]["status"] == "fail"
    assert notebooks["01_b"]["status"] == "pass"  # a fail leaves artifacts: what needs it runs (the run still fails)


def test_no_metrics_file_is_an_error(tmp_path, preset):
    make_notebook(tmp_path, "00_a", "x = 1\n")
    code, _, notebooks, _ = run(tmp_path, preset, (Step("00_a"),))
    assert code == 1 and notebooks["00_a"]["status"] == "error" and "no metrics file" in notebooks["00_a"]["verdict"]


def test_only_and_preset_scoping(tmp_path, preset):
    make_notebook(tmp_path, "00_a", metrics_code("00_a"))
    make_notebook(tmp_path, "01_b", metrics_code("01_b"))
    steps = (Step("00_a", presets=("anima-2b",)), Step("01_b", needs=("00_a",)))
    code, _, notebooks, _ = run(tmp_path, preset, steps)
    assert code == 0 and notebooks["00_a"]["status"] == "skipped" and notebooks["01_b"]["status"] == "pass"
    code, day, notebooks, _ = run(tmp_path, preset, steps, only=["01_b"])
    assert notebooks["01_b"]["status"] == "pass" and "earlier_invocation" not in notebooks["01_b"]
    # the notebook not re-run keeps its earlier result in the run's summary and metrics
    assert notebooks["00_a"]["status"] == "skipped" and notebooks["00_a"]["earlier_invocation"]
    assert set(json.loads((day / "t" / "metrics.json").read_text())) == {"00_a", "01_b"}


def test_unknown_only_is_a_parameter_error(tmp_path, preset):
    with pytest.raises(report.config_mod.ConfigError, match="unknown notebook"):
        run_pipeline(str(preset), only=["99_nope"], notebook_dir=tmp_path, log=lambda *_: None)


def test_non_finite_metric_fails(tmp_path, preset):
    from anima_lib import config
    params = config.load_config(preset)
    path = report.write_metrics(params, "05_x", rows={"teacher@1": {"rmse_to_reference": float("nan")}},
                                verdict="v", passed=True)
    record = json.loads(path.read_text())
    assert record["passed"] is False and "non-finite" in record["verdict"]


def test_shipped_notebooks_are_stripped_and_parameterized():
    for path in sorted(report.NOTEBOOK_DIR.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "python3", path
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one 'parameters' cell"
        assert "preset" in tagged[0].source and "overrides" in tagged[0].source
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit notebooks stripped"
        assert path.stem in {s.name for s in report.PIPELINE}


# --- pages for a reviewer: code folded, benign notices silenced in the kernel, plain-text marks -----------------------

NOTICES = """
import logging, os, warnings
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure ...")
modeling = logging.getLogger("diffusers.models.modeling_utils")
modeling.warning("There are modules in AnimaTextConditioner that should be kept in float32: []. Casting directly ...")
modeling.warning("There are modules in CosmosTransformer3DModel that should be kept in float32: ['learnable_pos_embed']."
                 " Casting directly with `to()` ...")
warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.", FutureWarning)
warnings.warn("a warning that matters", UserWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes notice")
print("progress bars off:", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))
"""


def test_pages_fold_code_and_the_kernel_drops_only_the_known_benign_notices(tmp_path, preset, monkeypatch):
    monkeypatch.delenv("PYTHONSTARTUP", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    make_notebook(tmp_path, "00_a", NOTICES + metrics_code("00_a"))
    code, day, notebooks, _ = run(tmp_path, preset, (Step("00_a"),))
    assert code == 0, notebooks
    page = (day / "t" / "00_a.html").read_text()
    shown = re.sub(r"<details class=\"anima-code\".*?</details>", "", page, flags=re.S)  # outputs, not code
    for benign in ("gemm_4bit_forward", "float32: []", "torch.jit.script"):
        assert benign not in shown, benign
    for kept in ("learnable_pos_embed", "a warning that matters", "another bitsandbytes notice",
                 "progress bars off: 1"):
        assert kept in shown, kept
    folded = re.findall(r"<details class=\"anima-code\"( open(=\"\")?)?><summary>code</summary>", page)
    assert len(folded) == 1 and folded[0][0] == ""           # the one visible code cell, folded
    assert "write_metrics" in page                           # its code is in the page, one click away
    assert not re.search(r"In&nbsp;\[|Out\[\d", page)         # no execution counters
    assert "PYTHONSTARTUP" not in os.environ                  # the runner's own environment is left as it was
    index = (day / "index.html").read_text()
    assert 'href="t/00_a.html"' in index


def test_with_code_writes_the_code_cells_open(tmp_path, preset):
    make_notebook(tmp_path, "00_a", metrics_code("00_a"))
    _, day, _, _ = run(tmp_path, preset, (Step("00_a"),), with_code=True)
    page = (day / "t" / "00_a.html").read_text()
    assert len(re.findall(r"<details class=\"anima-code\" open(=\"\")?>", page)) == 1


def test_cli_with_code_reaches_the_runner(monkeypatch):
    from anima_lib import cli
    seen = {}
    monkeypatch.setattr(report, "run_pipeline", lambda preset, overrides, only, **kw: seen.update(kw) or 0)
    assert cli.main(["run", "smoke", "--with-code"]) == 0 and seen == {"with_code": True}
    assert cli.main(["run", "smoke"]) == 0 and seen == {"with_code": False}


def test_quiet_filters_exactly_the_listed_notices(monkeypatch):
    import logging
    import warnings
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # restored afterwards (quiet sets it when absent)
    report.quiet()
    report.quiet()  # idempotent: one filter per notice
    for logger_name, _ in report.BENIGN_LOG_NOTICES:
        assert sum(isinstance(f, report.DropNotice) for f in logging.getLogger(logger_name).filters) == 1

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    modeling, bnb, seen = (logging.getLogger("diffusers.models.modeling_utils"),
                           logging.getLogger("bitsandbytes.backends.cpu.ops"), Collect())
    for logger in (modeling, bnb):
        monkeypatch.setattr(logger, "handlers", [seen])
    modeling.warning("There are modules in AnimaTextConditioner that should be kept in float32: []. Casting ...")
    modeling.warning("There are modules in CosmosTransformer3DModel that should be kept in float32: "
                     "['learnable_pos_embed']. Casting ...")
    bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    bnb.warning("another bitsandbytes notice")
    assert [m[:50] for m in seen.messages] == ["There are modules in CosmosTransformer3DModel that",
                                               "another bitsandbytes notice"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.quiet()  # after "always": its filters go first
        warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`.", FutureWarning)
        warnings.warn("`torch.jit.script` is deprecated, but as another category", UserWarning)
    assert [str(w.message)[:40] for w in caught] == ["`torch.jit.script` is deprecated, but as"]


def test_finish_records_the_checks_and_shows_plain_marks(tmp_path, preset):
    from anima_lib import checks, config
    params = config.load_config(preset)
    shown = report.finish(params, "01_x", rows={"q8_0": {"cosine": 0.5}}, verdict="v",
                          checks=[checks.Check("a held", True), checks.Check("b missed", False)])
    record = json.loads(report.metrics_file(params, "01_x").read_text())
    assert record["passed"] is False and record["checks"] == {"a held": True, "b missed": False}
    assert shown.data == "- **pass** a held\n- **FAIL** b missed\n\n**FAIL** — v"
    assert all(ord(ch) < 0x2000 for ch in shown.data.replace("—", ""))  # no emoji: renders in any font


def test_markdown_table_keeps_a_pipe_inside_a_cell():
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    table = report.markdown_table({"check": {"loaded == fused (max |Δv|)": 7e-6, "bit-identical": True}})
    rendered = markdown2html_mistune(table)
    assert "<table>" in rendered and "<th>loaded == fused (max |Δv|)</th>" in rendered   # one column, not split
    assert "<td>7e-06</td>" in rendered

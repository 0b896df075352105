"""Runner and CLI hardening (issue 18): the per-run lock, kernels importing this checkout, kernel-start retries,
the "incomplete" status, one-line CLI errors, `make lab` as root."""
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from anima_lib import cli, config, report
from anima_lib.report import Step, run_pipeline
from test_report import preset  # noqa: F401  (the fixture: a preset writing under tmp_path)
from test_report import run as run_in

REPO = Path(__file__).resolve().parents[1]
PARAMS_CELL = 'preset = "nano"\noverrides = []'
METRICS = """
from anima_lib import config, report
params = config.load_config(preset, overrides)
report.write_metrics(params, {name!r}, rows={{}}, verdict="checked", passed=True{extra})
"""


def make_notebook(folder: Path, name: str, body: str):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params_cell = nbformat.v4.new_code_cell(PARAMS_CELL)
    params_cell.metadata["tags"] = ["parameters"]
    nb.cells = [params_cell, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, folder / f"{name}.ipynb")


def metrics(name, extra=""):
    return METRICS.format(name=name, extra=extra)


def run(tmp_path, preset, steps, **kw):
    """test_report's runner call, plus the run's summary.json."""
    code, day, notebooks, lines = run_in(tmp_path, preset, steps, **kw)
    summary = json.loads((day / "t" / "summary.json").read_text())
    return code, day, summary, notebooks, lines


# --- "incomplete": a time budget paused training -----------------------------------------------------------------------

def test_incomplete_is_its_own_status_blocks_dependents_and_exits_3(tmp_path, preset):
    resume = "anima distill params/nano.yaml --method rcm"
    make_notebook(tmp_path, "00_a", metrics("00_a", f", incomplete=True, resume={resume!r}"))
    make_notebook(tmp_path, "01_b", metrics("01_b"))
    make_notebook(tmp_path, "02_c", metrics("02_c"))
    steps = (Step("00_a"), Step("01_b", needs=("00_a",)), Step("02_c"), Step("03_d", needs=("01_b",)))
    make_notebook(tmp_path, "03_d", metrics("03_d"))
    code, day, summary, notebooks, lines = run(tmp_path, preset, steps)
    assert code == 3 and summary["status"] == "incomplete"
    assert notebooks["00_a"]["status"] == "incomplete" and resume in notebooks["00_a"]["verdict"]
    assert notebooks["01_b"]["status"] == "skipped" and notebooks["01_b"]["verdict"] == "needs 00_a (incomplete)"
    assert notebooks["03_d"]["status"] == "skipped" and notebooks["02_c"]["status"] == "pass"
    index = (day / "index.html").read_text()
    assert "#bc4c00" in index and resume in index
    assert f"paused: 00_a — resume with: {resume}" in lines


PAUSING = """
from anima_lib import config, report
params = config.load_config(preset, overrides)
report.pause(params, "00_a", "rcm at 3/400 student steps", preset, overrides, training={{"rcm": 3}})
open({marker!r}, "w")   # never reached: a paused notebook scores nothing
"""


def test_pause_ends_the_notebook_as_incomplete_with_the_resume_command(tmp_path, preset):
    marker = tmp_path / "scored"
    make_notebook(tmp_path, "00_a", PAUSING.format(marker=str(marker)))
    make_notebook(tmp_path, "01_b", metrics("01_b"))
    code, day, summary, notebooks, lines = run(tmp_path, preset, (Step("00_a"), Step("01_b", needs=("00_a",))))
    assert code == 3 and not marker.exists()
    paused = notebooks["00_a"]
    assert paused["status"] == "incomplete", paused["verdict"]
    assert f"anima run {preset}" in paused["verdict"] and "rcm at 3/400 student steps" in paused["verdict"]
    assert notebooks["01_b"]["status"] == "skipped"
    assert "TrainingPaused" in (day / "t" / "00_a.ipynb").read_text()   # the page shows where and why it stopped


@pytest.mark.parametrize("body, expected", [
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does", "out of memory in cell 3"),
    ("raise MemoryError('host')", "out of memory in cell 3 (`raise MemoryError('host')`)"),
    ("raise ValueError('bad')", "in cell 3 (`raise ValueError('bad')`): ValueError: bad"),
])
def test_an_error_names_the_cell_and_memory_says_what_to_lower(tmp_path, preset, body, expected):
    make_notebook(tmp_path, "00_a", body)   # executed: parameters, papermill's injected parameters, then cell 3
    code, day, summary, notebooks, lines = run(tmp_path, preset, (Step("00_a"),))
    assert code == 1 and notebooks["00_a"]["status"] == "error"
    assert expected in notebooks["00_a"]["verdict"], notebooks["00_a"]["verdict"]
    if "out of memory" in expected:
        assert "batch" in notebooks["00_a"]["verdict"]


def test_resume_command_quotes_what_a_shell_would_split():
    assert report.resume_command("params/nano.yaml", ["run.tag=a b", "gate.n_prompts=4"]) == \
        "anima run params/nano.yaml --set 'run.tag=a b' --set gate.n_prompts=4"


def test_incomplete_needs_a_resume_command(tmp_path, preset):
    params = config.load_config(preset)
    with pytest.raises(ValueError, match="needs resume="):
        report.write_metrics(params, "02_x", rows={}, verdict="v", passed=True, incomplete=True)
    record = json.loads(report.write_metrics(params, "02_x", rows={}, verdict="v", passed=True, incomplete=True,
                                             resume="anima run nano").read_text())
    assert record["incomplete"] is True and record["resume"] == "anima run nano"


# --- one run of a run name at a time ---------------------------------------------------------------------------------

HOLDER = """
import sys, time
from anima_lib import config, report
with report.run_lock(config.load_config(sys.argv[1]), "anima run elsewhere"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_run_of_a_name_stops_before_compute_and_a_dead_holder_does_not_block(tmp_path, preset, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(preset)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        marker = tmp_path / "ran"
        make_notebook(tmp_path, "00_a", f"open({str(marker)!r}, 'w')\n" + metrics("00_a"))
        with pytest.raises(report.RunLockedError,
                           match=rf"in use by pid {holder.pid} on {platform.node()} since .*anima run elsewhere"):
            run_pipeline(str(preset), pipeline=(Step("00_a"),), notebook_dir=tmp_path, log=lambda *_: None)
        assert not marker.exists() and not (tmp_path / "rep").exists()    # nothing ran, nothing reported
        assert cli.main(["run", str(preset)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("anima: run 't' is in use by pid") and err.count("\n") == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert "anima run elsewhere" in (tmp_path / "out" / "t" / "run.lock").read_text()  # the file stays: flock decides
    assert run_pipeline(str(preset), pipeline=(Step("99_absent"),), notebook_dir=tmp_path, log=lambda *_: None) == 0


# --- kernels import this checkout; kernel start gets time and one retry ------------------------------------------------

def test_kernel_imports_the_checkout_that_runs_it(tmp_path, preset, monkeypatch):
    decoy = tmp_path / "decoy" / "anima_lib"        # another checkout's anima_lib, found first on the path
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(decoy.parent))
    where = tmp_path / "where.txt"
    make_notebook(tmp_path, "00_a", f"import anima_lib, pathlib\npathlib.Path({str(where)!r})"
                                    f".write_text(anima_lib.__file__)\n" + metrics("00_a"))
    code, _, _, notebooks, _ = run(tmp_path, preset, (Step("00_a"),))
    assert Path(where.read_text()).resolve().is_relative_to(config.REPO_ROOT)
    assert code == 0 and notebooks["00_a"]["status"] == "pass"
    assert os.environ["PYTHONPATH"] == str(decoy.parent)    # the runner's own environment is left as it was


def kernel_killer(tmp_path, monkeypatch, times: int) -> Path:
    """A sitecustomize that kills the kernel process at start-up, the first `times` starts."""
    site, deaths = tmp_path / "site", tmp_path / "deaths"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if any(a.endswith('.json') for a in sys.argv):  # a kernel: python -m ipykernel_launcher -f <conn>.json\n"
        f"    deaths = {str(deaths)!r}\n"
        f"    if not os.path.exists(deaths) or len(open(deaths).read()) < {times}:\n"
        "        open(deaths, 'a').write('x')\n"
        "        os._exit(1)\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    return deaths


def test_kernel_start_failure_is_retried_once(tmp_path, preset, monkeypatch):
    deaths = kernel_killer(tmp_path, monkeypatch, times=1)
    make_notebook(tmp_path, "00_a", metrics("00_a"))
    code, _, _, notebooks, lines = run(tmp_path, preset, (Step("00_a"),))
    assert deaths.read_text() == "x" and any("retrying once" in line for line in lines)
    assert code == 0 and notebooks["00_a"]["status"] == "pass"


def test_kernel_start_failing_twice_says_so(tmp_path, preset, monkeypatch):
    deaths = kernel_killer(tmp_path, monkeypatch, times=99)
    make_notebook(tmp_path, "00_a", metrics("00_a"))
    code, _, _, notebooks, _ = run(tmp_path, preset, (Step("00_a"),))
    assert deaths.read_text() == "xx" and code == 1 and notebooks["00_a"]["status"] == "error"
    assert notebooks["00_a"]["verdict"].startswith("kernel start failed twice: RuntimeError: Kernel died")


def test_a_notebook_error_is_not_retried(tmp_path, preset):
    runs = tmp_path / "runs"
    make_notebook(tmp_path, "00_a", f"open({str(runs)!r}, 'a').write('x')\nraise ValueError('boom')\n")
    code, _, _, notebooks, lines = run(tmp_path, preset, (Step("00_a"),))
    assert runs.read_text() == "x" and not any("retrying" in line for line in lines)
    assert code == 1 and notebooks["00_a"]["verdict"].endswith("): ValueError: boom")   # after the cell it ran in


def test_kernel_start_timeout_is_configurable(monkeypatch, preset, capsys):
    monkeypatch.delenv(report.KERNEL_START_TIMEOUT_ENV, raising=False)
    assert report.kernel_start_timeout() == 300                      # papermill's 60 s is short on a loaded machine
    monkeypatch.setenv(report.KERNEL_START_TIMEOUT_ENV, "45")
    assert report.kernel_start_timeout() == 45
    monkeypatch.setenv(report.KERNEL_START_TIMEOUT_ENV, "soon")
    assert cli.main(["run", str(preset)]) == 2
    assert "ANIMA_KERNEL_START_TIMEOUT='soon'" in capsys.readouterr().err


# --- the CLI: user errors in one line ----------------------------------------------------------------------------------

def test_cache_verify_without_a_manifest_is_one_line(tmp_path, capsys):
    assert cli.main(["cache", "verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"anima: {tmp_path}: no manifest.json; build the cache with notebook 01_cache\n"
    (tmp_path / "manifest.json").write_text("{not json")
    assert cli.main(["cache", "verify", str(tmp_path)]) == 1
    assert "unreadable manifest" in capsys.readouterr().err


def test_a_bug_still_shows_its_traceback(monkeypatch):
    monkeypatch.setattr(cli, "_cache", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["cache", "verify", "x"])


# --- make lab -------------------------------------------------------------------------------------------------------

def test_make_lab_allows_root_and_stays_on_localhost():
    def lab(uid):
        # a clean environment: under `make test` the inherited MAKEFLAGS add "Entering/Leaving directory" lines
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
        lines = subprocess.run(["make", "--no-print-directory", "-n", "lab", f"LAB_UID={uid}"], cwd=REPO, env=env,
                               capture_output=True, text=True, check=True).stdout.strip().splitlines()
        return next(line for line in reversed(lines) if "jupyter" in line)
    assert "--allow-root" in lab(0) and "--allow-root" not in lab(1000)
    assert "--ip=127.0.0.1" in lab(0) and "token" not in lab(0)       # jupyter's default token stays on

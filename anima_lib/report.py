"""Runner and reports: papermill executes the notebooks in order into reports/<date>/<run>/, each also as a
self-contained HTML page; the day's index.html lists every notebook with status, wall time, headline metrics,
verdict and provenance.

Contract with the notebooks: each calls `write_metrics(params, "<NN_name>", rows=..., verdict=..., passed=...)`,
which writes outputs/<run>/metrics/<NN_name>.json. Status is then
    pass        the notebook ran and its checks passed
    fail        the notebook ran and a check failed (passed=False)
    incomplete  a time budget paused training after a checkpoint (write_metrics(..., incomplete=True, resume="<cmd>"));
                neither pass nor fail: the verdict carries the command that resumes it
    error       an exception, a dead kernel, a kernel that failed to start twice, or no metrics file written
    skipped     a notebook it needs errored, was skipped or is incomplete (or it does not apply to the preset); after
                a "fail" the artifacts exist, so dependents run and report
Exit code of a run: 0 all passed; 1 a notebook failed or errored (or the run is locked by another); 2 a parameter
error (nothing ran); 3 paused: nothing failed but a notebook is incomplete — run its resume command, then run again.
The gathered reports/<date>/<run>/metrics.json is {notebook: {status, wall_s, rows, verdict, ...}}; rows are named
"<model>@<steps>" (teacher@20, student@1, student_q4@4, ...) -> {metric: value}.

One run of a run name at a time: the runner holds an flock on outputs/<run>/run.lock (pid, host, start, command).
Kernels import the anima_lib of the checkout that runs them (PYTHONPATH), not whichever one a shared venv installed;
they get ANIMA_KERNEL_START_TIMEOUT seconds (default 300) to start, and one retry when they do not. Each kernel runs
kernel_startup.py first (PYTHONSTARTUP), which calls `quiet()`: the known-benign library notices listed below never
reach the page; every other warning and error stays visible.

Pages are for a reviewer: prose, tables, plots, grids and the verdict, every code cell folded under a "code" line
that one click opens (`anima run --with-code` writes them open); parameter cells are left out.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import html
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import checks as checks_mod
from . import config as config_mod
from .io import atomic_write_json, atomic_write_text

NOTEBOOK_DIR = config_mod.REPO_ROOT / "notebooks"
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
KERNEL_START_TIMEOUT_ENV = "ANIMA_KERNEL_START_TIMEOUT"
KERNEL_STARTUP = Path(__file__).resolve().parent / "kernel_startup.py"  # what every kernel of a run executes first
EXIT_CODES = {"pass": 0, "fail": 1, "incomplete": 3}


class RunLockedError(RuntimeError):
    """Another `anima run` of the same run name holds the lock; the message names it (pid, host, since, command)."""


@dataclass(frozen=True)
class Step:
    name: str
    needs: tuple[str, ...] = ()
    presets: Optional[tuple[str, ...]] = None  # model presets it applies to (None = all)


# The pipeline, in order. Notebooks not yet in notebooks/ are left out of a run (and said so).
PIPELINE = (
    Step("00_nano_teacher", presets=("nano",)),
    Step("01_cache", needs=("00_nano_teacher",)),
    Step("02_distill", needs=("01_cache",)),
    Step("03_deturbo", needs=("02_distill",)),
    Step("04_quantize", needs=("02_distill",)),
    Step("05_quality_gate", needs=("00_nano_teacher", "02_distill")),
    Step("06_lora_survival", needs=("03_deturbo",)),
    Step("07_lora_transfer", needs=("06_lora_survival",)),
)


# --- what notebooks call ---------------------------------------------------------------------------------------------

def metrics_file(params, notebook: str) -> Path:
    suffix = f"-{params.run.tag}" if params.run.tag else ""  # an ad hoc run never overwrites the main run's record
    return params.output_path() / "metrics" / f"{notebook}{suffix}.json"


def write_metrics(params, notebook: str, rows: dict, verdict: str, passed: bool, headline: Optional[dict] = None,
                  incomplete: bool = False, resume: Optional[str] = None, **extra) -> Path:
    """Write outputs/<run>/metrics/<notebook>.json; values must be finite numbers (NaN is a failure, not a value).
    incomplete=True: a time budget paused training after a checkpoint; `resume` is the command that continues it."""
    if incomplete and not resume:
        raise ValueError(f"write_metrics({notebook!r}, incomplete=True) needs resume=<the command that continues it>")
    for row, metrics in rows.items():
        for name, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                passed = False
                verdict = f"{verdict} [non-finite {name} in {row}]"
    record = {"notebook": notebook, "passed": bool(passed), "verdict": verdict, "headline": headline or {},
              "rows": rows, "incomplete": bool(incomplete), "resume": resume, **extra}
    return atomic_write_json(metrics_file(params, notebook), record)


def finish(params, notebook: str, rows: dict, checks, verdict: str, headline: Optional[dict] = None, **extra):
    """The last cell of a notebook: write the metrics (passed = every check passed) and return the verdict as Markdown
    for display. `checks` is a list of `checks.Check` (a stage's judge(...) makes them)."""
    from IPython.display import Markdown  # the notebooks' display layer; the library works without IPython

    non_finite = [f"{name} in {row}" for row, metrics in rows.items() for name, value in metrics.items()
                  if isinstance(value, float) and not math.isfinite(value)]
    if non_finite:  # NaN is a failure, not a value: shown as a check so the page and the file agree
        checks = [*checks, checks_mod.Check(f"every metric is finite (not: {', '.join(non_finite)})", False)]
    write_metrics(params, notebook, rows=rows, verdict=verdict, passed=checks_mod.all_passed(checks),
                  headline=headline, checks=checks_mod.as_record(checks), **extra)
    return Markdown(checks_mod.markdown(checks, verdict))


class TrainingPaused(RuntimeError):
    """Raised by `pause` to end a notebook early: a time budget paused training after a checkpoint."""


def resume_command(preset, overrides) -> str:
    """The command that continues a paused run: the same `anima run` again (every trainer resumes its checkpoint)."""
    return " ".join(["anima run", shlex.quote(str(preset)), *(f"--set {shlex.quote(o)}" for o in overrides)])


def pause(params, notebook: str, what: str, preset, overrides, **extra):
    """End the notebook here as *incomplete*: record what paused and the resume command, then raise TrainingPaused
    (so no cell scores a half-trained model; the runner reads the record, not the exception, for the status)."""
    resume = resume_command(preset, list(overrides))
    write_metrics(params, notebook, rows={}, verdict=f"paused: {what}", passed=False, incomplete=True, resume=resume,
                  **extra)
    raise TrainingPaused(f"{what}; the checkpoint is kept — resume with: {resume}")


# --- what every kernel of a run does first: known-benign library notices off ---------------------------------------

# (logger, start of the message): notices that say nothing about the run; any other record of these loggers still shows
BENIGN_LOG_NOTICES = (
    # bitsandbytes (imported by peft) looks for an optional hub kernel for 4-bit CPU matmuls, which nothing here runs
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    # diffusers warns at every .to(dtype) even when the model keeps no module in float32 (the list is empty); a
    # non-empty list is a true warning and stays visible
    ("diffusers.models.modeling_utils", r"There are modules in \w+ that should be kept in float32: \[\]\."),
)
# (category, start of the message) of Python warnings that say nothing about the run
BENIGN_WARNINGS = (
    # torch.func.jvp scripts a helper inside torch; torch's own jvp documentation hides this warning the same way
    (FutureWarning, r"`torch\.jit\.script` is deprecated"),
)
# progress bars of huggingface_hub, transformers ("Loading weights") and diffusers: stderr noise in a page
PROGRESS_BARS_OFF_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class DropNotice(logging.Filter):
    """Drops the records of its logger whose message starts with `pattern` (a regular expression)."""
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet() -> None:
    """Silence the known-benign library notices above (idempotent). Runs first in every kernel `anima run` starts
    (kernel_startup.py); call it at the top of a notebook opened by hand for the same quiet output."""
    for logger_name, pattern in BENIGN_LOG_NOTICES:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, DropNotice) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropNotice(pattern))
    for category, pattern in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    name, value = PROGRESS_BARS_OFF_ENV
    os.environ.setdefault(name, value)  # read when huggingface_hub is imported; a user's explicit setting wins
    if os.environ[name] == value and "huggingface_hub" in sys.modules:  # imported already: switch off directly
        for module, off in (("huggingface_hub.utils", "disable_progress_bars"),
                            ("transformers.utils.logging", "disable_progress_bar"),
                            ("diffusers.utils.logging", "disable_progress_bar")):
            if module in sys.modules:
                getattr(sys.modules[module], off)()


# --- HTML -------------------------------------------------------------------------------------------------------------

def export_html(ipynb_path: Path, html_path: Path, with_code: bool = False) -> Path:
    """A self-contained page: images embedded as data URIs, no remote scripts, parameter cells left out, each code
    cell folded under a "code" line that one click opens (`with_code`: written open)."""
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_input_tags = {"remove-input", "parameters", "injected-parameters"}
    c.TagRemovePreprocessor.remove_cell_tags = {"remove-cell"}
    c.HTMLExporter.preprocessors = ["nbconvert.preprocessors.TagRemovePreprocessor"]
    c.HTMLExporter.exclude_input_prompt = True   # "In [7]:" / "Out[7]:" mean nothing to a reader of the page
    c.HTMLExporter.exclude_output_prompt = True
    exporter = HTMLExporter(config=c, template_name="offline", extra_template_basedirs=[str(TEMPLATE_DIR)],
                            embed_images=True)
    body, _ = exporter.from_notebook_node(nbformat.read(ipynb_path, as_version=4),
                                          resources={"metadata": {"path": str(ipynb_path.parent)},
                                                     "anima_code_open": bool(with_code)})
    return atomic_write_text(html_path, body)


def provenance(params, total_s: Optional[float] = None) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=config_mod.REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    from importlib import metadata
    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "peft", "safetensors", "papermill", "nbconvert", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    gpu = "none"
    try:
        import torch
        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # provenance must never break a report
        pass
    return {
        "git_sha": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "params_source": params.source,
        "params": params.to_dict(),
        "versions": versions,
        "python": platform.python_version(),
        "cpu": f"{platform.machine()} {platform.processor() or ''} x{os.cpu_count()}".strip(),
        "gpu": gpu,
        "host": platform.node(),
        "total_s": total_s,
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
    }


_STATUS_COLOUR = {"pass": "#1a7f37", "fail": "#cf222e", "error": "#8250df", "skipped": "#6e7781",
                  "incomplete": "#bc4c00"}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return html.escape(str(value))


def render_day_index(day_dir: Path) -> Path:
    """reports/<date>/index.html: every run of the day, each with its notebooks and provenance."""
    runs = sorted((p for p in day_dir.iterdir() if (p / "summary.json").is_file()),
                  key=lambda p: json.loads((p / "summary.json").read_text())["provenance"]["finished"], reverse=True)
    sections = []
    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = []
        for nb in summary["notebooks"]:
            link = (f'<a href="{run_dir.name}/{nb["name"]}.html">{nb["name"]}</a>' if nb.get("html")
                    else html.escape(nb["name"]))
            colour = _STATUS_COLOUR[nb["status"]]
            headline = "<br>".join(f"{html.escape(k)} = {_fmt(v)}" for k, v in (nb.get("headline") or {}).items())
            wall = f'{nb["wall_s"]:.1f} s' if nb.get("wall_s") is not None else ""
            rows.append(f'<tr><td>{link}</td><td><span class="badge" style="background:{colour}">{nb["status"]}'
                        f'</span></td><td>{wall}</td><td>{headline}</td><td>{html.escape(nb.get("verdict") or "")}'
                        f'</td></tr>')
        prov = summary["provenance"]
        overall = summary["status"]
        sections.append(f"""
<section>
<h2>run <code>{html.escape(run_dir.name)}</code> <span class="badge" style="background:{_STATUS_COLOUR[overall]}">{overall}</span></h2>
<table><thead><tr><th>notebook</th><th>status</th><th>wall time</th><th>headline metrics</th><th>verdict</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<details><summary>provenance: git {html.escape(prov['git_sha'][:10])}{' (dirty)' if prov['git_dirty'] else ''},
{html.escape(prov['cpu'])}, GPU {html.escape(prov['gpu'])}, total {_fmt(prov['total_s'])} s, finished {html.escape(prov['finished'])}</summary>
<pre>{html.escape(json.dumps(prov, indent=2))}</pre></details>
<p><a href="{run_dir.name}/metrics.json">metrics.json</a></p>
</section>""")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>anima-distill reports {day_dir.name}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #d0d7de; padding: .4em .7em; text-align: left; vertical-align: top; }}
th {{ background: #f6f8fa; }}
td:nth-child(3) {{ white-space: nowrap; }}
.badge {{ color: white; border-radius: 1em; padding: .1em .7em; font-size: .9em; }}
pre {{ background: #f6f8fa; padding: 1em; overflow-x: auto; }}
</style></head>
<body><h1>anima-distill — reports of {day_dir.name}</h1>
{''.join(sections) or '<p>No runs yet.</p>'}
</body></html>
"""
    return atomic_write_text(day_dir / "index.html", page)


# --- the runner -------------------------------------------------------------------------------------------------------

def kernel_start_timeout() -> int:
    """Seconds a kernel gets to start: papermill's 60 is too short on a loaded machine."""
    raw = os.environ.get(KERNEL_START_TIMEOUT_ENV, "300")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise config_mod.ConfigError(f"{KERNEL_START_TIMEOUT_ENV}={raw!r}: must be a whole number of seconds >= 1")
    return int(raw)


@contextlib.contextmanager
def run_lock(params, command: str):
    """Hold outputs/<run>/run.lock exclusively (flock: the kernel drops it when the holder dies, so never stale)."""
    path = params.output_path() / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # never unlinked: two runs could then lock two different files
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):  # the holder is between its flock and its write
                holder = {}
            raise RunLockedError(
                f"run {params.run.name!r} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"since {holder.get('since', '?')} ({holder.get('command', '?')}); wait for it to end or choose "
                f"another run.name (lock: {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": platform.node(), "command": command,
                                 "since": _dt.datetime.now().isoformat(timespec="seconds")}).encode())
        yield path
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _kernel_environment():
    """Kernels inherit our environment: this checkout first on PYTHONPATH beats a shared editable venv's install, and
    PYTHONSTARTUP runs kernel_startup.py (`quiet()`) before the first cell."""
    before = {name: os.environ.get(name) for name in ("PYTHONPATH", "PYTHONSTARTUP")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(config_mod.REPO_ROOT), before["PYTHONPATH"]]))
    os.environ["PYTHONSTARTUP"] = str(KERNEL_STARTUP)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _papermill(step: Step, preset_path: Path, overrides: list[str], out_ipynb: Path, notebook_dir: Path,
               start_timeout: int) -> Optional[str]:
    """Execute one notebook; None, or what went wrong."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError
    try:
        with _kernel_environment():
            pm.execute_notebook(str(notebook_dir / f"{step.name}.ipynb"), str(out_ipynb),
                                parameters={"preset": str(preset_path), "overrides": list(overrides)},
                                kernel_name="python3", cwd=str(notebook_dir), progress_bar=True,
                                request_save_on_cell_execute=True, start_timeout=start_timeout)
    except PapermillExecutionError as exc:
        return f"{exc.ename}: {exc.evalue}"
    except Exception as exc:  # DeadKernelError, timeouts, a broken kernel: still report it
        return f"{type(exc).__name__}: {exc}"
    return None


def _kernel_never_started(out_ipynb: Path) -> bool:
    """papermill stamps a cell's start_time when the kernel takes it: none stamped = the kernel never started."""
    import nbformat
    try:
        cells = nbformat.read(out_ipynb, as_version=4).cells
    except Exception:  # no notebook written: papermill stopped before any kernel
        return False
    return not any(c.metadata.get("papermill", {}).get("start_time") for c in cells if c.cell_type == "code")


OUT_OF_MEMORY = ("OutOfMemoryError", "DeadKernelError", "can't allocate memory", "MemoryError")


def _stage_of_failure(out_ipynb: Path, error: str) -> str:
    """`error`, with the cell that was running when it happened (its number and first line) and, when memory ran
    out or the kernel died (the host's OOM killer leaves no Python error), what to lower."""
    import nbformat
    try:
        cells = [c for c in nbformat.read(out_ipynb, as_version=4).cells if c.cell_type == "code"]
    except Exception:
        return error
    started = [i for i, c in enumerate(cells) if c.metadata.get("papermill", {}).get("start_time")]
    if not started:
        return error
    index = started[-1]
    first_line = next((line for line in cells[index].source.splitlines() if line.strip()), "")[:80]
    where = f"in cell {index + 1} (`{first_line}`)"
    if any(marker in error for marker in OUT_OF_MEMORY):
        return (f"out of memory {where} — {error.splitlines()[0][:160]}; lower the batch sizes of that stage "
                f"(gate.decode_batch_size, distill.batch_size per rank, ...) or turn on distill.activation_checkpointing")
    return f"{where}: {error}"


def _execute(step: Step, preset_path: Path, overrides: list[str], run_dir: Path, params, notebook_dir: Path,
             start_timeout: int = 300, log=print, with_code: bool = False) -> dict:
    out_ipynb = run_dir / f"{step.name}.ipynb"
    metrics_path = metrics_file(params, step.name)
    metrics_path.unlink(missing_ok=True)  # a stale file must never pass for this run's result
    out_ipynb.unlink(missing_ok=True)     # an earlier run's executed cells must not hide a kernel that never started
    started = time.perf_counter()
    error = _papermill(step, preset_path, overrides, out_ipynb, notebook_dir, start_timeout)
    if error is not None and _kernel_never_started(out_ipynb):  # only a kernel start is retried, never a cell
        log(f"{step.name}: the kernel did not start ({error}); retrying once")
        error = _papermill(step, preset_path, overrides, out_ipynb, notebook_dir, start_timeout)
        if error is not None and _kernel_never_started(out_ipynb):
            error = (f"kernel start failed twice: {error} (start timeout {start_timeout} s; raise "
                     f"{KERNEL_START_TIMEOUT_ENV} on a loaded machine)")
    wall_s = time.perf_counter() - started
    result = {"name": step.name, "wall_s": wall_s, "html": False}
    if out_ipynb.exists():
        try:
            export_html(out_ipynb, run_dir / f"{step.name}.html", with_code=with_code)
            result["html"] = True
        except Exception as exc:
            error = error or f"HTML export failed: {exc}"
    if error is not None and error.startswith(f"{TrainingPaused.__name__}:") and metrics_path.is_file():
        error = None  # `pause` ended the notebook on purpose; its record says incomplete and how to resume
    if error is None and not metrics_path.is_file():
        error = f"the notebook wrote no metrics file ({metrics_path})"
    elif error is not None and not error.startswith("kernel start failed"):
        error = _stage_of_failure(out_ipynb, error)
    if error is not None:
        result.update(status="error", verdict=error.splitlines()[0][:300])
        return result
    record = json.loads(metrics_path.read_text())
    result.update(status="pass" if record["passed"] else "fail", verdict=record["verdict"],
                  headline=record.get("headline", {}), rows=record.get("rows", {}))
    if record.get("incomplete"):  # paused by a time budget: neither pass nor fail
        result.update(status="incomplete", paused=True, resume=record["resume"],
                      verdict=f"paused, resume with: {record['resume']} — {record['verdict']}")
    return result


def run_pipeline(preset: str, overrides: Optional[list[str]] = None, only: Optional[list[str]] = None,
                 log=print, pipeline: tuple[Step, ...] = PIPELINE, notebook_dir: Path = NOTEBOOK_DIR,
                 with_code: bool = False) -> int:
    """Validate, lock the run, run every notebook (or `only` those), write the reports (`with_code`: code cells
    written open); returns the exit code (module docstring). Raises ConfigError on a parameter error and
    RunLockedError when the run is in use."""
    overrides = list(overrides or [])
    preset_path = config_mod.resolve_preset(preset)
    params = config_mod.load_config(preset_path, overrides)  # every parameter error surfaces here, before compute
    start_timeout = kernel_start_timeout()
    known = [s.name for s in pipeline]
    for name in only or []:
        if name not in known:
            raise config_mod.ConfigError(f"--only {name}: unknown notebook; notebooks: {known}")
    command = shlex.join(["anima", "run", str(preset)] + [f"--only={n}" for n in only or []]
                         + [f"--set={o}" for o in overrides])
    with run_lock(params, command):  # before any compute: a second run of this name stops here
        return _run_locked(params, preset_path, overrides, only, log, pipeline, notebook_dir, start_timeout,
                           with_code)


def _run_locked(params, preset_path: Path, overrides: list[str], only: Optional[list[str]], log,
                pipeline: tuple[Step, ...], notebook_dir: Path, start_timeout: int, with_code: bool = False) -> int:
    present = [s for s in pipeline if (notebook_dir / f"{s.name}.ipynb").is_file()]
    absent = [s.name for s in pipeline if s not in present]
    day_dir = params.report_root() / _dt.date.today().isoformat()
    run_dir = day_dir / params.report_name()
    run_dir.mkdir(parents=True, exist_ok=True)
    if absent:
        log(f"not in this checkout yet: {', '.join(absent)}")
    selected = [s for s in present if not only or s.name in only]
    status: dict[str, str] = {}
    paused: set[str] = set()  # incomplete, or skipped only because of something incomplete
    results = []
    started = time.perf_counter()
    for index, step in enumerate(selected, 1):
        # a "fail" left its artifacts (checks missed), so what needs it still runs; error, skip, incomplete block
        blocked = [n for n in step.needs if n in status and status[n] in ("error", "skipped", "incomplete")]
        if step.presets is not None and params.model.preset not in step.presets:
            result = {"name": step.name, "status": "skipped", "wall_s": None, "applies": False,
                      "verdict": f"does not apply to model.preset={params.model.preset}"}
            status[step.name] = "pass"  # not applicable is not a failure for what follows
        elif blocked:
            result = {"name": step.name, "status": "skipped", "wall_s": None,
                      "verdict": "needs " + ", ".join(f"{n} ({status[n]})" for n in blocked)}
            if all(n in paused for n in blocked):  # waits on a resume, not on a failure
                result["paused"] = True
        else:
            log(f"[{index}/{len(selected)}] {step.name}: running")
            result = _execute(step, preset_path, overrides, run_dir, params, notebook_dir, start_timeout, log,
                              with_code)
        if step.name not in status:
            status[step.name] = result["status"]
        if result.get("paused"):
            paused.add(step.name)
        log(f"[{index}/{len(selected)}] {step.name}: {result['status']}"
            + (f" in {result['wall_s']:.1f} s" if result.get("wall_s") else "") + f" — {result.get('verdict', '')}")
        results.append(result)
    total_s = time.perf_counter() - started
    if only and (run_dir / "summary.json").is_file():  # --only re-runs some notebooks: keep the others' last results
        earlier = {r["name"]: r for r in json.loads((run_dir / "summary.json").read_text()).get("notebooks", [])}
        now = {r["name"]: r for r in results}
        results = [now.get(s.name) or {**earlier[s.name], "earlier_invocation": True}
                   for s in pipeline if s.name in now or s.name in earlier]
    not_passed = [r for r in results if r["status"] != "pass" and r.get("applies") is not False]
    overall = "pass" if not not_passed else "incomplete" if all(r.get("paused") for r in not_passed) else "fail"
    gathered = {r["name"]: {k: r.get(k) for k in ("status", "wall_s", "rows", "verdict", "headline")} for r in results}
    atomic_write_json(run_dir / "metrics.json", gathered)
    atomic_write_json(run_dir / "summary.json", {"status": overall, "notebooks": results,
                                                 "provenance": provenance(params, total_s)})
    index = render_day_index(day_dir)
    log(f"report: {index}")
    for r in results:
        if r["status"] == "incomplete":
            log(f"paused: {r['name']} — resume with: {r['resume']}")
    return EXIT_CODES[overall]


def markdown_table(rows: dict[str, dict]) -> str:
    """{row: {column: value}} as a Markdown table (how notebooks show metrics without extra dependencies)."""
    def cell(text) -> str:  # a "|" inside a cell (e.g. "max |Δv|") would end it and break the whole table
        return str(text).replace("|", "\\|")

    columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    lines = ["| | " + " | ".join(cell(c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, values in rows.items():
        lines.append(f"| {cell(row)} | " + " | ".join(cell(_fmt(values.get(c, ""))) for c in columns) + " |")
    return "\n".join(lines)

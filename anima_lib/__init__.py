"""anima_lib: the thin library the notebooks call (config, models, flow, sampler, gate, report, ...)."""
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub: every load is from a local path
# tqdm.auto in a kernel without ipywidgets falls back to text bars; the warning about it is noise in reports.
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"

"""Executed first by every kernel `anima run` starts (PYTHONSTARTUP, set by anima_lib.report): the known-benign library
notices of `report.quiet()` are switched off before any cell imports those libraries. Runs in the kernel's user
namespace, so it leaves no names behind."""
from anima_lib.report import quiet as _anima_quiet

_anima_quiet()
del _anima_quiet

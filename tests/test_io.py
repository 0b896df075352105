"""Atomic writes keep the umask's mode (shared boxes), and the finite check names the tensor."""
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from anima_lib import io


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = io.atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_load_finite_names_the_tensor(tmp_path):
    save_file({"ok": torch.ones(3), "bad": torch.tensor([1.0, float("inf")])}, tmp_path / "w.safetensors")
    with pytest.raises(io.NonFiniteWeightsError, match=r"tensor 'bad' holds 1 non-finite"):
        io.load_finite(tmp_path / "w.safetensors")

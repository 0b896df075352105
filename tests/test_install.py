"""The two environment descriptions must agree, and the installed versions must be the pinned ones."""
import re
import tomllib
from importlib import metadata

import yaml

from anima_lib.config import REPO_ROOT


def _norm(req: str) -> str:
    return re.sub(r"[-_.]+", "-", req.strip().lower())


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    assert sorted(_norm(r) for r in pip_section if r != "-e .") == sorted(_norm(r) for r in pyproject)


def test_installed_versions_match_pins():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for req in pyproject:
        if "==" not in req:
            continue
        name, version = req.split("==")
        installed = metadata.version(name)
        assert installed.split("+")[0] == version, f"{name}: installed {installed}, pinned {version}"

"""What `pip install .` puts in site-packages: one `mixlocal` name holding the three rooms, so that mixlocal installs
beside PyPI's unrelated `tokenizer` package (an Icelandic tokenizer) and both stay importable."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("engine", "quant", "tokenizer")


def test_pyproject_lists_every_package_of_the_three_rooms():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"mixlocal"} | {"mixlocal." + ".".join(init.parent.relative_to(REPO_ROOT).parts)
                              for room in ROOMS for init in (REPO_ROOT / room).rglob("__init__.py")}
    assert set(config["packages"]) == on_disk, "pyproject.toml's packages must name every folder with __init__.py"
    assert config["package-dir"] == {"mixlocal": "mixlocal", **{f"mixlocal.{r}": r for r in ROOMS}}


def _pip(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)


def test_installs_beside_pypis_tokenizer_package(tmp_path):
    other = tmp_path / "dl"
    got = _pip("download", "--no-deps", "-d", str(other), "tokenizer==3.7.0")
    if got.returncode != 0:
        pytest.skip(f"PyPI's `tokenizer` package could not be downloaded: {got.stderr.strip()[-200:]}")
    site = tmp_path / "site"
    built = _pip("install", "--no-deps", "--no-build-isolation", "--target", str(site), str(REPO_ROOT),
                 *map(str, other.glob("*.whl")))
    assert built.returncode == 0, built.stderr
    assert sorted(p.parent.name for p in site.glob("*/__init__.py")) == ["mixlocal", "tokenizer"]  # top-level packages
    code = ("import tokenizer, mixlocal, mixlocal.tokenizer, mixlocal.engine.cli\n"
            "assert hasattr(tokenizer, 'split_into_sentences'), tokenizer.__file__\n"  # the Icelandic one
            "assert mixlocal.tokenizer.Tokenizer.__module__ == 'mixlocal.tokenizer.tokenizer'\n"
            f"assert mixlocal.engine.__file__.startswith({str(site)!r}), mixlocal.engine.__file__\n"
            "assert mixlocal.DEFAULT_MODEL.is_file()\n"
            "print(mixlocal.__version__)\n")
    # Only the target directory and the venv's dependencies: not this checkout (the test runs from its root).
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr

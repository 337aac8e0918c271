"""`mixlocal ls`, `mixlocal rm` and `mixlocal cache prune`, run as commands against a hub cache laid out offline
in huggingface_hub's documented layout (as test_hub.py does) and a mixlocal cache folder of the test's own.

The packed-weight files are real ones, made by engine.load(packed_cache=True); the hub side is checked with
huggingface_hub's own scan_cache_dir."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_hub import lay_out_cache

from mixlocal import engine

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO = "acme/tiny-gguf"


def run(*args, env: dict, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixlocal", *map(str, args)], env=env, cwd=REPO_ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    """A hub cache holding one GGUF model, a local GGUF the command line has used, and packed weights of both."""
    hub, cache = tmp_path / "hub", tmp_path / "mixlocal"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(hub), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               MIXLOCAL_CACHE_DIR=str(cache))
    data = Path(engine.DEFAULT_MODEL).read_bytes()
    snapshot = lay_out_cache(hub, REPO, {"tiny-Q8_0.gguf": data})
    local = tmp_path / "mine" / "local.gguf"
    local.parent.mkdir()
    shutil.copy(engine.DEFAULT_MODEL, local)
    r = run("generate", "-m", local, "-p", "Hi", "-n", 1, "-t", 1, env=env)  # the command line remembers the path
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("MIXLOCAL_CACHE_DIR", str(cache))
    for path in (snapshot / "tiny-Q8_0.gguf", local):
        engine.load(path, n_ctx=32, packed_cache=True)
    assert len(list((cache / "packed").glob("*.mixpack"))) == 2
    return {"env": env, "hub": hub, "cache": cache, "local": local, "snapshot": snapshot}


def ls(env) -> dict:
    r = run("ls", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_ls_lists_models_packed_weights_and_kernels(disk):
    inv = ls(disk["env"])
    [hub] = inv["hub_models"]
    assert hub["id"] == REPO and hub["size_bytes"] == Path(engine.DEFAULT_MODEL).stat().st_size
    [local] = inv["local_models"]
    assert local["path"] == str(disk["local"].resolve()) and local["exists"]
    assert local["size_bytes"] == disk["local"].stat().st_size
    assert sorted(p["model"] for p in inv["packed"]) == sorted([REPO, str(disk["local"].resolve())])
    assert not any(p["stale"] for p in inv["packed"])
    assert inv["kernels"]["path"] == os.environ.get("NUMBA_CACHE_DIR", str(disk["cache"] / "numba"))
    text = run("ls", env=disk["env"])
    assert REPO in text.stdout and str(disk["local"].resolve()) in text.stdout and "packed weights" in text.stdout


def test_prune_asks_then_removes_only_packed_weights_whose_model_is_gone(disk):
    disk["local"].unlink()
    inv = ls(disk["env"])
    stale = [p["path"] for p in inv["packed"] if p["stale"]]
    assert len(stale) == 1 and not next(m for m in inv["local_models"])["exists"]
    refused = run("cache", "prune", "--keep-kernels", env=disk["env"], stdin="n\n")
    assert refused.returncode == 1 and "nothing removed" in refused.stderr and Path(stale[0]).exists()
    done = run("cache", "prune", "--keep-kernels", env=disk["env"], stdin="y\n")
    assert done.returncode == 0, done.stderr
    assert not Path(stale[0]).exists()
    inv = ls(disk["env"])
    assert [p["stale"] for p in inv["packed"]] == [False]  # the hub model's file stays
    assert inv["local_models"] == [] and len(inv["hub_models"]) == 1


def test_prune_removes_compiled_kernels_only_inside_the_mixlocal_cache(disk, tmp_path):
    outside = tmp_path / "elsewhere" / "numba"
    outside.mkdir(parents=True)
    (outside / "k.nbi").write_bytes(b"x")
    env = {**disk["env"], "NUMBA_CACHE_DIR": str(outside)}
    r = run("cache", "prune", "--yes", env=env)
    assert r.returncode == 0, r.stderr
    assert (outside / "k.nbi").exists() and "stay" in r.stderr
    inside = disk["cache"] / "numba"
    inside.mkdir(exist_ok=True)
    (inside / "k.nbi").write_bytes(b"x")
    r = run("cache", "prune", "--yes", env={**disk["env"], "NUMBA_CACHE_DIR": str(inside)})
    assert r.returncode == 0, r.stderr
    assert not inside.exists()


def test_rm_removes_a_hub_model_and_its_packed_weights_after_confirming(disk):
    from huggingface_hub import scan_cache_dir
    refused = run("rm", REPO, env=disk["env"], stdin="\n")
    assert refused.returncode == 1 and (disk["hub"] / "models--acme--tiny-gguf").exists()
    r = run("rm", REPO, env=disk["env"], stdin="yes\n")
    assert r.returncode == 0, r.stderr
    assert not (disk["hub"] / "models--acme--tiny-gguf").exists()
    assert [repo.repo_id for repo in scan_cache_dir(disk["hub"]).repos] == []
    inv = ls(disk["env"])
    assert inv["hub_models"] == [] and len(inv["packed"]) == 1  # the local model's packed file stays


def test_rm_of_a_local_path_forgets_it_and_never_deletes_the_file(disk):
    r = run("rm", disk["local"], "--yes", env=disk["env"])
    assert r.returncode == 0, r.stderr
    assert disk["local"].exists()
    inv = ls(disk["env"])
    assert inv["local_models"] == [] and len(inv["packed"]) == 1


def test_rm_of_something_unknown_is_one_usage_line(disk):
    r = run("rm", "nobody/nothing", "--yes", env=disk["env"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "mixlocal ls" in r.stderr

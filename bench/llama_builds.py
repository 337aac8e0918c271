"""Which prebuilt llama.cpp (llama-cpp-python 0.3.36) a bench compares a kernel family with, and how it gets one.

The wheels in ../shared/wheels (see the README there): the root one is a portable AVX2 build, avx512/ one built for
Zen 4's whole AVX-512 set. Each mixlocal family is compared with llama.cpp built for the same instruction set:
avx512vnni with the AVX-512 build, where the CPU runs it; avx2, avxvnni and portable with the AVX2 build (no
AVX-VNNI or scalar build of llama.cpp is shipped, and AVX2 is what llama.cpp runs on such CPUs by default).

Both wheels are the same version under the same file name, so they cannot share a venv: each is installed into a
directory of its own (pip --target, no dependencies: numpy, typing-extensions, diskcache and jinja2 come from the
venv) and a llama worker runs with PYTHONPATH naming it. Every build is probed in a subprocess (import, load and
evaluate a small model) before a bench relies on it, because a build for a richer CPU dies with SIGILL.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["default_wheels_dir", "install", "pick_wheel", "probe", "wheel_for_family"]

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "engine" / "data" / "default" / "model.gguf"


def default_wheels_dir() -> Path:
    return Path(os.environ.get("MIXLOCAL_LLAMA_WHEELS", ROOT.parent / "shared" / "wheels"))


def _portable(wheels: Path) -> Path | None:
    found = sorted(wheels.glob("llama_cpp_python-*.whl"))
    return found[0] if found else None


def _avx512(wheels: Path) -> Path | None:
    found = sorted((wheels / "avx512").glob("llama_cpp_python-*.whl"))
    return found[0] if found else None


def pick_wheel(wheels: Path) -> Path | None:
    """The wheel pick-llama-wheel names for this CPU; the portable one if the script is missing or fails."""
    script = wheels / "pick-llama-wheel"
    if script.is_file():
        try:
            r = subprocess.run([str(script)], capture_output=True, text=True, timeout=30, check=False)
            chosen = Path(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None
            if chosen is not None and chosen.is_file():
                return chosen
        except (OSError, subprocess.TimeoutExpired):
            pass
    return _portable(wheels)


def _build(wheel: Path | None, build: str | None, matches_family: bool, note: str | None) -> dict:
    return {"wheel": str(wheel) if wheel else None, "build": build, "matches_family": matches_family, "note": note}


def wheel_for_family(family: str, wheels: Path, picked: Path | None = None) -> dict:
    """The llama.cpp build to compare `family` with: {wheel (path or None), build, matches_family, note}.
    picked: what pick_wheel says for this CPU (asked if None)."""
    portable, avx512 = _portable(wheels), _avx512(wheels)
    if family == "avx512vnni":
        picked = pick_wheel(wheels) if picked is None else picked
        if avx512 is not None and picked is not None and picked.resolve() == avx512.resolve():
            return _build(avx512, "avx512", True, None)
        why = ("no AVX-512 wheel in " + str(wheels)) if avx512 is None else \
            "pick-llama-wheel says this CPU lacks part of the AVX-512 set that build needs"
        return _build(portable, "portable AVX2", False, why + "; compared with the portable AVX2 build instead, "
                      "which is slower than llama.cpp can be on this CPU")
    if portable is None:
        return _build(None, None, False, f"no portable llama-cpp-python wheel in {wheels}")
    if family in ("avx2", "avxvnni"):
        return _build(portable, "portable AVX2", True, None)
    return _build(portable, "portable AVX2", False,
                  "no llama.cpp build without AVX2 is shipped; compared with the AVX2 build")


def install(wheel: Path, data_dir: Path, python: str = sys.executable) -> Path:
    """Install the wheel (no dependencies) into its own directory under data_dir/llama-wheels, once per wheel
    content; returns the directory to put on PYTHONPATH."""
    wheel = Path(wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:12]
    kind = wheel.parent.name if wheel.parent.name == "avx512" else "portable"
    target = Path(data_dir) / "llama-wheels" / f"{kind}-{digest}"
    if (target / "llama_cpp" / "__init__.py").is_file():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(partial),
                        str(wheel)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"pip could not install {wheel} into {partial}: {(r.stderr or r.stdout)[-800:]}")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


_PROBE = r"""
import json, sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval([1, 415, 2936])
print("PROBE " + json.dumps({"version": llama_cpp.__version__, "module": llama_cpp.__file__}))
"""


def probe(pythonpath: Path | None, python: str = sys.executable, model: Path = TINY_MODEL) -> dict:
    """Import llama_cpp from pythonpath (None: the venv's own), load a small model and evaluate three tokens, in a
    subprocess. {"ok": True, "version", "module"} or {"ok": False, "reason"}."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                   else []))
    try:
        r = subprocess.run([python, "-c", _PROBE, str(model)], capture_output=True, text=True, env=env,
                           timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": "importing llama_cpp and loading a small model timed out"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    if r.returncode == 0 and lines:
        return {"ok": True, **json.loads(lines[-1][len("PROBE "):])}
    if r.returncode < 0:
        try:
            name = signal.Signals(-r.returncode).name
        except ValueError:
            name = f"signal {-r.returncode}"
        why = f"killed by {name}" + (" (Illegal instruction: a build for a richer CPU)" if name == "SIGILL" else "")
    else:
        why = f"exit {r.returncode}"
    return {"ok": False, "reason": f"llama_cpp import + load {why}: {r.stderr.strip()[-300:]}"}

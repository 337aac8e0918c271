"""Kernel families by instruction set: which the CPU runs, how one is chosen, and that the 256-bit families really
run on a CPU without AVX-512 (a child process whose numba compiles for Haswell or Alder Lake, checked against
gguf-py's dequantize and by reading the compiled assembly)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mixlocal.quant import kernels
from mixlocal.quant.kernels import families
from numba.core import config

from mixlocal import engine

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_family_is_a_clear_value_error():
    with pytest.raises(ValueError, match="'avx9' is not a kernel family; choose one of avx512vnni, avxvnni"):
        kernels.resolve_family("avx9")


def test_family_the_cpu_lacks_names_the_missing_features(monkeypatch):
    monkeypatch.setattr(families, "compile_features", lambda: {"avx2": True, "fma": True})
    assert families.host_families() == ("avx2", "portable")
    with pytest.raises(kernels.KernelFamilyError, match="lacks avx512f, avx512bw, avx512vl, avx512vnni; it runs avx2"):
        kernels.resolve_family("avx512vnni")
    assert kernels.resolve_family() == "avx2"  # the fastest it has
    assert kernels.resolve_family("AVX-2") == "avx2"  # spelled as people write it


def test_environment_variable_chooses_and_is_checked(monkeypatch):
    monkeypatch.setenv("MIXLOCAL_KERNELS", "portable")
    assert kernels.resolve_family() == "portable"
    assert kernels.resolve_family("avx2" if "avx2" in kernels.host_families() else "portable") != ""  # arg wins
    monkeypatch.setenv("MIXLOCAL_KERNELS", "sse9")
    with pytest.raises(ValueError, match=r"\$MIXLOCAL_KERNELS='sse9' is not a kernel family"):
        kernels.resolve_family()


def test_load_refuses_a_bad_family_before_reading_the_model(tmp_path):
    with pytest.raises(ValueError, match="'neon' is not a kernel family"):
        engine.load(tmp_path / "missing.gguf", kernels="neon")  # the missing file would be a different error


def test_load_runs_the_chosen_family():
    llm = engine.load(kernels="portable", n_ctx=64, packed_cache=False)
    assert llm.backend.kernels == "portable"
    packed = [w for layer in llm.backend.mats for w in layer.values() if isinstance(w, kernels.PackedWeight)]
    assert packed and {w.family for w in packed} == {"portable"}


def test_compile_features_follow_numba_overrides(monkeypatch):
    """numba compiles for NUMBA_CPU_NAME/NUMBA_CPU_FEATURES when set, so the families must be read from them."""
    monkeypatch.setattr(config, "CPU_NAME", "haswell")
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma,-avx512f,-avxvnni")
    assert families.compile_features() == {"avx2": True, "fma": True}
    assert families.host_families() == ("avx2", "portable")
    monkeypatch.setattr(config, "CPU_NAME", None)
    monkeypatch.setattr(config, "CPU_FEATURES", "-avx512vnni")  # the host's features, less one
    assert "avx512vnni" not in families.host_families()


_CHILD = textwrap.dedent("""
    import json, sys
    import gguf, numpy as np
    from mixlocal.quant import QTensor, QType, kernels
    sys.path.insert(0, "tests")
    from test_kernels import assert_matches, cols_for, make_weight

    family = sys.argv[1]
    report = {"families": list(kernels.host_families()), "checked": []}
    rng = np.random.default_rng(3)
    for name in ("Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        qtype = QType[name]
        w, ref = make_weight(qtype, (2, 70, cols_for(qtype)), seed=4)
        p = kernels.prepare(w)
        assert p.family == family, p.family
        for t in (1, 9):
            x = rng.standard_normal((t, w.shape[2])).astype(np.float32)
            ids = rng.integers(0, 2, t)
            y = kernels.expert_linear(p, x, ids)
            for e in np.unique(ids):
                assert_matches(y[ids == e], ref[e], x[ids == e], f"{name} {family} T={t}",
                               act=kernels.activation_type(p))
        report["checked"].append(name)
    asm = ""
    for decode, prefill in kernels._RUNS[family].values():
        for k in {decode, prefill}:
            for sig in k.signatures:
                asm += k.inspect_asm(sig)
    report["zmm"] = "zmm" in asm
    report["vpdpbusd"] = "vpdpbusd" in asm
    report["vpmaddubsw"] = "vpmaddubsw" in asm
    print(json.dumps(report))
""")


@pytest.mark.parametrize("family", ["avx2", "avxvnni"])
def test_256_bit_families_run_on_a_cpu_without_avx512(family, tmp_path):
    if family not in kernels.host_families():
        pytest.skip(f"this CPU cannot run the {family} kernels (it runs {', '.join(kernels.host_families())})")
    env = {**os.environ, **families.emulation_env(family), "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run([sys.executable, "-c", _CHILD, family], check=False, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["families"][0] == family  # nothing faster is offered to the emulated CPU
    assert report["checked"] == ["Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    assert not report["zmm"], "a 256-bit family compiled to 512-bit registers"
    if family == "avx2":
        assert report["vpmaddubsw"] and not report["vpdpbusd"]
    else:
        assert report["vpdpbusd"]

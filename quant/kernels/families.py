"""Kernel families by instruction set: which ones this CPU can run, which one is chosen, and how to emulate a lesser
CPU in a child process (for benches and tests).

  avx512vnni  512-bit vpdpbusd (AVX-512 VNNI: Zen 4, Ice Lake and later Xeons)
  avxvnni     256-bit vpdpbusd without AVX-512 (AVX-VNNI: Alder Lake and later laptops, Zen 5)
  avx2        256-bit vpmaddubsw + vpmaddwd (Haswell on, Zen 1-3: most laptops)
  portable    LLVM-vectorised integer kernels (any CPU, ARM included)

The three integer families share one packed layout (quads.py) and differ only in the instructions that multiply
bytes; portable has its own (portable.py).

What counts is what numba compiles for, not only the silicon: numba honours NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, and
an intrinsic the target lacks fails to compile. So the features are read as numba will use them.
"""
from __future__ import annotations

import os

__all__ = ["FAMILIES", "KernelFamilyError", "compile_features", "emulation_env", "host_families", "resolve"]

FAMILIES = ("avx512vnni", "avxvnni", "avx2", "portable")  # fastest first

# LLVM feature names each family's intrinsics need
_NEEDS = {
    "avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512vnni"),
    "avxvnni": ("avx2", "avxvnni"),
    "avx2": ("avx2",),
    "portable": (),
}

# a CPU that has the family and nothing above it, for emulation_env
_EMULATED_CPU = {
    "avxvnni": ("alderlake", "+avx2,+fma,+f16c,+avxvnni,-avx512f,-avx512bw,-avx512vl,-avx512vnni"),
    "avx2": ("haswell", "+avx2,+fma,+f16c,-avxvnni,-avx512f,-avx512bw,-avx512vl,-avx512vnni"),
}

ENV_VAR = "MIXLOCAL_KERNELS"


class KernelFamilyError(ValueError):
    """An unknown kernel family, or one this CPU (as numba compiles for it) cannot run."""


def _parse(features: str) -> dict[str, bool]:
    out = {}
    for item in features.split(","):
        item = item.strip()
        if len(item) > 1 and item[0] in "+-":
            out[item[1:]] = item[0] == "+"
    return out


def compile_features() -> dict[str, bool]:
    """The CPU features numba compiles for: LLVM's view of the host, or NUMBA_CPU_FEATURES where set.

    With NUMBA_CPU_NAME naming another CPU, only the features the string turns on count (that CPU's defaults are
    not known here, so this errs towards fewer families)."""
    from numba.core import config
    try:
        from llvmlite import binding
        host = dict(binding.get_host_cpu_features())
    except Exception:  # noqa: BLE001 - no feature list at all: only the portable family is safe
        host = {}
    if not config.CPU_FEATURES:
        return host
    given = _parse(config.CPU_FEATURES)
    if config.CPU_NAME and config.CPU_NAME.lower() != "host":
        return {k: v for k, v in given.items() if v}
    return {**host, **given}


def host_families(features: dict[str, bool] | None = None) -> tuple[str, ...]:
    """The families this CPU can run, fastest first (always ends with "portable")."""
    feats = compile_features() if features is None else features
    return tuple(f for f in FAMILIES if all(feats.get(n, False) for n in _NEEDS[f]))


def resolve(family: str | None = None) -> str:
    """The family to run: `family`, else $MIXLOCAL_KERNELS, else the fastest this CPU has."""
    where = "kernels="
    if family is None:
        family = os.environ.get(ENV_VAR) or None
        where = f"${ENV_VAR}="
    runnable = host_families()
    if family is None:
        return runnable[0]
    name = str(family).strip().lower().replace("-", "").replace("_", "")
    if name not in FAMILIES:
        raise KernelFamilyError(f"{where}{family!r} is not a kernel family; choose one of {', '.join(FAMILIES)}")
    if name not in runnable:
        missing = [n for n in _NEEDS[name] if not compile_features().get(n, False)]
        raise KernelFamilyError(f"{where}{family!r}: this CPU lacks {', '.join(missing)}; it runs "
                                f"{', '.join(runnable)}")
    return name


def emulation_env(family: str) -> dict[str, str]:
    """Environment for a child process whose numba compiles for a CPU that offers `family` and nothing faster,
    so that an AVX2 run on an AVX-512 machine uses no AVX-512 instruction anywhere. Empty for avx512vnni and
    portable (they need no emulation)."""
    if family not in FAMILIES:
        raise KernelFamilyError(f"{family!r} is not a kernel family; choose one of {', '.join(FAMILIES)}")
    if family not in _EMULATED_CPU:
        return {}
    name, feats = _EMULATED_CPU[family]
    return {"NUMBA_CPU_NAME": name, "NUMBA_CPU_FEATURES": feats, ENV_VAR: family}

"""What every `mixlocal` command shares: the one-line usage error, the model and sampling flags, loading, and how
sizes and progress are shown."""
from __future__ import annotations

import sys

__all__ = ["JSON_HELP", "KERNELS_HELP", "KV_TYPES", "MEM_BUDGET_HELP", "MODEL_HELP", "UsageError", "add_budget_args",
           "add_model_args", "add_model_flag", "check_json_dest", "expert_counters", "expert_line", "human_bytes", "json_output", "level_name",
           "load_model", "sampling_kwargs", "tqdm_progress"]

# The model is MODEL on every command, positional or -m; threads are -t/--threads N and the context -c/--n-ctx N,
# as in llama.cpp, whose flags most local-model users already type.
MODEL_METAVAR = "MODEL"
KV_TYPES = ("f16", "f32", "q8_0")
# One convention for machine-readable output, for info, ls and bench alike: --json prints JSON on stdout instead of
# the text, --json FILE writes it to FILE and the text still goes to stdout.
JSON_HELP = "print JSON on stdout instead of text; with FILE, write the JSON there and print the text"  # engine.backends' KV cache types, named here so that --help needs no kernels

MODEL_HELP = ("a Hugging Face or MLX model directory, a .gguf file, or a hub id owner/name[:TAG] already in the "
              "local cache (default: the embedded model)")
MEM_BUDGET_HELP = ("memory the model may use, e.g. 16GiB or 12GB (default: what is available now, within a "
                   "container's limit); when the experts do not fit, each block keeps the ones it uses most and "
                   "reads the others from the file")
KERNELS_HELP = ("numba kernel family: avx512vnni, avxvnni, avx2 or portable (default: $MIXLOCAL_KERNELS, else the "
                "fastest this CPU runs)")


class UsageError(Exception):
    """A bad command line, reported in one line."""


def level_name(text: str) -> str:
    """--type/--quant: a level named in any case (Q4_K_M as llama.cpp and the hub's file names write it)."""
    import argparse

    from .bench import known_levels
    name = text.strip().lower()
    if name not in known_levels():
        raise argparse.ArgumentTypeError(f"unknown level {text!r}; choose from {', '.join(known_levels())}")
    return name


def add_model_flag(p):
    p.add_argument("-m", "--model", default=None, metavar=MODEL_METAVAR, help=MODEL_HELP)


def add_model_args(p, *, sampling: bool, n_default: int):
    add_model_flag(p)
    p.add_argument("--quant", default=None, type=level_name, metavar="LEVEL",
                   help="quantize the weights to LEVEL in memory at load (any case: q4_k_m or Q4_K_M)")
    p.add_argument("--backend", default="auto", choices=("auto", "numba", "mlx"),
                   help="auto (default: mlx on Apple Silicon, else numba), numba or mlx")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("-c", "--n-ctx", type=int, default=32768, metavar="N",
                   help="context length (default 32768; KV memory is committed only as the context fills)")
    p.add_argument("--kv-type", default="f16", choices=KV_TYPES, help="KV cache element type (default f16)")
    p.add_argument("--no-packed-cache", dest="packed_cache", action="store_const", const=False, default=None,
                   help="repack Q4_0/Q8_0/Q4_K weights in memory instead of mapping ~/.cache/mixlocal/packed")
    p.add_argument("--kernels", default=None, metavar="FAMILY", help=KERNELS_HELP)
    add_budget_args(p)
    if sampling:
        p.add_argument("-n", "--max-tokens", type=int, default=n_default, metavar="N",
                       help=f"most tokens to generate (default {n_default})")
        _add_sampling_args(p)


def add_budget_args(p):
    p.add_argument("--mem-budget", default=None, metavar="SIZE", help=MEM_BUDGET_HELP)
    p.add_argument("--expert-policy", default=None, choices=("lfru", "lfu", "lru"),
                   help="which expert leaves memory first under --mem-budget (default lfru: least used, recently)")


def _add_sampling_args(p):
    """One flag per SamplingParams field; an absent flag is None, which keeps SamplingParams' default."""
    from ..sampling import sampling_fields
    for f in sampling_fields():
        flags = f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)
        p.add_argument(*flags, dest=f.name, type=type(f.default), default=None, metavar="X",
                       help=f"{f.metadata['help']} (default {f.default:g})")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="seed for a repeatable draw (default: random)")


def load_model(args):
    from mixlocal import engine
    if args.n_ctx <= 0:
        raise UsageError(f"-c/--n-ctx must be positive, got {args.n_ctx}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"-t/--threads must be positive, got {args.threads}")
    llm = engine.load(args.model, quant=args.quant, backend=args.backend, n_threads=args.threads,
                      n_ctx=args.n_ctx, kv_type=args.kv_type, packed_cache=args.packed_cache, kernels=args.kernels,
                      mem_budget=args.mem_budget, expert_policy=args.expert_policy)
    from .store import remember_model
    remember_model(args.model)
    return llm


def expert_line(llm, before: dict | None) -> str:
    """What a memory budget cost since `before` (expert_counters taken then): "" without a budget."""
    now = expert_counters(llm)
    if now is None or before is None:
        return ""
    d = {k: now[k] - before[k] for k in now}
    used = d["hits"] + d["misses"]
    rate = d["hits"] / used if used else 1.0
    share = d["wait_s"] / d["wall_s"] if d["wall_s"] > 0 else 0.0
    return (f"; experts {llm.backend.store.describe_slots()}/{llm.config.n_experts} per block resident, hit rate {rate:.2f}, "
            f"{human_bytes(d['bytes_read'])} read, {share:.0%} of the time waiting on the disk")


def expert_counters(llm) -> dict | None:
    import time
    store = getattr(llm.backend, "store", None)
    if store is None:
        return None
    s = store.stats
    return {"hits": s.hits, "misses": s.misses, "bytes_read": s.bytes_read, "wait_s": s.wait_s,
            "wall_s": time.perf_counter()}


def sampling_kwargs(args) -> dict:
    from ..sampling import SamplingParams
    return {name: getattr(args, name) for name in SamplingParams().as_kwargs()}


def check_json_dest(dest: str | None) -> None:
    """--json FILE must name a .json file: `info --json model.gguf` would otherwise write over the model it meant
    to describe. Checked before anything loads."""
    if dest not in (None, "-") and not dest.endswith(".json"):
        raise UsageError(f"--json FILE must name a .json file, got {dest!r} (to print JSON, put --json after the "
                         "model)")


def json_output(obj, dest: str | None) -> bool:
    """--json as JSON_HELP says; True when the JSON took the text's place on stdout."""
    import json
    check_json_dest(dest)
    if dest is None:
        return False
    text = json.dumps(obj, indent=2)
    if dest == "-":
        print(text)
        return True
    try:
        with open(dest, "w") as f:
            f.write(text + "\n")
    except OSError as e:
        raise UsageError(f"cannot write {dest}: {e.strerror}") from None
    return False


def tqdm_progress(desc: str):
    def wrap(items):
        from tqdm.auto import tqdm
        return tqdm(items, desc=desc, unit="tensor", disable=None, file=sys.stderr)
    return wrap


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)

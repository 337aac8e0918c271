"""`mixlocal imatrix -m MODEL -f TEXT -o FILE`: an importance matrix in llama.cpp's file format (engine/imatrix.py)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .common import (
    KERNELS_HELP,
    UsageError,
    add_budget_args,
    add_model_flag,
    human_bytes,
)

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix for quantize --imatrix",
                       description="Run the model over a text and record, for every matrix of the blocks, the mean "
                                   "squared activation of each input column (per expert for the expert tensors, "
                                   "over the tokens routed to each), chunked as llama-imatrix does, with its "
                                   "flags (-c chunk size, --chunk chunks to skip, --chunks how many). The file is "
                                   "llama.cpp's imatrix GGUF (or its legacy .dat with --output-format dat), which "
                                   "llama-quantize --imatrix reads too.")
    add_model_flag(p)
    p.add_argument("-f", "--file", required=True, metavar="TEXT", help="the calibration text (UTF-8)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the imatrix file to write")
    p.add_argument("-c", "--ctx-size", dest="ctx", type=int, default=512, metavar="N",
                   help="tokens per chunk, each evaluated from an empty context (default 512)")
    p.add_argument("--chunk", dest="skip", type=int, default=0, metavar="N",
                   help="skip the text's first N chunks (default 0)")
    p.add_argument("--chunks", type=int, default=None, metavar="K", help="use at most K chunks (default: all)")
    p.add_argument("--output-format", choices=("gguf", "dat"), default=None,
                   help="gguf (default, unless FILE ends in .dat) or llama.cpp's legacy dat")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("--kernels", default=None, metavar="FAMILY", help=KERNELS_HELP)
    add_budget_args(p)
    p.set_defaults(func=command)


def command(args) -> int:
    from mixlocal.quant.imatrix import write_imatrix

    from ..imatrix import compute_imatrix
    from ..loader import load

    if args.ctx < 1:
        raise UsageError(f"mixlocal imatrix: -c/--ctx-size must be positive, got {args.ctx}")
    if args.skip < 0:
        raise UsageError(f"mixlocal imatrix: --chunk (chunks to skip) must be 0 or more, got {args.skip}")
    if args.chunks is not None and args.chunks < 1:
        raise UsageError(f"mixlocal imatrix: --chunks must be positive, got {args.chunks}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"mixlocal imatrix: -t/--threads must be positive, got {args.threads}")
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"mixlocal imatrix: {out} exists; add --force to overwrite it")
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"mixlocal imatrix: {args.file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    legacy = args.output_format == "dat" or (args.output_format is None and out.suffix == ".dat")
    llm = load(args.model, backend="numba", n_ctx=args.ctx, n_threads=args.threads, kernels=args.kernels,
               mem_budget=args.mem_budget, expert_policy=args.expert_policy)

    def progress(chunks):
        from tqdm.auto import tqdm
        return tqdm(chunks, desc="imatrix", unit="chunk", disable=None, file=sys.stderr)

    t0 = time.perf_counter()
    try:
        im = compute_imatrix(llm, text, chunk=args.ctx, n_chunks=args.chunks, skip=args.skip,
                             dataset=str(args.file), progress=progress)
    finally:
        llm.close()
    tmp = out.with_name(out.name + ".part")  # never a truncated file under the real name
    try:
        write_imatrix(tmp, im, legacy=legacy)
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"{out}: {len(im.entries)} matrices over {im.chunk_count} chunks of {im.chunk_size} tokens, "
          f"{human_bytes(out.stat().st_size)}, in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0

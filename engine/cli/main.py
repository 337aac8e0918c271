"""`mixlocal`: generate, chat, pull, info, quantize, serve and bench, each a thin layer over the engine.

Errors a user can cause (a bad flag, a model that cannot be read, an unknown level) end the program with one line
on stderr and a non-zero status, never a traceback: usage errors exit 2, failures 1, Ctrl-C 130.
The server, the hub client, the exporter and the quantizer are imported inside the command that needs them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import bench, chat, imatrix, store
from .common import (
    JSON_HELP,
    KERNELS_HELP,
    KV_TYPES,
    MEM_BUDGET_HELP,
    MODEL_HELP,
    UsageError,
    add_model_args,
    check_json_dest,
    expert_counters,
    expert_line,
    human_bytes,
    json_output,
    level_name,
    load_model,
    sampling_kwargs,
    tqdm_progress,
)
from .compile_notice import watch_compilation

__all__ = ["build_parser", "main"]

EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

PULL_EXAMPLES = """examples:
  mixlocal pull mistralai/Mixtral-8x7B-Instruct-v0.1                 the official safetensors (about 93 GB)
  mixlocal pull TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF --include '*Q4_K_M.gguf'
                                                                      one GGUF file (about 26 GB)
  mixlocal pull mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit        the MLX 4-bit folder

Files go to the Hugging Face cache (HF_HOME, HF_HUB_CACHE); -m then takes the same id, e.g.
  mixlocal chat -m TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q4_K_M
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of the usage block."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------------

def _show(watch, prompt: str, pieces: list[str]) -> None:
    """Write the held text (and the prompt, while it waits for the first piece) once the spinner is off the line."""
    if not (prompt or pieces):
        return
    watch.quiet()
    sys.stdout.write(prompt + "".join(pieces))
    sys.stdout.flush()


def _structure_kwargs(args) -> dict:
    """--json-schema FILE / --grammar FILE as LLM.stream's response_format / grammar, read before the model loads."""
    if args.json_schema and args.grammar:
        raise UsageError("mixlocal generate: give --json-schema or --grammar, not both")
    try:
        if args.json_schema:
            schema = json.loads(Path(args.json_schema).read_text())
            return {"response_format": {"type": "json_schema", "json_schema": {"name": "cli", "schema": schema}}}
        if args.grammar:
            text = Path(args.grammar).read_text()
            if args.grammar.endswith((".regex", ".re")):
                return {"grammar": {"regex": text.strip()}}
            return {"grammar": text}
    except OSError as e:
        raise UsageError(f"mixlocal generate: cannot read {e.filename}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"mixlocal generate: --json-schema {args.json_schema} is not JSON: {e}") from None
    return {}


def check_sampling_args(args, command: str) -> None:
    """Bad sampling values are one usage line before the model loads, not an error after the prompt is printed."""
    from ..sampling import SamplingParams
    if args.max_tokens is not None and args.max_tokens < 0:
        raise UsageError(f"mixlocal {command}: -n/--max-tokens must be >= 0, got {args.max_tokens}")
    try:
        SamplingParams().with_(**{k: v for k, v in sampling_kwargs(args).items() if v is not None})
    except (ValueError, TypeError) as e:
        raise UsageError(f"mixlocal {command}: {e}") from None


def _generate(args) -> int:
    check_sampling_args(args, "generate")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    structure = _structure_kwargs(args)
    if structure:  # a grammar that cannot compile fails here, before the model loads
        from llguidance import LLMatcher

        from ..constraints import grammar_for
        error = LLMatcher.validate_grammar(grammar_for(**structure))
        if error:
            raise UsageError(f"mixlocal generate: cannot compile the grammar: {error.splitlines()[0]}")
    chat_mode = args.chat or args.system is not None
    with watch_compilation() as watch:
        llm = load_model(args)
        if chat_mode:  # one user turn through the model's chat template; the answer starts fresh, not continuing
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                [{"role": "user", "content": prompt}]
            prompt_in = llm.tokenizer.encode_chat(messages)
        else:
            prompt_in = prompt
        echo = not chat_mode and not args.no_display_prompt
        if echo and not (sys.stdout.isatty() and sys.stderr.isatty()):
            # No spinner shares this screen: show the prompt now. On a terminal it waits for the first piece, so
            # that a compile spinner (which redraws its line from the start) never writes over it.
            sys.stdout.write(prompt)
            sys.stdout.flush()
            echo = False
        before, at_start = expert_counters(llm), watch.seconds
        pieces = llm.stream(prompt_in, max_tokens=args.max_tokens, stop=args.stop or None, continuation=not chat_mode,
                            **structure, **sampling_kwargs(args))
        compiled_in_prefill, held = None, []
        while True:
            try:
                piece = next(pieces)
            except StopIteration as done:
                res = done.value
                break
            if compiled_in_prefill is None:
                compiled_in_prefill = watch.seconds
            held.append(piece)
            # While the spinner runs, the first piece waits for the second: the decode step between them compiles
            # the decode kernels, the other half of a first run's compilation, and the answer then streams freely.
            if watch.spinning and len(held) < 2:
                continue
            _show(watch, prompt if echo else "", held)
            echo, held = False, []
        _show(watch, prompt if echo else "", held)
        sys.stdout.write("\n")
        sys.stdout.flush()
    # the prefill ends before the first piece; kernels compiled after it were compiled inside decode steps
    first = watch.seconds if compiled_in_prefill is None else compiled_in_prefill
    t = watch.excluded(res.timings, first - at_start, watch.seconds - first)
    print(f"prefill {t['prefill_tokens']} tokens at {t['prefill_tps']:.1f} tok/s, "
          f"decode {t['decode_tokens']} tokens at {t['decode_tps']:.1f} tok/s ({res.finish_reason})"
          f"{expert_line(llm, before)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# pull
# ---------------------------------------------------------------------------------------------------------------------

def _pull(args) -> int:
    from ..sources.hub import pull
    folder = pull(args.repo, include=args.include, revision=args.revision, local_dir=args.local_dir)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(folder)
    print(f"{args.repo}: {human_bytes(size)} in {folder}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------------------------

def _info(args) -> int:
    from .. import machine
    from ..backends.numba.cache import KV_TYPES, KVCache
    from ..backends.numba.experts import slot_range
    from ..loader import open_source
    from ..weights import weight_stats
    check_json_dest(args.json)
    if args.kv_type not in KV_TYPES:
        raise UsageError(f"mixlocal info: --kv-type must be one of {', '.join(KV_TYPES)}, got {args.kv_type!r}")
    if args.n_ctx <= 0:
        raise UsageError(f"mixlocal info: --n-ctx must be positive, got {args.n_ctx}")
    from mixlocal.quant.kernels import host_families, resolve_family
    kernels = {"chosen": resolve_family(args.kernels), "cpu_runs": list(host_families())}
    config, weights, tok, name = open_source(args.model)
    if args.quant:
        from ..quantize import quantize_weights
        weights = quantize_weights(weights, args.quant, progress=tqdm_progress(f"quantizing to {args.quant}"))
    st = weight_stats(weights)
    kv_per_token = KVCache(config, 1, args.kv_type).bytes_per_token  # the cache's own accounting, one position
    info = {"source": str(args.model) if args.model else "embedded default", "name": name,
            "quant": args.quant, "config": config.to_dict(), "tokenizer_vocab": tok.vocab_size, **st,
            "kv_type": args.kv_type, "kv_bytes_per_token": kv_per_token, "n_ctx": args.n_ctx,
            "kv_bytes_at_n_ctx": kv_per_token * args.n_ctx, "kernels": kernels, "machine": machine.describe(),
            "memory": _memory_plan(weights, kernels["chosen"], args.mem_budget, kv_per_token * args.n_ctx)}
    if json_output({**info, "memory": {k: v for k, v in info["memory"].items() if k != "budget_said"}}, args.json):
        return 0
    print(f"{info['source']} ({name}){' at ' + args.quant if args.quant else ''}")
    print("config:")
    for k, v in config.to_dict().items():
        print(f"  {k:<16} {v}")
    print(f"  {'tokenizer vocab':<16} {tok.vocab_size}")
    print("tensors:")
    print(f"  {'format':<8} {'count':>6} {'weights':>15} {'bytes':>12} {'bits/weight':>12}")
    for fmt, f in st["formats"].items():
        print(f"  {fmt:<8} {f['tensors']:>6} {f['elements']:>15,} {human_bytes(f['bytes']):>12} "
              f"{f['bits_per_weight']:>12.3f}")
    print(f"  {'total':<8} {sum(f['tensors'] for f in st['formats'].values()):>6} {st['n_elements']:>15,} "
          f"{human_bytes(st['size_bytes']):>12} {st['bits_per_weight']:>12.3f}")
    print(f"experts: {human_bytes(st['expert_bytes'])}; a decoded token reads about "
          f"{human_bytes(st['bytes_per_decoded_token'])} ({config.n_experts_used} of {config.n_experts} experts)")
    print(f"KV cache ({args.kv_type}): {human_bytes(kv_per_token)} per token, "
          f"{human_bytes(kv_per_token * args.n_ctx)} at n_ctx {args.n_ctx}")
    mem = info["memory"]
    if mem["n_slots"] >= config.n_experts:
        print(f"memory: all weights resident ({human_bytes(mem['dense'] + mem['experts'])} in the kernels' form) "
              f"within {mem['budget_said']}")
    else:
        print(f"memory: within {mem['budget_said']}, dense weights {human_bytes(mem['dense'])} resident and "
              f"{slot_range(mem['slots_per_block'])} of {config.n_experts} experts per block "
              f"({human_bytes(mem['resident_experts'])}); "
              f"the others are read from the file when a token needs them")
    m = info["machine"]
    print(f"machine: {m['cpu']}, {m['physical_cores']} cores ({m['logical_cpus']} logical), "
          f"{human_bytes(m['ram_bytes'])} memory")
    print(f"kernels (numba backend): {kernels['chosen']}; this CPU runs {', '.join(kernels['cpu_runs'])}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------------------------------

def _quantize(args) -> int:
    from ..loader import open_source

    levels = bench.known_levels()
    if args.type not in levels:
        raise UsageError(f"mixlocal quantize: unknown level {args.type!r}; choose from {','.join(levels)}")
    out = Path(args.output)
    if out.suffix != ".gguf":
        raise UsageError(f"mixlocal quantize: the output must be a .gguf file, got {out}")
    if out.exists() and not args.force:
        raise UsageError(f"mixlocal quantize: {out} exists; add --force to overwrite it")
    try:
        from ..export import write_gguf
    except ImportError as e:
        raise RuntimeError(f"quantize needs engine.export, which this build lacks ({e})") from None
    _config, weights, tok, name = open_source(args.model)
    from ..weights import weight_stats
    quantized = sorted(f for f in weight_stats(weights)["formats"] if f not in ("F32", "F16", "BF16"))
    if quantized and not args.allow_requantize:
        raise UsageError(f"mixlocal quantize: {args.model} is already quantized ({', '.join(quantized)}); "
                         f"quantizing it again to {args.type} adds a second rounding error. Start from the f16/bf16 "
                         "weights, or add --allow-requantize")
    im = None
    if args.imatrix:
        from mixlocal.quant.imatrix import read_imatrix
        im = read_imatrix(args.imatrix)
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".part")  # a crash never leaves a truncated file under the real name
    try:
        write_gguf(weights, tok, tmp, args.type, name=name, progress=tqdm_progress(f"quantizing to {args.type}"),
                   imatrix=im)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"{out}: {human_bytes(out.stat().st_size)} at {args.type} in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# serve: its arguments and its body live in engine.server, imported only when serve is asked for
# ---------------------------------------------------------------------------------------------------------------------

def _add_serve_parser(sub, wanted: bool):
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on this machine",
                       description="An OpenAI-compatible HTTP server on this machine.")
    if not wanted:
        return
    try:
        from ..server import add_serve_arguments, run_serve
    except ImportError as e:
        why = str(e)  # `e` itself is unbound once the except block ends
        p.set_defaults(func=lambda args: _unavailable("serve", why))
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)


def _unavailable(command: str, why: str) -> int:
    raise RuntimeError(f"{command} is not available in this build ({why})")


def _memory_plan(weights, family: str, mem_budget, kv_bytes: int) -> dict:
    """How engine.load would place the weights under mem_budget (numba backend): the same plan, without loading."""
    from ..backends.numba.backend import _PREPARED, plan_budget, weight_budget_for
    budget, said = weight_budget_for(mem_budget, kv_bytes)
    named = {k: t for k, t in weights.tensors().items() if k.split(".")[-2] in _PREPARED}
    plan = plan_budget(weights, named, family, budget)
    # what changes from one moment to the next (the memory available now) stays out of the JSON report, so two
    # reports on the same model compare equal; the text line says it
    stable = {k: v for k, v in plan.items() if k != "budget"}
    return {**stable, "mem_budget": mem_budget, "budget_said": said}


# ---------------------------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------------------------

def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="mixlocal", description="Run quantized Mixtral 8x7B Instruct locally, offline.")
    from .. import __version__
    p.add_argument("--version", action="version", version=f"mixlocal {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser("generate", help="stream a continuation of a prompt (or, with --chat, an answer to it)",
                       description="Stream a continuation of a prompt to stdout, or with --chat the answer to it as "
                                   "an instruction; a timing line goes to stderr.")
    add_model_args(g, sampling=True, n_default=128)
    g.add_argument("-p", "--prompt", required=True, metavar="TEXT", help="the prompt, or - to read it from stdin")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message through the model's chat template and print the "
                        "answer (default: continue the prompt's text, as llama.cpp's completion does)")
    g.add_argument("-sys", "--system", default=None, metavar="TEXT",
                   help="a system prompt; implies --chat (Mixtral v1 puts it before the first message)")
    g.add_argument("--no-display-prompt", action="store_true",
                   help="print only the generated text, not the prompt before it (--chat never prints the prompt)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    g.add_argument("--json-schema", default=None, metavar="FILE",
                   help="constrain the output to JSON that follows this JSON schema")
    g.add_argument("--grammar", default=None, metavar="FILE",
                   help="constrain the output to this Lark grammar (a .regex or .re file: a regular expression)")
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="an interactive chat in the Mixtral Instruct format",
                       description=f"An interactive chat in the Mixtral Instruct format. {chat.CHAT_HELP}.")
    add_model_args(c, sampling=True, n_default=2048)
    c.add_argument("-sys", "--system", default=None, metavar="TEXT",
                   help="a system prompt (Mixtral v1 puts it before the first message)")
    c.set_defaults(func=chat.command)

    pl = sub.add_parser("pull", help="download a model from the Hugging Face hub into the local cache",
                        description="Download a model repository (or some of its files) through huggingface_hub.",
                        epilog=PULL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("repo", metavar="REPO", help="owner/name on the hub")
    pl.add_argument("--include", action="append", metavar="PATTERN",
                    help="download only files matching this glob (repeatable), e.g. '*Q4_K_M.gguf'")
    pl.add_argument("--revision", default=None, metavar="REV", help="branch, tag or commit (default main)")
    pl.add_argument("--local-dir", default=None, metavar="DIR", help="download into this folder instead of the cache")
    pl.set_defaults(func=_pull)

    i = sub.add_parser("info", help="config, tensor formats, sizes and KV cache cost of a model",
                       description="Config, tensor formats with counts, bytes, bits per weight, and KV cache bytes.")
    i.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP)
    i.add_argument("--quant", default=None, type=level_name, metavar="LEVEL",
                   help="show the sizes after quantizing to LEVEL")
    i.add_argument("-c", "--n-ctx", type=int, default=32768, metavar="N",
                   help="context for the KV total (default 32768)")
    i.add_argument("--kv-type", default="f16", choices=KV_TYPES, help="KV cache element type (default f16)")
    i.add_argument("--kernels", default=None, metavar="FAMILY", help=KERNELS_HELP)
    i.add_argument("--mem-budget", default=None, metavar="SIZE", help=MEM_BUDGET_HELP)
    i.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE", help=JSON_HELP)
    i.set_defaults(func=_info)

    q = sub.add_parser("quantize", help="write a model as a GGUF file at a quantization level",
                       description="Quantize a model and write it as a GGUF file that llama.cpp also loads.")
    q.add_argument("model", metavar="MODEL",
                   help="the model to quantize: a Hugging Face or MLX model directory, a .gguf file, or a hub id "
                        "owner/name[:TAG] in the local cache (best from f16/bf16 weights)")
    q.add_argument("output", metavar="OUT.gguf", help="the GGUF file to write")
    q.add_argument("--type", required=True, type=level_name, metavar="LEVEL",
                   help=f"the level, in any case: {', '.join(bench.known_levels())}")
    q.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    q.add_argument("--allow-requantize", action="store_true",
                   help="quantize weights that are already quantized (the result carries both errors)")
    q.add_argument("--imatrix", default=None, metavar="FILE",
                   help="an importance matrix (mixlocal imatrix, or llama-imatrix's .gguf/.dat): every matrix it has "
                        "is quantized weighted by it, as llama-quantize --imatrix does")
    q.set_defaults(func=_quantize)
    imatrix.add_parser(sub)

    store.add_parsers(sub)

    command = next((a for a in (argv or []) if not a.startswith("-")), None)
    _add_serve_parser(sub, wanted=command == "serve")

    b = sub.add_parser("bench", help="measure quantization levels against each other on this machine",
                       description="Each level is loaded in its own process and measured for size, load time, "
                                   "prefill and decode speed, peak memory, and quality against a reference "
                                   "(perplexity, KL divergence, top-1 agreement).")
    bench.add_arguments(b)
    b.set_defaults(func=bench.command)
    return p


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and e.args:  # str(KeyError) is the repr of the key
        text = f"missing {e.args[0]!r}"
    line = text.splitlines()[0] if text else ""
    return line or type(e).__name__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return args.func(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `mixlocal info | head -2`: the reader is gone, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemError as e:  # Ctrl-C inside a numba kernel surfaces as this, with the interrupt as its context
        if isinstance(e.__context__, KeyboardInterrupt) or isinstance(e.__cause__, KeyboardInterrupt):
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    except (ValueError, OSError, RuntimeError, ImportError, MemoryError) as e:
        print(f"mixlocal: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())

"""`mixlocal`: generate, chat, pull, info, quantize, serve and bench, each a thin layer over the engine.

Errors a user can cause (a bad flag, a model that cannot be read, an unknown level) end the program with one line
on stderr and a non-zero status, never a traceback: usage errors exit 2, failures 1, Ctrl-C 130.
Heavy modules are imported inside the command that needs them, so `mixlocal --help` and `pull` start at once.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

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

MODEL_HELP = ("a Hugging Face or MLX model directory, a .gguf file, or a hub id owner/name[:TAG] already in the "
              "local cache (default: the embedded model)")


class UsageError(Exception):
    """A bad command line, reported in one line."""


KERNELS_HELP = ("numba kernel family: avx512vnni, avxvnni, avx2 or portable (default: $MIXLOCAL_KERNELS, else the "
                "fastest this CPU runs)")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of the usage block."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------------

def _add_model_args(p, *, sampling: bool, n_default: int):
    p.add_argument("-m", "--model", default=None, metavar="SRC", help=MODEL_HELP)
    p.add_argument("--quant", default=None, metavar="LEVEL", help="quantize the weights to LEVEL in memory at load")
    p.add_argument("--backend", default="auto", help="auto (default), numba or mlx")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("--n-ctx", type=int, default=32768, metavar="N",
                   help="context length (default 32768; KV memory is committed only as the context fills)")
    p.add_argument("--no-packed-cache", dest="packed_cache", action="store_const", const=False, default=None,
                   help="repack Q4_0/Q8_0/Q4_K weights in memory instead of mapping ~/.cache/mixlocal/packed")
    p.add_argument("--kernels", default=None, metavar="FAMILY", help=KERNELS_HELP)
    if sampling:
        p.add_argument("-n", "--max-tokens", type=int, default=n_default, metavar="N",
                       help=f"most tokens to generate (default {n_default})")
        _add_sampling_args(p)


def _add_sampling_args(p):
    """One flag per SamplingParams field; an absent flag is None, which keeps SamplingParams' default."""
    from .sampling import sampling_fields
    for f in sampling_fields():
        flags = f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)
        p.add_argument(*flags, dest=f.name, type=type(f.default), default=None, metavar="X",
                       help=f"{f.metadata['help']} (default {f.default:g})")
    p.add_argument("--seed", type=int, default=None, help="seed for a repeatable draw")


def _load(args):
    import engine
    return engine.load(args.model, quant=args.quant, backend=args.backend, n_threads=args.threads,
                       n_ctx=args.n_ctx, packed_cache=args.packed_cache, kernels=args.kernels)


def _sampling(args) -> dict:
    from .sampling import SamplingParams
    return {name: getattr(args, name) for name in SamplingParams().as_kwargs()}


# ---------------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------------

def _generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _load(args)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    pieces = llm.stream(prompt, max_tokens=args.max_tokens, **_sampling(args))  # continues the prompt's text
    while True:
        try:
            sys.stdout.write(next(pieces))
            sys.stdout.flush()
        except StopIteration as done:
            res = done.value
            break
    sys.stdout.write("\n")
    sys.stdout.flush()
    t = res.timings
    print(f"prefill {t['prefill_tokens']} tokens at {t['prefill_tps']:.1f} tok/s, "
          f"decode {t['decode_tokens']} tokens at {t['decode_tps']:.1f} tok/s ({res.finish_reason})",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------------------------------

CHAT_HELP = "/reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer"


class _Conversation:
    """A chat's messages as text, and the exact token ids the model has seen, so each turn prefills only itself.

    Re-encoding the whole conversation each turn would give other ids wherever an answer's text does not
    round-trip through the tokenizer, and the KV cache would be recomputed from there. Mixtral v1 encodes every user
    turn on its own (`[INST] text [/INST]`) and every answer as its text then EOS, so the next prompt is the ids
    seen so far, EOS, and the new user turn's ids. Other chat formats (a GGUF's Jinja template) re-encode.
    """

    def __init__(self, tokenizer, system: str | None):
        self.tok = tokenizer
        self.system = [{"role": "system", "content": system}] if system else []
        self.reset()

    def reset(self) -> None:
        self.messages = list(self.system)
        self.seen: list[int] = []  # prompt and answer ids of the exchanges so far, EOS included

    def prompt(self, text: str) -> list[int]:
        user = {"role": "user", "content": text}
        if self.seen and self.tok.default_chat_format == "mixtral":
            return self.seen + self.tok.encode_chat([user])[1:]  # [1:]: no second BOS
        return self.tok.encode_chat(self.messages + [user])

    def add(self, text: str, prompt_ids: list[int], answer: str, answer_ids: list[int]) -> None:
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        self.seen = prompt_ids + answer_ids + [self.tok.eos_id]

    def drop_oldest(self) -> bool:
        """Forget the oldest exchange (the system prompt stays); False when there is none."""
        n = len(self.system)
        if len(self.messages) - n < 2:
            return False
        self.messages = self.messages[:n] + self.messages[n + 2:]
        self.seen = []  # re-encode from the messages
        return True


def _chat(args) -> int:
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    # Ctrl-C is how a chat user discards a line or stops an answer. A shell that starts a command in the background
    # passes SIGINT on ignored, and Python would keep ignoring it at the prompt (answers install their own handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    llm = _load(args)
    conv = _Conversation(llm.tokenizer, args.system)
    print(f"mixlocal chat with {llm.name}: {CHAT_HELP}", file=sys.stderr, flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt, Ctrl-C discards the line, as a shell does
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command in ("/exit", "/quit", "/bye"):
                return 0
            if command == "/reset":
                conv.reset()
                llm.reset()
                print("(conversation cleared)", file=sys.stderr, flush=True)
            else:
                print(f"unknown command {command}; {CHAT_HELP}", file=sys.stderr, flush=True)
            continue
        ids, dropped = conv.prompt(text), 0
        while len(ids) >= llm.n_ctx and conv.drop_oldest():
            ids, dropped = conv.prompt(text), dropped + 1
        if len(ids) >= llm.n_ctx:
            print(f"(the message alone exceeds the context of {llm.n_ctx} tokens)", file=sys.stderr, flush=True)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest exchanges to fit the context)", file=sys.stderr, flush=True)
        answer_ids, res = _answer(llm, ids, args)
        answer = llm.tokenizer.decode(answer_ids)
        if answer.strip():
            conv.add(text, ids, answer, answer_ids)
        # How much of the prompt was new is the number that shows the KV cache at work.
        head = f"[prompt {len(ids)} tokens, {llm.last_cached_tokens} cached; {len(answer_ids)} tokens"
        if res is None:
            print(f"{head}, stopped]", file=sys.stderr, flush=True)
        else:
            print(f"{head} at {res.timings['decode_tps']:.1f} tok/s]", file=sys.stderr, flush=True)


def _answer(llm, ids: list[int], args) -> tuple[list[int], object]:
    """Stream one answer to stdout. Returns its token ids and the GenerationResult, or None if Ctrl-C stopped it:
    the ids shown so far are kept either way, as the model has already read them.

    Ctrl-C sets a flag that is read between tokens. A KeyboardInterrupt raised while a numba kernel runs comes out
    as a SystemError ("returned a result with an exception set") in the middle of a forward pass; a flag stops the
    answer at a clean point. A second Ctrl-C interrupts at once, for a prefill that takes too long.
    """
    stop = threading.Event()

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    steps = llm.stream_steps(ids, max_tokens=max(1, min(args.max_tokens, llm.n_ctx - len(ids))), continuation=False,
                             **_sampling(args))
    tokens, res = [], None
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        while not stop.is_set():
            try:
                step = next(steps)
            except StopIteration as done:
                res = done.value
                break
            if step.token is not None:
                tokens.append(step.token)
            sys.stdout.write(step.text)
            sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
        steps.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return tokens, res


# ---------------------------------------------------------------------------------------------------------------------
# pull
# ---------------------------------------------------------------------------------------------------------------------

def _pull(args) -> int:
    from .sources.hub import pull
    folder = pull(args.repo, include=args.include, revision=args.revision, local_dir=args.local_dir)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(folder)
    from .levelbench import human_bytes
    print(f"{args.repo}: {human_bytes(size)} in {folder}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------------------------

def _info(args) -> int:
    from . import machine
    from .cache import KV_TYPES, KVCache
    from .levelbench import human_bytes, weight_stats
    from .loader import open_source
    if args.kv_type not in KV_TYPES:
        raise UsageError(f"mixlocal info: --kv-type must be one of {', '.join(KV_TYPES)}, got {args.kv_type!r}")
    if args.n_ctx <= 0:
        raise UsageError(f"mixlocal info: --n-ctx must be positive, got {args.n_ctx}")
    from quant.kernels import host_families, resolve_family
    kernels = {"chosen": resolve_family(args.kernels), "cpu_runs": list(host_families())}
    config, weights, tok, name = open_source(args.model)
    if args.quant:
        from .quantize import quantize_weights
        weights = quantize_weights(weights, args.quant, progress=_tqdm_progress(f"quantizing to {args.quant}"))
    st = weight_stats(weights)
    kv_per_token = KVCache(config, 1, args.kv_type).bytes_per_token  # the cache's own accounting, one position
    info = {"source": str(args.model) if args.model else "embedded default", "name": name,
            "quant": args.quant, "config": config.to_dict(), "tokenizer_vocab": tok.vocab_size, **st,
            "kv_type": args.kv_type, "kv_bytes_per_token": kv_per_token, "n_ctx": args.n_ctx,
            "kv_bytes_at_n_ctx": kv_per_token * args.n_ctx, "kernels": kernels, "machine": machine.describe()}
    if args.json:
        print(json.dumps(info, indent=2))
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
    m = info["machine"]
    print(f"machine: {m['cpu']}, {m['physical_cores']} cores ({m['logical_cpus']} logical), "
          f"{human_bytes(m['ram_bytes'])} memory, {human_bytes(m['available_bytes'])} available")
    print(f"kernels (numba backend): {kernels['chosen']}; this CPU runs {', '.join(kernels['cpu_runs'])}")
    return 0


def _tqdm_progress(desc: str):
    def wrap(items):
        from tqdm.auto import tqdm
        return tqdm(items, desc=desc, unit="tensor", disable=None, file=sys.stderr)
    return wrap


# ---------------------------------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------------------------------

def _quantize(args) -> int:
    from .levelbench import human_bytes, known_levels
    from .loader import open_source

    levels = known_levels()
    if args.type not in levels:
        raise UsageError(f"mixlocal quantize: unknown level {args.type!r}; choose from {','.join(levels)}")
    out = Path(args.output)
    if out.suffix != ".gguf":
        raise UsageError(f"mixlocal quantize: the output must be a .gguf file, got {out}")
    if out.exists() and not args.force:
        raise UsageError(f"mixlocal quantize: {out} exists; add --force to overwrite it")
    try:
        from .export import write_gguf
    except ImportError as e:
        raise RuntimeError(f"quantize needs engine.export, which this build lacks ({e})") from None
    _config, weights, tok, name = open_source(args.model)
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".part")  # a crash never leaves a truncated file under the real name
    try:
        write_gguf(weights, tok, tmp, args.type, name=name, progress=_tqdm_progress(f"quantizing to {args.type}"))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"{out}: {human_bytes(out.stat().st_size)} at {args.type} in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------------

def _bench(args) -> int:
    from . import levelbench as lb

    s = lb.BenchSettings(source=args.model, levels=lb.parse_levels(args.quants), n_prompt=args.n_prompt,
                         n_gen=args.n_gen, ppl_file=Path(args.ppl_file), ppl_ctx=args.ppl_ctx,
                         ppl_chunks=args.ppl_chunks, ref=args.ref, ref_file=args.ref_file, save_ref=args.save_ref,
                         backend=args.backend, threads=args.threads)
    s.check()
    for path in (args.json, args.csv, args.plot):  # fail now, not after an hour of measuring
        if path and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"mixlocal bench: cannot write {path}: no such directory")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise lb.BenchError("--plot needs matplotlib: pip install 'mixlocal[bench]'") from None
    report = lb.run_bench(s)
    print(lb.format_table(report))
    if args.json:
        lb.write_json(report, Path(args.json))
    if args.csv:
        lb.write_csv(report, Path(args.csv))
    if args.plot:
        lb.write_plot(report, Path(args.plot))
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
        from .server import add_serve_arguments, run_serve
    except ImportError as e:
        why = str(e)  # `e` itself is unbound once the except block ends
        p.set_defaults(func=lambda args: _unavailable("serve", why))
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)


def _unavailable(command: str, why: str) -> int:
    raise RuntimeError(f"{command} is not available in this build ({why})")


# ---------------------------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------------------------

def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="mixlocal", description="Run quantized Mixtral 8x7B Instruct locally, offline.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser("generate", help="stream a continuation of a prompt",
                       description="Stream a continuation of a prompt to stdout; a timing line goes to stderr.")
    _add_model_args(g, sampling=True, n_default=128)
    g.add_argument("-p", "--prompt", required=True, help="the prompt, or - to read it from stdin")
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="an interactive chat in the Mixtral Instruct format",
                       description=f"An interactive chat in the Mixtral Instruct format. {CHAT_HELP}.")
    _add_model_args(c, sampling=True, n_default=2048)
    c.add_argument("--system", default=None, help="a system prompt (Mixtral v1 puts it before the first message)")
    c.set_defaults(func=_chat)

    pl = sub.add_parser("pull", help="download a model from the Hugging Face hub into the local cache",
                        description="Download a model repository (or some of its files) through huggingface_hub.",
                        epilog=PULL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("repo", metavar="REPO", help="owner/name on the hub")
    pl.add_argument("--include", action="append", metavar="PATTERN",
                    help="download only files matching this glob (repeatable), e.g. '*Q4_K_M.gguf'")
    pl.add_argument("--revision", default=None, help="branch, tag or commit (default main)")
    pl.add_argument("--local-dir", default=None, help="download into this folder instead of the cache")
    pl.set_defaults(func=_pull)

    i = sub.add_parser("info", help="config, tensor formats, sizes and KV cache cost of a model",
                       description="Config, tensor formats with counts, bytes, bits per weight, and KV cache bytes.")
    i.add_argument("model", metavar="SRC", nargs="?", default=None, help=MODEL_HELP)
    i.add_argument("--quant", default=None, metavar="LEVEL", help="show the sizes after quantizing to LEVEL")
    i.add_argument("--n-ctx", type=int, default=32768, metavar="N", help="context for the KV total (default 32768)")
    i.add_argument("--kv-type", default="f16", help="KV cache element type: f16 (default), f32 or q8_0")
    i.add_argument("--kernels", default=None, metavar="FAMILY", help=KERNELS_HELP)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=_info)

    q = sub.add_parser("quantize", help="write a model as a GGUF file at a quantization level",
                       description="Quantize a model and write it as a GGUF file that llama.cpp also loads.")
    q.add_argument("model", metavar="SRC", help=MODEL_HELP)
    q.add_argument("output", metavar="OUT.gguf")
    q.add_argument("--type", required=True, metavar="LEVEL", help="f16, q8_0, q6_k, q4_k_m, q4_0, q4_moe, ...")
    q.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    q.set_defaults(func=_quantize)

    command = next((a for a in (argv or []) if not a.startswith("-")), None)
    _add_serve_parser(sub, wanted=command == "serve")

    b = sub.add_parser("bench", help="measure quantization levels against each other on this machine",
                       description="Each level is loaded in its own process and measured for size, load time, "
                                   "prefill and decode speed, peak memory, and quality against a reference "
                                   "(perplexity, KL divergence, top-1 agreement).")
    b.add_argument("-m", "--model", default=None, metavar="SRC", help=MODEL_HELP)
    b.add_argument("--quants", default="f16,q8_0,q6_k,q4_k_m,q4_0,q4_moe,q3_k_m,q2_k",
                   help="comma-separated levels (default: %(default)s)")
    b.add_argument("-p", "--n-prompt", type=int, default=512, metavar="N", help="prefill tokens (default 512)")
    b.add_argument("-n", "--n-gen", type=int, default=128, metavar="N", help="decoded tokens (default 128)")
    b.add_argument("--ppl-file", default=None, metavar="TEXT",
                   help="text for perplexity (default: a public-domain chapter shipped with mixlocal)")
    b.add_argument("--ppl-ctx", type=int, default=512, metavar="N", help="tokens per perplexity chunk (default 512)")
    b.add_argument("--ppl-chunks", type=int, default=None, metavar="N", help="score at most N chunks")
    b.add_argument("--ref", default=None, metavar="LEVEL",
                   help="the reference level (default: the least quantized level of the run)")
    b.add_argument("--save-ref", default=None, metavar="FILE", help="store the reference's top-k log-probabilities")
    b.add_argument("--ref-file", default=None, metavar="FILE", help="compare against a stored reference")
    b.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    b.add_argument("--csv", default=None, metavar="OUT", help="write the results as CSV")
    b.add_argument("--plot", default=None, metavar="OUT.png", help="plot quality and speed against size")
    b.add_argument("--backend", default="auto", help="auto (default), numba or mlx")
    b.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: physical cores)")
    b.set_defaults(func=_bench)
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
        if getattr(args, "command", None) == "bench" and args.ppl_file is None:
            from .levelbench import DEFAULT_PPL_TEXT
            args.ppl_file = str(DEFAULT_PPL_TEXT)
        return args.func(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
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

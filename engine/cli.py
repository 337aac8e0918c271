"""`mixlocal` command line."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _generate(args) -> int:
    import engine
    llm = engine.load(args.model, quant=args.quant, backend=args.backend, n_threads=args.threads,
                      n_ctx=args.n_ctx)
    gen = llm.stream(args.prompt, max_tokens=args.n, temperature=args.temp, top_p=args.top_p, seed=args.seed)
    sys.stdout.write(args.prompt)
    while True:
        try:
            piece = next(gen)
        except StopIteration as done:
            res = done.value
            break
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    t = res.timings
    print(f"prefill {t['prefill_tokens']} tokens at {t['prefill_tps']:.1f} tok/s, "
          f"decode {t['decode_tokens']} tokens at {t['decode_tps']:.1f} tok/s ({res.finish_reason})",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixlocal", description="Run quantized Mixtral locally.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a continuation of a prompt")
    g.add_argument("-m", "--model", default=None, help="HF directory, .gguf file or hub id (default: embedded)")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", type=int, default=128, help="tokens to generate")
    g.add_argument("--temp", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--quant", default=None)
    g.add_argument("--backend", default="auto")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--n-ctx", type=int, default=4096)
    g.set_defaults(func=_generate)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"mixlocal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`mixlocal chat`: an interactive chat in the Mixtral Instruct format, one exchange prefilled at a time."""
from __future__ import annotations

import signal
import sys
import threading

from .common import load_model, sampling_kwargs

__all__ = ["CHAT_HELP", "command"]

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


def command(args) -> int:
    from .main import check_sampling_args
    check_sampling_args(args, "chat")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    # Ctrl-C is how a chat user discards a line or stops an answer. A shell that starts a command in the background
    # passes SIGINT on ignored, and Python would keep ignoring it at the prompt (answers install their own handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    llm = load_model(args)
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
                             **sampling_kwargs(args))
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

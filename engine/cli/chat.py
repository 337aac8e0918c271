"""`mixlocal chat`: an interactive chat in the Mixtral Instruct format, one exchange prefilled at a time.

The commands follow ollama's (`/set`, `/save`, `/load`, `/help`, three double quotes around a message of several
lines), the ones a local-model user already types. With stdin not a terminal (`echo hi | mixlocal chat`) no prompt is
written: stdout carries the answers only, one per message.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from .common import UsageError, load_model, sampling_kwargs
from .compile_notice import watch_compilation

__all__ = ["CHAT_HELP", "command"]

CHAT_HELP = "/help lists the commands, /exit (or Ctrl-D) quits, Ctrl-C stops an answer"
COMMANDS_HELP = '''commands:
  /help                     this list
  /set PARAMETER VALUE      change a sampling parameter, e.g. /set temperature 0.2 (/set alone shows them)
  /save FILE                write the conversation as JSON messages
  /load FILE                continue a conversation saved by /save (a JSON list of role/content messages)
  /reset                    forget the conversation
  /exit, /bye, Ctrl-D       quit
  """                       start and end a message of several lines
  Ctrl-C                    stop an answer; at the prompt, discard the line'''
# names a user may type for a parameter, besides its own (ollama's and the command line's)
_ALIASES = {"temp": "temperature", "num_predict": "max_tokens", "n": "max_tokens", "max-tokens": "max_tokens"}


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

    def replace(self, messages: list[dict]) -> None:
        """Continue from saved messages: a leading system message becomes the system prompt."""
        n = 1 if messages and messages[0]["role"] == "system" else 0
        self.system = messages[:n]
        self.messages = list(messages)
        self.seen = []  # re-encode from the messages; the KV cache keeps whatever prefix still matches

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
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    # Ctrl-C is how a chat user discards a line or stops an answer. A shell that starts a command in the background
    # passes SIGINT on ignored, and Python would keep ignoring it at the prompt (answers install their own handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with watch_compilation() as watch:
        return _session(args, interactive, watch)


def _session(args, interactive: bool, watch) -> int:
    llm = load_model(args)
    watch.finish()
    conv = _Conversation(llm.tokenizer, args.system)
    if interactive:
        print(f"mixlocal chat with {llm.name}: {CHAT_HELP}", file=sys.stderr, flush=True)
    while True:
        try:
            text = _read_message(interactive)
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:  # at the prompt, Ctrl-C discards the line, as a shell does
            print()
            continue
        if not text:
            continue
        if text.startswith("/"):
            if _slash_command(text, args, llm, conv):
                return 0
            continue
        _exchange(llm, conv, text, args, watch)


def _read_message(interactive: bool) -> str:
    """One message: a line, or the lines between two lines of three double quotes (ollama's multi-line input). EOFError at the end."""
    first = _read_line(">>> ", interactive).strip()
    if not first.startswith('"""'):
        return first
    lines, rest = [], first[3:]
    while not rest.rstrip().endswith('"""'):
        lines.append(rest)
        rest = _read_line("... ", interactive)
    lines.append(rest.rstrip()[:-3])
    return "\n".join(lines).strip()


def _read_line(prompt: str, interactive: bool) -> str:
    if interactive:
        return input(prompt)
    line = sys.stdin.readline()  # no prompt: piped input gets the answers alone on stdout
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _slash_command(text: str, args, llm, conv: _Conversation) -> bool:
    """Run a /command; True when it ends the chat."""
    command, _, rest = text.partition(" ")
    rest = rest.strip()
    if command in ("/exit", "/quit", "/bye"):
        return True
    if command in ("/help", "/?"):
        _note(COMMANDS_HELP)
    elif command == "/reset":
        conv.reset()
        llm.reset()
        _note("(conversation cleared)")
    elif command == "/set":
        _set(rest, args)
    elif command == "/save":
        if not rest:
            _note("usage: /save FILE")
        else:
            try:
                Path(rest).write_text(json.dumps(conv.messages, indent=2, ensure_ascii=False) + "\n")
                _note(f"(saved {len(conv.messages)} messages to {rest})")
            except OSError as e:
                _note(f"cannot write {rest}: {e.strerror}")
    elif command == "/load":
        if not rest:
            _note("usage: /load FILE")
        else:
            try:
                conv.replace(read_messages(Path(rest)))
                _note(f"(loaded {len(conv.messages)} messages from {rest})")
            except UsageError as e:
                _note(str(e))
    else:
        _note(f"unknown command {command}; {CHAT_HELP}")
    return False


def _set(rest: str, args) -> None:
    """`/set temperature 0.2` (or ollama's `/set parameter temperature 0.2`), checked as the flags are."""
    from ..sampling import SamplingParams
    words = rest.split()
    if words[:1] == ["parameter"]:
        words = words[1:]
    if not words:
        shown = {**sampling_kwargs(args), "max_tokens": args.max_tokens}
        _note("  ".join(f"{k}={'default' if v is None else v}" for k, v in shown.items()))
        return
    if len(words) != 2:
        _note("usage: /set PARAMETER VALUE, e.g. /set temperature 0.2")
        return
    name, value = _ALIASES.get(words[0], words[0]).replace("-", "_"), words[1]
    known = [*SamplingParams().as_kwargs(), "max_tokens"]
    if name not in known:
        _note(f"unknown parameter {words[0]!r}; the parameters are {', '.join(known)}")
        return
    try:
        number = int(value) if name in ("seed", "max_tokens", "top_k", "repeat_last_n") else float(value)
        if name == "max_tokens":
            if number <= 0:
                raise ValueError(f"max_tokens must be positive, got {number}")
        else:
            SamplingParams().with_(**{**sampling_kwargs(args), name: number})
    except ValueError as e:
        _note(f"cannot set {name} to {value}: {e}")
        return
    setattr(args, name, number)
    _note(f"(set {name} to {number})")


def read_messages(path: Path) -> list[dict]:
    """A conversation saved by /save: a JSON list of {"role", "content"} (or an object holding one as "messages")."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of messages")
    for i, m in enumerate(data):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise UsageError(f"{path}: message {i} needs a role (system, user or assistant) and a text content")
        if m["role"] == "system" and i:
            raise UsageError(f"{path}: message {i}: a system message may only come first")
    return [{"role": m["role"], "content": m["content"]} for m in data]


def _exchange(llm, conv: _Conversation, text: str, args, watch) -> None:
    ids, dropped = conv.prompt(text), 0
    while len(ids) >= llm.n_ctx and conv.drop_oldest():
        ids, dropped = conv.prompt(text), dropped + 1
    if len(ids) >= llm.n_ctx:
        _note(f"(the message alone exceeds the context of {llm.n_ctx} tokens)")
        return
    if dropped:
        _note(f"(dropped the {dropped} oldest exchanges to fit the context)")
    at_start = watch.seconds
    answer_ids, res, at_first = _answer(llm, ids, args, watch)
    watch.finish()  # the first answers of a fresh install compile kernels: say how long that took
    answer = llm.tokenizer.decode(answer_ids)
    if answer.strip():
        conv.add(text, ids, answer, answer_ids)
    # How much of the prompt was new is the number that shows the KV cache at work.
    head = f"[prompt {len(ids)} tokens, {llm.last_cached_tokens} cached; {len(answer_ids)} tokens"
    if res is None:
        _note(f"{head}, stopped]")
    else:
        t = watch.excluded(res.timings, at_first - at_start, watch.seconds - at_first)
        _note(f"{head} at {t['decode_tps']:.1f} tok/s]")


def _answer(llm, ids: list[int], args, watch) -> tuple[list[int], object, float]:
    """Stream one answer to stdout. Returns its token ids, the GenerationResult (None if Ctrl-C stopped it: the ids
    shown so far are kept either way, as the model has already read them) and watch.seconds when the prefill ended.

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
    tokens, res, at_first, held = [], None, None, []
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        while not stop.is_set():
            try:
                step = next(steps)
            except StopIteration as done:
                res = done.value
                break
            if at_first is None:
                at_first = watch.seconds
            if step.token is not None:
                tokens.append(step.token)
            held.append(step.text)
            if watch.spinning and len(held) < 2:  # as generate does: the next step compiles the decode kernels
                continue
            watch.quiet()
            sys.stdout.write("".join(held))
            sys.stdout.flush()
            held = []
    finally:
        signal.signal(signal.SIGINT, previous)
        steps.close()
    watch.quiet()
    sys.stdout.write("".join(held))
    sys.stdout.write("\n")
    sys.stdout.flush()
    return tokens, res, watch.seconds if at_first is None else at_first

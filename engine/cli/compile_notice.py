"""The one-time "compiling kernels" notice, and the compile time kept out of the speed line.

numba compiles a kernel the first time it runs with new argument types, unless the kernel cache (mixlocal.paths)
already holds it. A fresh install therefore spends 15-25 s compiling inside its first prefill and decode steps, which
looked like a hang and then like a speed of 0.1 tok/s. numba announces each real compilation as a "numba:compile"
event (a cache hit raises none), so a listener can say so as it starts, show a spinner on a terminal, and count the
seconds it took, which the commands subtract from their timings.
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import time

try:
    from numba.core.event import Listener as _Listener
except ImportError:  # the MLX backend without numba: nothing compiles here
    _Listener = object

__all__ = ["CompileWatch", "watch_compilation"]

_FRAMES = "|/-\\"
# issue 17 saw 15-25 s on a fresh install; once one compilation has been timed here, its time is the estimate
_DEFAULT_ESTIMATE_S = 20
_RECORD = "mixlocal-compile-seconds.json"


class CompileWatch(_Listener):
    """Counts numba's top-level compilations and their wall time; the first one prints the notice."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.seconds = 0.0
        self.count = 0
        self._depth = 0  # a kernel's callees compile inside it: only the outermost compilation is timed
        self._start = 0.0
        self._first = None
        self._reported = 0.0  # seconds already announced by finish()
        self._spinner = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def on_start(self, event) -> None:
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return
            self._start = time.perf_counter()
            if self._first is None:
                self._first = self._start
                self._announce()

    def on_end(self, event) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - self._start
                self.count += 1

    def _announce(self) -> None:
        from mixlocal.paths import numba_cache_dir
        est = _estimate(numba_cache_dir())
        self._line = f"mixlocal: compiling kernels for this CPU (once, about {est:.0f} s; kept in {numba_cache_dir()})"
        if self.stream.isatty():
            self._spinner = threading.Thread(target=self._spin, daemon=True)
            self._spinner.start()
        else:
            print(self._line, file=self.stream, flush=True)

    def _spin(self) -> None:
        i = 0
        while not self._stop.wait(0.2):
            with self._lock:
                busy = self._depth > 0
                done = self.seconds - self._reported + (time.perf_counter() - self._start if busy else 0.0)
            self.stream.write(f"\r{self._line} {_FRAMES[i % 4] if busy else ' '} {done:.0f} s")
            self.stream.flush()
            i += 1

    @property
    def spinning(self) -> bool:
        """A spinner is on the terminal: text written now would share its line."""
        return self._spinner is not None

    def quiet(self) -> None:
        """Stop redrawing the spinner line (and clear it) before the command writes its own text: a spinner that
        returns to the start of the line would write over a streamed answer. Kernels that compile after this are
        still counted, and finish() still reports them."""
        if self._spinner is not None:
            self._stop.set()
            self._spinner.join()
            self._spinner = None
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def finish(self) -> None:
        """End the spinner and say what the compilations cost; remember it as the next estimate. A later compilation
        (another format's kernels) announces itself again."""
        if self._first is None:
            return
        self.quiet()
        print(f"mixlocal: compiled {self.count} kernels in {self.seconds - self._reported:.1f} s; later runs load "
              "them from the cache", file=self.stream, flush=True)
        from mixlocal.paths import numba_cache_dir
        with contextlib.suppress(OSError):
            (numba_cache_dir() / _RECORD).write_text(json.dumps({"seconds": round(self.seconds - self._reported, 1)}))
        self._first, self._spinner, self._stop = None, None, threading.Event()
        self._reported, self.count = self.seconds, 0

    @staticmethod
    def excluded(timings: dict, prefill_compile_s: float, decode_compile_s: float) -> dict:
        """timings with the seconds spent compiling inside the prefill and inside the decode steps taken out."""
        out = dict(timings)
        for phase, spent in (("prefill", prefill_compile_s), ("decode", decode_compile_s)):
            s = out.get(f"{phase}_s")
            if spent <= 0 or not s:
                continue
            s = max(s - spent, 1e-9)
            out[f"{phase}_s"] = s
            out[f"{phase}_tps"] = out[f"{phase}_tokens"] / s if out.get(f"{phase}_tokens") else 0.0
        return out


def _estimate(folder) -> float:
    try:
        return float(json.loads((folder / _RECORD).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return _DEFAULT_ESTIMATE_S


@contextlib.contextmanager
def watch_compilation(stream=None):
    """Listen for numba compilations for the duration of the block; the notice ends when the block does."""
    watch = CompileWatch(stream)
    if _Listener is object:
        yield watch
        return
    from numba.core import event
    event.register("numba:compile", watch)
    try:
        yield watch
    finally:
        event.unregister("numba:compile", watch)
        watch.finish()

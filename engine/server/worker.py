"""The server's model worker: one thread runs every model call, jobs queue in arrival order, and each job streams
its steps back to the asyncio event loop, which therefore never waits on the model.

One thread, because numba's "workqueue" threading layer (its fallback where no OpenMP runtime is found, as on a
plain macOS install) aborts the process when two threads enter parallel kernels at once (ARCHITECTURE.md, Server).
A process-wide lock keeps that true even when one process serves several apps (tests do).
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Cancelled",
    "Failed",
    "Finished",
    "GenerationJob",
    "ModelWorker",
    "Piece",
    "TokenLogprob",
    "token_logprob",
]

_MODEL_CALLS = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------------
# Events a job sends back to the event loop
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token id, logprob), most likely first


@dataclass
class Piece:
    text: str                            # possibly empty: held-back bytes or a possible stop string
    logprob: TokenLogprob | None = None  # set when the request asked for logprobs and the step made a token


@dataclass
class Finished:
    result: object                       # engine.llm.GenerationResult


@dataclass
class Failed:
    error: BaseException


@dataclass
class Cancelled:
    pass


def token_logprob(logits: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    """The model's own log-probabilities (before temperature and filters), as OpenAI reports them."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    top = []
    if top_n:
        idx = np.argpartition(-logp, top_n - 1)[:top_n]
        idx = idx[np.argsort(-logp[idx], kind="stable")]
        top = [(int(i), float(logp[i])) for i in idx]
    return TokenLogprob(int(token), float(logp[token]), top)


class GenerationJob:
    """One request's generation. Made on the event loop; run by the worker; cancellable from either side.
    continuation: the text continues the prompt (completions), rather than answering it (chat)."""

    def __init__(self, prompt_ids: list[int], generate_kwargs: dict, top_logprobs: int | None = None, *,
                 continuation: bool = False):
        self.prompt_ids = prompt_ids
        self.generate_kwargs = generate_kwargs
        self.top_logprobs = top_logprobs
        self.continuation = continuation
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def post(self, event) -> None:
        """Called on the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:      # the event loop is closed: nobody is listening any more
            self._cancel.set()

    async def events(self) -> AsyncIterator[Piece | Finished | Failed | Cancelled]:
        """Every event of the job, ending with its one Finished, Failed or Cancelled."""
        while True:
            event = await self._events.get()
            yield event
            if not isinstance(event, Piece):
                return


class ModelWorker:
    """Owns the model for one app: the only thread that calls it."""

    def __init__(self, llm):
        self.llm = llm
        self._jobs: queue.Queue[GenerationJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._current: GenerationJob | None = None
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}

    # ------------------------------------------------------------------ control, from the event loop
    def submit(self, job: GenerationJob) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mixlocal-model", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel what is queued and running, and end the thread."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.post(Cancelled())
        current = self._current
        if current is not None:
            current.cancel()
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled:      # its client left while it waited: it costs nothing
                self.counts["cancelled"] += 1
                job.post(Cancelled())
                continue
            with _MODEL_CALLS:
                self._current = job
                try:
                    self._execute(job)
                finally:
                    self._current = None

    def _execute(self, job: GenerationJob) -> None:
        steps = self.llm.stream_steps(job.prompt_ids, continuation=job.continuation, **job.generate_kwargs)
        try:
            while True:
                if job.cancelled:  # checked between tokens: a client that hangs up stops its generation here
                    self.counts["cancelled"] += 1
                    job.post(Cancelled())
                    return
                try:
                    step = next(steps)
                except StopIteration as done:
                    self.counts["finished"] += 1
                    job.post(Finished(done.value))
                    return
                logprob = None
                if job.top_logprobs is not None and step.token is not None:
                    logprob = token_logprob(step.logits, step.token, job.top_logprobs)
                job.post(Piece(step.text, logprob))
        except Exception as e:  # noqa: BLE001 - reported to the client; the worker keeps serving
            self.counts["failed"] += 1
            job.post(Failed(e))
        finally:
            steps.close()

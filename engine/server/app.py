"""OpenAI-compatible local server: code written for hosted Mixtral runs here once its base URL points at us.

    mixlocal serve -m SRC [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--alias NAME ...] [--n-ctx N]
    python -m mixlocal.engine.server -m SRC ...

Endpoints: POST /v1/chat/completions, POST /v1/completions (both also streamed as server-sent events),
GET /v1/models, GET /v1/models/{id}, GET /health. The /v1 prefix may be left out, as llama.cpp allows.

Starlette on uvicorn. The event loop only parses, validates, tokenizes (in a thread) and writes; the model runs on
one worker thread (worker.py), requests queue for it in arrival order, and a client that disconnects cancels its
generation between two tokens. Request checks live in requests.py, prompts and context shift in prompts.py,
response bodies in responses.py.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import sys
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..tools import parse_answer
from .prompts import Prompt, chat_prompt, completion_prompt
from .requests import (
    APIError,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
)
from .responses import SSE_DONE, ResponseShape, sse
from .worker import (
    Cancelled,
    Failed,
    Finished,
    GenerationJob,
    ModelWorker,
    Piece,
)

__all__ = ["SEED_MODEL_ID", "add_serve_arguments", "create_app", "main", "run_serve"]

SEED_MODEL_ID = "mistralai/mixtral-8x7b-instruct"   # the id on OpenRouter's Mixtral page, routed here by default

log = logging.getLogger("mixlocal.server")


class _ClientGone(Exception):
    """The client disconnected and its generation was cancelled."""


class _Service:
    """The routes of one app, over one model and its worker."""

    def __init__(self, llm, *, api_key: str | None, aliases, context_shift: bool, seed_alias: bool,
                 default_max_tokens: int | None):
        self.llm = llm
        self.worker = ModelWorker(llm)
        self.api_key = api_key
        self.context_shift = context_shift
        self.default_max_tokens = default_max_tokens
        ids = [llm.name, *aliases] + ([SEED_MODEL_ID] if seed_alias else [])
        self.model_ids = list(dict.fromkeys(ids))
        self.started = int(time.time())

    # ------------------------------------------------------------------ request checks
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "no API key given: send the header 'Authorization: Bearer <key>' with the key "
                                "this server was started with (--api-key)", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def resolve_model(self, model_id: str) -> None:
        if model_id not in self.model_ids:
            raise APIError(404, f"the model {model_id!r} does not exist on this server; it serves {self.llm.name!r}, "
                                f"which these ids reach: {', '.join(self.model_ids)}",
                           code="model_not_found", param="model")

    async def read_body(self, request: Request) -> dict:
        self.authorize(request)
        return parse_json_body(await request.body())

    def _max_tokens(self, req: GenerationRequest, prompt: Prompt) -> int:
        room = self.llm.n_ctx - len(prompt.ids)   # generation stops at the end of the context in any case
        wanted = req.max_tokens if req.max_tokens is not None else self.default_max_tokens
        return room if wanted is None else min(wanted, room)

    # ------------------------------------------------------------------ routes
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.llm.name, "n_ctx": self.llm.n_ctx,
                             "busy": self.worker.busy, "queued": self.worker.queued, **self.worker.counts})

    def _model_card(self) -> dict:
        return {"id": self.llm.name, "object": "model", "created": self.started, "owned_by": "mixlocal",
                "aliases": [m for m in self.model_ids if m != self.llm.name], "n_ctx": self.llm.n_ctx}

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self.authorize(request)
        self.resolve_model(request.path_params["model_id"])
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        body = await self.read_body(request)
        req: ChatRequest = parse_chat_request(body)
        self.resolve_model(req.model)
        prompt = await asyncio.to_thread(
            lambda: chat_prompt(self.llm.tokenizer, req.messages, self.llm.n_ctx, max_tokens=req.max_tokens,
                                context_shift=self.context_shift))
        return await self._respond(request, req, prompt, "chat")

    async def completions(self, request: Request) -> Response:
        body = await self.read_body(request)
        req: CompletionRequest = parse_completion_request(body)
        self.resolve_model(req.model)
        prompt = await asyncio.to_thread(
            lambda: completion_prompt(self.llm.tokenizer, req.prompt, self.llm.n_ctx))
        return await self._respond(request, req, prompt, "completion")

    # ------------------------------------------------------------------ generation
    async def _respond(self, request: Request, req: GenerationRequest, prompt: Prompt, kind: str) -> Response:
        note = prompt.shift_note(self.llm.n_ctx)
        if note:
            log.warning(note["message"])
        shape = ResponseShape(kind, self.llm.name, self.llm.tokenizer, {"context_shift": note} if note else None)
        if "response_format" in req.structure or "grammar" in req.structure:
            await asyncio.to_thread(self._check_constraint, req.structure)
        kwargs = {"max_tokens": self._max_tokens(req, prompt), **req.sampling_kwargs()}
        jobs = []
        for i in range(req.n):  # choice i draws with seed + i, so that choices differ and each is repeatable
            seeded = kwargs if i == 0 or kwargs.get("seed") is None else {**kwargs, "seed": kwargs["seed"] + i}
            jobs.append(GenerationJob(prompt.ids, seeded, req.top_logprobs, continuation=(kind == "completion")))
        for job in jobs:
            self.worker.submit(job)   # queued now, so that requests are served in the order they arrived
        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            if note:
                headers["X-Context-Shift"] = f"dropped {note['dropped_messages']} messages"
            return StreamingResponse(self._stream(request, req, jobs, shape), media_type="text/event-stream",
                                     headers=headers)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, *jobs))
        choices, results = [], []
        try:
            for index, job in enumerate(jobs):
                texts, entries = [], ([] if req.top_logprobs is not None else None)
                async for text, lps, result in _texts(job):
                    if result is not None:
                        break
                    texts.append(text)
                    if entries is not None:
                        entries.extend(lps)
                text, calls, finish = "".join(texts), None, result.finish_reason
                if getattr(req, "tools", None) is not None and req.tools.active:
                    text, calls, finish = parse_answer(text, finish)
                body = shape.complete(text, finish, result.usage, result.timings, entries, calls)
                choices.append({**body["choices"][0], "index": index})
                results.append(result)
        except _ClientGone:
            return Response(status_code=499)   # nobody reads it; nginx's code for "client closed request"
        finally:
            watcher.cancel()
            for job in jobs:
                job.cancel()
        return JSONResponse({**body, "choices": choices, "usage": _total_usage(results),
                             "timings": results[0].timings if len(results) == 1 else [r.timings for r in results]})

    def _check_constraint(self, structure: dict) -> None:
        """A 400 now for a grammar that compiles but allows no output on this vocabulary, before a stream opens."""
        from ..constraints import Constraint, ConstraintError, grammar_for
        param = "grammar" if "grammar" in structure else "response_format"
        try:
            Constraint(self.llm.tokenizer, grammar_for(structure.get("response_format"), structure.get("grammar")),
                       self.llm.config.vocab_size)
        except ConstraintError as e:
            raise APIError(400, f"'{param}': {e}", param=param) from None

    async def _stream(self, request: Request, req: GenerationRequest, jobs: list[GenerationJob],
                      shape: ResponseShape):
        watcher = asyncio.create_task(_cancel_on_disconnect(request, *jobs))
        usage_too = req.include_usage
        results = []
        try:
            for index, job in enumerate(jobs):
                if shape.kind == "chat":
                    yield sse(shape.chunk(None, first=True, include_usage=usage_too, index=index))
                tools = getattr(req, "tools", None)
                held = [] if tools is not None and tools.active else None  # a tool answer is known once whole
                async for text, lps, result in _texts(job):
                    if result is not None:
                        break
                    if held is not None:
                        held.append(text)
                        continue
                    yield sse(shape.chunk(text, entries=lps if req.top_logprobs is not None else None,
                                          include_usage=usage_too, index=index))
                finish = result.finish_reason
                if held is not None:
                    content, calls, finish = parse_answer("".join(held), finish)
                    if calls:
                        yield sse(shape.chunk(None, tool_calls=calls, include_usage=usage_too, index=index))
                    elif content:
                        yield sse(shape.chunk(content, include_usage=usage_too, index=index))
                final = shape.chunk(None, finish_reason=finish, include_usage=usage_too, index=index)
                final["timings"] = result.timings
                yield sse(final)
                results.append(result)
            if usage_too:
                yield sse(shape.usage_chunk(_total_usage(results)))
            yield SSE_DONE
        except _ClientGone:
            return
        except APIError as e:   # the status line is long gone: report in the stream, as OpenAI does
            yield sse(e.body())
            yield SSE_DONE
        finally:
            watcher.cancel()
            for job in jobs:
                job.cancel()


def _total_usage(results) -> dict:
    """One usage for n choices: the prompt counts once (later choices reuse its cache), completions add up."""
    usage = dict(results[0].usage)
    usage["completion_tokens"] = sum(r.usage["completion_tokens"] for r in results)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


async def _texts(job: GenerationJob):
    """(text, logprobs, None) for each non-empty piece of text, then (None, None, result).

    A token whose text is held back (part of a UTF-8 character, or maybe the start of a stop string) has its
    logprob sent with the next text; tokens whose text never appears (a completed stop string) are not reported.
    """
    pending = []
    async for event in job.events():
        if isinstance(event, Piece):
            if event.logprob is not None:
                pending.append(event.logprob)
            if event.text:
                yield event.text, pending, None
                pending = []
        elif isinstance(event, Finished):
            yield None, None, event.result
        elif isinstance(event, Cancelled):
            raise _ClientGone()
        elif isinstance(event, Failed):
            err = event.error
            if isinstance(err, ValueError):
                raise APIError(400, str(err)) from err
            log.error("generation failed", exc_info=err)
            raise APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error",
                           code="internal_error") from err


async def _cancel_on_disconnect(request: Request, *jobs: GenerationJob) -> None:
    """Wait for the client to go away, then cancel its jobs (queued or running)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for job in jobs:
            job.cancel()


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------

async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status,
                        headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(APIError(exc.status_code, message, code=code).body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                                 code="internal_error").body(), status_code=500)


def create_app(llm, *, api_key: str | None = None, aliases=(), context_shift: bool = False,
               seed_alias: bool = True, default_max_tokens: int | None = None) -> Starlette:
    """The ASGI app serving `llm`. Model ids that reach it: llm.name, each alias, and (seed_alias) the id on
    OpenRouter's Mixtral page. default_max_tokens limits answers of requests that set no max_tokens (None: until
    EOS or the end of the context)."""
    if default_max_tokens is not None and default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be a positive integer, got {default_max_tokens!r}")
    service = _Service(llm, api_key=api_key or None, aliases=tuple(aliases), context_shift=context_shift,
                       seed_alias=seed_alias, default_max_tokens=default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.worker.stop)

    routes = [Route("/health", service.health, methods=["GET"])]
    for prefix in ("/v1", ""):
        routes += [Route(f"{prefix}/chat/completions", service.chat_completions, methods=["POST"]),
                   Route(f"{prefix}/completions", service.completions, methods=["POST"]),
                   Route(f"{prefix}/models", service.models, methods=["GET"]),
                   Route(prefix + "/models/{model_id:path}", service.model, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.service = service
    return app


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `mixlocal serve` (engine/cli.py) and `python -m mixlocal.engine.server`
# ---------------------------------------------------------------------------------------------------------------------

def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default=None, metavar="MODEL",
                        help="HF directory, .gguf file or hub id (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, metavar="N", help="port to listen on (default 8080)")
    parser.add_argument("--api-key", default=os.environ.get("MIXLOCAL_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $MIXLOCAL_API_KEY, else none)")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME",
                        help="another model id that reaches the loaded model (repeatable)")
    parser.add_argument("--no-seed-alias", action="store_true",
                        help=f"do not route {SEED_MODEL_ID!r} to the loaded model")
    parser.add_argument("-c", "--n-ctx", type=int, default=32768, metavar="N",
                        help="context in tokens; KV memory is committed only as it fills (default 32768)")
    parser.add_argument("--context-shift", action="store_true",
                        help="drop the oldest turns (keeping system prompts) of a conversation that outgrows the "
                             "context, instead of answering 400")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="answer limit for requests that set none (default: until EOS or the context is full)")
    parser.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                        help="compute threads (default: physical cores)")
    parser.add_argument("--kv-type", default="f16", choices=["f16", "f32", "q8_0"],
                        help="KV cache element type (default f16)")
    parser.add_argument("--no-packed-cache", dest="packed_cache", action="store_const", const=False, default=None,
                        help="repack Q4_0/Q8_0/Q4_K weights in memory instead of mapping ~/.cache/mixlocal/packed")
    parser.add_argument("--kernels", default=None, metavar="FAMILY",
                        help="numba kernel family: avx512vnni, avxvnni, avx2 or portable (default: $MIXLOCAL_KERNELS, "
                             "else the fastest this CPU runs)")
    parser.add_argument("--mem-budget", default=None, metavar="SIZE",
                        help="memory the model may use, e.g. 16GiB (default: what is available now); experts that "
                             "do not fit are read from the file when needed")
    parser.add_argument("--expert-policy", default=None, choices=("lfru", "lfu", "lru"),
                        help="which expert leaves memory first under --mem-budget (default lfru)")
    parser.add_argument("--backend", default="auto", choices=["auto", "numba", "mlx"],
                        help="auto (default: mlx on Apple Silicon, else numba), numba or mlx")
    parser.add_argument("--quant", default=None, type=str.lower, metavar="LEVEL",
                        help="quantize the weights to LEVEL in memory at load (default: as the file stores them)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default info)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a host name: it may resolve anywhere


def run_serve(args) -> int:
    """Load the model and serve it until interrupted. Returns the exit code."""
    import uvicorn

    from mixlocal import engine

    if not is_loopback(args.host) and not args.api_key:
        print(f"mixlocal: warning: binding {args.host} without --api-key: anyone who can reach this machine on port "
              f"{args.port} can use the model. Set --api-key (or MIXLOCAL_API_KEY), or bind 127.0.0.1.",
              file=sys.stderr)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    # The server's event loop needs the GIL once per token, and spinning OpenMP threads starve it on a busy machine.
    # Nothing to set here: the numba backend bounds the spinning itself (engine/backends/numba/backend.py:
    # limit_openmp_spinning), and an explicit setting of the user's still wins.
    llm = engine.load(args.model, quant=args.quant, backend=args.backend, n_ctx=args.n_ctx, n_threads=args.threads,
                      kv_type=args.kv_type, packed_cache=args.packed_cache, kernels=args.kernels,
                      mem_budget=args.mem_budget, expert_policy=args.expert_policy)
    app = create_app(llm, api_key=args.api_key, aliases=args.alias, context_shift=args.context_shift,
                     seed_alias=not args.no_seed_alias, default_max_tokens=args.max_tokens)
    ids = ", ".join(app.state.service.model_ids)
    print(f"mixlocal: serving {llm.name} (n_ctx {llm.n_ctx}) at http://{args.host}:{args.port}/v1 "
          f"as model ids: {ids}", file=sys.stderr)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixlocal.engine.server",
                                     description="Serve a model over an OpenAI-compatible HTTP API.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except (ValueError, OSError) as e:
        print(f"mixlocal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

"""Load test of the OpenAI-compatible server: N clients x M requests each, bounded in time, latency percentiles.

    .venv/bin/python bench/bench_server_load.py [-m MODEL] [--clients 4] [--requests 5] [--max-tokens 16]
                                                [--deadline 45] [--out bench/results/server_load_tiny.json]

It starts `python -m mixlocal.engine.server` in a subprocess on 127.0.0.1 (a free port), runs the clients (the official
openai SDK, one thread each, streaming and non-streaming requests alternating, distinct prompts so that the prompt
cache does not make them trivial), stops the server, and then runs the same prompts in-process, one after another,
with LLM.generate: the peer that gives the server's overhead as a ratio. Without -m it builds the tiny random
Mixtral the tests use (2 blocks, 256 wide, the real tokenizer), so the figures measure the serving machinery
rather than the model.

Every client stops at the deadline, so the run ends by itself; a request that was started and got no answer is
counted as lost. `run_load` is also what tests/test_server.py runs against its live server.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests load this file by path
from machine import describe_run

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["rivers", "bread", "comets", "violins", "glaciers", "tides", "owls", "maps", "lanterns", "bridges"]


def prompt_for(client: int, request: int) -> list[dict]:
    topic = TOPICS[(client * 7 + request) % len(TOPICS)]
    return [{"role": "user", "content": f"Client {client}, question {request}: tell me something about {topic}."}]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


def _one_request(client, model: str, messages: list[dict], max_tokens: int, stream: bool) -> dict:
    t0 = time.perf_counter()
    if not stream:
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        return {"latency_s": time.perf_counter() - t0, "ttft_s": None, "stream": False,
                "completion_tokens": resp.usage.completion_tokens, "finish_reason": resp.choices[0].finish_reason,
                "model": resp.model, "text": resp.choices[0].message.content}
    ttft, pieces, finish, usage, model_seen = None, [], None, None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        model_seen = chunk.model
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft, "stream": True,
            "completion_tokens": usage.completion_tokens if usage else None, "finish_reason": finish,
            "model": model_seen, "text": "".join(pieces)}


def run_load(base_url: str, *, api_key: str = "none", model: str = "mistralai/mixtral-8x7b-instruct",
             clients: int = 4, requests: int = 5, max_tokens: int = 16, deadline_s: float = 45.0) -> dict:
    """N client threads x M requests against a running server; every client stops at the deadline."""
    from openai import OpenAI

    start = time.perf_counter()
    stop_at = start + deadline_s
    records: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client_loop(c: int) -> None:
        sdk = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=max(1.0, deadline_s))
        barrier.wait()
        for r in range(requests):
            if time.perf_counter() >= stop_at:
                with lock:
                    records.append({"client": c, "request": r, "status": "not_started"})
                continue
            try:
                rec = _one_request(sdk, model, prompt_for(c, r), max_tokens, stream=(c + r) % 2 == 1)
                rec["status"] = "ok" if rec["finish_reason"] in ("stop", "length") else "incomplete"
            except Exception as e:  # noqa: BLE001 - a lost request: recorded, not raised, so the other clients go on
                rec = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            rec.update(client=c, request=r)
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline_s + 30)
    wall = time.perf_counter() - start
    ok = [r for r in records if r["status"] == "ok"]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    return {
        "clients": clients, "requests_per_client": requests, "max_tokens": max_tokens, "deadline_s": deadline_s,
        "sent": sum(r["status"] != "not_started" for r in records), "ok": len(ok),
        "lost": [r for r in records if r["status"] in ("failed", "incomplete")],
        "not_started": sum(r["status"] == "not_started" for r in records),
        "unfinished_clients": sum(t.is_alive() for t in threads),
        "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "latency_s": percentiles([r["latency_s"] for r in ok]),
        "ttft_s_stream": percentiles([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
        "models_seen": sorted({r["model"] for r in ok}),
        "records": records,
    }


def direct_baseline(model_dir: str, n_ctx: int, clients: int, requests: int, max_tokens: int,
                    threads: int | None) -> dict:
    """The same prompts through LLM.generate in this process, one after another, with the server's sampling
    defaults, on a worker thread as in the server (kernels entered from the main thread ran far slower here
    under load with OpenMP's spinning waits), and with the server's OMP_WAIT_POLICY (set in main)."""
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(_direct(model_dir, n_ctx, clients, requests, max_tokens,
                                                                threads)))
    worker.start()
    worker.join()
    return out


def _direct(model_dir: str, n_ctx: int, clients: int, requests: int, max_tokens: int, threads: int | None) -> dict:
    from mixlocal import engine

    llm = engine.load(model_dir, n_ctx=n_ctx, n_threads=threads)
    llm.generate(llm.tokenizer.encode_chat(prompt_for(0, 0)), max_tokens=1)   # compile before timing, as the server
    t0 = time.perf_counter()                                                  # had its warm-up request
    tokens, latencies = 0, []
    for c in range(clients):
        for r in range(requests):
            t = time.perf_counter()
            res = llm.generate(llm.tokenizer.encode_chat(prompt_for(c, r)), max_tokens=max_tokens,
                               temperature=1.0, top_p=1.0, min_p=0.0)
            latencies.append(time.perf_counter() - t)
            tokens += res.usage["completion_tokens"]
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "latency_s": percentiles(latencies)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="model dir (default: build the tests' tiny random Mixtral)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=5, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--deadline", type=float, default=45.0, help="seconds after which clients stop")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-process LLM.generate peer")
    ap.add_argument("--out", default=None, help="result file (default bench/results/server_load_<model>.json)")
    args = ap.parse_args(argv)
    # The server sets this default before its first kernel (engine/server/app.py, run_serve); the in-process peer
    # gets the same, so that the ratio measures serving and not the OpenMP wait policy.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tag = args.model, None
        if model_dir is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import make_hf_checkpoint
            model_dir, tag = str(make_hf_checkpoint(Path(tmp) / "tiny-mixtral")), "tiny"
        tag = tag or Path(model_dir).name
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "mixlocal.engine.server", "-m", model_dir, "--host", "127.0.0.1", "--port", str(port),
               "--n-ctx", str(args.n_ctx), "--log-level", "warning"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "MIXLOCAL_API_KEY": ""})
        try:
            _wait_ready(base + "/health", server, timeout=120)
            # one request first, so that JIT compilation is not counted as latency
            run_load(base + "/v1", clients=1, requests=1, max_tokens=1, deadline_s=60)
            load = run_load(base + "/v1", clients=args.clients, requests=args.requests, max_tokens=args.max_tokens,
                            deadline_s=args.deadline)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        baseline = None
        if not args.no_baseline:
            baseline = direct_baseline(model_dir, args.n_ctx, args.clients, args.requests, args.max_tokens,
                                       args.threads)

    for rec in load["records"]:
        rec.pop("text", None)
    result = {
        "bench": "server_load", **describe_run(), "python": platform.python_version(),
        "model": tag, "n_ctx": args.n_ctx, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_end": os.getloadavg(), "server": load, "in_process_baseline": baseline,
        "server_vs_in_process_tokens_per_s": (load["tokens_per_s"] / baseline["tokens_per_s"]
                                              if baseline and baseline["tokens_per_s"] else None),
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"server_load_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lat = load["latency_s"]
    print(f"{load['ok']}/{load['sent']} requests answered ({len(load['lost'])} lost, {load['not_started']} not "
          f"started at the deadline) in {load['wall_s']:.1f} s; latency p50 {lat.get('p50', 0):.2f} s, "
          f"p90 {lat.get('p90', 0):.2f} s, p99 {lat.get('p99', 0):.2f} s; {load['tokens_per_s']:.1f} tokens/s")
    if baseline:
        print(f"in-process LLM.generate, same prompts one by one: {baseline['tokens_per_s']:.1f} tokens/s; "
              f"server / in-process = {result['server_vs_in_process_tokens_per_s']:.2f}")
    print(f"wrote {out}")
    return 0 if not load["lost"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Server overhead: tokens/s and time to first token through `tifa serve` against the engine alone.

    .venv/bin/python bench/serve.py [--model DIR] [--new-tokens 64] [--levels 1 4 16]

At each concurrency level c, c streaming requests start together: once straight into one batched
`Engine.stream` call, once as c HTTP clients against the real server (uvicorn on 127.0.0.1,
--max-concurrency c), which batches them itself as they arrive. Both run the engine with the
server's torch thread count (`scheduler.worker_threads`), so the difference is the server: by
default its engine runs in its own process, as `tifa serve` runs it (`--no-engine-process`: in a
thread of the server's process, which shares the GIL with the HTTP work).
Every row generates exactly --new-tokens tokens (the random-weight tiny preset almost never writes
its end token; rows that do are counted as they are). The clients are raw sockets that only look
for the first event: they share this process (and its GIL) with the server, and an HTTP client that
parsed every event (httpx) cost half as much CPU as the engine at c=16, which is not the server's.
Target: server tokens/s within 5% of the engine's.

    .venv/bin/python bench/serve.py --backend llamacpp [--gguf FILE]

With the llama.cpp backend, our server (`tifa serve FILE.gguf --backend llamacpp`) runs against
llama-cpp-python's own OpenAI server on the same GGUF file (default: the fresh tiny preset exported
to q8_0), same threads, context and sampling, both in this process on 127.0.0.1. Both answer one
request at a time, so c clients queue on either. Tokens are counted from each reply's `usage` (the
random tiny model rarely stops early; a row that does is counted as it is); time to first token is
the first streamed event of a lone request.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tifaforge.config import SamplingConfig  # noqa: E402
from tifaforge.engine.generate import Engine, Request  # noqa: E402

PROMPT = "<|begin▁of▁sentence|><|User|>讲一个长安城的故事。<|Assistant|>"


def engine_run(engine: Engine, c: int, new_tokens: int) -> tuple[float, float]:
    """(tokens/s, median time to first token) for c rows in one engine call, made from a worker thread
    with the server worker's torch threads, as the server makes it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_engine_run, engine, c, new_tokens).result()


def _engine_run(engine: Engine, c: int, new_tokens: int) -> tuple[float, float]:
    import torch

    from tifaforge.serve.scheduler import worker_threads

    torch.set_num_threads(worker_threads())
    reqs = [Request(PROMPT, SamplingConfig(max_new_tokens=new_tokens, seed=i), ()) for i in range(c)]
    t0, first = time.perf_counter(), {}
    for d in engine.stream(reqs):
        first.setdefault(d.index, time.perf_counter() - t0)
    return c * new_tokens / (time.perf_counter() - t0), statistics.median(first.values())


def _request(url, path: str, body: dict) -> bytes:
    """A raw HTTP/1.1 POST of `body` as JSON; the server closes the connection after its reply."""
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


def _stream_once(sock, request: bytes, wait=None) -> tuple[bytes, float]:
    """Send a streaming request, read until its first event: (reply so far, seconds); then drain."""
    if wait is not None:
        wait()
    t, reply = time.perf_counter(), b""
    sock.sendall(request)
    while b"data: {" not in reply:
        if not (chunk := sock.recv(1 << 16)):
            raise RuntimeError(f"no event: {reply[:300]!r}")
        reply += chunk
    first = time.perf_counter() - t
    while sock.recv(1 << 16):  # the rest: the server closes the connection after [DONE]
        pass
    if not reply.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{reply[:300]!r}")
    return reply, first


def server_run(base: str, c: int, new_tokens: int) -> tuple[float, float]:
    url = urlsplit(base)
    first: list[float] = []
    barrier = threading.Barrier(c)

    def client(i: int) -> None:
        body = {"prompt": PROMPT, "max_tokens": new_tokens, "seed": i, "stream": True,
                "stream_options": {"include_usage": True}}
        with socket.create_connection((url.hostname, url.port)) as sock:
            first.append(_stream_once(sock, _request(url, "/v1/completions", body), barrier.wait)[1])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return c * new_tokens / (time.perf_counter() - t0), statistics.median(first)


SAMPLING = {"temperature": 0.4, "top_p": 0.6, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.17,
            "repetition_penalty": 1.17}  # the seed's settings, in both servers' spellings


def _post(url, path: str, body: dict) -> bytes:
    """One raw HTTP/1.1 POST; the whole reply (headers and body)."""
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(_request(url, path, body))
        reply = b""
        while chunk := sock.recv(1 << 16):
            reply += chunk
    if not reply.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{path}: {reply[:300]!r}")
    return reply


def _ttft(url, body: dict) -> float:
    with socket.create_connection((url.hostname, url.port)) as sock:
        return _stream_once(sock, _request(url, "/v1/completions", {**body, "stream": True}))[1]


def queued_run(base: str, c: int, new_tokens: int) -> float:
    """tokens/s for c simultaneous non-streaming completions, tokens from each reply's usage."""
    from concurrent.futures import ThreadPoolExecutor

    url = urlsplit(base)

    def one(i: int) -> int:
        reply = _post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": new_tokens, "seed": i, **SAMPLING})
        body = reply.split(b"\r\n\r\n", 1)[1]
        if b"\r\n" in body.split(b"{", 1)[0]:  # chunked transfer encoding: drop the chunk sizes
            body = b"".join(body.split(b"\r\n")[1::2])
        return json.loads(body)["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        tokens = sum(pool.map(one, range(c)))
    return tokens / (time.perf_counter() - t0)


def llamacpp_main(args) -> int:
    """Our server on the llama.cpp backend against llama-cpp-python's own server, same GGUF."""
    from test_serve import live

    from tifaforge.engine.llamacpp import LlamaCppEngine
    from tifaforge.extras import require
    from tifaforge.models.gguf_file import default_threads
    from tifaforge.serve.app import create_app

    require("llamacpp")
    try:
        from llama_cpp.server.app import create_app as lc_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise SystemExit(f"llama-cpp-python's server needs its server packages ({e}): make setup installs them")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf
        if gguf is None:
            from tifaforge.export.gguf import export_gguf
            from tifaforge.models.presets import init_model

            model = init_model("tiny", Path(tmp) / "tiny", seed=0)
            gguf = str(export_gguf(model, Path(tmp) / "tiny-q8_0.gguf", "q8_0", progress=False).path)
        threads, n_ctx = default_threads(gguf), 4096
        print(f"GGUF {gguf}, {threads} threads, context {n_ctx}, {args.new_tokens} new tokens")
        ours = LlamaCppEngine.load(gguf, n_ctx=n_ctx, n_threads=threads)
        theirs = lc_app(server_settings=ServerSettings(),
                        model_settings=[ModelSettings(model=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                                      verbose=False)])
        print(f"{'c':>3} {'llama-cpp-python server tok/s':>30} {'tifa serve tok/s':>17} {'ratio':>6} "
              f"{'their TTFT':>11} {'our TTFT':>9}")
        body = {"prompt": PROMPT, "max_tokens": 8, "seed": 0, **SAMPLING}
        try:
            with live(create_app(ours, max_concurrency=max(args.levels))) as a, live(theirs) as b:
                for base in (a, b):
                    queued_run(base, 1, 8)  # warm-up
                ttft = [min(_ttft(urlsplit(base), body) for _ in range(args.repeats)) for base in (b, a)]
                for c in args.levels:
                    t_tps = max(queued_run(b, c, args.new_tokens) for _ in range(args.repeats))
                    o_tps = max(queued_run(a, c, args.new_tokens) for _ in range(args.repeats))
                    print(f"{c:>3} {t_tps:>30.1f} {o_tps:>17.1f} {o_tps / t_tps:>6.2f} "
                          f"{ttft[0] * 1000:>9.0f}ms {ttft[1] * 1000:>7.0f}ms")
        finally:
            ours.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: a fresh tiny preset in a temp folder)")
    p.add_argument("--backend", choices=["transformers", "llamacpp"], default="transformers")
    p.add_argument("--gguf", help="with --backend llamacpp: the GGUF file (default: the tiny preset in q8_0)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--levels", type=int, nargs="+", default=None, help="concurrency levels (default 1 4 16; llamacpp 1 4)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="the server's engine in its own process, as `tifa serve` runs it (default); "
                        "--no-engine-process: in a thread of the server's process")
    p.add_argument("--repeats", type=int, default=7, help="runs per side and level, alternating; the best is kept")
    args = p.parse_args()
    if args.backend == "llamacpp":
        args.levels = args.levels or [1, 4]
        return llamacpp_main(args)
    args.levels = args.levels or [1, 4, 16]
    from test_serve import live  # the tests' uvicorn-in-a-thread helper

    from tifaforge.serve.app import create_app
    from tifaforge.serve.engine_process import EngineProcess

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tifaforge.models.presets import init_model

            model = init_model("tiny", Path(tmp) / "tiny", seed=0)
        engine = Engine.load(model, device="cpu")
        engine_run(engine, 1, 8)  # warm-up
        print(f"server engine: {'its own process' if args.engine_process else 'a thread of the server process'}")
        print(f"{'c':>3} {'engine tok/s':>13} {'server tok/s':>13} {'overhead':>9} {'engine TTFT':>12} {'server TTFT':>12}")
        for c in args.levels:
            # Engine and server runs alternate, so a slow spell of the machine (step times here vary by
            # ±10% between identical runs) hurts both alike; best of N each: other work only slows a run.
            engine_runs, server_runs = [], []
            served = EngineProcess(model) if args.engine_process else engine
            try:
                with live(create_app(served, max_concurrency=c)) as base:
                    server_run(base, c, 8)  # warm-up: the first request through the app
                    for _ in range(args.repeats):
                        engine_runs.append(engine_run(engine, c, args.new_tokens))
                        server_runs.append(server_run(base, c, args.new_tokens))
            finally:
                if served is not engine:
                    served.close()
            (e_tps, e_ttft), (s_tps, s_ttft) = max(engine_runs), max(server_runs)
            ratios = sorted(s[0] / e[0] for e, s in zip(engine_runs, server_runs))
            print(f"{c:>3} {e_tps:>13.1f} {s_tps:>13.1f} {100 * (1 - s_tps / e_tps):>8.1f}% "
                  f"{e_ttft * 1000:>10.0f}ms {s_ttft * 1000:>10.0f}ms   (pairwise median "
                  f"{100 * (1 - ratios[len(ratios) // 2]):.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

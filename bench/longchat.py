"""A long role-play chat through the server: time to first token per turn with and without the prefix
cache, and against llama.cpp's own server with its prompt cache on the same model.

    .venv/bin/python bench/longchat.py [--model DIR] [--turns 30] [--no-llamacpp]

The client acts as a front end does: every turn it resends the card and the whole history (the shown
answers, fixed text here so every run sends the same prompts), streams a short answer (greedy,
--new-tokens) and measures the time to its first generated token. Three servers on 127.0.0.1, one at a
time: `tifa serve`'s app with the engine in its own process (as `tifa serve` runs it) with the prefix
cache on (--prefix-cache-mb 256) and off, and llama-cpp-python's OpenAI server (`llama_cpp.server`,
`cache: true`, its RAM prompt cache) on the model exported to f16 GGUF, same threads. Targets: with the
cache, turn-N TTFT at most 1.5x turn 1's; at the longest history at least 5x faster than without it;
within 1.2x of llama.cpp's server.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CARD = ("你是沈青崖，青石镇的剑客，话少，心细，记得每一个来过客栈的人。" * 6
        + "\n场景：雨夜，客栈里只剩你和一位旅人。")
LINE = "我把斗笠放在桌上，问你：这场雨还要下多久？"
ANSWER = "*她抬眼看了看窗外的雨幕，指尖在剑鞘上轻轻一扣。* 「三更之前停不了。你若要赶路，不如等天亮。」"


def ttft(base: str, messages: list[dict], new_tokens: int) -> float:
    """Seconds from sending a streaming chat request to the first event that carries generated text."""
    url = urlsplit(base)
    body = json.dumps({"model": "x", "messages": messages, "max_tokens": new_tokens, "temperature": 0,
                       "stream": True}, ensure_ascii=False).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        t0 = time.perf_counter()
        sock.sendall(head + body)
        seen = b""
        while chunk := sock.recv(1 << 16):
            seen += chunk
            for line in seen.split(b"\n"):
                if line.startswith(b"data: {") and (b'"content": "' in line and b'"content": ""' not in line
                                                     or b'"reasoning_content": "' in line):
                    return time.perf_counter() - t0
            if b"data: [DONE]" in seen:
                break
    raise RuntimeError(f"no generated text in the stream: {seen[-300:]!r}")


def run_chat(base: str, turns: int, new_tokens: int) -> list[float]:
    messages, times = [{"role": "system", "content": CARD}], []
    for i in range(turns):
        messages.append({"role": "user", "content": f"（第{i + 1}轮）{LINE}"})
        times.append(ttft(base, messages, new_tokens))
        messages.append({"role": "assistant", "content": ANSWER})
    return times


def prompt_tokens(tokenizer, turns: int) -> int:
    from tifaforge.chat.template import render

    messages = [{"role": "system", "content": CARD}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"（第{i + 1}轮）{LINE}"}, {"role": "assistant", "content": ANSWER}]
    return len(tokenizer(render(messages[:-1], tokenizer, add_generation_prompt=True), add_special_tokens=False).input_ids)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the tiny preset, briefly trained)")
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama-cpp-python's server")
    args = p.parse_args()

    from test_serve import live

    from tifaforge.models.load import load_tokenizer
    from tifaforge.serve.app import create_app
    from tifaforge.serve.engine_process import EngineProcess
    from tifaforge.serve.scheduler import worker_threads

    tmp = Path(tempfile.mkdtemp())
    model = args.model
    if model is None:
        from tifaforge.models.presets import corpus_text, init_model, warm_up

        texts = [t for t in corpus_text().split("\n\n") if t.strip()]
        model = warm_up(init_model("tiny", tmp / "tiny", seed=0), tmp / "warm", texts, steps=60)
    tok = load_tokenizer(model)
    print(f"model {model}; {args.turns} turns, the last prompt {prompt_tokens(tok, args.turns)} tokens; "
          f"{args.new_tokens} new tokens; engine threads {worker_threads()}")
    results: dict[str, list[float]] = {}
    for name, mb in (("tifa serve, prefix cache", 256), ("tifa serve, no cache", 0)):
        engine = EngineProcess(model, device="cpu", prefix_cache_mb=mb)
        try:
            with live(create_app(engine)) as base:
                run_chat(base, 2, args.new_tokens)  # warm-up (a different conversation: nothing to reuse)
                results[name] = run_chat(base, args.turns, args.new_tokens)
        finally:
            engine.close()
    if not args.no_llamacpp:
        try:
            from llama_cpp.server.app import create_app as lc_app
            from llama_cpp.server.settings import ModelSettings, ServerSettings

            from tifaforge.export.gguf import export_gguf

            gguf = export_gguf(model, tmp / "model-f16.gguf", "f16", progress=False).path
            threads = worker_threads()
            app = lc_app(server_settings=ServerSettings(), model_settings=[ModelSettings(
                model=str(gguf), n_ctx=8192, n_threads=threads, n_threads_batch=threads, cache=True,
                cache_type="ram", verbose=False)])
            with live(app) as base:
                run_chat(base, 2, args.new_tokens)
                results["llama.cpp server, prompt cache"] = run_chat(base, args.turns, args.new_tokens)
        except ImportError as e:
            print(f"llama-cpp-python's server is not installed ({e}): its row skipped")
    marks = sorted({0, 4, 9, 19, args.turns - 1} & set(range(args.turns)))
    print(f"\n{'TTFT ms, turn':<32}" + "".join(f"{m + 1:>8}" for m in marks))
    for name, times in results.items():
        print(f"{name:<32}" + "".join(f"{times[m] * 1000:>8.0f}" for m in marks))
    cached, plain = results["tifa serve, prefix cache"], results["tifa serve, no cache"]
    last = lambda t: statistics.median(t[-3:])  # noqa: E731  (the last turns, against timing noise)
    print(f"\nwith the cache, last turns / turn 1: {last(cached) / cached[0]:.2f} (target <= 1.5)")
    print(f"last turns, without / with the cache: {last(plain) / last(cached):.2f} (target >= 5)")
    if "llama.cpp server, prompt cache" in results:
        print(f"last turns, tifa serve / llama.cpp server: {last(cached) / last(results['llama.cpp server, prompt cache']):.2f} "
              "(target <= 1.2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

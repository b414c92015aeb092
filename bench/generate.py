"""Engine throughput against plain `model.generate`, same model, settings and token counts, one run.

    .venv/bin/python bench/generate.py [--model DIR] [--new-tokens 128] [--repeats 3]

Prints tokens/s for batch 1 and 8 and the ratio ours / transformers (target >= 1.0: our samplers
and loop must not slow generation down). Both sides generate exactly --new-tokens per row (stop
tokens off) with the seed's sampling (temperature 0.4, top_p 0.6, repetition_penalty 1.17).

It also prints what token probabilities (`logprobs` with 5 rivals) and banned strings (ten phrases
that never occur: the cost of watching for them and holding text back) cost against the same
engine without them (target: each at most 10% fewer tokens/s).

With llama-cpp-python installed it also runs the llama.cpp backend (`LlamaCppEngine`) against
llama-cpp-python's own generation loop (`Llama.generate`, its sampler chain) on the same GGUF file
(the model exported to q8_0), batch 1 (llama.cpp holds one sequence), the same threads and sampling:
the ratio is what our loop, stop handling and streaming detokenisation cost on top of llama.cpp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tifaforge.config import SamplingConfig  # noqa: E402
from tifaforge.engine.generate import Engine, Request  # noqa: E402
from tifaforge.models.presets import init_model  # noqa: E402

PROMPTS = ["你好，楚夜。", "长安城的夜晚很冷，你在屋顶上做什么？", "Tell me about the inn.", "沈大侠，外面的雨这么大。",
           "她推开窗，看见了什么？", "继续讲这个故事吧。", "What did the old man say?", "雪落在剑上，"]


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(engine: Engine, batch: int, n: int, repeats: int) -> tuple[float, float]:
    s = SamplingConfig(max_new_tokens=n, seed=0)
    prompts = [engine.render([{"role": "user", "content": p}]) for p in PROMPTS[:batch]]
    engine.stop_ids = set()  # exactly n tokens per row on both sides

    def ours():
        out = engine.generate([Request(p, s) for p in prompts])
        assert all(r.completion_tokens == n for r in out)

    tok = engine.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def theirs():
        torch.manual_seed(0)
        with torch.inference_mode():
            out = engine.model.generate(**enc, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                                        repetition_penalty=s.repetition_penalty, max_new_tokens=n,
                                        min_new_tokens=n, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - enc.input_ids.shape[1] == n

    t_ours, t_hf = time_it(ours, repeats), time_it(theirs, repeats)
    return batch * n / t_ours, batch * n / t_hf


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: a fresh tiny preset)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = args.model or init_model("tiny", Path(tempfile.mkdtemp()) / "tiny")
    engine = Engine.load(model, device="cpu")
    print(f"model {model}, {args.new_tokens} new tokens per row, torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}")
    for batch in (1, 8):
        ours, hf = bench(engine, batch, args.new_tokens, args.repeats)
        print(f"{batch:>5} {ours:>11.1f} {hf:>19.1f} {ours / hf:>6.2f}")
    print(f"\n{'batch':>5} {'plain tok/s':>12} {'logprobs':>9} {'ratio':>6} {'banned':>9} {'ratio':>6}")
    for batch in (1, 8):
        plain, lp, banned = bench_features(engine, batch, args.new_tokens, args.repeats)
        print(f"{batch:>5} {plain:>12.1f} {lp:>9.1f} {lp / plain:>6.2f} {banned:>9.1f} {banned / plain:>6.2f}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed (pip install 'tifaforge[llamacpp]'): llama.cpp rows skipped")
        return 0
    from tifaforge.export.gguf import export_gguf

    gguf = export_gguf(model, Path(tempfile.mkdtemp()) / "model-q8_0.gguf", "q8_0", progress=False).path
    ours, theirs = bench_llamacpp(gguf, args.new_tokens, args.repeats)
    print(f"\nllama.cpp backend, {Path(gguf).name}, batch 1")
    print(f"{'ours tok/s':>11} {'llama-cpp-python tok/s':>23} {'ratio':>6}")
    print(f"{ours:>11.1f} {theirs:>23.1f} {ours / theirs:>6.2f}")
    return 0


def bench_features(engine: Engine, batch: int, n: int, repeats: int) -> tuple[float, float, float]:
    """tokens/s of the engine plain, with logprobs (5 rivals), and with ten banned strings that never occur."""
    import dataclasses

    s = SamplingConfig(max_new_tokens=n, seed=0)
    banned = dataclasses.replace(s, banned_strings=[f"从未出现的短语{i}" for i in range(10)])
    prompts = [engine.render([{"role": "user", "content": p}]) for p in PROMPTS[:batch]]
    engine.stop_ids = set()

    def run(make):
        def go():
            assert all(r.completion_tokens == n for r in engine.generate([make(p) for p in prompts]))
        return batch * n / time_it(go, repeats)

    return (run(lambda p: Request(p, s)), run(lambda p: Request(p, s, logprobs=5)),
            run(lambda p: Request(p, banned)))


def bench_llamacpp(gguf, n: int, repeats: int) -> tuple[float, float]:
    """tokens/s of `LlamaCppEngine` and of `Llama.generate` alone, one prompt at a time, n tokens each."""
    from tifaforge.engine.llamacpp import LlamaCppEngine

    s = SamplingConfig(max_new_tokens=n, seed=0)
    with LlamaCppEngine.load(gguf) as engine:
        engine.stop_ids = set()
        prompts = [engine.render([{"role": "user", "content": p}]) for p in PROMPTS]
        ids = [engine.tokenizer(p).input_ids for p in prompts]

        def ours():
            for p in prompts:
                assert engine.generate([Request(p, s)])[0].completion_tokens == n

        def theirs():
            llm = engine.llm
            for prompt in ids:
                llm.set_seed(0)
                made = 0
                for _ in llm.generate(prompt, top_k=0, top_p=s.top_p, min_p=0.0, temp=s.temperature,
                                      repeat_penalty=s.repetition_penalty):
                    made += 1
                    if made == n:
                        break

        t_ours, t_theirs = time_it(ours, repeats), time_it(theirs, repeats)
    return len(PROMPTS) * n / t_ours, len(PROMPTS) * n / t_theirs


if __name__ == "__main__":
    raise SystemExit(main())

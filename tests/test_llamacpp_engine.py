"""The llama.cpp engine backend (issue 4, point 1) behaves like the transformers `Engine`: same results
for greedy decoding, same streaming, stops, reasoning split and errors; real llama-cpp-python."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tifaforge.config import SamplingConfig
from tifaforge.engine.generate import Request
from tifaforge.engine.llamacpp import LlamaCppEngine
from tifaforge.errors import TifaError
from tifaforge.export.gguf import export_gguf

_OFF = dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, dry_multiplier=0.0)
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=32, repetition_penalty=1.0)
CONVERSATIONS = [
    [{"role": "user", "content": "写一段雨夜客栈里两位剑客重逢的描写。"}],
    [{"role": "system", "content": "你是沈清雅。"}, {"role": "user", "content": "清雅姑娘，今晚月色真美。"}],
    [{"role": "user", "content": "Tell me about the lighthouse."}],
]


@pytest.fixture(scope="module")
def gguf_files(trained_tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine-gguf")
    return {q: export_gguf(trained_tiny_dir, out / f"tiny-{q}.gguf", q, progress=False).path for q in ("f32", "q8_0")}


@pytest.fixture(scope="module")
def lengine(gguf_files):
    engine = LlamaCppEngine.load(gguf_files["f32"], kv_f32=True)  # token-for-token comparisons: no f16 KV rounding
    yield engine
    engine.close()


def _prompts(engine) -> list[str]:
    prompts = [engine.render(c) for c in CONVERSATIONS]
    return prompts + [prompts[0] + "<think>"]  # the think block opened by the prompt


def _fields(result) -> tuple:
    return dataclasses.astuple(result)


def test_greedy_results_equal_transformers_engine(engine, gguf_files):
    """f32 weights and KV cache: the same numbers to float rounding, so every token must match (f16 KV,
    or q8_0, may flip the fixture's near-ties, most of all on another CPU's kernels; test_gguf measures it)."""
    prompts = _prompts(engine)
    expected = engine.generate([Request(p, GREEDY) for p in prompts])
    with LlamaCppEngine.load(gguf_files["f32"], kv_f32=True) as lengine:
        assert [lengine.render(c) for c in CONVERSATIONS] == prompts[:3]  # the file's template renders like ours
        got = lengine.generate([Request(p, GREEDY) for p in prompts])
        lengine.stop_ids = set()  # and 32 tokens each, past where the end token stopped them
        long = [r.token_ids for r in lengine.generate([Request(p, GREEDY) for p in prompts])]
    assert [_fields(r) for r in got] == [_fields(r) for r in expected]
    saved, engine.stop_ids = engine.stop_ids, set()
    try:
        assert long == [r.token_ids for r in engine.generate([Request(p, GREEDY) for p in prompts])]
    finally:
        engine.stop_ids = saved
    assert got[3].reasoning is not None  # the split knew the prompt opened the think block


@pytest.mark.parametrize("setting", [
    dict(repetition_penalty=1.17), dict(presence_penalty=0.8, frequency_penalty=0.4),
    # own breakers: the default list holds full-width quotes, and the tiny model loops on '，“'
    dict(dry_multiplier=0.8, dry_allowed_length=2, dry_sequence_breakers=["\n", "："]),
    dict(repetition_penalty=1.3, dry_multiplier=1.0),
])
def test_penalties_map_to_llama_cpp_samplers_with_our_semantics(engine, lengine, setting):
    """Greedy with penalties: only the penalty samplers move the argmax, so both backends must agree
    token for token if the mapping (window, prompt counted or not, order) is right. Stop tokens are
    off so every row runs its 48 tokens and repeats enough for the penalties to act."""
    cfg = dataclasses.replace(GREEDY, max_new_tokens=48, **setting)
    prompts = _prompts(engine)[:2]
    saved = engine.stop_ids, lengine.stop_ids
    engine.stop_ids = lengine.stop_ids = set()
    try:
        expected = [r.token_ids for r in engine.generate([Request(p, cfg) for p in prompts])]
        got = [r.token_ids for r in lengine.generate([Request(p, cfg) for p in prompts])]
        plain = [r.token_ids for r in engine.generate([Request(p, dataclasses.replace(cfg, **_OFF)) for p in prompts])]
    finally:
        engine.stop_ids, lengine.stop_ids = saved
    assert got == expected
    assert expected != plain  # the setting changed the text


def test_stream_concatenates_to_generate(lengine):
    prompts = _prompts(lengine)
    results = lengine.generate([Request(p, GREEDY) for p in prompts])
    deltas = list(lengine.stream([Request(p, GREEDY) for p in prompts]))
    for i, r in enumerate(results):
        mine = [d for d in deltas if d.index == i]
        assert "".join(d.text for d in mine) == r.text
        assert mine[-1].finish_reason == r.finish_reason and all(d.finish_reason is None for d in mine[:-1])


def test_closing_a_stream_then_generating_again(lengine):
    prompt = _prompts(lengine)[0]
    fresh = lengine.generate([Request(prompt, GREEDY)])[0]
    stream = lengine.stream([Request(prompt, GREEDY)])
    next(stream)
    stream.close()  # a client left: generation stops, the sampler is freed
    assert _fields(lengine.generate([Request(prompt, GREEDY)])[0]) == _fields(fresh)


def test_cached_prefix_gives_the_same_answer(gguf_files, lengine):
    first = _prompts(lengine)[1]
    reply = lengine.generate([Request(first, GREEDY)])[0]
    follow = first + reply.text + "<|end▁of▁sentence|><|User|>再说一遍。<|Assistant|>"
    warm = lengine.generate([Request(follow, GREEDY)])[0]  # reuses the first prompt's KV cache
    with LlamaCppEngine.load(gguf_files["f32"]) as cold:
        assert _fields(cold.generate([Request(follow, GREEDY)])[0]) == _fields(warm)


def test_stop_strings_cut_exactly(gguf_files):
    lengine = LlamaCppEngine.load(gguf_files["f32"])
    lengine.stop_ids = set()  # a long text to cut
    prompt = _prompts(lengine)[0]
    full = lengine.generate([Request(prompt, GREEDY)])[0].text
    stop = full[5:7]
    got = lengine.generate([Request(prompt, GREEDY, stop=[stop])])[0]
    assert got.text == full[:full.index(stop)] and got.finish_reason == "stop"
    streamed = "".join(d.text for d in lengine.stream([Request(prompt, GREEDY, stop=[stop])]))
    assert streamed == got.text
    lengine.close()


def test_stop_tokens_are_the_transformers_engine_s(engine, lengine):
    assert lengine.stop_ids == engine.stop_ids
    tok = lengine.tokenizer
    assert {tok.token_id(t) for t in ("<|end▁of▁sentence|>", "<|User|>", "<|Assistant|>")} <= lengine.stop_ids


def test_length_finish_and_counts(gguf_files):
    lengine = LlamaCppEngine.load(gguf_files["f32"])
    lengine.stop_ids = set()
    r = lengine.generate([Request(_prompts(lengine)[0], dataclasses.replace(GREEDY, max_new_tokens=3))])[0]
    assert r.finish_reason == "length" and r.completion_tokens == 3
    assert r.prompt_tokens == len(lengine.tokenizer(_prompts(lengine)[0]).input_ids)
    lengine.close()


def test_sampling_is_reproducible_by_seed(lengine):
    prompt = _prompts(lengine)[0]
    cfg = SamplingConfig(temperature=1.5, top_p=1.0, max_new_tokens=24, seed=7, min_p=0.02, top_k=50,
                         xtc_probability=0.5, xtc_threshold=0.1, dry_multiplier=0.5)
    a, b = (lengine.generate([Request(prompt, cfg)])[0] for _ in range(2))
    assert a.token_ids == b.token_ids
    others = {tuple(lengine.generate([Request(prompt, dataclasses.replace(cfg, seed=s))])[0].token_ids) for s in range(4)}
    assert len(others) > 1  # the seed matters


def test_temperature_zero_with_sampling_is_greedy(lengine):
    prompt = _prompts(lengine)[0]
    greedy = lengine.generate([Request(prompt, dataclasses.replace(GREEDY, repetition_penalty=1.0))])[0]
    cold = SamplingConfig(temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=32, seed=1)
    assert lengine.generate([Request(prompt, cold)])[0].token_ids == greedy.token_ids


@pytest.mark.parametrize(("request_", "message"), [
    (Request("", GREEDY), "empty prompt"),
    (Request("你好", dataclasses.replace(GREEDY, max_new_tokens=0)), "max_new_tokens"),
    (Request("你好", dataclasses.replace(GREEDY, temperature=math.nan)), "temperature"),
])
def test_bad_requests_are_clear_errors(lengine, request_, message):
    with pytest.raises(TifaError, match=message):
        lengine.generate([request_])


def test_prompt_longer_than_context(gguf_files):
    with LlamaCppEngine.load(gguf_files["q8_0"], n_ctx=256) as small:  # llama.cpp pads n_ctx to 256
        assert small.context == 256
        with pytest.raises(TifaError, match="does not fit"):
            small.generate([Request("江南" * 600, GREEDY)])
        small.stop_ids = set()
        r = small.generate([Request("江南" * 100, dataclasses.replace(GREEDY, max_new_tokens=1000))])[0]
        assert r.finish_reason == "length" and r.prompt_tokens + r.completion_tokens == 256


def test_load_refuses_what_is_not_a_gguf(tmp_path, trained_tiny_dir):
    with pytest.raises(TifaError, match="runs a .gguf file"):
        LlamaCppEngine.load(trained_tiny_dir)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    with pytest.raises(TifaError, match="not a valid GGUF"):
        LlamaCppEngine.load(bad)


def test_closed_engine_says_so(gguf_files):
    e = LlamaCppEngine.load(gguf_files["q8_0"])
    e.close()
    e.close()  # twice is fine
    with pytest.raises(TifaError, match="closed"):
        e.generate([Request("你好", GREEDY)])


def test_chat_session_runs_on_the_llama_cpp_backend(lengine):
    from tifaforge.serve.session import ChatSession

    session = ChatSession.from_card(lengine, None, "小林", sampling=dataclasses.replace(GREEDY, max_new_tokens=16))
    text = "".join(d.text for d in session.say("你好"))
    assert text and session.messages()[-1]["role"] == "assistant"


def test_smollm2_chatml_file_through_the_backend():
    """A real third-party GGUF (Llama architecture, ChatML template, Q4_1) through the same interface."""
    from tifaforge.models.presets import smollm2_gguf

    with LlamaCppEngine.load(smollm2_gguf(), n_ctx=512) as e:
        prompt = e.render([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
        assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
        r = e.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                   sampling=dataclasses.replace(GREEDY, max_new_tokens=24))
    assert "Paris" in r.content and r.finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# `tifa serve --backend llamacpp`: the same server on this engine, one request at a time


def test_the_server_runs_the_llama_cpp_backend(lengine):
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from test_serve import live

    from tifaforge.serve.app import create_app

    messages = [{"role": "user", "content": "清雅姑娘，今晚月色真美。"}]
    alone = lengine.chat(messages, dataclasses.replace(GREEDY, max_new_tokens=24))
    with live(create_app(lengine, max_concurrency=2, model_name="tiny-gguf")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        ask = lambda **kw: client.chat.completions.create(  # noqa: E731
            model="tiny-gguf", messages=messages, temperature=0, max_tokens=24, extra_body={"repetition_penalty": 1.0}, **kw)
        reply = ask()
        msg = reply.choices[0].message
        assert (msg.content, getattr(msg, "reasoning_content", None)) == (alone.content, alone.reasoning)
        assert reply.usage.completion_tokens == alone.completion_tokens
        chunks = list(ask(stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == alone.content and chunks[-1].usage.completion_tokens == alone.completion_tokens
        with ThreadPoolExecutor(2) as pool:  # two clients at once: served in turn, both complete
            both = list(pool.map(lambda _: ask().choices[0].message.content, range(2)))
        assert both == [alone.content] * 2


def test_a_client_that_leaves_stops_its_llama_cpp_generation(gguf_files):
    import httpx
    from test_serve import _wait, live

    from tifaforge.serve.app import create_app

    with LlamaCppEngine.load(gguf_files["q8_0"]) as endless:
        endless.stop_ids = set()  # it would run all its max_tokens
        made, stream = [], endless.stream

        def counting(requests):  # watches how far the engine got
            for d in stream(requests):
                made.append(d.tokens)
                yield d

        endless.stream = counting
        body = {"prompt": "从前", "max_tokens": 3500, "temperature": 1.0, "stream": True}
        with live(create_app(endless, max_concurrency=1)) as base:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                assert next(r.iter_lines()).startswith("data: ")
            health = lambda: httpx.get(base + "/health").json()  # noqa: E731
            _wait(lambda: health()["running"] == 0 and not health()["generating"])
            assert max(made) < 3500, made[-1]  # stopped when the client left
            r = httpx.post(base + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=120)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_tokens_longer_than_32_bytes_decode_whole(lengine, tiny_tokenizer):
    """llama-cpp-python's own detokenize has a 32-byte buffer and returns nothing for a longer token;
    the tokenizer's decode gives every token's bytes, as transformers' tokenizer does."""
    vocab = tiny_tokenizer.get_vocab()
    long_ids = sorted(i for i in vocab.values() if len(tiny_tokenizer.decode([i]).encode("utf-8")) > 32)
    assert long_ids, "the tiny vocabulary has no token over 32 bytes to check"
    for i in long_ids[:20]:
        assert lengine.tokenizer.decode([i]) == tiny_tokenizer.decode([i])
    assert lengine.tokenizer.decode(long_ids[:3]) == tiny_tokenizer.decode(long_ids[:3])


@pytest.mark.parametrize("forced, expected", [("0", False), ("1", True)])
def test_extra_buffer_types_follow_the_setting(monkeypatch, gguf_files, forced, expected):
    """TIFA_LLAMACPP_EXTRA_BUFFERS decides whether llama.cpp may use AMX/repacked buffers, and the
    library's own defaults are put back after the model loads."""
    import llama_cpp

    from tifaforge.models import gguf_file

    monkeypatch.setenv("TIFA_LLAMACPP_EXTRA_BUFFERS", forced)
    seen = []
    defaults = llama_cpp.llama_cpp.llama_model_default_params
    real_init = llama_cpp.Llama.__init__

    def spy(self, *args, **kwargs):
        seen.append(llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(llama_cpp.Llama, "__init__", spy)
    assert gguf_file.extra_buffers() is expected
    llm = gguf_file.llama(next(iter(gguf_files.values())), n_ctx=64)
    llm.close()
    assert seen == [expected]
    assert llama_cpp.llama_cpp.llama_model_default_params is defaults

import math

import pytest

from tifaforge.config import SamplingConfig
from tifaforge.engine.generate import Request
from tifaforge.errors import TifaError

GREEDY = SamplingConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=24)
CHATS = [
    [{"role": "user", "content": "你好，楚夜。"}],
    [{"role": "system", "content": "你是沈青崖。"}, {"role": "user", "content": "长安城的夜晚很冷，你在屋顶上做什么？"}],
    [{"role": "user", "content": "Tell me about the inn."}],
]


def test_greedy_equals_model_generate(engine):
    for chat in CHATS:
        prompt = engine.render(chat)
        ours = engine.generate([Request(prompt, GREEDY)])[0]
        enc = engine.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        ref = engine.model.generate(**enc, do_sample=False, max_new_tokens=24, repetition_penalty=1.0,
                                    eos_token_id=sorted(engine.stop_ids), pad_token_id=engine.tokenizer.pad_token_id)
        ref_ids = ref[0, enc.input_ids.shape[1]:].tolist()
        ref_ids = ref_ids[:-1] if ref_ids and ref_ids[-1] in engine.stop_ids else ref_ids
        assert ours.token_ids == ref_ids


def test_greedy_with_repetition_penalty_equals_model_generate(engine):
    s = SamplingConfig(do_sample=False, repetition_penalty=1.17, max_new_tokens=24)
    prompt = engine.render(CHATS[1])
    ours = engine.generate([Request(prompt, s)])[0]
    enc = engine.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    ref = engine.model.generate(**enc, do_sample=False, max_new_tokens=24, repetition_penalty=1.17,
                                eos_token_id=sorted(engine.stop_ids), pad_token_id=engine.tokenizer.pad_token_id)
    assert ours.token_ids == [t for t in ref[0, enc.input_ids.shape[1]:].tolist() if t not in engine.stop_ids]


def test_batched_equals_unbatched_per_row(engine):
    reqs = [Request(engine.render(c), GREEDY) for c in CHATS]
    batched = engine.generate(reqs)
    for req, b in zip(reqs, batched):
        assert engine.generate([req])[0].token_ids == b.token_ids


def test_sampling_is_reproducible_per_seed_and_mixed_settings(engine):
    p = engine.render(CHATS[0])
    a = SamplingConfig(max_new_tokens=16, seed=7, temperature=1.0, top_p=1.0)
    alone = engine.generate([Request(p, a)])[0].token_ids
    mixed = engine.generate([Request(p, GREEDY), Request(p, a)])
    assert mixed[1].token_ids == alone
    assert engine.generate([Request(p, SamplingConfig(max_new_tokens=16, seed=8, temperature=1.0, top_p=1.0))])[0].token_ids != alone


def test_streaming_concatenates_to_the_result(engine):
    reqs = [Request(engine.render(c), SamplingConfig(max_new_tokens=20, seed=3)) for c in CHATS]
    texts = ["", "", ""]
    finals = {}
    for d in engine.stream(reqs):
        texts[d.index] += d.text
        if d.finish_reason:
            finals[d.index] = d.finish_reason
    full = engine.generate(reqs)
    assert texts == [r.text for r in full] and [finals[i] for i in range(3)] == [r.finish_reason for r in full]


def test_stop_strings_cut_exactly(engine):
    p = "第一章　雨夜客栈\n\n暮色压着青石镇的屋檐，"  # novel text: the model continues at length
    free = engine.generate([Request(p, GREEDY)])[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    cut = engine.generate([Request(p, GREEDY, stop=[stop])])[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    streamed = "".join(d.text for d in engine.stream([Request(p, GREEDY, stop=[stop])]))
    assert streamed == cut.text


def test_length_finish_and_token_counts(engine):
    r = engine.generate([Request(engine.render(CHATS[0]), SamplingConfig(do_sample=False, max_new_tokens=5, repetition_penalty=1.0))])[0]
    assert r.finish_reason in ("length", "stop") and r.completion_tokens <= 5 and r.prompt_tokens > 0


def test_reasoning_split_when_prompt_opens_think(engine):
    prompt = engine.render(CHATS[0]) + "<think>\n"
    r = engine.generate([Request(prompt, SamplingConfig(do_sample=False, max_new_tokens=8, repetition_penalty=1.0))])[0]
    from tifaforge.chat.template import split_reasoning

    assert r.reasoning is not None  # the open think block came from the prompt
    assert (r.reasoning, r.content) == split_reasoning(r.text, started_in_think=True)


@pytest.mark.parametrize(
    "prompt, sampling, match",
    [
        ("", SamplingConfig(), "empty prompt"),
        ("你好", SamplingConfig(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        ("你好", SamplingConfig(temperature=math.nan), "temperature must be a finite number"),
        ("你好" * 3000, SamplingConfig(), "does not fit the model's context"),
    ],
)
def test_bad_requests_are_clear_errors(engine, prompt, sampling, match):
    with pytest.raises(TifaError, match=match):
        engine.generate([Request(prompt, sampling)])


def test_closing_the_stream_stops_generation(engine):
    it = engine.stream([Request(engine.render(CHATS[0]), SamplingConfig(max_new_tokens=500, seed=1))])
    next(it)
    it.close()  # no exception, no further work

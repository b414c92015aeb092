import contextlib
import copy
import dataclasses
import math

import pytest

from tifaforge.config import SamplingConfig
from tifaforge.engine.generate import Batch, Request
from tifaforge.errors import TifaError

GREEDY = SamplingConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=24)
CHATS = [
    [{"role": "user", "content": "你好，楚夜。"}],
    [{"role": "system", "content": "你是沈青崖。"}, {"role": "user", "content": "长安城的夜晚很冷，你在屋顶上做什么？"}],
    [{"role": "user", "content": "Tell me about the inn."}],
]

NOVEL = "第一章　雨夜客栈\n\n暮色压着青石镇的屋檐，"


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
    """Stop tokens off (both sides run all 24 tokens), the seed's penalty and a strong one that breaks
    the tiny model's greedy loops, so those texts vary and a wrong position or penalty would show."""
    endless = copy.copy(engine)
    endless.stop_ids = set()
    texts = []
    for penalty in (1.17, 2.0):
        s = SamplingConfig(do_sample=False, repetition_penalty=penalty, max_new_tokens=24)
        for prompt in [engine.render(c) for c in CHATS] + [NOVEL]:
            ours = endless.generate([Request(prompt, s)])[0]
            enc = engine.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            ref = engine.model.generate(**enc, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                        repetition_penalty=penalty, pad_token_id=engine.tokenizer.pad_token_id)
            assert ours.token_ids == ref[0, enc.input_ids.shape[1]:].tolist()
            texts.append(ours.token_ids)
    assert sum(len(set(t)) >= 16 for t in texts[4:]) >= 3, [len(set(t)) for t in texts]  # 2.0: no short loop


def test_batched_equals_unbatched_per_row(engine):
    """Prompts of very different lengths (left padding up to ~40 tokens), greedy and seeded sampling at
    temperature 1: the tiny model's greedy text soon loops, sampled text does not, so a batch that let
    a row see its padding, or shifted its positions, would change these tokens."""
    prompts = [engine.render(c) for c in CHATS] + [NOVEL * 4]
    lengths = [len(engine.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert max(lengths) - min(lengths) > 30
    sampled = SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=11)
    for s in (GREEDY, sampled):
        reqs = [Request(p, s) for p in prompts]
        batched = [r.token_ids for r in engine.generate(reqs)]
        assert batched == [engine.generate([r])[0].token_ids for r in reqs]
    assert len({tuple(t) for t in batched}) == len(prompts) and sum(len(t) > 4 for t in batched) >= 3  # varied


def test_sampling_is_reproducible_per_seed_and_mixed_settings(engine):
    p = engine.render(CHATS[0])
    a = SamplingConfig(max_new_tokens=16, seed=7, temperature=1.0, top_p=1.0)
    alone = engine.generate([Request(p, a)])[0].token_ids
    mixed = engine.generate([Request(p, GREEDY), Request(p, a)])
    assert mixed[1].token_ids == alone
    assert engine.generate([Request(p, SamplingConfig(max_new_tokens=16, seed=8, temperature=1.0, top_p=1.0))])[0].token_ids != alone


@pytest.fixture
def endless(engine):
    """The trained engine without stop tokens: every row runs to its max_new_tokens, so the test decides
    which rows share each step."""
    endless = copy.copy(engine)
    endless.stop_ids = set()
    return endless


def _drain(batch, deltas, steps=None):
    """Step `batch` (`steps` times, or until it is empty), gathering each index's text and last delta."""
    while batch and steps != 0:
        for d in batch.step():
            text, _ = deltas.get(d.index, ("", None))
            deltas[d.index] = (text + d.text, d)
        steps = None if steps is None else steps - 1
    return deltas


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(max_new_tokens=16, seed=5)], ids=["greedy", "seeded"])
def test_requests_joining_mid_decode_get_the_tokens_they_get_alone(endless, sampling):
    # The first to join has a longer prompt than the running rows (their cache is padded to it) and
    # leaves before one of them (the columns only it used are cut); the second has a shorter prompt
    # than the running width (its cache is padded).
    running = [Request(endless.render(CHATS[0]), SamplingConfig(max_new_tokens=48, seed=1)),
               Request(endless.render(CHATS[2]), SamplingConfig(do_sample=False, max_new_tokens=4))]
    late = [Request(endless.render(CHATS[1]), sampling), Request(endless.render(CHATS[2]), sampling)]
    batch, deltas = Batch(endless), {}
    assert batch.add(running) == [0, 1]
    _drain(batch, deltas, steps=3)
    assert batch.add(late[:1]) == [2]
    _drain(batch, deltas, steps=5)
    assert deltas[1][1].finish_reason and len(batch) == 2  # the short row has left
    assert batch.add(late[1:]) == [3]
    _drain(batch, deltas)
    for index, req in [(0, running[0]), (2, late[0]), (3, late[1])]:
        alone = endless.generate([req])[0]
        text, last = deltas[index]
        assert (text, last.tokens, last.finish_reason) == (alone.text, alone.completion_tokens, "length")


def test_rows_that_join_at_different_steps_share_one_sampler_chain(endless):
    # Every sampler on (penalties, DRY, top_k/top_p/min_p, XTC): rows with these settings that arrive
    # over several steps (as a burst reaches the server) join one chain, and each still gets the
    # tokens it gets alone; one leaves early, another joins after it left.
    every = SamplingConfig(repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2, dry_multiplier=0.8,
                           top_k=40, top_p=0.9, min_p=0.02, xtc_threshold=0.1, xtc_probability=0.5, temperature=0.9)
    reqs = [Request(endless.render(CHATS[i % 3]), dataclasses.replace(every, seed=i, max_new_tokens=n))
            for i, n in enumerate([20, 4, 14, 8])]
    batch, deltas = Batch(endless), {}
    batch.add(reqs[:1])
    _drain(batch, deltas, steps=2)
    batch.add(reqs[1:3])
    _drain(batch, deltas, steps=1)
    assert len(batch.cohorts) == 1 and len(batch.cohorts[0].rows) == 3
    _drain(batch, deltas, steps=5)
    assert deltas[1][1].finish_reason and len(batch.cohorts[0].rows) == 2  # the short one left
    batch.add(reqs[3:])
    _drain(batch, deltas, steps=1)
    assert len(batch.cohorts) == 1 and len(batch.cohorts[0].rows) == 3
    _drain(batch, deltas)
    for i, req in enumerate(reqs):
        alone = endless.generate([req])[0]
        assert deltas[i][0] == alone.text and deltas[i][1].tokens == alone.completion_tokens


@contextlib.contextmanager
def input_shapes(engine):
    """The input_ids shape of every forward pass of the engine's model while inside."""
    seen: list[tuple[int, ...]] = []
    hook = engine.model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                  with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def test_a_prompt_shared_by_several_rows_is_prefilled_once(endless):
    # MGRPO's group: G answers to one prompt. The prompt goes through the model once (its KV cache copied
    # to each row), and every row still gets the tokens it gets alone.
    shared = endless.render(CHATS[1])
    reqs = [Request(shared, SamplingConfig(max_new_tokens=10, seed=s, temperature=1.0, top_p=1.0)) for s in range(4)]
    reqs.insert(2, Request(endless.render(CHATS[0]), SamplingConfig(max_new_tokens=10, seed=9)))
    with input_shapes(endless) as seen:
        together = endless.generate(reqs)
    assert seen[0][0] == 2 and all(shape == (5, 1) for shape in seen[1:])  # 2 distinct prompts, then 5 rows
    assert len({r.text for r in together}) == 5
    for req, got in zip(reqs, together):
        assert endless.generate([req])[0].token_ids == got.token_ids


def test_prompts_that_open_alike_share_one_prefill_of_their_common_part(endless):
    """MGRPO's revision prompts: the same conversation, then each its own first answer and note. The
    common part goes through the model once per group, then each prompt's rest on top of its copy;
    every row still gets the tokens it gets alone (prefilled whole)."""
    from tifaforge.engine.generate import SHARED_MIN

    heads = [endless.render(CHATS[1]) + NOVEL * 2, endless.render(CHATS[0]) + NOVEL * 3]
    tails = ["他说：“走吧。”", "她笑了笑。", "夜深了，灯还亮着。", "“你来了。”"]
    prompts = [h + t for h in heads for t in tails]
    ids = [endless.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert min(len(i) for i in ids) > SHARED_MIN + 10
    reqs = [Request(p, SamplingConfig(max_new_tokens=12, seed=s, temperature=1.0, top_p=1.0, repetition_penalty=1.0))
            for s, p in enumerate(prompts)]
    reqs += [Request(prompts[0], GREEDY), Request(prompts[5], GREEDY)]
    with input_shapes(endless) as seen:
        together = endless.generate(reqs)
    # the 2 common openings, then the 8 distinct prompts' own rests (short), then one token per row
    assert seen[0][0] == 2 and seen[1][0] == 8 and seen[1][1] < 20 and seen[2] == (10, 1), seen[:3]
    assert len({r.text for r in together}) >= 8
    for req, got in zip(reqs, together):
        assert endless.generate([req])[0].token_ids == got.token_ids


def test_cancelled_rows_leave_the_batch_and_the_rest_are_unchanged(endless):
    reqs = [Request(endless.render(c), SamplingConfig(max_new_tokens=12, seed=i)) for i, c in enumerate(CHATS)]
    batch, deltas = Batch(endless), {}
    batch.add(reqs)
    _drain(batch, deltas, steps=2)
    batch.cancel([1])
    assert len(batch) == 2
    seen = deltas.get(1, ("", None))[0]
    _drain(batch, deltas)
    assert deltas.get(1, ("", None))[0] == seen  # nothing more for the cancelled row
    for i in (0, 2):
        assert deltas[i][0] == endless.generate([reqs[i]])[0].text


def test_with_sliding_window_layers_a_late_request_waits_for_the_running_ones(endless):
    # Such a cache cannot be left-padded: the late row starts when the batch has drained.
    from tifaforge.engine.generate import Engine

    config = copy.deepcopy(endless.model.config)
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    config.sliding_window = 1024  # wider than any row here: the same tokens as full attention
    model = type(endless.model)(config)
    model.load_state_dict(endless.model.state_dict())
    sliding = Engine(model, endless.tokenizer)
    sliding.stop_ids = set()
    running = Request(sliding.render(CHATS[0]), SamplingConfig(do_sample=False, max_new_tokens=6))
    late = Request(sliding.render(CHATS[1]), GREEDY)
    batch, deltas = Batch(sliding), {}
    batch.add([running])
    _drain(batch, deltas, steps=2)
    batch.add([late])
    _drain(batch, deltas, steps=4)
    assert deltas[0][1].finish_reason == "length" and 1 not in deltas  # nothing for the late row yet
    _drain(batch, deltas)
    assert deltas[1][0] == sliding.generate([late])[0].text


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
    # A seeded sample long enough to hold a stop string: which seed gives one depends on the fixture's
    # weights, so the first such seed is taken (the same seed repeats the same tokens up to the stop).
    for seed in range(20):
        sampling = SamplingConfig(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=24, seed=seed)
        free = engine.generate([Request(p, sampling)])[0]
        if len(free.text) > 6:
            break
    assert len(free.text) > 6, "no seed in 20 gave an answer over 6 characters"
    stop = free.text[3:6]
    cut = engine.generate([Request(p, sampling, stop=[stop])])[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    streamed = "".join(d.text for d in engine.stream([Request(p, sampling, stop=[stop])]))
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
    """A closed stream runs no more forward passes, and the engine answers the next request as a
    fresh one would (nothing of the abandoned request is left in it)."""
    calls = []
    forward = engine.model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    request = Request(engine.render(CHATS[0]), SamplingConfig(max_new_tokens=500, seed=1))
    expected = engine.generate([Request(request.prompt, GREEDY)])[0].text
    engine.model.forward = counting
    try:
        it = engine.stream([request])
        next(it)
        at_close = len(calls)
        it.close()
        assert next(it, None) is None  # the iterator is finished
        assert len(calls) == at_close < 500
        assert engine.generate([Request(request.prompt, GREEDY)])[0].text == expected
    finally:
        del engine.model.forward

def test_banned_strings_step_back_and_never_appear(engine):
    """A banned phrase is taken back to the token where it began and another token is picked there:
    the answer never holds it, what came before it is unchanged, nothing taken back was ever streamed,
    and a row batched beside it decodes as it does alone (its cache is untouched)."""
    p = NOVEL
    greedy = dataclasses.replace(GREEDY, max_new_tokens=40, ignore_eos=True)
    free = engine.generate([Request(p, greedy)])[0]
    assert len(free.text) > 12, free.text
    ban = free.text[6:9]
    banned = dataclasses.replace(greedy, banned_strings=[ban, "never written"])
    out = engine.generate([Request(p, banned)])[0]
    assert ban not in out.text and out.text != free.text
    cut = free.text.find(ban)
    kept = engine.tokenizer.decode(out.token_ids[:len(out.token_ids)])
    assert out.text[:max(0, cut - 4)] == free.text[:max(0, cut - 4)] and kept == out.text
    streamed = [d.text for d in engine.stream([Request(p, banned)])]
    assert "".join(streamed) == out.text
    beside = Request(engine.render(CHATS[1]), greedy)
    both = engine.generate([Request(p, banned), beside])
    assert both[0].text == out.text and both[1].text == engine.generate([beside])[0].text
    sampled = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=40, seed=2, banned_strings=list("的了"))
    assert not set(engine.generate([Request(p, sampled)])[0].text) & {"的", "了"}


def _chat_turns(engine, turns: int, sampling) -> list[str]:
    """A role-play chat of `turns` turns, each prompt the whole history again (as front ends send it)."""
    from tifaforge.chat.template import strip_think

    history = [{"role": "system", "content": "你是沈青崖，青石镇的剑客。" * 4}]
    said = []
    for i in range(turns):
        history.append({"role": "user", "content": f"第{i}句：外面的雨这么大，你要去哪里？"})
        out = engine.generate([Request(engine.render(history), sampling)])[0]
        said.append(out.text)
        history.append({"role": "assistant", "content": strip_think(out.text)})
    return said


def test_prefix_cache_reuses_history_and_changes_nothing(engine):
    """The next turn of a chat starts from the kept KV of the last one: greedy and seeded answers are
    token for token those without the cache, the reuse is counted, and the byte budget holds."""
    from tifaforge.engine.prefix_cache import PrefixCache

    greedy = dataclasses.replace(GREEDY, max_new_tokens=16, repetition_penalty=1.17)
    seeded = SamplingConfig(max_new_tokens=16, seed=7)
    try:
        engine.prefix_cache = None
        plain = [_chat_turns(engine, 4, s) for s in (greedy, seeded)]
        engine.prefix_cache = PrefixCache(64 << 20)
        cached = [_chat_turns(engine, 4, s) for s in (greedy, seeded)]
        stats = engine.prefix_cache.stats()
        assert cached == plain
        assert stats["hits"] >= 6 and stats["reused_tokens"] > 6 * 60, stats  # every later turn reused the history
        small = PrefixCache(engine.prefix_cache.bytes // 3)
        engine.prefix_cache = small
        _chat_turns(engine, 3, greedy)
        assert small.bytes <= small.budget and small.entries  # kept within its budget, oldest out first
        engine.weights_changed()
        assert not small.entries and small.bytes == 0
        engine.prefix_cache = PrefixCache(0)  # a budget of 0 keeps nothing
        _chat_turns(engine, 2, greedy)
        assert not engine.prefix_cache.entries and engine.prefix_cache.hits == 0
    finally:
        engine.prefix_cache = None

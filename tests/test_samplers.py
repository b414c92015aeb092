"""Samplers (engine/samplers.py) on hand-built logits: DRY against a port of llama.cpp, min_p, XTC,
presence/frequency penalties, the chain build_logits_processors() returns, and batch independence."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    MinPLogitsWarper,
    TypicalLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tifaforge.config import SamplingConfig
from tifaforge.engine.samplers import (
    DRYLogitsProcessor,
    LogitBias,
    MinTokens,
    PaddedRepetitionPenalty,
    TopNSigma,
    PresenceFrequencyPenalty,
    XTCLogitsWarper,
    Layout,
    build_logits_processors,
)
from tifaforge.errors import ConfigError

WORDS = ["A", "B", "C", "D", "X", "「", "x「", "a", "b", "c", "d", "e"]


def word_tokenizer(words=WORDS):
    """One token per character ([UNK] is id 0), plus multi-character tokens that only decode."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok)


TOK = word_tokenizer()
V = len(TOK)
ID = {w: TOK.convert_tokens_to_ids(w) for w in WORDS}


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def dry(breakers=(), allowed=2, last_n=-1, mult=0.8, base=1.75, tokenizer=TOK, prompt_lengths=None):
    return DRYLogitsProcessor(mult, base, allowed, last_n, breakers, tokenizer, prompt_lengths)


def penalty(proc, seq: list[int], vocab: int = V) -> torch.Tensor:
    """What `proc` subtracts from all-zero logits after `seq`, as a (vocab,) tensor."""
    return -proc(torch.tensor([seq]), torch.zeros(1, vocab))[0]


# ---------------------------------------------------------------------------------------------
# DRY


def test_dry_blocks_the_repeat_that_argmax_would_continue():
    seq = ids("A B C A B")
    logits = torch.full((1, V), -5.0)
    logits[0, ID["C"]], logits[0, ID["D"]] = 1.0, 0.5  # plain argmax continues the loop with C
    assert logits.argmax().item() == ID["C"]
    out = dry()(torch.tensor([seq]), logits.clone())
    assert out.argmax().item() == ID["D"]
    assert out[0, ID["C"]].item() == pytest.approx(1.0 - 0.8)  # a repeat of exactly allowed_length: base^0


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_dry_penalty_is_multiplier_times_base_to_the_excess_length(n):
    run = "A B C D a b"[: 2 * n - 1]  # n distinct tokens, then X, then the same n again
    seq = ids(run) + ids("X") + ids(run)
    p = penalty(dry(mult=0.8, base=1.75, allowed=2), seq)
    assert p[ID["X"]].item() == pytest.approx(0.8 * 1.75 ** (n - 2))
    assert (p > 0).sum().item() == 1


def test_dry_allowed_length_is_respected():
    seq = ids("A B C A B")  # the repeat "A B" has length 2
    assert penalty(dry(allowed=3), seq)[ID["C"]] == 0
    assert penalty(dry(allowed=2), seq)[ID["C"]].item() == pytest.approx(0.8)
    assert penalty(dry(allowed=1), seq)[ID["C"]].item() == pytest.approx(0.8 * 1.75)


def test_dry_breakers_stop_the_match_and_are_never_penalised():
    seq = ids("「 B C D 「 B")
    assert penalty(dry(breakers=()), seq)[ID["C"]].item() == pytest.approx(0.8)
    assert penalty(dry(breakers=["「"]), seq)[ID["C"]] == 0
    # a token whose text contains the breaker breaks too
    assert penalty(dry(breakers=["「"]), ids("x「 B C D x「 B"))[ID["C"]] == 0
    # the token that would continue "A B" is a breaker itself: exempt
    assert penalty(dry(breakers=["「"]), ids("A B 「 A B"))[ID["「"]] == 0
    assert penalty(dry(breakers=()), ids("A B 「 A B"))[ID["「"]].item() == pytest.approx(0.8)


def test_dry_multi_token_breaker_is_a_token_sequence():
    # "ab" spans two tokens: a head ending in "a", then the tokens of "b"
    assert penalty(dry(breakers=["ab"]), ids("a b C D a b"))[ID["C"]] == 0
    assert penalty(dry(breakers=["ab"]), ids("b a C D b a"))[ID["C"]].item() == pytest.approx(0.8)


def test_dry_penalty_last_n_limits_the_window():
    seq = ids("A B C X X X A B")
    assert penalty(dry(last_n=-1), seq)[ID["C"]].item() == pytest.approx(0.8)
    assert penalty(dry(last_n=5), seq)[ID["C"]] == 0  # the earlier "A B" is out of the window
    assert penalty(dry(last_n=8), seq)[ID["C"]].item() == pytest.approx(0.8)


@pytest.fixture(scope="module")
def bpe():
    from tifaforge.models import presets

    return presets.build_tokenizer()


def test_dry_full_width_breakers_on_byte_level_bpe(bpe):
    breakers = SamplingConfig().dry_sequence_breakers
    q, y, z, w = (bpe.encode(c, add_special_tokens=False)[0] for c in "「甲乙丙")
    vocab = len(bpe)
    d = dry(breakers=breakers, tokenizer=bpe)
    assert penalty(d, [q, y, z, w, q, y], vocab)[z] == 0
    assert penalty(dry(breakers=[], tokenizer=bpe), [q, y, z, w, q, y], vocab)[z].item() == pytest.approx(0.8)
    # a merged token containing the breaker ("：「") breaks as well
    merged = bpe.convert_tokens_to_ids("ï¼ļãĢĮ")
    assert bpe.decode([merged]) == "：「"
    assert penalty(d, [merged, y, z, w, merged, y], vocab)[z] == 0
    # 「 spelled as two byte-level tokens (E3 80 | 8C) is a multi-token breaker, as in llama.cpp
    head, tail = bpe.convert_tokens_to_ids(["ãĢ", "Į"])
    assert bpe.decode([head, tail]) == "「" and q not in (head, tail)
    assert penalty(d, [head, tail, y, z, w, head, tail, y], vocab)[z] == 0
    assert penalty(d, [tail, y, z, w, tail, y], vocab)[z].item() == pytest.approx(0.8)


def dry_reference(tokens, vocab, mult, base, allowed, last_n, breakers):
    """A direct port of llama.cpp's llama_sampler_dry_apply (naive repeat counts, no Z-algorithm).
    `breakers` are token sequences (llama_sampler_init_dry_testing)."""
    processed = [(b[0], b[1:]) for b in breakers]
    last = tokens[-last_n:] if last_n > 0 else tokens
    n = len(last)
    pen = [0.0] * vocab
    if n <= allowed:
        return pen
    rat = lambda i: last[n - 1 - i]  # noqa: E731
    rep_limit = n
    for i in range(n):
        longest = -1
        for head, tail in processed:
            if head == rat(i) and longest < len(tail) <= i and all(tail[o] == rat(i - o - 1) for o in range(len(tail))):
                longest = len(tail)
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed:
        return pen
    best: dict[int, int] = {}
    for k in range(1, n):
        m = 0
        while m + k < n and rat(m) == rat(m + k):
            m += 1
        m = min(m, rep_limit)
        if m >= allowed:
            best[rat(k - 1)] = max(best.get(rat(k - 1), -1), m)
    max_exp = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    singles = {h for h, t in processed if not t}
    for tok, m in best.items():
        if tok not in singles:
            e = min(m - allowed, max_exp) if max_exp > 0 else m - allowed
            pen[tok] = mult * base**e
    return pen


LETTERS = ["a", "b", "c", "d", "e"]


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from(LETTERS), min_size=1, max_size=40),
    prompt=st.integers(1, 40),
    breakers=st.lists(st.sampled_from(["a", "c", "ab", "cd", "bca", "ee"]), max_size=3, unique=True),
    allowed=st.integers(0, 4),
    last_n=st.sampled_from([-1, 1, 2, 3, 5, 8, 13, 40]),
    base=st.sampled_from([1.0, 1.75, 3.0]),
)
def test_dry_equals_a_port_of_llama_cpp_at_every_step(text, prompt, breakers, allowed, last_n, base):
    seq = [ID[c] for c in text]
    proc = dry(breakers, allowed, last_n, 0.8, base)  # the first call computes afresh, later ones update
    for t in range(min(prompt, len(seq)), len(seq) + 1):
        expected = dry_reference(seq[:t], V, 0.8, base, allowed, last_n, [[ID[c] for c in b] for b in breakers])
        torch.testing.assert_close(penalty(proc, seq[:t]), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_dry_exponent_is_capped_like_llama_cpp():
    seq = ids("A B") * 200  # a 400-token loop: base^398 would overflow float32
    proc = dry(mult=0.5, base=1.75, allowed=2)
    for t in (len(seq) - 1, len(seq)):  # computed afresh, then updated by one token
        p = penalty(proc, seq[:t])
        assert torch.isfinite(p).all()
        assert p.max().item() == pytest.approx(0.5 * 1.75 ** int(88.7228391 / math.log(1.75)), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# min_p, XTC, presence/frequency


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def finite(scores: torch.Tensor) -> set[int]:
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def test_min_p_keeps_exactly_tokens_above_min_p_times_the_top():
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, repetition_penalty=1.0, min_p=0.2)
    (proc,) = build_logits_processors(cfg, TOK)
    scores = logits_of([0.5, 0.26, 0.12, 0.08, 0.04])  # cut at 0.2 * 0.5 = 0.1
    assert finite(proc(torch.tensor([[1]]), scores)) == {0, 1, 2}


def test_xtc_with_probability_one_keeps_the_least_likely_top_choice():
    scores = logits_of([0.4, 0.3, 0.2, 0.1])
    out = XTCLogitsWarper(threshold=0.15, probability=1.0)(torch.tensor([[1]]), scores)
    assert finite(out) == {2, 3}
    torch.testing.assert_close(out[0, 2:], scores[0, 2:])


def test_xtc_does_nothing_with_probability_zero_or_one_top_choice():
    scores = logits_of([0.4, 0.3, 0.2, 0.1])
    for _ in range(20):
        assert torch.equal(XTCLogitsWarper(0.15, 0.0)(torch.tensor([[1]]), scores), scores)
    assert torch.equal(XTCLogitsWarper(0.35, 1.0)(torch.tensor([[1]]), scores), scores)  # only one above 0.35


def test_xtc_ignores_tokens_already_cut():
    scores = logits_of([0.5, 0.3, 0.2, 0.0])  # token 3 was cut by an earlier sampler (-inf)
    assert finite(XTCLogitsWarper(0.0, 1.0)(torch.tensor([[1]]), scores)) == {2}


def test_xtc_is_reproducible_with_a_seeded_generator():
    scores = logits_of([0.4, 0.3, 0.2, 0.1]).repeat(64, 1)
    ids_ = torch.ones(64, 1, dtype=torch.long)

    def fired(seed: int) -> torch.Tensor:
        out = XTCLogitsWarper(0.15, 0.5, torch.Generator().manual_seed(seed))(ids_, scores)
        return torch.isinf(out[:, 0])  # (64,) rows where XTC fired

    assert torch.equal(fired(7), fired(7))
    assert not torch.equal(fired(7), fired(8))
    assert 0 < fired(7).sum() < 64  # rows draw independently


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    proc = PresenceFrequencyPenalty(presence=0.5, frequency=0.25)
    prompt = ids("A B C")
    assert torch.equal(proc(torch.tensor([prompt]), torch.zeros(1, V)), torch.zeros(1, V))
    out = proc(torch.tensor([prompt + ids("C C D")]), torch.zeros(1, V))[0]
    assert out[ID["C"]].item() == pytest.approx(-(2 * 0.25 + 0.5))
    assert out[ID["D"]].item() == pytest.approx(-(0.25 + 0.5))
    assert out[ID["A"]] == 0 and out[ID["B"]] == 0  # in the prompt only


# ---------------------------------------------------------------------------------------------
# The chain


def kinds(procs) -> list[type]:
    return [type(p) for p in procs]


def test_default_chain_is_the_seed_settings_in_llama_cpp_order():
    procs = build_logits_processors(SamplingConfig(), TOK)
    assert kinds(procs) == [PaddedRepetitionPenalty, TopPLogitsWarper, TemperatureLogitsWarper]
    assert procs[0].penalty == pytest.approx(1.17)
    assert procs[1].top_p == pytest.approx(0.6)
    assert procs[2].temperature == pytest.approx(0.4)


def test_full_chain_order_and_off_switches():
    cfg = SamplingConfig(
        top_k=40, min_p=0.05, presence_penalty=0.1, frequency_penalty=0.1, dry_multiplier=0.8, xtc_probability=0.5
    )
    assert kinds(build_logits_processors(cfg, TOK)) == [
        PaddedRepetitionPenalty, PresenceFrequencyPenalty, DRYLogitsProcessor,
        TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, XTCLogitsWarper, TemperatureLogitsWarper,
    ]  # fmt: skip
    off = [
        ("dry_penalty_last_n", 0, DRYLogitsProcessor),
        ("xtc_threshold", 0.6, XTCLogitsWarper),  # llama.cpp: above 0.5 is off
        ("presence_penalty", 0.0, None),
    ]
    for key, value, gone in off:
        procs = build_logits_processors(dataclasses.replace(cfg, **{key: value}), TOK)
        assert gone is None or gone not in kinds(procs)
    both_off = dataclasses.replace(cfg, presence_penalty=0.0, frequency_penalty=0.0)
    assert PresenceFrequencyPenalty not in kinds(build_logits_processors(both_off, TOK))
    greedy = build_logits_processors(dataclasses.replace(cfg, do_sample=False), TOK)
    assert kinds(greedy) == [PaddedRepetitionPenalty, PresenceFrequencyPenalty, DRYLogitsProcessor]
    temp0 = build_logits_processors(dataclasses.replace(cfg, temperature=0.0), TOK)
    assert isinstance(temp0[-1], TopKLogitsWarper) and temp0[-1].top_k == 1


@pytest.mark.parametrize(
    "key,value", [("temperature", float("nan")), ("top_p", 1.5), ("dry_base", 0.5), ("repetition_penalty", 0.0)]
)
def test_bad_settings_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        build_logits_processors(dataclasses.replace(SamplingConfig(), **{key: value}), TOK)


def test_batched_rows_match_unbatched_rows_with_adversarial_left_padding():
    # Padding with "A": rows 1 and 2 would see a spurious "A B" repeat / a repeated A if pads counted.
    rows = [ids("A B C A B C"), ids("B X A B"), ids("C D")]
    gen = [ids("A B"), ids("X A"), ids("B C")]
    width = max(map(len, rows))
    cfg = SamplingConfig(
        repetition_penalty=1.3, presence_penalty=0.3, frequency_penalty=0.2, dry_multiplier=0.8,
        top_k=6, top_p=0.95, min_p=0.01, temperature=0.7,
    )  # fmt: skip
    scores = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(0))
    batch = build_logits_processors(cfg, TOK, prompt_lengths=[len(r) for r in rows])
    single = [build_logits_processors(cfg, TOK) for _ in rows]
    padded = torch.tensor([[ID["A"]] * (width - len(r)) + r for r in rows])
    for step in range(len(gen[0]) + 1):
        tail = torch.tensor([g[:step] for g in gen], dtype=torch.long)
        out = batch(torch.cat([padded, tail], 1), scores.clone())
        for i, r in enumerate(rows):
            alone = single[i](torch.tensor([r + gen[i][:step]]), scores[i : i + 1].clone())
            torch.testing.assert_close(out[i : i + 1], alone)
    assert torch.isfinite(out).any(1).all()



def test_a_fixed_layout_gives_rows_that_started_generating_at_different_columns_their_own_result():
    # A continuous batch: row 0 has generated 3 tokens, row 1 one, row 2 none yet; one chain for all
    # three must give each row what a chain of its own (learned layout) gives it. XTC draws from each
    # row's own generator, so a row's draw does not depend on its neighbours.
    prompts = [ids("A B C A B C"), ids("B X A B"), ids("C D")]
    gen = [ids("A B C"), ids("X"), []]
    full = [p + g for p, g in zip(prompts, gen)]
    width = max(map(len, full))
    cfg = SamplingConfig(
        repetition_penalty=1.3, presence_penalty=0.3, frequency_penalty=0.2, dry_multiplier=0.8,
        top_k=6, top_p=0.95, min_p=0.01, xtc_threshold=0.05, xtc_probability=0.5, temperature=0.7,
    )  # fmt: skip
    scores = torch.randn(len(prompts), V, generator=torch.Generator().manual_seed(0))
    pads = torch.tensor([width - len(f) for f in full])
    starts = torch.tensor([width - len(g) for g in gen])
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    chain = build_logits_processors(cfg, TOK, generator=gens, layout=Layout.fixed(pads, starts))
    padded = torch.tensor([[ID["A"]] * (width - len(f)) + f for f in full])
    out = chain(padded, scores.clone())
    for i, (p, g) in enumerate(zip(prompts, gen)):
        single = build_logits_processors(cfg, TOK, generator=torch.Generator().manual_seed(10 + i))
        single(torch.tensor([p]), torch.zeros(1, V))  # the first call learns where the prompt ends
        torch.testing.assert_close(out[i : i + 1], single(torch.tensor([p + g]), scores[i : i + 1].clone()))
    no_xtc = build_logits_processors(dataclasses.replace(cfg, xtc_probability=0.0), TOK, layout=Layout.fixed(pads, starts))
    assert not torch.equal(torch.isfinite(out), torch.isfinite(no_xtc(padded, scores.clone())))  # XTC fired somewhere
    # Presence/frequency count only each row's own generated tokens: row 2 has none, so it is untouched.
    pf = PresenceFrequencyPenalty(1.0, 1.0, layout=Layout.fixed(pads, starts))
    got = pf(padded, torch.zeros(len(full), V))
    assert got[2].eq(0).all() and got[1, ID["X"]] == -2 and got[0, ID["A"]] == -2
    with pytest.raises(ValueError, match="padding"):
        Layout.fixed(torch.tensor([2]), torch.tensor([1]))


# ---------------------------------------------------------------------------------------------
# The samplers SillyTavern and llama.cpp clients send: logit bias, min_tokens / ignore_eos,
# top-n-sigma, typical_p, a repetition-penalty range


def test_chain_with_every_client_sampler_in_llama_cpp_order():
    cfg = SamplingConfig(logit_bias={3: 5.0}, min_tokens=2, top_n_sigma=1.0, typical_p=0.9, top_k=40,
                         repetition_penalty_range=4)
    assert kinds(build_logits_processors(cfg, TOK, stop_ids=[1])) == [
        MinTokens, LogitBias, PaddedRepetitionPenalty, TopNSigma, TopKLogitsWarper, TypicalLogitsWarper,
        TopPLogitsWarper, TemperatureLogitsWarper]
    assert MinTokens not in kinds(build_logits_processors(cfg, TOK))  # no stop ids: nothing to hold back


def test_logit_bias_adds_to_the_chosen_logits():
    out = LogitBias({2: 100.0, 3: -100.0})(torch.tensor([[1, 2]]), torch.zeros(1, V))
    assert out[0, 2] == 100 and out[0, 3] == -100 and out[0, 4] == 0


def test_min_tokens_holds_the_stop_tokens_back_per_row():
    pads, starts = torch.tensor([0, 0]), torch.tensor([3, 1])  # row 0 has generated 1 token, row 1 three
    proc = MinTokens(3, [5, 6], Layout.fixed(pads, starts))
    out = proc(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]), torch.zeros(2, V))
    assert out[0, 5] == -math.inf and out[0, 6] == -math.inf and out[0, 4] == 0
    assert bool((out[1] == 0).all())  # row 1 reached min_tokens
    forever = MinTokens(math.inf, [5], Layout.fixed(pads, starts))(torch.tensor([[1] * 4] * 2), torch.zeros(2, V))
    assert bool((forever[:, 5] == -math.inf).all())


def test_top_n_sigma_keeps_tokens_within_n_deviations_of_the_top():
    scores = torch.tensor([[10.0, 9.0, 0.0, 0.0, 0.0, 0.0, -math.inf]])  # std of the finite ones: ~4.5
    assert torch.isfinite(TopNSigma(1.0)(None, scores.clone()))[0].tolist() == [True, True] + [False] * 5
    assert torch.isfinite(TopNSigma(3.0)(None, scores.clone()))[0].tolist() == [True] * 6 + [False]


def test_repetition_penalty_range_looks_back_n_tokens_only():
    seq = torch.tensor([ids("A B C D")])
    full = PaddedRepetitionPenalty(2.0)(seq, torch.ones(1, V))[0]
    last2 = PaddedRepetitionPenalty(2.0, last_n=2)(seq, torch.ones(1, V))[0]
    assert [float(full[ID[w]]) for w in "ABCD"] == [0.5] * 4
    assert [float(last2[ID[w]]) for w in "ABCD"] == [1.0, 1.0, 0.5, 0.5]


def test_typical_p_of_zero_or_one_is_off():
    for off in (0.0, 1.0):
        assert TypicalLogitsWarper not in kinds(build_logits_processors(SamplingConfig(typical_p=off), TOK))

"""The seed's chat template: rendering vs the card's Jinja, training form and loss mask, checks,
think blocks, role-play prompts. Tokenizers come from the tiny preset (trained in-process)."""

import copy
import glob
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tifaforge.chat import template as T
from tifaforge.errors import TifaError
from tifaforge.models.presets import build_tokenizer

SPELLINGS = ("ascii", "fullwidth")


@pytest.fixture(scope="module", params=SPELLINGS)
def tok(request):
    return build_tokenizer(request.param)


@pytest.fixture(scope="module")
def ascii_tok():
    return build_tokenizer("ascii")


def reference(messages, spelling, add_generation_prompt=False):
    """The card's Jinja rendered directly (plain sandbox, content None kept), `\\n` fix only, then
    the output's tags respelled: an independent path from seed_template()'s respelled template."""
    env = ImmutableSandboxedEnvironment()
    tpl = env.from_string(T.SEED_TEMPLATE.replace("\\\\n", "\\n"))
    text = tpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                      bos_token=T.SPECIAL_TOKENS["ascii"]["bos"])
    for name, tag in T.SPECIAL_TOKENS["ascii"].items():
        text = text.replace(tag, T.SPECIAL_TOKENS[spelling][name])
    return text


def call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


SYS = {"role": "system", "content": "进入Tifa角色引擎..."}
U1 = {"role": "user", "content": "你现在是流浪武士楚夜,正站在长安城屋顶上"}
A1 = {"role": "assistant", "content": "<think>\n需要体现人物孤傲的气质\n</think>\n\n夜风掠过屋檐。"}
U2 = {"role": "user", "content": "Who goes there?"}
A2 = {"role": "assistant", "content": "<think>a</think>mid<think>b</think>最后的回答"}
TOOLS2 = {"role": "assistant", "content": None,
          "tool_calls": [call("weather", '{"city": "长安"}'), call("time", "{}")]}
TOOLS1 = {"role": "assistant", "content": None, "tool_calls": [call("weather", '{"city": "洛阳"}')]}
OUT1 = {"role": "tool", "content": "晴"}
OUT2 = {"role": "tool", "content": "子时"}
A_AFTER_TOOL = {"role": "assistant", "content": "<think>\n查到了\n</think>\n\n长安晴,已是子时。"}

CONVERSATIONS = {
    "one_user": [U1],
    "system_user": [SYS, U1],
    "multi_turn_think": [SYS, U1, A1, U2, A2, U2],
    "ends_assistant": [SYS, U1, A1, U2, A2],
    "two_tool_calls": [U1, TOOLS2, OUT1, OUT2, A_AFTER_TOOL, U2],
    "ends_tool_output": [SYS, U1, TOOLS2, OUT1, OUT2],
    "one_tool_call": [U1, TOOLS1, OUT1, A_AFTER_TOOL],
    "think_then_tools": [SYS, U1, A1, U2, TOOLS2, OUT1, A_AFTER_TOOL, U2],
}


# ---------------------------------------------------------------------------------------------------
# The template as embedded equals the card's Jinja


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_render_equals_seed_jinja(tok, name, gen):
    msgs = CONVERSATIONS[name]
    spelling = T.detect_spelling(tok)
    assert T.render(msgs, tok, add_generation_prompt=gen) == reference(msgs, spelling, gen)
    # The training form renders every conversation not ending in an assistant turn identically.
    if msgs[-1]["role"] != "assistant":
        assert T.render(msgs, tok, add_generation_prompt=gen, training=True) == reference(msgs, spelling, gen)


def test_seed_template_is_the_card_verbatim():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cards = glob.glob(os.path.join(root, "..", "shared", "seed", "*.txt"))  # shared/ lies beside the checkout
    if not cards and not os.environ.get("CI"):  # CI (.ci/run sets CI) has it; another clone may not
        pytest.skip("the seed card ../shared/seed/*.txt is not beside this checkout (CI has it)")
    assert cards, "the seed card (../shared/seed/*.txt beside the checkout) is missing"
    lines = open(cards[0], encoding="utf-8").read().splitlines()
    assert T.SEED_TEMPLATE == lines[lines.index("官方模板参考") + 1]


def test_seed_template_fixes_newline_and_respells():
    assert "'\\\\n'" in T.SEED_TEMPLATE  # the card's JSON-escaping leftover
    for spelling in SPELLINGS:
        t = T.seed_template(spelling)
        assert "\\\\n" not in t
        other = T.SPECIAL_TOKENS["fullwidth" if spelling == "ascii" else "ascii"]
        assert not any(tag in t for tag in other.values())
        assert all(tag in t for name, tag in T.SPECIAL_TOKENS[spelling].items() if name != "bos")


def test_tool_call_renders_real_newlines(tok):
    text = T.render([U1, TOOLS1], tok)
    assert 'weather\n```json\n{"city": "洛阳"}\n```' in text and "\\n" not in text


def test_history_keeps_only_text_after_last_think_close(tok):
    text = T.render(CONVERSATIONS["multi_turn_think"], tok)
    assert "需要体现" not in text and "mid" not in text and "<think>" not in text
    assert "\n\n夜风掠过屋檐。" in text and "最后的回答" in text


def test_tools_argument_is_accepted(tok):
    schema = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    assert T.render([U1], tok, tools=[schema]) == T.render([U1], tok)


def test_special_tokens_spellings():
    assert T.SPECIAL_TOKENS["ascii"]["user"] == "<|User|>"
    assert T.SPECIAL_TOKENS["fullwidth"]["eos"] == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert len(T.special_tokens("fullwidth")) == 13 and T.special_tokens()[0] == "<|begin▁of▁sentence|>"
    with pytest.raises(TifaError, match="spelling"):
        T.special_tokens("halfwidth")


# ---------------------------------------------------------------------------------------------------
# Training form: prompt prefixes render as the seed; the mask is the final turn exactly


ENDING_IN_ASSISTANT = [n for n, c in CONVERSATIONS.items() if c[-1]["role"] == "assistant"]


@pytest.mark.parametrize("name", ENDING_IN_ASSISTANT)
def test_training_prefix_is_the_seed_prompt(tok, name):
    msgs = CONVERSATIONS[name]
    spelling = T.detect_spelling(tok)
    prompt = T.render(msgs[:-1], tok, add_generation_prompt=True, training=True)
    full = T.render(msgs, tok, training=True)
    assert prompt == reference(msgs[:-1], spelling, add_generation_prompt=True)
    assert full == prompt + msgs[-1]["content"] + tok.eos_token  # think block kept
    for k in range(1, len(msgs)):  # every earlier prompt prefix, too
        if msgs[k - 1]["role"] != "assistant":
            assert T.render(msgs[:k], tok, add_generation_prompt=True, training=True) == reference(
                msgs[:k], spelling, add_generation_prompt=True)


@pytest.mark.parametrize("name", ENDING_IN_ASSISTANT)
def test_training_mask_covers_exactly_the_final_turn(tok, name):
    msgs = CONVERSATIONS[name]
    ids, mask = T.training_tokens(msgs, tok)
    answer = tok.encode(msgs[-1]["content"] + tok.eos_token, add_special_tokens=False)
    start = len(ids) - len(answer)
    assert ids[start:] == answer
    assert mask == [0] * start + [1] * len(answer)
    assert ids == tok.encode(T.render(msgs, tok, training=True), add_special_tokens=False)


def test_training_template_has_generation_markers():
    for spelling in SPELLINGS:
        t = T.training_template(spelling)
        assert t.count("{% generation %}") == 2 and "{% generation %}" not in T.seed_template(spelling)


# ---------------------------------------------------------------------------------------------------
# check_template / detect_spelling


def with_template(tokenizer, chat_template, **attrs):
    t = copy.deepcopy(tokenizer)
    t.chat_template = chat_template
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


def plain_tokenizer():
    """A byte-level BPE with no role tags at all, like a plain base model's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(["你好,世界 hello world", "夜风掠过屋檐"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end▁of▁sentence|>",
                                   chat_template=T.seed_template("ascii"))


def test_check_template_accepts_the_preset(tok):
    assert T.check_template(tok) == []
    assert T.detect_spelling(tok) in SPELLINGS


def test_detect_spelling(ascii_tok):
    assert T.detect_spelling(ascii_tok) == "ascii"
    assert T.detect_spelling(build_tokenizer("fullwidth")) == "fullwidth"
    assert T.detect_spelling(plain_tokenizer()) is None


def test_check_template_wrong_spelling(ascii_tok):
    problems = T.check_template(with_template(ascii_tok, T.seed_template("fullwidth")))
    assert any("fullwidth tag spelling but the tokenizer uses ascii" in p for p in problems)
    assert any("<｜User｜> is not a single special token" in p for p in problems)
    assert all("\n" not in p for p in problems)


def test_check_template_tokenizer_without_tags():
    problems = T.check_template(plain_tokenizer())
    assert any("<|Assistant|> is not a single special token" in p and "plain-text tokens" in p
               for p in problems)
    assert any("no role tags" in p for p in problems)


def test_check_template_tags_as_ordinary_vocabulary():
    """Tags present in the vocabulary but not as added tokens are only matched by luck."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{tag: i + 1 for i, tag in enumerate(T.special_tokens())}}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, chat_template=T.seed_template())
    assert tok.encode("<|User|>", add_special_tokens=False) == [3]  # one id alone...
    assert tok.encode("你好<|User|>", add_special_tokens=False) == [0]  # ...but not in context
    problems = T.check_template(tok)
    assert any("<|User|> is not a single special token" in p and "ordinary vocabulary" in p for p in problems)


@pytest.mark.parametrize("chat_template, expected", [
    (None, "no chat template"),
    ("{% if messages %}{{ bos_token }", "malformed (Jinja line 1)"),
    ("{{ messages[0]['content'] + 1 }}", "fails to render"),
])
def test_check_template_bad_templates(ascii_tok, chat_template, expected):
    problems = T.check_template(with_template(ascii_tok, chat_template))
    assert problems and expected in problems[0]


def test_check_template_eos_mismatch(ascii_tok):
    problems = T.check_template(with_template(ascii_tok, T.seed_template(), eos_token="<|endoftext|>"))
    assert problems == [problems[0]] and "generation would not stop" in problems[0]


def test_training_tokens_needs_role_tags():
    with pytest.raises(TifaError, match="role tags"):
        T.training_tokens([U1, A1], plain_tokenizer())


@pytest.mark.parametrize("msgs", [[U1], [U1, TOOLS1], []])
def test_training_tokens_needs_a_final_answer(ascii_tok, msgs):
    with pytest.raises(TifaError, match="must end in an assistant turn"):
        T.training_tokens(msgs, ascii_tok)


# ---------------------------------------------------------------------------------------------------
# split_reasoning / strip_think


@pytest.mark.parametrize("text, started, expected", [
    ("<think>\n想一想\n</think>\n\n回答", False, ("想一想", "回答")),
    ("想一想\n</think>\n\n回答", True, ("想一想", "回答")),  # <think> came from the prompt
    ("想一想</think>回答", False, ("想一想", "回答")),  # ...even if the caller did not say so
    ("<think>\n想到一半", False, ("想到一半", "")),  # cut off inside the block
    ("想到一半", True, ("想到一半", "")),  # cut off inside a block the prompt opened
    ("直接回答", False, (None, "直接回答")),
    ("<think>a</think>b<think>c</think>回答", False, ("a</think>b<think>c", "回答")),
    ("", True, ("", "")),
])
def test_split_reasoning(text, started, expected):
    assert T.split_reasoning(text, started_in_think=started) == expected


def test_strip_think_matches_the_seed():
    assert T.strip_think(A2["content"]) == "最后的回答"
    assert T.strip_think("no block") == "no block"


# ---------------------------------------------------------------------------------------------------
# Role-play prompt format


CARD_EXAMPLE = """<system>进入Tifa角色引擎...</system>
<user>你现在是流浪武士楚夜,正站在长安城屋顶上</user>
<think>
需要体现人物孤傲的气质
加入武侠特有的环境描写
保持对话的冷峻风格
</think>
<楚夜>"""


def test_roleplay_prompt_is_the_cards_example():
    think = "需要体现人物孤傲的气质\n加入武侠特有的环境描写\n保持对话的冷峻风格"
    prompt = T.roleplay_prompt("进入Tifa角色引擎...", U1["content"], "楚夜", think=think)
    assert prompt == CARD_EXAMPLE
    parsed = T.parse_roleplay_prompt(CARD_EXAMPLE)
    assert parsed == T.RoleplayPrompt("进入Tifa角色引擎...", U1["content"], "楚夜", think)
    assert T.roleplay_prompt("s", "u", "楚夜") == "<system>s</system>\n<user>u</user>\n<楚夜>"


@pytest.mark.parametrize("bad", ["", "a<b", "楚/夜", "two\nlines"])
def test_roleplay_prompt_rejects_bad_names(bad):
    with pytest.raises(TifaError, match="character name"):
        T.roleplay_prompt("s", "u", bad)


def test_parse_roleplay_prompt_rejects_other_text():
    with pytest.raises(TifaError, match="not a role-play prompt"):
        T.parse_roleplay_prompt("<|User|>你好<|Assistant|>")


# ---------------------------------------------------------------------------------------------------
# Properties


TEXT = st.text(alphabet=list("你好世界楚夜长安屋顶 abcXYZ019\n\t,.!?<>|/“”"), max_size=24)
PIECES = ["<think>", "</think>", "\n", "想", "答", " ", "x"]
THINKY = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)
ANSWER = st.tuples(st.none() | TEXT, TEXT).map(
    lambda rc: rc[1] if rc[0] is None else f"<think>\n{rc[0]}\n</think>\n\n{rc[1]}")
HISTORY = st.lists(st.tuples(TEXT, ANSWER), max_size=3)


def conversation(system, history, user):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": user}]


@settings(max_examples=50, deadline=None)
@given(system=st.none() | TEXT, history=HISTORY, user=TEXT, answer=ANSWER, training=st.booleans())
def test_prompt_is_a_token_prefix_of_prompt_plus_answer(ascii_tok, system, history, user, answer, training):
    msgs = conversation(system, history, user)
    prompt = T.render(msgs, ascii_tok, add_generation_prompt=True, training=training)
    full = T.render(msgs + [{"role": "assistant", "content": answer}], ascii_tok, training=training)
    p_ids = ascii_tok.encode(prompt, add_special_tokens=False)
    f_ids = ascii_tok.encode(full, add_special_tokens=False)
    assert f_ids[:len(p_ids)] == p_ids
    assert ascii_tok.decode(f_ids) == full  # no normaliser: byte-for-byte round trip


@settings(max_examples=50, deadline=None)
@given(system=st.none() | TEXT, history=HISTORY, user=TEXT, answer=ANSWER)
def test_no_user_or_final_answer_text_is_lost(ascii_tok, system, history, user, answer):
    msgs = conversation(system, history, user) + [{"role": "assistant", "content": answer}]
    text = T.render(msgs, ascii_tok)
    for m in msgs:
        if m["role"] in ("system", "user"):
            assert m["content"] in text
    for _, a in history:
        assert T.strip_think(a) + ascii_tok.eos_token in text
    assert text.endswith(T.strip_think(answer) + ascii_tok.eos_token)
    assert T.render(msgs, ascii_tok, training=True).endswith(answer + ascii_tok.eos_token)


@settings(max_examples=50, deadline=None)
@given(text=THINKY)
def test_strip_think_is_idempotent(text):
    once = T.strip_think(text)
    assert T.strip_think(once) == once and once == text.split("</think>")[-1]
    assert T.THINK_CLOSE not in T.split_reasoning(text)[1]  # the answer never carries a closing tag


@settings(max_examples=50, deadline=None)
@given(reasoning=TEXT, content=TEXT, cut=st.integers(0, 30))
def test_split_reasoning_roundtrip_and_truncation(reasoning, content, cut):
    expected = (reasoning.strip("\n"), content.lstrip())
    assert T.split_reasoning(f"<think>\n{reasoning}\n</think>\n\n{content}") == expected
    assert T.split_reasoning(f"{reasoning}</think>{content}", started_in_think=True) == expected
    # Cut off before </think>: everything is reasoning, no content.
    partial = f"<think>\n{reasoning}"[: len("<think>") + cut]
    assert T.split_reasoning(partial) == (partial[len("<think>"):].strip("\n"), "")


@settings(max_examples=50, deadline=None)
@given(system=TEXT, user=TEXT, character=st.text(alphabet=list("楚夜Tifa 武士"), min_size=1, max_size=6),
       think=st.none() | TEXT)
def test_roleplay_prompt_roundtrip(system, user, character, think):
    prompt = T.roleplay_prompt(system, user, character, think)
    parsed = T.parse_roleplay_prompt(prompt)
    expected_think = None if think is None else think.strip("\n")
    assert parsed == T.RoleplayPrompt(system, user, character, expected_think)

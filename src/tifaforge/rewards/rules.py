"""The logic rules: one small pure function per rule, `(ctx, answer) -> RuleResult`.

    tifa reward score data/demo/sft.jsonl      # every rule's score and message, per line

A rule scores the FULL generated text (think block included) against a `RewardContext` and says
what is wrong in one short sentence in the conversation's language, quoting the offending text
(「……」 in Chinese, "…" in English). Those messages are MGRPO pass 2's error summary and the logs.
The repetition metrics (`ngram_repetition_rate`, `repeated_sentences`, `cross_turn_overlap`,
`distinct_n`) are plain functions of text so eval and DPO pair mining reuse them.

Text is measured in "units": each CJK character is one unit, each Latin word is one unit, so the
same n-gram metric reads Chinese by characters and English by words. Light: stdlib only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tifaforge.chat.template import THINK_CLOSE, THINK_OPEN, split_reasoning, strip_think


@dataclass(frozen=True)
class RuleResult:
    """A rule's verdict: score in [0, 1] (None: could not score, e.g. a judge timeout) and why."""

    score: float | None
    message: str | None = None


OK = RuleResult(1.0)


@dataclass(frozen=True)
class RewardContext:
    """Everything a rule may look at besides the answer; built once per prompt."""

    messages: tuple[Mapping[str, Any], ...] = ()  # the conversation before the answer
    character: str = ""  # the card's character (data.name)
    user: str = ""  # the user's persona name ({{user}}), if known
    language: str = "zh"  # "zh" | "en": the language messages are written in
    blocklist: tuple[str, ...] = ()
    started_in_think: bool = False  # the prompt already ended with <think>
    think_band: tuple[int, int] = (10, 1500)  # zh: characters, en: words
    answer_band: tuple[int, int] = (50, 1500)

    @classmethod
    def from_messages(cls, messages: Sequence[Mapping[str, Any]], card: Mapping | None = None,
                      *, language: str = "auto", **fields: Any) -> RewardContext:
        """From DESIGN §2a messages (the context, without the answer) and a V1/V2/V3 card dict."""
        card = card or {}
        name = (card.get("data") or card).get("name") or ""
        if language == "auto":
            language = detect_language(messages)
        if not fields.get("user"):  # not configured: read it from the transcript, so user_lines still sees it
            fields["user"] = infer_user_name(messages, name)
        return cls(messages=tuple(messages), character=name, language=language, **fields)

    @property
    def previous_answers(self) -> list[str]:
        """Earlier assistant turns as the model sees them (think blocks stripped)."""
        return [strip_think(m.get("content") or "") for m in self.messages if m.get("role") == "assistant"]


Rule = Callable[[RewardContext, str], RuleResult]

# ---------------------------------------------------------------------------------------------
# Text helpers

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNIT_RE = re.compile(rf"[{_CJK}]|[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_SENTENCE_RE = re.compile(r"[^。！？!?…\n]+?(?:[。！？!?…]+|\.(?=\s|$)|$)[”」』\"’）)]*", re.M)
_QUOTED_RE = re.compile(r"“[^”]*”|「[^」]*」|\"[^\"]*\"")
_ZH_NUM = "一二三四五六七八九十"


def units(text: str) -> list[str]:
    """CJK characters and Latin words, lower-cased; punctuation and spaces dropped."""
    return [u.lower() for u in _UNIT_RE.findall(text)]


def cjk_ratio(text: str) -> float:
    """CJK characters / (CJK characters + Latin letters); 0.0 for text with neither."""
    cjk = len(re.findall(rf"[{_CJK}]", text))
    latin = len(re.findall(r"[A-Za-z]", text))
    return cjk / (cjk + latin) if cjk + latin else 0.0


def detect_language(messages: Sequence[Mapping[str, Any]]) -> str:
    """"zh" or "en" from the user turns (all turns if there are none); Chinese when unsure."""
    texts = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    text = "".join(texts) or "".join(m.get("content") or "" for m in messages)
    if not re.search(r"[A-Za-z]", text):
        return "zh"
    return "zh" if cjk_ratio(text) >= 0.3 else "en"


# Where a transcript names the user's persona when no config does. A front end either prefixes the
# user's turns with the name (SillyTavern's "Message content" names behaviour, most chat logs), sends it
# in the message's `name` field (its "Completion object" behaviour), or substitutes {{user}} in a
# system prompt: ours (chat/cards.py) and SillyTavern's default main prompt.
_NAME = r"[^\s:：,，.。!！?？\"“”「」<>()（）\[\]]{1,16}(?: [A-Z][a-z]{1,15})?"
_PREFIX_RE = re.compile(rf"^[ \t*_]*({_NAME})[ \t]*[：:]", re.M)
_SYSTEM_NAME_RES = (
    re.compile(rf"正在与({_NAME})进行角色扮演"), re.compile(rf"不要替({_NAME})说话"),
    re.compile(rf"\brole-playing with ({_NAME})[.,;]"), re.compile(rf"\bnever speak or act for ({_NAME})[.,;]"),
    re.compile(rf"\bchat between .{{1,40}}? and ({_NAME})\."),
)


# Openers that label a line rather than name a speaker ("旁白：", "注意：", "OOC:"), and pronouns.
_NOT_NAMES = {"我", "你", "他", "她", "它", "我们", "你们", "他们", "旁白", "注意", "场景", "时间", "地点", "背景", "提示",
              "系统", "备注", "说明", "设定", "用户", "i", "me", "you", "he", "she", "we", "user", "system", "note",
              "ooc", "narrator", "scene", "setting", "time", "place", "action", "context"}


def _could_be_name(name: str) -> bool:
    """A speaker's name, not a label, a pronoun, one CJK character or a clause ending in a speech verb."""
    cjk = re.fullmatch(rf"[{_CJK}]+", name) is not None
    return name.lower() not in _NOT_NAMES and not (cjk and len(name) < 2) and name[-1] not in "说道问答笑喊"


def infer_user_name(messages: Sequence[Mapping[str, Any]], character: str = "") -> str:
    """The user's persona name as the transcript shows it, or "" when it does not.

    In order: a `name` field on the user's turns; the name that opens at least half of the user's
    turns as `NAME：`/`NAME:` (not the character's); a system prompt's "正在与NAME进行角色扮演",
    "role-playing with NAME." or "a fictional chat between CHAR and NAME."."""
    users = [m for m in messages if m.get("role") == "user"]
    for m in users:
        if isinstance(m.get("name"), str) and m["name"].strip() and m["name"].strip() != character:
            return m["name"].strip()
    openers = Counter()
    for m in users:
        if hit := _PREFIX_RE.match(m.get("content") or ""):
            openers[hit.group(1)] += 1
    for name, n in openers.most_common():
        if name != character and 2 * n >= len(users) and _could_be_name(name):
            return name
    for m in messages:
        if m.get("role") == "system":
            for pattern in _SYSTEM_NAME_RES:
                if (hit := pattern.search(m.get("content") or "")) and hit.group(1) != character:
                    return hit.group(1)
    return ""


def sentences(text: str) -> list[tuple[int, str]]:
    """(paragraph index, sentence) split on 。！？!?… and '. '; closing quotes stay attached."""
    paras = [p for p in text.split("\n") if p.strip()]
    return [(i, m.group().strip()) for i, p in enumerate(paras) for m in _SENTENCE_RE.finditer(p)
            if m.group().strip()]


def _ngrams(seq: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def _length(text: str, lang: str) -> int:
    """Chinese: non-space characters; English: words."""
    return len(re.sub(r"\s", "", text)) if lang == "zh" else len(text.split())


def _ramp(x: float, good: float, bad: float) -> float:
    """1 at `good`, 0 at `bad`, linear between (either direction)."""
    t = (x - good) / (bad - good)
    return min(1.0, max(0.0, 1.0 - t))


def quoted(ctx: RewardContext, text: str, limit: int | None = None) -> str:
    """Quote text in the conversation's style, whitespace collapsed, truncated with …"""
    limit = limit or (20 if ctx.language == "zh" else 40)
    t = " ".join(text.split())
    t = t if len(t) <= limit else t[:limit] + "…"
    return f"「{t}」" if ctx.language == "zh" else f'"{t}"'


def say(ctx: RewardContext, zh: str, en: str) -> str:
    return zh if ctx.language == "zh" else en


def _nth(i: int) -> str:
    """0-based index -> 第一/第二… (Chinese ordinal of a paragraph)."""
    return _ZH_NUM[i] if i < 10 else str(i + 1)


def answer_content(ctx: RewardContext, answer: str) -> str:
    return split_reasoning(answer, started_in_think=ctx.started_in_think)[1]


def _band(ctx: RewardContext, n: int, band: tuple[int, int], what_zh: str, what_en: str,
          quote: str) -> RuleResult:
    """Score a length against a band: proportional below, falling to 0 at twice the top above."""
    lo, hi = band
    unit_zh, unit_en = "字", "words"
    if n < lo:
        return RuleResult(n / lo, say(ctx, f"{what_zh}太短（{n}{unit_zh}，至少{lo}{unit_zh}）：{quoted(ctx, quote)}",
                                       f"{what_en} too short ({n} {unit_en}, at least {lo}): {quoted(ctx, quote)}"))
    if n > hi:
        return RuleResult(max(0.0, 1 - (n - hi) / hi),
                          say(ctx, f"{what_zh}太长（{n}{unit_zh}，最多{hi}{unit_zh}）",
                               f"{what_en} too long ({n} {unit_en}, at most {hi})"))
    return OK


# ---------------------------------------------------------------------------------------------
# Repetition metrics (reused by eval and DPO pair mining)


def ngram_repetition_rate(text: str, n: int = 4) -> float:
    """Share of the text's unit n-grams that repeat an earlier one: 0 = none, →1 = a loop."""
    grams = _ngrams(units(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


class Repeat(NamedTuple):
    sentence: str
    first: int  # paragraph index (0-based) of the first occurrence
    again: int  # paragraph index of the repeat


def repeated_sentences(text: str, min_units: int = 4) -> list[Repeat]:
    """Every sentence (of at least `min_units` units) that already occurred earlier in the text."""
    seen: dict[tuple[str, ...], int] = {}
    out = []
    for para, s in sentences(text):
        key = tuple(units(s))
        if len(key) < min_units:
            continue
        if key in seen:
            out.append(Repeat(s, seen[key], para))
        else:
            seen[key] = para
    return out


def cross_turn_overlap(answer: str, previous: Iterable[str], n: int = 6) -> float:
    """Share of the answer's unit n-grams already present in earlier assistant turns."""
    grams = _ngrams(units(answer), n)
    old = {g for p in previous for g in _ngrams(units(p), n)}
    return sum(g in old for g in grams) / len(grams) if grams and old else 0.0


def distinct_n(texts: str | Iterable[str], n: int = 2) -> float:
    """Distinct unit n-grams / all unit n-grams over one text or a corpus (0.0 when empty)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    grams = [g for t in texts for g in _ngrams(units(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _most_repeated(text: str, n: int) -> tuple[str, int]:
    """The text from the first occurrence of its most frequent unit n-gram on, and its count."""
    spans = list(_UNIT_RE.finditer(text))
    grams = Counter(_ngrams([m.group().lower() for m in spans], n))
    if not grams:
        return "", 0
    gram, count = grams.most_common(1)[0]
    for i in range(len(spans) - n + 1):
        if tuple(m.group().lower() for m in spans[i:i + n]) == gram:
            return text[spans[i].start():], count
    return "", count  # unreachable: the gram came from these spans


# ---------------------------------------------------------------------------------------------
# The rules


def think_format(ctx: RewardContext, answer: str) -> RuleResult:
    """Exactly one <think>…</think> block, nothing before it, a non-empty answer after it."""
    text = (THINK_OPEN if ctx.started_in_think else "") + answer
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if opens == closes == 0:
        return RuleResult(0.0, say(ctx, "缺少<think>…</think>思考部分", "no <think>…</think> block"))
    if opens > 1 or closes > 1:
        k = max(opens, closes)
        return RuleResult(0.0, say(ctx, f"有{k}个思考块，应只有一个", f"{k} think blocks, expected exactly one"))
    if closes == 0:
        return RuleResult(0.0, say(ctx, "思考部分没有用</think>结束", "the think block never ends with </think>"))
    if opens == 0:
        return RuleResult(0.0, say(ctx, "思考部分缺少开头的<think>", "the think block has no opening <think>"))
    if text.index(THINK_CLOSE) < text.index(THINK_OPEN):
        return RuleResult(0.0, say(ctx, "</think>出现在<think>之前", "</think> comes before <think>"))
    before = text[:text.index(THINK_OPEN)]
    if before.strip():
        return RuleResult(0.0, say(ctx, f"思考部分之前有正文{quoted(ctx, before)}",
                                    f"text before the think block: {quoted(ctx, before)}"))
    if not answer_content(ctx, answer).strip():
        return RuleResult(0.0, say(ctx, "</think>之后没有正文", "no answer after </think>"))
    return OK


def think_length(ctx: RewardContext, answer: str) -> RuleResult:
    """The think block's length within ctx.think_band (an absent block scores 0)."""
    reasoning, _ = split_reasoning(answer, started_in_think=ctx.started_in_think)
    if reasoning is None:
        return RuleResult(0.0, say(ctx, "缺少<think>…</think>思考部分", "no <think>…</think> block"))
    return _band(ctx, _length(reasoning, ctx.language), ctx.think_band, "思考", "thinking", reasoning)


_AI_BREAK = re.compile(
    r"作为(?:一个|一名|一款)?(?:AI|ＡＩ|人工智能|(?:大型?)?语言模型|智能助手|虚拟助手)"
    r"|我(?:只)?是(?:一个|一款)?(?:AI|ＡＩ|人工智能|(?:大型?)?语言模型|AI助手|聊天机器人)"
    r"|我是(?:通义千问|ChatGPT|DeepSeek|Claude|Qwen)"
    r"|\bas an? (?:AI|artificial intelligence|(?:large )?language model|AI assistant|virtual assistant)\b"
    r"|\bI(?:['’]m| am) (?:just |only )?an? "
    r"(?:AI|artificial intelligence|(?:large )?language model|AI assistant|chatbot)\b",
    re.I,
)
_SPEAKER_TAG = re.compile(r"^\s*[<＜]([^<>＜＞/\n]{1,20})[>＞]")

# The think block's planning voice in the visible answer ("用户问……", "the user wants…"): no character
# in a story calls the other party "the user". Seen on the demo: an MGRPO policy opened every answer with
# 「用户问」 and the other rules still scored it 0.95; the held-out slop metric is what showed it.
# Only where a clause starts, so story prose about an app's users ("这款软件的用户说明书") is not caught.
_META_TALK = re.compile(
    r"(?:^|(?<=[。！？!?\n，,：:；;“”「」\s]))用户(?:问|说(?!明)|想|让|希望|提到|提出|试图|在问|的(?:问题|请求|要求))"
    r"|(?:^|(?<=[.!?\n])\s*)the user(?:['’]s)? (?:asks?|asked|wants?|wanted|is asking|requests?|question|request)\b",
    re.I | re.M,
)


def in_character(ctx: RewardContext, answer: str) -> RuleResult:
    """No "作为AI…/As an AI…" break, no planning about "the user" in the answer; no opening <Name> tag
    of someone other than the character."""
    content = answer_content(ctx, answer)
    if m := _AI_BREAK.search(content):
        return RuleResult(0.0, say(ctx, f"跳出了角色：{quoted(ctx, content[m.start():])}",
                                    f"breaks character: {quoted(ctx, content[m.start():])}"))
    if m := _META_TALK.search(content):
        return RuleResult(0.0, say(ctx, f"在回答里谈论“用户”，跳出了角色：{quoted(ctx, content[m.start():])}",
                                    f'talks about "the user" in the answer, out of character: '
                                    f"{quoted(ctx, content[m.start():])}"))
    tag = _SPEAKER_TAG.match(content)
    if ctx.character and tag and tag.group(1).strip() not in (ctx.character, "think"):
        name = tag.group(1).strip()
        return RuleResult(0.0, say(ctx, f"以「{name}」而不是「{ctx.character}」的身份说话",
                                    f'speaks as "{name}" instead of "{ctx.character}"'))
    return OK


def _user_line_re(names: Iterable[str]) -> re.Pattern:
    alts = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True) if n)
    return re.compile(
        rf"^[ \t*_>]*(?:[<＜](?:{alts})[>＞]|(?:{alts})[ \t]*[：:]"
        rf"|(?:{alts})[ \t]*(?:说道|笑道|回答|说|道|问|答|喊)[：:，,]?[ \t]*[“「\"]"
        rf"|(?:{alts}),? (?:said|says|asks|asked|replies|replied)[,:]?[ \t]*[\"“])",
        re.M | re.I,
    )


def user_lines(ctx: RewardContext, answer: str) -> RuleResult:
    """The answer must not write the user's lines (`{user}：…`, `<{user}>`, `你说：“…”`)."""
    content = answer_content(ctx, answer)
    names = [ctx.user, infer_user_name(ctx.messages, ctx.character), "{{user}}", "用户", "user", "你", "you"]
    if m := _user_line_re(names).search(content):
        line = content[m.start():].lstrip(" \t*_>")
        return RuleResult(0.0, say(ctx, f"替用户说了话：{quoted(ctx, line)}", f"writes the user's lines: {quoted(ctx, line)}"))
    return OK


# Assistant refusals, not a character declining inside the story ("抱歉，我不能告诉你他的下落"):
# each pattern needs a service verb (提供/协助/满足/生成… help/assist/provide…) or "request".
_CANT = r"(?: can['’]t| cannot| won['’]t| am unable to| am not able to|['’]m unable to|['’]m not able to)"
_REFUSAL = re.compile(
    r"(?:抱歉|对不起|很遗憾|不好意思)[^。！？\n]{0,6}(?:无法|不能|没法|不便|不可以)(?:为你|为您|帮你|帮您)?"
    r"(?:提供|协助|满足|生成|创作|参与|继续(?:这个|这类|此类|该)?(?:话题|对话|角色扮演))"
    r"|我(?:无法|不能)(?:满足|协助|完成|处理|回应)(?:你|您)?的?(?:这个|这一|该|此)?(?:请求|要求)"
    r"|(?:这个|该|此)(?:请求|话题|内容)(?:违反|不符合)"
    rf"|\bI(?:['’]m| am) sorry,? but I{_CANT} (?:help|assist|comply|continue with|provide|fulfill|create|write|generate|engage)"
    rf"|\bI{_CANT} (?:help|assist|comply|provide|fulfill|create|write|generate|engage)(?: you)?(?: with)? (?:that|this|your request|such)"
    r"|\b(?:this|that|your) request (?:violates|goes against|is against)",
    re.I,
)


def refusal(ctx: RewardContext, answer: str) -> RuleResult:
    """No assistant-style refusal (抱歉，我无法… / I can't help with that…)."""
    content = answer_content(ctx, answer)
    if m := _REFUSAL.search(content):
        return RuleResult(0.0, say(ctx, f"拒绝了请求：{quoted(ctx, content[m.start():])}",
                                    f"refuses: {quoted(ctx, content[m.start():])}"))
    return OK


def repetition(ctx: RewardContext, answer: str) -> RuleResult:
    """Unit 4-gram loops, repeated sentences and copying earlier turns; the worst one scores."""
    content = answer_content(ctx, answer)
    found: list[tuple[float, str | None]] = []
    rate = ngram_repetition_rate(content, 4)
    reps = repeated_sentences(content)
    if rate > 0.15:  # quoted only when no repeated sentence already shows the loop
        at, count = _most_repeated(content, 4)
        found.append((_ramp(rate, 0.15, 0.5), None if reps else say(
            ctx, f"词句循环重复（重复率{rate:.0%}），{quoted(ctx, at)}这样的片段出现了{count}次",
            f"loops (repetition rate {rate:.0%}): {quoted(ctx, at)} occurs {count} times")))
    if reps:
        r = reps[0]
        found.append((max(0.0, 1 - len(reps) / 3), say(
            ctx, f"第{_nth(r.again)}段重复了第{_nth(r.first)}段的句子{quoted(ctx, r.sentence)}"
            if r.again != r.first else f"句子{quoted(ctx, r.sentence)}重复出现",
            f"paragraph {r.again + 1} repeats a sentence of paragraph {r.first + 1}: {quoted(ctx, r.sentence)}"
            if r.again != r.first else f"the sentence {quoted(ctx, r.sentence)} is repeated")))
    overlap = cross_turn_overlap(content, ctx.previous_answers)
    if overlap > 0.2:
        old = {g for p in ctx.previous_answers for g in _ngrams(units(p), 6)}
        worst = max(sentences(content), key=lambda ps: sum(g in old for g in _ngrams(units(ps[1]), 6)))[1]
        found.append((_ramp(overlap, 0.2, 0.6), say(
            ctx, f"与之前的回答重合{overlap:.0%}，如{quoted(ctx, worst)}",
            f"{overlap:.0%} copied from earlier replies, e.g. {quoted(ctx, worst)}")))
    if not found:
        return OK
    found.sort(key=lambda f: f[0])
    return RuleResult(found[0][0], say(ctx, "；", "; ").join([m for _, m in found if m][:2]))


def language_match(ctx: RewardContext, answer: str) -> RuleResult:
    """The answer is written in the conversation's language (by its share of CJK characters)."""
    content = answer_content(ctx, answer)
    ratio = cjk_ratio(content)
    if ctx.language == "zh":
        score = _ramp(ratio, 0.6, 0.2)
        off = re.search(r"[A-Za-z][A-Za-z ,.'’!?]{10,}", content)
        msg = f"没有用中文回答（中文仅占{ratio:.0%}）" + (f"：{quoted(ctx, off.group())}" if off else "")
    else:
        score = _ramp(ratio, 0.05, 0.3)
        off = re.search(rf"[{_CJK}][{_CJK}，。！？、]*", content)
        msg = f"not written in English ({ratio:.0%} Chinese)" + (f": {quoted(ctx, off.group())}" if off else "")
    return OK if score >= 1 else RuleResult(score, msg)


def answer_length(ctx: RewardContext, answer: str) -> RuleResult:
    """The answer (after the think block) within ctx.answer_band: zh characters, en words."""
    content = answer_content(ctx, answer)
    return _band(ctx, _length(content, ctx.language), ctx.answer_band, "回答", "answer", content)


SENSORY_ZH = tuple(
    "月光 阳光 灯光 烛光 火光 微光 阴影 昏暗 闪烁 猩红 苍白 暮色 雾气 "
    "声音 低语 呢喃 沙沙 轰鸣 回响 寂静 脚步声 呼吸声 叹息 嘶哑 "
    "气味 香气 清香 幽香 腥味 芬芳 酒香 檀香 霉味 烟味 "
    "苦涩 甘甜 咸涩 辛辣 滋味 "
    "冰凉 温热 粗糙 柔软 滚烫 湿润 刺骨 触感 颤抖 微凉 温暖 寒意 微风 寒风 雨滴".split())
SENSORY_EN = tuple(
    "light shadow glow gleam flicker dim crimson pale mist whisper murmur echo rustle silence hum "
    "creak scent smell fragrance stench smoke bitter sweet salty taste cold warm rough soft damp "
    "icy tremble shiver breeze rain".split())


_SENSORY_EN_RE = re.compile(rf"\b({'|'.join(SENSORY_EN)})(?:s|ed|ing|ly|y)?\b", re.I)


def _sensory_hits(text: str) -> dict[str, int]:
    """How often each sensory word occurs (Chinese by substring, English as whole words)."""
    hits = Counter({w: text.count(w) for w in SENSORY_ZH if w in text})
    hits.update(m.group(1).lower() for m in _SENSORY_EN_RE.finditer(text))
    return dict(hits)


def texture(ctx: RewardContext, answer: str) -> RuleResult:
    """Lexical diversity, dialogue/narration balance, sensory detail; stuffing is penalised.

    Each part saturates (one distinct sensory word per 100 units is enough) and the composite caps
    the rule, so a normal answer already earns all the credit there is; more than 8 sensory words
    per 100 units is stuffing and scales the score down.
    """
    content = answer_content(ctx, answer)
    if not units(content):  # nothing after the think block: no texture to credit, nothing to quote
        return RuleResult(0.0, say(ctx, "没有正文", "no answer text"))
    n = max(1, len(units(content)))
    d2 = distinct_n(content, 2)
    at, count = _most_repeated(content, 2)
    parts = [(_ramp(d2, 0.7, 0.4), say(ctx, f"用词单调：{quoted(ctx, at, 8)}出现了{count}次",
                                        f"monotonous wording: {quoted(ctx, at, 12)} occurs {count} times"))]
    chars = max(1, len(re.sub(r"\s", "", content)))
    talk = sum(len(m.group()) for m in _QUOTED_RE.finditer(content)) / chars
    if talk < 0.1:
        parts.append((0.5 + 5 * talk, say(ctx, "几乎没有对白，全是叙述", "almost no dialogue, only narration")))
    else:
        parts.append((_ramp(talk, 0.8, 1.0) * 0.7 + 0.3, say(ctx, "几乎全是对白，缺少叙述和描写",
                                                             "almost all dialogue, no narration")))
    hits = _sensory_hits(content)
    parts.append((min(1.0, len(hits) / max(1.0, n / 100)), say(
        ctx, "缺少感官描写（光影、声音、气味、触感）", "little sensory detail (light, sound, smell, touch)")))
    score = sum(s for s, _ in parts) / len(parts)
    worst = min(parts, key=lambda p: p[0])
    density = 100 * sum(hits.values()) / n
    if density > 8:  # stuffing scales the whole rule down: below the composite's cap, it loses credit
        listed = "".join(f"「{w}」" for w in list(hits)[:4]) if ctx.language == "zh" else ", ".join(list(hits)[:4])
        worst = (0.0, say(ctx, f"感官词堆砌：{listed}…", f"stuffed sensory words: {listed}…"))
        score *= _ramp(density, 8, 16)
    return RuleResult(score, worst[1] if worst[0] < 0.7 else None)


def blocklist(ctx: RewardContext, answer: str) -> RuleResult:
    """None of the user's blocked words in the answer (the think block may name them: it plans)."""
    content = answer_content(ctx, answer)
    low = content.lower()
    for word in ctx.blocklist:
        if word and (i := low.find(word.lower())) >= 0:
            return RuleResult(0.0, say(ctx, f"出现了屏蔽词「{word}」：{quoted(ctx, content[max(0, i - 8):])}",
                                        f'blocked word "{word}": {quoted(ctx, content[max(0, i - 8):])}'))
    return OK


RULES: dict[str, Rule] = {
    "think_format": think_format,
    "think_length": think_length,
    "in_character": in_character,
    "user_lines": user_lines,
    "refusal": refusal,
    "repetition": repetition,
    "language": language_match,
    "answer_length": answer_length,
    "texture": texture,
    "blocklist": blocklist,
}

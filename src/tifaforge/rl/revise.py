"""Pass 2 of MGRPO as a prompt: the first answer, what the rules found wrong, and "rewrite it in character".

    tifa chat models/tiny --revise      # at inference: each answer revised once before it is shown

`revision_messages` builds x' = the original conversation + the first answer + an out-of-character
note (SillyTavern's "OOC" convention, so the fiction is not broken by a bare instruction) listing the
reward's error summary and asking for a rewrite in character, in the conversation's language.
The chat template keeps only the text after `</think>` of earlier assistant turns, so the first
answer's think block is not shown; the summary says what was wrong with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_ZH = ("（OOC：你上一条回复有这些问题：\n{problems}\n请以{char}的身份重写上一条回复，保持角色，"
       "先在<think></think>里简短思考，再写正文。）")
_ZH_NONE = "（OOC：请以{char}的身份重写上一条回复，写得更好：保持角色，先在<think></think>里简短思考，再写正文。）"
_EN = ("(OOC: your last reply had these problems:\n{problems}\nRewrite your last reply as {char}, staying "
       "in character: think briefly inside <think></think> first, then write the reply.)")
_EN_NONE = ("(OOC: rewrite your last reply as {char}, better, staying in character: think briefly inside "
            "<think></think> first, then write the reply.)")


def revision_note(summary: str, language: str, character: str = "") -> str:
    """The out-of-character request to revise, listing `summary` (the reward's messages, one per line)."""
    zh = language == "zh"
    char = character or ("你的角色" if zh else "your character")
    if summary.strip():
        return (_ZH if zh else _EN).format(problems=summary.strip(), char=char)
    return (_ZH_NONE if zh else _EN_NONE).format(char=char)


def revision_messages(messages: Sequence[Mapping[str, Any]], answer: str, summary: str, language: str,
                      character: str = "") -> list[dict]:
    """x' for one first answer: the conversation, the answer as an assistant turn, the OOC note."""
    return [*(dict(m) for m in messages), {"role": "assistant", "content": answer},
            {"role": "user", "content": revision_note(summary, language, character)}]


@dataclass
class Revision:
    """What one pass 2 at inference did: the first answer and its score and messages, and the answer
    kept (`final`: the rewrite when it scored higher, else the first answer)."""

    first: Any  # engine Result
    final: Any
    first_score: float
    summary: str  # the rules' messages on the first answer ("" when they found nothing)
    rewrite: Any = None  # the rewrite's Result, when one was asked for
    rewrite_score: float | None = None
    language: str = "zh"  # the conversation's, for `describe`

    @property
    def revised(self) -> bool:
        return self.final is not self.first

    def describe(self) -> str:
        """One line for a user, in the conversation's language: what the rules found, which answer is shown."""
        zh = self.language == "zh"
        if not self.summary:
            return "（自我修订：规则没有发现问题）" if zh else "(revise: the rules found nothing to fix)"
        found = "；".join(self.summary.splitlines()) if zh else "; ".join(self.summary.splitlines())
        if zh:
            return (f"（自我修订：初稿 {self.first_score:.2f}，{found}。重写 {self.rewrite_score:.2f}，"
                    f"{'采用重写' if self.revised else '保留初稿'}）")
        return (f"(revise: first answer {self.first_score:.2f}: {found}. Rewrite {self.rewrite_score:.2f}: "
                f"{'shown' if self.revised else 'first answer kept'})")


def revision(engine, messages: Sequence[Mapping[str, Any]], result, reward, sampling,
             card: Mapping | None = None, stop: Sequence[str] = ()) -> Revision:
    """Run pass 2 once at inference: score `result` against `messages`, and if the rules complain, ask
    for a rewrite with their messages and keep whichever scores higher (the first answer on a tie).
    `reward` is a `LogicReward`."""
    from tifaforge.engine.generate import Request

    ctx = reward.context(messages, card)
    first = reward.score(ctx, result.text)
    if not first.summary:
        return Revision(result, result, first.total, "", language=ctx.language)
    prompt = engine.render(revision_messages(messages, result.text, first.summary, ctx.language, ctx.character))
    second = engine.generate([Request(prompt, sampling, stop)])[0]
    score = reward.score(ctx, second.text).total
    return Revision(result, second if score > first.total else result, first.total, first.summary, second, score,
                    ctx.language)


def answer_revised(engine, messages: Sequence[Mapping[str, Any]], reward, sampling, card: Mapping | None = None,
                   prompt: str | None = None, stop: Sequence[str] = ()) -> Revision:
    """Answer `messages` after one self-revision: the first answer is generated whole (not shown),
    scored by the rules, rewritten once with their messages if they complain, and the better of the two
    is the answer. `prompt`: the rendered conversation, when the caller has it (e.g. trimmed to fit)."""
    from tifaforge.engine.generate import Request

    first = engine.generate([Request(prompt if prompt is not None else engine.render(list(messages)), sampling, stop)])[0]
    return revision(engine, messages, first, reward, sampling, card, stop)

"""Pass 2 of MGRPO as a prompt: the first answer, what the rules found wrong, and "rewrite it in character".

    tifa chat models/tiny --revise      # at inference: one revision with the rules' messages

`revision_messages` builds x' = the original conversation + the first answer + an out-of-character
note (SillyTavern's "OOC" convention, so the fiction is not broken by a bare instruction) listing the
reward's error summary and asking for a rewrite in character, in the conversation's language.
The chat template keeps only the text after `</think>` of earlier assistant turns, so the first
answer's think block is not shown; the summary says what was wrong with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def revise(engine, messages: Sequence[Mapping[str, Any]], result, reward, sampling, card: Mapping | None = None):
    """Run pass 2 once at inference: score `result` against `messages`, ask for a revision with the
    rules' messages, and return whichever of the two scores higher (the first answer on a tie or
    when no rule complained). `reward` is a `LogicReward`; returns an engine `Result`."""
    from tifaforge.engine.generate import Request

    ctx = reward.context(messages, card)
    first = reward.score(ctx, result.text)
    if not first.summary:
        return result
    prompt = engine.render(revision_messages(messages, result.text, first.summary, ctx.language, ctx.character))
    second = engine.generate([Request(prompt, sampling)])[0]
    return second if reward.score(ctx, second.text).total > first.total else result

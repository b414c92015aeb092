"""`tifa export sillytavern`: the presets carry the card's sampling, and a prompt built from the
text-mode templates the way SillyTavern builds one is the prompt `tifa serve` renders."""

from __future__ import annotations

import json

from tifaforge import cli
from tifaforge.chat.template import render_serving


def st_instruct_prompt(master: dict, system: str, turns: list[tuple[str, str]]) -> str:
    """SillyTavern's instruct formatting (public/scripts/instruct-mode.js) for a chat of alternating
    turns ending with the user's: story string, then each message with its sequences and suffixes,
    then the output sequence the reply follows."""
    ins, ctx = master["instruct"], master["context"]
    story = ctx["story_string"].replace("{{#if system}}{{system}}\n{{/if}}", f"{system}\n" if system else "")
    story = story.split("{{#if wiBefore}}")[0].strip()  # the other sections are empty; {{trim}}
    out = ins["story_string_prefix"] + story + ins["story_string_suffix"]
    for role, text in turns:
        if role == "user":
            out += ins["input_sequence"] + text + ins["input_suffix"]
        else:
            out += ins["output_sequence"] + text + ins["output_suffix"]
    return out + (ins["last_output_sequence"] or ins["output_sequence"])


def test_presets_carry_the_card_and_match_the_served_prompt(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    assert cli.main(["export", "sillytavern", str(tiny_model_dir), "--out", str(tmp_path), "--name", "tiny"]) == 0
    chat = json.loads((tmp_path / "tiny-chat-completion.json").read_text(encoding="utf-8"))
    assert (chat["temperature"], chat["top_p"], chat["openai_max_tokens"]) == (0.4, 0.6, 1536)
    assert chat["custom_include_body"] == "repetition_penalty: 1.17" and chat["chat_completion_source"] == "custom"
    master = json.loads((tmp_path / "tiny-text-completion.json").read_text(encoding="utf-8"))
    assert {"instruct", "context", "reasoning", "preset"} <= set(master)
    for tag in (master["instruct"]["input_sequence"], master["instruct"]["output_sequence"],
                master["instruct"]["output_suffix"], master["instruct"]["story_string_prefix"]):
        assert len(tiny_tokenizer(tag, add_special_tokens=False).input_ids) == 1, tag  # one special token each
    turns = [("user", "你好"), ("assistant", "嗯。"), ("user", "剑呢？")]
    messages = [{"role": "system", "content": "你是沈青崖。"}] + [{"role": r, "content": t} for r, t in turns]
    assert st_instruct_prompt(master, "你是沈青崖。", turns) == render_serving(messages, tiny_tokenizer)
    assert (master["reasoning"]["prefix"], master["reasoning"]["suffix"]) == ("<think>\n", "\n</think>")
    assert master["preset"]["temp"] == 0.4 and master["preset"]["rep_pen"] == 1.17

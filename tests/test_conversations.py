"""SFT / prompt / preference JSONL: every bad-line class, normalisation, expand_turns, the demo data."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tifaforge.chat.cards import load_card
from tifaforge.data import conversations
from tifaforge.data.conversations import Message, check_command, check_file, expand_turns, to_chat
from tifaforge.errors import TifaError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data/demo"

U = {"role": "user", "content": "师姐，外门考核难吗？"}
A = {"role": "assistant", "content": "<think>\n她在担心，先安慰。\n</think>\n\n“难是难，可也没那么吓人。”"}
GOOD_SFT = {"messages": [U, A]}


def write_lines(path: Path, *lines) -> Path:
    """Write raw lines: dicts become JSON, str/bytes are written as they are."""
    raw = b"".join((json.dumps(x, ensure_ascii=False).encode() if isinstance(x, dict) else
                    x.encode() if isinstance(x, str) else x) + b"\n" for x in lines)
    path.write_bytes(raw)
    return path


# --- each bad-line class, reported with line, field and reason -------------------------------

BAD_LINES = [
    ("sft", '{"messages": [', "", "malformed JSON"),
    ("sft", "[1, 2]", "", "expected a JSON object"),
    ("sft", {"messages": [{"role": "narrator", "content": "x"}, A]}, "messages[0].role", "unknown role"),
    ("sft", {"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from", "unknown role"),
    ("sft", {"messages": [U, U, A]}, "messages[1]", "two 'user' turns in a row"),
    ("sft", {"messages": [U, A, A]}, "messages[2]", "two 'assistant' turns in a row"),
    ("sft", {"messages": [U]}, "messages[0]", "missing final assistant turn"),
    ("sft", {"messages": [{"role": "user", "content": "  "}, A]}, "messages[0].content", "empty content"),
    ("sft", {"messages": [U, {"role": "assistant", "content": "<think>想</think>\n"}]},
     "messages[1].content", "empty answer after </think>"),
    ("sft", {"messages": [U, {"role": "assistant", "content": "<think> </think>答"}]},
     "messages[1].content", "empty think block"),
    ("sft", {"messages": [U, {"role": "assistant", "content": 5}]}, "messages[1].content", "not a string"),
    ("sft", {"messages": [U, {**A, "reasoning_content": "又一份"}]}, "messages[1].reasoning_content",
     "both inline"),
    ("sft", {"messages": [U, {"role": "system", "content": "s"}, A]}, "messages[1]", "only allowed first"),
    ("sft", {"messages": [{"role": "assistant", "content": "你好"}]}, "messages", "no user turn"),
    ("sft", {"messages": []}, "messages", "non-empty list"),
    ("sft", {"messages": [U, A], "conversations": []}, "conversations", "both"),
    ("sft", {"messages": [U, A], "card": "no/such/card.png"}, "card", "no such card"),
    ("sft", {"messages": [U, A], "split": "test"}, "split", "'train' or 'eval'"),
    ("prompts", {"messages": [U]}, "id", "missing"),
    ("prompts", {"id": "p1", "messages": [U, A]}, "messages[1]", "must end with a user turn"),
    ("prefs", {"messages": [U], "chosen": "好的回答"}, "rejected", "missing"),
    ("prefs", {"messages": [U], "chosen": "一样", "rejected": "一样"}, "rejected", "identical"),
    ("prefs", {"messages": [U], "chosen": "<think>x</think>", "rejected": "b"}, "chosen",
     "empty answer"),
    ("prefs", {"messages": [U], "chosen": "a", "rejected": "b", "synthetic": "yes"}, "synthetic",
     "true or false"),
]


@pytest.mark.parametrize("kind, line, field, reason", BAD_LINES, ids=[b[3] + "-" + b[2] for b in BAD_LINES])
def test_bad_line_is_reported_with_line_field_reason(tmp_path, kind, line, field, reason):
    good = {"sft": GOOD_SFT, "prompts": {"id": "ok", "messages": [U]},
            "prefs": {"messages": [U], "chosen": "好", "rejected": "好好好好"}}[kind]
    path = write_lines(tmp_path / "d.jsonl", good, "", line, good if kind != "prompts" else
                       {"id": "ok2", "messages": [U]})
    records, report = check_file(path, kind, on_error="skip")
    assert [r.line for r in records] == [1, 4]  # blank line 2 is not a record, bad line 3 is reported
    (problem,) = report.problems
    assert (problem.line, problem.field) == (3, field) and reason in problem.reason
    with pytest.raises(TifaError, match=re.escape(f"d.jsonl:3: {field}: " if field else "d.jsonl:3: ")):
        check_file(path, kind, on_error="stop")


def test_bom_is_a_bad_line(tmp_path):
    path = write_lines(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + json.dumps(GOOD_SFT).encode(), GOOD_SFT)
    records, report = check_file(path, "sft", on_error="skip")
    assert len(records) == 1 and report.problems[0].line == 1 and "BOM" in report.problems[0].reason


def test_invalid_utf8_is_a_bad_line(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", GOOD_SFT, b'{"messages": "\xb0\xa1"}')
    _, report = check_file(path, "sft", on_error="skip")
    assert report.problems[0].line == 2 and "UTF-8" in report.problems[0].reason


def test_line_over_the_cap_is_a_bad_line_and_the_rest_is_read(tmp_path):
    huge = {"messages": [U, {"role": "assistant", "content": "长" * 5000}]}
    path = write_lines(tmp_path / "x.jsonl", huge, GOOD_SFT)
    records, report = check_file(path, "sft", on_error="skip", max_line_bytes=1000)
    assert [r.line for r in records] == [2]
    assert report.problems[0].line == 1 and "1000 byte cap" in report.problems[0].reason


def test_duplicate_ids_are_bad(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", {"id": "a", "messages": [U]}, {"id": "a", "messages": [U]})
    _, report = check_file(path, "prompts", on_error="skip")
    assert report.problems[0].line == 2 and "duplicate id 'a'" in report.problems[0].reason


def test_nothing_is_dropped_silently(tmp_path):
    lines = [GOOD_SFT, "{", {"messages": [U]}, GOOD_SFT, "  ", "[]"]
    records, report = check_file(write_lines(tmp_path / "x.jsonl", *lines), "sft", on_error="skip")
    assert report.lines == 5 and report.good + len(report.problems) == report.lines == 2 + 3


def test_unknown_kind_and_missing_file(tmp_path):
    with pytest.raises(TifaError, match="unknown data kind"):
        check_file(tmp_path / "x.jsonl", "dpo")
    with pytest.raises(TifaError, match="no such JSONL file"):
        check_file(tmp_path / "missing.jsonl", "sft")


# --- normalisation --------------------------------------------------------------------------

def test_sharegpt_normalises_like_openai(tmp_path):
    share = {"conversations": [{"from": "system", "value": "你是林小满。"}, {"from": "human", "value": U["content"]},
                               {"from": "gpt", "value": A["content"]}]}
    openai = {"messages": [{"role": "system", "content": "你是林小满。"}, U, A]}
    (a,), _ = check_file(write_lines(tmp_path / "a.jsonl", share), "sft")
    (b,), _ = check_file(write_lines(tmp_path / "b.jsonl", openai), "sft")
    assert a.messages == b.messages
    assert a.messages[-1] == Message("assistant", "“难是难，可也没那么吓人。”", "她在担心，先安慰。")


def test_reasoning_content_normalises_like_inline(tmp_path):
    separate = {"messages": [U, {"role": "assistant", "content": "“难是难，可也没那么吓人。”",
                                 "reasoning_content": "她在担心，先安慰。"}]}
    (a,), _ = check_file(write_lines(tmp_path / "a.jsonl", separate), "sft")
    (b,), _ = check_file(write_lines(tmp_path / "b.jsonl", GOOD_SFT), "sft")
    assert a.messages == b.messages


def test_answer_without_think_block_is_accepted(tmp_path):
    (rec,), _ = check_file(write_lines(tmp_path / "a.jsonl", {"messages": [U, {"role": "assistant",
                                                                               "content": "好。"}]}), "sft")
    assert rec.messages[-1] == Message("assistant", "好。", None)


text_st = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1).filter(
    lambda s: s.strip() and "<think>" not in s and "</think>" not in s)


@settings(max_examples=60, deadline=None)
@given(reasoning=text_st, content=text_st)
def test_inline_and_separate_reasoning_agree(reasoning, content):
    """Message.text() is the inline form; parsing it back gives what reasoning_content gives."""
    msg = conversations._assistant(content.strip(), reasoning.strip(), "m", "content")
    again = conversations._assistant(msg.text(), None, "m", "content")
    assert again == msg


def test_card_path_is_resolved_next_to_the_file_and_loaded_once(tmp_path, monkeypatch):
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards/c.json").write_text(json.dumps({"spec": "chara_card_v2", "data": {"name": "甲"}}))
    inline = {"spec": "chara_card_v2", "data": {"name": "乙"}}
    path = write_lines(tmp_path / "s.jsonl", {**GOOD_SFT, "card": "cards/c.json"},
                       {**GOOD_SFT, "card": "cards/c.json"}, {**GOOD_SFT, "card": inline})
    calls = []
    real = conversations.resolve_card
    monkeypatch.setattr(conversations, "resolve_card", lambda v, d: calls.append(v) or real(v, d))
    records, _ = check_file(path, "sft")
    assert [r.card.name for r in records] == ["甲", "甲", "乙"] and len(calls) == 2


def test_preference_pair_keeps_think_blocks(tmp_path):
    pair = {"id": "p", "messages": [U], "chosen": "<think>想想</think>好的", "rejected": "<think>想想</think>坏的",
            "synthetic": True}
    (rec,), _ = check_file(write_lines(tmp_path / "p.jsonl", pair), "prefs")
    assert rec.chosen == Message("assistant", "好的", "想想") and rec.rejected.content == "坏的"
    assert rec.synthetic and rec.messages[-1].role == "user"


def test_to_chat_puts_the_card_first_and_keeps_think_inline(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"spec": "chara_card_v2", "data": {
        "name": "林小满", "description": "{{char}}是{{user}}的师姐。"}}))
    (rec,), _ = check_file(write_lines(tmp_path / "s.jsonl", {**GOOD_SFT, "card": "c.json"}), "sft")
    chat = to_chat(rec, "阿宁")
    assert chat[0]["role"] == "system" and "林小满是阿宁的师姐。" in chat[0]["content"]
    assert chat[1:] == [U, {"role": "assistant", "content": A["content"]}]


# --- expand_turns ---------------------------------------------------------------------------

def test_expand_turns_one_example_per_answer(tmp_path):
    greet = {"role": "assistant", "content": "哎呀，你就是新来的吧？"}
    dialogue = {"id": "d", "messages": [{"role": "system", "content": "s"}, greet, U, A,
                                        {"role": "user", "content": "卯时太早了"}, A,
                                        {"role": "user", "content": "好吧"}, A]}
    (rec,), _ = check_file(write_lines(tmp_path / "d.jsonl", dialogue), "sft")
    examples = expand_turns(rec)
    assert [len(e.messages) for e in examples] == [4, 6, 8]  # the greeting answers nothing
    assert [e.id for e in examples] == ["d#3", "d#5", "d#7"]
    for e in examples:
        assert e.messages == rec.messages[: len(e.messages)] and e.messages[-1].role == "assistant"


# --- the CLI entry point --------------------------------------------------------------------

def test_check_command_exit_codes_and_summary(tmp_path, capsys):
    good = write_lines(tmp_path / "good.jsonl", GOOD_SFT, GOOD_SFT)
    assert check_command(good, "sft") == 0
    out = capsys.readouterr().out
    assert "2 records, 2 good, 0 bad" in out and "2 training examples" in out
    bad = write_lines(tmp_path / "bad.jsonl", GOOD_SFT, "{oops")
    assert check_command(bad, "sft", skip_bad=True) == 1
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().out
    with pytest.raises(TifaError, match=r"bad\.jsonl:2: malformed JSON"):
        check_command(bad, "sft", skip_bad=False)


# --- the bundled demo data ------------------------------------------------------------------

DEMO_FILES = [("sft.jsonl", "sft", 100), ("prompts.jsonl", "prompts", 60), ("prefs.jsonl", "prefs", 20),
              ("en/sft.jsonl", "sft", 30), ("en/prompts.jsonl", "prompts", 20), ("en/prefs.jsonl", "prefs", 8)]


@pytest.mark.parametrize("name, kind, at_least", DEMO_FILES, ids=[d[0] for d in DEMO_FILES])
def test_bundled_demo_files_pass_the_check(name, kind, at_least):
    records, report = check_file(DEMO / name, kind, on_error="stop")
    assert len(records) >= at_least and not report.problems
    if kind == "sft":
        assert all(r.messages[-1].reasoning for r in records), "every demo answer thinks first"
        assert any(len(expand_turns(r)) > 1 for r in records), "some demo dialogues are multi-turn"
    if kind == "prompts":
        assert {r.split for r in records} == {"train", "eval"}
    assert all(r.card is not None or r.messages[0].role == "system" for r in records), "every record has a character"


def test_demo_has_cards_in_every_format():
    files = sorted((DEMO / "cards").iterdir())
    specs = {(p.suffix, load_card(p).spec) for p in files}
    assert len(files) >= 3 and {(".png", "chara_card_v2"), (".png", "chara_card_v3"), (".json", "chara_card_v2")} <= specs


def test_demo_novels_size_and_encodings():
    books = sorted((DEMO / "novels").glob("*.txt"))
    assert 300_000 <= sum(p.stat().st_size for p in books) <= 1_000_000
    gbk = [p.name for p in books if not _is_utf8(p.read_bytes())]
    assert gbk == ["zh-campus-1.txt", "zh-wuxia-2.txt"]
    assert "第一章" in (DEMO / "novels/zh-wuxia-2.txt").read_bytes().decode("gbk")


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_demo_regenerates_byte_for_byte(tmp_path):
    """The committed files are exactly what the generator writes: nobody hand-edits generated data.
    (LICENSE.md, README.md and eval/ — the held-out text — are hand-written.)"""
    from tifaforge.data.demo import write_demo

    write_demo(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(DEMO) for p in DEMO.rglob("*") if p.is_file()
                       and p.name not in ("LICENSE.md", "README.md") and "eval" not in p.relative_to(DEMO).parts)
    assert made == committed
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (DEMO / rel).read_bytes(), rel

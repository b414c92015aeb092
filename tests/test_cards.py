"""Character cards: PNG chunk reading (chara/ccv3, caps, truncation), macros, system prompt, round trip."""

import base64
import json
import struct
from pathlib import Path

import pytest

from tifaforge.chat import cards
from tifaforge.chat.cards import (Card, card_from_dict, card_to_system_prompt, expand_macros, load_card,
                                  png_chunk, read_png_text_chunks, tiny_png, write_card_json,
                                  write_card_png)
from tifaforge.errors import TifaError

REPO = Path(__file__).resolve().parents[1]


def card_obj(name="林小满", spec="chara_card_v2", **data):
    version = "3.0" if spec.endswith("v3") else "2.0"
    return {"spec": spec, "spec_version": version,
            "data": {"name": name, "description": "{{char}}是外门弟子，{{user}}的师姐。", **data}}


def b64(obj) -> bytes:
    return base64.b64encode(json.dumps(obj, ensure_ascii=False).encode())


def make_png(path: Path, *text_chunks: tuple[str, bytes]) -> Path:
    """A 1x1 PNG with the given tEXt chunks before IEND."""
    img = tiny_png()
    extra = b"".join(png_chunk(b"tEXt", k.encode() + b"\0" + v) for k, v in text_chunks)
    path.write_bytes(img[:-12] + extra + img[-12:])
    return path


# --- PNG: which chunk wins ------------------------------------------------------------------

def test_png_with_only_chara(tmp_path):
    card = load_card(make_png(tmp_path / "a.png", ("chara", b64(card_obj("甲")))))
    assert card.name == "甲" and card.spec == "chara_card_v2" and not card.warnings


def test_png_with_only_ccv3(tmp_path):
    card = load_card(make_png(tmp_path / "a.png", ("ccv3", b64(card_obj("乙", "chara_card_v3")))))
    assert card.name == "乙" and card.spec == "chara_card_v3"


def test_png_with_both_prefers_ccv3(tmp_path):
    path = make_png(tmp_path / "a.png", ("chara", b64(card_obj("旧"))),
                    ("ccv3", b64(card_obj("新", "chara_card_v3"))))
    assert load_card(path).name == "新"


@pytest.mark.parametrize("bad", [b"!!not base64!!", base64.b64encode(b"{broken json"),
                                 b64({"spec": "chara_card_v3", "data": "not an object"})])
def test_malformed_ccv3_falls_back_to_chara_with_warning(tmp_path, bad):
    path = make_png(tmp_path / "a.png", ("ccv3", bad), ("chara", b64(card_obj("备用"))))
    with pytest.warns(UserWarning, match="ccv3"):
        card = load_card(path)
    assert card.name == "备用" and "ccv3" in card.warnings[0]


def test_malformed_ccv3_without_chara_is_an_error(tmp_path):
    with pytest.raises(TifaError, match="a.png"):
        load_card(make_png(tmp_path / "a.png", ("ccv3", b"%%%")))


def test_png_without_card_chunk(tmp_path):
    with pytest.raises(TifaError, match="no character card"):
        load_card(make_png(tmp_path / "a.png", ("Comment", b"hello")))


# --- PNG: caps and truncation ---------------------------------------------------------------

def test_oversized_text_chunk_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(cards, "MAX_TEXT_CHUNK_BYTES", 1000)
    path = make_png(tmp_path / "big.png", ("chara", b"A" * 5000))
    with pytest.raises(TifaError, match=r"big\.png.*over the 1000 byte cap"):
        load_card(path)


def test_oversized_decoded_json_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(cards, "MAX_JSON_BYTES", 100)
    path = make_png(tmp_path / "a.png", ("chara", b64(card_obj(description="长" * 200))))
    with pytest.raises(TifaError, match="cap"):
        load_card(path)


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(cards, "MAX_PNG_BYTES", 50)
    path = make_png(tmp_path / "a.png", ("chara", b64(card_obj())))
    with pytest.raises(TifaError, match="over the 50-byte cap"):
        read_png_text_chunks(path)


def test_chunk_length_past_end_of_file_is_truncation(tmp_path):
    img = tiny_png()
    lying = struct.pack(">I", 2**31 - 1) + b"tEXt" + b"chara\0AAAA"
    path = tmp_path / "lie.png"
    path.write_bytes(img[:-12] + lying)
    with pytest.raises(TifaError, match=r"lie\.png: truncated PNG"):
        load_card(path)


@pytest.mark.parametrize("cut", [20, 40, -5])
def test_truncated_file_is_an_error(tmp_path, cut):
    full = make_png(tmp_path / "full.png", ("chara", b64(card_obj()))).read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(full[:cut])
    with pytest.raises(TifaError, match="truncated"):
        load_card(path)


def test_not_a_card_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(TifaError, match="x.json"):
        load_card(path)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(TifaError, match="not a PNG and not UTF-8 JSON"):
        load_card(path)


# --- JSON forms -----------------------------------------------------------------------------

def test_v1_card_is_lifted_to_v2_keeping_extras():
    card = card_from_dict({"name": "老钟", "description": "守门人", "avatar": "none", "chat": "x"})
    assert card.spec == "chara_card_v2" and card.get("description") == "守门人"
    assert card.to_dict()["avatar"] == "none"


@pytest.mark.parametrize("obj, match", [
    ({"spec": "chara_card_v2", "data": {"description": "x"}}, "no name"),
    ({"spec": "chara_card_v2", "data": {"name": "a", "description": 3}}, "data.description"),
    ({"spec": "something_else", "data": {}}, "not a character card"),
    ({"spec": "chara_card_v3"}, "no `data` object"),
])
def test_bad_card_objects(obj, match):
    with pytest.raises(TifaError, match=match):
        card_from_dict(obj, "c.json")


def test_null_fields_read_as_empty():
    card = card_from_dict(card_obj(personality=None, scenario=None))
    assert card.get("personality") == "" and "性格" not in card_to_system_prompt(card)


# --- round trip keeps unknown fields --------------------------------------------------------

def rich_card(spec="chara_card_v3") -> Card:
    obj = card_obj("白芷", spec, extensions={"tool": {"x": [1, 2]}}, character_book={"entries": []},
                   weird_field="保留我")
    obj["top_level_extra"] = {"keep": True}
    return card_from_dict(obj)


@pytest.mark.parametrize("spec", ["chara_card_v2", "chara_card_v3"])
def test_png_round_trip_keeps_unknown_fields(tmp_path, spec):
    card = rich_card(spec)
    write_card_png(card, tmp_path / "c.png")
    again = load_card(tmp_path / "c.png")
    assert again.to_dict() == card.to_dict()
    chunks = read_png_text_chunks(tmp_path / "c.png")
    assert set(chunks) == ({"ccv3", "chara"} if spec.endswith("v3") else {"chara"})


def test_json_round_trip_keeps_unknown_fields(tmp_path):
    card = rich_card()
    write_card_json(card, tmp_path / "c.json")
    assert load_card(tmp_path / "c.json").to_dict() == card.to_dict()


def test_rewriting_a_png_card_keeps_the_image_and_replaces_old_chunks(tmp_path):
    src = make_png(tmp_path / "a.png", ("chara", b64(card_obj("旧名"))))
    card = load_card(src)
    card.data["name"] = "新名"
    write_card_png(card, tmp_path / "b.png", src.read_bytes())
    out = (tmp_path / "b.png").read_bytes()
    assert out.count(b"tEXtchara") == 1 and tiny_png()[8:-12] in out  # IHDR + IDAT untouched
    assert load_card(tmp_path / "b.png").name == "新名"


# --- macros and the system prompt -----------------------------------------------------------

def test_macros_any_case_and_legacy_forms():
    text = "{{char}} {{Char}} {{ CHAR }} <BOT> <bot> | {{user}} {{USER}} <USER> <User>"
    assert expand_macros(text, "沈青崖", "阿宁") == "沈青崖 沈青崖 沈青崖 沈青崖 沈青崖 | 阿宁 阿宁 阿宁 阿宁"


def test_macro_replacement_is_literal():
    assert expand_macros("{{user}}", "c", r"a\1b") == r"a\1b"


def test_system_prompt_has_every_part_with_macros_expanded():
    card = card_from_dict(card_obj(personality="活泼", scenario="{{user}}刚入门。",
                                   mes_example="<START>\n{{user}}: 你好\n{{char}}: 哎呀！",
                                   post_history_instructions="保持{{char}}的语气。"))
    prompt = card_to_system_prompt(card, "阿宁")
    for part in ("林小满是外门弟子，阿宁的师姐", "性格：活泼", "场景：阿宁刚入门。", "阿宁: 你好",
                 "林小满: 哎呀！", "注意：保持林小满的语气。", "你是林小满"):
        assert part in prompt
    assert "{{" not in prompt and "<START>" not in prompt


def test_card_system_prompt_replaces_default_and_original_macro():
    own = card_to_system_prompt(card_from_dict(card_obj(system_prompt="只用文言文回答。")))
    assert own.startswith("只用文言文回答。") and "你是林小满" not in own
    both = card_to_system_prompt(card_from_dict(card_obj(system_prompt="{{original}}\n多写动作。")))
    assert both.startswith("你是林小满") and "多写动作。" in both


def test_english_card_gets_english_labels_and_default_user():
    card = card_from_dict(card_obj("Tobias", description="{{char}} keeps the lighthouse.",
                                   personality="Dry and patient."))
    prompt = card_to_system_prompt(card)
    assert "Personality: Dry and patient." in prompt and "with User" in prompt


# --- the bundled cards ----------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((REPO / "data/demo").rglob("cards/*")), ids=lambda p: p.name)
def test_bundled_cards_load_and_make_a_prompt(path):
    card = load_card(path)
    assert card.name and not card.warnings
    assert card.name in card_to_system_prompt(card)

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tifaforge.chat import template
from tifaforge.models.presets import TINY, init_model


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_plain_transformers_loads_the_preset(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    n = sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "Qwen2ForCausalLM" and 3e6 < n < 8e6, n
    assert model.config.intermediate_size % 256 == 0 and model.config.vocab_size == len(tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
    # transformers' Qwen2 tokenizer class (chosen for a qwen2 config) gives the same ids on NFC text
    from tifaforge.models.load import load_tokenizer

    ours = load_tokenizer(tiny_model_dir)
    text = "<|User|>楚夜站在屋顶上。He said: 'it's late'.\n\n<think>想</think>答<|end▁of▁sentence|>"
    assert tok(text).input_ids == ours(text).input_ids


def test_same_seed_same_bytes(tmp_path, tiny_model_dir):
    init_model("tiny", tmp_path / "a", seed=0)
    assert digest(tmp_path / "a") == digest(tiny_model_dir)
    init_model("tiny", tmp_path / "b", seed=1)
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert da["model.safetensors"] != db["model.safetensors"] and da["tokenizer.json"] == db["tokenizer.json"]


def test_special_tokens_are_single_ids(tiny_tokenizer):
    for tag in template.special_tokens("ascii") + list(template.THINK_TOKENS) + ["<|endoftext|>"]:
        ids = tiny_tokenizer(tag, add_special_tokens=False).input_ids
        assert len(ids) == 1, tag
    assert template.check_template(tiny_tokenizer) == []
    # think tags survive skip_special_tokens (they are not special), role tags do not
    ids = tiny_tokenizer("<think>a</think><|User|>b", add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think>b"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_any_string_round_trips(tiny_tokenizer, s):
    # no Unicode normaliser: decomposed accents, CJK compatibility ideographs, astral chars survive
    ids = tiny_tokenizer(s, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids) == s


@pytest.mark.parametrize("s", ["e\u0301", "\uf900", "𠮷野家", "\u3000\u3000第一章", "\r\n\t \x00"])
def test_round_trip_examples(tiny_tokenizer, s):
    assert tiny_tokenizer.decode(tiny_tokenizer(s, add_special_tokens=False).input_ids) == s


def test_fullwidth_spelling(tmp_path):
    out = init_model("tiny", tmp_path / "fw", spelling="fullwidth")
    from tifaforge.models.load import load_tokenizer

    tok = load_tokenizer(out)
    assert template.detect_spelling(tok) == "fullwidth" and template.check_template(tok) == []
    assert "<｜User｜>" in template.render([{"role": "user", "content": "嗨"}], tok, add_generation_prompt=True)


def test_preset_is_sized_for_gguf_quantisers():
    assert TINY["intermediate_size"] % 256 == 0 and TINY["hidden_size"] % 256 == 0

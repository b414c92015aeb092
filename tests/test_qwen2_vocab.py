"""The real Qwen2 vocabulary (llama.cpp's ggml-vocab-qwen2.gguf: 151,643 tokens and merges, no
weights; `make setup` takes it from llama-cpp-python's source distribution): the seed's tags added to
a base that lacks them, in the padded rows Qwen2.5's matrix has, the template rendered with them, and
the novel ingest's fast encoder against the Rust tokenizer on Chinese text.

    .venv/bin/python -m pytest -q tests/test_qwen2_vocab.py
"""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QWEN25_ROWS = 152_064  # Qwen2.5's embedding rows (151,665 tokens)


def test_tags_take_the_padded_rows_of_a_qwen2_5_shaped_base(qwen2_tokenizer, tmp_path):
    """A tiny Qwen2 with Qwen2.5's 152,064 rows and the real tokenizer: the tags are added as single
    tokens in the spare rows, set to the mean of the real tokens' rows (placeholder and spare rows
    hold 7.0 here, which no tag may keep and the mean must not include); the template renders and
    round-trips; the check finds no problem."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tifaforge.chat.template import check_template, render
    from tifaforge.models.load import load_model, save_model

    tok = copy.deepcopy(qwen2_tokenizer)
    vocab = tok.get_vocab()
    placeholders = [i for t, i in vocab.items() if t.startswith("[PAD")]
    assert len(tok) == 151_936 and len(placeholders) == 290 and "<|User|>" not in vocab
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=QWEN25_ROWS, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    with torch.no_grad():
        for w in (base.get_input_embeddings().weight, base.get_output_embeddings().weight):
            w[placeholders] = 7.0
            w[len(tok):] = 7.0
    real = torch.ones(QWEN25_ROWS, dtype=torch.bool)
    real[placeholders] = False
    real[len(tok):] = False
    means = [w[real].mean(0) for w in (base.get_input_embeddings().weight, base.get_output_embeddings().weight)]
    save_model(base, tok, tmp_path / "base")

    model, tok2 = load_model(tmp_path / "base", device="cpu")
    first, end = model.config.tifaforge["added_rows"]
    assert first == 151_936 and end == len(tok2) <= QWEN25_ROWS  # spare rows: the matrix did not grow
    for w, mean in zip((model.get_input_embeddings().weight, model.get_output_embeddings().weight), means):
        assert w.shape[0] == QWEN25_ROWS
        assert torch.allclose(w[first:end], mean.expand(end - first, -1), atol=1e-6)
        assert bool((w[end:] == 7.0).all())  # the spare rows after the tags are left as they were
    for tag in model.config.tifaforge["added_tokens"]:
        assert len(tok2(tag, add_special_tokens=False).input_ids) == 1, tag
    text = render([{"role": "user", "content": "你好，许言。"},
                   {"role": "assistant", "content": "<think>\n她在想。\n</think>\n\n许言笑了。"},
                   {"role": "user", "content": "然后呢？"}], tok2, add_generation_prompt=True)
    assert "<|User|>你好，许言。<|Assistant|>" in text and "她在想" not in text  # think stripped from history
    assert tok2.decode(tok2(text, add_special_tokens=False).input_ids) == text
    assert check_template(tok2) == []


def test_the_ingest_encoder_equals_the_rust_tokenizer_on_chinese_novels(qwen2_tokenizer):
    """The novel ingest's fast encoder (C kernel, or the word cache) gives the real Qwen2 tokenizer's
    ids, token for token, on the bundled Chinese novels' chapters as the ingest reads them."""
    from tifaforge.data.novels.encode import NativeEncoder, TextEncoder, WordCacheEncoder

    from tifaforge.data.novels.read import FileReport, file_chapters

    texts = [c for p in sorted((ROOT / "data" / "demo" / "novels").glob("*.txt"))  # UTF-8 and GB18030 files
             for c in file_chapters(p, None, FileReport(str(p), p.stat().st_size))]
    enc = TextEncoder(qwen2_tokenizer)
    assert isinstance(enc.cache, (NativeEncoder, WordCacheEncoder)), "the fast path was not taken"
    ours = enc.encode(texts)
    rust = [e.ids for e in qwen2_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert sum(len(r) for r in rust) > 10_000
    for a, b in zip(ours, rust):
        assert a.tolist() == b


def test_plan_reports_the_real_tokenizer_s_tokens_per_character(qwen2_tokenizer, tmp_path, capsys):
    """`tifa plan` on a base with the real Qwen2 tokenizer prints its tokens per character of Chinese
    novel text and what the card's million-character context costs in tokens."""
    import re
    from importlib import resources

    from transformers import Qwen2Config

    from tifaforge.cli import main

    base = tmp_path / "base"
    qwen2_tokenizer.save_pretrained(base)
    Qwen2Config(vocab_size=QWEN25_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(base)
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  base: {base}\n", encoding="utf-8")
    assert main(["plan", str(config), "--stages", "cpt", "--set", "cpt.batch_size=1", "--set", "cpt.max_length=512"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"tokenizer: (\d\.\d{3}) tokens per character of Chinese novel text: the card's "
                      r"1,000,000-character context is about ([\d,]+) tokens", out)
    assert found, out
    demo = resources.files("tifaforge") / "assets" / "demo"
    text = "".join("".join((demo / f).read_text(encoding="utf-8") for f in ("novel_zh.txt", "passages_zh.txt")).split())
    expected = len(qwen2_tokenizer(text, add_special_tokens=False).input_ids) / len(text)
    assert float(found.group(1)) == round(expected, 3) and 0.4 < expected < 1.0, expected
    assert abs(int(found.group(2).replace(",", "")) - expected * 1e6) < 1

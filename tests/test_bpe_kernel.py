"""The ingest's C kernel (data/_bpe.c): byte-level BPE ids equal to the Rust tokenizer's, the MinHash
signature equal to its numpy definition, and the LSH band split equal to datasketch's."""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_novels import TRICKY

from tifaforge.data import novels
from tifaforge.data.novels import dedup, encode

BPE = novels.native_kernel()
if BPE is None:
    if os.environ.get("CI") == "true":  # `make setup` builds it; CI must test it
        raise AssertionError("tifaforge.data._bpe was not built: run `make setup` (needs a C compiler)")
    pytest.skip("the C kernel was not built (no C compiler at install)", allow_module_level=True)


def rust_ids(backend, texts):
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def layouts(tiny_tokenizer):
    """The tiny preset's tokenizer (Qwen2 split), the same with GPT-2's split, and with Qwen2.5's NFC."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    qwen2 = tiny_tokenizer.backend_tokenizer
    gpt2 = Tokenizer.from_str(qwen2.to_str())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    nfc = Tokenizer.from_str(qwen2.to_str())
    nfc.normalizer = normalizers.NFC()
    return {"qwen2": qwen2, "gpt2": gpt2, "nfc": nfc}


# Characters of every class the split patterns tell apart, and the ones where engines disagree: ASCII and
# Latin letters (ſ case-folds to s), contraction letters after an apostrophe, digits of several kinds
# (Arabic-Indic, a Roman numeral: \p{Nl}, a superscript: \p{No}), spaces (ASCII, tab, NBSP, U+3000, U+2028),
# CR and LF, Chinese and full-width punctuation, 4-byte CJK and emoji, a combining accent (NFC composes it),
# a precomposed letter, the added think tags, and U+0558 (a letter only in Unicode 16).
ALPHABET = (list("aAsStTdDmMlLrReEvVxyzſK'’") + list("0123456789٣Ⅻ²") + [" ", " ", "  ", "\t", "\xa0", "\u3000", "\u2028"]
            + ["\n", "\r", "\r\n", "\n\n"] + list("天地玄黄宇宙洪荒你好的了是") + list("，。！？：；“”「」—…（）《》")
            + ["𠮷", "😀", "\u0301", "é", "<think>", "</think>", "\u0558", "-", "_", "#", "$"])


def random_texts(seed: int, n: int, longest: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(ALPHABET, rng.integers(0, longest))) for _ in range(n)]


@pytest.mark.parametrize("layout", ["qwen2", "gpt2", "nfc"])
def test_native_encoder_gives_the_tokenizer_s_ids(layouts, layout):
    backend = layouts[layout]
    encoder = novels.NativeEncoder.build(backend)
    assert encoder is not None and encoder.mode == (1 if layout == "gpt2" else 0) and encoder.nfc == (layout == "nfc")
    for _ in range(2):  # cold, then from the word cache
        assert [ids.tolist() for ids in encoder.encode(TRICKY)] == rust_ids(backend, TRICKY)
    disputed = {chr(c) for c in np.flatnonzero(encoder.disputed)}
    # Newer than one engine's Unicode tables, and ſ (the Rust engine case-folds it in 'ſ): sent to Rust
    # whole. Nothing else: a splitting bug would show here, as every character it touches is disputed.
    assert {"\u0558", "\U0003d000"} <= disputed <= {"\u0558", "\U0003d000", "ſ"}
    texts = random_texts(0, 1500, 40) + random_texts(1, 100, 400)  # long runs: the heap merge, past the cache
    texts += ["".join(["天地"] * 200), "a" * 500, "😀" * 70, " " * 90 + "x", "\n" * 70 + " a",
              # marks and a composition newer than the Rust normaliser's Unicode tables (Python's NFC would
              # reorder or compose them; the tokenizer's leaves them), and their reordered forms
              "a\u0898\u0316 word", "x\u1ac1\u0323y", "a\u09fe\u0316", "a\u0316\u09fe", "\U00011935\U00011930", "e\u0301",
              "'REally 'rEd 'Ve 'vE 'LLama 'lLama 'dOG 'Mx 'Tea 'Sx 'ſx 're 'll 'q"]  # contractions before letters
    assert [ids.tolist() for ids in encoder.encode(texts)] == rust_ids(backend, texts)


def test_native_encoder_small_cache_clears_and_stays_exact(layouts):
    backend = layouts["qwen2"]
    encoder = novels.NativeEncoder.build(backend)
    encoder.cache = BPE.cache(8)  # full after 4 words: cleared again and again; spilled entries too
    texts = random_texts(2, 300, 60)
    for _ in range(2):
        assert [ids.tolist() for ids in encoder.encode(texts)] == rust_ids(backend, texts)


def test_text_encoder_picks_the_kernel_and_falls_back_without_it(tiny_tokenizer, monkeypatch):
    backend = tiny_tokenizer.backend_tokenizer
    assert isinstance(novels.TextEncoder(tiny_tokenizer).cache, novels.NativeEncoder)
    for module in (encode, dedup):  # the encoders' and the MinHash signature's view of it
        monkeypatch.setattr(module, "native_kernel", lambda: None)  # as without a C compiler
    fallback = novels.TextEncoder(tiny_tokenizer)
    assert isinstance(fallback.cache, novels.WordCacheEncoder)
    assert [ids.tolist() for ids in fallback.encode(TRICKY)] == rust_ids(backend, TRICKY)
    assert novels.signature("天地玄黄宇宙洪荒" * 20).tolist() == novels.signature_numpy("天地玄黄宇宙洪荒" * 20).tolist()


def test_layouts_the_kernel_does_not_reproduce(tiny_tokenizer):
    import json

    from tokenizers import Tokenizer, normalizers

    d = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    for change in ({"model": {**d["model"], "ignore_merges": True}}, {"model": {**d["model"], "dropout": 0.1}},
                   {"normalizer": {"type": "NFKC"}}):
        assert novels.NativeEncoder.build(Tokenizer.from_str(json.dumps({**d, **change}))) is None
    no_byte = {**d["model"], "vocab": {k: v for k, v in d["model"]["vocab"].items() if k != "Ā"}}
    assert novels.NativeEncoder.build(Tokenizer.from_str(json.dumps({**d, "model": no_byte}))) is None
    lowercase = Tokenizer.from_str(json.dumps(d))
    lowercase.normalizer = normalizers.Lowercase()
    assert novels.NativeEncoder.build(lowercase) is None
    assert [ids.tolist() for ids in novels.TextEncoder(lowercase).encode(TRICKY)] == rust_ids(lowercase, TRICKY)


def test_kernel_rejects_bad_buffers():
    codes, ends, classes = np.zeros(4, np.uint32), np.array([4], np.int64), np.zeros(0x110000, np.uint8)
    byte_ids, out, out_ends = np.arange(256, dtype=np.int32), np.zeros(16, np.int32), np.zeros(1, np.int64)
    one = np.zeros(1, np.int32)
    model = BPE.model(one, one + 1, one + 256, byte_ids)
    BPE.encode(codes, ends, classes, model, 0, out, out_ends, None)
    with pytest.raises(ValueError, match="ends"):
        BPE.encode(codes, np.array([5], np.int64), classes, model, 0, out, out_ends, None)
    with pytest.raises(ValueError, match="cls"):
        BPE.encode(codes, ends, classes[:10], model, 0, out, out_ends, None)
    with pytest.raises(ValueError, match="one token per UTF-8 byte"):
        BPE.encode(codes, ends, classes, model, 0, out[:2], out_ends, None)
    with pytest.raises(ValueError, match="out_ends"):
        BPE.encode(codes, ends, classes, model, 0, out, out_ends[:0], None)
    with pytest.raises(ValueError, match="whole number"):
        BPE.encode(codes, ends, classes, model, 0, np.zeros(3, np.uint8), out_ends, None)
    with pytest.raises(ValueError, match="256 ids"):
        BPE.model(one, one, one, byte_ids[:255])
    with pytest.raises(ValueError, match="negative"):
        BPE.model(one - 1, one, one, byte_ids)
    with pytest.raises(ValueError, match="PyCapsule"):
        BPE.encode(codes, ends, classes, model, 0, out, out_ends, "not a cache")
    with pytest.raises(ValueError, match="PyCapsule"):
        BPE.encode(codes, ends, classes, BPE.cache(8), 0, out, out_ends, None)  # a cache is not a model


def test_signature_kernel_equals_the_numpy_definition():
    rng = np.random.default_rng(3)
    chars = list("天地玄黄宇宙洪荒abc123，。 \n") + ["𠮷"]
    texts = ["", "，。", "a", "ab", "abcd", "abcde", "天地玄黄宇宙洪荒" * 50]
    texts += ["".join(rng.choice(chars, rng.integers(0, 400))) for _ in range(300)]
    for text in texts:
        for k in (1, 3, 5):
            for num_perm in (1, 7, 128):  # 7: not a power of 2
                assert novels.signature(text, num_perm, k).tolist() == novels.signature_numpy(text, num_perm, k).tolist()


def test_lsh_bands_equal_datasketch_s_optimum():
    from datasketch.lsh import _optimal_param

    for num_perm in (16, 128):
        for threshold in (0.3, 0.5, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99):
            assert novels.lsh_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


@pytest.mark.parametrize("layout", ["qwen2", "gpt2"])
def test_kernel_splits_where_the_rust_pre_tokenizer_splits(layouts, layout):
    """The split alone (ids can hide a wrong split when both halves merge the same way)."""
    backend = layouts[layout]
    encoder = novels.NativeEncoder.build(backend)
    texts = random_texts(4, 1500, 40) + ["'REally 'rEd 'Ve 'vE 'LLama 'lLama 'dOG 'Mx 'Tea 'Sx 're 'll 'q"] + TRICKY
    texts = [t for t in texts if not set(t) & {"\u0558", "\U0003d000", "ſ"}]  # disputed: never split by the kernel
    encoder.encode(texts)  # classes every character
    for text in texts:
        assert encoder._split(text) == [end for _, (_, end) in backend.pre_tokenizer.pre_tokenize_str(text)], text


def test_characters_merged_ahead_only_where_that_is_exact():
    """A hand-made vocabulary where one character's edge byte merges across characters before its own
    merges finish (你: A0 + E4 ranks first), and one where nothing reaches in (好). Merging 你 ahead would
    give other ids for 你你; the kernel must start it from bytes and still merge 好 ahead."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    b2u = encode._bytes_to_unicode()
    u = lambda data: "".join(b2u[x] for x in data)  # noqa: E731  bytes -> byte-level token string
    vocab = {b2u[x]: x for x in range(256)}
    merges = [(u(b"\xa0"), u(b"\xe4")),  # rank 0: across 你|你
              (u(b"\xa5"), u(b"\xbd")), (u(b"\xe5"), u(b"\xa5\xbd")),  # 好 = E5 A5 BD, alone
              (u(b"\xe4"), u(b"\xbd")), (u(b"\xe4\xbd"), u(b"\xa0")),  # 你 = E4 BD A0
              (u("好".encode()), u("好".encode()))]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(novels.QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    encoder = novels.NativeEncoder.build(tok)
    assert encoder is not None
    texts = ["你你", "好好", "你好你", "好你好你你", "a你b", *random_texts(5, 300, 12)]
    texts += ["".join(np.random.default_rng(6).choice(["你", "好", "你好"], 30)) for _ in range(50)]
    assert [ids.tolist() for ids in encoder.encode(texts)] == rust_ids(tok, texts)
    assert rust_ids(tok, ["你你"])[0] != 2 * rust_ids(tok, ["你"])[0]  # the cross merge does change 你你

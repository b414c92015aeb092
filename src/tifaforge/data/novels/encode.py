"""Texts -> token ids equal to the tokenizer's, faster than it: the ingest's encoders and the C kernel's glue.

    tifa data novels books/ --out data/cpt --tokenizer models/tiny     # every worker process encodes with this

Tokenising was the ingest's bound: the Rust tokenizer spends ~1 us per pre-token on offsets and other
bookkeeping that packing never reads. TextEncoder takes the first of these that reproduces the tokenizer,
id for id (each `build` returns None for a layout it cannot reproduce):
  1. the C kernel (`_bpe.c`, built at install as tifaforge.data._bpe; NativeEncoder): the tokenizer's
     split pattern and HF's BPE merge loop in C behind a word cache, each character's class checked
     against the Rust pre-tokenizer the first time it is met;
  2. else (no C compiler at install, or a layout the kernel does not take) a Python word cache
     (WordCacheEncoder) in front of the Rust BPE: the same job at about a third of the speed;
  3. else the Rust tokenizer's batch call (or the tokenizer's own call for one without a Rust backend).
The kernel also computes the MinHash signatures of dedup.py (`native_kernel`). bench/ingest.py prints
the Rust tokenizer alone and the ingest's encoder alone.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache

import numpy as np


class TextEncoder:
    """Texts -> int32 token ids, by the first encoder of this module's order (its docstring) that
    reproduces the tokenizer."""

    def __init__(self, tok) -> None:
        from tokenizers import Tokenizer

        self.tok = tok
        self.backend = tok if isinstance(tok, Tokenizer) else getattr(tok, "backend_tokenizer", None)
        self.cache = None if self.backend is None else (NativeEncoder.build(self.backend)
                                                        or WordCacheEncoder.build(self.backend))

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        if self.cache is not None:
            return self.cache.encode(texts)
        if self.backend is not None:  # no Python-side offsets or attention masks
            encoded = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            encoded = self.tok(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in encoded]


# ---------------------------------------------------------------------------------------------
# Tokenise: a word cache in front of the Rust BPE
#
# The Rust tokenizer spends most of its time per pre-token (alignment bookkeeping, allocations, BPE
# merges), and most pre-tokens of a corpus are words it has seen before. WordCacheEncoder splits the
# text into pre-tokens in Python with the tokenizer's own pattern (the `regex` module speaks its
# syntax), looks each up in a bounded dict, and sends only the words it has not seen to the Rust BPE,
# many at once. The result is the tokenizer's, token for token: it is used only for the layouts it
# reproduces exactly (no normalizer; a Qwen2 or GPT-2 split pattern then byte-level BPE), every
# character is checked against the Rust pre-tokenizer the first time it is met (a character the two
# regex engines class differently, e.g. one assigned in a newer Unicode version than one of them
# knows, sends the texts holding it to the Rust tokenizer whole), and added tokens are cut out first,
# as the Rust tokenizer does.

QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PROBE = "a{c}a 1{c}1 {c} x{c}  {c}\n'{c}a'{c}{c}\n{c}\r\n {c}{c}  y \u3000{c}，{c}。"
_SEP = "\ue000"  # between the words sent to the BPE at once; never in byte-level text (all < U+0200)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map of byte-level BPE (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


_BYTE_LEVEL = str.maketrans({chr(b): c for b, c in _bytes_to_unicode().items()})


class _Words(dict):
    """word -> index; a word not yet in is given the next index and queued in `new`."""

    __slots__ = ("new",)

    def __missing__(self, word: str) -> int:
        i = self[word] = len(self)
        self.new.append(word)
        return i


def _byte_level_layout(d: dict) -> tuple[str, str | None, dict[str, int]] | None:
    """(split pattern, normalizer: None or "NFC", added tokens) of a tokenizer.json dict whose layout the
    fast encoders reproduce: a Qwen2 or GPT-2 split pattern then byte-level BPE, no dropout, added tokens
    matched plainly; else None."""
    pre = d.get("pre_tokenizer") or {}
    pattern = None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex") and not pre.get("add_prefix_space"):
        pattern = GPT2_SPLIT
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and split.get("pattern", {}).get("Regex") in (QWEN2_SPLIT, GPT2_SPLIT)
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex")
                and not byte_level.get("add_prefix_space")):
            pattern = split["pattern"]["Regex"]
    norm = d.get("normalizer")
    normalizer = None if norm is None else "NFC" if norm == {"type": "NFC"} else "other"
    model = d.get("model") or {}
    tokens = d.get("added_tokens") or []
    if (pattern is None or normalizer == "other" or model.get("type") != "BPE" or model.get("dropout")
            or d.get("truncation") or d.get("padding")
            or any(t["single_word"] or t["lstrip"] or t["rstrip"] for t in tokens)):
        return None
    if len({t["normalized"] for t in tokens}) > 1:
        return None  # two passes of added-token matching; not reproduced
    return pattern, normalizer, {t["content"]: t["id"] for t in tokens}


class WordCacheEncoder:
    """`encode(texts)` -> one int32 array of token ids per text, equal to `backend.encode_batch`'s ids
    with add_special_tokens=False. `build` returns None for a tokenizer whose layout it cannot reproduce."""

    MAX_WORDS = 1 << 18  # the cache is emptied past this many words (~40 MB): memory stays bounded
    LEARN_CHUNK = 512  # new words per text sent to the BPE

    def __init__(self, backend, pattern: str, added: dict[str, int], bpe_json: str) -> None:
        import regex

        self.backend = backend
        self.findall = regex.compile(pattern).findall
        self.pattern = pattern
        self.added = added
        self.added_split = (regex.compile("(" + "|".join(map(regex.escape, sorted(added, key=len, reverse=True)))
                                          + ")").split if added else None)
        self.bpe = type(backend).from_str(bpe_json)  # the model alone: no normalizer, pre-tokenizer, post-processor
        self.sep_id = self.bpe.token_to_id(_SEP)
        self.known = np.zeros(0x110000, dtype=bool)  # characters already checked (see _check_characters)
        self.disputed_chars: list[str] = []
        self.disputed: re.Pattern | None = None  # finds a character the two regex engines class differently
        self._reset()

    @classmethod
    def build(cls, backend) -> WordCacheEncoder | None:
        import importlib.util

        if importlib.util.find_spec("regex") is None:  # the pattern's syntax (\p{L}) needs it
            return None
        d = json.loads(backend.to_str())
        layout = _byte_level_layout(d)
        if layout is None or layout[1] is not None:  # no normalizer here
            return None
        pattern, _, added = layout
        ids = [int(i) for i in d["model"].get("vocab", {}).values()] + list(added.values())
        bpe = {**d, "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
               "truncation": None, "padding": None,
               "added_tokens": [{"id": max(ids, default=-1) + 1, "content": _SEP, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True}]}
        return cls(backend, pattern, added, json.dumps(bpe))

    def _reset(self) -> None:
        self.words = _Words({a: i for i, a in enumerate(self.added)})
        self.words.new = []
        self.tokens = np.zeros(1 << 20, np.int32)  # every cached word's tokens, back to back
        self.used = 0
        size = max(1 << 16, 2 * len(self.added))
        self.start, self.length = np.zeros(size, np.int64), np.zeros(size, np.int64)  # per word index
        for i, tid in enumerate(self.added.values()):
            self.tokens[i], self.start[i], self.length[i] = tid, i, 1
        self.used = len(self.added)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if len(self.words) > self.MAX_WORDS:
            self._reset()
        codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)  # (n_chars,)
        new = codes[~self.known[codes]]
        if len(new):
            self._check_characters([chr(c) for c in np.unique(new)])
        direct = [self.disputed is not None and self.disputed.search(t) is not None for t in texts]
        counts, words = [], []
        for text, rust in zip(texts, direct):
            n = len(words)
            if not rust:
                if self.added_split is None:
                    words += self.findall(text)
                else:
                    for i, part in enumerate(self.added_split(text)):
                        if i % 2:
                            words.append(part)  # an added token: pre-seeded in the cache
                        elif part:
                            words += self.findall(part)
            counts.append(len(words) - n)
        index = np.fromiter(map(self.words.__getitem__, words), np.int64, len(words))  # (n_words,)
        if self.words.new:
            self._learn(self.words.new)
            self.words.new = []
        lengths = self.length[index]  # tokens per word
        ends = np.cumsum(lengths)
        at = np.repeat(self.start[index] - (ends - lengths), lengths)  # token position -> its place in the cache
        flat = self.tokens[at + np.arange(len(at))]
        bounds = np.concatenate([[0], ends])[np.cumsum([0] + counts)]  # each text's first token
        out = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        for i in np.flatnonzero(direct):
            out[i] = np.asarray(self.backend.encode(texts[i], add_special_tokens=False).ids, dtype=np.int32)
        return out

    def _learn(self, new: list[str]) -> None:
        """Tokens of words not seen before, from the BPE model, appended to the cache."""
        texts = ["".join([w.encode("utf-8").decode("latin-1") + _SEP for w in new[i:i + self.LEARN_CHUNK]])
                 .translate(_BYTE_LEVEL) for i in range(0, len(new), self.LEARN_CHUNK)]
        ids = np.concatenate([np.asarray(e.ids, dtype=np.int32)
                              for e in self.bpe.encode_batch_fast(texts, add_special_tokens=False)])
        ends = np.flatnonzero(ids == self.sep_id)  # each word is followed by a separator
        if len(ends) != len(new):
            raise AssertionError(f"word cache: {len(ends)} separators for {len(new)} words")
        lengths = ends - np.concatenate([[0], ends[:-1] + 1])
        tokens = ids[ids != self.sep_id]
        first, n = len(self.words) - len(new), len(self.words)
        if n > len(self.start):
            size = max(n, 2 * len(self.start))
            self.start, self.length = np.resize(self.start, size), np.resize(self.length, size)
        if self.used + len(tokens) > len(self.tokens):
            self.tokens = np.resize(self.tokens, max(self.used + len(tokens), 2 * len(self.tokens)))
        self.tokens[self.used:self.used + len(tokens)] = tokens
        self.start[first:n] = self.used + np.cumsum(lengths) - lengths
        self.length[first:n] = lengths
        self.used += len(tokens)

    def _check_characters(self, chars: list[str]) -> None:
        """Split each new character in a few contexts with both regex engines; a character they split
        differently is disputed (texts holding it go to the Rust tokenizer whole)."""
        pre = self.backend.pre_tokenizer
        for c in chars:
            probe = _PROBE.format(c=c)
            ours = np.cumsum([len(w) for w in self.findall(probe)]).tolist()
            theirs = [end for _, (_, end) in pre.pre_tokenize_str(probe)]
            self.known[ord(c)] = True
            if ours != theirs:
                self.disputed_chars.append(c)
                self.disputed = re.compile("[" + "".join(map(re.escape, self.disputed_chars)) + "]")


# ---------------------------------------------------------------------------------------------
# Tokenise: the C kernel (_bpe.c), when it was built
#
# The same idea as the word cache, all in C: split with the tokenizer's pattern, look each pre-token up
# in a bounded cache, run HF's BPE merge loop on the ones not seen. Only the character classes come from
# Python: each character's class (letter, number, white space, CR/LF) is taken from the `regex` module
# the first time it is met and checked by splitting a probe string with the kernel and with the Rust
# pre-tokenizer; a character they treat differently sends the texts holding it to the Rust tokenizer
# whole. Added tokens are cut out first and encoded as themselves (under NFC, a text holding one goes to
# the Rust tokenizer whole: HF matches them before or after normalising, per token). For an NFC tokenizer, a text Python's unicodedata finds in
# NFC is used as it is (the Rust normaliser's older Unicode tables cannot change it either: combining
# classes and decompositions, once assigned, never change), any other is normalised by the tokenizer's
# own normaliser (Python's newer tables would reorder marks or compose pairs that Rust's leave alone).
# Equality with the tokenizer is tested on tricky texts and on random ones.


@lru_cache(maxsize=1)
def native_kernel():
    """The compiled kernel, or None (no C compiler when the package was installed)."""
    try:
        from tifaforge.data import _bpe
    except ImportError:
        return None
    return _bpe


class NativeEncoder:
    """`encode(texts)` -> one int32 array of token ids per text, equal to `backend.encode_batch`'s ids
    with add_special_tokens=False. `build` returns None without the kernel or for a layout it cannot
    reproduce."""

    def __init__(self, bpe, backend, mode: int, nfc: bool, added: dict[str, int], byte_ids: np.ndarray,
                 merges: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        import regex

        self.bpe, self.backend, self.mode, self.nfc = bpe, backend, mode, nfc
        self.added = added
        alternatives = "|".join(map(regex.escape, sorted(added, key=len, reverse=True)))  # the longest first
        self.added_search = regex.compile(alternatives).search if added else None
        self.added_split = regex.compile(f"({alternatives})").split if added else None
        self.model = bpe.model(*merges, byte_ids)
        self.cache = bpe.cache()
        self.classes = np.zeros(0x110000, np.uint8)  # letter 1, number 2, white space 4, CR/LF 8
        self.known = np.zeros(0x110000, dtype=bool)  # characters already classed and checked
        self.disputed = np.zeros(0x110000, dtype=bool)
        self.class_patterns = [(1, regex.compile(r"\p{L}")), (2, regex.compile(r"\p{N}")), (4, regex.compile(r"\s")),
                               (8, regex.compile(r"[\r\n]"))]
        fixed = sorted(set(_PROBE.format(c="")))
        for c in fixed:
            self.classes[ord(c)] = self._class_of(c)
        self._check_characters(fixed)

    @classmethod
    def build(cls, backend) -> NativeEncoder | None:
        import importlib.util

        bpe = native_kernel()
        if bpe is None or importlib.util.find_spec("regex") is None:
            return None
        d = json.loads(backend.to_str())
        layout = _byte_level_layout(d)
        model = d.get("model") or {}
        if (layout is None or model.get("ignore_merges") or model.get("continuing_subword_prefix")
                or model.get("end_of_word_suffix")):
            return None
        pattern, normalizer, added = layout
        vocab = model.get("vocab") or {}
        byte_ids = [vocab.get(c) for _, c in sorted(_bytes_to_unicode().items())]  # byte -> its token
        if None in byte_ids:
            return None  # a byte without a token: HF's unknown-token handling is not reproduced
        left, right, new = [], [], []
        for merge in model.get("merges") or []:
            a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
            if a not in vocab or b not in vocab or a + b not in vocab:
                return None
            left.append(vocab[a])
            right.append(vocab[b])
            new.append(vocab[a + b])
        merges = tuple(np.asarray(x, dtype=np.int32) for x in (left, right, new))
        return cls(bpe, backend, 0 if pattern == QWEN2_SPLIT else 1, normalizer == "NFC", added,
                   np.asarray(byte_ids, dtype=np.int32), merges)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        given = texts
        if self.nfc:
            norm = self.backend.normalizer
            texts = [t if unicodedata.is_normalized("NFC", t) else norm.normalize_str(t) for t in texts]
        joined = "".join(texts)
        codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)  # (n_chars,)
        new = codes[~self.known[codes]]
        if len(new):
            self._check_characters([chr(c) for c in np.unique(new)])
        ends = np.cumsum([len(t) for t in texts], dtype=np.int64)
        direct = self._disputed_texts(codes, ends)
        search = self.added_search
        added = search is not None and (search(joined) is not None or (self.nfc and search("".join(given)) is not None))
        if not direct and not added:
            return self._run(codes, ends)
        # Some texts go to the Rust tokenizer whole; added tokens are cut out first (with NFC, the
        # texts holding one go whole too: HF matches them before or after normalising, per token).
        parts: list[str] = []
        plan: list[list[int] | None] = []  # per text: indices into parts, or -1 - id for an added token
        for i, (text, raw) in enumerate(zip(texts, given)):
            if i in direct or (added and self.nfc and (search(text) or search(raw))):
                plan.append(None)
            elif added and search(text):
                items = []
                for j, segment in enumerate(self.added_split(text)):
                    if j % 2:
                        items.append(-1 - self.added[segment])
                    elif segment:
                        items.append(len(parts))
                        parts.append(segment)
                plan.append(items)
            else:
                plan.append([len(parts)])
                parts.append(text)
        encoded = self._run(np.frombuffer("".join(parts).encode("utf-32-le"), dtype=np.uint32),
                            np.cumsum([len(p) for p in parts], dtype=np.int64))
        out = []
        for items, raw in zip(plan, given):
            if items is None:
                out.append(np.asarray(self.backend.encode(raw, add_special_tokens=False).ids, dtype=np.int32))
            elif len(items) == 1 and items[0] >= 0:
                out.append(encoded[items[0]])
            else:
                out.append(np.concatenate([encoded[k] if k >= 0 else np.array([-1 - k], np.int32) for k in items]
                                          or [np.zeros(0, np.int32)]))
        return out

    def _run(self, codes: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
        """The kernel over texts back to back (`ends`: where each ends): one id array per text."""
        out = np.empty(4 * len(codes), np.int32)  # one token per UTF-8 byte at most; pages never written stay free
        out_ends = np.empty(len(ends), np.int64)
        self.bpe.encode(codes, ends, self.classes, self.model, self.mode, out, out_ends, self.cache)
        starts = np.concatenate([np.zeros(1, np.int64), out_ends[:-1]])
        return [out[a:b] for a, b in zip(starts.tolist(), out_ends.tolist())]

    def _disputed_texts(self, codes: np.ndarray, ends: np.ndarray) -> set[int]:
        """Texts holding a character the kernel and the Rust tokenizer treat differently."""
        bad = self.disputed[codes]
        if not bad.any():
            return set()
        seen = np.concatenate([[0], np.cumsum(bad)])
        starts = np.concatenate([[0], ends[:-1]])
        return set(np.flatnonzero(seen[ends] > seen[starts]).tolist())

    def _class_of(self, c: str) -> int:
        return sum(bit for bit, pattern in self.class_patterns if pattern.match(c))

    def _split(self, text: str) -> list[int]:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        out = np.empty(max(1, len(codes)), np.int64)
        n = self.bpe.split(codes, np.array([len(codes)], np.int64), self.classes, self.mode, out)
        return out[:n].tolist()

    def _check_characters(self, chars: list[str]) -> None:
        """Class each new character and split it in a few contexts with the kernel and the Rust
        pre-tokenizer; a character split differently is disputed (texts holding it go to the Rust
        tokenizer whole)."""
        pre = self.backend.pre_tokenizer
        for c in chars:
            code = ord(c)
            if not self.known[code]:
                self.classes[code] = self._class_of(c)
            self.known[code] = True
        for c in chars:
            probe = _PROBE.format(c=c)
            theirs = [end for _, (_, end) in pre.pre_tokenize_str(probe)]
            if self._split(probe) != theirs:
                self.disputed[ord(c)] = True

"""Held-out metrics: measures of the answers that no training rule rewards, so a policy that games
the rules cannot look better on them by construction.

    tifa eval runs/demo      # reported beside the rule metrics; slop.json lists the over-used phrases

- MATTR (moving-average type-token ratio, Covington & McFall 2010): distinct units in every window
  of 50 units, averaged; unlike distinct-n it does not fall just because an answer is longer.
- Compression ratio (Shaib et al. 2024): bytes of all answers / bytes after zlib; higher means the
  answers repeat each other or themselves.
- Self-overlap: the share of an answer's 4-grams found in another answer to the same prompt (a
  self-BLEU-style homogeneity measure: the same story told eight times).
- Slop (as Antislop and EQ-Bench's slop score define it): phrases a model uses far more often than
  human prose does. A phrase (unit 3- and 4-grams: characters in Chinese, words in English) is slop
  when its frequency in the evaluated answers is at least `SLOP_RATIO` times its frequency in a human
  reference corpus (the user's novels, read by the novel ingest; the demo novels by default) and it
  occurs in at least `SLOP_MIN_ANSWERS` answers (one looping answer is repetition, not slop). The
  list is built from all models of one evaluation together, so every stage is measured against one
  list; an answer's slop rate is its slop-phrase hits per 100 units.

All pure Python over text (stdlib), fast enough for thousands of answers.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tifaforge.rewards.rules import units

MATTR_WINDOW = 50
SLOP_NS = (3, 4)
SLOP_RATIO = 20.0  # used 20x more than in human prose
SLOP_MIN_ANSWERS = 3
SLOP_MIN_COUNT = 4
SLOP_LIST_SIZE = 100
REFERENCE_MAX_CHARS = 20_000_000  # of a user's novels, the first 20M characters make the reference


def mattr(text: str, window: int = MATTR_WINDOW) -> float:
    """Moving-average type-token ratio over the text's units; the plain TTR below one window."""
    toks = units(text)
    if not toks:
        return 0.0
    if len(toks) <= window:
        return len(set(toks)) / len(toks)
    counts = Counter(toks[:window])
    total = len(counts)
    for i in range(window, len(toks)):
        out, new = toks[i - window], toks[i]
        counts[out] -= 1
        if not counts[out]:
            del counts[out]
        counts[new] += 1
        total += len(counts)
    return total / (len(toks) - window + 1) / window


def compression_ratio(texts: Iterable[str]) -> float:
    """UTF-8 bytes / zlib-compressed bytes of the texts joined by newlines (0 for no text)."""
    raw = "\n".join(texts).encode("utf-8")
    return len(raw) / len(zlib.compress(raw, 9)) if raw else 0.0


def _grams(text: str, n: int) -> list[tuple[str, ...]]:
    toks = units(text)
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def self_overlap(answers: Sequence[str], n: int = 4) -> list[float]:
    """For each answer: the share of its n-grams that occur in any other answer of the same list."""
    sets = [set(_grams(a, n)) for a in answers]
    counts = Counter(g for s in sets for g in s)
    out = []
    for s in sets:
        out.append(sum(counts[g] > 1 for g in s) / len(s) if s else 0.0)
    return out


def phrase(gram: tuple[str, ...]) -> str:
    """An n-gram of units as readable text: CJK characters joined, words spaced."""
    return "".join(gram) if all(len(u) == 1 and not u.isascii() for u in gram) else " ".join(gram)


def candidates(answers: Sequence[str], min_answers: int = SLOP_MIN_ANSWERS, min_count: int = SLOP_MIN_COUNT) -> set:
    """The n-grams that could be slop (often enough, in enough answers): all the reference needs counting."""
    count: Counter = Counter()
    where: Counter = Counter()
    for a in answers:
        for n in SLOP_NS:
            grams = _grams(a, n)
            count.update(grams)
            where.update(set(grams))
    return {g for g, c in count.items() if c >= min_count and where[g] >= min_answers}


def reference_counts(paths: Sequence[str | Path], wanted: set | None = None,
                     max_chars: int = REFERENCE_MAX_CHARS) -> tuple[Counter, int]:
    """(n-gram counts for SLOP_NS, units read) of human reference prose: .txt/.epub files or folders,
    read and normalised by the novel ingest (encodings, EPUB), up to `max_chars` characters. `wanted`:
    count only these n-grams (`candidates`), so a large reference costs time, not memory."""
    from tifaforge.data.novels.read import FileReport, file_chapters, find_inputs

    counts: Counter = Counter()
    seen = total = 0
    for path in find_inputs(paths):
        report = FileReport(str(path), path.stat().st_size)
        for chapter in file_chapters(path, None, report):
            toks = units(chapter[:max(0, max_chars - seen)])
            seen += len(chapter)
            total += len(toks)
            for n in SLOP_NS:
                grams = (tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
                counts.update(grams if wanted is None else (g for g in grams if g in wanted))
            if seen >= max_chars:
                return counts, total
    return counts, total


def slop_list(answers: Sequence[str], reference: Counter, reference_units: int, *, ratio: float = SLOP_RATIO,
              min_answers: int = SLOP_MIN_ANSWERS, min_count: int = SLOP_MIN_COUNT,
              size: int = SLOP_LIST_SIZE) -> list[dict]:
    """The over-used phrases of `answers` against the reference, most over-used first: each
    {"phrase", "count", "answers", "ratio"}; ratio = (count / answer units) / ((ref count + 1) / ref units).
    A phrase inside a longer listed phrase that it never occurs outside of is left out."""
    count: Counter = Counter()
    where: Counter = Counter()
    total = 0
    for a in answers:
        total += len(units(a))
        for n in SLOP_NS:
            grams = _grams(a, n)
            count.update(grams)
            where.update(set(grams))
    if not total or not reference_units:
        return []
    found = []
    for g, c in count.items():
        if c < min_count or where[g] < min_answers:
            continue
        r = (c / total) / ((reference[g] + 1) / reference_units)
        if r >= ratio:
            found.append({"phrase": phrase(g), "gram": g, "count": c, "answers": where[g], "ratio": round(r, 1)})
    longer = {x["gram"]: x["count"] for x in found if len(x["gram"]) == max(SLOP_NS)}
    def covered(x: dict) -> bool:  # a 3-gram counted only as part of a listed 4-gram says nothing new
        g = x["gram"]
        k = len(g)
        inside = max(sum(c for h, c in longer.items() if h[:k] == g), sum(c for h, c in longer.items() if h[-k:] == g))
        return k < max(SLOP_NS) and inside >= x["count"]
    found = [x for x in found if not covered(x)]
    found.sort(key=lambda x: (-x["ratio"] * x["count"], x["phrase"]))
    return [{k: v for k, v in x.items() if k != "gram"} for x in found[:size]]


def slop_rate(text: str, phrases: Iterable[str]) -> float:
    """Hits of the listed phrases per 100 units of the text (0 for an empty text)."""
    toks = units(text)
    if not toks:
        return 0.0
    wanted = {tuple(units(p)) for p in phrases}
    wanted.discard(())
    hits = sum(1 for n in {len(w) for w in wanted} for i in range(len(toks) - n + 1) if tuple(toks[i:i + n]) in wanted)
    return 100.0 * hits / len(toks)


def read_slop_list(path: str | Path) -> list[str]:
    """Phrases from a slop.json written by `tifa eval` ({"phrases": [{"phrase": …}, …]}) or a text
    file with one phrase per line."""
    from tifaforge.errors import TifaError
    from tifaforge.utils import read_json_file, read_text_bounded

    path = Path(path)
    if path.suffix == ".json":
        obj = read_json_file(path)
        items = obj.get("phrases") if isinstance(obj, dict) else None
        if not isinstance(items, list):
            raise TifaError(f"{path}: expected {{\"phrases\": [{{\"phrase\": ...}}, ...]}} (the slop.json tifa eval writes)")
        out = []
        for i, x in enumerate(items):
            p = x.get("phrase") if isinstance(x, dict) else x
            if not isinstance(p, str) or not p.strip():
                raise TifaError(f"{path}: phrases[{i}]: expected a phrase (a non-empty string)")
            out.append(p)
        return out
    return [line.strip() for line in read_text_bounded(path).splitlines() if line.strip() and not line.startswith("#")]

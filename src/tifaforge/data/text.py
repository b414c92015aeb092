"""Pure text functions of the novel ingest: decode bytes, normalise, split chapters, strip boilerplate.

    tifa data novels books/ --out data/cpt --tokenizer models/tiny     # runs them (data/novels/)

Everything here maps bytes or str to str with no file or network access, so each function is tested
on its own. Streaming versions take *pieces* (consecutive parts of one file's text) and give the same
result as the whole-text functions whatever the cut points (tested by property): memory stays
bounded by the piece size, not the file size.

- Decoding: BOM first, then UTF-8 (up to 1% damaged bytes), then charset-normalizer's guess (trial
  decoding cannot tell Big5 from GB: GB18030 decodes almost any byte string). The GB family always
  decodes as GB18030 (rare 4-byte characters such as 𠮷 survive); a detected Big5 decodes as cp950,
  the Windows Big5 that real files use (it adds the euro sign, ETEN characters and maps A1E3 to ～).
  Undecodable bytes are dropped and returned with their offsets, never replaced silently.
- Normalisation keeps Chinese intact: CR/CRLF -> LF; zero-width characters (U+200B/C/D, U+FEFF)
  removed; each line stripped of spaces, tabs, U+3000 and NBSP at both ends (paragraph indents), a
  run inside a line becomes one space; at most one blank line in a row; no blank line at the start;
  a final newline. No NFKC: full-width punctuation (，。！？“”) stays as it is.
- Chapters start at heading lines (第X章/回/节/卷… with Chinese or Arabic numerals, Chapter N,
  序章/楔子/番外…, numbered headings "1." and "一、"); a heading directly after another heading
  (volume then chapter title) stays in the same chapter. Joining the chapters gives the text back.
- Boilerplate: whole short lines of a known kind (site ads, URLs, 本章完, 求月票, update notices,
  author's PS) and bracketed inline ads are removed and counted by kind.
"""

from __future__ import annotations

import codecs
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import lru_cache

# ---------------------------------------------------------------------------------------------
# Decoding

BOMS = (  # UTF-32 before UTF-16: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
DETECT_SAMPLE = 256 << 10  # bytes given to the statistical detector
# More undecodable bytes than both of these in a file's first DETECT_SAMPLE bytes means the wrong
# encoding (the file is skipped), not a damaged file (the bytes are dropped and reported).
MAX_BAD_FRACTION = 0.01
MAX_BAD_BYTES = 8


class UndetectableEncoding(ValueError):
    """The detector found no plausible encoding for a byte sample."""


# Codecs whose byte order or BOM would be re-read at every block: BOMs are handled before decoding.
_BOM_FREE = {"gb2312": "gb18030", "gbk": "gb18030", "utf-16": "utf-16-le", "utf-32": "utf-32-le",
             "utf-8-sig": "utf-8"}


def codec_name(name: str) -> str:
    """Python's name for an encoding; the GB family (GBK, GB2312, CP936…) always becomes gb18030."""
    codec = codecs.lookup(name).name  # raises LookupError for unknown names
    return _BOM_FREE.get(codec, codec)


def detect_encoding(head: bytes, forced: str | None = None) -> tuple[str, int, str]:
    """(codec, BOM length, how it was decided) from the first bytes of a file."""
    for bom, codec in BOMS:
        if head.startswith(bom):
            if forced and codec_name(forced)[:6] != codec[:6]:
                return codec_name(forced), 0, f"forced {forced} (ignoring a {codec} BOM)"
            return codec, len(bom), f"{codec} BOM"
    if forced:
        return codec_name(forced), 0, f"forced {forced}"
    sample = head[:DETECT_SAMPLE]
    sample = sample[: line_cut(sample, "latin-1")] or sample  # a character cut at the end fails every codec
    if _mostly_utf8(sample):  # a few damaged bytes must not send a UTF-8 file to the detector
        return "utf-8", 0, "UTF-8"
    from charset_normalizer import from_bytes

    best = from_bytes(sample).best()
    if best is None:
        raise UndetectableEncoding("no plausible encoding found")
    codec = codec_name(best.encoding)
    return ("cp950" if codec == "big5" else codec), 0, f"detected {best.encoding}"


def _mostly_utf8(sample: bytes) -> bool:
    return not too_damaged(sample_errors(sample, "utf-8"), len(sample))


def sample_errors(sample: bytes, codec: str) -> list[tuple[int, bytes]]:
    """Undecodable runs of a sample (enough of them to tell `too_damaged`), not counting a character
    cut by the sample's end."""
    _, bad = decode(sample, codec, limit=max(MAX_BAD_BYTES, MAX_BAD_FRACTION * len(sample)) + 2)
    if bad and bad[-1][0] + len(bad[-1][1]) == len(sample) and len(sample) - bad[-1][0] < 4:
        bad.pop()
    return bad


def too_damaged(bad: list[tuple[int, bytes]], size: int) -> bool:
    return sum(len(b) for _, b in bad) > max(MAX_BAD_BYTES, MAX_BAD_FRACTION * size)


_bad = threading.local()


class _TooManyErrors(Exception):
    pass


def _collect_bad(err: UnicodeDecodeError) -> tuple[str, int]:
    _bad.spans.append((err.start, err.end))
    if len(_bad.spans) > _bad.limit:
        raise _TooManyErrors
    return "", err.end


codecs.register_error("tifaforge.collect", _collect_bad)


def decode(data: bytes, codec: str, limit: float = float("inf")) -> tuple[str, list[tuple[int, bytes]]]:
    """Decode, dropping undecodable bytes; returns (text, [(offset, a run of bad bytes)…]).

    Past `limit` bad sequences decoding stops: the text is then "" and the runs found so far return.
    """
    _bad.spans, _bad.limit = [], limit
    try:
        text = data.decode(codec, errors="tifaforge.collect")
    except _TooManyErrors:
        text = ""
    runs: list[list[int]] = []
    for start, end in _bad.spans:  # adjacent bad bytes form one run
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return text, [(s, data[s:e]) for s, e in runs]


def line_cut(data: bytes, codec: str) -> int:
    """Length of the longest prefix of `data` that ends with a line break (0 if none).

    A block cut there decodes on its own, so byte offsets stay exact: in the ASCII-compatible
    encodings (UTF-8, GB18030, Big5) bytes 0x0A/0x0D never occur inside a multibyte character, and
    in UTF-16/32 the break is searched at code-unit alignment.
    """
    best = 0
    for ch in "\n\r":
        unit = ch.encode(codec)
        i = data.rfind(unit)
        while i > 0 and i % len(unit):
            i = data.rfind(unit, 0, i + len(unit) - 1)
        if i >= 0 and i % len(unit) == 0:
            best = max(best, i + len(unit))
    return best


# ---------------------------------------------------------------------------------------------
# Normalisation

ZERO_WIDTH = "\u200b\u200c\u200d\ufeff"
LINE_SPACE = " \t\u3000\u00a0"
_BLANK_RUN = re.compile(r"\n{3,}")


def complete_lines(pieces: Iterable[str]) -> Iterator[str]:
    """Re-cut pieces so that each ends at a line break (a CR at a piece's end waits for a LF)."""
    carry = ""
    for piece in pieces:
        text = carry + piece
        cut = max(text.rfind("\n"), text.rfind("\r", 0, len(text) - 1)) + 1
        carry = text[cut:]
        if cut:
            yield text[:cut]
    if carry:
        yield carry


def _clean_lines(text: str) -> str:
    """Line endings, zero-width characters and spaces of whole lines; blank runs cut to one."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    for ch in ZERO_WIDTH:
        if ch in text:
            text = text.replace(ch, "")
    text = "\n".join([line.strip(LINE_SPACE) for line in text.split("\n")])
    for ch in LINE_SPACE[1:]:  # str.replace is ~8x faster here than one regex
        if ch in text:
            text = text.replace(ch, " ")
    while "  " in text:
        text = text.replace("  ", " ")
    return _BLANK_RUN.sub("\n\n", text) if "\n\n\n" in text else text


def normalise_stream(pieces: Iterable[str]) -> Iterator[str]:
    """Normalised text of consecutive pieces, yielded as whole lines (see the module docstring)."""
    started = blank = False
    for piece in complete_lines(pieces):
        text = _clean_lines(piece)
        body = text.strip("\n")
        if not body:
            blank = blank or "\n" in text
            continue
        if started and (blank or text.startswith("\n")):
            yield "\n"
        yield body + "\n"
        started, blank = True, text.endswith("\n\n")


def normalise(text: str) -> str:
    return "".join(normalise_stream([text]))


@lru_cache(maxsize=1)
def _opencc():
    from opencc import OpenCC

    return OpenCC("t2s")


def to_simplified(text: str) -> str:
    """Traditional -> Simplified Chinese (OpenCC t2s; the pure-Python OpenCC is slow: ~1.5 MB/s)."""
    return _opencc().convert(text)


# ---------------------------------------------------------------------------------------------
# Chapters

_NUM = "0-9０-９零〇一二两兩三四五六七八九十百千万萬壹贰貳叁參肆伍陆陸柒捌玖拾佰仟"
HEADING = re.compile(
    r"^[【\[]?(?:正文 ?)?(?:"
    rf"第 ?[{_NUM}]+ ?[章回节節卷集部篇幕]"
    r"|(?:chapter|ch\.) ?(?:\d+|[ivxlcdm]+)\b"
    r"|序章|序言|楔子|引子|尾声|尾聲|后记|後記|番外"
    r"|\d{1,4}[.、．](?!\d)"
    r"|[一二三四五六七八九十百]{1,5}、"
    r")[^\n。，；]{0,40}$",  # a short line without sentence punctuation
    re.M | re.I,
)
_NON_SPACE = re.compile(r"\S")
MAX_CHAPTER_CHARS = 1 << 20  # a text without headings is cut into parts of about this size


def _segments(piece: str) -> Iterator[tuple[str, bool]]:
    """The piece cut before each heading line: (segment, starts with a heading)."""
    starts = [m.start() for m in HEADING.finditer(piece)]
    head = piece[: starts[0] if starts else len(piece)]
    if head:
        yield head, False
    for a, b in zip(starts, starts[1:] + [len(piece)]):
        yield piece[a:b], True


def _has_body(segment: str, heading: bool) -> bool:
    """Whether the segment has a non-blank line besides its heading line."""
    start = segment.find("\n") + 1 if heading else 0
    if heading and not start:
        return False
    return _NON_SPACE.search(segment, start) is not None


def split_chapters_stream(pieces: Iterable[str], max_chars: int = MAX_CHAPTER_CHARS) -> Iterator[str]:
    """Chapters of normalised text given as whole-line pieces; their concatenation is the text."""
    parts: list[str] = []
    size, body = 0, False
    for piece in pieces:
        for segment, heading in _segments(piece):
            if parts and ((heading and body) or size >= max_chars):
                yield "".join(parts)
                parts, size, body = [], 0, False
            parts.append(segment)
            size += len(segment)
            body = body or _has_body(segment, heading)
    if parts:
        yield "".join(parts)


def split_chapters(text: str) -> list[str]:
    return list(split_chapters_stream([text]))


# ---------------------------------------------------------------------------------------------
# Boilerplate

# kind -> (trigger strings, a pattern the line must also match or None, longest line removed). A line
# is removed when it holds a trigger, matches the pattern and is short: a paragraph that mentions 月票
# is story, a 12-character line is a plea; 三更半夜 is a time of night, 今天三更 an update notice.
# Finding triggers is one literal search grouped by first character (Python's re is fast at that and
# slow at alternations of patterns); the patterns run only on the few lines that hold a trigger.
_N = "一二两兩三四五六双雙0-9"
BOILERPLATE: dict[str, tuple[tuple[str, ...], str | None, int]] = {
    "url": (("http://", "https://", "www.", "WWW.", ".com", ".COM", ".net", ".org", ".cc", ".cn", ".info", ".la",
             ".me", ".tw", ".io", ".xyz", ".top", ".vip"),
            r"(?i:(?:https?://|www\.)\S|[a-z0-9-]\.(?:com|net|org|cc|cn|info|la|me|tw|io|xyz|top|vip)\b)", 100),
    "site_ad": (("笔趣阁", "筆趣閣", "最快更新", "无弹窗", "無彈窗", "全文阅读", "全文閱讀", "手机阅读", "手機閱讀", "手机用户",
                 "手機用戶", "请记住本站", "請記住本站", "本站地址", "本站域名", "本站网址", "本站網址", "一秒记住", "一秒記住",
                 "免费阅读", "免費閱讀", "章节错误", "章節錯誤", "点此举报", "點此舉報", "加入书签", "加入書籤", "首发网址",
                 "首發網址"), None, 60),
    "chapter_end": (("本章完", "本章结束", "本章結束", "未完待续", "未完待續", "全书完", "全書完", "全文完"), None, 20),
    "vote_request": (("月票", "推荐票", "推薦票", "求推荐", "求推薦", "求收藏", "求订阅", "求訂閱", "求打赏", "求打賞", "求点击",
                      "求點擊", "求票"), None, 40),
    "update_notice": (("一更", "二更", "两更", "兩更", "三更", "四更", "五更", "六更", "双更", "雙更", "加更", "爆更", "断更",
                       "斷更", "更新晚", "更新较晚", "更新較晚", "更新推迟", "更新推遲", "请假", "請假"),
                      rf"[今明][天日晚].{{0,4}}[{_N}]更|第[{_N}]更|[{_N}]更(?:奉上|送上|到|完毕|完畢)|还有一更|還有一更"
                      r"|加更|爆更|[断斷]更|更新(?:晚了|[较較]晚|推[迟遲])|[请請]假[条條]|今天[请請]假", 40),
    "author_note": (("PS:", "PS：", "ps:", "ps：", "Ps:", "Ps：", "P.S.", "作者有话说", "作者有話說", "作者的话", "作者的話"),
                    r"^(?i:ps\s*[:：]|p\.s\.)|^作者(?:有[话話][说說]|的[话話])", 200),
}
_INLINE_TRIGGERS = ("本章未完", "点击下一页", "點擊下一頁")  # bracketed ads inside a line: _INLINE_AD cuts them
_KIND: dict[str, str | None] = {t: kind for kind, (triggers, _, _) in BOILERPLATE.items() for t in triggers}
_KIND.update(dict.fromkeys(_INLINE_TRIGGERS))
_VERIFY = {kind: re.compile(p) for kind, (_, p, _) in BOILERPLATE.items() if p}


def _literal_alternation(words: Iterable[str]) -> re.Pattern:
    by_first: dict[str, list[str]] = {}
    for w in sorted(words, key=len, reverse=True):
        by_first.setdefault(w[0], []).append(re.escape(w[1:]))
    return re.compile("|".join(f"{re.escape(c)}(?:{'|'.join(rest)})" for c, rest in by_first.items()))


_TRIGGER = _literal_alternation(_KIND)
_INLINE_AD = re.compile(
    r"[（(【\[][^）)】\]\n]{0,30}"
    r"(?:https?://|www\.|\.com|最快更新|[请請][记記]住|本章未完|[点點][击擊]下一[页頁])"
    r"[^）)】\]\n]{0,30}[）)】\]]",
    re.I,
)


def strip_boilerplate(text: str) -> tuple[str, Counter]:
    """Remove boilerplate lines and inline ads from normalised text; counts by kind."""
    removed: Counter = Counter()
    if not _TRIGGER.search(text):
        return text, removed
    text, n = _INLINE_AD.subn("", text)
    if n:
        removed["inline_ad"] = n
    kept, pos = [], 0
    for m in _TRIGGER.finditer(text):
        start = text.rfind("\n", 0, m.start()) + 1
        if start < pos:
            continue  # on a line already removed
        end = text.find("\n", m.end()) + 1 or len(text)
        kind = _KIND[m.group()]
        if kind and _is_boilerplate(text[start:end].strip(), kind):
            kept.append(text[pos:start])
            pos = end
            removed[kind] += 1
    if not removed:
        return text, removed
    kept.append(text[pos:])
    return normalise("".join(kept)), removed


def _is_boilerplate(line: str, kind: str) -> bool:
    _, _, longest = BOILERPLATE[kind]
    return len(line) <= longest and (kind not in _VERIFY or _VERIFY[kind].search(line) is not None)


def clean_chapter(text: str, simplify: bool = False) -> tuple[str, Counter]:
    """A chapter as it is trained on: optionally Simplified, without boilerplate."""
    if simplify:
        text = to_simplified(text)
    return strip_boilerplate(text)

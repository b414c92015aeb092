"""Novel files -> chapters of normalised text, streamed: `.txt` in blocks of a few MB, `.epub` by its spine.

    tifa data novels books/ extra.epub --out data/cpt --tokenizer models/tiny     # reads with this

The inputs are the .txt/.epub files named or found under the named folders (recursively), each once.
A .txt file is read in blocks that end at a line break and decoded with text.py (BOM / UTF-8 /
statistical detection, the GB family as GB18030, or the encoding forced with --encoding); bytes that
do not decode are dropped and recorded with their file offsets in the file's FileReport, which goes
to stats.json. An EPUB's (X)HTML documents are read in the order of its OPF spine, each decoded by
its XML declaration or BOM, as text with a line per block element. Either way text.py's streaming
functions normalise the text and cut it into chapters, so memory is bounded by the block size, not
the file size. A file that cannot be used raises SkipFile with the reason, and is skipped.
"""

from __future__ import annotations

import posixpath
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tifaforge.data import text as tx
from tifaforge.errors import TifaError
from tifaforge.utils import file_kind, printable_path

SUFFIXES = (".txt", ".epub")
READ_BLOCK = 4 << 20  # bytes read at a time from a .txt file
# EPUB caps, counted on the bytes as they are inflated, never on the sizes the zip declares (those
# can lie; zipfile inflates up to 2 GB in one call when asked for a whole member).
MAX_EPUB_MEMBER = 64 << 20  # uncompressed bytes of one document; a larger one is skipped
MAX_EPUB_META = 4 << 20  # container.xml and the OPF
MAX_EPUB_TOTAL = 256 << 20  # uncompressed bytes read from one EPUB; past it the rest is not read
MAX_EPUB_MEMBERS = 20_000  # entries in the zip; more is not a book
ZIP_CHUNK = 1 << 20
HTML_CHUNK = 1 << 20  # characters fed to the HTML parser at a time (its output is flushed after each)
MAX_LISTED = 20  # offsets listed per problem in stats.json (the count is always complete)


def find_inputs(inputs: Iterable[str | Path], passed: list[dict] | None = None) -> list[Path]:
    """Every .txt/.epub file named or under a named folder, in order, each once. Entries of a folder
    that bear the suffix but are not regular files (a dangling symlink, a FIFO, a device) are not
    read, and each is appended to `passed` with the reason, for stats.json and a warning."""
    files: dict[Path, None] = {}
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            named = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and not p.is_dir())
            found = [p for p in named if p.is_file()]
            if passed is not None:
                passed += [{"path": printable_path(p), "reason": _not_read(p)} for p in named if not p.is_file()]
            if not found:
                raise TifaError(f"{printable_path(path)}: no .txt or .epub files in this folder")
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise TifaError(f"{printable_path(path)}: not a .txt or .epub file")
            found = [path]
        elif path.exists():
            raise TifaError(f"{printable_path(path)}: {_not_read(path)}; give a .txt or .epub file or a folder")
        else:
            raise TifaError(f"{printable_path(path)}: no such file or folder"
                            + (" (a dangling symlink)" if path.is_symlink() else ""))
        files.update(dict.fromkeys(p.resolve() for p in found))
    if not files:
        raise TifaError("no input files given")
    return list(files)


def _not_read(path: Path) -> str:
    try:
        return f"is {file_kind(path.stat().st_mode)}, not a regular file"
    except OSError:
        return "a dangling symlink" if path.is_symlink() else "cannot be read"


class SkipFile(Exception):
    """A file whose content cannot be used; it is skipped and the reason goes to stats.json."""


@dataclass
class FileReport:
    path: str
    bytes: int
    encoding: str | None = None
    decided_by: str | None = None
    chapters: int = 0
    chapters_kept: int = 0
    characters: int = 0
    duplicate_of: Counter = field(default_factory=Counter)  # file index -> chapters dropped as its copies
    bad_bytes: int = 0
    bad_spans: list[dict] = field(default_factory=list)  # the first MAX_LISTED runs: offset, bytes in hex
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None

    def add_bad(self, spans: list[tuple[int, bytes]], base: int, where: str = "") -> None:
        self.bad_bytes += sum(len(b) for _, b in spans)
        room = MAX_LISTED - len(self.bad_spans)
        self.bad_spans += [{"member": where, "offset": base + o, "bytes": b.hex()} if where else
                           {"offset": base + o, "bytes": b.hex()} for o, b in spans[:max(room, 0)]]

    def warnings(self) -> list[str]:
        out = [f"{self.path}: skipped: {self.skipped}"] if self.skipped else []
        if self.bad_bytes and not self.skipped:
            first = self.bad_spans[0]
            out.append(f"{self.path}: {self.bad_bytes} undecodable byte(s) as {self.encoding} dropped, first at "
                       f"offset {first['offset']}{' of ' + first['member'] if 'member' in first else ''}")
        return out + [f"{self.path}: {p}" for p in self.problems]

    def as_dict(self, paths: list[str]) -> dict:
        d = {k: getattr(self, k) for k in ("path", "bytes", "encoding", "decided_by", "chapters", "chapters_kept",
                                          "characters", "bad_bytes", "problems", "skipped")}
        d["bad_spans"] = self.bad_spans
        d["duplicate_of"] = {paths[i]: n for i, n in self.duplicate_of.most_common()}
        return d


def file_chapters(path: Path, encoding: str | None, report: FileReport,
                  advance: Callable[[int], Any] = lambda n: None) -> Iterator[str]:
    """The chapters of one file's normalised text, streamed (see text.split_chapters_stream)."""
    raw = _epub_texts(path, report) if path.suffix.lower() == ".epub" else _txt_texts(path, encoding, report, advance)
    yield from tx.split_chapters_stream(tx.normalise_stream(raw))


def _txt_texts(path: Path, forced: str | None, report: FileReport, advance) -> Iterator[str]:
    try:
        with path.open("rb") as f:
            head = f.read(max(READ_BLOCK, tx.DETECT_SAMPLE))
            codec, bom = _choose_encoding(head, forced, report)
            advance(bom)
            yield from _decode_blocks(_line_blocks(f, head[bom:], codec), codec, bom, report, advance)
    except OSError as e:
        raise TifaError(f"{printable_path(path)}: cannot read: {e.strerror or e}") from None


def _choose_encoding(head: bytes, forced: str | None, report: FileReport) -> tuple[str, int]:
    """(codec, BOM length); a file that is empty, undetectable or mostly undecodable is skipped."""
    if not head:
        raise SkipFile("empty file")
    try:
        codec, bom, report.decided_by = tx.detect_encoding(head, forced)
    except tx.UndetectableEncoding:
        raise SkipFile("cannot tell the encoding; pass --encoding") from None
    report.encoding = codec
    sample = head[bom:bom + tx.DETECT_SAMPLE]
    bad = tx.sample_errors(sample, codec)
    if tx.too_damaged(bad, len(sample)):
        raise SkipFile(f"{len(bad)} undecodable sequences in the first {len(sample)} bytes as {codec}, "
                       f"first at offset {bom + bad[0][0]}: wrong encoding? pass --encoding")
    return codec, bom


def _decode_blocks(blocks: Iterable[bytes], codec: str, offset: int, report: FileReport, advance) -> Iterator[str]:
    """Decoded blocks; undecodable bytes are dropped and recorded with their file offsets."""
    for block in blocks:
        text, bad = tx.decode(block, codec)
        report.add_bad(bad, offset)
        offset += len(block)
        advance(len(block))
        yield text


def _line_blocks(f, head: bytes, codec: str) -> Iterator[bytes]:
    """`head` and the rest of the file in blocks that end at a line break (or at the end of the file)."""
    buf = head
    while True:
        more = f.read(READ_BLOCK)
        if not more:
            if buf:
                yield buf
            return
        buf += more
        cut = tx.line_cut(buf, codec)
        if cut:
            yield buf[:cut]
            buf = buf[cut:]


# ---------------------------------------------------------------------------------------------
# EPUB: zipfile + the OPF spine + html.parser


class _OverCap(Exception):
    pass


class _Budget:
    """Uncompressed bytes left to read from one EPUB (MAX_EPUB_TOTAL)."""

    def __init__(self, total: int) -> None:
        self.total, self.left = total, total

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _OverCap(f"over the {self.total:,}-byte cap on what one EPUB may inflate to")


def _epub_texts(path: Path, report: FileReport) -> Iterator[str]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:  # ValueError: a malformed zip directory
        raise SkipFile(f"cannot read as EPUB: {e}") from None
    report.decided_by = "EPUB: XML declaration or BOM of each document"
    budget = _Budget(MAX_EPUB_TOTAL)
    with zf:
        if len(zf.infolist()) > MAX_EPUB_MEMBERS:
            raise SkipFile(f"{len(zf.infolist()):,} entries in the zip, over the {MAX_EPUB_MEMBERS:,} cap for an EPUB")
        members = _spine(zf, report, budget)
        if not members:
            raise SkipFile("no XHTML documents in the EPUB")
        for i, name in enumerate(members):
            try:
                data = _epub_member(zf, name, report, budget)
            except _OverCap as e:
                report.problems.append(f"{name}: {e}; it and the {len(members) - i - 1} documents after it not read")
                return
            if data is not None:
                report.encoding = _xml_encoding(data)
                text, bad = tx.decode(data, report.encoding)
                del data
                report.add_bad(bad, 0, name)
                yield from html_text_stream(text)
                yield "\n"


def _read_member(zf: zipfile.ZipFile, name: str, cap: int, budget: _Budget) -> bytes:
    """A member's bytes, inflated ZIP_CHUNK at a time and refused past `cap` or the EPUB's budget."""
    out = bytearray()
    with zf.open(name) as f:
        while chunk := f.read(ZIP_CHUNK):
            budget.take(len(chunk))
            out += chunk
            if len(out) > cap:
                raise _OverCap(f"over {cap:,} bytes uncompressed (the cap for one member)")
    return bytes(out)


def _spine(zf: zipfile.ZipFile, report: FileReport, budget: _Budget) -> list[str]:
    """Member names of the reading order; without a usable OPF, every (X)HTML member by name."""
    import xml.etree.ElementTree as ET

    names = set(zf.namelist())
    try:
        container = ET.fromstring(_read_member(zf, "META-INF/container.xml", MAX_EPUB_META, budget))
        opf_name = container.find(".//{*}rootfile").attrib["full-path"]
        opf = ET.fromstring(_read_member(zf, opf_name, MAX_EPUB_META, budget))
        base = posixpath.dirname(opf_name)
        hrefs = {i.get("id"): posixpath.normpath(posixpath.join(base, unquote(i.get("href", "").split("#")[0])))
                 for i in opf.findall(".//{*}item")}
        spine = [hrefs.get(r.get("idref")) for r in opf.findall(".//{*}itemref")]
        found = [n for n in spine if n in names]
        if found:
            return found
    except (KeyError, AttributeError, ET.ParseError, zipfile.BadZipFile, OSError, RuntimeError, _OverCap) as e:
        why = str(e) if isinstance(e, _OverCap) else type(e).__name__
        report.problems.append(f"no usable OPF spine ({why}); reading HTML members in name order")
    return sorted(n for n in names if n.lower().endswith((".xhtml", ".html", ".htm")))


def _epub_member(zf: zipfile.ZipFile, name: str, report: FileReport, budget: _Budget) -> bytes | None:
    """One document's bytes, or None (the reason in the report) when it is declared or found over the
    member cap or cannot be read. Over the EPUB's total budget raises _OverCap: the rest is not read."""
    size = zf.getinfo(name).file_size
    if size > MAX_EPUB_MEMBER:
        report.problems.append(f"{name}: {size:,} bytes uncompressed, over the {MAX_EPUB_MEMBER:,} cap; skipped")
        return None
    left = budget.left
    try:
        return _read_member(zf, name, MAX_EPUB_MEMBER, budget)
    except _OverCap as e:
        if budget.left < 0:
            raise
        report.problems.append(f"{name}: {e}; skipped")
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, ValueError) as e:
        report.problems.append(f"{name}: unreadable member ({e}); skipped")
    budget.left = left - min(left, MAX_EPUB_MEMBER)  # what was inflated and thrown away still counts
    return None


_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*encoding=["']([A-Za-z0-9._-]+)["']""")


def _xml_encoding(data: bytes) -> str:
    for bom, codec in tx.BOMS:
        if data.startswith(bom):
            return codec + ("-sig" if codec == "utf-8" else "")
    m = _XML_ENCODING.match(data[:200])
    try:
        return tx.codec_name(m.group(1).decode()) if m else "utf-8"
    except LookupError:
        return "utf-8"


class _HtmlText(HTMLParser):
    BLOCK = {"p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "blockquote",
             "pre", "hr", "dd", "dt", "ul", "ol", "table"}
    SKIP = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.flushed = ""  # the end of the text already taken by flush(), for _line_break
        self.skip = 0

    def flush(self) -> str:
        text = "".join(self.parts)
        self.flushed = (self.flushed + text)[-2:]
        self.parts = []
        return text

    def _line_break(self, tag: str) -> None:
        if tag == "br":
            self.parts.append("\n")
        elif tag in self.BLOCK and (self.flushed + "".join(self.parts[-2:])).rstrip(" ")[-1:] not in ("\n", ""):
            self.parts.append("\n")  # one break between blocks, however many tags close and open

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skip += 1
        self._line_break(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self._line_break(tag)  # <br/> is one break, not a start and an end

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        self._line_break(tag)

    def handle_data(self, data: str) -> None:
        if not self.skip:  # HTML white space collapses; U+3000 is not HTML white space and stays
            self.parts.append(re.sub(r"[ \t\r\n\f]+", " ", data))


def html_text(markup: str) -> str:
    """The text of an (X)HTML document, a line per block element."""
    return "".join(html_text_stream(markup))


def html_text_stream(markup: str) -> Iterator[str]:
    """html_text in pieces, HTML_CHUNK characters of markup at a time: a document of many tiny
    paragraphs otherwise holds millions of small strings at once (gigabytes for a 64 MB member)."""
    parser = _HtmlText()
    for start in range(0, len(markup), HTML_CHUNK):
        parser.feed(markup[start:start + HTML_CHUNK])
        if text := parser.flush():
            yield text
    parser.close()
    if text := parser.flush():
        yield text

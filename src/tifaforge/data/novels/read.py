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

SUFFIXES = (".txt", ".epub")
READ_BLOCK = 4 << 20  # bytes read at a time from a .txt file
MAX_EPUB_MEMBER = 64 << 20  # uncompressed bytes; larger members are skipped (zip bombs)
MAX_LISTED = 20  # offsets listed per problem in stats.json (the count is always complete)


def find_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Every .txt/.epub file named or under a named folder, in order, each once."""
    files: dict[Path, None] = {}
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            if not found:
                raise TifaError(f"{path}: no .txt or .epub files in this folder")
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise TifaError(f"{path}: not a .txt or .epub file")
            found = [path]
        else:
            raise TifaError(f"{path}: no such file or folder")
        files.update(dict.fromkeys(p.resolve() for p in found))
    if not files:
        raise TifaError("no input files given")
    return list(files)


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
        raise TifaError(f"{path}: cannot read: {e.strerror or e}") from None


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


def _epub_texts(path: Path, report: FileReport) -> Iterator[str]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise TifaError(f"{path}: cannot read as EPUB: {e}") from None
    report.decided_by = "EPUB: XML declaration or BOM of each document"
    with zf:
        members = _spine(zf, report)
        if not members:
            raise SkipFile("no XHTML documents in the EPUB")
        for name in members:
            data = _epub_member(zf, name, report)
            if data is not None:
                report.encoding = _xml_encoding(data)
                text, bad = tx.decode(data, report.encoding)
                report.add_bad(bad, 0, name)
                yield html_text(text) + "\n"


def _spine(zf: zipfile.ZipFile, report: FileReport) -> list[str]:
    """Member names of the reading order; without a usable OPF, every (X)HTML member by name."""
    import xml.etree.ElementTree as ET

    names = set(zf.namelist())
    try:
        container = ET.fromstring(zf.read("META-INF/container.xml"))
        opf_name = container.find(".//{*}rootfile").attrib["full-path"]
        opf = ET.fromstring(zf.read(opf_name))
        base = posixpath.dirname(opf_name)
        hrefs = {i.get("id"): posixpath.normpath(posixpath.join(base, unquote(i.get("href", "").split("#")[0])))
                 for i in opf.findall(".//{*}item")}
        spine = [hrefs.get(r.get("idref")) for r in opf.findall(".//{*}itemref")]
        found = [n for n in spine if n in names]
        if found:
            return found
    except (KeyError, AttributeError, ET.ParseError) as e:
        report.problems.append(f"no usable OPF spine ({type(e).__name__}); reading HTML members in name order")
    return sorted(n for n in names if n.lower().endswith((".xhtml", ".html", ".htm")))


def _epub_member(zf: zipfile.ZipFile, name: str, report: FileReport) -> bytes | None:
    size = zf.getinfo(name).file_size
    if size > MAX_EPUB_MEMBER:
        report.problems.append(f"{name}: {size} bytes uncompressed, over the {MAX_EPUB_MEMBER} cap; skipped")
        return None
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, OSError, RuntimeError) as e:
        report.problems.append(f"{name}: unreadable member ({e}); skipped")
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
        self.skip = 0

    def _line_break(self, tag: str) -> None:
        if tag == "br":
            self.parts.append("\n")
        elif tag in self.BLOCK and "".join(self.parts[-2:]).rstrip(" ")[-1:] not in ("\n", ""):
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
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts)

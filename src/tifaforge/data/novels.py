"""Novel corpora -> packed token blocks for continued pretraining (stage 1, CPT).

    tifa data novels books/ extra.epub --out data/cpt --tokenizer models/tiny --block-size 2048

Reads `.txt` and `.epub` files (folders recursively), one file at a time in blocks of a few MB:
decode (text.py: BOM / UTF-8 / statistical detection; GB family as GB18030) -> normalise -> split
into chapters -> optional Traditional->Simplified -> strip boilerplate -> drop exact and near
duplicate chapters (across all files, first occurrence kept) -> tokenise -> pack into blocks of
`block_size` tokens -> Arrow shards that `datasets.load_from_disk(out)` opens, plus `stats.json`.

A file is one document: its kept chapters in order, then the tokenizer's end-of-text token
(`<|endoftext|>` if it is a single token, else the EOS token). Blocks are consecutive slices of
that stream, so a document may continue into the next block but never runs into the next document
without the separator; the tail shorter than a block is dropped and counted. Special-token strings
that occur in the text itself (a fake `<|endoftext|>`) are removed and counted.

Near duplicates, and how they depart from textbook MinHash: signatures are one-permutation MinHash
(Li, Owen & Zhang 2012: every 5-gram of letters and digits hashed once, punctuation and spaces
skipped, the minimum kept per bin) with rotation densification for the bins a short chapter leaves
empty (Shrivastava & Li 2014), computed in O(length) instead of O(length x permutations) (numpy, or the
C kernel); an LSH index with datasketch's band split finds candidates, and a candidate counts only if its
estimated Jaccard similarity reaches the threshold. Chapters under 50 characters are checked for exact
copies only.

Memory: flat in the corpus size except for the duplicate index, which keeps about 3 KB per kept
chapter (3 GB per million chapters, that is per ~10 GB of text; with `dedup_threshold` 1.0 only the
exact-copy digests stay, ~150 bytes each); `--dedup-on-disk` keeps it in an SQLite file instead, and
memory stays flat whatever the corpus size. Of a file, a block of a few MB is held at a time.

Speed: the main process reads, decodes, normalises and splits into chapters; batches of raw chapters
go to `workers` processes (default: one per core; with 1, a thread), which clean them (and convert to
Simplified), compute their duplicate-index keys (digest, MinHash signature) and tokenise them. Results
are taken in order and the main process decides, chapter by chapter in reading order, what is a copy
and what is kept, so the output is the same for any number of workers (a copy was tokenised for nothing:
about 15% more tokenising on the bench corpus, which is full of copies). Tokenising was the bound (the
Rust tokenizer spends ~1 us per pre-token on offsets and other bookkeeping that packing never reads).
Each process encodes with the C kernel (`_bpe.c`, built at install; NativeEncoder): the tokenizer's split pattern and
HF's BPE merge loop in C behind a word cache, each character's class checked against the Rust
pre-tokenizer the first time it is met, ids identical to the tokenizer's. Without a C compiler at install,
a Python word cache (WordCacheEncoder) in front of the Rust BPE does the same job at about a third of the
speed. The kernel also computes the MinHash signatures. A script that calls `ingest_novels` with
workers > 1 needs the usual `if __name__ == "__main__":` guard, as any code that starts processes (they
are started from a fork server, never by forking a process that runs threads). bench/ingest.py prints
the phases, the Rust tokenizer alone and the ingest's encoder alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import time
import unicodedata
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache, partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from tifaforge.config import opt
from tifaforge.data import text as tx
from tifaforge.errors import TifaError
from tifaforge.utils import atomic_write_json

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".epub")
READ_BLOCK = 4 << 20  # bytes read at a time from a .txt file
MAX_EPUB_MEMBER = 64 << 20  # uncompressed bytes; larger members are skipped (zip bombs)
MIN_NEAR_DUP_CHARS = 50
MAX_LISTED = 20  # offsets listed per problem in stats.json (the count is always complete)
SHARD_BYTES = 500 << 20  # Arrow shard size, as Dataset.save_to_disk's default


@dataclass
class NovelsOptions:
    """`tifa data novels` settings: the one source of their defaults and help."""

    block_size: int = opt(2048, "Tokens per training block (documents are packed across blocks).", min=2)
    encoding: str | None = opt(None, "Decode every input with this encoding instead of detecting it (e.g. gbk, big5); "
                               "the GB family always decodes as GB18030.")
    dedup_threshold: float = opt(0.8, "Drop a chapter whose estimated Jaccard similarity (character 5-grams) to an "
                                 "earlier chapter reaches this; 1.0 drops exact copies only.", min=0.01, max=1.0)
    t2s: bool = opt(False, "Convert Traditional to Simplified Chinese (OpenCC t2s) before cleaning and dedup.")
    num_perm: int = opt(128, "MinHash signature length (more: finer similarity, more memory).", min=8)
    shingle_chars: int = opt(5, "Characters per shingle for near-duplicate detection.", min=1)
    dedup_on_disk: bool = opt(False, "Keep the duplicate index in an SQLite file beside the output instead of in "
                              "memory (~4 KB per kept chapter): memory stays flat for any corpus size, slower.")


DEFAULTS = NovelsOptions()


def novels_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `tifa data novels` (help and defaults from NovelsOptions)."""
    helps = {f.name: f.metadata["help"] for f in fields(NovelsOptions)}
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt/.epub files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--tokenizer", required=True, help="a model or tokenizer folder, or the preset name 'tiny'")
    p.add_argument("--block-size", type=int, default=DEFAULTS.block_size, help=helps["block_size"])
    p.add_argument("--encoding", default=None, help=helps["encoding"])
    p.add_argument("--dedup-threshold", type=float, default=DEFAULTS.dedup_threshold, help=helps["dedup_threshold"])
    p.add_argument("--t2s", action="store_true", help=helps["t2s"])
    p.add_argument("--dedup-on-disk", action="store_true", help=helps["dedup_on_disk"])
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizer processes (default: one per core; 1: none, tokenise on a thread); the output "
                        "is the same for any N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def novels_command(args: Any) -> int:
    """`tifa data novels`: ingest, then print a summary (the full report is OUT/stats.json)."""
    stats = ingest_novels(
        args.inputs, args.out, args.tokenizer, block_size=args.block_size, encoding=args.encoding,
        near_dup_threshold=args.dedup_threshold, to_simplified=args.t2s,
        progress=not getattr(args, "no_progress", False), workers=getattr(args, "workers", None),
        dedup_on_disk=getattr(args, "dedup_on_disk", False),
    )
    print("\n".join(summary_lines(stats, args.out)))
    return 0


# ---------------------------------------------------------------------------------------------
# The pipeline


def ingest_novels(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    tokenizer: Any,
    *,
    block_size: int = DEFAULTS.block_size,
    encoding: str | None = DEFAULTS.encoding,
    near_dup_threshold: float = DEFAULTS.dedup_threshold,
    to_simplified: bool = DEFAULTS.t2s,
    num_perm: int = DEFAULTS.num_perm,
    shingle_chars: int = DEFAULTS.shingle_chars,
    shard_blocks: int | None = None,
    progress: bool = True,
    workers: int | None = None,
    dedup_on_disk: bool = DEFAULTS.dedup_on_disk,
) -> dict:
    """Turn novel files into a packed `input_ids` dataset at `out_dir`; returns the stats it writes.

    `tokenizer` is a folder (or the preset name "tiny") or a loaded transformers tokenizer.
    `shard_blocks` caps the blocks per Arrow shard (default: about 500 MB per shard). `workers`: tokenizer
    processes (default: one per core); the output does not depend on it.
    """
    _check_options(block_size, near_dup_threshold, encoding)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise TifaError(f"--workers {workers}: must be at least 1")
    files = find_inputs(inputs)
    out_dir = _check_out_dir(Path(out_dir))
    tok = resolve_tokenizer(tokenizer)
    eot = end_of_text(tok)
    index_dir = out_dir.with_name(f".{out_dir.name}.dedup") if dedup_on_disk else None  # a scratch folder
    run = _Run(files, _tokenizer_name(tokenizer, tok), to_simplified, encoding,
               Deduper(near_dup_threshold, num_perm, shingle_chars, on_disk=index_dir))
    tmp = out_dir.with_name(f".{out_dir.name}.partial")  # renamed to out_dir once complete
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shard_blocks = shard_blocks or max(1, SHARD_BYTES // (4 * block_size))
        stats = _build(tmp, run, tok, eot, block_size, shard_blocks, progress, workers)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        run.dedup.close()
        if index_dir is not None:
            shutil.rmtree(index_dir, ignore_errors=True)
    return stats


@dataclass
class _Run:
    """What one ingest run carries from file to file."""

    files: list[Path]
    tokenizer: str
    simplify: bool
    encoding: str | None
    dedup: Deduper
    timers: Timers = field(default_factory=lambda: Timers())
    reports: list[FileReport] = field(default_factory=list)
    removed: Counter = field(default_factory=Counter)
    chapters: Counter = field(default_factory=Counter)


def _build(tmp: Path, run: _Run, tok, eot: tuple[str, int], block_size: int, shard_blocks: int,
           progress: bool, workers: int = 1) -> dict:
    """Shards, the dataset's state files and stats.json, all in `tmp`."""
    start = time.perf_counter()
    writer = ShardWriter(tmp, block_size, shard_blocks)
    prep = Prep(run.simplify, run.dedup.near, run.dedup.num_perm, run.dedup.k)
    with Packer(tok, eot[1], block_size, writer, run.timers, workers, prep, decide=partial(_decide, run)) as packer:
        _ingest_files(run, packer, progress)
    if packer.blocks == 0:
        raise TifaError(f"{packer.tokens} tokens in all: fewer than one block of {block_size}; nothing written")
    stats = _stats(run, packer, writer.finish(), eot, writer.fingerprint())
    stats["seconds"] = run.timers.as_dict(total=time.perf_counter() - start)
    atomic_write_json(tmp / "stats.json", stats)
    return stats


def _ingest_files(run: _Run, packer: Packer, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in run.files)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="novels", disable=not progress,
              smoothing=0.05) as bar:
        for index, path in enumerate(run.files):
            report = FileReport(str(path), path.stat().st_size)
            run.reports.append(report)
            done = bar.n
            _ingest_file(index, path, report, run, packer, bar.update)
            bar.update(done + report.bytes - bar.n)  # skipped files and EPUBs advance here
            for line in report.warnings():
                log.warning(line)


def _ingest_file(index: int, path: Path, report: FileReport, run: _Run, packer: Packer, advance) -> None:
    """All chapters of one file to the packer (clean, dedup keys and tokens off the main thread, the
    verdicts in order in _decide); the file is one document."""
    chapters = run.timers.timed_iter("decode_clean", file_chapters(path, run.encoding, report, advance))
    try:
        for chapter in chapters:
            report.chapters += 1
            packer.add(chapter, index)
    except SkipFile as e:
        report.skipped = str(e)
    packer.end_document(index)


def _decide(run: _Run, index: int, chapter: Chapter) -> bool:
    """A prepared chapter of file `index`, in reading order: counted, and kept unless empty or a copy."""
    run.removed.update(chapter.removed)
    if not chapter.length:
        run.chapters["empty_after_cleaning"] += 1
        return False
    with run.timers("dedup"):
        sig = None if chapter.signature is None else np.frombuffer(chapter.signature, np.uint32)
        verdict = run.dedup.check_keys(chapter.digest, sig, index)
    report = run.reports[index]
    if verdict:
        kind, other = verdict
        run.chapters[f"{kind}_duplicates"] += 1
        report.duplicate_of[other] += 1
        return False
    report.chapters_kept += 1
    report.characters += chapter.length
    return True


# ---------------------------------------------------------------------------------------------
# Inputs


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


def _check_options(block_size: int, threshold: float, encoding: str | None) -> None:
    if block_size < 2:
        raise TifaError(f"--block-size {block_size}: must be at least 2")
    if not 0 < threshold <= 1:
        raise TifaError(f"--dedup-threshold {threshold}: must be in (0, 1]; 1.0 drops exact copies only")
    if encoding:
        try:
            tx.codec_name(encoding)
        except LookupError:
            raise TifaError(f"--encoding {encoding}: unknown encoding (try utf-8, gb18030, big5, utf-16)") from None


def _check_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TifaError(f"{out_dir}: already exists and is not an empty folder; remove it or choose another --out")
    return out_dir


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


# ---------------------------------------------------------------------------------------------
# Duplicates


class Deduper:
    """Exact (BLAKE2b of the text) and near (one-permutation MinHash + LSH) duplicate chapters.

    The LSH bands are datasketch's optimum for the threshold (`_optimal_param`, as its MinHashLSH picks
    them). In memory the band tables are plain dicts, band bytes -> chapter keys, as in MinHashLSH but
    without a MinHash object per chapter (that and its byte-swapping cost more than the signature itself);
    about 3 KB per kept chapter. With `on_disk` (a folder), the same bands in an SQLite file there
    instead: the same candidates and verdicts, with memory flat whatever the corpus size (SQLite's page
    cache is capped) at some cost in speed."""

    def __init__(self, threshold: float, num_perm: int = 128, shingle_chars: int = 5,
                 on_disk: str | Path | None = None) -> None:
        self.threshold, self.num_perm, self.k = threshold, num_perm, shingle_chars
        self.exact: dict[bytes, int] = {}  # digest -> file index of the copy kept
        self.owner: list[int] = []  # LSH key -> file index
        self.signatures: list[bytes] = []  # LSH key -> signature bytes
        self.bands: list[dict[bytes, list[int]]] | None = None
        self.disk = None
        if on_disk is not None:
            self.disk = _DiskIndex(Path(on_disk), threshold, num_perm, shingle_chars)
        elif threshold < 1.0:
            bands, self.rows = lsh_bands(threshold, num_perm)
            self.bands = [{} for _ in range(bands)]

    @property
    def near(self) -> bool:
        """Whether near copies are looked for (else exact copies only)."""
        return self.threshold < 1.0

    def check(self, text: str, owner: int) -> tuple[str, int] | None:
        """("exact" | "near", file index of the earlier copy) or None (then the text is recorded)."""
        return self.check_keys(*chapter_keys(text, self.near, self.num_perm, self.k), owner)

    def check_keys(self, digest: bytes, sig: np.ndarray | None, owner: int) -> tuple[str, int] | None:
        """`check` from a text's `chapter_keys` (computed elsewhere, e.g. in a worker process)."""
        if self.disk is not None:
            return self.disk.check(digest, sig, owner)
        if digest in self.exact:
            return "exact", self.exact[digest]
        near = self._near(sig, owner) if self.bands is not None and sig is not None else None
        self.exact[digest] = owner if near is None else near
        return None if near is None else ("near", near)

    def _near(self, sig: np.ndarray, owner: int) -> int | None:
        """File index of a near copy already indexed; if none, index this signature and return None."""
        raw, width = sig.tobytes(), 4 * self.rows
        keys = [raw[i * width:(i + 1) * width] for i in range(len(self.bands))]
        found = set()
        for table, key in zip(self.bands, keys):
            found.update(table.get(key, ()))
        for candidate in sorted(found):  # LSH candidates, earliest first, confirmed by similarity
            if np.count_nonzero(np.frombuffer(self.signatures[candidate], np.uint32) == sig) / len(sig) >= self.threshold:
                return self.owner[candidate]
        new = len(self.owner)
        for table, key in zip(self.bands, keys):
            table.setdefault(key, []).append(new)
        self.owner.append(owner)
        self.signatures.append(raw)
        return None

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


def chapter_keys(text: str, near: bool, num_perm: int = 128, k: int = 5) -> tuple[bytes, np.ndarray | None]:
    """What the duplicate index needs of a chapter: its BLAKE2b digest, and its MinHash signature if
    near copies are looked for and it is long enough (else None: exact copies only)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    return digest, signature(text, num_perm, k) if near and len(text) >= MIN_NEAR_DUP_CHARS else None


@lru_cache(maxsize=8)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) with b * r <= num_perm minimising the false positive plus false negative
    probability (equal weights): datasketch's `_optimal_param`, which MinHashLSH uses, computed with
    Gauss-Legendre quadrature instead of scipy's `quad`. The integrands are polynomials of degree at most
    num_perm, so num_perm // 2 + 1 nodes integrate them exactly, and importing scipy (half a second, on
    every ingest) is avoided. Tested equal to datasketch's choice."""
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=float)
    b, r = pairs[:, :1], pairs[:, 1:]  # (n_pairs, 1)

    def integral(lo: float, hi: float, f) -> np.ndarray:
        s = (hi - lo) / 2 * nodes + (hi + lo) / 2  # the nodes mapped onto [lo, hi]
        return f(s[None, :]) @ weights * (hi - lo) / 2

    candidate = lambda s: 1 - (1 - s**r) ** b  # noqa: E731  P(a pair of similarity s shares a band)
    error = (integral(0.0, threshold, candidate) + integral(threshold, 1.0, lambda s: 1 - candidate(s))) / 2
    best = int(np.argmin(error))  # the first of equal errors, as datasketch's loop keeps it
    return int(pairs[best, 0]), int(pairs[best, 1])


class _DiskIndex:
    """The duplicate index in SQLite: exact digests, and MinHash signatures with their LSH band keys
    (the band split of `lsh_bands`, so candidates are the in-memory index's)."""

    COMMIT_EVERY = 2000

    def __init__(self, folder: Path, threshold: float, num_perm: int, shingle_chars: int) -> None:
        import sqlite3

        folder.mkdir(parents=True, exist_ok=True)
        self.threshold, self.num_perm, self.k = threshold, num_perm, shingle_chars
        self.path = folder / "dedup.sqlite"
        self.path.unlink(missing_ok=True)
        self.bands, self.rows = lsh_bands(threshold, num_perm) if threshold < 1.0 else (0, 0)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16384", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")  # a scratch file: rebuilt on a rerun, never read after it
        self.db.execute("CREATE TABLE exact (digest BLOB PRIMARY KEY, owner INTEGER) WITHOUT ROWID")
        self.db.execute("CREATE TABLE sig (key INTEGER PRIMARY KEY, owner INTEGER, sig BLOB)")
        self.db.execute("CREATE TABLE band (h INTEGER, key INTEGER, PRIMARY KEY (h, key)) WITHOUT ROWID")  # one B-tree
        self.db.execute("BEGIN")
        self.pending = self.keys = 0

    def check(self, digest: bytes, sig: np.ndarray | None, owner: int) -> tuple[str, int] | None:
        row = self.db.execute("SELECT owner FROM exact WHERE digest = ?", (digest,)).fetchone()
        if row is not None:
            return "exact", row[0]
        near = self._near(sig, owner) if self.bands and sig is not None else None
        self.db.execute("INSERT INTO exact VALUES (?, ?)", (digest, owner if near is None else near))
        self._written()
        return None if near is None else ("near", near)

    def _near(self, sig: np.ndarray, owner: int) -> int | None:
        keys = [int.from_bytes(hashlib.blake2b(i.to_bytes(4, "little") + sig[i * self.rows:(i + 1) * self.rows].tobytes(),
                                               digest_size=8).digest(), "little", signed=True)
                for i in range(self.bands)]
        marks = ",".join("?" * len(keys))
        found = self.db.execute(f"SELECT DISTINCT s.key, s.owner, s.sig FROM band b JOIN sig s ON s.key = b.key "
                                f"WHERE b.h IN ({marks}) ORDER BY s.key", keys).fetchall()
        for _, earlier, stored in found:  # candidates, earliest first, confirmed by the estimated similarity
            if np.count_nonzero(np.frombuffer(stored, np.uint32) == sig) / len(sig) >= self.threshold:
                return earlier
        key = self.keys
        self.keys += 1
        self.db.execute("INSERT INTO sig VALUES (?, ?, ?)", (key, owner, sig.tobytes()))
        self.db.executemany("INSERT OR IGNORE INTO band VALUES (?, ?)", [(h, key) for h in keys])
        return None

    def _written(self) -> None:
        self.pending += 1
        if self.pending >= self.COMMIT_EVERY:
            self.db.execute("COMMIT")
            self.db.execute("BEGIN")
            self.pending = 0

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)


_M1, _M2, _S = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33)
_EMPTY = np.uint64(1 << 32)


def _mix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: every output bit depends on every input bit."""
    h = h ^ (h >> _S)
    h = h * _M1
    h = h ^ (h >> _S)
    h = h * _M2
    return h ^ (h >> _S)


@lru_cache(maxsize=1)
def _is_word_char() -> np.ndarray:
    """(0x110000,) bool: letters and digits of every script, built once (~0.2 s)."""
    return np.array([chr(c).isalnum() for c in range(0x110000)], dtype=bool)


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """64-bit hashes of every run of k letters or digits; punctuation and spaces are skipped, so
    「」 for “” or a line break moved does not hide a copy."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    chars = codes[_is_word_char()[codes]].astype(np.uint64)  # (n,)
    n = max(1, len(chars) - k + 1)
    h = chars[:n].copy()
    for j in range(1, min(k, len(chars))):  # polynomial hash, wrapping mod 2^64
        h = h * np.uint64(1_000_003) + chars[j:j + n]
    return _mix64(h)


def signature(text: str, num_perm: int = 128, k: int = 5) -> np.ndarray:
    """One-permutation MinHash: bin = hash mod num_perm, keep each bin's smallest high 32 bits.
    The C kernel computes the same in one pass when it was built (signature_numpy is the definition)."""
    bpe = _native()
    if bpe is None:
        return signature_numpy(text, num_perm, k)
    out = np.empty(num_perm, np.uint32)
    bpe.signature(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), _is_word_char().view(np.uint8), k, out)
    return out


def signature_numpy(text: str, num_perm: int = 128, k: int = 5) -> np.ndarray:
    h = shingle_hashes(text, k)
    if not len(h):
        return np.zeros(num_perm, dtype=np.uint32)
    sig = np.full(num_perm, _EMPTY, dtype=np.uint64)
    np.minimum.at(sig, (h % np.uint64(num_perm)).astype(np.intp), h >> np.uint64(32))
    empty = np.flatnonzero(sig == _EMPTY)
    if len(empty):  # rotation densification: borrow the next filled bin's value, salted by distance
        filled = np.flatnonzero(sig != _EMPTY)
        source = filled[np.searchsorted(filled, empty) % len(filled)]
        distance = (source - empty) % num_perm
        sig[empty] = _mix64(sig[source] + distance.astype(np.uint64) * _EMPTY) >> np.uint64(32)
    return sig.astype(np.uint32)


# ---------------------------------------------------------------------------------------------
# Tokenise, pack, write


def resolve_tokenizer(tokenizer: Any):
    """A loaded tokenizer, a folder (model or tokenizer), or the preset name 'tiny'."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    path = Path(tokenizer)
    if not path.exists():
        from tifaforge.models import presets

        if str(tokenizer) in presets.PRESETS:
            return presets.build_tokenizer()
        raise TifaError(f"{path}: no such tokenizer folder (or preset name: {', '.join(presets.PRESETS)})")
    from tifaforge.models.load import load_tokenizer

    return load_tokenizer(path)


def _tokenizer_name(given: Any, tok) -> str:
    return str(given) if isinstance(given, (str, Path)) else getattr(tok, "name_or_path", "") or type(tok).__name__


def end_of_text(tok) -> tuple[str, int]:
    """The document separator: `<|endoftext|>` if it is one token of this tokenizer, else EOS."""
    tid = tok.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tok.unk_token_id and tok.convert_ids_to_tokens(tid) == "<|endoftext|>":
        return "<|endoftext|>", tid
    if tok.eos_token_id is not None:
        return tok.eos_token, tok.eos_token_id
    raise TifaError("the tokenizer has neither <|endoftext|> nor an EOS token to separate documents")


def _special_pattern(tok) -> re.Pattern | None:
    specials = set(getattr(tok, "all_special_tokens", []))
    specials |= {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    specials.discard("")
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None


@dataclass(frozen=True)
class Prep:
    """What preparing a chapter needs besides the tokenizer (sent to the worker processes)."""

    simplify: bool = False  # Traditional -> Simplified first
    near: bool = False  # MinHash signatures for the near-copy index
    num_perm: int = 128
    k: int = 5
    specials: str | None = None  # a pattern of special-token strings, removed before tokenising


@dataclass
class Chapter:
    """A chapter as a worker prepared it: what cleaning removed, its length after cleaning (0: empty),
    its duplicate-index keys, and how many special-token strings were cut before tokenising."""

    removed: Counter
    length: int
    digest: bytes | None = None
    signature: bytes | None = None
    specials: int = 0


def prepare(encoder: TextEncoder, texts: list[str | None], prep: Prep) -> tuple[list[Chapter | None], np.ndarray,
                                                                               np.ndarray, Counter]:
    """A batch of raw chapters (None: a document's end) -> per item a Chapter (None for an end), the
    token ids of the non-empty chapters back to back with each one's count, and seconds per phase:
    clean (decode_clean), digest and signature (dedup), tokenise. Runs in a worker process or thread."""
    seconds: Counter = Counter()
    specials = re.compile(prep.specials) if prep.specials else None
    out: list[Chapter | None] = []
    to_encode: list[str] = []
    for text in texts:
        if text is None:
            out.append(None)
            continue
        start = time.perf_counter()
        text, removed = tx.clean_chapter(text, prep.simplify)
        mid = time.perf_counter()
        seconds["decode_clean"] += mid - start
        if not text.strip():
            out.append(Chapter(removed, 0))
            continue
        digest, sig = chapter_keys(text, prep.near, prep.num_perm, prep.k)
        seconds["dedup"] += time.perf_counter() - mid
        chapter = Chapter(removed, len(text), digest, None if sig is None else sig.tobytes())
        if specials is not None and specials.search(text):
            text, chapter.specials = specials.subn("", text)
        out.append(chapter)
        to_encode.append(text)
    start = time.perf_counter()
    encoded = encoder.encode(to_encode)
    counts = np.array([len(ids) for ids in encoded], dtype=np.int64)
    ids = np.concatenate(encoded) if encoded else np.zeros(0, np.int32)
    seconds["tokenise"] += time.perf_counter() - start
    return out, ids, counts, seconds


class Packer:
    """Raw chapters -> prepared (cleaned, duplicate keys, token ids) off the main thread -> kept ones in
    order (`decide`) -> token stream (EOT after each document with a kept chapter) -> blocks of
    `block_size`, written in order.

    Batches of about a million characters are prepared with `workers` > 1 in that many processes (each
    with its own tokenizer and word cache), else on one thread. The first batch is prepared on the
    thread, so a small input starts no process. Results are taken in the order the batches were sent
    and `decide` sees the chapters in reading order, so the output does not depend on `workers`; at
    most `workers` + 1 batches wait, so memory stays bounded. A chapter found to be a copy was
    tokenised for nothing (the price of deciding after the work is spread out).
    """

    BATCH_CHARS = 1 << 20
    WRITE_TOKENS = 1 << 20

    def __init__(self, tok, eot_id: int, block_size: int, writer: ShardWriter, timers: Timers,
                 workers: int = 1, prep: Prep | None = None,
                 decide: Callable[[int, Chapter], bool] = lambda index, chapter: True) -> None:
        self.tok, self.block_size, self.writer, self.timers = tok, block_size, writer, timers
        specials = _special_pattern(tok)
        self.prep = replace(prep or Prep(), specials=specials.pattern if specials is not None else None)
        self.decide = decide
        self.encoder = TextEncoder(tok)
        self.workers = workers if self.encoder.backend is not None else 1
        self.items: list[str | None] = []  # None marks the end of a document
        self.owners: list[int] = []  # the file index of each item
        self.chars = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self.processes: Executor | None = None
        self.in_flight: deque[tuple[Future, list[int]]] = deque()
        self.buffer: list[np.ndarray] = []
        self.buffered = self.tokens = self.blocks = self.dropped_tail = self.special_strings = 0
        self.batches = 0
        self.document_kept = False
        self.eot = np.array([eot_id], dtype=np.int32)

    def add(self, text: str, owner: int = 0) -> None:
        self.items.append(text)
        self.owners.append(owner)
        self.chars += len(text)
        if self.chars >= self.BATCH_CHARS:
            self._submit()

    def end_document(self, owner: int = 0) -> None:
        self.items.append(None)
        self.owners.append(owner)

    def __enter__(self) -> Packer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._submit()
                while self.in_flight:
                    self._take()
                self._write(final=True)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            if self.processes is not None:
                self.processes.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> None:
        if self.items:
            if self.workers > 1 and self.batches >= 1 and self.processes is None:
                self.processes = _process_pool(self.workers, self.encoder.backend.to_str())
            if self.processes is not None:
                future = self.processes.submit(_prepare_in_worker, self.items, self.prep)
            else:
                future = self.pool.submit(prepare, self.encoder, self.items, self.prep)
            self.in_flight.append((future, self.owners))
            self.items, self.owners, self.chars = [], [], 0
            self.batches += 1
        while len(self.in_flight) > self.workers + 1:
            self._take()

    def _take(self) -> None:
        future, owners = self.in_flight.popleft()
        chapters, ids, counts, seconds = future.result()
        self.timers.seconds.update(seconds)
        ends = np.cumsum(counts)
        at = 0  # the next non-empty chapter's place in ids
        for owner, chapter in zip(owners, chapters):
            if chapter is None:  # a document's end
                if self.document_kept:
                    self._pack(self.eot)
                self.document_kept = False
                continue
            keep = self.decide(owner, chapter)
            if chapter.length:
                if keep:
                    self._pack(ids[ends[at] - counts[at]:ends[at]])
                    self.special_strings += chapter.specials
                    self.document_kept = True
                at += 1

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [ids.tolist() for ids in self.encoder.encode(texts)]

    def _pack(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.tokens += len(ids)
        if self.buffered >= max(self.WRITE_TOKENS, self.block_size):
            self._write()

    def _write(self, final: bool = False) -> None:
        with self.timers("pack_write"):
            flat = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.int32)
            n = len(flat) // self.block_size
            if n:
                self.writer.write(flat[: n * self.block_size].reshape(n, self.block_size))  # (n, block_size)
                self.blocks += n
            rest = flat[n * self.block_size:]
            self.buffer, self.buffered = [rest], len(rest)
            if final:
                self.dropped_tail = len(rest)


class TextEncoder:
    """Texts -> int32 token ids: the C kernel (NativeEncoder) or else the Python word cache where they
    reproduce the tokenizer, else the Rust tokenizer's batch call (or the tokenizer's own call for a
    tokenizer without a Rust backend)."""

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



_WORKER: TextEncoder | None = None


def _process_pool(workers: int, tokenizer_json: str) -> Executor:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")  # no fork of a process that runs threads
    ctx.set_forkserver_preload([__name__, "tokenizers", "regex"])
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=(tokenizer_json,))


def _start_worker(tokenizer_json: str) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    from tokenizers import Tokenizer

    _WORKER = TextEncoder(Tokenizer.from_str(tokenizer_json))


def _prepare_in_worker(items: list[str | None], prep: Prep):
    return prepare(_WORKER, items, prep)


def default_workers() -> int:
    """Tokenizer processes by default: one per usable core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
def _native():
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

        bpe = _native()
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


class ShardWriter:
    """Arrow shards in the layout of `Dataset.save_to_disk`, written as blocks arrive."""

    def __init__(self, folder: Path, block_size: int, shard_blocks: int) -> None:
        from datasets import Features, List, Value

        self.folder, self.block_size, self.shard_blocks = folder, block_size, shard_blocks
        self.features = Features({"input_ids": List(Value("int32"), length=block_size)})
        folder.mkdir(parents=True)
        self.paths: list[Path] = []
        self.writer = None
        self.in_shard = 0
        self.hash = hashlib.blake2b(digest_size=16)

    def write(self, blocks: np.ndarray) -> None:
        import pyarrow as pa

        self.hash.update(blocks.tobytes())
        while len(blocks):
            if self.writer is None:
                self._open()
            take = blocks[: self.shard_blocks - self.in_shard]
            column = pa.FixedSizeListArray.from_arrays(pa.array(take.ravel()), self.block_size)
            self.writer.write_table(pa.table({"input_ids": column}))
            self.in_shard += len(take)
            blocks = blocks[len(take):]
            if self.in_shard == self.shard_blocks:
                self._close()

    def _open(self) -> None:
        from datasets.arrow_writer import ArrowWriter

        self.paths.append(self.folder / f"shard-{len(self.paths):05d}.arrow")
        self.writer = ArrowWriter(features=self.features, path=str(self.paths[-1]))
        self.in_shard = 0

    def _close(self) -> None:
        self.writer.finalize()
        self.writer.close()
        self.writer = None

    def fingerprint(self) -> str:
        return self.hash.hexdigest()

    def finish(self) -> list[str]:
        """Name the shards data-XXXXX-of-NNNNN.arrow and write the dataset's state and info files."""
        from datasets import DatasetInfo

        if self.writer is not None:
            self._close()
        names = [f"data-{i:05d}-of-{len(self.paths):05d}.arrow" for i in range(len(self.paths))]
        for path, name in zip(self.paths, names):
            path.rename(self.folder / name)
        state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": self.fingerprint(),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        (self.folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        DatasetInfo(features=self.features).write_to_directory(str(self.folder))
        return names


# ---------------------------------------------------------------------------------------------
# Timing and the report


class Timers:
    """Busy seconds per phase, summed over the processes. Phases overlap: reading and splitting
    ("decode_clean") and the duplicate index ("dedup") run on the main thread; cleaning ("decode_clean"),
    duplicate keys ("dedup") and "tokenise" in the worker processes or thread (their seconds are added
    as each batch is taken); "pack_write" on the main thread."""

    def __init__(self) -> None:
        self.seconds: Counter = Counter()

    def __call__(self, name: str) -> _Timer:
        return _Timer(self.seconds, name)

    def timed_iter(self, name: str, it: Iterable) -> Iterator:
        it = iter(it)
        while True:
            with self(name):
                item = next(it, _DONE)
            if item is _DONE:
                return
            yield item

    def as_dict(self, total: float) -> dict:
        return {"total": round(total, 3), **{k: round(v, 3) for k, v in sorted(self.seconds.items())}}


_DONE = object()


class _Timer:
    __slots__ = ("seconds", "name", "start")

    def __init__(self, seconds: Counter, name: str) -> None:
        self.seconds, self.name = seconds, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self.name] += time.perf_counter() - self.start


def _stats(run: _Run, packer: Packer, shards: list[str], eot: tuple[str, int], fingerprint: str) -> dict:
    paths = [str(f) for f in run.files]
    reports = run.reports
    return {
        "inputs": len(run.files),
        "files_skipped": sum(r.skipped is not None for r in reports),
        "documents": sum(r.chapters_kept > 0 for r in reports),
        "chapters": {"found": sum(r.chapters for r in reports), "kept": sum(r.chapters_kept for r in reports),
                     "empty_after_cleaning": run.chapters["empty_after_cleaning"],
                     "exact_duplicates": run.chapters["exact_duplicates"],
                     "near_duplicates": run.chapters["near_duplicates"]},
        "bytes": sum(r.bytes for r in reports),
        "characters": sum(r.characters for r in reports),
        "tokens": packer.tokens,
        "blocks": packer.blocks,
        "block_size": packer.block_size,
        "tokens_dropped_tail": packer.dropped_tail,
        "special_token_strings_removed": packer.special_strings,
        "removed_lines": dict(sorted(run.removed.items())),
        "dedup": {"threshold": run.dedup.threshold, "num_perm": run.dedup.num_perm, "shingle_chars": run.dedup.k,
                  "on_disk": run.dedup.disk is not None},
        "t2s": run.simplify,
        "tokenizer": run.tokenizer,
        "separator": {"token": eot[0], "id": eot[1]},
        "encodings": dict(Counter(r.encoding for r in reports if r.encoding and not r.skipped).most_common()),
        "shards": shards,
        "fingerprint": fingerprint,
        "files": [r.as_dict(paths) for r in reports],
    }


def summary_lines(stats: dict, out: str | Path) -> list[str]:
    c = stats["chapters"]
    lines = [
        f"wrote {stats['blocks']} blocks of {stats['block_size']} tokens ({stats['tokens']:,} tokens, "
        f"{stats['tokens_dropped_tail']} in the dropped tail) in {len(stats['shards'])} shard(s) to {out}",
        f"files {stats['inputs']} ({stats['files_skipped']} skipped), documents {stats['documents']}, "
        f"chapters kept {c['kept']} of {c['found']} (exact copies {c['exact_duplicates']}, "
        f"near copies {c['near_duplicates']}, empty after cleaning {c['empty_after_cleaning']})",
        "encodings: " + ", ".join(f"{k} {v}" for k, v in stats["encodings"].items()),
    ]
    if stats["removed_lines"]:
        lines.append("removed: " + ", ".join(f"{k} {v}" for k, v in stats["removed_lines"].items()))
    lines += [f"skipped {f['path']}: {f['skipped']}" for f in stats["files"] if f["skipped"]]
    lines.append(f"details: {Path(out) / 'stats.json'}")
    return lines

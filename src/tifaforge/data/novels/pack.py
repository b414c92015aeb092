"""Raw chapters -> prepared in worker processes -> token blocks -> Arrow shards: the ingest's packing.

    tifa data novels books/ --out data/cpt --tokenizer models/tiny --block-size 2048 --workers 4

A file is one document: its kept chapters in order, then the tokenizer's end-of-text token
(`<|endoftext|>` if it is a single token, else the EOS token). Blocks are consecutive slices of
that stream, so a document may continue into the next block but never runs into the next document
without the separator; the tail shorter than a block is written as one shorter last row (training
pads it and masks the padding out of the loss), or dropped and counted with --drop-tail. Special-token strings
that occur in the text itself (a fake `<|endoftext|>`) are removed and counted.

`--pack chapters` (long-context training) keeps chapters whole instead: a row takes chapters in
reading order while they fit in `block_size`; the chapter that does not fit starts the next row, and
only a chapter longer than a whole block is cut (counted as `chapters_cut`). A document's separator
stays with its last chapter. Rows are then of different lengths, up to `block_size`: stats.json's
`fill` says how much of the rows training pads.

Speed: the main process reads, decodes, normalises and splits into chapters; batches of raw chapters
go to `workers` processes (default: one per core; with 1, a thread), which clean them (and convert to
Simplified), compute their duplicate-index keys (dedup.py) and tokenise them (encode.py). Results
are taken in order and the main process decides, chapter by chapter in reading order, what is a copy
and what is kept, so the output is the same for any number of workers (a copy was tokenised for nothing:
about 15% more tokenising on the bench corpus, which is full of copies). The processes are started from
a fork server, never by forking a process that runs threads. The blocks go to Arrow shards in the
layout of `Dataset.save_to_disk`, so `datasets.load_from_disk(out)` opens them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tifaforge.data import text as tx
from tifaforge.data.novels.dedup import chapter_keys
from tifaforge.data.novels.encode import TextEncoder
from tifaforge.errors import TifaError

SHARD_BYTES = 500 << 20  # Arrow shard size, as Dataset.save_to_disk's default


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
                 decide: Callable[[int, Chapter], bool] = lambda index, chapter: True, keep_tail: bool = True,
                 pack: str = "stream") -> None:
        self.tok, self.block_size, self.writer, self.timers = tok, block_size, writer, timers
        self.pack = pack
        self.row: list[np.ndarray] = []  # chapters mode: the row being filled, and its length
        self.row_tokens = self.chapters_cut = 0
        self.pending: np.ndarray | None = None  # chapters mode: the last kept chapter, until we know if EOT follows
        self.rows_out: list[np.ndarray] = []  # chapters mode: finished rows waiting to be written
        self.rows_out_tokens = 0
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
        self.buffered = self.tokens = self.blocks = self.dropped_tail = self.tail = self.special_strings = 0
        self.keep_tail = keep_tail
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
                    self._pack(ids[ends[at] - counts[at]:ends[at]], chapter=True)
                    self.special_strings += chapter.specials
                    self.document_kept = True
                at += 1

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [ids.tolist() for ids in self.encoder.encode(texts)]

    def _pack(self, ids: np.ndarray, chapter: bool = False) -> None:
        if self.pack == "chapters":
            self._pack_chapter(ids, chapter)
            return
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.tokens += len(ids)
        if self.buffered >= max(self.WRITE_TOKENS, self.block_size):
            self._write()

    def _pack_chapter(self, ids: np.ndarray, chapter: bool) -> None:
        """Chapters mode: a chapter waits in `pending` until the next item says whether the document's
        separator follows it (then they go into a row together)."""
        self.tokens += len(ids)
        if not chapter:  # the separator: joins the chapter it ends
            self.pending = ids if self.pending is None else np.concatenate([self.pending, ids])
            self._place(self.pending)
            self.pending = None
            return
        if self.pending is not None:
            self._place(self.pending)
        self.pending = ids

    def _place(self, ids: np.ndarray) -> None:
        """A whole chapter into the current row, or into a new one when it does not fit; cut only when
        it is longer than a block."""
        b = self.block_size
        if self.row_tokens + len(ids) > b:
            self._close_row()
            if len(ids) > b:
                self.chapters_cut += 1
                whole = len(ids) // b * b
                self.rows_out.extend(ids[:whole].reshape(-1, b))
                self.rows_out_tokens += whole
                self.blocks += whole // b
                ids = ids[whole:]
        if len(ids):
            self.row.append(ids)
            self.row_tokens += len(ids)
            if self.row_tokens == b:
                self._close_row()

    def _close_row(self) -> None:
        if self.row:
            self.rows_out.append(np.concatenate(self.row))
            self.rows_out_tokens += self.row_tokens
            self.blocks += 1
            if self.rows_out_tokens >= self.WRITE_TOKENS:
                self._flush_rows()
        self.row, self.row_tokens = [], 0

    def _flush_rows(self) -> None:
        with self.timers("pack_write"):
            self.writer.write_rows(self.rows_out)
        self.rows_out, self.rows_out_tokens = [], 0

    def _write(self, final: bool = False) -> None:
        if self.pack == "chapters":
            if final:
                if self.pending is not None:
                    self._place(self.pending)
                    self.pending = None
                self._close_row()
                self._flush_rows()
            return
        with self.timers("pack_write"):
            flat = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.int32)
            n = len(flat) // self.block_size
            if n:
                self.writer.write(flat[: n * self.block_size].reshape(n, self.block_size))  # (n, block_size)
                self.blocks += n
            rest = flat[n * self.block_size:]
            self.buffer, self.buffered = [rest], len(rest)
            if final and len(rest):
                if self.keep_tail:
                    self.writer.write_tail(rest)
                    self.tail = len(rest)
                else:
                    self.dropped_tail = len(rest)


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


class ShardWriter:
    """Arrow shards in the layout of `Dataset.save_to_disk`, written as blocks arrive."""

    def __init__(self, folder: Path, block_size: int, shard_blocks: int) -> None:
        from datasets import Features, List, Value

        self.folder, self.block_size, self.shard_blocks = folder, block_size, shard_blocks
        self.features = Features({"input_ids": List(Value("int32"))})  # blocks, then maybe a shorter last one
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
            offsets = pa.array(np.arange(len(take) + 1, dtype=np.int32) * take.shape[1])
            column = pa.ListArray.from_arrays(offsets, pa.array(take.ravel()))
            self.writer.write_table(pa.table({"input_ids": column}))
            self.in_shard += len(take)
            blocks = blocks[len(take):]
            if self.in_shard == self.shard_blocks:
                self._close()

    def write_tail(self, ids: np.ndarray) -> None:
        """The stream's last, shorter block: one row of its own length."""
        self.write(ids.reshape(1, -1))

    def write_rows(self, rows: list[np.ndarray]) -> None:
        """Rows of any lengths up to the block size (`--pack chapters`), in order."""
        import pyarrow as pa

        while rows:
            if self.writer is None:
                self._open()
            take, rows = rows[: self.shard_blocks - self.in_shard], rows[self.shard_blocks - self.in_shard:]
            lengths = np.fromiter((len(r) for r in take), np.int64, len(take))
            flat = np.concatenate(take).astype(np.int32, copy=False)
            self.hash.update(lengths.tobytes())
            self.hash.update(flat.tobytes())
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            self.writer.write_table(pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat))}))
            self.in_shard += len(take)
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
# Timing


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

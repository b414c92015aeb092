"""`tifa data novels`: novel corpora -> packed token blocks for continued pretraining (stage 1, CPT).

    tifa data novels books/ extra.epub --out data/cpt --tokenizer models/tiny --block-size 2048

Reads `.txt` and `.epub` files (folders recursively), one file at a time in blocks of a few MB:
decode (text.py: BOM / UTF-8 / statistical detection; GB family as GB18030) -> normalise -> split
into chapters -> optional Traditional->Simplified -> strip boilerplate -> drop exact and near
duplicate chapters (across all files, first occurrence kept) -> tokenise -> pack into blocks of
`block_size` tokens -> Arrow shards that `datasets.load_from_disk(out)` opens, plus `stats.json`.
This module runs it: the options (NovelsOptions), `ingest_novels` (read.py's chapters through pack.py's
Packer, dedup.py's index deciding what is kept; the output is built under a temporary name and renamed
into place only when complete), stats.json, and the command's arguments and summary.

Memory: flat in the corpus size except for the duplicate index, which keeps about 3 KB per kept
chapter (3 GB per million chapters, that is per ~10 GB of text; with `dedup_threshold` 1.0 only the
exact-copy digests stay, ~150 bytes each); `--dedup-on-disk` keeps it in an SQLite file instead, and
memory stays flat whatever the corpus size. Of a file, a block of a few MB is held at a time.

A script that calls `ingest_novels` with workers > 1 needs the usual `if __name__ == "__main__":` guard,
as any code that starts processes (they are started from a fork server). bench/ingest.py prints the
phases of an ingest.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tifaforge.data import text as tx
from tifaforge.data.novels.dedup import Deduper
from tifaforge.data.novels.pack import (
    SHARD_BYTES,
    Chapter,
    Packer,
    Prep,
    ShardWriter,
    Timers,
    default_workers,
    end_of_text,
)
from tifaforge.data.novels.read import FileReport, SkipFile, file_chapters, find_inputs
from tifaforge.errors import TifaError
from tifaforge.fields import opt
from tifaforge.utils import atomic_write_json, printable_path

log = logging.getLogger(__name__)


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
    drop_tail: bool = opt(False, "Drop the stream's last block when it is shorter than --block-size (by default it "
                          "is kept as a shorter row: training pads it and leaves the padding out of the loss).")
    pack: Literal["stream", "chapters"] = opt(
        "stream", "stream: blocks are consecutive slices of the text (no padding); chapters: rows of whole chapters "
        "up to --block-size, a chapter cut only when longer than a block (long-context training: a chapter is "
        "seen whole; the rows' padding is reported as `fill`).")


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
    p.add_argument("--drop-tail", action="store_true", help=helps["drop_tail"])
    p.add_argument("--pack", choices=["stream", "chapters"], default=DEFAULTS.pack, help=helps["pack"])
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
        dedup_on_disk=getattr(args, "dedup_on_disk", False), drop_tail=getattr(args, "drop_tail", False),
        pack=getattr(args, "pack", DEFAULTS.pack),
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
    drop_tail: bool = DEFAULTS.drop_tail,
    pack: str = DEFAULTS.pack,
) -> dict:
    """Turn novel files into a packed `input_ids` dataset at `out_dir`; returns the stats it writes.

    `tokenizer` is a folder (or the preset name "tiny") or a loaded transformers tokenizer.
    `shard_blocks` caps the blocks per Arrow shard (default: about 500 MB per shard). `workers`: tokenizer
    processes (default: one per core); the output does not depend on it.
    """
    _check_options(block_size, near_dup_threshold, encoding)
    if pack not in ("stream", "chapters"):
        raise TifaError(f"--pack {pack}: must be stream or chapters")
    if pack == "chapters" and drop_tail:
        raise TifaError("--drop-tail: only with --pack stream (with chapters every row may be shorter than a block)")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise TifaError(f"--workers {workers}: must be at least 1")
    passed: list[dict] = []
    files = find_inputs(inputs, passed)
    for entry in passed:
        log.warning("%s: not read: %s", entry["path"], entry["reason"])
    out_dir = _check_out_dir(Path(out_dir))
    tok = resolve_tokenizer(tokenizer)
    eot = end_of_text(tok)
    index_dir = out_dir.with_name(f".{out_dir.name}.dedup") if dedup_on_disk else None  # a scratch folder
    run = _Run(files, _tokenizer_name(tokenizer, tok), to_simplified, encoding,
               Deduper(near_dup_threshold, num_perm, shingle_chars, on_disk=index_dir), passed)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")  # renamed to out_dir once complete
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shard_blocks = shard_blocks or max(1, SHARD_BYTES // (4 * block_size))
        stats = _build(tmp, run, tok, eot, block_size, shard_blocks, progress, workers, drop_tail, pack)
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
    passed: list[dict]  # folder entries not read (dangling symlinks, FIFOs, devices) and why
    timers: Timers = field(default_factory=lambda: Timers())
    reports: list[FileReport] = field(default_factory=list)
    removed: Counter = field(default_factory=Counter)
    chapters: Counter = field(default_factory=Counter)


def _build(tmp: Path, run: _Run, tok, eot: tuple[str, int], block_size: int, shard_blocks: int,
           progress: bool, workers: int = 1, drop_tail: bool = False, pack: str = "stream") -> dict:
    """Shards, the dataset's state files and stats.json, all in `tmp`."""
    start = time.perf_counter()
    writer = ShardWriter(tmp, block_size, shard_blocks)
    prep = Prep(run.simplify, run.dedup.near, run.dedup.num_perm, run.dedup.k)
    with Packer(tok, eot[1], block_size, writer, run.timers, workers, prep, decide=partial(_decide, run),
                keep_tail=not drop_tail, pack=pack) as packer:
        _ingest_files(run, packer, progress)
    if packer.blocks == 0 and packer.tail == 0:
        why = "; ".join(line for r in run.reports[:3] for line in r.warnings())
        raise TifaError(f"{packer.tokens} tokens in all: fewer than one block of {block_size} and --drop-tail given"
                        if packer.tokens else "no text in the inputs: nothing written" + (f" ({why})" if why else ""))
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
            report = FileReport(printable_path(path), path.stat().st_size)
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


# ---------------------------------------------------------------------------------------------
# The tokenizer


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


# ---------------------------------------------------------------------------------------------
# The report


def _stats(run: _Run, packer: Packer, shards: list[str], eot: tuple[str, int], fingerprint: str) -> dict:
    paths = [printable_path(f) for f in run.files]
    reports = run.reports
    return {
        "inputs": len(run.files),
        "files_skipped": sum(r.skipped is not None for r in reports),
        "entries_not_read": run.passed,
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
        "pack": packer.pack,
        "fill": round(packer.tokens / max(1, packer.blocks * packer.block_size), 4) if packer.pack == "chapters" else None,
        "chapters_cut": packer.chapters_cut,
        "tail_block_tokens": packer.tail,
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
    if stats.get("pack") == "chapters":
        head = (f"wrote {stats['blocks']} rows of whole chapters up to {stats['block_size']} tokens "
                f"({stats['tokens']:,} tokens, {stats['fill']:.0%} of the rows filled, "
                f"{stats['chapters_cut']} chapter(s) longer than a block cut) in {len(stats['shards'])} shard(s) to {out}")
    else:
        head = (f"wrote {stats['blocks']} blocks of {stats['block_size']} tokens"
                + (f" and a last one of {stats['tail_block_tokens']} (padded in training, padding out of the loss)"
                   if stats["tail_block_tokens"] else "")
                + f" ({stats['tokens']:,} tokens"
                + (f", {stats['tokens_dropped_tail']} in the tail dropped by --drop-tail" if stats["tokens_dropped_tail"] else "")
                + f") in {len(stats['shards'])} shard(s) to {out}")
    lines = [
        head,
        f"files {stats['inputs']} ({stats['files_skipped']} skipped), documents {stats['documents']}, "
        f"chapters kept {c['kept']} of {c['found']} (exact copies {c['exact_duplicates']}, "
        f"near copies {c['near_duplicates']}, empty after cleaning {c['empty_after_cleaning']})",
        "encodings: " + ", ".join(f"{k} {v}" for k, v in stats["encodings"].items()),
    ]
    if stats["removed_lines"]:
        lines.append("removed: " + ", ".join(f"{k} {v}" for k, v in stats["removed_lines"].items()))
    lines += [f"skipped {f['path']}: {f['skipped']}" for f in stats["files"] if f["skipped"]]
    lines += [f"not read {e['path']}: {e['reason']}" for e in stats.get("entries_not_read", [])]
    lines.append(f"details: {Path(out) / 'stats.json'}")
    return lines

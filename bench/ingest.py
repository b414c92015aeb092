"""Novel ingest throughput: MB/s end to end and per phase, and memory over time, on a generated corpus.

    .venv/bin/python bench/ingest.py                 # 200 MB, the figure README quotes
    .venv/bin/python bench/ingest.py --size-mb 20    # a quick run

The corpus is generated in a temporary folder: Chinese novel-like chapters (clauses recombined from the
bundled tokenizer corpus, with random characters inserted so the tokenizer's word cache cannot flatter
the figure), paragraph indents, CRLF line endings in some files, boilerplate lines in about a third of
the chapters, exact copies (a whole re-uploaded book) and near copies of chapters, and one file in
GBK of every ten. MB/s is input bytes on disk over wall-clock seconds. Phases overlap (the main process
reads and splits and keeps the duplicate index; cleaning, duplicate keys and tokenising run in worker
processes, `--workers`, default one per core), so each phase's figure is its bytes over its own busy
seconds, summed over the processes (on 2 cores, 3 processes share them: busy seconds include waiting for
a core). Memory is sampled from /proc while the ingest runs, for the process and its worker processes
together: flat means streaming works. Target: 20 MB/s on 2 cores.

Caveat: the generated text recombines the clauses of a small bundled corpus, so about 88% of its
pre-tokens repeat; the encoder's word cache (the C kernel's, data/_bpe.c) gains more here than on real
novels, where long runs of Han characters are one pre-token each and repeat less (with every pre-token
new the kernel still runs at about 28 MB/s on one core).
"""

from __future__ import annotations

import argparse
import random
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

BOILERPLATE = ["笔趣阁 www.biquge.la 最快更新！无弹窗！", "本章完", "求月票！求推荐票！", "今天两更，晚上还有一更。",
               "请记住本站域名：https://www.example.cc", "PS：感谢书友们的打赏和月票。"]


class Corpus:
    """A deterministic generator of novel-like files."""

    def __init__(self, seed: int) -> None:
        from tifaforge.models.presets import corpus_text

        text = corpus_text()
        self.clauses = [c for c in re.split(r"(?<=[，。！？：；])", text.replace("\n", "")) if c.strip()]
        self.chars = sorted({c for c in text if "\u4e00" <= c <= "\u9fff"})
        self.rng = random.Random(seed)
        self.recent: list[str] = []
        self.chapter_no = 0

    def paragraph(self) -> str:
        out = []
        for clause in self.rng.choices(self.clauses, k=self.rng.randint(3, 12)):
            if self.rng.random() < 0.5:  # a new name or word: pre-tokens rarely repeat, as in real text
                i = self.rng.randrange(len(clause))
                clause = clause[:i] + "".join(self.rng.choices(self.chars, k=2)) + clause[i:]
            out.append(clause)
        return "\u3000\u3000" + "".join(out)

    def chapter(self) -> str:
        self.chapter_no += 1
        if self.recent and self.rng.random() < 0.03:  # a near copy: reposted with a few words changed
            body = self.rng.choice(self.recent).replace("。", "！", 3)
        else:
            lines, size = [], 0
            while size < 3000:
                lines.append(self.paragraph())
                size += len(lines[-1])
            if self.rng.random() < 0.35:
                lines.insert(self.rng.randrange(len(lines)), self.rng.choice(BOILERPLATE))
            body = "\n\n".join(lines)
            self.recent = (self.recent + [body])[-200:]
        return f"第{self.chapter_no}章 {''.join(self.rng.choices(self.chars, k=4))}\n\n{body}\n\n"

    def book(self, size_bytes: int) -> str:
        parts, size = [f"书名：{''.join(self.rng.choices(self.chars, k=4))}\n作者：佚名\n\n"], 0
        while size < size_bytes:
            parts.append(self.chapter())
            size += 3 * len(parts[-1])
        return "".join(parts)


def write_corpus(folder: Path, size_mb: float, seed: int) -> int:
    """Novels of about 2 MB each until size_mb; returns the bytes written."""
    corpus, total, n = Corpus(seed), 0, 0
    previous = None
    while total < size_mb * 1e6:
        path = folder / f"{n // 20:03d}" / f"book{n:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if previous is not None and n % 25 == 24:
            data = previous  # the same book uploaded twice
        else:
            text = corpus.book(min(2_000_000, int(size_mb * 1e6 - total) + 1))
            if n % 10 == 3:
                data = text.encode("gbk")
            else:
                data = (text.replace("\n", "\r\n") if n % 4 == 1 else text).encode("utf-8")
        path.write_bytes(data)
        previous, total, n = data, total + len(data), n + 1
    return total


class RssSampler(threading.Thread):
    """Resident memory every 0.2 s, from /proc/self/status (Linux)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self.stop.wait(0.2):
            self.samples.append((time.perf_counter() - start, rss_bytes()))


def rss_bytes(pid: str = "self") -> int:
    """Resident memory of a process and its children (the tokenizer processes), from /proc (Linux)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_bytes(child)
    except OSError:  # a process that ended meanwhile
        pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=200, help="corpus size to generate (default 200)")
    ap.add_argument("--tokenizer", default="tiny", help="tokenizer folder or preset name (default: tiny)")
    ap.add_argument("--block-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true", help="show the ingest's progress bar")
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per core)")
    ap.add_argument("--dedup-on-disk", action="store_true", help="the duplicate index in SQLite (flat memory)")
    args = ap.parse_args()

    from tifaforge.data.novels import ingest_novels, resolve_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="tifa-bench-ingest-"))
    try:
        t = time.perf_counter()
        size = write_corpus(tmp / "corpus", args.size_mb, args.seed)
        print(f"corpus: {size / 1e6:.1f} MB in {len(list((tmp / 'corpus').rglob('*.txt')))} files, "
              f"generated in {time.perf_counter() - t:.1f} s")
        tok = resolve_tokenizer(args.tokenizer)
        rss_before = rss_bytes()
        sampler = RssSampler()
        sampler.start()
        t = time.perf_counter()
        stats = ingest_novels([tmp / "corpus"], tmp / "out", tok, block_size=args.block_size, progress=args.progress,
                              workers=args.workers, dedup_on_disk=args.dedup_on_disk)
        wall = time.perf_counter() - t
        sampler.stop.set()
        report(stats, size, wall, rss_before, sampler.samples)
        rust, cached = tokenizer_ceiling(tok, tmp / "corpus")
        print(f"tokenizer alone {rust:7.1f} MB/s   (Rust encode_batch_fast on all cores, up to 20 MB of the UTF-8 "
              "files)")
        print(f"encoder alone   {cached:7.1f} MB/s   (the ingest's {encoder_name(tok)} on one core, the same texts)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def tokenizer_ceiling(tok, corpus: Path, limit: int = 20_000_000) -> tuple[float, float]:
    texts, size = [], 0
    for path in sorted(corpus.rglob("*.txt")):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # the GBK files
        texts += [text[i:i + 3000] for i in range(0, len(text), 3000)]
        size += len(data)
        if size >= limit:
            break
    from tifaforge.data.novels import TextEncoder

    start = time.perf_counter()
    for i in range(0, len(texts), 300):  # batches of about a million characters, as the ingest does
        tok.backend_tokenizer.encode_batch_fast(texts[i:i + 300], add_special_tokens=False)
    rust = size / 1e6 / (time.perf_counter() - start)
    encoder = TextEncoder(tok)
    start = time.perf_counter()
    for i in range(0, len(texts), 300):
        encoder.encode(texts[i:i + 300])
    return rust, size / 1e6 / (time.perf_counter() - start)


def encoder_name(tok) -> str:
    from tifaforge.data.novels import TextEncoder

    cache = TextEncoder(tok).cache
    return {"NativeEncoder": "C kernel", "WordCacheEncoder": "Python word cache"}.get(type(cache).__name__,
                                                                                    "Rust batch call")


def report(stats: dict, size: int, wall: float, rss_before: int, samples: list[tuple[float, int]]) -> None:
    mb = size / 1e6
    sec = dict(stats["seconds"])
    sec["tokenise_pack"] = sec.get("tokenise", 0) + sec.get("pack_write", 0)
    print(f"end to end      {mb / wall:7.1f} MB/s   ({wall:.1f} s, {stats['tokens'] / wall / 1e6:.2f} M tokens/s)")
    for phase in ("decode_clean", "dedup", "tokenise_pack"):
        print(f"  {phase:<13} {mb / max(sec[phase], 1e-9):7.1f} MB/s   ({sec[phase]:.1f} s busy)")
    c = stats["chapters"]
    print(f"chapters {c['found']} -> kept {c['kept']} (exact {c['exact_duplicates']}, near {c['near_duplicates']}); "
          f"removed lines {sum(stats['removed_lines'].values())}; encodings {stats['encodings']}")
    print(f"tokens {stats['tokens']:,} -> {stats['blocks']} blocks of {stats['block_size']}")
    if samples:
        marks = [samples[int(f * (len(samples) - 1))] for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
        curve = ", ".join(f"{t:.0f}s {r / 2**20:.0f}" for t, r in marks)
        print(f"RSS MiB over time: {curve}  (before ingest {rss_before / 2**20:.0f})")
    peak = max((r for _, r in samples), default=0)
    print(f"peak RSS        {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (this process), "
          f"{peak / 2**20:.0f} MiB sampled with its child processes (shared pages counted in each)")


if __name__ == "__main__":
    sys.exit(main())

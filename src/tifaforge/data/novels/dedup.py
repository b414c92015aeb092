"""Exact and near-duplicate chapters: their keys (digest, MinHash signature) and the index that judges them.

    tifa data novels books/ --out data/cpt --tokenizer models/tiny --dedup-threshold 0.8 [--dedup-on-disk]

A chapter is dropped when it is an exact copy (same BLAKE2b digest) or a near copy of a chapter kept
before it, in any file (the first occurrence is kept). The keys are computed in the ingest's worker
processes (pack.py); the verdicts are taken on the main process in reading order (command.py), so the
output does not depend on the number of workers.

Near duplicates, and how they depart from textbook MinHash: signatures are one-permutation MinHash
(Li, Owen & Zhang 2012: every 5-gram of letters and digits hashed once, punctuation and spaces
skipped, the minimum kept per bin) with rotation densification for the bins a short chapter leaves
empty (Shrivastava & Li 2014), computed in O(length) instead of O(length x permutations) (numpy, or the
C kernel of encode.py); an LSH index with datasketch's band split finds candidates, and a candidate counts
only if its estimated Jaccard similarity reaches the threshold. Chapters under 50 characters are checked
for exact copies only. The index lives in memory, or with --dedup-on-disk in an SQLite file.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from tifaforge.data.novels.encode import native_kernel

MIN_NEAR_DUP_CHARS = 50


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
    bpe = native_kernel()
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

"""The KV of recently served sequences, reused across requests: the next turn of a chat prefills only
what is new.

    tifa serve models/tiny --prefix-cache-mb 256

A role-play front end resends the card and the whole history every turn. When a request finishes,
the KV of every token it fed (its prompt and the answer tokens before the last) is kept here, keyed
by those token ids; a later prompt that opens with the same ids (the longest common prefix with any
kept sequence, at least MIN_REUSE tokens) starts from that KV and prefills only the rest. The next
turn's history holds the answer without its think block, so the reuse usually stops where the last
answer began: everything before it (card, earlier turns) is not computed again. Bounded in bytes,
least recently used first out; `clear()` whenever the weights change. Written here because
transformers' own prefix caching lives inside `generate` and vLLM's inside vLLM: neither serves our
continuous batch. (vLLM backend: its automatic prefix caching; llama.cpp: its own prompt cache.)
"""

from __future__ import annotations

from collections import OrderedDict

MIN_REUSE = 16  # shorter common openings are prefilled anew: not worth a cache copy


class PrefixCache:
    """LRU of token-id sequences -> their per-layer (keys, values), each (1, H, T, D), in bytes."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.entries: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.reused_tokens = self.evictions = 0

    @staticmethod
    def _size(layers) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)

    def store(self, ids: tuple[int, ...], layers: list) -> None:
        """Keep `layers` (already copied out of the batch) for `ids`; evict the oldest to fit."""
        if self.budget <= 0 or len(ids) < MIN_REUSE:
            return
        size = self._size(layers)
        if size > self.budget:
            return
        if ids in self.entries:
            self.entries.move_to_end(ids)
            return
        for old in [k for k in self.entries if len(k) <= len(ids) and ids[:len(k)] == k]:
            self._drop(old)  # a sequence this one extends adds nothing
        while self.bytes + size > self.budget:
            self._drop(next(iter(self.entries)))
            self.evictions += 1
        self.entries[ids] = layers
        self.bytes += size

    def _drop(self, key) -> None:
        self.bytes -= self._size(self.entries.pop(key))

    def lookup(self, prompt: tuple[int, ...]) -> tuple[int, list] | None:
        """(n, per-layer KV of the first n tokens) for the kept sequence sharing the longest opening
        with `prompt` (at most all but its last token: the last is fed to get the first logits)."""
        best, best_n = None, MIN_REUSE - 1
        for ids in self.entries:
            n = _common_prefix(ids, prompt, len(prompt) - 1)
            if n > best_n:
                best, best_n = ids, n
        if best is None:
            self.misses += 1
            return None
        self.entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += best_n
        return best_n, [(k[..., :best_n, :], v[..., :best_n, :]) for k, v in self.entries[best]]

    def clear(self) -> None:
        """Forget everything (the weights changed: every kept KV is stale)."""
        self.entries.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"budget_mb": round(self.budget / 2**20, 1), "mb": round(self.bytes / 2**20, 2),
                "entries": len(self.entries), "hits": self.hits, "misses": self.misses,
                "reused_tokens": self.reused_tokens, "evictions": self.evictions}


def _common_prefix(a: tuple, b: tuple, cap: int) -> int:
    """Length of the common opening of `a` and `b`, at most `cap`: a binary search of slice equalities
    (each compared in C), not a Python loop over tokens."""
    lo, hi = 0, min(len(a), len(b), cap)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo

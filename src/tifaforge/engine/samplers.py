"""Role-play samplers with llama.cpp semantics, as transformers logits processors.

    tifa chat MODEL            # every engine call builds its chain with build_logits_processors()

`build_logits_processors(cfg, tokenizer)` turns a `SamplingConfig` into llama.cpp's default sampler
chain (common/common.h `samplers`, also SillyTavern's default `samplers` order), so a SillyTavern
preset means the same here as on llama.cpp:

    logit bias -> penalties (repetition, then presence/frequency) -> DRY -> top-n-sigma -> top_k
    -> typical_p -> top_p -> min_p -> XTC -> temperature

(min_tokens and ignore_eos keep the end token and role tags out of reach first, as llama.cpp's
logit bias on them does.)

Temperature comes LAST, as in llama.cpp: top_p 0.6 and min_p see the untempered distribution.
transformers' own `generate` applies temperature first, so the same numbers keep fewer candidates
there. A setting that is off adds no processor. transformers' processors are used where they already
have llama.cpp's semantics (repetition penalty, top_k, top_p, min_p, temperature); DRY, XTC and
presence/frequency penalties are written here.

Departures from llama.cpp:
1. Repetition penalty is transformers' CTRL rule over the whole context, prompt included (llama.cpp
   looks at the last `repeat_last_n` = 64 tokens). Left-padding columns are left out.
2. Presence and frequency penalties count generated tokens only (OpenAI/vLLM semantics; llama.cpp
   counts the last 64 tokens, prompt included): a card's own words are not penalised.
3. DRY matches breakers against each token's text: for byte-level BPE (Qwen, GPT-2) that is the
   token's bytes, exactly as llama.cpp; for other tokenizers it is the token decoded alone, so a
   byte-fallback piece of a character never matches. Multi-token breakers follow llama.cpp (a head
   token ending in a prefix of the breaker, plus the tokenization of the rest, at most 20 tokens);
   for byte-level BPE the rest is tokenized by the BPE model without the pre-tokenizer, because it can
   be a partial UTF-8 character that no `str` holds (breakers are cut at 40 bytes there, 40 characters
   for other tokenizers). DRY's window includes the prompt (llama.cpp's
   server feeds the prompt to its samplers too); -1 means the whole sequence.
4. XTC draws one number per row at every step (llama.cpp draws only when at least two candidates
   remain), from `generator` (the engine passes each row's own, seeded by its request), so its random
   stream is not llama.cpp's mt19937. Among tied least likely
   top candidates, the lowest token id survives.
5. Greedy decoding (`do_sample: false`) keeps only the processors that move the argmax: penalties and
   DRY. XTC is dropped there (llama.cpp would still run it before its argmax). Temperature 0 with
   sampling on keeps only the most likely token, as llama.cpp does.
6. top_k keeps ties with the k-th logit and top_p cuts at `cumulative <= 1 - p` (transformers);
   llama.cpp cuts ties arbitrarily and at `cumulative >= p`. They differ only at exact ties.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tifaforge.config import SamplingConfig
from tifaforge.errors import ConfigError

MAX_BREAKER_CHARS = 40  # llama.cpp truncates each breaker to 40 bytes ...
MAX_TAIL_TOKENS = 20  # ... and the tokenized rest of a multi-token breaker to 20 tokens
FLOAT_MAX_LOG = 88.7228391  # log(float32 max): llama.cpp caps DRY's exponent so base^n stays finite


def build_logits_processors(
    cfg: SamplingConfig,
    tokenizer,
    prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    layout: Layout | None = None,
    stop_ids: Sequence[int] = (),
) -> LogitsProcessorList:
    """The llama.cpp sampler chain for `cfg`, as processors for one generate call.

    `prompt_lengths`: each row's prompt length in tokens, padding excluded, for left-padded batches
    (None: no padding). The processors learn the padded prompt width at their first call, which sees
    exactly the prompt, so build a new list for every call. Or `layout`: each row's first token and
    first generated token given explicitly (`Layout.fixed`), for rows that joined a running decode at
    different steps. `generator` seeds XTC: one for all rows, or one per row. `stop_ids`: the tokens
    that end an answer, kept out of reach by `min_tokens` and `ignore_eos`.
    """
    _validate(cfg)
    layout = layout if layout is not None else Layout(prompt_lengths)
    procs = LogitsProcessorList()
    if (cfg.min_tokens or cfg.ignore_eos) and stop_ids:
        procs.append(MinTokens(math.inf if cfg.ignore_eos else cfg.min_tokens, stop_ids, layout))
    if cfg.logit_bias:
        procs.append(LogitBias(cfg.logit_bias))
    if cfg.repetition_penalty != 1.0:
        procs.append(PaddedRepetitionPenalty(float(cfg.repetition_penalty), layout=layout,
                                             last_n=cfg.repetition_penalty_range))
    if cfg.presence_penalty or cfg.frequency_penalty:
        procs.append(PresenceFrequencyPenalty(cfg.presence_penalty, cfg.frequency_penalty, layout=layout))
    if cfg.dry_multiplier > 0 and cfg.dry_penalty_last_n != 0:
        procs.append(
            DRYLogitsProcessor(
                cfg.dry_multiplier, cfg.dry_base, cfg.dry_allowed_length, cfg.dry_penalty_last_n,
                cfg.dry_sequence_breakers, tokenizer, layout=layout,
            )
        )  # fmt: skip
    if not cfg.do_sample:
        return procs
    if cfg.top_n_sigma > 0:
        procs.append(TopNSigma(cfg.top_n_sigma))
    if cfg.top_k > 0:
        procs.append(TopKLogitsWarper(cfg.top_k))
    if 0 < cfg.typical_p < 1.0:  # 1.0 (and 0, which transformers' warper refuses) is off
        procs.append(TypicalLogitsWarper(cfg.typical_p))
    if cfg.top_p < 1.0:
        procs.append(TopPLogitsWarper(cfg.top_p))
    if cfg.min_p > 0:
        procs.append(MinPLogitsWarper(cfg.min_p))
    if cfg.xtc_probability > 0 and cfg.xtc_threshold <= 0.5:  # llama.cpp: a threshold above 0.5 turns XTC off
        procs.append(XTCLogitsWarper(cfg.xtc_threshold, cfg.xtc_probability, generator))
    if cfg.temperature == 0:
        procs.append(TopKLogitsWarper(1))  # llama.cpp: temperature <= 0 keeps only the most likely token
    elif cfg.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(cfg.temperature)))
    return procs


def _validate(cfg: SamplingConfig) -> None:
    """Per-request settings may skip the config loader, so check bounds (and NaN) here too."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"sampling.{f.name}: {v!r} is not a number in {bounds}")
    if cfg.repetition_penalty <= 0:
        raise ConfigError(f"sampling.repetition_penalty: {cfg.repetition_penalty!r} must be > 0 (1.0 = off)")


class Layout:
    """Where each row's tokens start (left padding) and where its generated tokens start.

    Learned: the first call of a generate loop sees exactly the padded prompt, so its width is the
    column where every row's generated tokens begin; `prompt_lengths` then says how many columns of
    each row are padding. Fixed (`Layout.fixed`): both given per row, for a continuous batch where
    rows that joined at different steps share one chain. Columns are counted from the left, so they
    stay valid as tokens are appended. One instance is shared by a chain's processors.
    """

    def __init__(self, prompt_lengths: Sequence[int] | torch.Tensor | None = None):
        self.prompt_lengths = None if prompt_lengths is None else torch.as_tensor(prompt_lengths, dtype=torch.long)
        self.width: int | None = None
        self.pads: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None  # (B,) per-row first generated column, fixed layouts only

    @classmethod
    def fixed(cls, pads: torch.Tensor, starts: torch.Tensor) -> Layout:
        """Row b's tokens start at column pads[b], its generated tokens at starts[b] (both (B,))."""
        layout = cls()
        layout.pads, layout.starts = pads, starts
        if bool((starts < pads).any()):
            raise ValueError(f"generated tokens cannot start in the padding: pads {pads.tolist()}, starts {starts.tolist()}")
        return layout

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int | torch.Tensor]:
        """(pads (B,), start): row b's tokens start at column pads[b], generated ones at `start`
        (an int, the same for every row, or a (B,) tensor for a fixed layout)."""
        if self.starts is not None:
            if self.starts.shape != input_ids.shape[:1] or bool((self.starts > input_ids.shape[1]).any()):
                raise ValueError(f"layout for {self.starts.numel()} rows does not fit input_ids of shape {tuple(input_ids.shape)}")
            return self.pads, self.starts
        if self.width is None:
            B, self.width = input_ids.shape
            lengths = torch.full((B,), self.width) if self.prompt_lengths is None else self.prompt_lengths
            if lengths.shape != (B,) or (lengths > self.width).any():
                raise ValueError(f"prompt_lengths {lengths.tolist()} do not fit input_ids of shape {(B, self.width)}")
            self.pads = (self.width - lengths).to(input_ids.device)  # once: no host-to-device copy per step
        return self.pads, self.width

    @property
    def padded(self) -> bool:
        return self.prompt_lengths is not None or self.starts is not None


class PaddedRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """transformers' repetition penalty, blind to left padding (the pad token may be the end token);
    `last_n` > 0 looks at the row's last n tokens only (SillyTavern's rep_pen_range, llama.cpp's
    repeat_last_n)."""

    def __init__(self, penalty: float, prompt_lengths: Sequence[int] | torch.Tensor | None = None,
                 layout: Layout | None = None, last_n: int = 0):
        super().__init__(penalty)
        self.layout = layout if layout is not None else Layout(prompt_lengths)
        self.last_n = last_n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.layout.padded or self.last_n:
            # Columns left out become the row's last token, already in the row: the penalised set is unchanged.
            pads = self.layout(input_ids)[0] if self.layout.padded else torch.zeros(len(input_ids), dtype=torch.long)
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            cut = pads.to(input_ids.device)[:, None]
            if self.last_n:
                cut = torch.maximum(cut, torch.tensor(input_ids.shape[1] - self.last_n, device=input_ids.device))
            input_ids = torch.where(pos < cut, input_ids[:, -1:], input_ids)
        return super().__call__(input_ids, scores)


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: a fixed number added to chosen tokens' logits (ids past the vocabulary are
    the caller's to refuse)."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids.to(scores.device)] += self.values.to(scores.device, scores.dtype)
        return scores


class MinTokens(LogitsProcessor):
    """The tokens that end an answer are out of reach until a row has generated `n` tokens (inf:
    always, `ignore_eos`)."""

    def __init__(self, n: float, stop_ids: Sequence[int], layout: Layout):
        self.n, self.stop = n, torch.tensor(sorted(stop_ids), dtype=torch.long)
        self.layout = layout

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _, start = self.layout(input_ids)
        generated = input_ids.shape[1] - torch.as_tensor(start, device=input_ids.device)
        early = (generated < self.n).expand(len(scores)) if generated.dim() == 0 else generated < self.n
        if not bool(early.any()):
            return scores
        scores = scores.clone()
        rows = early.nonzero()[:, 0]
        scores[rows[:, None], self.stop.to(scores.device)[None, :]] = -math.inf
        return scores


class TopNSigma(LogitsProcessor):
    """Top-nσ (llama.cpp's top_n_sigma): keep the tokens whose logit is at least max - n·σ, σ the
    standard deviation of the row's finite logits."""

    def __init__(self, n: float):
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(scores)
        count = finite.sum(-1, keepdim=True).clamp(min=1)
        vals = torch.where(finite, scores, torch.zeros_like(scores))
        mean = vals.sum(-1, keepdim=True) / count
        std = (torch.where(finite, (scores - mean) ** 2, torch.zeros_like(scores)).sum(-1, keepdim=True) / count).sqrt()
        top = scores.max(-1, keepdim=True).values
        return scores.masked_fill(scores < top - self.n * std, -math.inf)


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), over generated tokens."""

    def __init__(self, presence: float, frequency: float, prompt_lengths: Sequence[int] | torch.Tensor | None = None,
                 layout: Layout | None = None):
        self.presence, self.frequency = presence, frequency
        self.layout = layout if layout is not None else Layout(prompt_lengths)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _, start = self.layout(input_ids)
        V = scores.shape[-1]
        if isinstance(start, int):
            generated = input_ids[:, start:]  # (B, G)
        else:  # rows started generating at different columns: earlier tokens go to a sink column V
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            generated = torch.where(pos >= start[:, None], input_ids, V)
            scores = torch.nn.functional.pad(scores, (0, 1))
        # Sparse updates: a (B, V) count tensor would cost more than the G tokens touched.
        out = scores.scatter_add(1, generated, torch.full_like(generated, -self.frequency, dtype=scores.dtype))
        out = out.scatter_(1, generated, out.gather(1, generated) - self.presence)  # duplicates write one value
        return out[:, :V]


class XTCLogitsWarper(LogitsProcessor):
    """Exclude Top Choices: with chance `probability`, drop every token whose probability is at
    least `threshold` except the least likely of them (nothing happens if fewer than two qualify)."""

    def __init__(self, threshold: float, probability: float,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None):
        self.threshold, self.probability, self.generator = threshold, probability, generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(-1)  # (B, V); tokens cut by earlier truncation are -inf, prob 0
        top = (probs >= self.threshold) & (scores > -math.inf)
        last = torch.where(top, probs, 2.0).argmin(-1, keepdim=True)  # (B, 1) least likely top choice
        drop = top.scatter(1, last, False)
        draw = self._draw(scores.shape[0], scores.device)
        fire = draw <= self.probability  # (B,) llama.cpp skips when chance > p
        return scores.masked_fill(drop & fire[:, None], -math.inf)  # one top choice: nothing to drop

    def _draw(self, rows: int, device) -> torch.Tensor:
        """(rows,) uniform numbers: from the one generator, or one from each row's own (so a row's
        draws do not depend on the rows it is batched with)."""
        g = self.generator
        if g is None or isinstance(g, torch.Generator):
            return torch.rand(rows, generator=g, device=g.device if g is not None else device).to(device)
        if len(g) != rows:
            raise ValueError(f"XTC has {len(g)} generators for {rows} rows")
        return torch.cat([torch.rand(1, generator=gi, device=gi.device) for gi in g]).to(device)


class DRYLogitsProcessor(LogitsProcessor):
    """DRY ("Don't Repeat Yourself", p-e-w; llama.cpp `llama_sampler_dry`).

    If the context ends with n tokens that also occur earlier, with n >= allowed_length, the token that
    followed that earlier occurrence loses multiplier * base^(n - allowed_length) from its logit
    (the longest such n per token). Matches look back over `penalty_last_n` tokens (-1: all) and never
    reach past the last sequence breaker; a single-token breaker is never penalised itself.

    Instead of llama.cpp's Z-algorithm, the first call measures every position's repeat length in
    (longest repeat + 1) vector rounds over (batch, context); each later call, one token longer, updates
    them in one vector step with no host sync, so a step costs a few O(batch x context) operations.
    """

    def __init__(
        self,
        multiplier: float,
        base: float,
        allowed_length: int,
        penalty_last_n: int,
        sequence_breakers: Sequence[str],
        tokenizer,
        prompt_lengths: Sequence[int] | torch.Tensor | None = None,
        layout: Layout | None = None,
    ):
        self.multiplier, self.base, self.allowed, self.last_n = multiplier, base, allowed_length, penalty_last_n
        self.single, self.tails = _breaker_table(tokenizer, tuple(sequence_breakers))
        self.layout = layout if layout is not None else Layout(prompt_lengths)
        # Past llama.cpp's exponent cap the penalty stops growing, so longer matches are not measured.
        # For base <= 1.000001 (no cap in llama.cpp) the penalty is flat to within 0.1%: measure up to
        # allowed_length only.
        self.cap = allowed_length + (int(FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0)
        self._masks: dict = {}
        self._lens: torch.Tensor | None = None  # the previous step's match lengths, (B, T-2)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        single, tails = self._on(scores.device, scores.shape[-1])
        pads, _ = self.layout(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        start = pads if self.last_n < 0 else pads.clamp(min=T - self.last_n)  # (B,) first column of the window
        in_window = pos >= start[:, None]  # (B, T)
        rep_limit = self._rep_limit(input_ids, in_window, T - start, single, tails)  # (B,)
        # A repeat may neither begin before the window nor reach back past the last breaker.
        lens = torch.minimum(self._matches(input_ids), pos[1:] - start[:, None])  # (B, T-1)
        lens = torch.minimum(lens, rep_limit[:, None])
        after = input_ids[:, 1:]  # (B, T-1) the token that followed each position
        hit = in_window[:, :-1] & (lens >= self.allowed) & ~_lookup(single, after)  # a breaker is never penalised
        exp = (lens - self.allowed).to(torch.float32)  # at most llama.cpp's cap: lens <= self.cap
        pen = torch.where(hit, self.multiplier * torch.pow(self.base, exp), 0.0).to(scores.dtype)  # (B, T-1)
        # Each token loses the largest penalty aimed at it: the min of its score and every score - pen.
        return scores.scatter_reduce(1, after, scores.gather(1, after) - pen, "amin")

    def _matches(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T-1): for each position j, how many tokens ending at j equal the tokens ending the row
        (at most `cap`; the caller clips them to the window, which also keeps them out of padding).
        One token after the last call, this is one vector step from the last result."""
        B, T = ids.shape
        if self._lens is not None and self._lens.shape == (B, T - 2):
            # The match ending at j extends the last step's match ending at j-1 iff ids[j] is the new token.
            grown = torch.nn.functional.pad(self._lens, (1, 0)).add_(1).clamp_(max=self.cap)  # (B, T-1)
            self._lens = torch.where(ids[:, :-1] == ids[:, -1:], grown, 0)
        else:
            self._lens = _suffix_matches(ids, self.cap)
        return self._lens

    def _rep_limit(self, ids, in_window, n_window, single, tails) -> torch.Tensor:
        """(B,) tokens after the last complete sequence breaker in the window; the window if none.

        As llama.cpp: take the breaker head nearest the end, and at that head the longest tail."""
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        key = MAX_TAIL_TOKENS + 1  # encodes (head column, tail length) in one comparable number
        best = torch.where(_lookup(single, ids) & in_window, pos * key, -1).amax(1)  # (B,)
        for heads, tail in tails:
            m = len(tail)
            if m >= T:
                continue
            hit = _lookup(heads, ids[:, : T - m]) & in_window[:, : T - m]  # (B, T-m) head at column h
            for o, tok in enumerate(tail):
                hit &= ids[:, 1 + o : T - m + 1 + o] == tok
            best = torch.maximum(best, torch.where(hit, pos[: T - m] * key + m, -1).amax(1))
        return torch.where(best >= 0, T - 1 - best // key - best % key, n_window)

    def _on(self, device, vocab: int):
        """The breaker masks on `device`, padded to the model's vocabulary (it can exceed the tokenizer's)."""
        if (device, vocab) not in self._masks:
            pad = lambda m: torch.nn.functional.pad(m, (0, max(0, vocab - m.numel()))).to(device)  # noqa: E731
            self._masks[(device, vocab)] = (pad(self.single), [(pad(h), t) for h, t in self.tails])
        return self._masks[(device, vocab)]


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids]: index_select is ~100x faster than advanced indexing here on CPU (torch 2.13)."""
    return table.index_select(0, ids.reshape(-1)).view(ids.shape)


def _suffix_matches(x: torch.Tensor, cap: int) -> torch.Tensor:
    """lens[b, j] = length of the longest common suffix of x[b, :j+1] and x[b, :], at most `cap`.

    x: (B, T) -> (B, T-1). Round k compares column j-k with column T-1-k for every j at once; a
    position stays alive while all its rounds matched, so rounds stop soon after the longest repeat.
    """
    B, T = x.shape
    lens = torch.zeros(B, T - 1, dtype=torch.long, device=x.device)
    alive = torch.ones(B, T - 1, dtype=torch.bool, device=x.device)
    for k in range(min(cap, T - 1)):
        alive[:, k:] &= x[:, : T - 1 - k] == x[:, T - 1 - k : T - k]
        if k:
            alive[:, k - 1] = False  # this occurrence would start before column 0
        if k & (k + 1) == 0 and not alive.any():  # check (a GPU sync) at k = 0, 1, 3, 7, ... only
            break
        lens += alive
    return lens


@functools.lru_cache(maxsize=8)
def _breaker_table(tokenizer, breakers: tuple[str, ...]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, tuple[int, ...]]]]:
    """Sequence breakers at the token level, as llama.cpp's `get_overlapping_token_sequences`.

    Returns (single (V,) bool: tokens whose text contains a whole breaker, [(heads (V,) bool, tail)]:
    a head token whose text ends with a proper prefix of a breaker, followed by `tail`, the tokens of
    the rest of it). Scanning the vocabulary takes ~0.1 s per breaker for 150k tokens, hence the cache.
    """
    texts, to_text, tokenize = _vocab_view(tokenizer)
    single = torch.zeros(len(texts), dtype=torch.bool)
    heads: dict[tuple[int, ...], list[int]] = {}
    for breaker in breakers:
        s = to_text(breaker)[:MAX_BREAKER_CHARS]
        if not s:
            continue  # llama.cpp skips empty breakers
        rests: dict[str, tuple[int, ...]] = {}
        for tok, w in enumerate(texts):
            if s in w:
                single[tok] = True
                continue
            p = w.find(s[0])
            while p != -1:
                if s.startswith(w[p:]):
                    rest = s[len(w) - p :]
                    if rest not in rests:
                        rests[rest] = tuple(tokenize(rest)[:MAX_TAIL_TOKENS])
                    heads.setdefault(rests[rest], []).append(tok)
                p = w.find(s[0], p + 1)
    if () in heads:  # a rest that tokenizes to nothing: llama.cpp then treats the head as a whole breaker
        single[heads.pop(())] = True
    tails = []
    for tail, toks in heads.items():
        mask = torch.zeros(len(texts), dtype=torch.bool)
        mask[toks] = True
        tails.append((mask, tail))
    return single, tails


def _vocab_view(tokenizer):
    """(each token's text, breaker -> that text's alphabet, tokenize a text in that alphabet)."""
    n = len(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
        # Byte-level BPE spells each byte as one character: matching these strings is matching bytes.
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        b2u = bytes_to_unicode()

        def to_text(s: str) -> str:
            return "".join(b2u[b] for b in s.encode("utf-8"))

        texts = [t or "" for t in tokenizer.convert_ids_to_tokens(list(range(n)))]
        for i, added in tokenizer.added_tokens_decoder.items():
            if i < n:
                texts[i] = to_text(added.content)  # added tokens are stored as plain text
        return texts, to_text, lambda s: [t.id for t in backend.model.tokenize(s)]
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return texts, (lambda s: s), (lambda s: tokenizer.encode(s, add_special_tokens=False))

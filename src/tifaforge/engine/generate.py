"""The ONE generation path: chat, the server, MGRPO rollouts, pair mining and eval all call `Engine`.

    tifa chat models/tiny --once "你好"

Why our own decode loop instead of `model.generate`: per-request sampling settings and seeds inside
one batch, stop strings cut exactly, streaming deltas that never split a UTF-8 character or leak
the start of a stop string, and cancellation by simply closing the stream (the server's client
disconnect). The loop is the standard one: left-padded prompts, one prefill, then one token per
step through the KV cache; samplers come from `engine.samplers` (llama.cpp semantics). It batches
continuously (`Batch`): requests join a running decode between steps and leave it when they finish.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tifaforge.chat.template import SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN, split_reasoning
from tifaforge.config import SamplingConfig
from tifaforge.errors import TifaError

FinishReason = Literal["stop", "length"]


@dataclass
class Request:
    """One prompt to continue: rendered text (or token ids), its sampling settings and stop strings."""

    prompt: str | list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: off; k >= 0: each token's log-probability and its k best rivals
    think_budget: int | None = None  # None: unlimited; N: past N think tokens `</think>` is forced (llama.cpp's
    # --reasoning-budget; 0 is the caller's to handle: it closes the block in the prompt)


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    reasoning: str | None
    content: str
    prompt_tokens: int
    logprobs: list[dict] | None = None  # per generated token (see Row.note), when the request asked

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Delta:
    """A streamed piece of request `index`'s text; the last one for a request has a finish reason.
    `tokens`: the tokens generated so far, stop token excluded (what the server reports as usage)."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    tokens: int | None = None
    logprobs: list[dict] | None = None  # the entries of the tokens generated since the last delta


class Row:
    """Decode state of one request: its ids, text so far, what was already streamed, its RNG."""

    def __init__(self, req: Request, prompt_ids: list[int], tokenizer, stop_ids: set[int]):
        import torch

        self.req, self.prompt_ids, self.tok = req, prompt_ids, tokenizer
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.prefix_at = self.read_at = 0  # incremental detokenisation window
        self.text = ""
        self.sent = 0
        self.finish: FinishReason | None = None
        self.logprobs: list[dict] | None = [] if req.logprobs is not None else None
        self.lp_sent = 0
        # The think block is tracked only for a reasoning budget (a decode and a lookup per token otherwise).
        self.in_think = req.think_budget is not None and _ends_in_think(tokenizer, prompt_ids)
        self.think_tokens = 0
        # Banned strings (see _back_off): the state after each token, to step back to; the tokens banned
        # at a position; how many tokens the last push took back (the batch drops them from its cache).
        self.banned = [s for s in req.sampling.banned_strings if s]
        self.marks: list[tuple[int, int, int, bool, int]] = []
        self.ends: list[int] = []  # the text's length after each token (the marks' third field)
        self.bans: dict[int, set[int]] = {}
        self.rewind = 0
        self.rewinds = 0
        seed = req.sampling.seed
        if seed is None:  # follows torch's global RNG, so torch.manual_seed still reproduces a run
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.gen = torch.Generator().manual_seed(seed)

    def push(self, token: int, budget_left: int) -> str:
        """Add a token; return the text that is now safe to stream."""
        if token in self.stop_ids:
            self.finish = "stop"
            self.text += self._detokenize(force=True)
            return self._flush(final=True)
        self.ids.append(token)
        if self.req.think_budget is not None:
            self.think_tokens += self.in_think
            self._track_think(token)
        checked = len(self.text)
        self.text += self._detokenize()
        if self.banned:
            hit = _first_stop(self.text, self.banned, start=checked)
            if hit is not None:
                return self._back_off(hit)
            self.marks.append((self.prefix_at, self.read_at, len(self.text), self.in_think, self.think_tokens))
            self.ends.append(len(self.text))
        cut = _first_stop(self.text, self.req.stop, start=checked)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
        elif len(self.ids) >= self.req.sampling.max_new_tokens or budget_left <= 0:
            self.finish = "length"
            self.text += self._detokenize(force=True)
        return self._flush(final=self.finish is not None)

    def _back_off(self, at: int) -> str:
        """A banned string begins at text[at]: take back the token where it began and every token
        since, ban that token at that position, and let the batch resample there (KoboldCpp's
        backtracking). Nothing taken back was streamed: `_flush` holds back from the start of the token
        where a banned string could be beginning. After MAX_REWINDS the answer ends before it."""
        ends = self.ends
        j = bisect.bisect_right(ends, at)  # tokens before j end at or before `at`: kept
        while j and ends[j - 1] == (ends[j - 2] if j > 1 else 0):
            j -= 1  # a token whose bytes were still withheld belongs to the character at `at`
        n = len(self.ids)
        self.bans.setdefault(j, set()).add(self.ids[j])
        del self.ids[j:], self.marks[j:], self.ends[j:]
        start = (0, 0, 0, self.req.think_budget is not None and _ends_in_think(self.tok, self.prompt_ids), 0)
        self.prefix_at, self.read_at, length, self.in_think, self.think_tokens = self.marks[j - 1] if j else start
        self.text = self.text[:length]
        if self.logprobs is not None:
            del self.logprobs[j:]
            self.lp_sent = min(self.lp_sent, j)
        self.rewinds += 1
        if self.rewinds > MAX_REWINDS:
            self.finish = "stop"
            return self._flush(final=True)
        self.rewind = n - j
        return ""

    def banned_here(self) -> set[int]:
        """Tokens banned at the next position (where a banned string began before)."""
        return self.bans.get(len(self.ids), set()) if self.bans else set()

    def _detokenize(self, force: bool = False) -> str:
        """New text for the last token, decoding only a short window (O(1) per step, as in TGI/vLLM).

        Byte-level BPE can split a character across tokens: until the window decodes without a
        trailing U+FFFD the text is withheld, so the joined text equals decoding all ids at once.
        """
        prefix = self.tok.decode(self.ids[self.prefix_at:self.read_at], skip_special_tokens=False)
        window = self.tok.decode(self.ids[self.prefix_at:], skip_special_tokens=False)
        stuck = len(self.ids) - self.read_at >= 4  # a UTF-8 character spans at most 4 byte tokens
        if len(window) > len(prefix) and (force or stuck or not window.endswith("\ufffd")):
            self.prefix_at, self.read_at = self.read_at, len(self.ids)
            return window[len(prefix):]
        return ""

    def _track_think(self, token: int) -> None:
        text = self.tok.convert_ids_to_tokens(token) if hasattr(self.tok, "convert_ids_to_tokens") else None
        if text == THINK_OPEN and len(self.ids) == 1:
            self.in_think = True
        elif text == THINK_CLOSE:
            self.in_think = False

    def must_close_think(self) -> bool:
        """Whether the next token must be `</think>`: the request's think budget is spent."""
        budget = self.req.think_budget
        return budget is not None and self.in_think and self.think_tokens >= budget

    def note(self, entry: dict) -> None:
        """One generated token's log-probability entry (OpenAI's chat shape: token, logprob, bytes,
        top_logprobs), taken from the scores after this request's samplers."""
        self.logprobs.append(entry)

    def new_logprobs(self) -> list[dict] | None:
        """The entries not yet sent with a delta (None when the request did not ask)."""
        if self.logprobs is None:
            return None
        out, self.lp_sent = self.logprobs[self.lp_sent:], len(self.logprobs)
        return out

    def _flush(self, final: bool) -> str:
        end = len(self.text) if final else _safe_end(self.text, [*self.req.stop, *self.banned])
        if self.banned and end < len(self.text):  # back to the start of the token a banned string may begin in
            i = bisect.bisect_right(self.ends, end)
            end = self.ends[i - 1] if i else 0
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def result(self) -> Result:
        started = _ends_in_think(self.tok, self.prompt_ids)
        reasoning, content = split_reasoning(self.text, started_in_think=started)
        return Result(self.text, self.ids, self.finish or "length", reasoning, content, len(self.prompt_ids),
                      self.logprobs)


MAX_REWINDS = 64  # banned-string step-backs per answer before it is ended instead


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Earliest stop string that ends after `start` (text before it was already checked)."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be streamed: not a dangling partial character, not a stop's prefix."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":  # byte-level BPE mid-character: wait for the rest
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


def _ends_in_think(tokenizer, prompt_ids: list[int]) -> bool:
    tail = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
    return tail.rstrip().endswith(THINK_OPEN)


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token holds: keys and values of every executed layer (a looped block's
    extra iterations have cache slots of their own), in the weights' dtype."""
    from tifaforge.models.looping import get_loop

    c = model.config
    layers = c.num_hidden_layers
    loop = get_loop(model)
    if loop is not None:
        layers += (loop.cfg.k - 1) * len(loop.block)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * layers * heads * head_dim * next(model.parameters()).element_size()


def free_memory_bytes(device) -> int:
    """What a KV cache may take by default: 90% of the GPU's free memory once the weights are loaded,
    or half of the machine's available RAM on CPU (the rest is the process's and the system's)."""
    import torch

    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(device)[0] * 0.9)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return avail // 2


class Engine:
    """Batched, streaming generation over a transformers causal LM (CPU or GPU)."""

    continuous_batching = True  # `Batch` can run it: requests join and leave a running decode
    supports_logprobs = True  # Batch notes them; the llama.cpp and vLLM backends decode their own way
    supports_think_budget = True  # Batch forces </think>; the same two backends do not yet

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self._byte_map: dict | None = None  # token_text's byte-level alphabet, made on first use
        self._token_texts: dict[int, dict] = {}
        close = tokenizer.convert_tokens_to_ids(THINK_CLOSE) if THINK_CLOSE in tokenizer.get_vocab() else None
        self.think_close_id = close  # None: no think tokens, so a think budget cannot apply
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        self.stop_ids = self._default_stop_ids()
        self.prefix_cache = None  # engine.prefix_cache.PrefixCache, when enabled (tifa serve, tifa chat)

    @classmethod
    def load(cls, path, prefix_cache_mb: float = 0, **kwargs) -> Engine:
        from tifaforge.models.load import load_model

        engine = cls(*load_model(path, **kwargs))
        engine.enable_prefix_cache(prefix_cache_mb)
        return engine

    def enable_prefix_cache(self, mb: float) -> None:
        """Reuse the KV of recent requests (engine/prefix_cache.py), up to `mb` MiB; 0 turns it off. A
        model whose cache cannot be cut and padded (sliding-window layers) keeps it off."""
        from tifaforge.engine.prefix_cache import PrefixCache

        self.prefix_cache = PrefixCache(int(mb * 2**20)) if mb > 0 and _paddable(_new_cache(self.model)) else None

    def weights_changed(self) -> None:
        """Call after changing the model's weights in place: kept KV is stale."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def _default_stop_ids(self) -> set[int]:
        """End of sentence plus the template's role tags: a model never writes the next turn's tag."""
        vocab = self.tokenizer.get_vocab()
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        eos = getattr(self._generation_config(), "eos_token_id", None)
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for tags in SPECIAL_TOKENS.values():
            ids |= {vocab[tags[k]] for k in ("eos", "user", "assistant") if tags[k] in vocab}
        if "<|endoftext|>" in vocab:  # the CPT document separator: a document ended
            ids.add(vocab["<|endoftext|>"])
        return ids

    def _generation_config(self):
        return self.model.generation_config

    def token_text(self, token: int) -> dict:
        """{"token": its text, "bytes": its UTF-8 bytes} as OpenAI's logprobs give them: a byte-level
        BPE token that holds part of a character has no text of its own, so `bytes` is the truth.
        Remembered per token: logprobs ask for a few per row at every step."""
        if (known := self._token_texts.get(token)) is not None:
            return known
        if self._byte_map is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
                from transformers.convert_slow_tokenizer import bytes_to_unicode

                self._byte_map = {c: b for b, c in bytes_to_unicode().items()}
            else:
                self._byte_map = {}
        added = self.tokenizer.added_tokens_decoder.get(token) if hasattr(self.tokenizer, "added_tokens_decoder") else None
        if self._byte_map and added is None:
            raw = bytes(self._byte_map.get(c, 0) for c in self.tokenizer.convert_ids_to_tokens(token))
        else:
            raw = self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
        known = self._token_texts[token] = {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}
        return known

    # -- public API ----------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from tifaforge.chat.template import render

        return render(messages, self.tokenizer, add_generation_prompt=add_generation_prompt)

    def chat(self, messages: list[dict], sampling: SamplingConfig | None = None, stop: Sequence[str] = ()) -> Result:
        """One answer to `messages` (self-revision is a caller of this: `rl.revise.answer_revised`)."""
        sampling = sampling or SamplingConfig()
        return self.generate([Request(self.render(messages), sampling, stop)])[0]

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        rows = self._rows(requests)
        for _ in self._decode(rows):
            pass
        return [r.result() for r in rows]

    def stream(self, requests: Sequence[Request]) -> Iterator[Delta]:
        """Deltas as tokens arrive. Closing the iterator stops generation (e.g. a client left)."""
        rows = self._rows(requests)
        yield from self._decode(rows)

    # -- internals -----------------------------------------------------------------------------

    def _rows(self, requests: Sequence[Request]) -> list[Row]:
        if not requests:
            raise TifaError("no requests to generate")
        rows = []
        for i, req in enumerate(requests):
            ids = self._prompt_ids(req, i)
            rows.append(Row(req, ids, self.tokenizer, self.stop_ids))
        return rows

    def _prompt_ids(self, req: Request, i: int) -> list[int]:
        s = req.sampling
        if isinstance(req.prompt, str):
            ids = self.tokenizer(req.prompt, add_special_tokens=False).input_ids
        else:
            ids = list(req.prompt)
        if not ids:
            raise TifaError(f"request {i}: empty prompt")
        if not isinstance(s.max_new_tokens, int) or s.max_new_tokens <= 0:
            raise TifaError(f"request {i}: max_new_tokens must be a positive integer, got {s.max_new_tokens!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            v = getattr(s, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TifaError(f"request {i}: sampling.{name} must be a finite number, got {v!r}")
        if len(ids) >= self.context:
            raise TifaError(f"request {i}: prompt of {len(ids)} tokens does not fit the model's context of {self.context}")
        if req.think_budget is not None and self.think_close_id is None:
            raise TifaError(f"request {i}: a reasoning budget needs a model with {THINK_CLOSE} as a token")
        return ids

    def _decode(self, rows: list[Row]) -> Iterator[Delta]:
        batch = Batch(self)
        batch.join(rows)
        while batch:
            yield from batch.step()


class Batch:
    """A decode that requests join between steps and leave the moment they finish (continuous batching).

        batch = Batch(engine)
        batch.add(requests)
        while batch:
            deltas = batch.step()  # batch.add(...) and batch.cancel(...) may come between steps

    The server's worker keeps one running, so a request that arrives mid-decode starts at the next step
    instead of waiting for the whole batch; `Engine.stream` is a batch that nobody joins.

    Rows share one forward pass per step over one KV cache, right-aligned. Rows that join are prefilled
    together into a cache of their own, which is then left-padded to the running cache's width (or that
    one to theirs) and stacked under it. Padding is masked and positions are per row, so a row's tokens
    do not depend on what it is batched with (up to float rounding across padded shapes, as in any
    left-padded batch). A finished or cancelled row leaves the cache at once, and columns that only the
    rows that left were using are cut. A cache with sliding-window layers cannot be padded or cut that
    way: there, rows that arrive wait until the running ones have finished.
    """

    def __init__(self, engine: Engine):
        tok = engine.tokenizer
        self.engine, self.pad = engine, tok.pad_token_id if tok.pad_token_id is not None else 0
        self.waiting: list[tuple[int, Row]] = []  # (index, row) joining at the next step
        self.live: list[Row] = []  # decoding, in cache order
        self.index: list[int] = []  # each live row's delta index
        self.cohorts: list[_Cohort] = []
        self.cache = self.mask = self.pos = self.last = None  # KV cache, (B, T) mask, (B,) next position, (B,) last token
        self._scores = None  # the last step's scores after the samplers (B, V)
        self.added = 0

    def __len__(self) -> int:
        """Rows waiting or decoding."""
        return len(self.waiting) + len(self.live)

    def add(self, requests: Sequence[Request]) -> list[int]:
        """Validate `requests` and queue them to join at the next step; returns their delta indices."""
        return self.join(self.engine._rows(requests))

    def join(self, rows: list[Row]) -> list[int]:
        """`add` for rows already built (and validated) by `Engine._rows`."""
        indices = list(range(self.added, self.added + len(rows)))
        self.added += len(rows)
        self.waiting += zip(indices, rows)
        return indices

    def cancel(self, indices: Iterable[int]) -> None:
        """Drop these rows now (their client left): no more deltas, no more compute."""
        gone = set(indices)
        self.waiting = [(i, r) for i, r in self.waiting if i not in gone]
        self._keep([s for s, i in enumerate(self.index) if i not in gone])

    def step(self) -> list[Delta]:
        """One token for every live row; waiting rows are prefilled and join in this step where they can."""
        import torch

        with torch.inference_mode():
            logits = [self._forward()] if self.live else []
            if self.waiting and (self.cache is None or _paddable(self.cache)):
                logits.append(self._prefill())
            self.last = self._sample(torch.cat(logits))
            self._note_logprobs()
        deltas = []
        for slot, (r, token) in enumerate(zip(self.live, self.last.tolist())):
            piece = r.push(token, self.engine.context - len(r.prompt_ids) - len(r.ids) - 1)
            if r.rewind and not r.finish:
                self._rewind(slot, r)
            if piece or r.finish:
                deltas.append(Delta(self.index[slot], piece, r.finish, len(r.ids), r.new_logprobs()))
        self._keep([s for s, r in enumerate(self.live) if r.finish is None])
        return deltas

    def _rewind(self, slot: int, r: Row) -> None:
        """Row `r` took back its last `r.rewind` tokens (a banned string): the cache forgets them (their
        columns masked for this row; the other rows are untouched) and the token before them is fed
        again at its own position, so the next logits are those at the position to resample."""
        import torch

        drop, r.rewind = r.rewind, 0
        again = r.ids[-1] if r.ids else r.prompt_ids[-1]
        with torch.inference_mode():  # the batch's tensors were made there
            fed = self.mask[slot].nonzero()[:, 0]  # this row's columns: prompt and fed tokens, in order
            self.mask[slot, fed[-drop:]] = 0
            self.last[slot] = again
            self.pos[slot] = len(r.prompt_ids) + len(r.ids) - 1
            for c in self.cohorts:  # the samplers' history: the taken-back tokens become one already there
                if r in c.rows:
                    c.ids[c.rows.index(r), c.ids.shape[1] - drop:] = again

    def _remember(self, slot: int) -> None:
        """The leaving row's KV (its fed tokens: the columns its mask keeps) into the prefix cache."""
        import torch

        r = self.live[slot]
        with torch.inference_mode():
            cols = self.mask[slot].nonzero()[:, 0]
            layers = [(layer.keys[slot:slot + 1].index_select(-2, cols),  # index_select copies: the batch
                       layer.values[slot:slot + 1].index_select(-2, cols)) for layer in self.cache.layers]  # moves on
        self.engine.prefix_cache.store(tuple(r.prompt_ids + r.ids)[:len(cols)], layers)

    def _note_logprobs(self) -> None:
        """Log-probabilities of the tokens just picked, and each request's k best, for the rows that
        asked: log-softmax of the scores after their samplers (a token a sampler removed has none).
        One batched log-softmax over those rows; a stop token gets no entry (it is not in the text)."""
        import torch

        slots = [s for s, r in enumerate(self.live) if r.logprobs is not None and int(self.last[s]) not in r.stop_ids]
        if not slots:
            return
        index = torch.tensor(slots, device=self._scores.device)
        lp = torch.log_softmax(self._scores.index_select(0, index).float(), dim=-1)
        chosen = lp.gather(1, self.last.index_select(0, index)[:, None])[:, 0].tolist()
        k = max(self.live[s].req.logprobs for s in slots)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        spell, last = self.engine.token_text, self.last.tolist()
        top_i, top_v = top_i.tolist(), top_v.tolist()
        for j, s in enumerate(slots):
            r = self.live[s]
            k = r.req.logprobs
            rivals = [{**spell(t), "logprob": v} for t, v in zip(top_i[j][:k], top_v[j][:k]) if v > -math.inf]
            lp_chosen = chosen[j] if math.isfinite(chosen[j]) else -9999.0  # a forced token the samplers had removed
            r.note({**spell(last[s]), "logprob": lp_chosen, "top_logprobs": rivals})

    def _forward(self):
        """The live rows' last tokens through the cache: logits (B, V)."""
        import torch

        mask = torch.cat([self.mask, self.mask.new_ones(len(self.live), 1)], dim=1)  # (B, T+1)
        out = self.engine.model(input_ids=self.last[:, None], attention_mask=mask, position_ids=self.pos[:, None],
                                cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache, self.mask, self.pos = out.cache, mask, self.pos + 1
        return out.logits[:, -1, :].float()

    def _prefill(self):
        """The waiting rows' prompts, left-padded together into a new cache that is stacked under the
        running one: their first logits (b, V)."""
        import torch

        model, device = self.engine.model, self.engine.model.device
        cohorts = _by_settings(self.waiting)
        self.waiting = []
        index, rows = zip(*(entry for cohort in cohorts for entry in cohort))
        lengths = torch.tensor([len(r.prompt_ids) for r in rows], device=device)
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).long()  # (b, P)
        # A prompt that several rows share (MGRPO's group of G answers, a request's n choices) is prefilled
        # once; its KV cache and first logits are then copied to each of its rows.
        first: dict[tuple[int, ...], int] = {}
        which = [first.setdefault(tuple(r.prompt_ids), len(first)) for r in rows]  # row -> its unique prompt
        pc = self.engine.prefix_cache
        hits = [pc.lookup(p) for p in first] if pc is not None and pc.entries else []
        shared = None if any(hits) else _shared_prefixes(list(first), model)
        if any(hits):  # prompts that open as a recent request did: only the rest is prefilled
            cache, logits, umask = _prefill_cached(model, list(first), hits, self.pad)
            mask = umask.index_select(0, torch.tensor(which, device=device))
        elif shared is not None:  # distinct prompts that open alike (MGRPO's revision prompts): see _prefill_shared
            cache, logits, umask = _prefill_shared(model, list(first), *shared, self.pad)
            mask = umask.index_select(0, torch.tensor(which, device=device))
        else:
            uids, umask = ids, mask
            if len(first) < len(rows):
                reps = torch.tensor([which.index(u) for u in range(len(first))], device=device)  # a row of each
                uids, umask = ids.index_select(0, reps), mask.index_select(0, reps)
            out = model(input_ids=uids, attention_mask=umask, position_ids=(umask.cumsum(-1) - 1).clamp(min=0),
                        cache=_new_cache(model), use_cache=True, logits_to_keep=1)
            cache, logits = out.cache, out.logits[:, -1, :]
        if len(first) < len(rows):
            spread = torch.tensor(which, device=device)
            cache.batch_select_indices(spread)
            logits = logits.index_select(0, spread)
        self._stack(cache, mask)
        self.pos = lengths if self.pos is None else torch.cat([self.pos, lengths])
        self.live += rows
        self.index += index
        at, running = 0, {c.key: c for c in self.cohorts}
        for cohort in cohorts:
            joining, prompts = [r for _, r in cohort], ids[at:at + len(cohort)]
            at += len(cohort)
            key = _settings_key(joining[0])
            if key in running:  # same settings as running rows: one chain for all of them
                running[key].join(joining, prompts)
            else:
                self.cohorts.append(_Cohort(key, joining, prompts, self.engine.tokenizer))
        return logits.float()

    def _stack(self, cache, mask) -> None:
        """Put the joining rows' cache under the running rows', left-padding the narrower of the two."""
        import torch

        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for run, new in zip(self.cache.layers, cache.layers):  # (B, H, T, D) each
            run.keys = torch.cat([_pad_left(run.keys, width, -2), _pad_left(new.keys, width, -2)])
            run.values = torch.cat([_pad_left(run.values, width, -2), _pad_left(new.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])

    def _keep(self, slots: list[int]) -> None:
        """Keep only these live rows, and cut the columns that none of them uses."""
        import torch

        if len(slots) == len(self.live):
            return
        if self.engine.prefix_cache is not None and self.cache is not None and _paddable(self.cache):
            kept = set(slots)
            for s in range(len(self.live)):
                if s not in kept:
                    self._remember(s)
        self.live, self.index = [self.live[s] for s in slots], [self.index[s] for s in slots]
        live = set(self.live)
        self.cohorts = [c for c in self.cohorts if not live.isdisjoint(c.rows)]
        for c in self.cohorts:
            c.keep(live)
        if not slots:
            self.cache = self.mask = self.pos = self.last = None
            return
        keep = torch.tensor(slots, device=self.mask.device)
        self.cache.batch_select_indices(keep)
        self.mask, self.pos, self.last = self.mask[keep], self.pos[keep], self.last[keep]
        if _paddable(self.cache):
            start = int(self.mask.any(0).int().argmax())  # the first column a kept row uses
            if start:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
                self.mask = self.mask[:, start:]

    def _sample(self, logits):
        """Each cohort's processors over its rows' scores, then every live row's pick: (B,) next tokens."""
        import torch

        for s, r in enumerate(self.live):
            if banned := r.banned_here():  # where a banned string began: the samplers choose among the rest
                logits[s, list(banned)] = -math.inf
        slot_of = {id(r): s for s, r in enumerate(self.live)}
        slots = [[slot_of[id(r)] for r in c.rows] for c in self.cohorts]
        if slots == [list(range(len(self.live)))]:  # one cohort, in cache order: no gather
            scores = self.cohorts[0].procs(self.cohorts[0].ids, logits)
            orders = [None]
        else:
            scores = torch.empty_like(logits)
            orders = [torch.tensor(o, device=logits.device) for o in slots]
            for c, order in zip(self.cohorts, orders):
                scores.index_copy_(0, order, c.procs(c.ids, logits.index_select(0, order)))
        nxt = _pick(self.live, scores)
        close = [s for s, r in enumerate(self.live) if r.must_close_think()]
        if close:  # the reasoning budget: the block is closed for the model, which then answers
            nxt[close] = self.engine.think_close_id
        self._scores = scores  # for _note_logprobs
        for c, order in zip(self.cohorts, orders):
            c.ids = torch.cat([c.ids, (nxt if order is None else nxt.index_select(0, order))[:, None]], dim=1)
        return nxt


class _Cohort:
    """Live rows with the same sampling settings (seeds aside): one processor chain, applied batched,
    whenever they joined. `ids` holds each row's prompt and every token since, left-padded; the chain's
    `Layout` says where each row's tokens and its generated tokens start, so rows that joined a
    running cohort at a later step share its chain. When rows join or leave, the chain is rebuilt
    (its state, e.g. DRY's match lengths, is then measured afresh at the next call). A burst of
    requests reaches the server's worker over a few steps; one chain per burst instead of one per
    step kept the batch's sampling cost that of a batch the engine got at once."""

    def __init__(self, key: str, rows: list[Row], prompts, tokenizer):
        import torch

        self.key, self.tokenizer, self.rows, self.ids = key, tokenizer, list(rows), prompts
        width = prompts.shape[1]
        self.pads = torch.tensor([width - len(r.prompt_ids) for r in rows], device=prompts.device)
        self.starts = torch.full_like(self.pads, width)
        self._build()

    def join(self, rows: list[Row], prompts) -> None:
        """Add rows whose prompts (left-padded together) were just prefilled."""
        import torch

        width = max(self.ids.shape[1], prompts.shape[1])
        grow = width - self.ids.shape[1]
        pads = torch.tensor([width - len(r.prompt_ids) for r in rows], device=prompts.device)
        self.ids = torch.cat([_pad_left(self.ids, width, -1), _pad_left(prompts, width, -1)])
        self.pads = torch.cat([self.pads + grow, pads])
        self.starts = torch.cat([self.starts + grow, torch.full_like(pads, width)])
        self.rows += rows
        self._build()

    def keep(self, live: set) -> None:
        """Drop the rows that are no longer live, and the padding columns no kept row needs."""
        import torch

        kept = [j for j, r in enumerate(self.rows) if r in live]
        if len(kept) == len(self.rows):
            return
        sel = torch.tensor(kept, device=self.ids.device)
        self.rows = [self.rows[j] for j in kept]
        self.pads, self.starts = self.pads[sel], self.starts[sel]
        cut = int(self.pads.min())
        self.ids, self.pads, self.starts = self.ids[sel, cut:], self.pads - cut, self.starts - cut
        self._build()

    def _build(self) -> None:
        from tifaforge.engine.samplers import Layout, build_logits_processors

        self.procs = build_logits_processors(self.rows[0].req.sampling, self.tokenizer,
                                             generator=[r.gen for r in self.rows],
                                             layout=Layout.fixed(self.pads, self.starts), stop_ids=self.rows[0].stop_ids)


def _settings_key(row: Row) -> str:
    return repr(dataclasses.replace(row.req.sampling, seed=None, max_new_tokens=1))


def _by_settings(entries: list[tuple[int, Row]]) -> list[list[tuple[int, Row]]]:
    """(index, row) pairs split by sampling settings, in order; seeds aside (each row has its own)."""
    groups: dict[str, list[tuple[int, Row]]] = {}
    for i, r in entries:
        groups.setdefault(_settings_key(r), []).append((i, r))
    return list(groups.values())


SHARED_MIN = 32  # tokens two distinct prompts must open alike for their common part to be prefilled once


def _shared_prefixes(prompts: list[tuple[int, ...]], model):
    """(group of each prompt, shared length of each group) when every prompt shares at least SHARED_MIN
    opening tokens with another (each keeping at least one token of its own), else None. MGRPO's
    revision prompts are the original conversation, then a first answer and the rules' note: the G
    revisions of one prompt share the whole conversation."""
    if len(prompts) < 2:
        return None
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    groups: list[list[int]] = []
    lcps: list[int] = []
    for i in order:  # sorted: prompts with a long common prefix are neighbours
        if groups:
            a = prompts[groups[-1][0]]
            n = min(lcps[-1], len(prompts[i]) - 1, len(a) - 1)
            k = next((j for j in range(n) if a[j] != prompts[i][j]), n)
            if k >= SHARED_MIN:
                groups[-1].append(i)
                lcps[-1] = k
                continue
        groups.append([i])
        lcps.append(len(prompts[i]))
    if any(len(g) < 2 for g in groups) or not _paddable(_new_cache(model)):
        return None
    group_of = [0] * len(prompts)
    for g, members in enumerate(groups):
        for i in members:
            group_of[i] = g
    return group_of, lcps


def _prefill_shared(model, prompts: list[tuple[int, ...]], group_of: list[int], lcps: list[int], pad: int):
    """Prefill each group's common opening once, copy its cache to the group's prompts, then prefill
    every prompt's own rest on top: (cache, first logits (n, V), mask (n, W)). The mask has padding
    between a short opening and the rest (positions follow the mask, so each row attends and is placed
    as if prefilled whole; only float rounding differs from one pass)."""
    import torch

    device = model.device

    def left_padded(seqs):
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(q)) + list(q) for q in seqs], device=device)
        lengths = torch.tensor([len(q) for q in seqs], device=device)
        return ids, (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).long()

    heads, head_mask = left_padded([prompts[next(i for i, g in enumerate(group_of) if g == k)][:n]
                                    for k, n in enumerate(lcps)])
    out = model(input_ids=heads, attention_mask=head_mask, position_ids=(head_mask.cumsum(-1) - 1).clamp(min=0),
                cache=_new_cache(model), use_cache=True, logits_to_keep=1)
    spread = torch.tensor(group_of, device=device)
    cache = out.cache
    cache.batch_select_indices(spread)
    tails, tail_mask = left_padded([q[lcps[g]:] for q, g in zip(prompts, group_of)])
    mask = torch.cat([head_mask.index_select(0, spread), tail_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -tails.shape[1]:]
    out = model(input_ids=tails, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out.cache, out.logits[:, -1, :], mask


def _prefill_cached(model, prompts: list[tuple[int, ...]], hits: list, pad: int):
    """Each prompt's kept opening (a prefix-cache hit: n tokens and their KV, or None) left-padded into
    one cache, then each prompt's rest prefilled on top: (cache, first logits (n, V), mask (n, W)), as
    `_prefill_shared` does with an opening it computed itself."""
    import torch
    from transformers.cache_utils import DynamicLayer

    device = model.device
    lens = [h[0] if h else 0 for h in hits]
    width = max(lens)
    ref = next(h[1] for h in hits if h)
    cache = _new_cache(model)
    for i, (k0, v0) in enumerate(ref):
        if len(hits) == 1:  # one prompt (a chat's next turn): its kept KV as it is, copied once by update
            keys, values = k0.to(device), v0.to(device)
        else:
            keys = torch.cat([_pad_left((h[1][i][0] if h else k0[..., :0, :]).to(device), width, -2) for h in hits])
            values = torch.cat([_pad_left((h[1][i][1] if h else v0[..., :0, :]).to(device), width, -2) for h in hits])
        while i >= len(cache.layers):
            cache.layers.append(DynamicLayer())
        cache.layers[i].update(keys, values)
    lengths = torch.tensor(lens, device=device)
    head_mask = (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).long()
    rest = [q[n:] for q, n in zip(prompts, lens)]
    tail_w = max(map(len, rest))
    tails = torch.tensor([[pad] * (tail_w - len(q)) + list(q) for q in rest], device=device)
    tail_mask = (torch.arange(tail_w, device=device)[None, :] >= (tail_w - torch.tensor([len(q) for q in rest],
                                                                                         device=device))[:, None]).long()
    mask = torch.cat([head_mask, tail_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -tail_w:]
    out = model(input_ids=tails, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out.cache, out.logits[:, -1, :], mask


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _paddable(cache) -> bool:
    """Full-attention layers only: their columns can be padded and cut (a sliding window's cannot)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_left(x, width: int, dim: int):
    """`x` with zeros before its first column along `dim` (-1 or -2), `width` columns in all."""
    import torch.nn.functional as F

    return F.pad(x, [0, 0] * (-dim - 1) + [width - x.shape[dim], 0])


def _pick(rows: list[Row], scores):
    """Greedy or sampled next token per row; each row draws from its own generator (its seed).

    Sampling is the exponential race (argmax of p / E with E ~ Exp(1)), exact for the categorical
    distribution and batched apart from the per-row noise draw; a per-row `torch.multinomial` with
    its own generator cost more than the tiny model's forward pass.
    """
    import torch

    greedy = scores.argmax(dim=-1)  # (b,)
    sampled = [j for j, r in enumerate(rows) if r.req.sampling.do_sample]
    if not sampled:
        return greedy
    probs = torch.softmax(scores[sampled], dim=-1)  # (s, V)
    # uniform draws per row (own generator), then one batched -log: torch's exponential_ is slow on CPU
    u = torch.stack([torch.rand(scores.shape[-1], generator=rows[j].gen) for j in sampled])
    noise = -torch.log(u.clamp_min(1e-20))  # (s, V) ~ Exp(1)
    greedy[sampled] = (probs / noise.to(probs.device)).argmax(dim=-1)
    return greedy

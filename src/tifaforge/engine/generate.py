"""The ONE generation path: chat, the server, MGRPO rollouts, pair mining and eval all call `Engine`.

    tifa chat models/tiny --once "你好"

Why our own decode loop instead of `model.generate`: per-request sampling settings and seeds inside
one batch, stop strings cut exactly, streaming deltas that never split a UTF-8 character or leak
the start of a stop string, and cancellation by simply closing the stream (the server's client
disconnect). The loop is the standard one: left-padded prompts, one prefill, then one token per
step through the KV cache; samplers come from `engine.samplers` (llama.cpp semantics).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tifaforge.chat.template import SPECIAL_TOKENS, THINK_OPEN, split_reasoning
from tifaforge.config import SamplingConfig
from tifaforge.errors import TifaError

FinishReason = Literal["stop", "length"]


@dataclass
class Request:
    """One prompt to continue: rendered text (or token ids), its sampling settings and stop strings."""

    prompt: str | list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: Sequence[str] = ()


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    reasoning: str | None
    content: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Delta:
    """A streamed piece of request `index`'s text; the last one for a request has a finish reason."""

    index: int
    text: str
    finish_reason: FinishReason | None = None


class _Row:
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
        checked = len(self.text)
        self.text += self._detokenize()
        cut = _first_stop(self.text, self.req.stop, start=checked)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
        elif len(self.ids) >= self.req.sampling.max_new_tokens or budget_left <= 0:
            self.finish = "length"
            self.text += self._detokenize(force=True)
        return self._flush(final=self.finish is not None)

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

    def _flush(self, final: bool) -> str:
        end = len(self.text) if final else _safe_end(self.text, self.req.stop)
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def result(self) -> Result:
        started = _ends_in_think(self.tok, self.prompt_ids)
        reasoning, content = split_reasoning(self.text, started_in_think=started)
        return Result(self.text, self.ids, self.finish or "length", reasoning, content, len(self.prompt_ids))


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


class Engine:
    """Batched, streaming generation over a transformers causal LM (CPU or GPU)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
        self.stop_ids = self._default_stop_ids()

    @classmethod
    def load(cls, path, **kwargs) -> Engine:
        from tifaforge.models.load import load_model

        return cls(*load_model(path, **kwargs))

    def _default_stop_ids(self) -> set[int]:
        """End of sentence plus the template's role tags: a model never writes the next turn's tag."""
        vocab = self.tokenizer.get_vocab()
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for tags in SPECIAL_TOKENS.values():
            ids |= {vocab[tags[k]] for k in ("eos", "user", "assistant") if tags[k] in vocab}
        if "<|endoftext|>" in vocab:  # the CPT document separator: a document ended
            ids.add(vocab["<|endoftext|>"])
        return ids

    # -- public API ----------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from tifaforge.chat.template import render

        return render(messages, self.tokenizer, add_generation_prompt=add_generation_prompt)

    def chat(self, messages: list[dict], sampling: SamplingConfig | None = None, stop: Sequence[str] = ()) -> Result:
        return self.generate([Request(self.render(messages), sampling or SamplingConfig(), stop)])[0]

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

    def _rows(self, requests: Sequence[Request]) -> list[_Row]:
        if not requests:
            raise TifaError("no requests to generate")
        rows = []
        for i, req in enumerate(requests):
            ids = self._prompt_ids(req, i)
            rows.append(_Row(req, ids, self.tokenizer, self.stop_ids))
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
        return ids

    def _decode(self, rows: list[_Row]) -> Iterator[Delta]:
        import torch

        from tifaforge.engine.samplers import build_logits_processors

        model, device = self.model, self.model.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lengths = [len(r.prompt_ids) for r in rows]
        width = max(lengths)
        ids = torch.tensor([[pad] * (width - n) + r.prompt_ids for r, n in zip(rows, lengths)], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= torch.tensor([width - n for n in lengths], device=device)[:, None]).long()
        groups = self._groups(rows, lengths, build_logits_processors)
        budget = self.context - width
        cache = _new_cache(model)
        step_input, positions = ids, (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            while True:
                out = model(input_ids=step_input, attention_mask=mask, position_ids=positions,
                            cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
                logits = out.logits[:, -1, :].float()  # (B, V)
                nxt = torch.full((len(rows),), pad, dtype=torch.long, device=device)
                for idx, procs in groups:
                    nxt[idx] = _pick(rows, idx, procs(ids[idx], logits[idx]))
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                budget -= 1
                for i, r in enumerate(rows):
                    if r.finish is None:
                        piece = r.push(int(nxt[i]), budget)
                        if piece or r.finish:
                            yield Delta(i, piece, r.finish)
                if all(r.finish for r in rows):
                    return
                done = torch.tensor([r.finish is not None for r in rows], device=device)
                mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
                positions = positions[:, -1:] + 1
                step_input = nxt[:, None]

    def _groups(self, rows: list[_Row], lengths: list[int], build):
        """Rows with equal sampling settings share one processor chain (applied batched)."""
        import torch

        by_cfg: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            key = repr(dataclasses.replace(r.req.sampling, seed=None, max_new_tokens=1))
            by_cfg.setdefault(key, []).append(i)
        groups = []
        for idx in by_cfg.values():
            cfg = rows[idx[0]].req.sampling
            procs = build(cfg, self.tokenizer, prompt_lengths=[lengths[i] for i in idx], generator=rows[idx[0]].gen)
            groups.append((torch.tensor(idx, device=self.model.device), procs))
        return groups


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _pick(rows: list[_Row], idx, scores):
    """Greedy or sampled next token per row; each row draws from its own generator (its seed).

    Sampling is the exponential race (argmax of p / E with E ~ Exp(1)), exact for the categorical
    distribution and batched apart from the per-row noise draw; a per-row `torch.multinomial` with
    its own generator cost more than the tiny model's forward pass.
    """
    import torch

    greedy = scores.argmax(dim=-1)  # (b,)
    rows_idx = idx.tolist()
    sampled = [j for j, i in enumerate(rows_idx) if rows[i].req.sampling.do_sample]
    if not sampled:
        return greedy
    probs = torch.softmax(scores[sampled], dim=-1)  # (s, V)
    # uniform draws per row (own generator), then one batched -log: torch's exponential_ is slow on CPU
    u = torch.stack([torch.rand(scores.shape[-1], generator=rows[rows_idx[j]].gen) for j in sampled])
    noise = -torch.log(u.clamp_min(1e-20))  # (s, V) ~ Exp(1)
    greedy[sampled] = (probs / noise.to(probs.device)).argmax(dim=-1)
    return greedy

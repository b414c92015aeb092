"""The engine's llama.cpp backend: the same `generate`/`stream` interface as `Engine`, over a GGUF file.

    python -c "from tifaforge.engine.llamacpp import LlamaCppEngine as E; e = E.load('tiny-q8_0.gguf'); print(e.chat([{'role': 'user', 'content': '你好'}]).content); e.close()"

It subclasses `engine.generate.Engine`, so validation, `Request`/`Result`/`Delta`, stop tokens (end of
sentence and the template's role tags), stop strings cut exactly, streaming that never splits a
character or leaks a stop's prefix, and the reasoning/content split come from that one code path.
Only the decode loop is llama.cpp's: its forward pass, its tokenizer (checked equal to ours in
tests/test_gguf.py), and its sampler chain, built from `SamplingConfig` in the order and with the
semantics `engine.samplers` documents:

    penalties (repetition, then presence/frequency) -> DRY -> top_k -> top_p -> min_p -> XTC -> temperature -> dist
    (greedy, do_sample false: penalties -> DRY -> greedy)

Mapped as the transformers backend means them: the repetition penalty and DRY see the whole context,
prompt included (penalty_last_n = the context), presence/frequency only generated tokens (a second
penalties sampler that never saw the prompt); a setting that is off adds no sampler.

Departures from the transformers backend:
1. Requests run one after another (llama-cpp-python holds one sequence), so `stream` yields each
   request's deltas in turn rather than interleaved, and `tifa serve --backend llamacpp` answers one
   request at a time (`continuous_batching` is False: the server's worker runs jobs in turn).
2. The KV cache of the previous call is reused when a new prompt starts with it (chat turns).
3. Random draws come from llama.cpp's generator, seeded from the request's seed: sampled text differs
   from the transformers backend's; greedy text is the same where the two models' logits agree.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from tifaforge.chat.template import SPECIAL_TOKENS
from tifaforge.engine.generate import Delta, Engine, Row
from tifaforge.errors import TifaError


class LlamaTokenizer:
    """The slice of a transformers tokenizer the engine and chat use, answered by llama.cpp's vocab."""

    def __init__(self, llm, chat_template: str | None):
        self.llm, self.chat_template = llm, chat_template
        self.bos_token_id, self.eos_token_id = _real_id(llm.token_bos()), _real_id(llm.token_eos())
        self.pad_token_id = self.eos_token_id
        self.bos_token = self.decode([self.bos_token_id]) if self.bos_token_id is not None else ""
        self.eos_token = self.decode([self.eos_token_id]) if self.eos_token_id is not None else ""

    def __call__(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> SimpleNamespace:
        """`split_special_tokens`: special tokens' texts are plain text (message contents in the server)."""
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=not split_special_tokens)
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        # A window ending mid-character decodes to U+FFFD, as transformers' does: the engine waits on it.
        ids = list(ids)
        text = b"".join(self._piece(i, not skip_special_tokens) for i in ids)
        if ids and ids[0] == self.llm.token_bos() and text.startswith(b" "):  # as Llama.detokenize does
            text = text[1:]
        return text.decode("utf-8", errors="replace")

    def _piece(self, token: int, special: bool) -> bytes:
        """One token's bytes. Not `Llama.detokenize`: its 32-byte buffer returns nothing for a longer
        token (llama.cpp answers a short buffer with the size it needs, negated), so we retry with that."""
        import llama_cpp

        vocab, size = llama_cpp.llama_model_get_vocab(self.llm.model), 64
        while True:
            buf = (ctypes.c_char * size)()
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
            if n >= 0:
                return bytes(buf[:n])
            size = -n

    def token_id(self, text: str) -> int | None:
        """The id of `text` if it is one token of the vocabulary, else None."""
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else None

    def __len__(self) -> int:
        return self.llm.n_vocab()

    def apply_chat_template(self, messages, tools=None, chat_template=None, add_generation_prompt=False,
                            tokenize=False, **kwargs) -> str:
        """The file's template in transformers' sandboxed Jinja, exactly as `chat.template.render`."""
        from transformers.utils.chat_template_utils import render_jinja_template

        template = chat_template or self.chat_template
        if not template:
            raise TifaError("this GGUF file has no chat template (tokenizer.chat_template)")
        rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)
        return rendered[0]


def _real_id(token: int) -> int | None:
    return token if token is not None and token >= 0 else None


class LlamaCppEngine(Engine):
    """`Engine` over a GGUF file through llama-cpp-python. Close it (`close()` or `with`) when done."""

    continuous_batching = False  # one sequence at a time: the server runs its requests in turn
    supports_logprobs = False  # llama.cpp's sampler chain does not hand back its candidates
    supports_think_budget = False  # the server names a reasoning budget as not honoured
    unsupported_sampling = ("typical_p", "top_n_sigma", "min_tokens", "ignore_eos", "logit_bias",
                            "repetition_penalty_range", "banned_strings")  # named in X-Tifa-Ignored when a request sets them

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None,
                 kv_f32: bool = False):
        """`kv_f32`: keep the KV cache in float32 instead of llama.cpp's f16 (twice its memory): an f32
        file's logits then equal transformers' to float rounding (about 1e-5 instead of 0.002), what a
        token-for-token comparison across backends needs on a model with near-ties."""
        from tifaforge.extras import require
        from tifaforge.models.gguf_file import default_threads, llama, read_gguf

        self.lc = require("llamacpp")
        info = read_gguf(path)  # validated before llama.cpp parses it
        train_ctx = int(info.metadata.get(f"{info.architecture}.context_length", 4096))
        kv = {"type_k": self.lc.GGML_TYPE_F32, "type_v": self.lc.GGML_TYPE_F32} if kv_f32 else {}
        self.llm = llama(path, n_ctx=n_ctx or min(train_ctx, 8192), n_batch=512,
                         n_threads=n_threads or default_threads(path), **kv)
        self.model = None  # no transformers model behind this backend
        self.tokenizer = LlamaTokenizer(self.llm, info.metadata.get("tokenizer.chat_template"))
        self.context = self.llm.n_ctx()
        self.stop_ids = self._default_stop_ids()

    @classmethod
    def load(cls, path, **kwargs) -> LlamaCppEngine:
        path = Path(path)
        if path.suffix != ".gguf" or not path.is_file():
            raise TifaError(f"{path}: the llama.cpp backend runs a .gguf file (tifa export gguf writes one)")
        return cls(path, **kwargs)

    def close(self) -> None:
        """Free llama.cpp's model now: left to interpreter exit, its destructor errors (pitfall 10)."""
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> LlamaCppEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _default_stop_ids(self) -> set[int]:
        """End of sentence, llama.cpp's end-of-turn token, the template's role tags, end of text."""
        tok = self.tokenizer
        ids = {tok.eos_token_id, _real_id(self.lc.llama_vocab_eot(self._vocab()))}
        tags = [t[k] for t in SPECIAL_TOKENS.values() for k in ("eos", "user", "assistant")] + ["<|endoftext|>"]
        ids |= {tok.token_id(t) for t in tags}
        return {i for i in ids if i is not None}

    def _vocab(self):
        return self.lc.llama_model_get_vocab(self.llm.model)

    # -- the decode loop --------------------------------------------------------------------------

    def _rows(self, requests) -> list[Row]:
        if self.llm is None:  # its tokenizer would call into freed memory
            raise TifaError("this llama.cpp engine was closed")
        return super()._rows(requests)

    def _decode(self, rows: list[Row]) -> Iterator[Delta]:
        for i, row in enumerate(rows):
            yield from self._decode_one(i, row)

    def _decode_one(self, i: int, row: Row) -> Iterator[Delta]:
        chain = self._sampler(row)
        try:
            self._prefill(row.prompt_ids)
            budget = self.context - len(row.prompt_ids)
            while True:
                token = self.lc.llama_sampler_sample(chain, self.llm.ctx, -1)  # also accepts it into the chain
                budget -= 1
                piece = row.push(token, budget)
                if piece or row.finish:
                    yield Delta(i, piece, row.finish, len(row.ids))
                if row.finish:
                    return
                self.llm.eval([token])
        finally:
            self.lc.llama_sampler_free(chain)

    def _prefill(self, ids: list[int]) -> None:
        """Evaluate the prompt, keeping the cached prefix it shares with the previous call; at least
        one token is evaluated so the logits are this prompt's."""
        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        keep = 0
        while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
            keep += 1
        self.llm.n_tokens = keep  # eval() drops the KV cache past n_tokens
        self.llm.eval(ids[keep:])

    def _sampler(self, row: Row):
        """llama.cpp's sampler chain for one request (see the module docstring for order and meaning)."""
        lc, s, prompt = self.lc, row.req.sampling, row.prompt_ids
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())

        def add(sampler, seen: list[int] = ()) -> None:
            for t in seen:  # what this sampler counts before the first generated token
                lc.llama_sampler_accept(sampler, t)
            lc.llama_sampler_chain_add(chain, sampler)

        n_vocab = self.llm.n_vocab()
        if s.repetition_penalty != 1.0:
            add(lc.llama_sampler_init_penalties(n_vocab, self.context, s.repetition_penalty, 0.0, 0.0), prompt)
        if s.presence_penalty or s.frequency_penalty:
            add(lc.llama_sampler_init_penalties(n_vocab, self.context, 1.0, s.frequency_penalty, s.presence_penalty))
        if s.dry_multiplier > 0 and s.dry_penalty_last_n != 0:
            add(self._dry(s), prompt)
        if not s.do_sample:
            add(lc.llama_sampler_init_greedy())
            return chain
        for on, make in ((s.top_k > 0, lambda: lc.llama_sampler_init_top_k(s.top_k)),
                         (s.top_p < 1.0, lambda: lc.llama_sampler_init_top_p(s.top_p, 1)),
                         (s.min_p > 0, lambda: lc.llama_sampler_init_min_p(s.min_p, 1)),
                         (s.xtc_probability > 0, lambda: lc.llama_sampler_init_xtc(s.xtc_probability, s.xtc_threshold, 1, _seed(row)))):
            if on:
                add(make())
        add(lc.llama_sampler_init_temp(s.temperature))  # <= 0 keeps only the most likely token
        add(lc.llama_sampler_init_dist(_seed(row)))
        return chain

    def _dry(self, s):
        breakers = [b.encode("utf-8") for b in s.dry_sequence_breakers]
        array = (ctypes.c_char_p * len(breakers))(*breakers)
        last_n = self.context if s.dry_penalty_last_n == -1 else s.dry_penalty_last_n
        return self.lc.llama_sampler_init_dry(self._vocab(), s.dry_multiplier, s.dry_base, s.dry_allowed_length,
                                              last_n, array, len(breakers))


def _seed(row: Row) -> int:
    """llama.cpp's seed from the row's generator: a request's seed (or torch.manual_seed) reproduces it."""
    import torch

    return int(torch.randint(0, 2**31 - 1, (1,), generator=row.gen))

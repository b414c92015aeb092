"""The engine's vLLM backend (GPU): the same `generate`/`stream` interface as `Engine`, decoded by vLLM.

    python -c "from tifaforge.engine.vllm_backend import VLLMEngine as E; e = E.load('runs/demo/02-sft/model'); print(e.chat([{'role': 'user', 'content': '你好'}]).content)"

Needs the `vllm` extra on a CUDA machine (vLLM is CUDA-only and pins its own torch build, so it is not
part of `make setup`; `bench/gpu_check.py --vllm` runs this backend on a GPU).

It subclasses `engine.generate.Engine`, so request validation, `Request`/`Result`/`Delta`, stop tokens
(end of sentence, the template's role tags), stop strings cut exactly, streaming that never splits a
character or leaks a stop's prefix, and the reasoning/content split are the one code path's: vLLM only
chooses the tokens. Each request goes to vLLM's in-process `LLMEngine` as token ids with its own
`SamplingParams` (and its own seed), all requests of a call batched by vLLM's scheduler (continuous
batching, prefix caching, CUDA kernels); every step's new token ids are pushed through the request's
`Row`, and a request our stop rules end is aborted in vLLM at once.

Written by hand, not vLLM's `LLM.generate`: that call returns only at the end (no streaming) and
stops on its own detokenised text, which skips special tokens; here the stop tokens and strings
mean exactly what they mean for the transformers and llama.cpp backends.

Sampling as the other backends mean it: temperature, top_p, top_k, min_p, the repetition penalty
(over prompt and answer, as transformers and llama.cpp), presence/frequency penalties (answer tokens
only), max_new_tokens, seeds; `do_sample: false` is greedy. vLLM has no DRY and no XTC sampler: a
request that turns either on is refused with a clear error rather than silently sampled without it.

MGRPO's rollouts (`mgrpo.rollout_backend: vllm`) use `load_weights` to push the policy's current
weights into the running engine after every update, as TRL's colocated mode does; the engine runs in
the trainer's process (VLLM_ENABLE_V1_MULTIPROCESSING=0), sharing the GPU (`gpu_memory_utilization`).
Departure from TRL: no importance-sampling correction for the small gap between vLLM's sampling
probabilities and the trainer's (its kernels round differently); the old log-probs are the trainer's.
One generate/stream call at a time per engine: vLLM's `step()` answers for every request it holds.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tifaforge.engine.generate import Delta, Engine, Row
from tifaforge.errors import TifaError

_ids = itertools.count()


class VLLMEngine(Engine):
    """`Engine` over a transformers model folder, decoded by vLLM on a CUDA GPU."""

    continuous_batching = False  # `Batch` drives a transformers model; the server runs vLLM jobs in turn
    supports_logprobs = False  # not mapped onto vLLM's own logprobs yet: the server names the field as unsupported
    supports_think_budget = False  # the server names a reasoning budget as not honoured
    unsupported_sampling = ("typical_p", "top_n_sigma", "min_tokens", "ignore_eos", "logit_bias",
                            "repetition_penalty_range", "banned_strings")  # named in X-Tifa-Ignored when a request sets them

    def __init__(self, path: str | Path, *, dtype: str = "auto", gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, enforce_eager: bool = False, seed: int = 0, **vllm_kwargs):
        from tifaforge.extras import require
        from tifaforge.models.load import load_tokenizer, run_model

        path = run_model(Path(path))
        if not (path / "config.json").exists():
            raise TifaError(f"{path}: the vLLM backend runs a transformers model folder (config.json)")
        from tifaforge.models.looping import saved_base_config

        if saved_base_config(path) is not None:
            raise TifaError(f"{path}: a looped model; vLLM runs plain architectures: `tifa export unroll` it first")
        # In-process engine core: its model can take the trainer's weights (MGRPO), no fork of a CUDA process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm_kwargs = {**_env_args(), **vllm_kwargs}
        vllm = require("vllm")
        self.sp = require("vllm", "vllm.sampling_params")
        kwargs = dict(model=str(path), tokenizer=str(path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                      gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                      generation_config="vllm", skip_tokenizer_init=True)  # ids in, ids out: our tokenizer decodes
        self.llm = vllm.LLM(**{**kwargs, **vllm_kwargs})
        self.path = path
        self.model = None  # no transformers model behind this backend
        self.tokenizer = load_tokenizer(path)
        self.context = int(self.llm.llm_engine.model_config.max_model_len)
        self.stop_ids = self._default_stop_ids()

    @classmethod
    def load(cls, path, **kwargs) -> VLLMEngine:
        return cls(path, **kwargs)

    def _generation_config(self):
        """The folder's generation config (its end-of-sentence ids), or None where it has none."""
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(self.path)
        except OSError:  # no generation_config.json
            return None

    # -- weights from a trainer -------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable) -> None:
        """Replace the served weights by `(name, tensor)` pairs in transformers' naming (a policy's
        `named_parameters()`), then drop the prefix cache, which holds the old weights' keys/values."""
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        if executor is None:
            raise TifaError("pushing weights needs vLLM's engine in this process: unset VLLM_ENABLE_V1_MULTIPROCESSING "
                            "(tifaforge sets it to 0)")
        runner = executor.driver_worker.worker.model_runner
        runner.get_model().load_weights(named_tensors)  # get_model: past any CUDA-graph wrapper
        if self.llm.reset_prefix_cache() is False:  # a request still holds blocks: they would keep old keys/values
            raise TifaError("vLLM kept its prefix cache (a request is still running): the new weights would "
                            "reuse keys and values computed with the old ones")

    def load_policy(self, policy) -> None:
        """Push a policy's weights; a LoRA policy's as merged weights, computed apart (base + delta in
        fp32) so the frozen base is never touched (merging in place and back drifts in bf16)."""
        import torch

        with torch.no_grad():
            self.load_weights(_peft_merged(policy) if hasattr(policy, "peft_config") else policy.named_parameters())

    def close(self) -> None:
        """Give the GPU memory back (weights and KV cache) before the next stage runs in this process."""
        import gc

        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already down, or another vLLM layout: the deletion below still frees it
            pass
        del llm
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:
            pass
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- the decode loop --------------------------------------------------------------------------

    def _params(self, i: int, row: Row):
        s = row.req.sampling
        if s.dry_multiplier > 0 or s.xtc_probability > 0:
            raise TifaError(f"request {i}: vLLM has no DRY or XTC sampler; set sampling.dry_multiplier and "
                            "sampling.xtc_probability to 0 or use the transformers or llama.cpp backend")
        budget = min(s.max_new_tokens, self.context - len(row.prompt_ids))
        try:
            return self._sampling_params(row, s, budget)
        except ValueError as e:  # vLLM's own range checks (e.g. top_p 0, temperature above its limit)
            raise TifaError(f"request {i}: vLLM refuses these sampling settings: {e}") from None

    def _sampling_params(self, row: Row, s, budget: int):
        return self.sp.SamplingParams(
            n=1, max_tokens=budget, seed=_seed(row),
            temperature=s.temperature if s.do_sample else 0.0,
            top_p=s.top_p if s.do_sample else 1.0, top_k=max(0, s.top_k) if s.do_sample else 0,
            min_p=s.min_p if s.do_sample else 0.0,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            stop_token_ids=sorted(self.stop_ids), ignore_eos=True,  # stop exactly on our stop ids
            detokenize=False, skip_special_tokens=False,  # the Row decodes (stop strings, streaming)
            output_kind=self.sp.RequestOutputKind.DELTA)

    def _decode(self, rows: list[Row]) -> Iterator[Delta]:
        if self.llm is None:
            raise TifaError("this vLLM engine was closed")
        if getattr(self, "_busy", False):  # vLLM's step() answers for every request: two loops would steal tokens
            raise TifaError("this vLLM engine is already generating: one generate/stream call at a time")
        engine = self.llm.llm_engine
        params = [self._params(i, row) for i, row in enumerate(rows)]  # all checked before any is queued
        live: dict[str, int] = {}
        self._busy = True
        try:
            for i, (row, p) in enumerate(zip(rows, params)):
                rid = f"tifa-{next(_ids)}"  # vLLM reports and aborts by this (external) id
                engine.add_request(rid, {"prompt_token_ids": row.prompt_ids}, p)
                live[rid] = i
            while live:
                if not engine.has_unfinished_requests():
                    raise TifaError(f"vLLM finished without answering {len(live)} request(s)")
                for out in engine.step():
                    i = live.get(out.request_id)
                    if i is None:
                        continue
                    row = rows[i]
                    for token in out.outputs[0].token_ids:
                        piece = row.push(token, self.context - len(row.prompt_ids) - len(row.ids) - 1)
                        if piece or row.finish:
                            yield Delta(i, piece, row.finish, len(row.ids))
                        if row.finish:
                            break
                    if not row.finish and out.finished:  # vLLM's own limit (the context): a length finish
                        row.finish = "length"
                        row.text += row._detokenize(force=True)
                        yield Delta(i, row._flush(final=True), row.finish, len(row.ids))
                    if row.finish:
                        del live[out.request_id]
                        if not out.finished:
                            engine.abort_request([out.request_id])
        finally:  # a closed stream (client gone) or an error: nothing of ours keeps decoding
            self._busy = False
            if live:
                engine.abort_request(list(live))


def _env_args() -> dict:
    """More vLLM engine arguments from TIFA_VLLM_ARGS, a JSON object (e.g. '{"attention_backend": "TRITON_ATTN",
    "enforce_eager": true}'): one place for chat, serve and MGRPO rollouts alike."""
    import json

    raw = os.environ.get("TIFA_VLLM_ARGS", "").strip()
    if not raw:
        return {}
    try:
        args = json.loads(raw)
    except ValueError as e:
        raise TifaError(f"TIFA_VLLM_ARGS is not JSON: {e}") from None
    if not isinstance(args, dict):
        raise TifaError("TIFA_VLLM_ARGS must be a JSON object of vLLM engine arguments")
    return args


def _peft_merged(policy):
    """A LoRA policy's weights as the merged model's, under the plain model's names: each adapted
    layer's base weight plus its active adapters' delta (in fp32, cast back), every other weight as is.
    Nothing in the policy changes."""
    from peft.tuners.lora import LoraLayer

    lora = {name: m for name, m in policy.named_modules() if isinstance(m, LoraLayer)}
    for name, p in policy.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        layer = lora.get(name.removesuffix(".base_layer.weight")) if name.endswith(".base_layer.weight") else None
        if layer is not None:
            delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A)
            p = (p.float() + delta).to(p.dtype)
        yield name.removeprefix("base_model.model.").replace(".base_layer", ""), p


def _seed(row: Row) -> int:
    """vLLM's per-request seed from the row's generator: a request's seed (or torch.manual_seed) reproduces it."""
    import torch

    return int(torch.randint(0, 2**31 - 1, (1,), generator=row.gen))

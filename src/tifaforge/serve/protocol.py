"""Request bodies of the OpenAI-compatible API, and how they become engine requests.

    tifa serve models/tiny     # every POST body is parsed by the models below

Unknown fields are ignored, never rejected (vLLM's behaviour): SillyTavern sends one large body with
several aliases for each setting and dozens of other back ends' keys. Where aliases disagree the
OpenAI name wins, then SillyTavern's, then llama.cpp's. Unset fields take the server's defaults (the
seed's `SamplingConfig`). pydantic comes with transformers (through typer), so importing this module
needs no extra.

Departures from the wire conventions, each on purpose:
1. `dry_penalty_last_n: 0` means "the whole context" here, as in SillyTavern (which sends 0 by
   default) and text-generation-webui; in our config 0 turns DRY off, but DRY is already off unless
   `dry_multiplier > 0`.
2. `seed: -1` (llama.cpp, SillyTavern) means "no fixed seed". With `n > 1`, choice i uses seed + i so
   the choices differ yet the whole response is reproducible.
3. `model` is not checked: SillyTavern echoes whatever name it was last given.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tifaforge.config import SamplingConfig
from tifaforge.utils import unencodable_path


class Limits(BaseModel):
    """Bounds checked on every request before any work (tokenisation, admission, generation)."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_messages: int = 1024
    max_n: int = 8  # choices (rows) per request: n x prompts
    max_stop: int = 32  # SillyTavern sends more than OpenAI's 4 in text-completion mode
    max_stop_chars: int = 256
    max_banned: int = 256  # banned strings (KoboldCpp users keep long lists), each at most max_stop_chars
    body_timeout_s: float = 30.0  # a body that stops arriving (shorter than its Content-Length) gets 408


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        """JSON lets a string hold a lone surrogate (`"\\ud800"`), which no UTF-8 tokenizer or response
        can encode: a 400 naming the field, not a 500 later."""
        bad = unencodable_path(data)
        if bad is not None:
            raise ValueError(f"{'.'.join(map(str, bad)) or 'body'}: text that is not valid Unicode (a lone surrogate "
                             "such as \\ud800)")
        return data


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: str


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = "{}"  # OpenAI: a JSON string, as the model wrote it


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    # `reasoning_content` / `reasoning` echoed back by clients are ignored (extra="ignore").

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


NonNegFloat = Field(default=None, ge=0)
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class Sampling(_Body):
    """Sampler settings, with OpenAI, SillyTavern and llama.cpp names (any may be given)."""

    temperature: float | None = NonNegFloat
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # llama.cpp/ST: 0 or -1 = off
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    rep_pen: float | None = Field(default=None, gt=0)
    repeat_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    dry_multiplier: float | None = NonNegFloat
    dry_base: float | None = Field(default=None, ge=1)
    dry_allowed_length: int | None = Field(default=None, ge=0)
    dry_penalty_last_n: int | None = Field(default=None, ge=-1)
    dry_sequence_breakers: list[str] | str | None = None  # SillyTavern sends a JSON-encoded string
    xtc_threshold: float | None = Field(default=None, ge=0, le=1)
    xtc_probability: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    sampler_seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    n_predict: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stopping_strings: list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # SillyTavern's and llama.cpp's other samplers. Those `unsupported` lists are checked (a malformed
    # value is a 400) and, when set to anything but "off", named in the X-Tifa-Ignored header.
    typical_p: float | None = Field(default=None, ge=0, le=1)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    ban_eos_token: bool | None = None
    logit_bias: dict[str, float] | list[list[Any]] | None = None  # OpenAI: {id: bias}; llama.cpp: [[id, bias]]
    top_n_sigma: float | None = None
    nsigma: float | None = None
    mirostat_mode: int | None = Field(default=None, ge=0, le=2)
    mirostat: int | None = Field(default=None, ge=0, le=2)
    smoothing_factor: float | None = Field(default=None, ge=0)
    dynatemp_range: float | None = Field(default=None, ge=0)
    rep_pen_range: int | None = Field(default=None, ge=-1)
    repetition_penalty_range: int | None = Field(default=None, ge=-1)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    banned_strings: list[str] | str | None = None
    banned_tokens: list[str] | str | None = None


class ToolFunction(_Body):
    name: str = Field(min_length=1, max_length=256)
    description: str = ""
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    revise: bool | None = None  # self-revision (MGRPO's pass 2) for this request; None: the server's --revise
    tool_choice: Any = None  # "none" leaves the tools out of the prompt; other values: the model decides
    model: str | None = None
    include_reasoning: bool = True  # OpenRouter/SillyTavern: false drops the reasoning from the reply
    continue_final_message: bool | None = None  # vLLM: continue the last (assistant) message in place
    add_generation_prompt: bool | None = None  # vLLM: false means the same
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    reasoning_budget: int | None = Field(default=None, ge=-1)  # llama.cpp: -1 unlimited, 0 no thinking
    thinking_budget_tokens: int | None = Field(default=None, ge=-1)  # llama.cpp's per-request name

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    model: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # the legacy API: how many rivals

    def logprob_count(self) -> int | None:
        return self.logprobs


# ---------------------------------------------------------------------------------------------
# From a request body to engine settings


class BadRequest(ValueError):
    """A request the server refuses with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def unsupported(body: Sampling) -> list[str]:
    """Fields set to something this server does not do (their "off" values are not reported)."""
    on = {
        "mirostat": bool(first(body.mirostat_mode, body.mirostat)),
        "smoothing_factor": bool(body.smoothing_factor),
        "dynatemp_range": bool(body.dynatemp_range),
        "banned_tokens": bool(body.banned_tokens),
    }
    return [k for k, v in on.items() if v]


def logit_bias(value: dict | list | None) -> dict[int, float]:
    """OpenAI's {"id": bias} or llama.cpp's [[id, bias]] (bias false: banned) as {id: bias}, bias in
    [-100, 100] as OpenAI bounds it."""
    pairs = value.items() if isinstance(value, dict) else value or []
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise BadRequest("logit_bias: expected {token id: bias} or [[token id, bias], ...]", "logit_bias")
        token, bias = pair
        if bias is False:
            bias = -100.0
        try:
            token = int(token)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias: {token!r} is not a token id", "logit_bias") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise BadRequest(f"logit_bias: the bias of token {token} must be a number in [-100, 100]", "logit_bias")
        out[token] = float(bias)
    return out


def first(*values: Any) -> Any:
    """The first value that was given (not None): aliases in order of precedence."""
    return next((v for v in values if v is not None), None)


def stops(body: Sampling, limits: Limits) -> list[str]:
    given = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    found = [s for s in given + list(body.stopping_strings or []) if s]
    if len(found) > limits.max_stop:
        raise BadRequest(f"at most {limits.max_stop} stop strings, got {len(found)}", "stop")
    if any(len(s) > limits.max_stop_chars for s in found):
        raise BadRequest(f"a stop string is longer than {limits.max_stop_chars} characters", "stop")
    return list(dict.fromkeys(found))


def breakers(value: list[str] | str | None) -> list[str] | None:
    """DRY breakers as a list or as SillyTavern's JSON-encoded string; an empty one keeps the default."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError:
            raise BadRequest("dry_sequence_breakers: not a JSON list of strings", "dry_sequence_breakers") from None
        if value is not None and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise BadRequest("dry_sequence_breakers: must be a list of strings", "dry_sequence_breakers")
    return value or None


def requested_max_tokens(body: Sampling) -> int | None:
    return first(body.max_completion_tokens, body.max_tokens, body.max_new_tokens, body.n_predict)


PINNED = ("temperature", "top_p", "repetition_penalty")  # what `tifa serve --sampling model` keeps


def sampling_for(body: Sampling, base: SamplingConfig, max_new_tokens: int, choice: int,
                 pinned: bool = False) -> SamplingConfig:
    """The engine settings for one choice: `base` (the server's defaults) with the body's overrides;
    `pinned`: the server's temperature, top_p and repetition penalty win over the body's."""
    seed = first(body.seed, body.sampler_seed)
    last_n = body.dry_penalty_last_n
    given = {
        "temperature": body.temperature, "top_p": body.top_p, "min_p": body.min_p,
        "top_k": None if body.top_k is None else max(body.top_k, 0),
        "repetition_penalty": first(body.repetition_penalty, body.rep_pen, body.repeat_penalty),
        "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
        "dry_multiplier": body.dry_multiplier, "dry_base": body.dry_base,
        "dry_allowed_length": body.dry_allowed_length,
        "dry_penalty_last_n": -1 if last_n == 0 else last_n,
        "dry_sequence_breakers": breakers(body.dry_sequence_breakers),
        "xtc_threshold": body.xtc_threshold, "xtc_probability": body.xtc_probability,
        "typical_p": body.typical_p, "min_tokens": body.min_tokens,
        "top_n_sigma": None if (n := first(body.top_n_sigma, body.nsigma)) is None else max(n, 0.0),
        "ignore_eos": first(body.ignore_eos, body.ban_eos_token),
        "repetition_penalty_range": None if (r := first(body.rep_pen_range, body.repetition_penalty_range,
                                                        body.repeat_last_n)) is None else max(r, 0),  # -1/0: all
        "logit_bias": logit_bias(body.logit_bias) or None,
        "banned_strings": [body.banned_strings] if isinstance(body.banned_strings, str) and body.banned_strings
        else [s for s in body.banned_strings or [] if isinstance(s, str) and s] or None,
    }
    cfg = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None and not (pinned and k in PINNED)})
    cfg.max_new_tokens = max_new_tokens
    cfg.seed = None if seed is None or seed < 0 else (seed + choice) % 2**63
    return cfg

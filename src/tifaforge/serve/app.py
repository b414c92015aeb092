"""The OpenAI-compatible server and web chat page over the one engine.

    tifa serve models/tiny --port 8000 [--api-key KEY] [--max-concurrency 4]

Routes: `/v1/models`, `/v1/chat/completions` (JSON or SSE), `/v1/completions` (text completion, as
SillyTavern's text-completion mode uses), `/health`, `/openapi.json` + `/docs`, the page at `/` and
the card helpers it calls (`/api/cards`, `/api/card`). Think handling is done here, for every client:
the reply's reasoning goes to `reasoning_content` (optionally mirrored as `reasoning`), never into
`content`; think blocks in the history a client sends are cut as the seed's template cuts them.
Text completion returns the raw text, tags included (the client owns the prompt format there).

Order of checks, cheapest first, all before any generation: API key and content type (an ASGI gate,
before the body is read), body size, JSON and field types (pydantic), request limits, prompt length
against the context, then admission (429 past the concurrency limit). A client mistake is always a
4xx with OpenAI's error JSON, never a 5xx (OpenAI's SDK retries those).
"""


import asyncio
import dataclasses
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from tifaforge.chat.template import THINK_CLOSE, THINK_OPEN, ThinkStreamSplitter, split_reasoning, strip_think
from tifaforge.config import SamplingConfig
from tifaforge.engine.generate import Engine, Request
from tifaforge.extras import require
from tifaforge.serve.protocol import (
    BadRequest, ChatRequest, CompletionRequest, Limits, Message, Sampling, first, requested_max_tokens,
    sampling_for, stops, unsupported,
)
from tifaforge.serve.scheduler import Job, Scheduler

log = logging.getLogger("tifaforge.serve")
STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")  # and /static/*: the page asks for the key itself


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_concurrency: int = 4,
    limits: Limits | None = None,
    sampling: SamplingConfig | None = None,
    model_name: str = "tifa",
    cors_origins: Sequence[str] = (),
    mirror_reasoning: bool = True,
    cards: Sequence[dict] | None = None,
    stream_interval: float = 0.02,
    reasoning_budget: int = -1,
    pin_sampling: bool = False,
    revise: bool = False,
    reward=None,
    max_context: int | None = None,
    kv_budget_mb: float | None = None,
):
    """The FastAPI app over `engine`: an `Engine` (decoding in a worker thread of this process, closed
    with the app) or a `serve.engine_process.EngineProcess` (the engine in its own process, so the
    HTTP work never waits for its GIL; whoever made it closes it). `sampling`: the server's defaults (the seed's); `cards`: the page's card list
    (card JSON objects; None: the bundled demo cards); `cors_origins`: empty means same-origin only;
    `stream_interval`: a stream's text is sent at most this often (seconds; its first and last piece at
    once), see `Scheduler._send`. `reasoning_budget`: think tokens before the server closes the block
    (-1 unlimited, 0 no thinking; a request's `reasoning_budget` wins). `pin_sampling`: the server's
    temperature, top_p and repetition penalty win over a client's (`--sampling model`). `revise`: every
    chat answer is revised once by the rules (`tifa chat --revise`; a request's `revise` wins), scored
    with `reward` (a RewardConfig; None: the defaults). `max_context`: tokens a request's prompt and
    answer may take together (None: the model's context). `kv_budget_mb`: KV cache the transformers
    engine may hold for all running requests (None: 90% of the GPU's free memory, half the free RAM
    on CPU); a request over it is a 400, one that would push the running ones over it a 429."""
    require("serve")
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    limits = limits or Limits()
    app = FastAPI(title="tifaforge", version=_version(),
                  description="OpenAI-compatible role-play server (reasoning in `reasoning_content`).")
    if hasattr(engine, "scheduler"):  # serve.engine_process.EngineProcess: its creator closes it
        app.state.scheduler = engine.scheduler(max_concurrency, stream_interval)
    else:
        app.state.scheduler = Scheduler(engine, max_concurrency, stream_interval)
        app.router.add_event_handler("shutdown", app.state.scheduler.close)
    if reasoning_budget < -1:
        raise ValueError(f"reasoning_budget must be -1 (unlimited) or more, got {reasoning_budget}")
    app.state.server = _Server(engine, app.state.scheduler, limits, sampling or SamplingConfig(),
                               model_name, mirror_reasoning)
    app.state.server.reasoning_budget, app.state.server.pinned = reasoning_budget, pin_sampling
    app.state.server.revise, app.state.server.reward_config = revise, reward
    app.state.server.limit_context(max_context, kv_budget_mb)
    _add_errors(app)
    _add_api(app, app.state.server)
    _add_page(app, cards)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key"])
    app.add_middleware(_Gate, api_key=api_key, max_body=limits.max_body_bytes,  # outermost: first to run
                       body_timeout=limits.body_timeout_s)
    return app


def _version() -> str:
    from tifaforge import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# Errors: OpenAI's JSON shape, 4xx for anything the client did


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error"}


def _add_errors(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def reply(status: int, message: str, param: str | None = None, headers=None):
        body = error_body(message, _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"), param)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return reply(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "))
        return reply(400, f"{where or 'body'}: {first['msg']}", where or None)

    @app.exception_handler(BadRequest)
    async def bad(request, exc):
        return reply(400, str(exc), exc.param)

    @app.exception_handler(HTTPException)
    async def http(request, exc):
        return reply(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request, exc):  # a bug of ours: say so, without the traceback
        log.exception("internal error on %s", request.url.path)
        return reply(500, f"internal server error: {type(exc).__name__}")


_KEY_IN_QUERY = re.compile(rb"((?:^|&)[^&=]*(?:key|token)[^&=]*=)[^&]*", re.IGNORECASE)


class _Gate:
    """Pure ASGI (no buffering, streams untouched): API key, content type and body size, checked
    before the body is read. The key is compared in constant time and never logged."""

    def __init__(self, app, api_key: str | None, max_body: int, body_timeout: float = 30.0):
        self.app, self.max_body, self.body_timeout = app, max_body, body_timeout
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # A key put in the URL is never accepted; scrub it so the access log cannot show it
        # (uvicorn logs from this same scope dict).
        scope["query_string"] = _KEY_IN_QUERY.sub(rb"\1***", scope.get("query_string", b""))
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        problem = self._problem(scope, headers)
        if problem:
            return await _send_error(send, *problem)
        if scope["method"] == "POST":
            receive = self._capped(receive)
        await self.app(scope, receive, send)

    def _problem(self, scope, headers) -> tuple | None:
        path = scope["path"]
        if scope["method"] == "OPTIONS":  # a CORS preflight carries no credentials
            return None
        if self.key and path not in PUBLIC_PATHS and not path.startswith("/static/") and not self._authorised(headers):
            return 401, "missing or wrong API key: send `Authorization: Bearer KEY`", "authentication_error"
        if scope["method"] != "POST":
            return None
        ctype = headers.get("content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype and not (ctype == "application/json" or ctype.endswith("+json")):
            return 415, f"content type must be application/json, got {ctype!r}", "invalid_request_error"
        length = headers.get("content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return 413, f"request body over {self.max_body} bytes", "invalid_request_error"
        return None

    def _authorised(self, headers) -> bool:
        given = headers.get("authorization", b"")
        given = given[7:].strip() if given[:7].lower() == b"bearer " else headers.get("x-api-key", b"")
        return hmac.compare_digest(given, self.key)

    def _capped(self, receive):
        """A body sent without Content-Length (chunked) is counted as it arrives; each of its parts must
        arrive within `body_timeout` seconds (a client that sends less than its Content-Length would
        otherwise hold the request forever). Once the body is in, receive() is the app's disconnect
        watch and waits as long as the response streams."""
        seen, complete = 0, False

        async def capped():
            nonlocal seen, complete
            if complete:
                return await receive()
            import asyncio

            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                from starlette.exceptions import HTTPException

                raise HTTPException(408, f"the request body stopped arriving ({seen} bytes in {self.body_timeout:g} s; "
                                         "shorter than its Content-Length?)") from None
            complete = message.get("type") != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                from starlette.exceptions import HTTPException

                raise HTTPException(413, f"request body over {self.max_body} bytes")
            return message

        return capped


async def _send_error(send, status: int, message: str, type_: str) -> None:
    body = json.dumps(error_body(message, type_)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# The API


class _Server:
    """What the routes share: the engine, the scheduler, limits, defaults; turns bodies into jobs."""

    def __init__(self, engine, scheduler, limits, sampling, model_name, mirror):
        self.engine, self.scheduler, self.limits = engine, scheduler, limits
        self.sampling, self.model_name, self.mirror = sampling, model_name, mirror
        self._plain = None  # the no-special-tokens tokenizer for message text, made on first use
        self.reasoning_budget, self.pinned = -1, False  # create_app sets them
        self.revise, self.reward_config, self._reward = False, None, None
        self.context, self.kv_per_token, self.kv_budget, self.kv_reserved = engine.context, None, None, 0
        self.spelling = _spelling(engine.tokenizer)

    def encode(self, text: str) -> list[int]:
        # The Rust tokenizer directly: safe beside the worker thread's decoding (no settings mutated).
        tok = self.engine.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        return backend.encode(text, add_special_tokens=False).ids if backend else tok(text, add_special_tokens=False).input_ids

    def encode_text(self, text: str) -> list[int]:
        """Message text, where a role tag typed by a client is text, never the special token: a copy of
        the Rust tokenizer with `encode_special_tokens` set (the shared one is never mutated)."""
        tok = self.engine.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            return tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
        if self._plain is None:
            from tokenizers import Tokenizer

            self._plain = Tokenizer.from_str(backend.to_str())
            self._plain.encode_special_tokens = True
        return self._plain.encode(text, add_special_tokens=False).ids

    def chat_ids(self, messages: list[Message], continue_final: bool, tools: list | None = None) -> list[int]:
        """The prompt's ids: the template's own text (role tags, end tags) tokenized with its special
        tokens, each message's text without them. Contents are swapped for markers before rendering
        and encoded apart, so no client can forge an assistant or system turn by typing its tags."""
        from tifaforge.chat.template import render_serving

        if len(messages) > self.limits.max_messages:
            raise BadRequest(f"at most {self.limits.max_messages} messages, got {len(messages)}", "messages")
        key, marks = uuid.uuid4().hex, {}

        def mark(text: str) -> str:
            marks[m := f"\ue000{key}{len(marks)}\ue001"] = text
            return m

        masked = []
        for turn in history(messages, continue_final, tools):
            turn = {**turn, "content": None if turn["content"] is None else mark(turn["content"])}
            if "tool_calls" in turn:
                turn["tool_calls"] = [{"type": c["type"], "function": {"name": mark(c["function"]["name"]),
                                                                       "arguments": mark(c["function"]["arguments"])}}
                                      for c in turn["tool_calls"]]
            masked.append(turn)
        try:
            prompt = render_serving(masked, self.engine.tokenizer, continue_final=continue_final)
        except Exception as e:  # a template error on odd input is the request's problem
            raise BadRequest(f"messages cannot be rendered with the model's chat template: {e}", "messages") from None
        ids: list[int] = []
        for piece in re.split(f"(\ue000{key}\\d+\ue001)", prompt):
            ids += self.encode_text(marks[piece]) if piece in marks else self.encode(piece) if piece else []
        return ids

    def rows(self, body: Sampling, prompts: list[list[int]]) -> list[Request]:
        """Engine requests for every prompt x n, after every limit check."""
        if len(prompts) * body.n > self.limits.max_n:
            raise BadRequest(f"at most {self.limits.max_n} choices per request (n x prompts), got "
                             f"{len(prompts) * body.n}", "n")
        stop = stops(body, self.limits)
        k = body.logprob_count() if getattr(self.engine, "supports_logprobs", True) else None
        think = self.think_budget(body)
        out = []
        for ids in prompts:
            max_new = self.budget(body, len(ids))
            out += [Request(ids, sampling_for(body, self.sampling, max_new, i, self.pinned), stop, k,
                            think if think and think > 0 else None) for i in range(body.n)]
        s = out[0].sampling  # the body's samplers, parsed once: every row shares them
        if len(s.banned_strings) > self.limits.max_banned or any(len(b) > self.limits.max_stop_chars
                                                                  for b in s.banned_strings):
            raise BadRequest(f"banned_strings: at most {self.limits.max_banned}, each at most "
                             f"{self.limits.max_stop_chars} characters", "banned_strings")
        vocab = len(self.engine.tokenizer)
        if any(not 0 <= t < vocab for t in s.logit_bias):
            raise BadRequest(f"logit_bias: token ids must be in [0, {vocab}) for this model", "logit_bias")
        need = self.kv_need(out)
        if self.kv_budget is not None and need > self.kv_budget:
            tokens = sum(len(r.prompt) + r.sampling.max_new_tokens for r in out)
            raise BadRequest(f"the prompt and answer need {tokens} tokens of KV cache ({need / 2**20:.1f} MiB), over "
                             f"the server's budget of {self.kv_budget / 2**20:.1f} MiB (--kv-budget-mb): lower "
                             "max_tokens or n, or shorten the conversation", "max_tokens")
        return out

    def limit_context(self, max_context: int | None, kv_budget_mb: float | None) -> None:
        """The context and KV-cache limits (see create_app); checked before any work."""
        from tifaforge.engine.generate import free_memory_bytes

        if max_context is not None and max_context < 1:
            raise ValueError(f"max_context must be at least 1, got {max_context}")
        self.context = min(self.engine.context, max_context or self.engine.context)
        self.kv_per_token = getattr(self.engine, "kv_bytes_per_token", None)  # llama.cpp, vLLM: allocated up front
        if self.kv_per_token is None:
            self.kv_budget = None
        elif kv_budget_mb is not None:
            self.kv_budget = int(kv_budget_mb * 2**20)
        else:
            free = getattr(self.engine, "kv_free", None)  # the engine process measured it where the model is
            self.kv_budget = free if free is not None else free_memory_bytes(self.engine.model.device)
        self.kv_reserved = 0

    def kv_need(self, rows: list[Request]) -> int:
        """The KV bytes `rows` hold at most: every prompt and answer token, per row."""
        return sum(len(r.prompt) + r.sampling.max_new_tokens for r in rows) * (self.kv_per_token or 0)

    def reward(self):
        """The rules that score answers for self-revision (made on first use)."""
        if self._reward is None:
            from tifaforge.rewards.literary import LogicReward

            self._reward = LogicReward(self.reward_config)
        return self._reward

    async def revised(self, body: ChatRequest, cont: bool, tools, texts: list[str], finish: list[str],
                      tokens: list[int], request) -> tuple | None:
        """MGRPO's pass 2 at inference, per choice: the rules score the first answer; where they
        complain, their messages ask for a rewrite (`rl/revise.py`'s prompt), and the better-scoring
        of the two is the answer. (texts, finish, tokens, notes), or None if the client left."""
        import asyncio

        from tifaforge.rl.revise import revision_note

        reward = self.reward()
        msgs = [{"role": m["role"], "content": m["content"] or ""} for m in history(body.messages, cont, tools)]
        ctx = reward.context(msgs, None)
        firsts = await asyncio.to_thread(lambda: [reward.score(ctx, t) for t in texts])
        notes = [{"first_score": round(f.total, 4), "summary": f.summary, "revised": False} for f in firsts]
        redo = [i for i, f in enumerate(firsts) if f.summary]
        if not redo:
            return texts, finish, tokens, notes
        rows = []
        for i in redo:
            asked = [*body.messages, Message(role="assistant", content=texts[i]),
                     Message(role="user", content=revision_note(firsts[i].summary, ctx.language, ctx.character))]
            ids = self.chat_ids(asked, False, tools)
            rows += self.rows(body.model_copy(update={"n": 1}), [ids])[:1]
            seed = rows[-1].sampling.seed  # choice i's own seed, as its first answer had
            rows[-1].sampling = dataclasses.replace(rows[-1].sampling, seed=None if seed is None else seed + i)
        try:
            job = self.admit(rows)
        except Exception:  # no slot for pass 2: the first answers stand, and say so
            for i in redo:
                notes[i]["rewrite"] = "skipped: the server is busy"
            return texts, finish, tokens, notes
        got = await _collect(job, request)
        if got[0] is None:
            return None
        seconds = await asyncio.to_thread(lambda: [reward.score(ctx, t) for t in got[0]])
        texts, finish, tokens = list(texts), list(finish), list(tokens)
        for j, i in enumerate(redo):
            notes[i]["rewrite_score"] = round(seconds[j].total, 4)
            if seconds[j].total > firsts[i].total:
                texts[i], finish[i], tokens[i], notes[i]["revised"] = got[0][j], got[1][j], got[2][j], True
        return texts, finish, tokens, notes

    def think_budget(self, body) -> int | None:
        """The request's reasoning budget (its own, else the server's); None: unlimited. Text
        completions have none: their prompt is the client's, think tags and all."""
        if not isinstance(body, ChatRequest):
            return None
        budget = first(body.reasoning_budget, body.thinking_budget_tokens, self.reasoning_budget)
        return None if budget < 0 else budget

    def ignored(self, body, rows: list[Request]) -> list[str]:
        """The fields of `body` this server knows but does not honour (with this backend): named in
        the X-Tifa-Ignored header and a warning, never silently dropped."""
        out = unsupported(body)
        off = self.sampling
        out += [f for f in getattr(self.engine, "unsupported_sampling", ())
                if getattr(rows[0].sampling, f) != getattr(off, f)]
        if body.logprob_count() is not None and not getattr(self.engine, "supports_logprobs", True):
            out.append("logprobs")
        if (self.think_budget(body) or 0) > 0 and not getattr(self.engine, "supports_think_budget", True):
            out.append("reasoning_budget")
        if out:
            log.warning("request fields not honoured: %s", ", ".join(out))
        return out

    def budget(self, body: Sampling, prompt_tokens: int) -> int:
        context = self.context
        whose = "the model's" if context == self.engine.context else "the server's (--max-context)"
        if not prompt_tokens:
            raise BadRequest("the prompt is empty", "prompt")
        room = context - prompt_tokens
        if room < 1:
            raise BadRequest(f"the prompt is {prompt_tokens} tokens; {whose} context of {context} tokens leaves no "
                             "room for an answer", "messages")
        asked = requested_max_tokens(body)
        if asked is None:
            return min(self.sampling.max_new_tokens, room)
        if asked > room:
            raise BadRequest(f"max_tokens {asked} + the prompt's {prompt_tokens} tokens exceeds {whose} "
                             f"context of {context} tokens", "max_tokens")
        return asked

    def admit(self, rows: list[Request]) -> Job:
        from starlette.exceptions import HTTPException

        if failed := getattr(self.scheduler, "failed", None):  # the engine process died
            raise HTTPException(503, f"the model cannot answer: {failed}; restart the server")
        need = self.kv_need(rows)
        if self.kv_budget is not None and self.kv_reserved + need > self.kv_budget:
            raise HTTPException(429, f"server busy: the running requests hold {self.kv_reserved / 2**20:.1f} of "
                                     f"{self.kv_budget / 2**20:.1f} MiB of KV cache; retry shortly",
                                headers={"Retry-After": "1"})
        if not self.scheduler.try_admit():
            raise HTTPException(429, f"server busy: {self.scheduler.max_concurrency} requests already running; "
                                     "retry shortly", headers={"Retry-After": "1"})
        self.kv_reserved += need
        job = self.scheduler.submit(rows)
        close = job._on_close

        def release() -> None:  # the job's slot and its KV reservation go back together
            self.kv_reserved -= need
            close()

        job._on_close = release
        return job


def usage(prompt_tokens: int, tokens: list[int]) -> dict:
    """`tokens`: each choice's generated token count as the engine counted its ids (no stop token)."""
    completion = sum(tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def history(messages: list[Message], continue_final: bool = False, tools: list | None = None) -> list[dict]:
    """Messages for the serving template (chat/template.py): where they stand, `developer` as
    `system`; earlier think blocks cut as the seed's template cuts them, a reply cut off inside its
    think block kept empty, echoed reasoning fields dropped. With `continue_final`, the last
    (assistant) message is kept as sent after its think block, or whole when it ends inside one:
    the model goes on from there. `tools` (OpenAI's): described at the end of the system prompt; an
    assistant turn with `tool_calls` and the `tool` turns answering it render in the seed's syntax."""
    from tifaforge.chat.template import tools_prompt

    out = []
    for i, m in enumerate(messages):
        text = m.text()
        if m.role == "assistant" and m.tool_calls:
            out.append({"role": "assistant", "content": None, "tool_calls": [
                {"type": c.type, "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in m.tool_calls]})
            continue
        if m.role == "assistant":
            text = strip_think(text)
            if text.lstrip().startswith(THINK_OPEN) and not (continue_final and i == len(messages) - 1):
                text = ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if tools:
        described = tools_prompt([t.model_dump() if hasattr(t, "model_dump") else t for t in tools])
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}" if out[0]["content"] else described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _prefix_stats(engine) -> dict | None:
    """The prefix cache's hits and bytes (the engine process reports them when it goes idle)."""
    pc = getattr(engine, "prefix_cache", None)
    return pc.stats() if pc is not None else getattr(engine, "prefix_stats", None)


def _spelling(tokenizer):
    """The tag spelling of the model's tokenizer (llama.cpp's: asked token by token); None if neither."""
    from tifaforge.chat.template import SPECIAL_TOKENS, SPELLINGS, detect_spelling

    if hasattr(tokenizer, "get_added_vocab"):
        return detect_spelling(tokenizer)
    return next((s for s in SPELLINGS if tokenizer.token_id(SPECIAL_TOKENS[s]["user"]) is not None), None)


def continues(body: ChatRequest) -> bool:
    """Whether the reply continues the last (assistant) message in place: vLLM's
    `continue_final_message`, or `add_generation_prompt: false`, or by default when the conversation
    ends with an assistant message (SillyTavern's prefill and Continue without its instruction)."""
    last = body.messages[-1].role
    if body.continue_final_message and body.add_generation_prompt:
        raise BadRequest("continue_final_message and add_generation_prompt cannot both be true", "continue_final_message")
    want = first(body.continue_final_message, None if body.add_generation_prompt is None else not body.add_generation_prompt)
    if want is None:
        return last == "assistant"
    if want and last != "assistant":
        raise BadRequest("continue_final_message needs the last message to be the assistant's", "continue_final_message")
    return want


def _add_api(app, server: _Server) -> None:
    from fastapi import Request as HTTPRequest
    from fastapi import Response

    @app.get("/health", tags=["ops"])
    async def health():
        s = server.scheduler
        if failed := getattr(s, "failed", None):  # the engine process died: no request can be served
            from fastapi.responses import JSONResponse

            return JSONResponse({"status": "error", "error": failed}, status_code=503)
        return {"status": "ok", "running": s.active, "generating": s.busy, "max_concurrency": s.max_concurrency,
                "batching": "continuous" if getattr(server.engine, "continuous_batching", True) else "one at a time",
                "prefix_cache": _prefix_stats(server.engine),
                "context": server.context, "kv_cache_mb": None if server.kv_budget is None else
                {"budget": round(server.kv_budget / 2**20, 1), "reserved": round(server.kv_reserved / 2**20, 1)}}

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "tifaforge", "max_model_len": server.context}]}

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat(body: ChatRequest, request: HTTPRequest, response: Response):
        cont = continues(body)
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        ids = server.chat_ids(body.messages, cont, tools)
        if server.think_budget(body) == 0 and not cont:  # no thinking: the block is closed in the prompt
            ids += server.encode(f"{THINK_OPEN}\n\n{THINK_CLOSE}\n")
        rows = server.rows(body, [ids])
        last = body.messages[-1].text()
        started = (THINK_OPEN in last and THINK_CLOSE not in last) if cont else \
            server.engine.tokenizer.decode(ids[-4:]).rstrip().endswith(THINK_OPEN)
        meta = _Meta("chatcmpl", "chat.completion", server.model_name, len(ids), started=started, body=body,
                     mirror=server.mirror, tools=server.spelling if tools else None)
        headers = _ignored_header(server.ignored(body, rows))
        job = server.admit(rows)
        if server.revise if body.revise is None else body.revise:
            return await _revised_reply(server, body, cont, tools, job, meta, request, response, headers)
        if body.stream:
            return _sse(_chat_events(job, meta), job, headers)
        texts, finish, tokens, lps = await _collect(job, request)
        response.headers.update(headers)
        return _chat_reply(meta, texts, finish, tokens, lps) if texts is not None else _gone()

    async def _revised_reply(server, body, cont, tools, job, meta, request, response, headers):
        """The first answers whole, then pass 2 (`_Server.revised`); a stream sends the final answers
        once chosen. Each choice says what the revision did (`revision`); logprobs are not given."""
        texts, finish, tokens, _ = await _collect(job, request)
        if texts is None:
            return _gone()
        got = await server.revised(body, cont, tools, texts, finish, tokens, request)
        if got is None:
            return _gone()
        texts, finish, tokens, notes = got
        if body.stream:
            done = _Finished(texts, finish, tokens, notes)
            return _sse(_chat_events(done, meta), done, headers)
        response.headers.update(headers)
        reply = _chat_reply(meta, texts, finish, tokens, [None] * len(texts))
        for choice, note in zip(reply["choices"], notes):
            choice["revision"] = note
        return reply

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: HTTPRequest, response: Response):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > server.limits.max_n:
            raise BadRequest(f"prompt: give 1 to {server.limits.max_n} prompts", "prompt")
        ids = [server.encode(p) for p in prompts]
        rows = server.rows(body, ids)
        meta = _Meta("cmpl", "text_completion", server.model_name, sum(map(len, ids)), body=body)
        headers = _ignored_header(server.ignored(body, rows))
        job = server.admit(rows)
        if body.stream:
            return _sse(_completion_events(job, meta), job, headers)
        texts, finish, tokens, lps = await _collect(job, request)
        if texts is None:
            return _gone()
        response.headers.update(headers)
        choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": legacy_logprobs(lp)}
                   for i, (t, f, lp) in enumerate(zip(texts, finish, lps))]
        return meta.envelope(choices=choices, usage=usage(meta.prompt_tokens, tokens))


class _Finished:
    """Answers already complete (self-revision chose them) as a job's deltas, so a stream of them goes
    through the same events as any other; each choice's last chunk carries its `revision`."""

    def __init__(self, texts, finish, tokens, notes):
        from tifaforge.engine.generate import Delta

        self.requests = texts
        self.notes = notes
        self._deltas = [Delta(i, t, f, n) for i, (t, f, n) in enumerate(zip(texts, finish, tokens))]

    async def deltas(self):
        for d in self._deltas:
            yield d

    def close(self) -> None:
        pass


class _Meta:
    """What every chunk of one response repeats (id, created, model) and the request's reply options."""

    def __init__(self, prefix, object_, model, prompt_tokens, started=False, body=None, mirror=False, tools=None):
        self.id, self.object, self.model = f"{prefix}-{uuid.uuid4().hex}", object_, model
        self.created, self.prompt_tokens, self.started = int(time.time()), prompt_tokens, started
        opts = getattr(body, "stream_options", None)
        self.include_usage = bool(opts and opts.include_usage)
        self.reasoning = getattr(body, "include_reasoning", True)
        self.mirror = mirror
        self.tools = tools  # the tag spelling to parse tool calls in, when the request offered tools

    def envelope(self, object_: str | None = None, **fields) -> dict:
        return {"id": self.id, "object": object_ or self.object, "created": self.created, "model": self.model, **fields}

    def reasoning_fields(self, text: str | None) -> dict:
        if text is None or not self.reasoning:
            return {}
        return {"reasoning_content": text, **({"reasoning": text} if self.mirror else {})}


async def _collect(job: Job, request):
    """Every choice's full text, finish reason, token count and logprob entries (None where not
    asked); all None if the client leaves (the job is cancelled)."""
    n = len(job.requests)
    texts, finish, tokens = [""] * n, ["length"] * n, [0] * n
    lps: list[list | None] = [None] * n

    async def consume():
        async for d in job.deltas():
            texts[d.index] += d.text
            finish[d.index] = d.finish_reason or finish[d.index]
            tokens[d.index] = d.tokens
            if d.logprobs is not None:
                lps[d.index] = (lps[d.index] or []) + d.logprobs

    consumer, watcher = asyncio.ensure_future(consume()), asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer not in done:
            return None, None, None, None  # the client left: nobody reads the reply
        consumer.result()  # re-raise a worker error
        return texts, finish, tokens, lps
    finally:
        consumer.cancel()
        watcher.cancel()
        job.close()


def _gone():
    from starlette.responses import Response

    return Response(status_code=499)  # nginx's "client closed request"; never delivered


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _chat_reply(meta: _Meta, texts: list[str], finish: list[str], tokens: list[int], lps: list) -> dict:
    choices = []
    for i, (text, reason, lp) in enumerate(zip(texts, finish, lps)):
        reasoning, content = split_reasoning(text, started_in_think=meta.started)
        message = {"role": "assistant", "content": content, **meta.reasoning_fields(reasoning)}
        if meta.tools:
            message, reason = _with_tool_calls(message, reason, meta.tools)
        logprobs = None if lp is None else LogprobSplit(meta.started).chat(lp, meta.reasoning)
        choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": logprobs,
                        **_cut_in_think(reason, reasoning is not None and not content)})
    return meta.envelope(choices=choices, usage=usage(meta.prompt_tokens, tokens))


class ToolCallStream:
    """A stream's content with its tool calls held back: text before the tool-call tags flows on; from
    the opening tag (or what may be its start) it is kept, and parsed into OpenAI's streamed
    `tool_calls` deltas when the reply ends."""

    def __init__(self, spelling):
        from tifaforge.chat.template import SPECIAL_TOKENS

        self.spelling, self.tag = spelling, SPECIAL_TOKENS[spelling]["tool_calls_begin"]
        self.buf, self.held = "", False

    def feed(self, piece: str) -> str:
        self.buf += piece
        if self.held or self.tag in self.buf:
            self.held = True
            return ""
        keep = next((k for k in range(min(len(self.tag) - 1, len(self.buf)), 0, -1) if self.buf.endswith(self.tag[:k])), 0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        from tifaforge.chat.template import parse_tool_calls

        before, calls = parse_tool_calls(self.buf, self.spelling)
        if not calls:  # tags without a call that parses: the text as it came
            return self.buf, []
        return before, [{"index": i, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": c}
                        for i, c in enumerate(calls)]


def _with_tool_calls(message: dict, finish: str, spelling) -> tuple[dict, str]:
    """The reply's tool calls, in the seed's syntax, as OpenAI's `tool_calls` (content: the text
    before them, or None); finish_reason `tool_calls` when it called any."""
    from tifaforge.chat.template import parse_tool_calls

    before, calls = parse_tool_calls(message["content"] or "", spelling)
    if not calls:
        return message, finish
    message = {**message, "content": before.strip() or None, "tool_calls": [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": c} for c in calls]}
    return message, "tool_calls" if finish == "stop" else finish


class LogprobSplit:
    """A choice's logprob entries split as its text is: the think block's tokens apart from the
    answer's, so `logprobs.content` lines up with `message.content` (what SillyTavern's viewer shows);
    the reasoning's go to `logprobs.reasoning_content` when the reasoning is sent."""

    def __init__(self, started: bool):
        self.state = "think" if started else "pre"  # pre | think | post

    def feed(self, entries: list[dict]) -> tuple[list[dict], list[dict]]:
        content, reasoning = [], []
        for e in entries:
            if self.state == "pre":
                self.state = "think" if e["token"] == THINK_OPEN else "post"
            (reasoning if self.state == "think" else content).append(e)
            if self.state == "think" and e["token"] == THINK_CLOSE:
                self.state = "post"
        return content, reasoning

    def chat(self, entries: list[dict], with_reasoning: bool) -> dict:
        content, reasoning = self.feed(entries)
        return {"content": content, "refusal": None, **({"reasoning_content": reasoning} if with_reasoning else {})}


def legacy_logprobs(entries: list[dict] | None) -> dict | None:
    """The completions API's older shape: parallel lists, rivals as {token: logprob}."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


CUT_IN_THINK = ("the answer was cut off inside its think block (finish_reason length): raise max_tokens, "
                "or set a reasoning budget (reasoning_budget, or tifa serve --reasoning-budget N)")


ENDED_IN_THINK = ("the model ended its reply inside its think block, without an answer: regenerate, or set a "
                  "reasoning budget (reasoning_budget, or tifa serve --reasoning-budget N) so it answers in time")


def _cut_in_think(finish: str | None, thinking: bool) -> dict:
    """A note on a choice with reasoning and no answer (out of tokens, or ended while still thinking):
    never an empty reply in silence."""
    if not thinking:
        return {}
    return {"note": CUT_IN_THINK if finish == "length" else ENDED_IN_THINK}


def _ignored_header(fields: list[str]) -> dict:
    return {"X-Tifa-Ignored": ", ".join(fields)} if fields else {}


# ---------------------------------------------------------------------------------------------
# Server-sent events


def _sse(events: AsyncIterator[dict], job: Job, headers: dict | None = None):
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    async def lines():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            log.exception("generation failed mid-stream")
            yield f"data: {json.dumps(error_body(f'generation failed: {type(e).__name__}', 'api_error'))}\n\n"
        finally:
            job.close()
        yield "data: [DONE]\n\n"

    # The background task also runs when the client disconnected before the body started.
    return StreamingResponse(lines(), media_type="text/event-stream", background=BackgroundTask(job.close),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


async def _chat_events(job: Job, meta: _Meta) -> AsyncIterator[dict]:
    n = len(job.requests)
    splitters = [ThinkStreamSplitter(started_in_think=meta.started) for _ in range(n)]
    lp_splits = [LogprobSplit(meta.started) for _ in range(n)]
    calls = [ToolCallStream(meta.tools) if meta.tools else None for _ in range(n)]
    answered = [False] * n  # a choice sent some answer text (else a reply that only thought gets a note)
    tokens = [0] * n
    extra = {"usage": None} if meta.include_usage else {}

    def chunk(i, delta, finish=None, logprobs=None):
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return meta.envelope("chat.completion.chunk", choices=[choice], **extra)

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for d in job.deltas():
        tokens[d.index] = d.tokens
        # A delta's logprobs ride on its first chunk (or on a chunk of their own when its text is held back).
        lp = None if d.logprobs is None else lp_splits[d.index].chat(d.logprobs, meta.reasoning)
        for kind, piece in splitters[d.index].feed(d.text, final=d.finish_reason is not None):
            if kind == "content" and calls[d.index] is not None:
                piece = calls[d.index].feed(piece)
            delta = {"content": piece} if kind == "content" else meta.reasoning_fields(piece)
            if delta and (kind != "content" or piece):
                answered[d.index] |= kind == "content" and bool(piece.strip())
                yield chunk(d.index, delta, logprobs=lp)
                lp = None
        if lp is not None and (lp["content"] or lp.get("reasoning_content")):
            yield chunk(d.index, {"content": ""}, logprobs=lp)
        if d.finish_reason:
            finish = d.finish_reason
            if calls[d.index] is not None:
                rest, found = calls[d.index].finish()
                if rest:
                    yield chunk(d.index, {"content": rest})
                if found:
                    yield chunk(d.index, {"tool_calls": found})
                    finish = "tool_calls" if finish == "stop" else finish
            last = chunk(d.index, {}, finish)
            last["choices"][0].update(_cut_in_think(d.finish_reason, splitters[d.index].state == "think"
                                                    or (splitters[d.index].state == "post" and not answered[d.index])))
            if isinstance(job, _Finished):
                last["choices"][0]["revision"] = job.notes[d.index]
            yield last
    if meta.include_usage:
        yield meta.envelope("chat.completion.chunk", choices=[], usage=usage(meta.prompt_tokens, tokens))


async def _completion_events(job: Job, meta: _Meta) -> AsyncIterator[dict]:
    tokens = [0] * len(job.requests)
    extra = {"usage": None} if meta.include_usage else {}
    async for d in job.deltas():
        tokens[d.index] = d.tokens
        if d.text or d.finish_reason or d.logprobs:
            choice = {"index": d.index, "text": d.text, "logprobs": legacy_logprobs(d.logprobs),
                      "finish_reason": d.finish_reason}
            yield meta.envelope(choices=[choice], **extra)
    if meta.include_usage:
        yield meta.envelope(choices=[], usage=usage(meta.prompt_tokens, tokens))


# ---------------------------------------------------------------------------------------------
# The web page and its card helpers


def _add_page(app, cards: Sequence[dict] | None) -> None:
    from fastapi import Body
    from fastapi.responses import FileResponse

    listed = list(cards) if cards is not None else demo_cards()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    @app.get("/api/cards", tags=["page"])
    async def card_list() -> dict:
        return {"cards": [{"name": c.get("data", c).get("name", "?"), "card": c} for c in listed]}

    @app.post("/api/card", tags=["page"])
    async def card_prompt(card: dict = Body(..., embed=True), user: str = Body("", embed=True, max_length=64)) -> dict:
        """A card (JSON object, e.g. an uploaded file) as the page uses it: system prompt and greeting."""
        return card_view(card, user)


# The page never needs inline script or other origins: a strict CSP makes injected markup inert.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                            "base-uri 'none'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff"}


def card_view(obj: dict, user: str) -> dict:
    from tifaforge.chat.cards import card_from_dict, card_to_system_prompt, expand_macros
    from tifaforge.errors import TifaError

    try:
        card = card_from_dict(obj, "<uploaded card>")
    except TifaError as e:
        raise BadRequest(str(e), "card") from None
    user = user.strip() or "用户"
    return {"name": card.name, "system_prompt": card_to_system_prompt(card, user),
            "first_mes": expand_macros(card.get("first_mes"), card.name, user)}


def demo_cards() -> list[dict]:
    """The bundled demo cards (Chinese, then English) as card JSON objects."""
    from importlib.resources import files

    out = []
    for name in ("cards_zh.json", "cards_en.json"):
        out += [entry["card"] for entry in json.loads((files("tifaforge") / "assets/demo" / name).read_text("utf-8"))]
    return out


# ---------------------------------------------------------------------------------------------
# tifa serve


def add_arguments(p) -> None:
    import argparse

    p.add_argument("model", help="a model folder (or .gguf file)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY) on every route but /health and the page; "
                        "default: $TIFA_API_KEY, else no key")
    p.add_argument("--max-concurrency", type=int, default=4, help="requests admitted at once; more get 429 (default 4)")
    p.add_argument("--model-name", help="the id /v1/models reports (default: the model folder's name)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from this origin (repeatable; default: none)")
    p.add_argument("--reasoning-mirror", action=argparse.BooleanOptionalAction, default=True,
                   help="also send the reasoning as `reasoning`, vLLM's newer name (default; --no-reasoning-mirror: "
                        "`reasoning_content` only)")
    p.add_argument("--reasoning-budget", type=int, default=-1, metavar="N",
                   help="think tokens before the server closes the block and the model answers (llama.cpp's "
                        "meaning: -1 unlimited, the default; 0 no thinking); a request's reasoning_budget wins")
    p.add_argument("--prefix-cache-mb", type=float, default=256, metavar="MB",
                   help="keep the KV of recent requests, so the next turn of a chat prefills only what is new "
                        "(transformers backend; default 256; 0 turns it off); /health shows hits and bytes")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="tokens a request's prompt and answer may take together (default: the model's context); "
                        "past it, a 400 naming the prompt's tokens and the limit")
    p.add_argument("--kv-budget-mb", type=float, default=None, metavar="MB",
                   help="KV cache all running requests may hold (transformers backend; default: 90%% of the GPU's free "
                        "memory after loading, half the free RAM on CPU): a request over it gets a 400, one that "
                        "would push the running ones over it a 429, never an out-of-memory crash")
    p.add_argument("--revise", action="store_true",
                   help="revise every chat answer once before sending it (MGRPO's pass 2, as tifa chat --revise): the "
                        "rules score the first answer and, if they complain, a rewrite is asked for and the better "
                        "one sent (a request's `revise` field wins; the rules: --config's reward section)")
    p.add_argument("--sampling", choices=["client", "model"], default="client",
                   help="model: the card's temperature, top_p and repetition penalty (or --config's) win over what a "
                        "client sends (SillyTavern's chat mode sends 1.0 / 1.0); max_tokens, stop, seed and logprobs "
                        "always come from the client (default: client)")
    p.add_argument("--config", help="a config file whose `sampling` section sets the default sampling")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. sampling.temperature=0.7")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle weights (they can run code)")
    p.add_argument("--backend", choices=["transformers", "llamacpp", "vllm"], default="transformers",
                   help="llamacpp serves a .gguf file through llama.cpp, one request at a time (needs the llamacpp "
                        "extra); vllm decodes on a CUDA GPU, one request at a time (needs the vllm extra)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the transformers engine in its own process, so HTTP work never waits for its GIL "
                        "(default; --no-engine-process: in a thread of the server's process)")
    p.add_argument("--stream-interval", type=float, default=0.02, metavar="SECONDS",
                   help="send a stream's new text at most this often (default 0.02; 0: every token); fewer events, "
                        "more tokens/s")


def run(args) -> int:
    import os

    from tifaforge.config import load_config
    from tifaforge.errors import TifaError

    uvicorn = require("serve", "uvicorn")
    if not 1 <= args.max_concurrency <= 1024:
        raise TifaError(f"--max-concurrency must be 1 to 1024, got {args.max_concurrency}")
    if not 0 <= args.stream_interval <= 1:
        raise TifaError(f"--stream-interval must be 0 to 1 seconds, got {args.stream_interval}")
    if args.prefix_cache_mb < 0:
        raise TifaError(f"--prefix-cache-mb must be 0 (off) or more, got {args.prefix_cache_mb}")
    if args.max_context is not None and args.max_context < 1:
        raise TifaError(f"--max-context must be at least 1, got {args.max_context}")
    if args.kv_budget_mb is not None and args.kv_budget_mb <= 0:
        raise TifaError(f"--kv-budget-mb must be above 0, got {args.kv_budget_mb}")
    if args.reasoning_budget < -1:
        raise TifaError(f"--reasoning-budget must be -1 (unlimited), 0 (no thinking) or more, got {args.reasoning_budget}")
    cfg = load_config(args.config, args.set)
    sampling = cfg.sampling
    if args.backend == "llamacpp":
        from tifaforge.engine.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine.load(args.model)
    elif args.backend == "vllm":
        from tifaforge.engine.vllm_backend import VLLMEngine

        engine = VLLMEngine.load(args.model)
    elif args.engine_process:
        from tifaforge.serve.engine_process import EngineProcess

        engine = EngineProcess(args.model, allow_pickle=args.allow_pickle, rope_scaling=cfg.model.rope_scaling,
                               prefix_cache_mb=args.prefix_cache_mb)
    else:
        engine = Engine.load(args.model, allow_pickle=args.allow_pickle, rope_scaling=cfg.model.rope_scaling,
                             prefix_cache_mb=args.prefix_cache_mb)
    app = create_app(engine, api_key=args.api_key or os.environ.get("TIFA_API_KEY") or None,
                     max_concurrency=args.max_concurrency, sampling=sampling,
                     model_name=args.model_name or Path(args.model).name, cors_origins=args.cors_origin,
                     mirror_reasoning=args.reasoning_mirror, stream_interval=args.stream_interval,
                     reasoning_budget=args.reasoning_budget, pin_sampling=args.sampling == "model",
                     revise=args.revise, reward=cfg.reward, max_context=args.max_context,
                     kv_budget_mb=args.kv_budget_mb)
    print(f"tifa serve: http://{args.host}:{args.port}/  (OpenAI base URL: http://{args.host}:{args.port}/v1)")
    if not getattr(engine, "continuous_batching", True):
        print(f"tifa serve: --backend {args.backend} generates one request at a time; up to --max-concurrency "
              f"({args.max_concurrency}) wait their turn, more get 429")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        if hasattr(engine, "scheduler"):
            engine.close()
    return 0

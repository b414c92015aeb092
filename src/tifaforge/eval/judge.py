"""The eval's LLM judge over any OpenAI-compatible endpoint: a rubric score per answer and a pairwise,
position-swapped win rate of each model against the one before it.

    tifa eval runs/demo --set eval.judge_url=http://127.0.0.1:8000/v1

Pairwise: for each answer slot (the same prompt and seed for both models) the judge is asked twice,
once with each model's answer first. A slot scores 1 when the later model wins both orders, 0 when
it loses both, 0.5 when the verdicts disagree (the judge followed the position, not the answer);
agreement is the share of slots whose two verdicts agree. A call that times out, fails, or answers
without a verdict is missing: its slot is left out and counted, never scored. Calls run
concurrently (`eval.judge_concurrency` at a time) and the wall time is reported. The rubric reuses
the reward's judge rule (rewards/judge.py), whose failures are missing in the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from tifaforge.extras import require

_PAIR_ZH = ("下面是同一段角色扮演对话的两个回答（角色：{char}）。用户说：{user}\n\n回答1：{a}\n\n回答2：{b}\n\n"
            "哪个回答更好（文学性、角色一致性、连贯性、不重复）？只回答数字1或2。")
_PAIR_EN = ("Two replies to the same role-play turn (character: {char}). The user said: {user}\n\nReply 1: {a}\n\n"
            "Reply 2: {b}\n\nWhich reply is better (literary quality, staying in character, coherence, no "
            "repetition)? Answer with the digit 1 or 2 only.")
_VERDICT = re.compile(r"(?<![\d.])([12])(?![\d.])")


def parse_verdict(reply: str) -> int | None:
    """1 or 2: the first lone digit 1 or 2 in the judge's reply, else None (missing)."""
    m = _VERDICT.search(reply or "")
    return int(m.group(1)) if m else None


def client(cfg) -> Callable[[str], str | None]:
    """ask(prompt) -> the endpoint's reply text, or None for a timeout, an HTTP error or a malformed body;
    `ask.close()` frees its connections. One httpx.Client (thread-safe) serves every concurrent call."""
    from tifaforge.rewards.judge import chat_endpoint

    httpx = require("serve", "httpx")
    endpoint, headers = chat_endpoint(cfg.judge_url, cfg.judge_api_key_env)
    http = httpx.Client(timeout=cfg.judge_timeout, headers=headers,
                        limits=httpx.Limits(max_connections=cfg.judge_concurrency))

    def ask(prompt: str) -> str | None:
        body = {"model": cfg.judge_model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": cfg.judge_max_tokens}
        try:
            r = http.post(endpoint, json=body)
            r.raise_for_status()
            content = r.json()["choices"][0]["message"]["content"]
            return content if isinstance(content, str) else None
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return None

    ask.close = http.close  # the connection pool, closed by the caller when the judging is done
    return ask


def _context(chat: Sequence[dict]) -> tuple[str, str]:
    """(character hint, last user line) of a chat, for the judge's prompt."""
    user = next((m.get("content") or "" for m in reversed(chat) if m.get("role") == "user"), "")
    system = next((m.get("content") or "" for m in chat if m.get("role") == "system"), "")
    return system[:200], user


def pairwise(ask, chats: Sequence[Sequence[dict]], langs: Sequence[str], before: Sequence[str],
             after: Sequence[str], concurrency: int) -> tuple[list[float | None], dict]:
    """Per slot: 1 / 0.5 / 0 for `after` winning / split / losing, None when a verdict is missing;
    and {"agreement", "missing", "calls", "wall_s"}."""
    jobs = []
    for chat, lang, a, b in zip(chats, langs, before, after):
        char, user = _context(chat)
        template = _PAIR_ZH if lang == "zh" else _PAIR_EN
        jobs += [template.format(char=char, user=user, a=a, b=b), template.format(char=char, user=user, a=b, b=a)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        verdicts = [parse_verdict(r) if r is not None else None for r in pool.map(ask, jobs)]
    wall = time.perf_counter() - t0
    out, agree, complete = [], 0, 0
    for k in range(0, len(verdicts), 2):
        first, swapped = verdicts[k], verdicts[k + 1]  # first: `after` is reply 2; swapped: it is reply 1
        if first is None or swapped is None:
            out.append(None)
            continue
        complete += 1
        wins = (first == 2) + (swapped == 1)
        agree += wins != 1
        out.append(wins / 2)
    return out, {"agreement": agree / complete if complete else None, "missing": out.count(None),
                 "calls": len(jobs), "wall_s": round(wall, 2)}


def rubric(cfg, ctxs, answers, concurrency: int) -> tuple[list[float | None], float]:
    """The reward's 1–10 judge rule on each answer (as 1–10; None = missing), and the wall time."""
    from tifaforge.rewards.judge import chat_endpoint, make_judge

    headers = chat_endpoint(cfg.judge_url, cfg.judge_api_key_env)[1]
    key = headers.get("Authorization", "").removeprefix("Bearer ")
    rule = make_judge(cfg.judge_url, cfg.judge_model, cfg.judge_timeout, key)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(rule, ctxs, answers))
    return [None if r.score is None else 1 + 9 * r.score for r in results], time.perf_counter() - t0

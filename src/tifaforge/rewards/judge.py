"""The optional LLM-judge rule: any OpenAI-compatible `/v1/chat/completions` endpoint scores 1–10.

    tifa reward score dialogues.jsonl --config reward.yaml   # with judge_url: http://127.0.0.1:8000/v1

The one rule that is not pure (it calls the network). It never raises and never guesses: a timeout,
an HTTP error or a reply without a 1–10 score gives `RuleResult(None, why)`, which the composite
counts as missing and leaves out of the weighted mean. httpx is imported only when a judge is built.
"""

from __future__ import annotations

import re

from tifaforge.extras import require
from tifaforge.rewards.rules import RewardContext, Rule, RuleResult, answer_content, quoted, say

_PROMPT_ZH = ("请评价下面这段角色扮演回答（角色：{char}）。用户说：{user}\n\n回答：{answer}\n\n"
              "按1-10分评价文学性、角色一致性和连贯性。第一行只写分数，第二行用一句话指出最大的问题。")
_PROMPT_EN = ("Rate this role-play reply (character: {char}). The user said: {user}\n\nReply: {answer}\n\n"
              "Score 1-10 for literary quality, staying in character and coherence. First line: the score "
              "only. Second line: the biggest problem, in one sentence.")
_SCORE = re.compile(r"(?<!\d\.)(?<!\d)(10|[1-9])(?!\.?\d)")


def parse_score(reply: str) -> int | None:
    """The first integer 1–10 in the judge's reply, or None."""
    m = _SCORE.search(reply)
    return int(m.group(1)) if m else None


def chat_endpoint(url: str, api_key_env: str = "") -> tuple[str, dict[str, str]]:
    """(the /chat/completions URL of a base like http://host:port/v1, the headers carrying the API key
    read from the environment variable `api_key_env`)."""
    import os

    endpoint = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    return endpoint, ({"Authorization": f"Bearer {key}"} if key else {})


def make_judge(url: str, model: str = "default", timeout: float = 30.0, api_key: str = "") -> Rule:
    """A rule asking the endpoint at `url` (a base like http://host:port/v1) for a 1–10 score."""
    httpx = require("serve", "httpx")
    endpoint, _ = chat_endpoint(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def judge(ctx: RewardContext, answer: str) -> RuleResult:
        user = next((m.get("content") or "" for m in reversed(ctx.messages) if m.get("role") == "user"), "")
        prompt = say(ctx, _PROMPT_ZH, _PROMPT_EN).format(char=ctx.character or "?", user=user,
                                                          answer=answer_content(ctx, answer))
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        try:
            r = httpx.post(endpoint, json=body, headers=headers, timeout=timeout)
            r.raise_for_status()
            reply = r.json()["choices"][0]["message"]["content"] or ""
        except httpx.TimeoutException:
            return RuleResult(None, say(ctx, f"评审超时（{timeout:g}秒）", f"judge timed out ({timeout:g} s)"))
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            return RuleResult(None, say(ctx, f"评审接口出错：{e}", f"judge endpoint failed: {e}"))
        score = parse_score(reply)
        if score is None:
            return RuleResult(None, say(ctx, f"评审回复里没有1-10的分数：{quoted(ctx, reply)}",
                                         f"no 1-10 score in the judge's reply: {quoted(ctx, reply)}"))
        reason = re.sub(r"^\s*(?:分|/\s*10)?[\s：:。.,，]*", "", reply[_SCORE.search(reply).end():]).strip()
        msg = say(ctx, f"评审{score}分：{reason[:60]}", f"judge gave {score}/10: {reason[:80]}") if score < 7 else None
        return RuleResult((score - 1) / 9, msg)

    return judge

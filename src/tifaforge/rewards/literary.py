"""The logic reward: the rules of `rules.py` combined with weights, vetoes and saturation caps.

    tifa reward score data/demo/sft.jsonl --config reward.yaml    # one JSON line per dialogue

`LogicReward(cfg).score(ctx, answer)` gives a `RewardResult`: the total in [0, 1], whether a veto
fired, every rule's score and message, and `summary` — the failing rules' messages, worst first, in
the conversation's language — which MGRPO pass 2 puts into its revision prompt.

Departures from DESIGN.md §5.2, and why:
1. A rule may return score None (the judge timed out): it is left out of the weighted mean and
   listed in `RewardResult.missing`, never scored 0 — an outage must not read as a bad answer.
   A veto rule that returned None does not veto, for the same reason.
2. A veto fires below `veto_below` (default 0.5), not only at exactly 0, so graded rules can veto.
3. Refusal is a veto by default besides the blocklist: fewer refusals is the card's stated aim
   ("仅在减少拒绝上努力"), and a refusal scoring 0.7 overall would still be learned as acceptable.
4. A saturation cap c credits a rule min(score, c) / c: beyond c nothing more is earned, so an
   answer stuffed with sensory words ties a normal one at best; `texture` itself also scores
   more than 8 sensory words per 100 units as stuffing (it scales the score down).
5. "Speaks as the card's character" is checked on an opening `<Name>` tag (the card's role-play
   prompt style) and on AI-identity breaks; free narration is not parsed for who is speaking.
6. The blocklist checks the answer, not the think block: planning may name what to avoid.
7. Lengths are counted in characters for Chinese and words for English, one band per language.
8. Repetition is one rule scoring the worst of its three measures (n-gram loops, repeated
   sentences, overlap with earlier turns), so one loop is not penalised three times over; the
   measures stay separate functions for eval and DPO mining. A missing think block also scores 0
   on think length; the summary says it once (identical messages are merged).
"""

from __future__ import annotations

import dataclasses

import difflib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tifaforge.config import RewardConfig
from tifaforge.errors import ConfigError, TifaError
from tifaforge.rewards.rules import RULES, RewardContext, Rule, RuleResult, detect_language
from tifaforge.utils import read_jsonl


@dataclass
class RewardResult:
    total: float
    vetoed: bool
    rules: dict[str, RuleResult]
    summary: str

    @property
    def missing(self) -> list[str]:
        """Rules that could not score (counted, excluded from the total)."""
        return [n for n, r in self.rules.items() if r.score is None]

    def to_json(self, id: str | None = None) -> dict:
        """DESIGN §2a's reward-score line."""
        rules = {n: {"score": None if r.score is None else round(r.score, 4), "message": r.message}
                 for n, r in self.rules.items()}
        row = {"total": round(self.total, 4), "vetoed": self.vetoed, "rules": rules}
        return {"id": id, **row} if id is not None else row


# ---------------------------------------------------------------------------------------------
# The composite


def combine(results: Mapping[str, RuleResult], cfg: RewardConfig) -> tuple[float, bool]:
    """(total, vetoed): capped weighted mean over the rules that scored; 0 if a veto failed."""
    if any(results[n].score is not None and results[n].score < cfg.veto_below for n in cfg.vetoes):
        return 0.0, True
    num = den = 0.0
    for name, w in cfg.weights.items():
        s = results[name].score
        if s is None or w == 0:
            continue
        cap = cfg.caps.get(name, 1.0)
        num += w * min(s, cap) / cap
        den += w
    return (num / den if den else 0.0), False


def summarize(results: Mapping[str, RuleResult], cfg: RewardConfig) -> str:
    """The failing rules' messages, worst first (failed vetoes, then the largest weighted loss)."""
    def badness(name: str) -> tuple[bool, float, float]:
        loss = 1 - results[name].score
        return name in cfg.vetoes and results[name].score < cfg.veto_below, cfg.weights.get(name, 0) * loss, loss

    failing = [n for n, r in results.items() if r.message and r.score is not None and r.score < 1]
    lines = dict.fromkeys(results[n].message for n in sorted(failing, key=badness, reverse=True))
    return "\n".join(f"- {m}" for m in lines)


def reward_with_user(cfg: RewardConfig | None, user_name: str | None) -> RewardConfig:
    """The run's reward config (weights, bands, caps, blocklist) for a section that names its own user
    (eval, mining): the reward section's user name wins when set. With no config, the defaults."""
    cfg = cfg or RewardConfig()
    return dataclasses.replace(cfg, user_name=cfg.user_name or user_name or "")


class LogicReward:
    """The configured rules and their composite; `score` for one answer, `score_batch` for MGRPO."""

    def __init__(self, cfg: RewardConfig | None = None):
        self.cfg = cfg = cfg or RewardConfig()
        available: dict[str, Rule] = dict(RULES)
        if cfg.judge_url:
            from tifaforge.rewards.judge import make_judge

            key = os.environ.get(cfg.judge_api_key_env, "") if cfg.judge_api_key_env else ""
            available["judge"] = make_judge(cfg.judge_url, cfg.judge_model, cfg.judge_timeout, key)
        _validate(cfg, available)
        self.rules = {n: available[n] for n in dict.fromkeys([*cfg.weights, *cfg.vetoes])}

    def context(self, messages: Sequence[Mapping[str, Any]], card: Mapping | None = None,
                *, started_in_think: bool = False) -> RewardContext:
        """The RewardContext of a prompt, with this config's language, names, blocklist and bands."""
        c = self.cfg
        lang = detect_language(messages) if c.language == "auto" else c.language
        bands = (c.think_length_zh, c.answer_length_zh) if lang == "zh" else (c.think_length_en, c.answer_length_en)
        return RewardContext.from_messages(
            messages, card, language=lang, user=c.user_name, blocklist=tuple(c.blocklist),
            started_in_think=started_in_think, think_band=tuple(bands[0]), answer_band=tuple(bands[1]))

    def score(self, ctx: RewardContext, answer: str) -> RewardResult:
        results = {name: rule(ctx, answer) for name, rule in self.rules.items()}
        total, vetoed = combine(results, self.cfg)
        return RewardResult(total, vetoed, results, summarize(results, self.cfg))

    __call__ = score

    def score_batch(self, ctxs: Sequence[RewardContext], answers: Sequence[str]) -> list[RewardResult]:
        """Score answers[i] against ctxs[i]; judge calls (network-bound) run concurrently."""
        if len(ctxs) != len(answers):
            raise ValueError(f"score_batch: {len(ctxs)} contexts for {len(answers)} answers")
        if "judge" not in self.rules:
            return [self.score(c, a) for c, a in zip(ctxs, answers)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(self.score, ctxs, answers))


def _validate(cfg: RewardConfig, available: Mapping[str, Rule]) -> None:
    """Unknown rule names (with a did-you-mean), bad weights, caps and bands -> ConfigError."""
    for key in ("weights", "vetoes", "caps"):
        for name in getattr(cfg, key):
            if name in available:
                continue
            if name == "judge":
                raise ConfigError(f"reward.{key}: rule 'judge' needs reward.judge_url (an OpenAI-compatible endpoint)")
            close = difflib.get_close_matches(str(name), list(available), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"reward.{key}: unknown rule '{name}'{hint}; rules: {', '.join(available)}")
    for name, w in cfg.weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(f"reward.weights.{name}: expected a number >= 0, got {w!r}")
    for name, c in cfg.caps.items():
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ConfigError(f"reward.caps.{name}: expected a number in (0, 1], got {c!r}")
    for key in ("think_length_zh", "think_length_en", "answer_length_zh", "answer_length_en"):
        band = getattr(cfg, key)
        if len(band) != 2 or not 0 < band[0] < band[1]:
            raise ConfigError(f"reward.{key}: expected [low, high] with 0 < low < high, got {band!r}")


# ---------------------------------------------------------------------------------------------
# Scoring a file: `tifa reward score FILE.jsonl`


def score_file(path: str | Path, cfg: RewardConfig | None = None) -> Iterator[dict]:
    """Score SFT lines (DESIGN §2a): the last assistant message is the answer, the rest the context."""
    reward = LogicReward(cfg)
    for n, obj in read_jsonl(path):
        where = f"{path}: line {n}"
        messages = _messages(obj, where)
        last = messages[-1]
        answer = last.get("content") or ""
        if last.get("reasoning_content") and "</think>" not in answer:
            answer = f"<think>\n{last['reasoning_content']}\n</think>\n{answer}"
        ctx = reward.context(messages[:-1], _card(obj.get("card"), Path(path).parent, where))
        yield reward.score(ctx, answer).to_json(obj.get("id"))


def score_command(path: str | Path, config_path: str | Path | None = None, out: TextIO = sys.stdout) -> int:
    """Print one §2a reward-score JSON line per dialogue of an SFT file; 0 on success."""
    from tifaforge.config import load_config

    cfg = load_config(config_path).reward if config_path else RewardConfig()
    rows = 0
    for rows, row in enumerate(score_file(path, cfg), 1):
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    if not rows:
        raise TifaError(f"{path}: nothing to score (the file is empty or only blank lines)")
    return 0


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _messages(obj: dict, where: str) -> list[dict]:
    """The line's messages (ShareGPT `conversations` accepted), ending with an assistant turn."""
    if "messages" in obj:
        messages = obj["messages"]
    elif "conversations" in obj:
        messages = [{"role": _SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
                    for m in obj["conversations"] if isinstance(m, dict)]
    else:
        raise TifaError(f"{where}: no 'messages' (or ShareGPT 'conversations') list")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise TifaError(f"{where}: 'messages' must be a non-empty list of objects")
    if messages[-1].get("role") != "assistant":
        raise TifaError(f"{where}: the last message must be the assistant's answer, got role "
                        f"{messages[-1].get('role')!r}")
    return messages


def _card(card: Any, base: Path, where: str) -> dict | None:
    """A card object, or a card file (JSON or PNG) relative to the JSONL's folder."""
    if card is None or isinstance(card, dict):
        return card
    from tifaforge.chat.cards import resolve_card

    try:
        return resolve_card(str(card), base).to_dict()
    except TifaError as e:
        raise TifaError(f"{where}: cannot read card: {e}") from None

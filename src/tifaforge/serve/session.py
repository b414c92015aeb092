"""A role-play conversation over the engine: card, history, think stripping, context trimming.

    tifa chat models/tiny --card data/demo/cards/shen_qingya.json --user 小林

The terminal chat (`serve/terminal.py`) is a thin front over this class, so the history rules are
in one place: the model sees earlier assistant turns WITHOUT their think blocks (the seed card's
warning), the card stays first, and the oldest turns go when the prompt would not fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tifaforge.chat.template import strip_think
from tifaforge.config import SamplingConfig
from tifaforge.engine.generate import Delta, Engine, Request
from tifaforge.errors import TifaError
from tifaforge.utils import atomic_write_json


@dataclass
class ChatSession:
    engine: Engine
    system: str | None = None
    greeting: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    history: list[dict] = field(default_factory=list)  # user/assistant turns; assistant content has no think
    notices: list[str] = field(default_factory=list)  # things the user should be told (trimmed turns)
    last_text: str | None = None  # the last answer as generated (think block included)
    last_revision: Any = None  # with a reviser: the last answer's `rl.revise.Revision`

    @classmethod
    def from_card(cls, engine: Engine, card_path: str | Path | None, user: str | None, **kw) -> ChatSession:
        if card_path is None:
            return cls(engine, **kw)
        from tifaforge.chat.cards import card_to_system_prompt, expand_macros, load_card

        card = load_card(card_path)
        greeting = expand_macros(card.get("first_mes"), card.name, user or "用户") or None
        return cls(engine, system=card_to_system_prompt(card, user), greeting=greeting, **kw)

    def reset(self) -> None:
        self.last_text = None
        self.history = [{"role": "assistant", "content": self.greeting}] if self.greeting else []

    def __post_init__(self) -> None:
        if not self.history:
            self.reset()

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt(self) -> str:
        """The rendered prompt, oldest turns dropped (card kept) until it fits with the answer budget."""
        budget = self.engine.context - min(self.sampling.max_new_tokens, self.engine.context // 2)
        dropped = 0
        while True:
            text = self.engine.render(self.messages())
            n = len(self.engine.tokenizer(text, add_special_tokens=False).input_ids)
            if n <= budget or len(self.history) <= 1:
                break
            cut = 2 if len(self.history) > 2 and self.history[0]["role"] == "user" else 1
            del self.history[:cut]
            dropped += cut
        if dropped:
            self.notices.append(f"history trimmed: the {dropped} oldest message(s) no longer fit the {self.engine.context}-token context")
        if n > budget:
            raise TifaError(f"the card and last message alone take {n} tokens; the context is {self.engine.context}")
        return text

    def say(self, text: str, reviser=None) -> Iterator[Delta]:
        """Add a user turn and stream the answer; the answer joins the history when the stream ends.
        `reviser`: (LogicReward, card dict or None) to revise the answer once before it is shown
        (`_answer`)."""
        if not text.strip():
            raise TifaError("empty message")
        self.history.append({"role": "user", "content": text})
        return self._answer(reviser)

    def regenerate(self, reviser=None) -> Iterator[Delta]:
        if self.history and self.history[-1]["role"] == "assistant":
            self.history.pop()
        if not self.history or self.history[-1]["role"] != "user":
            raise TifaError("nothing to regenerate: say something first")
        return self._answer(reviser)

    def _answer(self, reviser=None) -> Iterator[Delta]:
        self.last_revision = None
        prompt = self.prompt()
        if reviser is not None:
            # MGRPO's pass 2 before answering: the first answer is generated whole, scored by the rules,
            # rewritten once with their messages if they complain; the better one is the answer, in one piece.
            from tifaforge.rl.revise import answer_revised

            reward, card = reviser
            self.last_revision = answer_revised(self.engine, self.messages(), reward, self.sampling, card, prompt=prompt)
            final = self.last_revision.final
            self.last_text = final.text
            self.history.append({"role": "assistant", "content": strip_think(final.text).lstrip()})
            yield Delta(0, final.text, final.finish_reason, len(final.token_ids))
            return
        request = Request(prompt, self.sampling)
        text = ""
        for d in self.engine.stream([request]):
            text += d.text
            yield d
        self.last_text = text
        self.history.append({"role": "assistant", "content": strip_think(text).lstrip()})

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, {"system": self.system, "greeting": self.greeting, "history": self.history})

    def load(self, path: str | Path) -> None:
        from tifaforge.utils import MAX_CONFIG_BYTES, read_json_file

        data = read_json_file(path, MAX_CONFIG_BYTES, "saved chat")
        if not isinstance(data, dict) or not isinstance(data.get("history"), list):
            raise TifaError(f"{path}: not a saved chat (no 'history' list)")
        for i, m in enumerate(data["history"]):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
                raise TifaError(f"{path}: history[{i}]: expected {{'role': 'user'|'assistant', 'content': str}}")
        self.system, self.greeting = data.get("system"), data.get("greeting")
        self.history = [{"role": m["role"], "content": strip_think(m["content"])} for m in data["history"]]

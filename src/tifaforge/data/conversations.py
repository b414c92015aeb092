"""Conversations, prompts and preference pairs: read JSONL, check every line, normalise to one form.

    tifa data check data/demo/sft.jsonl --kind sft [--skip-bad]

Accepted (DESIGN.md §2a): OpenAI `messages` (roles system/user/assistant) or ShareGPT
`conversations` (from system/human/gpt); an assistant's reasoning inline as `<think>…</think>` or in
`reasoning_content`. Internally an assistant turn is split into `reasoning` and `content`.
Every bad line is reported with line number, field path and reason; the caller chooses between
stopping at the first one (a TifaError naming file:line:field) and skipping with a report.
Nothing is dropped silently: a skipped line is always in the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tifaforge.chat.cards import Card, card_to_system_prompt, resolve_card
from tifaforge.chat.template import THINK_CLOSE, THINK_OPEN, split_reasoning
from tifaforge.errors import TifaError
from tifaforge.utils import MAX_JSON_DEPTH, json_depth, open_regular, unencodable_path

Kind = Literal["sft", "prompts", "prefs"]
KINDS = ("sft", "prompts", "prefs")
MAX_LINE_BYTES = 4 * 1024 * 1024  # one record; a longer line is almost always a broken file
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    """One turn. For an assistant turn `reasoning` is its think block (None when it has none)."""

    role: str
    content: str
    reasoning: str | None = None

    def text(self) -> str:
        """The turn as the model writes it: think block first, then the answer."""
        if self.reasoning is None:
            return self.content
        return f"{THINK_OPEN}\n{self.reasoning}\n{THINK_CLOSE}\n\n{self.content}"

    def to_openai(self) -> dict[str, str]:
        return {"role": self.role, "content": self.text()}


@dataclass
class Record:
    """One checked line: an SFT dialogue, a prompt (ends with a user turn) or a preference pair.

    `chosen`/`rejected` are set for pairs only; `line` is where it came from, for messages.
    """

    messages: list[Message]
    id: str | None = None
    card: Card | None = None
    split: str | None = None
    chosen: Message | None = None
    rejected: Message | None = None
    synthetic: bool = False
    line: int = 0


@dataclass
class Problem:
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.line}: {self.field}: {self.reason}" if self.field else f"{self.line}: {self.reason}"


@dataclass
class Report:
    path: str
    kind: str
    lines: int = 0
    good: int = 0
    problems: list[Problem] = field(default_factory=list)

    def summary(self, limit: int = 50) -> str:
        """A few lines for people: the counts, then each problem as file:line: field: reason."""
        head = (f"{self.path}: {self.kind}: {self.lines} records, {self.good} good, "
                f"{len(self.problems)} bad")
        shown = [f"  {self.path}:{p}" for p in self.problems[:limit]]
        more = [f"  … and {len(self.problems) - limit} more"] if len(self.problems) > limit else []
        return "\n".join([head, *shown, *more])


class _Bad(Exception):
    """A problem inside one record; caught per line and turned into a Problem."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


# --- reading lines -------------------------------------------------------------------------

def _raw_lines(path: Path, cap: int):
    """Yield (line number, text or _Bad) for non-blank lines, reading at most `cap`+1 bytes of each
    so one giant line cannot exhaust memory; a BOM, bad UTF-8 or an over-long line is a _Bad."""
    with open_regular(path, "JSONL file") as f:
        n = 0
        while raw := f.readline(cap + 1):
            n += 1
            if len(raw) > cap and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the over-long line
                yield n, _Bad("", f"line is over the {cap} byte cap")
                continue
            if not raw.strip():
                continue
            yield n, _decode_line(raw)


def _decode_line(raw: bytes) -> str | _Bad:
    if raw.startswith(b"\xef\xbb\xbf"):
        return _Bad("", "starts with a byte-order mark (BOM); save the file as UTF-8 without BOM")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Bad("", f"not valid UTF-8 (byte {e.start} of the line)")


def _parse_json(text: str) -> dict:
    if json_depth(text) > MAX_JSON_DEPTH:
        raise _Bad("", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad("", f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _Bad("", f"expected a JSON object, got {type(obj).__name__}")
    if (where := _lone_surrogate(obj)) is not None:
        raise _Bad(where, "holds a lone surrogate escape (e.g. \\ud800): not text any tokenizer can encode")
    return obj


def _lone_surrogate(obj: Any) -> str | None:
    """The field path (`messages[1].content`) of the first string holding a lone surrogate, else None."""
    path = unencodable_path(obj)
    if path is None:
        return None
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


# --- normalising one record ----------------------------------------------------------------

def _key(obj: dict) -> str:
    """Which list holds the turns, so field paths name the user's own key."""
    return "conversations" if "conversations" in obj else "messages"


def _messages(obj: dict) -> list[Message]:
    """OpenAI `messages` or ShareGPT `conversations` → Messages, checked turn by turn."""
    if "messages" in obj and "conversations" in obj:
        raise _Bad("conversations", "both `messages` and `conversations` given; use one")
    key = _key(obj)
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        raise _Bad(key, "missing or not a non-empty list of turns")
    out = [_message(t, f"{key}[{i}]", sharegpt=key == "conversations") for i, t in enumerate(turns)]
    _check_order(out, key)
    return out


def _message(turn: Any, where: str, sharegpt: bool) -> Message:
    if not isinstance(turn, dict):
        raise _Bad(where, f"expected an object, got {type(turn).__name__}")
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    role = turn.get(role_key)
    role = SHAREGPT_ROLES.get(role) if sharegpt and isinstance(role, str) else role
    if role not in ROLES:
        raise _Bad(f"{where}.{role_key}", f"unknown role {turn.get(role_key)!r} (expected "
                   + ("system/human/gpt" if sharegpt else "system/user/assistant") + ")")
    text = turn.get(text_key)
    if not isinstance(text, str):
        raise _Bad(f"{where}.{text_key}", "missing or not a string")
    if role != "assistant":
        return _nonempty(Message(role, text), f"{where}.{text_key}")
    return _assistant(text, turn.get("reasoning_content"), where, text_key)


def _assistant(text: str, reasoning: Any, where: str, text_key: str) -> Message:
    """Split the think block out of an assistant turn; reasoning in two places is ambiguous."""
    inline, content = split_reasoning(text)
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise _Bad(f"{where}.reasoning_content", "not a string")
        if inline is not None:
            raise _Bad(f"{where}.reasoning_content", "reasoning given both inline "
                       "(<think>…</think>) and in reasoning_content; keep one")
        inline, content = reasoning.strip("\n"), text.lstrip()
    if inline is not None and not inline.strip():
        raise _Bad(f"{where}.{text_key}", "empty think block")
    if THINK_OPEN in content or THINK_CLOSE in content:
        raise _Bad(f"{where}.{text_key}", "stray <think> or </think> in the answer")
    return _nonempty(Message("assistant", content, inline), f"{where}.{text_key}")


def _nonempty(msg: Message, where: str) -> Message:
    if not msg.content.strip():
        what = "empty answer after </think>" if msg.reasoning is not None else "empty content"
        raise _Bad(where, what)
    return msg


def _check_order(msgs: list[Message], key: str) -> None:
    """System only first; no two turns of one role in a row. An assistant turn may open the chat
    (a card's greeting), so user-first is not required."""
    for i, m in enumerate(msgs):
        if m.role == "system" and i > 0:
            raise _Bad(f"{key}[{i}]", "a system turn is only allowed first")
        if i > 0 and m.role == msgs[i - 1].role:
            raise _Bad(f"{key}[{i}]", f"two {m.role!r} turns in a row ({key}[{i - 1}] and {key}[{i}])")


def _common(obj: dict, base_dir: Path, cards: dict) -> Record:
    """The fields all kinds share: messages, id, card, split."""
    rec = Record(messages=_messages(obj))
    rec.id = _opt_str(obj, "id")
    rec.split = _opt_str(obj, "split")
    if rec.split is not None and rec.split not in ("train", "eval"):
        raise _Bad("split", f"must be 'train' or 'eval', got {rec.split!r}")
    if obj.get("card") is not None:
        rec.card = _card(obj["card"], base_dir, cards)
    return rec


def _opt_str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _Bad(key, f"must be a string, got {type(value).__name__}")
    return value


def _card(value: Any, base_dir: Path, cards: dict) -> Card:
    """Load a card once per file (dialogues share a handful of cards); any failure names `card`."""
    if not isinstance(value, (str, dict)):
        raise _Bad("card", "must be a path or a card object")
    key = value if isinstance(value, str) else None
    if key in cards:
        return cards[key]
    try:
        card = resolve_card(value, base_dir)
    except TifaError as e:
        raise _Bad("card", str(e)) from None
    if key is not None:
        cards[key] = card
    return card


def _sft(obj: dict, base_dir: Path, cards: dict) -> Record:
    rec, key = _common(obj, base_dir, cards), _key(obj)
    if rec.messages[-1].role != "assistant":
        raise _Bad(f"{key}[{len(rec.messages) - 1}]", "missing final assistant turn")
    if not any(m.role == "user" for m in rec.messages):
        raise _Bad(key, "no user turn")
    return rec


def _prompt(obj: dict, base_dir: Path, cards: dict) -> Record:
    rec, key = _common(obj, base_dir, cards), _key(obj)
    if rec.messages[-1].role != "user":
        raise _Bad(f"{key}[{len(rec.messages) - 1}]", "a prompt must end with a user turn")
    return rec


def _prompt_with_id(obj: dict, base_dir: Path, cards: dict) -> Record:
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise _Bad("id", "missing (prompts need a string id: rollouts and eval refer to it)")
    return _prompt(obj, base_dir, cards)


def _pair(obj: dict, base_dir: Path, cards: dict) -> Record:
    rec = _prompt(obj, base_dir, cards)
    for key in ("chosen", "rejected"):
        if not isinstance(obj.get(key), str):
            raise _Bad(key, "missing or not a string")
        setattr(rec, key, _answer(obj[key], key))
    if obj["chosen"].strip() == obj["rejected"].strip():
        raise _Bad("rejected", "identical to chosen")
    if not isinstance(obj.get("synthetic", False), bool):
        raise _Bad("synthetic", "must be true or false")
    rec.synthetic = obj.get("synthetic", False)
    return rec


def _answer(text: str, where: str) -> Message:
    """A pair's answer is an assistant turn given as a bare string."""
    try:
        return _assistant(text, None, where, "")
    except _Bad as e:
        raise _Bad(where, e.reason) from None


_PARSERS = {"sft": _sft, "prompts": _prompt_with_id, "prefs": _pair}


# --- the public entry points ---------------------------------------------------------------

def check_file(path: str | Path, kind: Kind, on_error: Literal["stop", "skip"] = "stop",
               max_line_bytes: int = MAX_LINE_BYTES) -> tuple[list[Record], Report]:
    """Read and check a JSONL file of `kind`; return the good records and a report.

    on_error="stop": the first bad line raises TifaError("file:line: field: reason").
    on_error="skip": bad lines are left out and each is listed in `report.problems`.
    Duplicate prompt/pair ids are bad lines too (the later one), since results are keyed by id.
    """
    if kind not in KINDS:
        raise TifaError(f"unknown data kind {kind!r} (expected one of {', '.join(KINDS)})")
    path = Path(path)
    report, records, seen, cards = Report(str(path), kind), [], set(), {}
    for n, text in _raw_lines(path, max_line_bytes):
        report.lines += 1
        try:
            rec = _record(text, kind, path.parent, cards, seen)
        except _Bad as bad:
            problem = Problem(n, bad.field, bad.reason)
            if on_error == "stop":
                raise TifaError(f"{path}:{problem}") from None
            report.problems.append(problem)
            continue
        rec.line = n
        records.append(rec)
    report.good = len(records)
    return records, report


def _record(text: str | _Bad, kind: str, base_dir: Path, cards: dict, seen: set) -> Record:
    if isinstance(text, _Bad):
        raise text
    rec = _PARSERS[kind](_parse_json(text), base_dir, cards)
    if rec.id is not None:
        if rec.id in seen:
            raise _Bad("id", f"duplicate id {rec.id!r}")
        seen.add(rec.id)
    return rec


def expand_turns(dialogue: Record) -> list[Record]:
    """One training example per assistant turn that answers a user turn (the loss falls on the
    final assistant turn of each). A greeting that opens the chat answers nothing: no example.
    Earlier assistant turns keep their reasoning here; the chat template strips it from history.
    """
    out = []
    for i, m in enumerate(dialogue.messages):
        if m.role == "assistant" and i > 0 and dialogue.messages[i - 1].role == "user":
            out.append(Record(messages=dialogue.messages[: i + 1], id=_turn_id(dialogue.id, i),
                              card=dialogue.card, split=dialogue.split, line=dialogue.line))
    return out


def _turn_id(base: str | None, i: int) -> str | None:
    return None if base is None else f"{base}#{i}"


def to_chat(rec: Record, user_name: str | None = None) -> list[dict[str, str]]:
    """The record as chat messages for a template: the card's system prompt first when the record
    has a card and no system turn; assistant turns with their think blocks inline (the template
    keeps only the final one's, as the seed's does)."""
    msgs = [m.to_openai() for m in rec.messages]
    if rec.card is not None and rec.messages[0].role != "system":
        msgs.insert(0, {"role": "system", "content": card_to_system_prompt(rec.card, user_name)})
    return msgs


def check_command(path: str | Path, kind: Kind, skip_bad: bool = False) -> int:
    """`tifa data check`: print a summary; exit 1 when any line is bad (0 when all are good).

    Without --skip-bad the first bad line stops the check with a TifaError (exit 2 from the CLI).
    """
    records, report = check_file(path, kind, on_error="skip" if skip_bad else "stop")
    if not records and not report.problems:
        raise TifaError(f"{path}: no records (the file is empty or only blank lines)")
    print(report.summary())
    if kind == "sft" and records:
        turns = sum(len(expand_turns(r)) for r in records)
        thinking = sum(r.messages[-1].reasoning is not None for r in records)
        print(f"  {turns} training examples (one per assistant turn); "
              f"{thinking}/{len(records)} final answers have a think block")
    return 1 if report.problems else 0


def select_split(records: list, split: str | None, path, key: str) -> list:
    """The records of `split` ("" or "all": every record), the same in every stage: a line without a
    `split` field is in "train". None selected is an error naming the file and the config key."""
    from tifaforge.errors import TifaError

    if not split or split == "all":
        chosen = list(records)
    else:
        chosen = [r for r in records if (r.split or "train") == split]
    if not chosen:
        raise TifaError(f"{path}: no prompts in split {split!r} ({key}; a line without `split` is in 'train')")
    return chosen

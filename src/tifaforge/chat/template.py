r"""The seed card's chat template (DeepSeek-R1 style), its training form, think blocks, role-play prompts.

    tifa doctor MODEL      # runs check_template: are the template's role tags single special tokens?

The card prints the template with ASCII bars (`<|User|>`) and with `'\\n'` left over from JSON
escaping; DeepSeek-R1-Distill-Qwen tokenizers spell the tags with FULLWIDTH bars (`<｜User｜>`).
`seed_template(spelling)` is the card's template respelled for a tokenizer, with real newlines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Spelling = Literal["ascii", "fullwidth"]
SPELLINGS: tuple[Spelling, ...] = ("ascii", "fullwidth")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Plain added tokens, not special: decode(skip_special_tokens=True) must keep them.
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)

# The card's "官方模板参考", verbatim (one line). Do not edit: tests compare against it.
SEED_TEMPLATE = r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<|User|>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<|Assistant|><|tool▁calls▁begin|><|tool▁call▁begin|>' + tool['type'] + '<|tool▁sep|>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<|tool▁call▁end|>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<|tool▁call▁begin|>' + tool['type'] + '<|tool▁sep|>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<|tool▁call▁end|>'}}{{'<|tool▁calls▁end|><|end▁of▁sentence|>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<|tool▁outputs▁end|>' + message['content'] + '<|end▁of▁sentence|>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<|Assistant|>' + content + '<|end▁of▁sentence|>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<|tool▁outputs▁begin|><|tool▁output▁begin|>' + message['content'] + '<|tool▁output▁end|>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<|tool▁output▁begin|>' + message['content'] + '<|tool▁output▁end|>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<|tool▁outputs▁end|>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<|Assistant|>'}}{% endif %}"""

_TAG_NAMES = {
    "bos": "begin▁of▁sentence", "eos": "end▁of▁sentence", "user": "User", "assistant": "Assistant",
    "tool_calls_begin": "tool▁calls▁begin", "tool_calls_end": "tool▁calls▁end",
    "tool_call_begin": "tool▁call▁begin", "tool_call_end": "tool▁call▁end", "tool_sep": "tool▁sep",
    "tool_outputs_begin": "tool▁outputs▁begin", "tool_outputs_end": "tool▁outputs▁end",
    "tool_output_begin": "tool▁output▁begin", "tool_output_end": "tool▁output▁end",
}
_BARS = {"ascii": "|", "fullwidth": "\uff5c"}  # U+FF5C FULLWIDTH VERTICAL LINE

# SPECIAL_TOKENS[spelling][name] -> tag, e.g. SPECIAL_TOKENS["fullwidth"]["user"] == "<｜User｜>".
SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    s: {k: f"<{bar}{v}{bar}>" for k, v in _TAG_NAMES.items()} for s, bar in _BARS.items()
}


def special_tokens(spelling: Spelling = "ascii") -> list[str]:
    """All role/end/tool tags of one spelling, bos first: what a tokenizer must hold as special tokens."""
    return list(_tags(spelling).values())


def _tags(spelling: str) -> dict[str, str]:
    if spelling not in SPECIAL_TOKENS:
        from tifaforge.errors import TifaError

        raise TifaError(f"unknown tag spelling {spelling!r}; expected one of {', '.join(SPELLINGS)}")
    return SPECIAL_TOKENS[spelling]


def _respell(template: str, spelling: str) -> str:
    """Swap the card's ASCII-bar tags for `spelling`'s, tag by tag (nothing else contains them)."""
    for name, tag in _tags(spelling).items():
        template = template.replace(SPECIAL_TOKENS["ascii"][name], tag)
    return template


def _edit(template: str, old: str, new: str) -> str:
    """Replace one fragment that must occur exactly once, so a changed seed fails loudly here."""
    if template.count(old) != 1:
        raise ValueError(f"seed template fragment not found exactly once: {old[:60]}")
    return template.replace(old, new)


def _fixed_seed() -> str:
    r"""The card's template with two fixes that change nothing it renders for valid input.

    1. `'\\n'` -> `'\n'`: the card's JSON-escaping leftover renders backslash + `n`; DeepSeek's own
       template renders a newline there.
    2. `message['content'] is none` -> `message.get('content') is none`: transformers drops keys whose
       value is None before rendering, so a tool-call turn (content None) would raise UndefinedError.
    """
    t = SEED_TEMPLATE.replace("\\\\n", "\\n")
    for test in ("is none", "is not none"):
        t = _edit(t, f"message['content'] {test}", f"message.get('content') {test}")
    return t


def seed_template(spelling: Spelling = "ascii") -> str:
    """The card's template as a tokenizer should carry it: tags respelled for `spelling`, fixed as in
    `_fixed_seed` (real newlines in tool calls, tool-call turns render through transformers)."""
    return _respell(_fixed_seed(), spelling)


# The training form's two edits: when the FINAL message is an assistant turn, keep its think block and
# wrap content + end tag in {% generation %} so return_assistant_tokens_mask (TRL assistant_only_loss)
# marks it. The role tag stays outside: it is the end of the prompt. Earlier turns render as the seed.
_EOS = "'<|end▁of▁sentence|>'"
_FINAL_TURN = "{% generation %}{{message['content'] + " + _EOS + "}}{% endgeneration %}"
_TRAINING_EDITS = (
    (
        "{%- if ns.is_tool %}",
        "{%- if ns.is_tool and loop.last %}{{'<|tool▁outputs▁end|>'}}" + _FINAL_TURN
        + "{%- set ns.is_tool = false -%}{%- elif ns.is_tool %}",
    ),
    (
        "{%- else %}{% set content = message['content'] %}",
        "{%- elif loop.last %}{{'<|Assistant|>'}}" + _FINAL_TURN
        + "{%- else %}{% set content = message['content'] %}",
    ),
)


def training_template(spelling: Spelling = "ascii") -> str:
    """The seed template whose final assistant turn keeps its think block and is marked for the loss.

    Any conversation not ending in an assistant turn renders exactly as `seed_template` does, so
    every prompt the model sees at inference is a prefix of what it was trained on. A final turn that
    is a tool call (content None) is not marked: the seed never closes a single tool call.
    """
    t = _fixed_seed()
    for old, new in _TRAINING_EDITS:
        t = _edit(t, old, new)
    return _respell(t, spelling)


# The serving form (`tifa serve`, and the template written into GGUF files), with what front ends mean
# where the seed's template is silent or hoists: system messages after the first turn (SillyTavern's
# Author's Note and lorebook entries at depth, its Continue and Impersonate instructions) are rendered
# where they stand, on the user side before the next assistant tag (merged into a user turn they
# follow); leading system messages are joined at the top; and a conversation that ends with an
# assistant message, rendered without a generation prompt, stays open: no end tag, so the model
# continues that message in place. A system prompt followed by turns renders exactly as the seed.
_SERVING_EDITS = (
    (
        "system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
        "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}",
        "system_prompt='', in_chat=false, user_side=false) %}{%- for message in messages %}"
        "{%- if message['role'] != 'system' %}{% set ns.in_chat = true %}{%- elif not ns.in_chat %}"
        "{% set ns.system_prompt = ns.system_prompt + ('\n\n' if ns.system_prompt else '') + message['content'] %}"
        "{%- endif %}{%- endfor %}{% set ns.in_chat = false %}",
    ),
    (
        "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}",
        "{%- if message['role'] == 'system' and ns.in_chat %}"
        "{{('\n\n' if ns.user_side else '<|User|>') + message['content']}}{%- set ns.user_side = true -%}"
        "{%- endif %}{%- if message['role'] != 'system' %}{% set ns.in_chat = true %}{%- endif %}"
        "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{%- set ns.user_side = true -%}",
    ),
    (
        "{%- if message['role'] == 'assistant' and message.get('content') is not none %}",
        "{%- if message['role'] == 'assistant' and message.get('content') is not none %}"
        "{%- set ns.user_side = false -%}",
    ),
    (
        "{%- if message['role'] == 'assistant' and message.get('content') is none %}",
        "{%- if message['role'] == 'assistant' and message.get('content') is none %}{%- set ns.user_side = false -%}",
    ),
    (
        "{{'<|Assistant|>' + content + '<|end▁of▁sentence|>'}}",
        "{{'<|Assistant|>' + content}}{%- if not (loop.last and not add_generation_prompt) %}"
        "{{'<|end▁of▁sentence|>'}}{%- endif %}",
    ),
)


def serving_template(spelling: Spelling = "ascii") -> str:
    """The seed template with the serving rules above, in `spelling`'s tags."""
    t = _fixed_seed()
    for old, new in _SERVING_EDITS:
        t = _edit(t, old, new)
    return _respell(t, spelling)


# ---------------------------------------------------------------------------------------------------
# Rendering through a tokenizer (transformers' sandboxed Jinja)


def render(messages: list[dict], tokenizer, *, add_generation_prompt: bool = False, tools=None,
           training: bool = False) -> str:
    """The conversation as text, through the tokenizer's own chat template (or, with `training`, the
    training form in the tokenizer's tag spelling): the one path inference and data prep share."""
    chat_template = training_template(_spelling_or_raise(tokenizer)) if training else None
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_template,
                                         add_generation_prompt=add_generation_prompt, tokenize=False)


def render_serving(messages: list[dict], tokenizer, *, continue_final: bool = False) -> str:
    """A request's prompt: the serving form when the tokenizer carries the seed's tags (else its own
    template, with transformers' `continue_final_message`). `continue_final`: the last message is an
    assistant message to continue in place, not a turn to answer."""
    spelling = detect_spelling(tokenizer) if hasattr(tokenizer, "get_added_vocab") else None  # llama.cpp's: its own
    if spelling is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=not continue_final,
                                             continue_final_message=continue_final, tokenize=False)
    return tokenizer.apply_chat_template(messages, chat_template=serving_template(spelling),
                                         add_generation_prompt=not continue_final, tokenize=False)


def training_tokens(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) for a conversation ending in an assistant turn: the mask is 1 exactly on
    that turn's think block, answer and end tag (transformers maps the generation span to tokens)."""
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant" or last.get("content") is None:
        from tifaforge.errors import TifaError

        raise TifaError("a training conversation must end in an assistant turn with content")
    template = training_template(_spelling_or_raise(tokenizer))
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def _spelling_or_raise(tokenizer) -> Spelling:
    spelling = detect_spelling(tokenizer)
    if spelling is None:
        from tifaforge.errors import TifaError

        raise TifaError("tokenizer has no role tags of either spelling (<|User|> or <｜User｜>) as tokens")
    return spelling


# ---------------------------------------------------------------------------------------------------
# Checks: a tag that is not a single token of the tokenizer is split into plain text and silently
# ruins training and chat, so `tifa doctor` and model loading report it.

_TAG_RE = re.compile(r"<[|\uff5c][^<>|\uff5c]+[|\uff5c]>")


def _single_token(tokenizer, tag: str) -> bool:
    """True when `tag` is an added token (matched before BPE, in any context) and encodes as one id."""
    return tag in tokenizer.get_added_vocab() and len(tokenizer.encode(tag, add_special_tokens=False)) == 1


def detect_spelling(tokenizer) -> Spelling | None:
    """Which spelling of the role tags the tokenizer holds as tokens, judged by its User tag."""
    return next((s for s in SPELLINGS if _single_token(tokenizer, SPECIAL_TOKENS[s]["user"])), None)


def check_template(tokenizer) -> list[str]:
    """Problems with the tokenizer's chat template, one line each; [] when it is fit to use.

    A tag need not be flagged `special` (DeepSeek-R1-Distill-Qwen marks <｜User｜> non-special); it
    must be one added token, or it is split into plain text.
    """
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        return ["tokenizer has no chat template (expected the seed's; see seed_template())"]
    problems = _render_problems(tokenizer)
    problems += _spelling_problems(tokenizer, template)
    tags = dict.fromkeys(_TAG_RE.findall(template))  # in order, once each
    problems += [p for tag in tags if (p := _tag_problem(tokenizer, tag))]
    return problems + _eos_and_think_problems(tokenizer, template)


def _tag_problem(tokenizer, tag: str) -> str | None:
    """Why `tag` would not reach the model as one token. An ordinary vocabulary entry is not enough:
    it is only matched when pre-tokenization happens to isolate it (e.g. a GGUF read-back that lost
    the tags' control type)."""
    if _single_token(tokenizer, tag):
        return None
    n = len(tokenizer.encode(tag, add_special_tokens=False))
    why = f"it encodes as {n} plain-text tokens" if n > 1 else "it is an ordinary vocabulary entry, not added"
    return f"template tag {tag} is not a single special token of the tokenizer ({why})"


def _render_problems(tokenizer) -> list[str]:
    """Render a one-turn probe: catches a malformed template (with its line) or one that crashes."""
    import jinja2

    try:
        render([{"role": "user", "content": "你好"}], tokenizer, add_generation_prompt=True)
    except jinja2.TemplateSyntaxError as e:
        return [f"chat template is malformed (Jinja line {e.lineno}): {e.message}"]
    except Exception as e:  # noqa: BLE001 - any failure here is a problem to report, not to raise
        return [f"chat template fails to render a one-turn chat: {type(e).__name__}: {e}"]
    return []


def _spelling_problems(tokenizer, template: str) -> list[str]:
    """The template's tags must be spelled as the tokenizer's; say which spelling each uses."""
    used = {s for s in SPELLINGS if SPECIAL_TOKENS[s]["user"] in template}
    have = detect_spelling(tokenizer)
    if len(used) > 1:
        return ["chat template mixes ascii (<|User|>) and fullwidth (<｜User｜>) tag spellings"]
    if used and have and used != {have}:
        return [f"chat template uses the {used.pop()} tag spelling but the tokenizer uses {have} "
                f"({SPECIAL_TOKENS[have]['user']}); use seed_template({have!r})"]
    if have is None:
        return ["tokenizer has no role tags of either spelling (<|User|> or <｜User｜>) as tokens"]
    return []


def _eos_and_think_problems(tokenizer, template: str) -> list[str]:
    """Generation stops at eos_token, so it must be the template's end tag; think tags must survive
    decode(skip_special_tokens=True), so they must not be special."""
    problems = []
    ends = [SPECIAL_TOKENS[s]["eos"] for s in SPELLINGS if SPECIAL_TOKENS[s]["eos"] in template]
    if ends and tokenizer.eos_token not in ends:
        problems.append(f"eos_token is {tokenizer.eos_token!r} but the template ends turns with {ends[0]}: "
                        "generation would not stop at the end of a turn")
    for tag in THINK_TOKENS:
        if tag in tokenizer.all_special_tokens:
            problems.append(f"{tag} is a special token: decoding with skip_special_tokens would drop it")
    return problems


# ---------------------------------------------------------------------------------------------------
# Think blocks


def split_reasoning(text: str, *, started_in_think: bool = False) -> tuple[str | None, str]:
    """Split a generated answer into (reasoning, content) at the last `</think>`, as the seed does.

    `started_in_think`: the prompt already ended with `<think>`, so the text has no opening tag.
    An answer cut off inside its think block gives (reasoning so far, ""); no think block at all gives
    (None, text). Newlines around the reasoning and whitespace before the answer are dropped.
    """
    if THINK_CLOSE in text:
        head, _, content = text.rpartition(THINK_CLOSE)
        start = head.find(THINK_OPEN)
        reasoning = head[start + len(THINK_OPEN):] if start >= 0 else head
        return reasoning.strip("\n"), content.lstrip()
    if text.lstrip().startswith(THINK_OPEN):  # cut off inside a block it opened itself
        return text.lstrip()[len(THINK_OPEN):].strip("\n"), ""
    if started_in_think:  # cut off inside a block the prompt opened
        return text.strip("\n"), ""
    return None, text


def strip_think(text: str) -> str:
    """What an earlier assistant turn keeps in the history: the text after its last `</think>`,
    exactly as the seed template cuts it (idempotent: the result holds no `</think>`)."""
    return text.split(THINK_CLOSE)[-1]


# ---------------------------------------------------------------------------------------------------
# The card's role-play prompt style, a plain-text prompt (no chat template):
#   <system>…</system>\n<user>…</user>\n<think>\n…\n</think>\n<角色名>
# The model continues in character after the opening name tag.


@dataclass(frozen=True)
class RoleplayPrompt:
    system: str
    user: str
    character: str
    think: str | None = None


_ROLEPLAY_RE = re.compile(
    r"<system>(?P<system>.*?)</system>\n<user>(?P<user>.*?)</user>\n"
    r"(?:<think>\n(?P<think>.*?)\n</think>\n)?<(?P<character>[^<>/\n]+)>",
    re.DOTALL,
)


def roleplay_prompt(system: str, user: str, character: str, think: str | None = None) -> str:
    """The card's role-play prompt: `think` (the author's notes on how to play the scene) becomes a
    closed think block; None leaves it out. The prompt ends with the character's opening tag."""
    if not character or any(c in character for c in "<>/\n"):
        from tifaforge.errors import TifaError

        raise TifaError(f"character name {character!r} must be non-empty, one line, without < > /")
    parts = [f"<system>{system}</system>", f"<user>{user}</user>"]
    if think is not None:
        parts.append(f"{THINK_OPEN}\n{think.strip(chr(10))}\n{THINK_CLOSE}")
    return "\n".join(parts + [f"<{character}>"])


def parse_roleplay_prompt(text: str) -> RoleplayPrompt:
    """Read a prompt written by `roleplay_prompt` (or by hand in the card's style) back into parts."""
    m = _ROLEPLAY_RE.fullmatch(text)
    if m is None:
        from tifaforge.errors import TifaError

        raise TifaError("not a role-play prompt: expected <system>…</system>\\n<user>…</user>\\n"
                        "[<think>\\n…\\n</think>\\n]<角色名>")
    return RoleplayPrompt(**m.groupdict())


class ThinkStreamSplitter:
    """Split a streamed answer into ("reasoning", text) and ("content", text) pieces as it arrives.

    Agrees with `split_reasoning` on well-formed answers (one think block first); a tag split across
    deltas is held back until whole, so no client sees half a `</think>`. Departure for malformed
    text: the stream closes the block at the FIRST `</think>` (it cannot wait for a later one).
    """

    def __init__(self, started_in_think: bool = False):
        self.state = "think" if started_in_think else "pre"  # pre | think | post | plain
        self.lead = True  # drop newlines right after <think> / whitespace right after </think>
        self.buf = ""

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            before = (self.state, len(self.buf))
            getattr(self, f"_{self.state}")(out, final)
            if (self.state, len(self.buf)) == before or not self.buf:
                return out

    def _pre(self, out, final):
        head = self.buf.lstrip()
        if head.startswith(THINK_OPEN):
            self.buf, self.state, self.lead = head[len(THINK_OPEN):], "think", True
        elif final or not THINK_OPEN.startswith(head):
            self.state = "plain"

    def _think(self, out, final):
        if self.lead:
            self.buf = self.buf.lstrip("\n")
            self.lead = not self.buf
        i = self.buf.find(THINK_CLOSE)
        if i >= 0:
            _emit(out, "reasoning", self.buf[:i].rstrip("\n"))
            self.buf, self.state, self.lead = self.buf[i + len(THINK_CLOSE):], "post", True
            return
        keep = 0 if final else _partial_suffix(self.buf, THINK_CLOSE)
        body = self.buf[: len(self.buf) - keep]
        held = body.rstrip("\n")  # trailing newlines may precede </think>
        _emit(out, "reasoning", held)
        self.buf = "" if final else self.buf[len(held):]

    def _post(self, out, final):
        if self.lead:
            self.buf = self.buf.lstrip()
            self.lead = not self.buf
        self._plain(out, final)

    def _plain(self, out, final):
        _emit(out, "content", self.buf)
        self.buf = ""


def _emit(out: list, kind: str, text: str) -> None:
    if text:
        out.append((kind, text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# ---------------------------------------------------------------------------------------------------
# Tool calls in the seed template's syntax. The seed renders calls and outputs but not the tools
# themselves: they are described in the system prompt (as DeepSeek's own templates do), and a reply
# that calls them is parsed back from the tags.

def tools_prompt(tools: list[dict]) -> str:
    """The system prompt's description of the callable functions (OpenAI `tools` entries)."""
    import json

    lines = ["## Tools", "You can call the functions below. To call one, reply with the tool-call tags, the "
             "function's name and its arguments as a JSON object in a ```json block; you get its output next."]
    for tool in tools:
        f = tool.get("function", tool)
        lines += [f"### {f['name']}", *([f["description"]] if f.get("description") else []),
                  "Parameters: " + json.dumps(f.get("parameters") or {"type": "object", "properties": {}},
                                             ensure_ascii=False)]
    return "\n".join(lines)


def _tool_call_re(spelling: Spelling) -> re.Pattern:
    t = {k: re.escape(v) for k, v in _tags(spelling).items()}
    return re.compile(rf"{t['tool_call_begin']}(?P<type>[^\n<]*?){t['tool_sep']}(?P<name>[^\n]+)\n```(?:json)?\n"
                      rf"(?P<arguments>.*?)\n?```\s*{t['tool_call_end']}", re.DOTALL)


def parse_tool_calls(text: str, spelling: Spelling) -> tuple[str, list[dict]]:
    """(the text before the calls, [{"name", "arguments"}]) from a reply in the seed's tool-call
    syntax; ([], text) when it calls nothing. A block the reply opened but never finished gives the
    calls it did finish (a reply cut by max_tokens)."""
    begin = _tags(spelling)["tool_calls_begin"]
    at = text.find(begin)
    if at < 0:
        return text, []
    calls = [{"name": m["name"].strip(), "arguments": m["arguments"].strip()}
             for m in _tool_call_re(spelling).finditer(text, at)]
    return text[:at], calls

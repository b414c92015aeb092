"""Character cards (SillyTavern Character Card V2 and V3, JSON or PNG) and the system prompt they become.

    tifa chat RUN --card data/demo/cards/lin_xiaoman.png --user 阿宁

A PNG card carries its JSON base64-encoded in a `tEXt` chunk: `ccv3` (V3) and/or `chara` (V2, also
written by V3 tools for older readers). We read chunks with the stdlib and never decode pixels; the
file, each text chunk and the decoded JSON are capped, so a hostile card cannot exhaust memory.
Unknown fields (extensions, lorebooks, tool-specific keys) are kept and written back on export.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tifaforge.errors import TifaError
from tifaforge.utils import loads_json, open_regular, read_bounded

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 32 * 1024 * 1024  # whole file; avatars are a few MB at most
MAX_TEXT_CHUNK_BYTES = 8 * 1024 * 1024  # one tEXt chunk (base64 of a card with a big lorebook)
MAX_JSON_BYTES = 6 * 1024 * 1024  # the decoded card JSON
CARD_KEYWORDS = ("ccv3", "chara")  # preference order

V2_SPEC, V3_SPEC = "chara_card_v2", "chara_card_v3"
TEXT_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example",
               "system_prompt", "post_history_instructions", "creator_notes")


@dataclass
class Card:
    """A character card: `data` holds every field of the card's `data` object (unknown ones too);
    `top` holds the other top-level keys (spec, spec_version, tool-specific extras)."""

    data: dict[str, Any]
    top: dict[str, Any] = field(default_factory=dict)
    source: str = "<card>"
    warnings: list[str] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return self.top.get("spec", V2_SPEC)

    def get(self, key: str) -> str:
        """A text field, "" when absent or not a string (cards in the wild often leave them null)."""
        value = self.data.get(key)
        return value if isinstance(value, str) else ""

    @property
    def name(self) -> str:
        return self.get("name")

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON: the original top-level keys, in place, with `data` updated."""
        return {**self.top, "data": self.data}


# --- parsing the JSON object ---------------------------------------------------------------

def card_from_dict(obj: Any, source: str = "<card>") -> Card:
    """A card from its JSON object: V2/V3 (`spec` + `data`) or a V1 card (flat fields, no spec).

    A V1 card is lifted into V2 form; its flat fields stay in `top` only if they were not card
    fields, so a re-export is a valid V2 card with nothing lost.
    """
    if not isinstance(obj, dict):
        raise TifaError(f"{source}: a character card must be a JSON object, got {type(obj).__name__}")
    spec = obj.get("spec")
    if spec in (V2_SPEC, V3_SPEC):
        data = obj.get("data")
        if not isinstance(data, dict):
            raise TifaError(f"{source}: {spec} card has no `data` object")
        top = {k: v for k, v in obj.items() if k != "data"}
    elif spec is None and isinstance(obj.get("name"), str):
        data = {k: v for k, v in obj.items() if k in TEXT_FIELDS or k in ("tags", "alternate_greetings")}
        top = {"spec": V2_SPEC, "spec_version": "2.0",
               **{k: v for k, v in obj.items() if k not in data}}
    else:
        raise TifaError(f"{source}: not a character card (spec {spec!r}; expected "
                        f"{V2_SPEC!r}, {V3_SPEC!r} or a V1 card with a name)")
    card = Card(data=dict(data), top=top, source=source)
    _check_fields(card)
    return card


def _check_fields(card: Card) -> None:
    """A card needs a name to be played; other text fields must be strings when present."""
    if not card.name.strip():
        raise TifaError(f"{card.source}: card has no name (data.name)")
    for key in TEXT_FIELDS:
        value = card.data.get(key)
        if value is not None and not isinstance(value, str):
            raise TifaError(f"{card.source}: data.{key} must be a string, got {type(value).__name__}")


def _decode_card_json(raw: bytes, source: str) -> Any:
    """base64 → JSON, with the decoded size checked before decoding (3 bytes per 4 characters)."""
    raw = raw.strip()
    if len(raw) * 3 // 4 > MAX_JSON_BYTES:
        raise TifaError(f"{source}: card JSON is over the {MAX_JSON_BYTES} byte cap")
    try:
        text = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as e:
        raise TifaError(f"{source}: card chunk is not base64-encoded UTF-8 JSON ({e})") from None
    return loads_json(text, source)


# --- PNG chunks ----------------------------------------------------------------------------

def read_png_text_chunks(path: str | Path, keywords: tuple[str, ...] = CARD_KEYWORDS) -> dict[str, bytes]:
    """The `tEXt` chunks named in `keywords` as {keyword: text bytes}, without decoding pixels.

    Errors (TifaError naming the file): not a PNG, file over MAX_PNG_BYTES, a chunk running past the
    end or no IEND (truncated), a text chunk over MAX_TEXT_CHUNK_BYTES. CRCs are not checked: editors
    that rewrite cards sometimes get them wrong and the JSON carries its own structure.
    """
    path = Path(path)
    blob = read_bounded(path, MAX_PNG_BYTES, "card")
    if not blob.startswith(PNG_MAGIC):
        raise TifaError(f"{path}: not a PNG file (bad signature)")
    found: dict[str, bytes] = {}
    for ctype, start, length in _iter_chunks(blob, path):
        if ctype == b"tEXt":
            if length > MAX_TEXT_CHUNK_BYTES:
                raise TifaError(f"{path}: tEXt chunk at byte {start - 8} is {length} bytes, over the "
                                f"{MAX_TEXT_CHUNK_BYTES} byte cap")
            key, _, text = blob[start:start + length].partition(b"\0")
            name = key.decode("latin-1")
            if name in keywords and name not in found:
                found[name] = text
    return found


def _iter_chunks(blob: bytes, path: Path):
    """Yield (type, data start, length) up to IEND; a chunk past the end of the file is an error."""
    pos = len(PNG_MAGIC)
    while True:
        if pos + 8 > len(blob):
            raise TifaError(f"{path}: truncated PNG (no IEND chunk; file ends at byte {len(blob)})")
        length, ctype = struct.unpack(">I4s", blob[pos:pos + 8])
        end = pos + 8 + length + 4  # header, data, CRC
        if end > len(blob):
            raise TifaError(f"{path}: truncated PNG ({ctype.decode('latin-1')!r} chunk at byte {pos} "
                            f"declares {length} bytes, file ends at byte {len(blob)})")
        if ctype == b"IEND":
            return
        yield ctype, pos + 8, length
        pos = end


def _card_from_png(path: Path) -> Card:
    """Prefer `ccv3`; if it is missing or unreadable, use `chara` (with a warning if ccv3 was bad)."""
    chunks = read_png_text_chunks(path)
    if not chunks:
        raise TifaError(f"{path}: PNG has no character card (no 'ccv3' or 'chara' tEXt chunk)")
    problem = None
    for key in CARD_KEYWORDS:
        if key not in chunks:
            continue
        try:
            card = card_from_dict(_decode_card_json(chunks[key], f"{path} [{key}]"), str(path))
        except TifaError as e:
            if key == "chara" or "chara" not in chunks:
                raise
            problem = f"{path}: ignoring malformed 'ccv3' chunk, using 'chara' instead: {e}"
            continue
        if problem:
            warnings.warn(problem, UserWarning, stacklevel=3)
            card.warnings.append(problem)
        return card
    raise AssertionError("unreachable")  # pragma: no cover


def load_card(path: str | Path) -> Card:
    """Load a card from a `.json` or `.png` file (the PNG signature decides, not the suffix)."""
    path = Path(path)
    blob_head = _read_head(path)
    if blob_head.startswith(PNG_MAGIC):
        return _card_from_png(path)
    raw = read_bounded(path, MAX_JSON_BYTES, "card")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TifaError(f"{path}: not a PNG and not UTF-8 JSON (byte {e.start})") from None
    return card_from_dict(loads_json(text, str(path)), str(path))


def _read_head(path: Path) -> bytes:
    with open_regular(path, "card") as f:
        return f.read(len(PNG_MAGIC))


# --- writing -------------------------------------------------------------------------------

def write_card_json(card: Card, path: str | Path) -> None:
    """Write the card as JSON, keeping every field it was read with."""
    from tifaforge.utils import atomic_write_json

    atomic_write_json(path, card.to_dict())


def write_card_png(card: Card, path: str | Path, image: bytes | None = None) -> None:
    """Write the card into a PNG: `image` (PNG bytes; a 1x1 pixel when None) with its old card
    chunks removed and new ones put before IEND. A V3 card gets `ccv3` plus a V2 `chara` copy for
    older readers, as SillyTavern does; a V2 card gets `chara` only.
    """
    from tifaforge.utils import atomic_write_bytes

    image = image if image is not None else tiny_png()
    kept = [c for c in _split_chunks(image, Path(str(path))) if not _is_card_chunk(c)]
    chara = _text_chunk("chara", {**card.to_dict(), "spec": V2_SPEC, "spec_version": "2.0"})
    new = [_text_chunk("ccv3", card.to_dict()), chara] if card.spec == V3_SPEC else [chara]
    atomic_write_bytes(path, PNG_MAGIC + b"".join(kept[:-1] + new + kept[-1:]))


def _split_chunks(blob: bytes, path: Path) -> list[bytes]:
    """The raw chunks (with header and CRC) of a PNG, IEND last."""
    if not blob.startswith(PNG_MAGIC):
        raise TifaError(f"{path}: image to embed the card in is not a PNG")
    out = [blob[start - 8:start + length + 4] for _, start, length in _iter_chunks(blob, path)]
    return out + [png_chunk(b"IEND", b"")]


def _is_card_chunk(chunk: bytes) -> bool:
    return chunk[4:8] == b"tEXt" and chunk[8:].split(b"\0", 1)[0].decode("latin-1") in CARD_KEYWORDS


def _text_chunk(keyword: str, obj: dict) -> bytes:
    payload = base64.b64encode(json.dumps(obj, ensure_ascii=False).encode("utf-8"))
    return png_chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + payload)


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC over type and data."""
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def tiny_png(rgb: tuple[int, int, int] = (200, 180, 220)) -> bytes:
    """A valid 1x1 RGB PNG, the image for cards written without one."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + bytes(rgb))
    return PNG_MAGIC + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# --- macros and the system prompt ------------------------------------------------------------

_CHAR_RE = re.compile(r"\{\{\s*char\s*\}\}|<bot>", re.IGNORECASE)
_USER_RE = re.compile(r"\{\{\s*user\s*\}\}|<user>", re.IGNORECASE)
_ORIGINAL_RE = re.compile(r"\{\{\s*original\s*\}\}", re.IGNORECASE)


def expand_macros(text: str, char: str, user: str) -> str:
    """Replace `{{char}}`/`<BOT>` and `{{user}}`/`<USER>` (any case, as SillyTavern does)."""
    text = _CHAR_RE.sub(lambda _: char, text)
    return _USER_RE.sub(lambda _: user, text)


def is_chinese(card: Card) -> bool:
    """Whether the card is written mostly in Chinese: picks the labels of the system prompt."""
    text = card.name + card.get("description") + card.get("personality") + card.get("scenario")
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    letters = sum(ch.isascii() and ch.isalpha() for ch in text)
    return cjk > 0 and cjk * 4 >= letters  # an English word is ~5 letters, a Chinese one 1-2 characters


_LABELS = {
    True: {"default": "你是{{char}}，正在与{{user}}进行角色扮演。始终以{{char}}的身份、语气和视角回应，"
                      "不要替{{user}}说话或行动，不要跳出角色。",
           "character": "[角色：{name}]", "personality": "性格：", "scenario": "场景：",
           "examples": "对话示例：", "note": "注意："},
    False: {"default": "You are {{char}}, role-playing with {{user}}. Always answer as {{char}}, in "
                       "{{char}}'s voice and point of view; never speak or act for {{user}}, never "
                       "break character.",
            "character": "[Character: {name}]", "personality": "Personality: ",
            "scenario": "Scenario: ", "examples": "Example dialogue:", "note": "Note: "},
}


def card_to_system_prompt(card: Card, user_name: str | None = None) -> str:
    """The system prompt a card becomes: its system_prompt (or our default; `{{original}}` in it
    means the default), then description, personality, scenario, example dialogue and the
    post-history instructions, with the macros expanded. Labels follow the card's language.
    """
    zh = is_chinese(card)
    labels = _LABELS[zh]
    user = user_name or ("用户" if zh else "User")
    system = card.get("system_prompt").strip()
    system = _ORIGINAL_RE.sub(lambda _: labels["default"], system) if system else labels["default"]
    header = labels["character"].format(name=card.name)
    parts = [system, f"{header}\n{card.get('description').strip()}".strip()]
    for key in ("personality", "scenario"):
        if card.get(key).strip():
            parts.append(labels[key] + card.get(key).strip())
    if card.get("mes_example").strip():
        parts.append(f"{labels['examples']}\n{_format_examples(card.get('mes_example'))}")
    if card.get("post_history_instructions").strip():
        parts.append(labels["note"] + card.get("post_history_instructions").strip())
    return expand_macros("\n\n".join(parts), card.name, user)


def _format_examples(text: str) -> str:
    """SillyTavern separates example chats with `<START>` lines; we keep them as blank lines."""
    blocks = [b.strip() for b in re.split(r"^\s*<START>\s*$", text, flags=re.IGNORECASE | re.MULTILINE)]
    return "\n\n".join(b for b in blocks if b)


def resolve_card(value: str | dict, base_dir: str | Path = ".") -> Card:
    """A JSONL record's `card`: a path (relative to the JSONL file's folder) or an inline card."""
    if isinstance(value, dict):
        return card_from_dict(value, "<inline card>")
    path = Path(value)
    return load_card(path if path.is_absolute() else Path(base_dir) / path)

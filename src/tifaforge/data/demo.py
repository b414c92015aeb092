"""The bundled demo data, regenerated deterministically from hand-written material.

    python -c "from tifaforge.data.demo import demo_command; demo_command('data/demo')"

Everything comes from `tifaforge/assets/demo/` (original to this project, Apache-2.0): phrase banks
and hand-written chapters for the novels, role-play situations (user lines, think notes, in-character
answers) and prompts, and character cards. The generator only combines them with a seeded RNG, so
the same seed always gives byte-identical files; the generated files are committed in `data/demo/`.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tifaforge.chat.cards import PNG_MAGIC, Card, card_from_dict, card_to_system_prompt, expand_macros, \
    png_chunk, write_card_json, write_card_png
from tifaforge.utils import atomic_write_bytes, atomic_write_text

SEED = 20250214  # the card's release date; any fixed value would do
GBK_BOOKS = {"zh-wuxia-2", "zh-campus-1"}  # stored in GBK, so ingest's encoding detection has work


def _asset(name: str) -> str:
    return resources.files("tifaforge").joinpath("assets", "demo", name).read_text(encoding="utf-8")


# --- reading the hand-written material -----------------------------------------------------

def parse_bank(text: str) -> dict[str, dict[str, list]]:
    """`== section` headers, `key: value` lines (values accumulate into lists), `-- name` starts a
    sub-block (collected under the key `name`). Returns {section: {key: [values] | [sub-blocks]}}."""
    sections: dict[str, dict[str, list]] = {}
    block = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("== "):
            block = sections.setdefault(line[3:].strip(), {})
            current = block
        elif line.startswith("-- "):
            current = {}
            block.setdefault(line[3:].strip(), []).append(current)
        else:
            key, _, value = line.partition(": ")
            target = block if key in ("open", "style", "prompt", "eval_prompt") else current
            target.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_passages(text: str) -> list[tuple[str, str, str]]:
    """`@@ genre title` then the text, until the next `@@`: [(genre, title, text)]."""
    out = []
    for chunk in text.split("\n@@ ")[1:]:
        head, _, body = chunk.partition("\n")
        genre, _, title = head.strip().partition(" ")
        out.append((genre, title, body.strip()))
    return out


# --- novels --------------------------------------------------------------------------------

_CN_DIGITS = "零一二三四五六七八九"


def chinese_number(n: int) -> str:
    """1..99 in Chinese numerals, as web novels number their chapters (第十二章)."""
    tens, ones = divmod(n, 10)
    head = "" if tens == 0 else ("十" if tens == 1 else _CN_DIGITS[tens] + "十")
    return head + (_CN_DIGITS[ones] if ones or not head else "")


@dataclass
class Lang:
    """How one language strings the bank's phrases together."""

    setting: str
    speak: list[str]
    chapter: str
    book: str
    sep: str = ""


ZH = Lang(setting="{time}，{place}。{weather}。", chapter="第{cn}章　{title}", book="《{title}》",
          speak=["{x}{act}，{say}：“{talk}”", "{x}{act}：“{talk}”", "“{talk}”{x}{act}。"])
EN = Lang(setting="It was {time} at {place}, and {weather}.", chapter="Chapter {n}: {title}",
          book="{title}", sep=" ",
          speak=['{x} {act}. "{talk}"', '"{talk_c}" {x} {say}.', '{x} {act} and {say}, "{talk}"'])


class _Deck:
    """Draws phrases for one chapter without repeats until a pool runs dry: generated text that
    loops on one sentence would teach the model exactly the repetition the DPO stage removes."""

    def __init__(self, pools: dict[str, list[str]], rng: random.Random):
        self.pools, self.rng, self.used = pools, rng, set()

    def __call__(self, key: str) -> str:
        pool = self.pools[key]
        pick = self.rng.choice([p for p in pool if p not in self.used] or pool)
        self.used.add(pick)
        return pick


def _say(lang: Lang, draw: _Deck, who: str, talk: str) -> str:
    """One spoken line; in English a quoted statement before its tag ends with a comma."""
    talk_c = talk[:-1] + "," if talk.endswith(".") else talk
    return draw.rng.choice(lang.speak).format(x=who, act=draw("act"), say=draw("say"), talk=talk,
                                              talk_c=talk_c)


def _exchange(lang: Lang, draw: _Deck, x: str, y: str) -> str:
    """One paragraph of dialogue: x says a line, y answers it; sometimes an action comes first."""
    talk, _, reply = draw("pair").partition("|")
    para = [_say(lang, draw, x, talk), _say(lang, draw, y, reply)]
    if draw.rng.random() < 0.35:
        para.insert(0, draw("move").format(a=x))
    return lang.sep.join(para)


def _chapter(lang: Lang, pools: dict, rng: random.Random) -> str:
    """A generated chapter: setting and scene, then exchanges mixed with senses and thoughts."""
    draw = _Deck(pools, rng)
    a, b = rng.sample(pools["name"], 2)
    slots = {k: draw(k) for k in ("time", "place", "weather")}
    paras = [lang.setting.format(**slots) + lang.sep + draw("scene").format(a=a)]
    for _ in range(rng.randint(14, 22)):
        x, y = (a, b) if rng.random() < 0.5 else (b, a)
        roll = rng.random()
        if roll < 0.55:
            paras.append(_exchange(lang, draw, x, y))
        elif roll < 0.8:
            paras.append(draw("sense") + lang.sep + draw("inner").format(a=x))
        else:
            paras.append(draw("link") + lang.sep + draw("move").format(a=x))
    paras.append(draw("end").format(a=a, b=b))
    return "\n\n".join(paras)


def novel(lang: Lang, bank: dict, genre: str, passages: list[tuple[str, str]], rng: random.Random,
          chapters: int, title: str, noise: bool = False) -> str:
    """One book: generated chapters with the hand-written `passages` placed among them.

    `noise` adds the web-novel boilerplate (chapter-end marks, a site line) that ingest removes.
    """
    pools = {k: bank["common"].get(k, []) + bank[f"genre {genre}"].get(k, []) for k in
             set(bank["common"]) | set(bank[f"genre {genre}"])}
    slots = sorted(rng.sample(range(chapters), min(len(passages), chapters)))
    hand = dict(zip(slots, passages))
    out = [lang.book.format(title=title)]
    for i in range(chapters):
        name, body = hand.get(i) or (rng.choice(pools["chapter"]), _chapter(lang, pools, rng))
        out.append(lang.chapter.format(n=i + 1, cn=chinese_number(i + 1), title=name) + "\n\n" + body)
        if noise and i % 3 == 2:
            out[-1] += "\n\n（本章完）"
    if noise:
        out.insert(1, "本书由演示书站整理，更多章节请访问 www.example.com")
    return "\n\n\n".join(out) + "\n"


def write_novels(out: Path, rng: random.Random) -> list[Path]:
    """Eight Chinese books (two in GBK) and two English ones under novels/ and en/novels/."""
    written = []
    for lang, suffix, books, per_book in ((ZH, "zh", ["wuxia", "xianxia", "urban", "campus"], 2),
                                          (EN, "en", ["harbour", "starship"], 1)):
        bank = parse_bank(_asset(f"novel_{suffix}.txt"))
        passages = parse_passages(_asset(f"passages_{suffix}.txt"))
        for genre in books:
            mine = [(t, body) for g, t, body in passages if g == genre]
            titles = bank[f"genre {genre}"]["book"]
            for k in range(per_book):
                name = f"{suffix}-{genre}-{k + 1}"
                text = novel(lang, bank, genre, mine[k::per_book], rng, 22 if lang is ZH else 12,
                             titles[k], noise=name == "zh-wuxia-2")
                path = out / ("novels" if lang is ZH else "en/novels") / f"{name}.txt"
                encoding = "gbk" if name in GBK_BOOKS else "utf-8"
                atomic_write_bytes(path, text.encode(encoding))
                written.append(path)
    return written


# --- cards ---------------------------------------------------------------------------------

def avatar_png(seed: int, size: int = 32) -> bytes:
    """A small gradient avatar (stdlib only), so demo cards carry a real image."""
    r = random.Random(seed)
    c0, c1 = [r.randrange(80, 240) for _ in range(3)], [r.randrange(80, 240) for _ in range(3)]
    rows = b"".join(b"\x00" + bytes(int(c0[ch] + (c1[ch] - c0[ch]) * (x + y) / (2 * size - 2))
                                    for x in range(size) for ch in range(3)) for y in range(size))
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return PNG_MAGIC + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9)) + \
        png_chunk(b"IEND", b"")


def write_cards(out: Path, lang: str) -> dict[str, tuple[str, Card]]:
    """Write each card in its formats; return {card key: (its first file, relative to out; card)}."""
    main = {}
    for i, entry in enumerate(json.loads(_asset(f"cards_{lang}.json"))):
        card = card_from_dict(entry["card"], entry["file"])
        for fmt in entry["formats"]:
            path = out / "cards" / (entry["file"] + (".json" if fmt == "json" else ".png"))
            if fmt == "json":
                write_card_json(card, path)
            else:
                write_card_png(card, path, avatar_png(i * 7 + len(lang)))
            main.setdefault(entry["file"], (f"cards/{path.name}", card))
    return main


# --- dialogues, prompts, pairs --------------------------------------------------------------

@dataclass
class Character:
    key: str
    card_path: str
    system: str
    greeting: str
    bank: dict = field(default_factory=dict)


def _characters(lang: str, cards: dict[str, tuple[str, Card]]) -> list[Character]:
    """The role-play material of each character, with its card's system prompt and greeting."""
    chars = []
    for section, body in parse_bank(_asset(f"roleplay_{lang}.txt")).items():
        key = section.removeprefix("char ").strip()
        path, card = cards[key]
        greeting = expand_macros(card.get("first_mes"), card.name, "你" if lang == "zh" else "you")
        chars.append(Character(key, path, card_to_system_prompt(card), greeting, body))
    return chars


def _answer(ch: Character, rng: random.Random, think: str, reply: str, sep: str) -> tuple[str, str]:
    """(reasoning, content): the situation's think note plus a style note; an opener sometimes."""
    reasoning = think + sep + rng.choice(ch.bank["style"])
    content = (rng.choice(ch.bank["open"]) + sep + reply) if rng.random() < 0.6 else reply
    return reasoning, content


def _assistant(reasoning: str, content: str, rng: random.Random) -> dict:
    """Most turns inline the think block; some use `reasoning_content`, so both forms are exercised."""
    if rng.random() < 0.2:
        return {"role": "assistant", "content": content, "reasoning_content": reasoning}
    return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{content}"}


def _turns(ch: Character, rng: random.Random, n: int, sep: str) -> list[dict]:
    """n user/assistant exchanges; a situation's follow-up is used as the next turn when it has one."""
    sits = rng.sample(ch.bank["situation"], min(n, len(ch.bank["situation"])))
    msgs = []
    for s in sits:
        msgs += [{"role": "user", "content": rng.choice(s["user"])},
                 _assistant(*_answer(ch, rng, s["think"][0], rng.choice(s["reply"]), sep), rng)]
        if "follow" in s and len(msgs) < 2 * n:
            msgs += [{"role": "user", "content": s["follow"][0]},
                     _assistant(*_answer(ch, rng, s["fthink"][0], s["freply"][0], sep), rng)]
    return msgs[: 2 * n]


def _context(ch: Character, rng: random.Random) -> tuple[dict, list[dict]]:
    """Half the records point at the card file, half carry its system prompt; some open with the
    card's greeting, as a chat front-end would show it."""
    extra, msgs = ({"card": ch.card_path}, []) if rng.random() < 0.5 else \
        ({}, [{"role": "system", "content": ch.system}])
    if rng.random() < 0.25:
        msgs.append({"role": "assistant", "content": ch.greeting})
    return extra, msgs


def sft_records(chars: list[Character], per_char: int, rng: random.Random, lang: str) -> list[dict]:
    """`per_char` distinct dialogues per character, one to three exchanges long."""
    sep = "" if lang == "zh" else " "
    out, seen = [], set()
    for ch in chars:
        made = 0
        while made < per_char:
            extra, msgs = _context(ch, rng)
            msgs += _turns(ch, rng, rng.choices([1, 2, 3], [0.55, 0.3, 0.15])[0], sep)
            key = json.dumps(msgs, ensure_ascii=False)
            if key in seen:
                continue
            seen.add(key)
            made += 1
            out.append({"id": f"{lang}-sft-{len(out) + 1:04d}", "messages": msgs, **extra})
    return out


def prompt_records(chars: list[Character], rng: random.Random, lang: str) -> list[dict]:
    """Each character's prompts; every fifth goes to eval, and the `eval_prompt` ones; a third carry one
    exchange of history."""
    out = []
    for ch in chars:
        for i, text in enumerate(ch.bank["prompt"]):
            msgs = []
            if rng.random() < 0.33:
                s = rng.choice(ch.bank["situation"])
                msgs = [{"role": "user", "content": s["user"][0]},
                        {"role": "assistant", "content": s["reply"][0]}]
            out.append({"id": f"{lang}-{ch.key}-{i + 1:02d}", "card": ch.card_path,
                        "messages": msgs + [{"role": "user", "content": text}],
                        "split": "eval" if i % 5 == 4 else "train"})
    # Held-out only prompts (`eval_prompt`), after the others and from their own generator, so the lines
    # above stay as they were: 10 held-out prompts measured rare events (a looping answer) too loosely.
    extra = random.Random(f"eval-prompts-{lang}")
    for ch in chars:
        for i, text in enumerate(ch.bank.get("eval_prompt", [])):
            msgs = []
            if extra.random() < 0.33:
                s = extra.choice(ch.bank["situation"])
                msgs = [{"role": "user", "content": s["user"][0]}, {"role": "assistant", "content": s["reply"][0]}]
            out.append({"id": f"{lang}-{ch.key}-e{i + 1:02d}", "card": ch.card_path,
                        "messages": msgs + [{"role": "user", "content": text}], "split": "eval"})
    return out


REFUSALS = {"zh": "作为一个AI语言模型，我无法进行角色扮演。如果你有其他问题，我很乐意为你提供帮助。",
            "en": "As an AI language model, I cannot role-play as this character. Is there anything "
                  "else I can help you with?"}


def pair_records(sft: list[dict], n: int, rng: random.Random, lang: str) -> list[dict]:
    """Synthetic pairs from SFT dialogues: the real answer is chosen; rejected is the same answer
    with a sentence repeated (DITTO-style) or, one time in three, an out-of-character refusal."""
    out = []
    for rec in rng.sample(sft, n):
        chosen = rec["messages"][-1]
        text = chosen["content"] if "reasoning_content" not in chosen else \
            f"<think>\n{chosen['reasoning_content']}\n</think>\n\n{chosen['content']}"
        think, _, answer = text.rpartition("</think>\n\n")
        bad = REFUSALS[lang] if len(out) % 3 == 2 else _repeat(answer.strip(), rng, lang)
        out.append({"id": f"{lang}-pair-{len(out) + 1:03d}", "messages": rec["messages"][:-1],
                    **({"card": rec["card"]} if "card" in rec else {}),
                    "chosen": text, "rejected": f"{think}</think>\n\n{bad}", "synthetic": True})
    return out


def _repeat(answer: str, rng: random.Random, lang: str) -> str:
    """Repeat one sentence three times in place: the loop a repetition-prone model falls into."""
    end = "。" if lang == "zh" else ". "
    parts = [p for p in answer.split(end) if p]
    i = rng.randrange(len(parts))
    return end.join(parts[: i + 1] + [parts[i]] * 3 + parts[i + 1:]) + (end.strip() if lang == "en" else "")


def _jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# --- the whole folder ----------------------------------------------------------------------

def write_demo(out_dir: str | Path = "data/demo", seed: int = SEED) -> dict[str, int]:
    """Regenerate every generated file of the demo folder; return counts for the summary."""
    out, rng = Path(out_dir), random.Random(seed)
    counts = {"novel files": len(write_novels(out, rng))}
    for lang, sub, per_char, pairs in (("zh", out, 24, 24), ("en", out / "en", 15, 8)):
        chars = _characters(lang, write_cards(sub, lang))
        sft = sft_records(chars, per_char, rng, lang)
        for name, recs in (("sft", sft), ("prompts", prompt_records(chars, rng, lang)),
                           ("prefs", pair_records(sft, pairs, rng, lang))):
            _jsonl(sub / f"{name}.jsonl", recs)
            counts[f"{lang} {name}"] = len(recs)
    return counts


def demo_command(out_dir: str | Path = "data/demo", seed: int = SEED) -> int:
    """Regenerate the demo data and print what was written."""
    counts = write_demo(out_dir, seed)
    print(f"{out_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0

"""`make demo`: build the tiny model, warm it up on the bundled demo data, answer one role-play turn.

    python -m tifaforge.demo [--steps 300] [--out runs/demo]

Until `tifa pipeline` runs the four stages, this is the whole story on one CPU in a few minutes:
the tiny preset (random Qwen2 + in-process tokenizer + the seed's template), a brief next-token
warm-up on the bundled dialogues (rendered in the template's training form) and novels, then a
scripted turn with a character card through the engine, think block dimmed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "data/demo/cards/shen_qingya.json"
LINE = "沈大侠，外面的雨这么大，你为何独自坐在这里喝酒？"


def _novels(limit_chars: int) -> list[str]:
    """Paragraphs of the bundled novels (two are GBK on purpose: read as GB18030)."""
    out, total = [], 0
    for f in sorted((ROOT / "data/demo/novels").glob("*.txt")):
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("gb18030")
        for chunk in text.split("\n\n"):
            if total > limit_chars:
                return out
            out.append(chunk)
            total += len(chunk)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tifaforge.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    from rich.console import Console

    from tifaforge.chat.session import ChatSession
    from tifaforge.chat.template import render
    from tifaforge.chat.terminal import _stream
    from tifaforge.config import SamplingConfig
    from tifaforge.engine.generate import Engine
    from tifaforge.models.load import load_tokenizer
    from tifaforge.models.presets import init_model, warm_up

    console = Console(highlight=False)
    out = Path(args.out)
    t0 = time.time()
    base = out / "base"
    if not (base / "config.json").exists():
        init_model("tiny", base, seed=0)
    console.print(f"[bold]1.[/] tiny preset at {base} ({time.time() - t0:.0f}s)")
    warm = out / "warm"
    if not (warm / "config.json").exists():
        tok = load_tokenizer(base)
        texts = [render(m, tok, training=True) for m in _dialogues_only()] + _novels(300_000)
        console.print(f"[bold]2.[/] warm-up: {args.steps} steps on {len(texts)} bundled texts (dialogues + novels)...")
        warm_up(base, warm, texts, steps=args.steps)
    console.print(f"[bold]2.[/] warmed-up model at {warm} ({time.time() - t0:.0f}s)")
    engine = Engine.load(warm, device="cpu")
    session = ChatSession.from_card(engine, CARD, "小林", sampling=SamplingConfig(max_new_tokens=120, seed=0))
    console.print(f"[bold]3.[/] role-play with card {CARD.name} (seed sampling: temperature 0.4, top_p 0.6, rep. 1.17)")
    if session.greeting:
        console.print(f"[green]沈青崖>[/] {session.greeting}")
    console.print(f"[cyan]小林>[/] {LINE}")
    console.print("[green]沈青崖>[/] ", end="")
    _stream(console, session.say(LINE), show_think=True)
    console.print(f"done in {time.time() - t0:.0f}s. Next: tifa chat {warm} --card {CARD.relative_to(ROOT)}")
    return 0


def _dialogues_only() -> list[list[dict]]:
    from tifaforge.data.conversations import check_file, expand_turns, to_chat

    records, _ = check_file(ROOT / "data/demo/sft.jsonl", "sft")
    return [to_chat(ex, "小林") for r in records for ex in expand_turns(r)]


if __name__ == "__main__":
    raise SystemExit(main())

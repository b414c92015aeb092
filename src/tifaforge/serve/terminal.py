"""Terminal role-play chat: streams tokens, shows the think block dimmed (or hides it).

    tifa chat models/tiny --card data/demo/cards/shen_qingya.json --user 小林
    tifa chat models/tiny --once "你好"          # one turn, non-interactive (scripts, tests)
    tifa chat models/tiny --revise             # each answer revised once by the rules before it is shown

Commands inside the chat: /think on|off, /reset, /regen, /save FILE, /load FILE, /quit.
"""

from __future__ import annotations

import sys

from tifaforge.serve.session import ChatSession
from tifaforge.chat.template import ThinkStreamSplitter
from tifaforge.errors import TifaError

HELP = "commands: /think on|off  /reset  /regen  /save FILE  /load FILE  /quit"


def run(args) -> int:
    from rich.console import Console

    from tifaforge.config import load_config
    from tifaforge.engine.generate import Engine

    cfg = load_config(args.config, args.set)
    console = Console(highlight=False, soft_wrap=True)
    if getattr(args, "backend", "transformers") == "llamacpp":
        from tifaforge.engine.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine.load(args.model)
    elif getattr(args, "backend", "transformers") == "vllm":
        from tifaforge.engine.vllm_backend import VLLMEngine

        engine = VLLMEngine.load(args.model)
    else:
        engine = Engine.load(args.model, allow_pickle=args.allow_pickle, rope_scaling=cfg.model.rope_scaling,
                             prefix_cache_mb=256)  # each turn prefills only what is new (engine/prefix_cache.py)
    try:
        return _chat(args, cfg, console, engine)
    finally:
        getattr(engine, "close", lambda: None)()


def _chat(args, cfg, console, engine) -> int:
    session = ChatSession.from_card(engine, args.card, args.user, sampling=cfg.sampling)
    show = {"think": not args.hide_think}
    reviser = _reviser(args, cfg) if args.revise else None
    if args.once is not None:
        stream(console, _announced(console, session, session.say(args.once, reviser)), show["think"])
        _notices(console, session)
        return 0
    name = args.user or "你"
    console.print(f"[bold]tifa chat[/] — {args.model}. {HELP}")
    if session.greeting:
        console.print(session.greeting)
    while True:
        try:
            line = console.input(f"[bold cyan]{name}> [/]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        try:
            if line.startswith("/"):
                if _command(console, session, line.strip(), show, reviser):
                    return 0
            elif line.strip():
                stream(console, _announced(console, session, session.say(line, reviser)), show["think"])
        except TifaError as e:
            console.print(f"[red]error:[/] {e}")
        _notices(console, session)


def _notices(console, session: ChatSession) -> None:
    for notice in session.notices:
        console.print(f"[yellow]{notice}[/]")
    session.notices.clear()


def _reviser(args, cfg):
    """(reward, card dict) for --revise: the run's reward config, the card's name for in-character."""
    from tifaforge.rewards.literary import LogicReward

    card = None
    if args.card:
        from tifaforge.chat.cards import load_card

        card = load_card(args.card).to_dict()
    return LogicReward(cfg.reward), card


def _announced(console, session: ChatSession, deltas):
    """The answer's deltas; with --revise, first a line on what the rules found in the first answer
    and which answer is shown (the answer arrives once the revision is done)."""
    for d in deltas:
        if session.last_revision is not None:
            console.print(session.last_revision.describe(), style="dim", markup=False)
            session.last_revision = None
        yield d


def _command(console, session: ChatSession, line: str, show: dict, reviser=None) -> bool:
    """Run one /command; True means quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return True
    if cmd == "/think" and arg in ("on", "off"):
        show["think"] = arg == "on"
        console.print(f"think blocks {'shown' if show['think'] else 'hidden'}")
    elif cmd == "/reset":
        session.reset()
        console.print("history cleared")
    elif cmd == "/regen":
        stream(console, _announced(console, session, session.regenerate(reviser)), show["think"])
    elif cmd in ("/save", "/load") and arg:
        getattr(session, cmd[1:])(arg)
        console.print(f"{cmd[1:]}d {arg}" if cmd == "/save" else f"loaded {arg} ({len(session.history)} messages)")
    else:
        console.print(HELP)
    return False


def stream(console, deltas, show_think: bool) -> None:
    """Print deltas as they come: reasoning dimmed (or hidden), then the answer."""
    splitter = ThinkStreamSplitter()
    kind_before = None
    for d in deltas:
        for kind, text in splitter.feed(d.text, final=d.finish_reason is not None):
            if kind == "reasoning" and not show_think:
                continue
            if kind == "content" and kind_before == "reasoning":
                console.print()
            console.print(text, style="dim" if kind == "reasoning" else None, end="", markup=False)
            kind_before = kind
            sys.stdout.flush()
    console.print()

"""`make demo`: the whole recipe on the tiny preset and the bundled data, then one role-play turn.

    python -m tifaforge.demo [--config configs/tiny.yaml] [--name demo] [--set sft.steps=40 ...]

`tifa pipeline configs/tiny.yaml` (CPT on the bundled novels, the CoT SFT cold start, MGRPO on the
logic rewards, anti-repetition DPO on pairs mined from the model's own answers), the evaluation of
the base and every stage (runs/NAME/report.md and its table printed here), then a scripted turn with
a character card through the engine, think block dimmed. Rerunning resumes and skips what is done.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tifaforge.utils import REPO_ROOT

CARD = REPO_ROOT / "data/demo/cards/shen_qingya.json"
LINE = "沈大侠，外面的雨这么大，你为何独自坐在这里喝酒？"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tifaforge.demo", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO_ROOT / "configs/tiny.yaml"))
    p.add_argument("--runs", default="runs", help="folder of runs (the run goes to RUNS/NAME)")
    p.add_argument("--name", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = p.parse_args(argv)
    from rich.console import Console

    from tifaforge.serve.session import ChatSession
    from tifaforge.serve.terminal import stream
    from tifaforge.config import load_config
    from tifaforge.engine.generate import Engine
    from tifaforge.errors import TifaError
    from tifaforge.pipeline import parse_stages, run_pipeline

    console = Console(highlight=False)
    t0 = time.time()
    try:
        cfg = load_config(args.config, args.set)
        cfg.name = args.name
        run = Path(args.runs) / cfg.name
        console.print(f"[bold]1.[/] tifa pipeline {args.config} -> {run} (stages {', '.join(cfg.stages)})")
        res = run_pipeline(cfg, parse_stages(cfg.stages), run)
    except TifaError as e:
        console.print(f"[red]tifa: error:[/] {e}")
        return 2
    console.print(f"\n[bold]2.[/] held-out evaluation of the base and every stage ({run / 'report.md'}):\n")
    console.print(res["eval"]["table"], markup=False)
    engine = Engine.load(res["model"], device="cpu")
    sampling = cfg.sampling.__class__(**{**cfg.sampling.__dict__, "seed": 0})
    session = ChatSession.from_card(engine, CARD, "小林", sampling=sampling)
    console.print(f"\n[bold]3.[/] role-play with the final model and card {CARD.name} (the seed's sampling)")
    if session.greeting:
        console.print(f"[green]沈青崖>[/] {session.greeting}")
    console.print(f"[cyan]小林>[/] {LINE}")
    console.print("[green]沈青崖>[/] ", end="")
    stream(console, session.say(LINE), show_think=True)
    console.print(f"done in {time.time() - t0:.0f}s. Next: tifa chat {res['model']} --card {CARD.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`: the whole recipe on the tiny preset and the bundled data, then one role-play turn.

    python -m tifaforge.demo [--config configs/tiny.yaml] [--name demo] [--set sft.steps=40 ...]
    python -m tifaforge.demo --name ablate --seeds 0,1,2 --ablate grpo,mgrpo --budget 960   # make ablate

`tifa pipeline configs/tiny.yaml` (CPT on the bundled novels, the CoT SFT cold start, MGRPO on the
logic rewards, anti-repetition DPO on pairs mined from the model's own answers), the evaluation of
the base and every stage (runs/NAME/report.md and its table printed here), then a scripted turn with
a character card through the engine, think block dimmed. Rerunning resumes and skips what is done.

With `--seeds`, the pipeline runs once per training seed (RUNS/NAME/seed-S) and every stage effect is
reported pooled over the seeds, with each seed's own change (RUNS/NAME/seeds.md): on one machine a
seed reproduces bit for bit, but another CPU's float kernels land a tiny model on other weights, so
only an effect that holds over the seeds is a claim. `--ablate` then trains GRPO and MGRPO from each
seed's SFT model at an equal sequence budget (`tifa ablate`, RUNS/NAME/ablate).
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
    p.add_argument("--seeds", help="training seeds, comma-separated: one pipeline each, effects pooled over them")
    p.add_argument("--ablate", metavar="ARMS", help="with --seeds: also GRPO vs MGRPO from each seed's SFT model")
    p.add_argument("--budget", default="960", help="with --ablate: sequences sampled per arm")
    args = p.parse_args(argv)
    if args.ablate and not args.seeds:
        p.error("--ablate needs --seeds (the ablation starts from each seed's SFT model)")
    if args.seeds:
        return seeds_main(args)
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


def seeds_main(args) -> int:
    """The pipeline once per training seed, the pooled stage effects, and the optional ablation."""
    from tifaforge.ablate import check_budgets, parse_arms, parse_ints, run_ablation
    from tifaforge.config import load_config
    from tifaforge.errors import TifaError
    from tifaforge.eval.report import format_pooled, pooled_effects
    from tifaforge.pipeline import parse_stages, run_pipeline
    from tifaforge.train.stage import STAGE_DIRS
    from tifaforge.utils import atomic_write_json, atomic_write_text

    t0 = time.time()
    try:
        seeds = parse_ints(args.seeds, "--seeds")
        arms = parse_arms(args.ablate) if args.ablate else None
        budgets = parse_ints(args.budget, "--budget")
        root = Path(args.runs) / args.name
        results = {}
        for seed in seeds:
            cfg = load_config(args.config, [*args.set, f"seed={seed}"])
            if arms:
                check_budgets(budgets, cfg.mgrpo)
            cfg.name = f"{args.name}-seed-{seed}"
            print(f"== seed {seed}: tifa pipeline {args.config} -> {root / f'seed-{seed}'}", flush=True)
            results[seed] = run_pipeline(cfg, parse_stages(cfg.stages), root / f"seed-{seed}")["eval"]["results"]
        effects = pooled_effects([results[s] for s in seeds], n_boot=cfg.eval.bootstrap, seed=cfg.eval.seed)
        table = format_pooled(effects)
        atomic_write_json(root / "seeds.json", {"seeds": seeds, "effects": effects})
        atomic_write_text(root / "seeds.md", f"# Stage effects over training seeds {', '.join(map(str, seeds))}\n\n"
                          + "".join(f"- seed {s}: [report](seed-{s}/report.md)\n" for s in seeds) + "\n" + table + "\n")
        print(f"\n{table}\n\nwrote {root / 'seeds.md'}", flush=True)
        if arms:
            sft = STAGE_DIRS["sft"]
            summary = run_ablation(cfg, {s: root / f"seed-{s}" / sft / "model" for s in seeds}, arms, budgets,
                                   root / "ablate", reuse={s: [root / f"seed-{s}" / "eval.json"] for s in seeds})
            print(f"\n{summary['table']}\n\nwrote {root / 'ablate' / 'report.md'}")
    except TifaError as e:
        print(f"tifa: error: {e}")
        return 2
    print(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

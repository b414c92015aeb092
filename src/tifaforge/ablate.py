"""`tifa ablate`: does the rewrite pass help? GRPO against MGRPO (and other arms) from one start model,
on the same prompts and seeds, at an equal number of sampled sequences, evaluated side by side.

    tifa ablate configs/tiny.yaml --model runs/demo/02-sft/model --arms grpo,mgrpo --budget 960 --seeds 0,1,2

Arms: `grpo` (mgrpo.pass2 off: plain GRPO), `mgrpo` (the config's pass 2), `mgrpo-all` (every first
answer revised). Each arm trains with `mgrpo.max_sequences` = the budget: pass-1 answers, resampled
groups and pass-2 revisions all count, and the update that reaches the budget is the last, so the
arms differ by less than one update's sequences (both counts are reported). A seed is a training
seed: the same seed gives both arms the same prompts, in the same order, and the same pass-1 sampling
seeds. Every model (the start model and each arm, per seed) answers the same eval slots, so the arms
are compared slot by slot, pooled over the seeds (eval/report.py: pooled_effects). Several budgets
(`--budget 480,960`) give the held-out metrics against sequences sampled; each is its own run.
Everything resumes: a finished arm or evaluation is not redone.

Writes OUT/ablate.json, OUT/report.md, OUT/slop.json and OUT/plots/ablate.png.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from tifaforge.errors import TifaError

ARMS = {
    "grpo": {"pass2": "off"},  # plain GRPO: pass 1 only
    "mgrpo": {},  # the config's own pass 2 (default: revise first answers scoring below revise_below)
    "mgrpo-all": {"pass2": "all"},  # every first answer revised
}
# held-out (and trained) metrics shown against the budget and compared between arms
SHOWN = ("reward", "think_format", "repetition_4gram", "slop", "mattr", "self_overlap", "answer_length")


def parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise TifaError(f"--arms: unknown arm {unknown[0]!r}; arms: {', '.join(ARMS)}")
    if len(arms) < 2 or len(set(arms)) != len(arms):
        raise TifaError(f"--arms {text!r}: give at least two different arms, e.g. grpo,mgrpo")
    return arms


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise TifaError(f"{what} {text!r}: expected whole numbers separated by commas") from None
    if not values:
        raise TifaError(f"{what}: give at least one value")
    return values


def check_budgets(budgets: list[int], m) -> None:
    """A budget must buy at least one update of pass 1 (prompts_per_step x group_size sequences)."""
    one = m.prompts_per_step * m.group_size
    for b in budgets:
        if b < one:
            raise TifaError(f"--budget {b}: below one update ({m.prompts_per_step} prompts x {m.group_size} answers "
                            f"= {one} sequences); give at least {one}")


def arm_config(cfg, arm: str, budget: int, seed: int):
    """The config one arm trains with: the training seed, the budget, the arm's pass 2."""
    c = copy.deepcopy(cfg)
    c.seed = seed
    m = c.mgrpo
    for key, value in ARMS[arm].items():
        setattr(m, key, value)
    m.max_sequences = budget
    m.steps = math.ceil(budget / (m.prompts_per_step * m.group_size))  # the most a pass-1-only arm can take
    return c


def _cached_eval(folder: Path, cfg, reuse: list[Path], cache: Path, progress: bool) -> dict:
    """The evaluation of one model folder, reused from any JSON of earlier evaluations with the same key
    (settings, sampling, reward, weights), else computed and written to CACHE/KEY.json."""
    from tifaforge.engine.generate import Engine
    from tifaforge.eval.metrics import eval_key, evaluate

    key = eval_key(folder, cfg.eval, cfg.sampling, cfg.reward)
    own = cache / f"{key[:20]}.json"
    for f in [own, *reuse]:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for res in (data.values() if isinstance(data, dict) and "key" not in data else [data]):
            if isinstance(res, dict) and res.get("key") == key and res.get("samples"):
                return res
    engine = Engine.load(folder)
    res = evaluate(engine, cfg.eval, cfg.sampling, progress=progress, reward=cfg.reward)
    res["key"], res["model"] = key, str(folder)
    from tifaforge.utils import atomic_write_json

    atomic_write_json(own, res)
    return res


def run_ablation(cfg, starts: dict[int, Path], arms: list[str], budgets: list[int], out: Path,
                 reuse: dict[int, list[Path]] | None = None, progress: bool = True) -> dict:
    """Train every (seed, budget, arm) from `starts[seed]`, evaluate, compare; returns the summary."""
    from tifaforge.eval.report import add_slop, format_pooled, pooled_effects
    from tifaforge.stages import mgrpo
    from tifaforge.train.metrics import JsonlLog
    from tifaforge.utils import atomic_write_json, atomic_write_text

    check_budgets(budgets, cfg.mgrpo)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(starts)
    runs: dict[int, dict[str, dict]] = {}  # seed -> {label: eval result}
    trained: dict[str, dict] = {}  # "seed/label" -> {"sequences", "updates", "curve"}
    for seed in seeds:
        res = {"start": _cached_eval(Path(starts[seed]), cfg, (reuse or {}).get(seed, []), out / "evals", progress)}
        for budget in budgets:
            for arm in arms:
                label = f"{arm}@{budget}"
                folder = out / f"seed-{seed}" / label
                if progress:
                    print(f"ablate: seed {seed}, {label}: training into {folder}")
                model = mgrpo.run_stage(arm_config(cfg, arm, budget, seed), starts[seed], folder)
                manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
                rows = list(JsonlLog(folder / "metrics.jsonl").rows())
                trained[f"{seed}/{label}"] = {
                    "sequences": manifest.get("sequences_sampled"), "updates": manifest.get("updates"),
                    "curve": [(r["sampled_total"], r["reward/pass1"]) for r in rows if "sampled_total" in r]}
                res[label] = _cached_eval(Path(model), cfg, [], out / "evals", progress)
        runs[seed] = res
    flat = {f"{seed}/{lb}": r for seed, res in runs.items() for lb, r in res.items()}
    add_slop(flat, cfg.eval, out)  # one slop list over every model's answers
    labels = list(runs[seeds[0]])
    pairs = [(f"{arms[0]}@{b}", f"{a}@{b}") for b in budgets for a in arms[1:]]
    versus = pooled_effects([runs[s] for s in seeds], pairs, SHOWN, cfg.eval.bootstrap, cfg.eval.seed)
    from_start = pooled_effects([runs[s] for s in seeds], [("start", lb) for lb in labels[1:]], SHOWN,
                                cfg.eval.bootstrap, cfg.eval.seed)
    means = {lb: {k: _over_seeds([runs[s][lb]["metrics"].get(k, {}).get("mean") for s in seeds])
                  for k in (*SHOWN, "distinct_2", "compression_ratio")} for lb in labels}
    sequences = {lb: [trained[f"{s}/{lb}"]["sequences"] for s in seeds] for lb in labels[1:]}
    summary = {"arms": arms, "budgets": budgets, "seeds": seeds, "starts": {s: str(p) for s, p in starts.items()},
               "sequences": sequences, "updates": {lb: [trained[f"{s}/{lb}"]["updates"] for s in seeds] for lb in labels[1:]},
               "means": means, "versus": versus, "from_start": from_start,
               "curves": {k: v["curve"] for k, v in trained.items()}}
    atomic_write_json(out / "ablate.json", summary)
    png = plot(summary, runs, out / "plots")
    table = format_summary(summary) + "\n\n" + format_pooled(versus, SHOWN) + "\n\nEach arm against the start model:\n\n" \
        + format_pooled(from_start, SHOWN)
    atomic_write_text(out / "report.md", f"# Ablation: {', '.join(arms)} at {', '.join(map(str, budgets))} sequences, "
                      f"seeds {', '.join(map(str, seeds))}\n\n{table}\n\n![ablation](plots/{png.name})\n")
    summary["table"] = table
    return summary


def _over_seeds(values: list) -> dict | None:
    vals = [v for v in values if isinstance(v, (int, float)) and v == v]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return {"mean": mean, "sd": sd, "per_seed": vals}


def format_summary(summary: dict) -> str:
    """Each model's metrics, mean ± sd over the seeds, and the sequences each arm sampled."""
    from tifaforge.eval.report import SHOWN as NAMES

    labels = list(summary["means"])
    keys = [k for k in (*SHOWN, "distinct_2", "compression_ratio") if any(summary["means"][lb].get(k) for lb in labels)]
    lines = ["| model | sequences sampled (per seed) | updates | " + " | ".join(NAMES[k][0] for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for lb in labels:
        seqs = summary["sequences"].get(lb)
        cells = [(f"{m['mean']:.3g} ± {m['sd']:.2g}" if (m := summary["means"][lb].get(k)) else "–") for k in keys]
        lines.append(f"| {lb} | {', '.join(map(str, seqs)) if seqs else '–'} | "
                     f"{', '.join(map(str, summary['updates'].get(lb, []))) or '–'} | " + " | ".join(cells) + " |")
    return ("Held-out evaluation of each model, mean ± sd over the training seeds (sd: how far one seed's "
            "run can land from another's):\n\n" + "\n".join(lines))


def plot(summary: dict, runs: dict, out: Path) -> Path:
    """Training reward against sequences sampled (a line per arm and seed), and each held-out metric
    against the budget (mean over seeds, bars from the lowest to the highest seed)."""
    from tifaforge.eval.report import panels, save_panels

    arms, budgets = summary["arms"], summary["budgets"]
    keys = [k for k in SHOWN if any(summary["means"][lb].get(k) for lb in summary["means"])]
    n = 1 + len(keys)
    fig, axes = panels(n, 4, height=3)
    colors = dict(zip(arms, ["#5b7fb5", "#c8553d", "#4f9d69", "#8e6bbf"]))
    ax = axes.flat[0]
    for key, curve in summary["curves"].items():
        arm = key.split("/", 1)[1].split("@")[0]
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], color=colors[arm], alpha=0.6, lw=1)
    for arm in arms:
        ax.plot([], [], color=colors[arm], label=arm)
    ax.set_title("training reward (pass 1) vs sequences sampled", fontsize=9)
    ax.legend(fontsize=8)
    from tifaforge.eval.report import SHOWN as NAMES

    start = summary["means"]["start"]
    for ax, k in zip(list(axes.flat)[1:], keys):
        for arm in arms:
            xs, ys, lo, hi = [], [], [], []
            for b in budgets:
                m = summary["means"][f"{arm}@{b}"].get(k)
                seqs = [s for s in summary["sequences"][f"{arm}@{b}"] if s]
                if m:
                    xs.append(sum(seqs) / len(seqs) if seqs else b)
                    ys.append(m["mean"])
                    lo.append(m["mean"] - min(m["per_seed"]))
                    hi.append(max(m["per_seed"]) - m["mean"])
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colors[arm], label=arm)
        if start.get(k):
            ax.axhline(start[k]["mean"], color="grey", ls="--", lw=1, label="start")
        ax.set_title(NAMES[k][0], fontsize=9)
        ax.set_xlabel("sequences sampled", fontsize=8)
    return save_panels(fig, axes, n, out / "ablate.png", dpi=100)


def add_arguments(p) -> None:
    p.add_argument("config", help="a config file: the mgrpo, reward, eval and sampling sections of every arm")
    p.add_argument("--model", required=True, help="the start model every arm trains from (a model or run folder)")
    p.add_argument("--arms", default="grpo,mgrpo", help=f"arms to compare, the first is the baseline ({', '.join(ARMS)})")
    p.add_argument("--budget", required=True, help="sequences sampled per arm (pass 1, resampled and pass 2 all "
                                                   "count); several, comma-separated, give the metrics against it")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated (e.g. 0,1,2)")
    p.add_argument("--out", help="output folder (default: runs/ablate-NAME, NAME from the config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. mgrpo.learning_rate=1e-4")


def run(args) -> int:
    from tifaforge.config import load_config
    from tifaforge.models.load import run_model

    cfg = load_config(args.config, args.set)
    arms = parse_arms(args.arms)
    budgets = parse_ints(args.budget, "--budget")
    check_budgets(budgets, cfg.mgrpo)
    seeds = parse_ints(args.seeds, "--seeds")
    start = run_model(Path(args.model))
    if not (start / "config.json").is_file():
        raise TifaError(f"--model {args.model}: not a model folder (no config.json) nor a run with a finished stage")
    out = Path(args.out) if args.out else Path("runs") / f"ablate-{cfg.name}"
    summary = run_ablation(cfg, {s: start for s in seeds}, arms, budgets, out)
    print(summary["table"])
    print(f"\nwrote {out / 'report.md'}, ablate.json and plots/ablate.png")
    return 0

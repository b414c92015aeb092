"""`tifa eval`: evaluate one model, or the base and every stage of a run, and write the report.

    tifa eval runs/tiny                  # base + every finished stage -> runs/tiny/report.md, eval.json, plots/
    tifa eval models/tiny --out out/     # one model

The report is a Markdown table (metric rows, one column per model, mean and 95% interval) plus PNG
bar charts per metric, so a stage's effect (think format up after SFT, reward up after MGRPO,
repetition down after DPO) is visible at a glance.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tifaforge.errors import TifaError
from tifaforge.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# metric key -> (label, higher is better?)
SHOWN = {
    "think_format": ("think-format rate", True),
    "reward": ("mean logic reward", True),
    "repetition_4gram": ("4-gram repetition rate", False),
    "repetition_4gram_unpenalised": ("4-gram repetition, penalties off", False),
    "cross_turn_overlap": ("cross-turn overlap", False),
    "distinct_1": ("distinct-1", True),
    "distinct_2": ("distinct-2", True),
    "refusal": ("refusal rate", False),
    "in_character": ("in-character rate", True),
    "answer_length": ("answer length (units)", None),
    "perplexity": ("perplexity (held-out novel)", False),
    "mattr": ("MATTR (lexical diversity)", True),
    "self_overlap": ("self-overlap among a prompt's answers", False),
    "compression_ratio": ("compression ratio", False),
    "slop": ("slop phrases per 100 units", False),
    "judge_score": ("LLM judge rubric (1-10)", True),
}

# metric -> the reward rules it measures: the report marks a metric "trained on" when MGRPO's reward
# weighs (or vetoes on) one of them, since a policy can raise such a metric by gaming the rule itself.
TRAINED_BY = {
    "think_format": ("think_format",), "reward": ("*",), "repetition_4gram": ("repetition",),
    "repetition_4gram_unpenalised": ("repetition",), "cross_turn_overlap": ("repetition",),
    "refusal": ("refusal",), "in_character": ("in_character",), "answer_length": ("answer_length",),
    "judge_score": ("judge",),
}


def trained_metrics(reward) -> set[str]:
    """The metrics a run's reward section trains on (the defaults when None)."""
    from tifaforge.config import RewardConfig

    reward = reward or RewardConfig()
    used = {n for n, w in reward.weights.items() if w} | set(reward.vetoes)
    return {k for k, rules in TRAINED_BY.items() if rules == ("*",) or used & set(rules)}


def models_of(path: str | Path) -> list[tuple[str, Path]]:
    """(label, model folder) pairs: a model folder itself, or a run's base and finished stages."""
    path = Path(path)
    if (path / "config.json").exists():
        return [(path.name, path)]
    found = [("base", path / "base")] if (path / "base" / "config.json").exists() else []
    for stage in sorted(p for p in path.iterdir() if p.is_dir() and p.name[:2].isdigit()) if path.is_dir() else []:
        if (stage / "model" / "config.json").exists():
            found.append((stage.name, stage / "model"))
    if not found:
        raise TifaError(f"{path}: neither a model folder (config.json) nor a run with base/ or NN-stage/model/")
    return found


def format_table(results: dict[str, dict], max_new_tokens: int, sampling=None, reward=None) -> str:
    labels = list(results)
    trained = trained_metrics(reward)
    lines = [f"| metric | {' | '.join(labels)} | trained on |", "|---|" + "---|" * (len(labels) + 1)]
    for key, (name, better) in SHOWN.items():
        cells = [_cell(results[lb]["metrics"].get(key)) for lb in labels]
        if any(c != "–" for c in cells):
            arrow = "" if better is None else (" ↑" if better else " ↓")
            lines.append(f"| {name}{arrow} | {' | '.join(cells)} | {'yes' if key in trained else ''} |")
    first = next(iter(results.values()))
    n, k = first["n"], first.get("samples_per_prompt", 1)
    how = ("the seed's sampling (temperature 0.4, top_p 0.6, repetition_penalty 1.17)" if sampling is None else
           f"sampling temperature {sampling.temperature:g}, top_p {sampling.top_p:g}, "
           f"repetition_penalty {sampling.repetition_penalty:g}")
    answers = "" if k == 1 else f" × {k} answers each (seeds differ)"
    boot = "" if k == 1 else ", resampling prompts"
    lines.append(f"\n{n} held-out prompts{answers}, at most {max_new_tokens} new tokens per answer, {how}, "
                 f"with fixed seeds; [95% bootstrap interval{boot}].")
    lines.append("\"trained on\": MGRPO's reward weighs a rule this metric measures, so a policy can raise it by "
                 "gaming the rule; the other metrics (eval/heldout.py, the judge) are held out.")
    if len(results) > 1:
        lines.append(format_effects(stage_effects(results)))
    lines.append(format_judge(results))
    return "\n".join(lines).rstrip()


def format_judge(results: dict[str, dict]) -> str:
    """The pairwise judge's win rates, one line per model judged against the one before it."""
    rows = [(lb, r["judge"]) for lb, r in results.items() if r.get("judge")]
    if not rows:
        return ""
    lines = ["\nLLM judge, pairwise (each slot judged twice, the answers' positions swapped; 1 = the later model "
             "wins both orders, 0.5 = split):\n", "| pair | win rate of the later model | agreement | missing | wall time |",
             "|---|---|---|---|---|"]
    for lb, j in rows:
        w = j["win_rate"]
        rate = "–" if w["mean"] != w["mean"] else f"{w['mean']:.3g} [{w['low']:.3g}, {w['high']:.3g}]"
        agree = "–" if j["agreement"] is None else f"{j['agreement']:.2f}"
        lines.append(f"| {lb} vs {j['vs']} | {rate} | {agree} | {j['missing']} of {j['slots']} | {j['wall_s']:.1f} s |")
    return "\n".join(lines)


# per-answer metrics whose change each stage makes is shown paired (the recipe's three claims and more)
EFFECTS = ("think_format", "reward", "repetition_4gram", "repetition_4gram_unpenalised", "answer_length", "mattr",
           "self_overlap", "slop", "judge_score")


def stage_effects(results: dict[str, dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, dict]]:
    """{"B vs A": {metric: {"mean", "low", "high"}}} for each model B against the one before it.

    Paired: every model answered the same (prompt, seed) slots, so the change is measured slot by
    slot and its 95% interval comes from resampling prompts; much narrower than comparing two
    models' own intervals, which ignores that both saw the same prompts."""
    from tifaforge.eval.metrics import bootstrap_ci

    labels, out = list(results), {}
    for a, b in zip(labels, labels[1:]):
        sa, sb = results[a].get("samples") or [], results[b].get("samples") or []
        slots = [(x.get("id"), x.get("sample", 0)) for x in sa]
        if not sa or slots != [(x.get("id"), x.get("sample", 0)) for x in sb]:
            continue  # not the same slots (another prompts file, limit or samples): nothing to pair
        row = {}
        for key in EFFECTS:
            pairs = [(x[key], y[key]) for x, y in zip(sa, sb) if key in x and key in y]
            if len(pairs) == len(sa):
                mean, lo, hi = bootstrap_ci([y - x for x, y in pairs], n_boot, seed, [slot[0] for slot in slots])
                row[key] = {"mean": mean, "low": lo, "high": hi}
        out[f"{b} vs {a}"] = row
    return out


def pooled_effects(runs: list[dict[str, dict]], pairs: list[tuple[str, str]] | None = None,
                   keys: tuple[str, ...] = EFFECTS, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, dict]]:
    """Stage effects over several training seeds: `runs` holds one {label: eval result} per seed.

    For each pair (a, b) (default: consecutive labels) and metric: the slot-by-slot change b - a of
    every seed pooled into one paired 95% interval (resampling prompts, a prompt's slots of every seed
    together), each seed's own mean change, their spread (sample sd), and `holds`: the pooled interval
    excludes 0 and every seed's change has the same sign as the pooled mean."""
    import statistics

    from tifaforge.eval.metrics import bootstrap_ci

    labels = list(runs[0])
    pairs = pairs or list(zip(labels, labels[1:]))
    out = {}
    for a, b in pairs:
        row = {}
        for key in keys:
            diffs, clusters, per_seed = [], [], []
            for res in runs:
                sa, sb = res.get(a, {}).get("samples") or [], res.get(b, {}).get("samples") or []
                slots = [(x.get("id"), x.get("sample", 0)) for x in sa]
                if not sa or slots != [(x.get("id"), x.get("sample", 0)) for x in sb] or \
                        not all(key in x and key in y for x, y in zip(sa, sb)):
                    break
                d = [y[key] - x[key] for x, y in zip(sa, sb)]
                diffs += d
                clusters += [x.get("id") for x in sa]
                per_seed.append(sum(d) / len(d))
            else:
                mean, lo, hi = bootstrap_ci(diffs, n_boot, seed, clusters)
                sign = (mean > 0) - (mean < 0)
                row[key] = {"mean": mean, "low": lo, "high": hi, "per_seed": per_seed,
                            "sd": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                            "holds": (lo > 0 or hi < 0) and all((v > 0) - (v < 0) == sign for v in per_seed)}
        out[f"{b} vs {a}"] = row
    return out


def format_pooled(effects: dict[str, dict[str, dict]], keys: tuple[str, ...] = EFFECTS) -> str:
    """Pooled effects as one table per metric group: mean [interval], each seed's change, ✓/✗ where it holds."""
    keys = [k for k in keys if any(k in row for row in effects.values())]
    lines = ["| change | metric | pooled change [95% interval] | each seed's change | sd over seeds | holds |",
             "|---|---|---|---|---|---|"]
    for name, row in effects.items():
        for k in keys:
            m = row.get(k)
            if m is None:
                continue
            better = SHOWN[k][1]
            mark = "" if not m["holds"] else ("yes" if better is None else ("yes ✓" if (m["mean"] > 0) == better else "yes ✗"))
            lines.append(f"| {name} | {SHOWN[k][0]} | {m['mean']:+.3g} [{m['low']:+.3g}, {m['high']:+.3g}] | "
                         + ", ".join(f"{v:+.3g}" for v in m["per_seed"]) + f" | {m['sd']:.2g} | {mark} |")
    return ("Paired changes pooled over the training seeds (the same prompts and eval seeds; 95% bootstrap "
            "interval resampling prompts); \"holds\": the interval excludes 0 and every seed moved the same way "
            "(✓ the better way, ✗ the worse):\n\n" + "\n".join(lines))


def format_effects(effects: dict[str, dict[str, dict]]) -> str:
    """The paired changes as a table; a change whose interval excludes 0 is bold, ✓ if it is the better way."""
    keys = [k for k in EFFECTS if any(k in row for row in effects.values())]
    if not keys:
        return ""
    lines = ["| change | " + " | ".join(SHOWN[k][0] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for name, row in effects.items():
        cells = []
        for k in keys:
            m = row.get(k)
            if m is None:
                cells.append("–")
                continue
            cell = f"{m['mean']:+.3g} [{m['low']:+.3g}, {m['high']:+.3g}]"
            if m["low"] > 0 or m["high"] < 0:
                better = SHOWN[k][1]
                mark = "" if better is None else (" ✓" if (m["mean"] > 0) == better else " ✗")
                cell = f"**{m['mean']:+.3g}**{mark} [{m['low']:+.3g}, {m['high']:+.3g}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return ("\nWhat each stage changed, paired (the same prompts and seeds, each model against the one before it; "
            "95% bootstrap interval of the change, resampling prompts; bold: the interval excludes 0, ✓ the better "
            "way, ✗ the worse):\n\n" + "\n".join(lines))


def _cell(m: dict | None) -> str:
    if not m:
        return "–"
    if "low" in m:
        return f"{m['mean']:.3g} [{m['low']:.3g}, {m['high']:.3g}]"
    return f"{m['mean']:.3g}"


def panels(n: int, cols: int, height: float = 2.8):
    """(figure, axes) of a grid holding n panels, `cols` to a row (headless matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (n + cols - 1) // cols
    return plt.subplots(rows, cols, figsize=(4 * cols, height * rows), squeeze=False)


def save_panels(fig, axes, used: int, path: Path, dpi: int = 110) -> Path:
    """Blank the unused panels, write the PNG (its folder made), free the figure."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot(results: dict[str, dict], out: Path) -> list[Path]:
    """One PNG of bar charts (a panel per metric, a bar per model, 95% intervals as error bars)."""
    keys = [k for k in SHOWN if any(k in r["metrics"] for r in results.values())]
    fig, axes = panels(len(keys), 3)
    for ax, key in zip(axes.flat, keys):
        ms = [results[lb]["metrics"].get(key, {}) for lb in results]
        means = [m.get("mean", float("nan")) for m in ms]
        err = [[max(0, m["mean"] - m["low"]) if "low" in m else 0 for m in ms],
               [max(0, m["high"] - m["mean"]) if "high" in m else 0 for m in ms]]
        ax.bar(range(len(ms)), means, yerr=err, color="#5b7fb5", capsize=3)
        ax.set_xticks(range(len(ms)), list(results), rotation=20, fontsize=8)
        ax.set_title(SHOWN[key][0], fontsize=9)
    return [save_panels(fig, axes, len(keys), out / "eval_metrics.png")]


# the curve shown per stage in the run's training_curves.png
MAIN_CURVE = {"mgrpo": "reward/pass1"}


def _stage_dirs(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.is_dir() and p.name[:2].isdigit() and (p / "metrics.jsonl").exists())


def training_curves(run: Path, out: Path) -> Path | None:
    """One PNG with a panel per stage: its loss against step (MGRPO: its pass-1 reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tifaforge.train.metrics import JsonlLog

    stages = _stage_dirs(run)
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
    for ax, d in zip(axes[0], stages):
        key = MAIN_CURVE.get(d.name.split("-", 1)[-1], "loss")
        pts = [(r["step"], r[key]) for r in JsonlLog(d / "metrics.jsonl").rows()
               if isinstance(r.get(key), (int, float)) and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(f"{d.name}: {key}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_eval(target: str | Path, out: str | Path | None, cfg, sampling, progress: bool = True, reward=None,
             reuse: tuple = ()) -> dict:
    """Evaluate every model of `target`; write eval.json, report.md and plots/ into `out`. `reward`: the
    run's reward section (the mean logic reward is the one MGRPO trained on); None: the defaults.
    `reuse`: JSON files of earlier evaluations (the DPO stage's before/after); one whose key
    (metrics.eval_key: settings, sampling, reward, weights) is a model's current key stands for it."""
    from tifaforge.engine.generate import Engine
    from tifaforge.eval.metrics import eval_key, evaluate

    pairs = models_of(target)
    out = Path(out) if out else (Path(target) if len(pairs) > 1 else Path(target) / "eval")
    slop_paths(cfg)  # a missing reference is said before the models generate
    earlier = {}
    for f in reuse:
        try:
            res = json.loads(Path(f).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(res, dict) and "key" in res and "samples" in res:
            earlier[res["key"]] = res
    results = {}
    for label, folder in pairs:
        key = eval_key(folder, cfg, sampling, reward)
        if key in earlier:
            log.info("eval: %s: reusing the evaluation made with the same settings and weights", label)
            results[label] = {k: v for k, v in earlier[key].items() if k not in ("judge", "judge_rubric")}
            results[label]["metrics"] = {k: v for k, v in results[label]["metrics"].items()
                                         if k not in ("slop", "judge_score")}  # recomputed below, over these models
        else:
            engine = Engine.load(folder)
            results[label] = evaluate(engine, cfg, sampling, progress=progress, reward=reward)
            results[label]["key"] = key
            del engine
        results[label]["model"] = str(folder)
    add_slop(results, cfg, out)
    add_judge(results, cfg, progress)
    atomic_write_json(out / "eval.json", results)
    plots = plot(results, out / "plots")
    table = format_table(results, cfg.max_new_tokens, sampling, reward)
    body = f"# Evaluation of {target}\n\n{table}\n\n" + "".join(f"![{p.stem}](plots/{p.name})\n" for p in plots)
    curves = training_curves(Path(target), out / "plots") if len(pairs) > 1 else None
    if curves is not None:
        body += f"\n## Training curves\n\n![training curves](plots/{curves.name})\n\n" + "".join(
            f"- {d.name}: " + ", ".join(f"[{p.stem}]({d.name}/plots/{p.name})" for p in sorted((d / "plots").glob("*.png")))
            + "\n" for d in _stage_dirs(Path(target)) if (d / "plots").is_dir())
    atomic_write_text(out / "report.md", body)
    return {"out": out, "table": table, "results": results}


def _contents(result: dict) -> list[str]:
    from tifaforge.chat.template import split_reasoning

    return [split_reasoning(x["answer"])[1] for x in result.get("samples") or []]


def _set_metric(result: dict, key: str, values: list[float | None], n_boot: int, seed: int) -> None:
    """Per-sample values (None = missing) into the samples and the metric's mean and interval."""
    from tifaforge.eval.metrics import bootstrap_ci

    have = [(x, v) for x, v in zip(result["samples"], values) if v is not None]
    for x, v in zip(result["samples"], values):
        if v is not None:
            x[key] = v
    if have:
        mean, lo, hi = bootstrap_ci([v for _, v in have], n_boot, seed, [x.get("id") for x, _ in have])
        result["metrics"][key] = {"mean": mean, "low": lo, "high": hi}


def slop_paths(cfg) -> list[Path]:
    """The slop reference's files or folders; [] (with a warning) when none is set or one is missing,
    so a missing reference costs the slop metric, never a finished evaluation."""
    from tifaforge.utils import resolve_path

    paths = [resolve_path(p.strip()) for p in (cfg.slop_reference or "").split(",") if p.strip()]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        log.warning("eval.slop_reference: %s not found; no slop metric (set it to your novels, or '' to silence this)",
                    ", ".join(missing))
        return []
    return paths


def add_slop(results: dict[str, dict], cfg, out: Path) -> None:
    """The slop list over every model's answers (eval/heldout.py) into slop.json, and each answer's slop rate."""
    from tifaforge.eval.heldout import SLOP_RATIO, candidates, reference_counts, slop_list, slop_rate

    paths = slop_paths(cfg)
    if not paths:
        return
    contents = {lb: _contents(r) for lb, r in results.items()}
    # one model's answers once, even when it stands under several labels (the start model of every seed)
    pooled = [c for lb in {r.get("key") or lb: lb for lb, r in results.items()}.values() for c in contents[lb]]
    counts, units = reference_counts(paths, candidates(pooled))
    phrases = slop_list(pooled, counts, units)
    names = [p["phrase"] for p in phrases]
    for lb, r in results.items():
        if r.get("samples"):
            _set_metric(r, "slop", [slop_rate(c, names) for c in contents[lb]], cfg.bootstrap, cfg.seed)
    atomic_write_json(out / "slop.json", {
        "reference": [str(p) for p in paths], "reference_units": units, "min_ratio": SLOP_RATIO,
        "models": list(results), "phrases": phrases,
        "per_model": {lb: {p: sum(c.count(p) for c in contents[lb]) for p in names[:20]} for lb in results}})


def add_judge(results: dict[str, dict], cfg, progress: bool = True) -> None:
    """With eval.judge_url: each answer's rubric score, and each model against the one before it,
    pairwise and position-swapped (eval/judge.py). Prints the judge's wall time."""
    from tifaforge.eval.judge import client
    from tifaforge.eval.metrics import load_prompts
    from tifaforge.rewards.literary import LogicReward, reward_with_user

    if not cfg.judge_url:
        return
    records, _ = load_prompts(cfg)
    reward = LogicReward(reward_with_user(None, cfg.user_name))
    ask, t0 = client(cfg), time.perf_counter()
    try:
        _judge_models(results, cfg, records, reward, ask, progress)
    finally:
        ask.close()
    if progress:
        print(f"judge: done in {time.perf_counter() - t0:.1f} s")


def _judge_models(results: dict[str, dict], cfg, records, reward, ask, progress: bool) -> None:
    from tifaforge.data.conversations import to_chat
    from tifaforge.eval.judge import pairwise, rubric
    from tifaforge.eval.metrics import bootstrap_ci

    labels = list(results)
    for lb in labels:
        r = results[lb]
        recs = [records[k % len(records)] for k in range(len(r.get("samples") or []))]
        chats = [to_chat(rec, cfg.user_name) for rec in recs]
        ctxs = [reward.context(c, rec.card.to_dict() if rec.card is not None else None) for c, rec in zip(chats, recs)]
        scores, wall = rubric(cfg, ctxs, [x["answer"] for x in r["samples"]], cfg.judge_concurrency)
        _set_metric(r, "judge_score", scores, cfg.bootstrap, cfg.seed)
        r["judge_rubric"] = {"missing": scores.count(None), "answers": len(scores), "wall_s": round(wall, 2)}
        if progress:
            print(f"judge: {lb}: rubric on {len(scores)} answers in {wall:.1f} s ({scores.count(None)} missing)")
        prev = labels[labels.index(lb) - 1] if labels.index(lb) else None
        if prev is None or [(x.get("id"), x.get("sample")) for x in results[prev].get("samples") or []] != \
                [(x.get("id"), x.get("sample")) for x in r["samples"]]:
            continue  # the first model, or other slots than the model before it: nothing to pair
        wins, info = pairwise(ask, chats, [c.language for c in ctxs], _contents(results[prev]), _contents(r),
                              cfg.judge_concurrency)
        have = [(w, x.get("id")) for w, x in zip(wins, r["samples"]) if w is not None]
        mean, lo, hi = bootstrap_ci([w for w, _ in have], cfg.bootstrap, cfg.seed, [g for _, g in have])
        r["judge"] = {"vs": prev, "win_rate": {"mean": mean, "low": lo, "high": hi}, "slots": len(wins), **info}
        if progress:
            print(f"judge: {lb} vs {prev}: {info['calls']} pairwise calls in {info['wall_s']:.1f} s "
                  f"({info['missing']} slots missing)")


def add_arguments(p) -> None:
    p.add_argument("target", help="a model folder, or a run folder (runs/NAME: base and every stage)")
    p.add_argument("--prompts", help="prompts JSONL (default: the bundled demo prompts' eval split)")
    p.add_argument("--out", help="output folder (default: the run folder, or MODEL/eval)")
    p.add_argument("--config", help="a config file (its `eval` and `sampling` sections; default for a run "
                                    "folder: the run's own config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. eval.limit=5")
    p.add_argument("--long", action="store_true",
                   help="long-context eval instead (eval/long.py): perplexity by position on a long held-out text, "
                        "and recall of an early detail in a role-play chat at each of --lengths; long.json, long.png")
    p.add_argument("--lengths", default="512,1024,2048", help="with --long: conversation lengths in tokens")
    p.add_argument("--long-text", help="with --long: the long text (default: eval.ppl_text, else the demo novel)")


def run_config(target: str | Path, given: str | None) -> str | Path | None:
    """The config `tifa eval` uses: the one given, else a run folder's own `config.yaml` (what the
    pipeline trained and evaluated with: the same eval settings and sampling), else the defaults."""
    from tifaforge.models.load import run_model

    target = Path(target)
    if given is None and run_model(target) != target and (target / "config.yaml").is_file():
        return target / "config.yaml"
    return given


def run(args) -> int:
    from tifaforge.config import load_config

    config = run_config(args.target, args.config)
    if config is not None and args.config is None:
        print(f"settings: {config} (the run's own; --config to use others)")
    cfg = load_config(config, args.set)
    if args.long:
        return _run_long(args, cfg)
    if args.prompts:
        cfg.eval.prompts = args.prompts
    t0 = time.perf_counter()
    res = run_eval(args.target, args.out, cfg.eval, cfg.sampling, reward=cfg.reward)
    from tifaforge.config import save_resolved

    save_resolved(cfg, res["out"], "eval_config.yaml")  # what produced these numbers, beside them
    print(res["table"])
    print(f"\nwrote {res['out'] / 'report.md'}, eval.json and plots/ in {time.perf_counter() - t0:.0f} s"
          + (" (the judge's share is printed above)" if cfg.eval.judge_url else ""))
    return 0


def _run_long(args, cfg) -> int:
    from tifaforge.errors import TifaError
    from tifaforge.eval.long import evaluate_long, format_long
    from tifaforge.models.load import run_model

    try:
        lengths = sorted({int(n) for n in args.lengths.split(",") if n.strip()})
    except ValueError:
        raise TifaError(f"--lengths {args.lengths!r}: expected token counts separated by commas, e.g. 512,1024") from None
    if not lengths or lengths[0] < 64:
        raise TifaError(f"--lengths {args.lengths!r}: give lengths of at least 64 tokens")
    model = run_model(Path(args.target))
    out = Path(args.out) if args.out else model.parent / "eval-long" if model != Path(args.target) else model / "eval-long"
    res = evaluate_long(model, out, lengths, args.long_text or cfg.eval.ppl_text or None, cfg.model.rope_scaling)
    print(format_long(res))
    print(f"\nwrote {out / 'long.json'} and {out / 'long.png'}")
    return 0


def load_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))

"""`tifa pipeline`: the whole recipe, resumably — cpt → sft → mgrpo → dpo, then the evaluation.

    tifa pipeline configs/tiny.yaml                        # runs/tiny/: base/ 01-cpt/ 02-sft/ 03-mgrpo/ 04-dpo/ report.md
    tifa pipeline configs/tiny.yaml --stages sft,dpo       # a subset (numbered by stage kind all the same)
    tifa pipeline configs/tiny.yaml --restart-from mgrpo   # retrain mgrpo and every later stage
    tifa pipeline configs/tiny.yaml --launcher torchrun --num-processes 2   # each stage on 2 ranks

Each stage starts from the previous stage's `model/` and writes `manifest.json` last. Re-running the
same command resumes: a finished stage whose fingerprint (config keys, input contents, starting
model) is unchanged is skipped, an interrupted one resumes from its last complete checkpoint, and a
changed config or input is reported and refused — never silently mixed — until `--restart-from`
names where to retrain. Everything a run needs (stage names, data files, prompts) is checked before
any training starts. At the end `tifa eval` compares the base and every stage (report.md, eval.json,
plots) and each stage's model folder gets a model card README.

Under a launcher (`--launcher torchrun|accelerate`, or the config's `launch:` section) this process
stays the driver: it checks, fingerprints and skips as above, and starts each stage that has work
left as N processes (`tifa train STAGE --launcher ...` with the run's resolved config); a rank that
dies fails the stage, and rerunning the command resumes it from its last complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tifaforge.errors import TifaError

ORDER = ("cpt", "sft", "mgrpo", "dpo")


def parse_stages(spec: str | list[str]) -> list[str]:
    """Stage names in recipe order; an unknown name is an error naming the known ones."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in names if s not in ORDER]
    if bad:
        raise TifaError(f"stages: unknown stage {bad[0]!r} (known: {', '.join(ORDER)})")
    if not names:
        raise TifaError("stages: empty (known: " + ", ".join(ORDER) + ")")
    return sorted(set(names), key=ORDER.index)


def check_inputs(cfg: Any, stages: list[str], evaluate: bool) -> None:
    """Every data file the run reads exists and parses — before any training starts."""
    from tifaforge.data.conversations import check_file
    from tifaforge.utils import resolve_path
    from tifaforge.train.manifest import inputs_of

    for s in stages:
        for p in inputs_of(cfg, s):
            if not resolve_path(p).exists():
                raise TifaError(f"{s}: {p}: no such file or folder")
        sec = getattr(cfg, s)
        if s == "sft":
            check_file(resolve_path(sec.data), "sft")
        elif s == "mgrpo" or (s == "dpo" and sec.mine):
            check_file(resolve_path(sec.prompts), "prompts")
        if s == "dpo" and sec.pairs:
            check_file(resolve_path(sec.pairs), "prefs")
    if evaluate or "dpo" in stages and cfg.dpo.report:
        if not resolve_path(cfg.eval.prompts).exists():
            raise TifaError(f"eval.prompts: {cfg.eval.prompts}: no such file")
        check_file(resolve_path(cfg.eval.prompts), "prompts")


def run_module(stage: str):
    import importlib

    return importlib.import_module(f"tifaforge.stages.{stage}").run_stage


def plan(run_dir: Path, cfg: Any, stages: list[str], restart_from: str | None) -> None:
    """Refuse a run directory whose finished or started stages disagree with this config (before any
    work), unless `restart_from` removes them; remove what `restart_from` names."""
    from tifaforge.train import manifest
    from tifaforge.train.stage import STAGE_DIRS

    if restart_from is not None:
        if restart_from not in stages:
            raise TifaError(f"--restart-from: {restart_from!r} is not one of this run's stages ({', '.join(stages)})")
        for s in stages[stages.index(restart_from):]:
            d = run_dir / STAGE_DIRS[s]
            if d.exists():
                print(f"pipeline: --restart-from {restart_from}: removing {d}")
                shutil.rmtree(d)
        return
    saved = run_dir / "config.yaml"
    if saved.exists():
        import yaml

        from tifaforge.config import to_dict

        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        if old.get("model") != to_dict(cfg)["model"] or old.get("seed") != cfg.seed:
            for s in stages:
                d = run_dir / STAGE_DIRS[s]
                if (d / manifest.MANIFEST).exists() or (d / manifest.STARTED).exists():
                    raise TifaError(f"{run_dir}: a run of another config (its model/seed differ from this one's); "
                                    f"use another --name, or --restart-from {stages[0]} to retrain it all")


def check_stage(stage_dir: Path, stage: str, fp: dict) -> str:
    """'done' (finished, same fingerprint), 'resume' / 'fresh'; or an error naming what changed."""
    from tifaforge.train import manifest

    for name, what in ((manifest.MANIFEST, "finished"), (manifest.STARTED, "was started")):
        if (stage_dir / name).exists():
            old = manifest.read(stage_dir, name)
            if old.get("digest") == fp["digest"]:
                return "done" if name == manifest.MANIFEST else "resume"
            diff = manifest.differences(old, fp) or ["its fingerprint"]
            raise TifaError(f"{stage_dir}: {what} with a different config or input ({'; '.join(diff[:5])}); "
                            f"rerun with --restart-from {stage} to retrain it and every later stage, or use another --name")
    return "fresh"


def run_pipeline(cfg: Any, stages: list[str], run_dir: str | Path, *, restart_from: str | None = None,
                 evaluate: bool = True, stop_after: str | None = None) -> dict:
    """Run `stages` into `run_dir`; returns {"stages": {stage: status}, "model": final model, "eval": ...}.

    `stop_after`: return once that stage is done (tests use it to time-box a run).
    """
    from tifaforge.config import save_resolved
    from tifaforge.train import manifest
    from tifaforge.train.stage import STAGE_DIRS, resolve_base

    from tifaforge.train.stage import check_launch

    run_dir = Path(run_dir)
    check_inputs(cfg, stages, evaluate)
    launch = cfg.launch
    if launch.launcher != "none":  # refused before any work; the launcher gets the count as given
        check_launch(cfg, stages, launch.launcher, launch.num_processes, launch.accelerate_config)
    from tifaforge.train.plan import check_fits

    check_fits(cfg, stages, cfg.model.base, launch.num_processes if launch.launcher != "none" else 1)
    plan(run_dir, cfg, stages, restart_from)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir)
    model = resolve_base(cfg.model.base, run_dir, cfg)
    # --- check every stage against what is on disk before training any of them ------------------
    prev = model
    for s in stages:
        d = run_dir / STAGE_DIRS[s]
        if (d / manifest.MANIFEST).exists() or (d / manifest.STARTED).exists():
            check_stage(d, s, manifest.fingerprint(cfg, s, prev))
        prev = d / "model"
    # --- run them --------------------------------------------------------------------------------
    done = {}
    for s in stages:
        d = run_dir / STAGE_DIRS[s]
        fp = manifest.fingerprint(cfg, s, model)  # upstream finished now: its digest is known
        status = check_stage(d, s, fp)
        if status == "done":
            print(f"pipeline: {s}: finished earlier with the same config and inputs — skipped ({d})")
        else:
            print(f"pipeline: {s}: {'resuming' if status == 'resume' else 'starting'} from {model} -> {d}")
            d.mkdir(parents=True, exist_ok=True)
            manifest.mark_started(d, fp)
            start = time.perf_counter()
            try:
                out = (run_module(s)(cfg, model, d, resume=True) if launch.launcher == "none"
                       else launched(s, run_dir / "config.yaml", model, d, launch))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised as one line naming the stage and step
                what = str(e) if isinstance(e, TifaError) else f"{type(e).__name__}: {e}"
                raise TifaError(f"pipeline: stage {s} ({d.name}) failed at step {_last_step(d)}: {what}; "
                                "rerun the same command to resume from its last complete checkpoint") from e
            if Path(out) != d / "model":
                raise TifaError(f"pipeline: stage {s} stopped before its end ({out})")
            manifest.write(d, s, fp, model, time.perf_counter() - start, metrics=_final_metrics(d))
            write_model_card(d, s, cfg)
        done[s] = status
        model = d / "model"
        if s == stop_after:
            return {"stages": done, "model": model, "eval": None}
    result = {"stages": done, "model": model, "eval": None}
    if evaluate:
        from tifaforge.eval.report import run_eval

        dpo_dir = run_dir / STAGE_DIRS["dpo"]  # its before/after evaluations, where their keys still match
        result["eval"] = run_eval(run_dir, run_dir, cfg.eval, cfg.sampling, reward=cfg.reward,
                                  reuse=(dpo_dir / "report_before.json", dpo_dir / "report_after.json"))
        save_resolved(cfg, run_dir, "eval_config.yaml")
        for s in stages:
            write_model_card(run_dir / STAGE_DIRS[s], s, cfg, result["eval"]["results"].get(STAGE_DIRS[s]))
    return result


def launched(stage: str, config: Path, model: Path, out: Path, launch) -> Path:
    """Run one stage as `launch.num_processes` processes under the launcher, from the run's resolved
    config; returns its model folder, or raises when a rank failed (the launcher stops the others)."""
    from tifaforge.train.stage import launch as start

    args = argparse.Namespace(config=str(config), resume=True, set=[], launcher=launch.launcher,
                              num_processes=launch.num_processes or None,
                              accelerate_config=launch.accelerate_config or None)
    code = start(args, stage, out, model)
    if code != 0:
        raise TifaError(f"the {launch.launcher} launch of {launch.num_processes or 'its'} processes exited with "
                        f"status {code}")
    if not (out / "model" / "config.json").exists():
        raise TifaError(f"the {launch.launcher} launch exited with status 0 but wrote no {out / 'model'}")
    return out / "model"


def _last_step(stage_dir: Path) -> int:
    """The last step the stage logged (0 when it logged none)."""
    from tifaforge.train.metrics import JsonlLog

    rows = JsonlLog(stage_dir / "metrics.jsonl").rows() if (stage_dir / "metrics.jsonl").exists() else []
    return max((int(r["step"]) for r in rows if isinstance(r.get("step"), (int, float))), default=0)


def _final_metrics(stage_dir: Path) -> dict:
    """The last logged value of each metric (a summary for the manifest and the model card)."""
    from tifaforge.train.metrics import JsonlLog

    if not (stage_dir / "metrics.jsonl").exists():
        return {}
    last: dict = {}
    for row in JsonlLog(stage_dir / "metrics.jsonl").rows():
        last.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
    return last


# ---------------------------------------------------------------------------------------------
# Model cards

RECIPE = {
    "cpt": "continued pretraining on novels (next-token loss on packed blocks)",
    "sft": "chain-of-thought SFT cold start (loss on the final assistant turn: think block, answer, end tag)",
    "mgrpo": "MGRPO: GRPO on rule-based literary rewards plus a revision pass guided by the rules' messages",
    "dpo": "anti-repetition DPO on pairs mined from the model's own answers, with an SFT term on chosen",
}


def write_model_card(stage_dir: Path, stage: str, cfg: Any, eval_result: dict | None = None) -> None:
    """model/README.md: the recipe so far, the stage's data statistics and metrics (Hugging Face card format)."""
    from tifaforge.train import manifest
    from tifaforge.utils import atomic_write_text

    man = manifest.read(stage_dir)
    sec = getattr(cfg, stage)
    data = {}
    for name in ("data_report.json", "pairs.summary.json", "data/stats.json"):
        if (stage_dir / name).exists():
            data[name] = json.loads((stage_dir / name).read_text(encoding="utf-8"))
    lines = ["---", "license: apache-2.0", "library_name: transformers", "tags: [role-play, creative-writing, tifaforge]",
             "---", "", f"# {cfg.name} — {stage_dir.name}", "",
             f"Made with tifaforge, stage `{stage}`: {RECIPE[stage]}.", "",
             f"- started from: `{man['base_model']}`",
             f"- trained in {man['seconds']:.0f} s; config digest `{man['digest']}` (the resolved config is "
             f"`{stage_dir.name}/config.yaml`)",
             f"- chat format: the DeepSeek-R1 template (`<think>…</think>` then the answer; think blocks are "
             "stripped from the history); recommended sampling: temperature 0.4, top_p 0.6, repetition_penalty 1.17",
             "", "## Training settings", "",
             *[f"- {k}: {getattr(sec, k)}" for k in ("learning_rate", "steps", "batch_size", "max_length")
               if hasattr(sec, k)], ""]
    if data:
        lines += ["## Data", ""]
        for name, d in data.items():
            flat = {k: v for k, v in d.items() if isinstance(v, (int, float, str))}
            lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in list(flat.items())[:10]))
        lines.append("")
    final = man.get("metrics") or {}
    if final:
        lines += ["## Last logged training metrics", "",
                  *[f"- {k}: {v:.4g}" for k, v in final.items() if k not in ("epoch",)][:14], ""]
    if eval_result:
        from tifaforge.eval.report import SHOWN

        lines += ["## Held-out evaluation", "", "| metric | value |", "|---|---|"]
        for key, (label, _) in SHOWN.items():
            m = eval_result["metrics"].get(key)
            if m:
                lines.append(f"| {label} | {m['mean']:.4g} |")
        lines.append("")
    atomic_write_text(stage_dir / "model" / "README.md", "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config with the stages' sections (configs/tiny.yaml)")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(ORDER)} (default: the config's `stages`)")
    p.add_argument("--name", help="run name: outputs go to RUNS/NAME (default: the config's `name`)")
    p.add_argument("--runs", default="runs", help="folder that holds the runs (default: runs)")
    p.add_argument("--restart-from", choices=ORDER, help="retrain this stage and every later one")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. sft.steps=40")
    p.add_argument("--launcher", choices=["none", "torchrun", "accelerate"],
                   help="run each stage as --num-processes ranks (default: the config's launch.launcher)")
    p.add_argument("--num-processes", type=int, help="processes per stage under the launcher (launch.num_processes)")
    p.add_argument("--accelerate-config", help="accelerate config file with --launcher accelerate")
    p.add_argument("--sharding", choices=["ddp", "fsdp2"],
                   help="fsdp2: split weights, gradients and optimizer states over the ranks (launch.sharding)")


def run(args: argparse.Namespace) -> int:
    from tifaforge.config import load_config

    cfg = load_config(args.config, args.set)
    if args.name:
        cfg.name = args.name
    for key in ("launcher", "num_processes", "accelerate_config", "sharding"):  # the command line wins over the config
        if getattr(args, key, None) is not None:
            setattr(cfg.launch, key, getattr(args, key))
    stages = parse_stages(args.stages or cfg.stages)
    run_dir = Path(args.runs) / cfg.name
    start = time.perf_counter()
    res = run_pipeline(cfg, stages, run_dir, restart_from=args.restart_from, evaluate=not args.no_eval)
    if res["eval"] is not None:
        print(res["eval"]["table"])
    print(f"\npipeline: {', '.join(f'{s} {v}' for s, v in res['stages'].items())} in "
          f"{time.perf_counter() - start:.0f} s; final model {res['model']}"
          + (f"; report {run_dir / 'report.md'}" if res["eval"] is not None else ""))
    sys.stdout.flush()
    return 0

"""Stage 4: anti-repetition DPO on pairs mined from the model's own answers, on TRL's DPOTrainer.

    tifa train dpo configs/tiny.yaml --model runs/tiny/03-mgrpo/model     # or: python -m tifaforge.stages.dpo ...

Pairs: mined on-policy from the starting model (`dpo.mine`, the `mining` section: K answers per
prompt, rejected = a repetitive one, chosen = one that passes the repetition and format rules, a
synthetic rejected answer where no natural one exists) and kept in `pairs.jsonl` beside their
summary; and/or a preference file of your own (`dpo.pairs`). The loss is DPO with a modest beta plus
an SFT term on the chosen answers (`dpo.sft_weight`): plain DPO is known to cost lexical diversity.
Before training the starting model is evaluated on the held-out prompts, after training the result,
and `report.md` compares them (repetition, distinct-1/2, think format, reward), flagging a drop in
distinct-2. Resumable like the other stages: mined pairs and the "before" evaluation are reused,
training resumes from the last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from tifaforge.errors import TifaError
from tifaforge.train import distributed as dist
from tifaforge.train import sharding, stage
from tifaforge.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

STAGE = "dpo"
PLOT_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "learning_rate",
             "grad_norm")
# the before/after table of report.md: these rows of the eval report's metrics
REPORT_KEYS = ("repetition_4gram", "repetition_4gram_unpenalised", "cross_turn_overlap", "distinct_1", "distinct_2", "think_format", "reward")


# ---------------------------------------------------------------------------------------------
# Command line: tifa train dpo CONFIG


def add_arguments(p) -> None:
    stage.stage_arguments(p)


def run(args) -> int:
    return stage.run_command(args, STAGE, run_stage)


# ---------------------------------------------------------------------------------------------
# The stage


def run_stage(cfg: Any, base_model_dir: str | Path, out_dir: str | Path, *, resume: bool = True,
              extra_callbacks: tuple = ()) -> Path:
    """Train `cfg.dpo` from `base_model_dir` into `out_dir`; returns `out_dir/model`."""
    from trl import DPOConfig, DPOTrainer

    # --- config: run directory, resume point, trainer arguments --------------------------------
    tc = cfg.dpo
    if not tc.mine and not tc.pairs:
        raise TifaError("dpo: no pairs to train on: set dpo.mine: true and/or dpo.pairs to a preference file")
    mode = stage.sharding_mode(cfg, STAGE)  # ddp, or fsdp2: weights split over the ranks
    run, resume_from = stage.prepare_out(out_dir, cfg, STAGE, resume)
    loss_type, weights = ([tc.loss_type, "sft"], [1.0, tc.sft_weight]) if tc.sft_weight > 0 else ([tc.loss_type], None)
    args = stage.training_args(tc, run, stage.seed_of(cfg, tc), STAGE, trl_config=DPOConfig, mode=mode, beta=tc.beta,
                               loss_type=loss_type, loss_weights=weights, precompute_ref_log_probs=tc.precompute_ref)

    # --- pairs (mined from the starting model's own answers, and/or the user's) and "before" ------
    import torch

    dist.start("cuda" if torch.cuda.is_available() else "cpu")  # mining gathers across the ranks (TRL reuses it)
    pairs = []
    if tc.mine:
        pairs += mined_pairs(cfg, base_model_dir, run.out)
    if tc.pairs:
        pairs += user_pairs(tc.pairs, cfg.mining.user_name)
    before = evaluate_once(cfg, base_model_dir, run.out / "report_before.json") if tc.report else None

    # --- models: the policy, and a frozen reference unless LoRA (adapters off) or precomputed -------
    model, tokenizer = stage.load_for_training(base_model_dir, cfg.model.loop, tc, cfg.model.rope_scaling)
    ref = None
    if not tc.lora.enabled and not tc.precompute_ref:
        ref, _ = stage.load_for_training(base_model_dir, cfg.model.loop, rope=cfg.model.rope_scaling)
        ref.eval().requires_grad_(False)

    # --- data ------------------------------------------------------------------------------------
    dataset, dropped = pair_dataset(pairs, tokenizer, tc)
    if stage.is_main():
        atomic_write_json(run.out / "data_report.json", {"pairs": len(pairs), "used": len(dataset),
                                                         "dropped": dropped})

    # --- trainer ---------------------------------------------------------------------------------
    trainer = sharding.trainer_class(DPOTrainer, mode)(
        model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=stage.lora_config(tc, model, tokenizer),
        callbacks=[*stage.loop_callbacks(model),
                   *stage.callbacks(tc, run, STAGE, tokenizer, dataset["prompt"][: tc.sample_prompts], cfg.sampling, mode),
                   *extra_callbacks],
    )

    # --- train, save model/, then the before/after report -------------------------------------------
    stage.train(trainer, resume_from)
    model_dir = stage.save_final(trainer, tc, base_model_dir, run, PLOT_KEYS)
    if before is not None:
        after = evaluate_once(cfg, model_dir, run.out / "report_after.json", fresh=True)
        if stage.is_main():
            write_report(run.out, before, after, len(pairs), len(dataset))
    return model_dir


# ---------------------------------------------------------------------------------------------
# Pairs


def mined_pairs(cfg: Any, model_dir: str | Path, out: Path) -> list[dict]:
    """Pairs mined from `model_dir`'s own answers into OUT/pairs.jsonl (reused when already there). On N
    processes each rank mines every N-th prompt and rank 0 writes them all in prompt order: no rank waits
    on another's mining with a timeout, only at the gather."""
    from tifaforge.engine.generate import Engine
    from tifaforge.stages.mining import mine_shard, write_pairs
    from tifaforge.utils import read_jsonl

    path, summary_path = out / "pairs.jsonl", out / "pairs.summary.json"
    if not summary_path.exists():  # the summary is written after the pairs: marks them complete
        engine = Engine.load(model_dir)
        lines, outcomes, n = mine_shard(engine, cfg.dpo.prompts, cfg.mining, cfg.sampling, stage.is_main(), cfg.reward,
                                        dist.rank(), dist.world_size())
        del engine
        shards = dist.gather((lines, outcomes))
        if stage.is_main():
            summary = write_pairs(path, [s[0] for s in shards], [s[1] for s in shards], n)
            atomic_write_json(summary_path, summary)
            log.info("dpo: mined %d pairs from %d prompts (%d natural, %d synthetic, %d impossible)",
                     summary["pairs"], summary["prompts"], summary["natural"], summary["synthetic"],
                     summary["impossible"])
    dist.barrier()
    return [{**obj, "source": f"{path}:{n}"} for n, obj in read_jsonl(path)]


def user_pairs(path: str, user_name: str) -> list[dict]:
    """A preference file checked line by line (chosen equal to rejected, empty answers: file:line errors)."""
    from tifaforge.data.conversations import check_file, to_chat

    records, _ = check_file(path, "prefs")
    return [{"messages": to_chat(r, user_name), "chosen": r.chosen.text(), "rejected": r.rejected.text(),
             "synthetic": r.synthetic, "source": f"{path}:{r.line}"} for r in records]


def pair_dataset(pairs: list[dict], tokenizer, tc) -> tuple[Any, list[str]]:
    """A `datasets` table of prompt / chosen / rejected text for DPOTrainer (which tokenises it and
    appends the end token), the prompt rendered as the engine renders it. A prompt that fills
    max_length leaves no answer token to train: dropped and reported per line, or an error."""
    from datasets import Dataset

    from tifaforge.chat.template import render

    rows, dropped = [], []
    for p in pairs:
        prompt = render(p["messages"], tokenizer, add_generation_prompt=True)
        n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        if n >= tc.max_length:
            problem = f"{p['source']}: messages: the prompt is {n} tokens, it fills dpo.max_length ({tc.max_length})"
            if tc.too_long == "error":
                raise TifaError(problem)
            log.warning("dpo: dropped %s", problem)
            dropped.append(problem)
            continue
        rows.append({"prompt": prompt, "chosen": p["chosen"], "rejected": p["rejected"]})
    if not rows:
        raise TifaError(f"dpo: no usable preference pairs ({len(pairs)} found, {len(dropped)} too long); "
                        "see pairs.summary.json for why mining found none")
    return Dataset.from_list(rows), dropped


# ---------------------------------------------------------------------------------------------
# Before / after


def evaluate_once(cfg: Any, model_dir: str | Path, path: Path, fresh: bool = False) -> dict:
    """The eval metrics of `model_dir`, kept in `path` with their answers and the evaluation's key
    (metrics.eval_key): a resumed stage does not redo "before" unless the settings or the model changed,
    and the pipeline's final evaluation reuses both files instead of generating again."""
    from tifaforge.engine.generate import Engine
    from tifaforge.eval.metrics import eval_key, evaluate
    ecfg = dataclasses.replace(cfg.eval, limit=cfg.dpo.report_limit or cfg.eval.limit)
    key = eval_key(model_dir, ecfg, cfg.sampling, cfg.reward)
    if path.exists() and not fresh:
        res = json.loads(path.read_text(encoding="utf-8"))
        if res.get("key") == key:
            return res
    # On N processes every rank answers its share (all ranks agree on reusing: rank 0 writes only after
    # the gather, which every rank reaches after this check).
    res = evaluate(Engine.load(model_dir), ecfg, cfg.sampling, progress=stage.is_main(), reward=cfg.reward,
                   shard=(dist.rank(), dist.world_size()))
    res["key"] = key
    if stage.is_main():
        atomic_write_json(path, res)
    return res


def write_report(out: Path, before: dict, after: dict, n_pairs: int, n_used: int) -> str:
    """report.md: the before/after table; a distinct-2 drop is flagged (plain DPO's known cost)."""
    lines = [f"# Anti-repetition DPO: before and after\n",
             f"{n_used} of {n_pairs} preference pairs trained; {before['n']} held-out prompts"
             f"{'' if before.get('samples_per_prompt', 1) == 1 else ' × %d answers' % before['samples_per_prompt']}, at most "
             f"{before['max_new_tokens']} new tokens each, the run's `sampling` settings with a fixed seed.\n",
             "| metric | before | after | change |", "|---|---|---|---|"]
    from tifaforge.eval.report import SHOWN

    for key in REPORT_KEYS:
        label, higher = SHOWN[key]
        b, a = before["metrics"].get(key, {}).get("mean"), after["metrics"].get(key, {}).get("mean")
        if b is None or a is None:
            continue
        good = (a > b) == higher if a != b else None
        mark = "" if good is None else (" (better)" if good else " (worse)")
        lines.append(f"| {label} {'↑' if higher else '↓'} | {b:.4g} | {a:.4g} | {a - b:+.4g}{mark} |")
    d2b, d2a = before["metrics"]["distinct_2"]["mean"], after["metrics"]["distinct_2"]["mean"]
    if d2a < d2b:
        lines.append(f"\n**Warning: distinct-2 dropped from {d2b:.4g} to {d2a:.4g}** — the DPO step cost lexical "
                     "diversity; raise dpo.sft_weight or lower dpo.beta / the learning rate.")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text)
    atomic_write_json(out / "report.json", {"before": before["metrics"], "after": after["metrics"],
                                            "distinct_2_dropped": d2a < d2b, "pairs": n_pairs, "used": n_used})
    return text


if __name__ == "__main__":  # what launchers start on every rank: python -m tifaforge.stages.dpo CONFIG ...
    raise SystemExit(stage.module_main(STAGE, run_stage))

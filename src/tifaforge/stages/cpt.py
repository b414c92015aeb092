"""Stage 1: continued pretraining (CPT) on novels, on TRL's SFTTrainer.

    tifa train cpt configs/tiny-cpt.yaml --out runs/tiny/01-cpt      # or: python -m tifaforge.stages.cpt ...

Next-token loss on every token of the packed blocks that `tifa data novels` writes (documents
separated by the end-of-text token; attention crosses block-internal document boundaries, as in
pretraining). For long context: `cpt.pack: chapters` keeps chapters whole in rows up to max_length,
and `cpt.length_curriculum` trains on shorter pieces first. Resumable: rerun with --resume after any interruption. `diff cpt.py sft.py` shows only
the data and the loss mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tifaforge.train import data, sharding, stage

STAGE = "cpt"


def add_arguments(p) -> None:
    stage.stage_arguments(p)


def run(args) -> int:
    return stage.run_command(args, STAGE, run_stage)


def run_stage(cfg: Any, base_model_dir: str | Path, out_dir: str | Path, *, resume: bool = True,
              extra_callbacks: tuple = ()) -> Path:
    """Train `cfg.cpt` from `base_model_dir` into `out_dir`; returns `out_dir/model`."""
    from trl import SFTTrainer

    # --- config: run directory, resume point, trainer arguments --------------------------------
    tc = cfg.cpt
    mode = stage.sharding_mode(cfg, STAGE)  # ddp, or fsdp2: weights split over the ranks
    run, resume_from = stage.prepare_out(out_dir, cfg, STAGE, resume)
    data.check_curriculum(tc.length_curriculum, tc.max_length, "cpt.length_curriculum")
    args = stage.training_args(tc, run, stage.seed_of(cfg, tc), STAGE, mode=mode)

    # --- model (LoRA adapters are added by the trainer from lora_config) -------------------------
    model, tokenizer = stage.load_for_training(base_model_dir, cfg.model.loop, tc, cfg.model.rope_scaling)

    # --- data: packed blocks; the labels are the input ids ---------------------------------------
    dataset = data.cpt_dataset(tc.data, tokenizer, tc.max_length, run.out / "data", tc.dedup_threshold, tc.pack)
    prompts = data.cpt_sample_prompts(dataset, tokenizer, tc.sample_prompts)
    dataset, phases = data.cpt_curriculum(dataset, tc.length_curriculum, tc.max_length, args.seed, run.out / "data")
    data.log_curriculum(phases, STAGE, run.out)

    # --- trainer ---------------------------------------------------------------------------------
    trainer = sharding.trainer_class(SFTTrainer, mode)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=stage.lora_config(tc, model, tokenizer),
        callbacks=[*stage.loop_callbacks(model), *stage.callbacks(tc, run, STAGE, tokenizer, prompts, cfg.sampling, mode),
                   *extra_callbacks],
    )

    # --- train, then save model/ (atomically) and the plots ---------------------------------------
    stage.train(trainer, resume_from)
    return stage.save_final(trainer, tc, base_model_dir, run)


if __name__ == "__main__":  # what launchers start on every rank: python -m tifaforge.stages.cpt CONFIG ...
    raise SystemExit(stage.module_main(STAGE, run_stage))

"""Stage 2: the chain-of-thought SFT cold start, on TRL's SFTTrainer.

    tifa train sft configs/tiny-sft.yaml --model runs/tiny/01-cpt/model     # or: python -m tifaforge.stages.sft ...

Loss on the final assistant turn only: its think block, answer and end tag, as the chat template's
training form marks them (every prompt prefix renders exactly as at inference). A multi-turn
dialogue becomes one example per assistant turn (`sft.per_turn`). The template check runs before
anything trains. Resumable: rerun with --resume after any interruption. `diff cpt.py sft.py` shows
only the data and the loss mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tifaforge.train import data, sharding, stage

STAGE = "sft"


def add_arguments(p) -> None:
    stage.stage_arguments(p)


def run(args) -> int:
    return stage.run_command(args, STAGE, run_stage)


def run_stage(cfg: Any, base_model_dir: str | Path, out_dir: str | Path, *, resume: bool = True,
              extra_callbacks: tuple = ()) -> Path:
    """Train `cfg.sft` from `base_model_dir` into `out_dir`; returns `out_dir/model`."""
    from trl import SFTTrainer

    # --- config: run directory, resume point, trainer arguments --------------------------------
    tc = cfg.sft
    mode = stage.sharding_mode(cfg, STAGE)  # ddp, or fsdp2: weights split over the ranks
    run, resume_from = stage.prepare_out(out_dir, cfg, STAGE, resume)
    data.check_curriculum(tc.length_curriculum, tc.max_length, "sft.length_curriculum")
    args = stage.training_args(tc, run, stage.seed_of(cfg, tc), STAGE, mode=mode)

    # --- model (LoRA adapters are added by the trainer from lora_config) -------------------------
    model, tokenizer = stage.load_for_training(base_model_dir, cfg.model.loop, tc, cfg.model.rope_scaling)

    # --- data: one example per assistant turn; labels only on the final assistant turn -----------
    dataset, chats = data.sft_examples(tc.data, tokenizer, tc)
    prompts = data.sft_sample_prompts(chats, tokenizer, tc.sample_prompts)
    dataset, phases = data.sft_curriculum(dataset, tc.length_curriculum, tc.max_length, args.seed)
    data.log_curriculum(phases, STAGE, run.out)
    if tc.prime_new_tokens:  # tags the loader added to a base that lacked them (train/prime.py)
        from tifaforge.train.prime import prime_new_tokens

        prime_new_tokens(model, tokenizer, dataset)

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


if __name__ == "__main__":  # what launchers start on every rank: python -m tifaforge.stages.sft CONFIG ...
    raise SystemExit(stage.module_main(STAGE, run_stage))

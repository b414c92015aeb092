"""The four training stages, one file each, read top to bottom: cpt.py, sft.py (TRL's SFTTrainer),
mgrpo.py (our trainer), dpo.py (TRL's DPOTrainer), and mining.py beside DPO: the anti-repetition
pairs mined from the model's own answers (also `tifa data mine-pairs`).

    tifa train cpt CONFIG      # or: python -m tifaforge.stages.cpt CONFIG

Each file's skeleton is the same: config -> model (LoRA) -> data -> trainer -> train -> save, each
step a call into `tifaforge.train`. A stage exposes `run_stage(cfg, base_model_dir, out_dir) -> model
dir` for the pipeline and `add_arguments` / `run` for the CLI. The library never imports a stage.
"""

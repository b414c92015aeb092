"""The training library every stage uses: device checks, trustworthy checkpoints, metrics, guards.

    tifa train cpt configs/tiny-cpt.yaml      # stages/cpt.py, built on these pieces

- `device.py`: the device and precision checks (the config sections are in `tifaforge.config`);
- `checkpoints.py`: completion marker written last, keep-last-N after the new one is complete,
  resume from the latest complete checkpoint (torn ones skipped with a message);
- `metrics.py`: metrics.jsonl, samples.jsonl through the engine, PNG plots;
- `guards.py`: a non-finite loss or gradient skips the update, is reported, never checkpointed;
- `data.py`: the CPT packed dataset (checked against the tokenizer) and SFT examples;
- `stage.py`: the steps a stage file strings together (TRL arguments, model with LoRA, final save).

Stages (`tifaforge.stages`) import this package; it never imports a stage.
"""

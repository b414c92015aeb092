"""`tifa plan`: the memory estimate against measured peaks, its advice, the shipped configs on their
stated hardware, the check stages run before loading a model, and bad input.

    .venv/bin/python -m pytest -q tests/test_plan.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tifaforge.config import load_config
from tifaforge.errors import TifaError
from tifaforge.train import plan

ROOT = Path(__file__).resolve().parents[1]

# Run one stage in a fresh process; print its peak RSS (VmHWM) over the RSS once the libraries are imported.
MEASURE = """
import importlib, json, os, sys
import accelerate, datasets, matplotlib.pyplot, peft, torch, transformers, trl  # noqa: F401  before the baseline
from trl import DPOTrainer, SFTTrainer  # noqa: F401
from tifaforge.config import load_config
stage, base, out, *sets = sys.argv[1:]
cfg = load_config(None, sets)
run_stage = importlib.import_module(f"tifaforge.stages.{stage}").run_stage
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
run_stage(cfg, base, out)
# VmHWM, the peak RSS of this process image: getrusage's ru_maxrss would carry over the size of the process
# that started this one (Linux counts the pre-exec fork: late in a test session the pytest process's 2 GB)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
print(json.dumps({"peak": hwm - before}))
"""

TINY_SFT = ["sft.data=" + str(ROOT / "data/demo/sft.jsonl"), "sft.steps=2", "sft.batch_size=4", "sft.max_length=512"]
SMOL_SFT = ["sft.data=" + str(ROOT / "data/demo/en/sft.jsonl"), "sft.steps=2", "sft.batch_size=2", "sft.max_length=512",
            "sft.user_name=Sam"]
# Two steps: the second runs its forward and backward while AdamW's moments exist (the steady peak).
CASES = {  # name: (stage, base fixture, settings); no samples, no checkpoint before the end
    "tiny-sft": ("sft", "tiny_model_dir", TINY_SFT),
    "tiny-dpo": ("dpo", "tiny_model_dir", ["dpo.mine=false", "dpo.pairs=" + str(ROOT / "data/demo/prefs.jsonl"),
                                          "dpo.report=false", "dpo.steps=2", "dpo.batch_size=4", "dpo.max_length=512"]),
    "tiny-mgrpo": ("mgrpo", "tiny_model_dir", ["mgrpo.prompts=" + str(ROOT / "data/demo/prompts.jsonl"), "mgrpo.steps=1",
                                              "mgrpo.micro_batch=4", "mgrpo.drop_zero_std=false", "mgrpo.pass2=all"]),
    "smollm2-sft": ("sft", "smollm2_hf_dir", SMOL_SFT),
    "smollm2-sft-lora": ("sft", "smollm2_hf_dir", [*SMOL_SFT, "sft.lora.enabled=true"]),
}


def clean_env() -> dict:
    """This process's environment without what an in-process stage left in it (accelerate's settings)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TIFA_"))},
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(case, request, tmp_path):
    """On CPU, a stage's peak RSS (over the RSS after imports) against `tifa plan`'s estimate for the
    same config on this machine: within 25% (full fine-tune and LoRA, SFT, DPO with its reference,
    MGRPO with both passes; the tiny preset and SmolLM2-135M, whose tags LoRA trains as extra rows)."""
    stage, fixture, sets = CASES[case]
    base = request.getfixturevalue(fixture)
    sets = [*sets, f"{stage}.save_every=100"] + ([f"{stage}.samples_every=0"] if stage != "mgrpo" else [])
    script = tmp_path / "measure.py"
    script.write_text(MEASURE, encoding="utf-8")
    cfg = load_config(None, sets)
    est = plan.plan(cfg, [stage], plan.machine(cfg, 0), base=str(base))[0]
    done = subprocess.run([sys.executable, str(script), stage, str(base), str(tmp_path / "out"), *sets],
                          capture_output=True, text=True, env=clean_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
    ratio = est.total / measured
    print(f"{case}: estimate {est.total / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB: {ratio:.2f}")
    assert 0.75 <= ratio <= 1.25, ({k: round(v / 2**20) for k, v in est.parts.items()}, measured / 2**20)


@pytest.mark.parametrize("config, gpus, mem", [
    ("qwen2.5-7b-full-1x8.yaml", 8, 80), ("qwen2.5-7b-full-2x8.yaml", 16, 80),
    ("qwen2.5-7b-lora-1gpu.yaml", 1, 80), ("qwen2.5-7b-qlora-24gb.yaml", 1, 24)])
def test_every_shipped_config_fits_its_stated_hardware(config, gpus, mem, capsys):
    """`tifa plan` says every stage of each 7B config fits the hardware its header names (exit 0), and
    its data paths are required: running it without them names the file, line and key."""
    from tifaforge.cli import main

    path = ROOT / "configs" / config
    assert main(["plan", str(path), "--gpus", str(gpus), "--gpu-mem", str(mem)]) == 0
    out = capsys.readouterr().out
    assert out.count("| fits |") == 4 and "does not fit" not in out
    assert f"--gpus {gpus} --gpu-mem {mem}" in path.read_text(encoding="utf-8")
    with pytest.raises(TifaError, match=rf"{config}:\d+: cpt.data, sft.data, mgrpo.prompts, dpo.prompts, "
                                        r"eval.prompts, eval.ppl_text are required"):
        load_config(path)


def test_a_full_7b_on_one_gpu_does_not_fit_and_the_advice_does():
    """Qwen2.5-7B full fine-tune on one 80 GB GPU: AdamW's moments alone are 57 GiB; the advice is the first
    change in the order checkpointing, micro-batch, FSDP2, LoRA, QLoRA after which it fits."""
    cfg = load_config(ROOT / "configs/qwen2.5-7b-lora-1gpu.yaml", ["sft.lora.enabled=false"], allow_missing=True)
    m = plan.machine(cfg, 1, 80)
    sft = plan.plan(cfg, ["sft"], m)[0]
    assert not sft.fits and sft.parts["optimizer"] > 55 * 2**30
    assert sft.advice == "LoRA: --set sft.lora.enabled=true"
    assert plan.estimate(plan.changed(cfg, ["sft.lora.enabled=true"]), "sft", plan.model_shape(cfg.model.base), m,
                         new_tags=True).fits
    on8 = plan.plan(cfg, ["sft"], plan.machine(cfg, 8, 80))[0]  # 8 GPUs, plain DDP: FSDP2 is the way
    assert not on8.fits and on8.advice == "FSDP2 over the 8 processes: --set launch.sharding=fsdp2"


def test_a_stage_that_cannot_fit_stops_before_loading_its_model(tmp_path, tiny_model_dir):
    """`tifa train` runs the plan first: a batch far beyond this machine's RAM is refused with the
    cheapest change, before any model loads or the run directory is made; plan_check false skips it."""
    from tifaforge.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("name: big\n", encoding="utf-8")
    sets = ["--set", "sft.batch_size=4096", "--set", "sft.max_length=65536"]
    cmd = ["train", "sft", str(config), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir), *sets]
    with pytest.raises(TifaError, match=r"sft: about \d+\.\d GiB per process, CPU, \d+ GiB RAM .* it would run out "
                                        r"of memory. The cheapest change that fits: .*launch.plan_check=false"):
        from tifaforge.train.stage import run_command
        from tifaforge.stages import sft
        import argparse

        p = argparse.ArgumentParser()
        sft.add_arguments(p)
        run_command(p.parse_args(cmd[2:]), "sft", sft.run_stage)
    assert not (tmp_path / "out").exists()
    assert main(["plan", str(config), "--stages", "sft", *sets]) == 1  # the command says the same, exit 1


def test_bad_input_is_refused_or_said(tmp_path, capsys):
    """An unknown architecture is estimated from its parameter count and says so; an accelerate file
    that is missing or does not match --gpus, an unknown stage and a base with no shape are errors."""
    from tifaforge.cli import main

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mamba_like", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4}), encoding="utf-8")
    cfg = load_config(None, [f"model.base={folder}"])
    shape = plan.model_shape(str(folder))
    assert "architecture 'mamba_like' is not one the planner knows" in shape.note and shape.params > 0
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  base: {folder}\n", encoding="utf-8")
    assert main(["plan", str(config), "--stages", "sft"]) == 0
    assert "mamba_like" in capsys.readouterr().out
    with pytest.raises(TifaError, match=r"accelerate config .*nope.yaml: cannot read it"):
        plan.machine(cfg, 8, 80, str(tmp_path / "nope.yaml"))
    with pytest.raises(TifaError, match=r"fsdp-1x8.yaml: num_processes 8 does not match --gpus 4"):
        plan.machine(cfg, 4, 80, str(ROOT / "configs/accelerate/fsdp-1x8.yaml"))
    assert main(["plan", str(config), "--stages", "sft,rlhf"]) == 2
    assert "--stages: unknown stage 'rlhf'" in capsys.readouterr().err
    with pytest.raises(TifaError, match=r"model.base: /nowhere/MyModel: no config.json .* not a known name"):
        plan.model_shape("/nowhere/MyModel")


def test_context_parallelism_divides_a_long_sequence_s_activations():
    """A 7B full SFT at 64K tokens per sequence: one process per GPU holds the whole sequence's
    activations unless the accelerate config splits it (cp_size 4: a quarter each)."""
    cfg = load_config(None, ["model.base=Qwen/Qwen2.5-7B", "sft.max_length=65536", "sft.batch_size=1",
                             "sft.gradient_checkpointing=true"])
    fsdp = plan.machine(cfg, 8, 80, str(ROOT / "configs/accelerate/fsdp-1x8.yaml"))
    cp = plan.machine(cfg, 8, 80, str(ROOT / "configs/accelerate/cp-fsdp2-1x8.yaml"))
    assert (fsdp.seq_split, cp.seq_split) == (1, 4) and cp.sharding == "fsdp2"
    shape = plan.model_shape("Qwen/Qwen2.5-7B")
    whole, split = plan.estimate(cfg, "sft", shape, fsdp), plan.estimate(cfg, "sft", shape, cp)
    assert split.parts["transient"] < whole.parts["transient"] / 2  # activations / 4; the LM head's chunk / 2
    assert split.parts["weights"] == whole.parts["weights"]  # FSDP2 shards the weights over all 8 either way

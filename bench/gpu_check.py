"""The GPU paths, checked on a CUDA machine: bf16 engine generation and bf16 training stages.

    PYTHONPATH=src python bench/gpu_check.py [--out DIR]

CI has no GPU, so this script is what a session runs on a lent GPU machine (see README, "GPU
checks"). It prints one line per check with the figure measured; any failure raises.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def check_engine(model_dir: Path) -> None:
    from tifaforge.config import SamplingConfig
    from tifaforge.engine.generate import Engine, Request

    engine = Engine.load(model_dir)  # dtype auto: bfloat16 on CUDA
    assert engine.model.device.type == "cuda" and engine.model.dtype == torch.bfloat16, (engine.model.device, engine.model.dtype)
    prompts = [engine.render([{"role": "user", "content": f"第{i}个问题：你好。"}]) for i in range(8)]
    greedy = SamplingConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=32)
    ours = engine.generate([Request(prompts[0], greedy)])[0]
    enc = engine.tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False).to("cuda")
    ref = engine.model.generate(**enc, do_sample=False, max_new_tokens=32, repetition_penalty=1.0,
                                eos_token_id=sorted(engine.stop_ids), pad_token_id=engine.tokenizer.pad_token_id)
    ref_ids = [t for t in ref[0, enc.input_ids.shape[1]:].tolist() if t not in engine.stop_ids]
    same = ours.token_ids == ref_ids[: len(ours.token_ids)]
    engine.stop_ids = set()
    s = SamplingConfig(max_new_tokens=128, seed=0, dry_multiplier=0.8)
    engine.generate([Request(p, s) for p in prompts])  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = engine.generate([Request(p, s) for p in prompts])
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"engine cuda bf16: greedy equals model.generate: {same}; batch 8 x 128 tokens with DRY: "
          f"{sum(r.completion_tokens for r in out) / dt:.0f} tok/s")
    assert same


def check_stage(name: str, model_dir: Path, out: Path, sets: list[str]) -> Path:
    import importlib

    from tifaforge.config import load_config

    cfg = load_config(ROOT / "configs/tiny.yaml", sets)
    t = time.perf_counter()
    mod = importlib.import_module(f"tifaforge.stages.{name}")
    model = mod.run_stage(cfg, model_dir, out / name)
    dt = time.perf_counter() - t
    import json

    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"stage {name} on cuda: {dt:.1f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else f"stage {name}: {dt:.1f}s")
    return model


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=tempfile.mkdtemp())
    args = p.parse_args()
    from tifaforge.models.presets import init_model

    assert torch.cuda.is_available(), "no CUDA device"
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    out = Path(args.out)
    base = init_model("tiny", out / "base")
    cpt = check_stage("cpt", base, out, ["cpt.steps=30", "cpt.batch_size=16", "cpt.samples_every=0"])
    sft = check_stage("sft", cpt, out, ["sft.steps=30", "sft.batch_size=16", "sft.samples_every=0"])
    check_engine(sft)
    check_stage("mgrpo", sft, out, ["mgrpo.steps=3"])
    print("all GPU checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

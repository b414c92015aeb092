"""MGRPO against TRL's GRPOTrainer: generated sequences per second and seconds per update, one run.

    .venv/bin/python bench/mgrpo.py [--model DIR] [--updates 4] [--prompts 2] [--group 4] [--new-tokens 32]

Same model (the tiny preset unless --model), same prompts (the demo prompts), same G, same
completion cap, same reward (the logic reward's total) and optimiser settings on both sides; TRL
runs with the CPU flags of research/feasibility.md (fp32, no gradient checkpointing). MGRPO is
timed twice: pass 2 off (plain GRPO through our engine and loss) and pass 2 on every answer with
M = 1 (its sequences counted too). The first update of each is a warm-up and is not timed; both
sides are timed from the end of one update to the end of the next (logging and scoring included).
Prints one line per trainer and the ratios ours / TRL (target >= 1.3 for sequences/s).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tifaforge.config import load_config  # noqa: E402
from tifaforge.rewards import LogicReward  # noqa: E402
from tifaforge.config import Config  # noqa: E402
from tifaforge.stages.mgrpo import read_prompts, run_stage  # noqa: E402


def bench_config(a, pass2: str):
    return load_config(None, [
        f"mgrpo.steps={a.updates}", f"mgrpo.prompts_per_step={a.prompts}", f"mgrpo.group_size={a.group}",
        "mgrpo.revisions=1", f"mgrpo.pass2={pass2}", f"mgrpo.max_new_tokens={a.new_tokens}", "mgrpo.loss_type=dapo",
        "mgrpo.learning_rate=0.00001", "mgrpo.drop_zero_std=false", f"mgrpo.micro_batch={a.prompts * a.group * 2}",
        f"mgrpo.save_every={a.updates}", f"mgrpo.prompts={ROOT / 'data/demo/prompts.jsonl'}"], cls=Config)


def run_ours(a, model: Path, pass2: str, tmp: Path) -> tuple[float, float]:
    """(sequences/s, s/update) over updates 2.., timed from the end of one update to the end of the
    next (the metrics rows' wall-clock stamps), as TRL's side is timed from step end to step end."""
    out = tmp / f"mgrpo-{pass2}"
    run_stage(bench_config(a, pass2), model, out, resume=False)
    import json

    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [b["time"] - a_["time"] for a_, b in zip(rows, rows[1:])]
    return sum(r["sequences"] for r in rows[1:]) / sum(secs), statistics.mean(secs)


def run_trl(a, model: Path, tmp: Path) -> tuple[float, float]:
    """TRL GRPOTrainer on the same prompts (conversational, rendered by the same chat template)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tifaforge.data.conversations import to_chat
    from tifaforge.models.load import load_model

    cfg = bench_config(a, "off")
    reward = LogicReward(cfg.reward)
    records = read_prompts(cfg.mgrpo)
    chats = [to_chat(r) for r in records]
    ctxs = {i: reward.context(c) for i, c in enumerate(chats)}

    def logic_reward(completions, idx, **kw):
        return [reward.score(ctxs[i], c[0]["content"]).total for c, i in zip(completions, idx)]

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    policy, tok = load_model(model, device="cpu")
    args = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=a.prompts * a.group,
                      num_generations=a.group, max_completion_length=a.new_tokens, max_steps=a.updates,
                      learning_rate=1e-5, beta=0.0, loss_type="dapo", temperature=1.0, top_p=1.0,
                      use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
                      save_strategy="no", logging_steps=1, seed=cfg.seed)
    data = Dataset.from_dict({"prompt": chats, "idx": list(range(len(chats)))})
    trainer = GRPOTrainer(model=policy, reward_funcs=[logic_reward], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    secs = [b - a_ for a_, b in zip(stamps, stamps[1:])]
    return a.prompts * a.group / statistics.mean(secs), statistics.mean(secs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model folder (default: the tiny preset, built in a temp folder)")
    p.add_argument("--updates", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args()
    if a.updates < 2:
        p.error("--updates must be at least 2: the first update of each trainer is a warm-up, not timed")
    tmp = Path(tempfile.mkdtemp(prefix="bench-mgrpo-"))
    try:
        model = Path(a.model) if a.model else _tiny(tmp)
        trl_seq, trl_upd = run_trl(a, model, tmp)
        rows = [("trl GRPOTrainer", trl_seq, trl_upd)]
        for pass2 in ("off", "all"):
            seq, upd = run_ours(a, model, pass2, tmp)
            rows.append((f"tifaforge mgrpo pass2={pass2}", seq, upd))
        print(f"\n{'trainer':<28} {'seq/s':>8} {'s/update':>9} {'seq/s vs trl':>13}")
        for name, seq, upd in rows:
            print(f"{name:<28} {seq:8.2f} {upd:9.2f} {seq / trl_seq:12.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _tiny(tmp: Path) -> Path:
    from tifaforge.models.presets import init_model

    return init_model("tiny", tmp / "tiny", seed=0)


if __name__ == "__main__":
    raise SystemExit(main())

"""Data parallelism on CPU: 2 processes (DDP, then FSDP2) against 1 for the same global batch, every
process on one thread; and FSDP2's per-rank memory against one process's.

    .venv/bin/python bench/scale.py [--cpt-steps 12] [--mgrpo-updates 4]

Every run goes through the command a user runs (`tifa train STAGE`, the 2-process ones with
`--launcher torchrun --num-processes 2 [--sharding fsdp2]`), with OMP_NUM_THREADS=1 in all, so the
ratio shows what splitting the batch over processes costs (communication, duplicated work) rather
than thread scaling. Printed per stage: the training throughput of each run and the ratio of a
2-process run's rate per process to the 1-process rate (1.0 = no overhead; target >= 0.8).
- CPT: tokens per second over the Trainer's own train_runtime (global batch 16 x 128 tokens).
- MGRPO: seconds per update from the metrics' wall-clock stamps, the first update left out
  (4 prompts x G 4, 24 new tokens, pass 2 on every answer).
- Memory: the tiny preset after one AdamW step, bytes of parameters + gradients + AdamW states held
  by one rank, sharded over 2 ranks with train/sharding.py's `shard` (what MGRPO runs; the TRL
  stages shard the same units through accelerate) against the whole model in one process (target <= 0.6).
Needs 2 free cores: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tifa(args: list[str], processes: int, sharding: str = "ddp") -> None:
    launch = ["--launcher", "torchrun", "--num-processes", str(processes), "--sharding", sharding] if processes > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "tifaforge.cli", *args, *launch], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def cpt_rate(tmp: Path, model: Path, steps: int, processes: int, sharding: str = "ddp") -> float:
    out = tmp / f"cpt-{processes}-{sharding}"
    sets = ["cpt.data=data/demo/novels", f"cpt.steps={steps}", f"cpt.batch_size={16 // processes}",
            "cpt.max_length=128", "cpt.samples_every=0", f"cpt.save_every={steps}", "cpt.log_every=1"]
    tifa(["train", "cpt", "configs/tiny.yaml", "--out", str(out), "--model", str(model),
          *[a for s in sets for a in ("--set", s)]], processes, sharding)
    runtime = next(r["train_runtime"] for r in rows(out) if "train_runtime" in r)
    return steps * 16 * 128 / runtime


def mgrpo_seconds(tmp: Path, model: Path, updates: int, processes: int, sharding: str = "ddp") -> float:
    out = tmp / f"mgrpo-{processes}-{sharding}"
    sets = [f"mgrpo.steps={updates}", "mgrpo.prompts_per_step=4", "mgrpo.group_size=4", "mgrpo.revisions=1",
            "mgrpo.pass2=all", "mgrpo.max_new_tokens=24", "mgrpo.drop_zero_std=false", f"mgrpo.save_every={updates}",
            f"mgrpo.prompts={ROOT / 'data/demo/prompts.jsonl'}"]
    tifa(["train", "mgrpo", "configs/tiny.yaml", "--out", str(out), "--model", str(model),
          *[a for s in sets for a in ("--set", s)]], processes, sharding)
    stamps = [r["time"] for r in rows(out)]
    return statistics.mean(b - a for a, b in zip(stamps, stamps[1:]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpt-steps", type=int, default=12)
    p.add_argument("--mgrpo-updates", type=int, default=4)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from tifaforge.models.presets import init_model

    tmp = Path(tempfile.mkdtemp(prefix="tifa-scale-"))
    model = init_model("tiny", tmp / "base", seed=0)
    one = cpt_rate(tmp, model, a.cpt_steps, 1)
    print(f"CPT: 1 process {one:.0f} tok/s")
    for sharding in ("ddp", "fsdp2"):
        two = cpt_rate(tmp, model, a.cpt_steps, 2, sharding)
        print(f"CPT: 2 processes {sharding} {two:.0f} tok/s; per process 2 vs 1: {two / 2 / one:.2f}")
    s1 = mgrpo_seconds(tmp, model, a.mgrpo_updates, 1)
    print(f"MGRPO: 1 process {s1:.2f} s/update")
    for sharding in ("ddp", "fsdp2"):
        s2 = mgrpo_seconds(tmp, model, a.mgrpo_updates, 2, sharding)
        print(f"MGRPO: 2 processes {sharding} {s2:.2f} s/update; per process 2 vs 1: {s1 / (2 * s2):.2f}")
    memory(model)
    return 0


MEMORY = """
import json, sys, torch
from tifaforge.models.load import load_model
from tifaforge.train import distributed as dist, sharding
dist.start("cpu")
model, _ = load_model(sys.argv[1], dtype="float32", device="cpu")
if dist.world_size() > 1:
    sharding.shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, 100, (2, 32))
model(input_ids=ids, labels=ids).loss.backward()
opt.step()
print(json.dumps({"rank": dist.rank(), **sharding.local_bytes(model, opt)}))
"""


def memory(model: Path) -> None:
    """Per-rank bytes of parameters + gradients + AdamW states: one process, then FSDP2 on two."""
    script = model.parent / "memory.py"
    script.write_text(MEMORY, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    found = {}
    for n in (1, 2):
        cmd = [sys.executable, *(["-m", "torch.distributed.run", "--nproc_per_node", "2"] if n > 1 else []),
               str(script), str(model)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        found[n] = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    whole = sum(v for k, v in found[1][0].items() if k != "rank")
    for r in found[2]:
        mine = sum(v for k, v in r.items() if k != "rank")
        print(f"memory: rank {r['rank']} of 2 (FSDP2) holds {mine / 2**20:.1f} MiB of parameters + gradients + "
              f"AdamW states, one process {whole / 2**20:.1f} MiB: {mine / whole:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())

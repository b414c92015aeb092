"""CPT throughput of our stage against plain TRL SFTTrainer, same model, data and settings, one run.

    .venv/bin/python bench/train.py [--steps 20] [--batch 8] [--length 256] [--rounds 2] [--no-compile]

Prints tokens/s for both, the ratio ours / plain (target >= 0.95: our callbacks, checks and
metrics cost nothing that matters) and model-FLOP utilisation, 6·N·tokens/s over this machine's
fp32 GEMM peak measured first (target >= 50%). Only optimizer steps are timed (from the end of step
`--skip` to the end of the last step): loading, data checks, the final save and samples are not.
Rounds alternate ours/plain so a noisy neighbour hurts both alike; the best round of each counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tifaforge.config import load_config  # noqa: E402
from tifaforge.data.novels import ingest_novels  # noqa: E402
from tifaforge.models.load import load_model  # noqa: E402
from tifaforge.models.presets import init_model  # noqa: E402

NOVELS = Path(__file__).resolve().parents[1] / "data" / "demo" / "novels"


def gemm_peak(n: int = 2048, seconds: float = 3.0) -> float:
    """fp32 matmul FLOP/s at size n on every thread torch uses."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def step_timer(skip: int):
    """A callback recording wall time from the end of step `skip` to the end of the last step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        start = end = None
        steps = 0

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if state.global_step == skip:
                self.start = now
            elif state.global_step > skip:
                self.end, self.steps = now, state.global_step - skip

    return StepTimer()


def ours(model_dir: Path, data: Path, out: Path, a: argparse.Namespace) -> float:
    from tifaforge.stages import cpt

    timer = step_timer(a.skip)
    sets = [f"cpt.data={data}", f"cpt.steps={a.steps}", f"cpt.batch_size={a.batch}", f"cpt.max_length={a.length}",
            "cpt.learning_rate=0.001", f"cpt.save_every={a.steps}", f"cpt.log_every={a.log_every}",
            "cpt.samples_every=0", f"cpt.torch_compile={str(a.compile).lower()}"]
    cpt.run_stage(load_config(None, sets), model_dir, out, extra_callbacks=(timer,))
    return timer.steps * a.batch * a.length / (timer.end - timer.start)


def plain(model_dir: Path, data: Path, out: Path, a: argparse.Namespace) -> float:
    """TRL as its docs show it, with this machine's required flags (fp32, no checkpointing)."""
    from datasets import load_from_disk
    from trl import SFTConfig, SFTTrainer

    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    args = SFTConfig(output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch,
                     max_length=a.length, learning_rate=0.001, lr_scheduler_type="cosine", warmup_steps=0.03,
                     optim="adamw_torch", logging_steps=a.log_every, save_strategy="no", report_to="none",
                     bf16=False, gradient_checkpointing=False, torch_compile=a.compile, use_cpu=True, seed=1234,
                     dataset_kwargs={"skip_prepare_dataset": True})
    timer = step_timer(a.skip)
    SFTTrainer(model=model, args=args, train_dataset=load_from_disk(str(data)).select_columns(["input_ids"]),
               processing_class=tok, callbacks=[timer]).train()
    return timer.steps * a.batch * a.length / (timer.end - timer.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps not timed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch_compile on both sides (default on; the first round compiles, later rounds hit "
                        "inductor's cache, and the warm-up steps are not timed)")
    a = p.parse_args()
    peak = gemm_peak()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = init_model("tiny", tmp / "model", seed=0)
        model, tok = load_model(model_dir, device="cpu")
        n_params = sum(t.numel() for t in model.parameters())
        ingest_novels([NOVELS], tmp / "data", tok, block_size=a.length, progress=False)
        rates: dict[str, list[float]] = {"ours": [], "plain": []}
        for r in range(a.rounds):
            rates["ours"].append(ours(model_dir, tmp / "data", tmp / f"ours{r}", a))
            rates["plain"].append(plain(model_dir, tmp / "data", tmp / f"plain{r}", a))
    best = {k: max(v) for k, v in rates.items()}
    print(f"\nfp32 GEMM peak (n=2048, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s; "
          f"tiny preset {n_params / 1e6:.2f}M parameters; batch {a.batch} x {a.length} tokens, {a.steps} steps, "
          f"torch_compile {'on' if a.compile else 'off'}")
    for k in ("ours", "plain"):
        mfu = 6 * n_params * best[k] / peak
        print(f"{k:>5}: {best[k]:8.0f} tokens/s (rounds: {', '.join(f'{x:.0f}' for x in rates[k])}), MFU {mfu:.0%}")
    print(f"ratio ours/plain: {best['ours'] / best['plain']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()

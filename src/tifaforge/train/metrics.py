"""What a stage leaves to read: metrics.jsonl, samples.jsonl (through the engine), PNG plots.

    tifa train sft configs/tiny-sft.yaml     # writes OUT/metrics.jsonl, OUT/samples.jsonl, OUT/plots/*.png

Every row carries `step`. A run resumed from step S first drops the rows past S that the killed run
wrote after its last complete checkpoint, so the files read as one uninterrupted run. Only the main
process writes. MGRPO and DPO use the same writer, callbacks and plots with their own keys.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tifaforge.utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

PLOT_KEYS = ("loss", "learning_rate", "grad_norm")


class JsonlLog:
    """Append-only JSONL rows with a `step`; `truncate_after(step)` for resume."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_finite(row), ensure_ascii=False) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill: the resumed run rewrites that step
                continue
        return out

    def truncate_after(self, step: int) -> None:
        if self.path.exists():
            kept = [r for r in self.rows() if r.get("step", 0) <= step]
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: non-finite floats are written as strings ("nan", "inf")."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# ---------------------------------------------------------------------------------------------
# Trainer callbacks (built lazily: transformers is heavy)


def metrics_callback(metrics: JsonlLog):
    """Every Trainer log (loss, grad_norm, learning_rate, ...) becomes a metrics.jsonl row, with the
    processes and the sequences per optimizer step over all of them (what a row's loss averages)."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                world = args.world_size
                batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
                metrics.write({"step": state.global_step, "time": round(time.time(), 3), "world_size": world,
                               "global_batch": batch, **logs})

    return MetricsCallback()


def samples_callback(samples: JsonlLog, tokenizer, prompts: list[str], sampling, every: int):
    """Every `every` steps, generate on fixed prompts through the engine (main process only).

    The sampling seed is fixed so generation never draws from the global RNG: a resumed run stays
    bitwise equal to an uninterrupted one.
    """
    from transformers import TrainerCallback

    class SamplesCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if every and state.global_step % every == 0 and state.is_world_process_zero:
                write_samples(samples, state.global_step, model, tokenizer, prompts, sampling)

    return SamplesCallback()


def write_samples(samples: JsonlLog, step: int, model, tokenizer, prompts: list[str], sampling) -> None:
    from tifaforge.engine.generate import Engine, Request

    was_training = model.training
    try:
        results = Engine(model, tokenizer).generate([Request(p, sampling) for p in prompts])
    finally:
        model.train(was_training)
    for i, (prompt, r) in enumerate(zip(prompts, results)):
        samples.write({"step": step, "prompt_index": i, "prompt": prompt, "text": r.text,
                       "reasoning": r.reasoning, "content": r.content, "finish_reason": r.finish_reason})


# ---------------------------------------------------------------------------------------------
# Plots


def plot_curves(metrics_path: str | Path, out_dir: str | Path, keys: Iterable[str] = PLOT_KEYS) -> list[Path]:
    """One PNG per key found in metrics.jsonl (value against step), written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    rows = JsonlLog(metrics_path).rows()
    written = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} ({Path(metrics_path).parent.name})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = Path(out_dir) / f"{key.replace('/', '_')}.png"  # reward/pass1 -> reward_pass1.png
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written

"""Looped model against its unrolled twin: forward and forward+backward time, memory, one run.

    .venv/bin/python bench/looping.py [--repeats 5] [--only tiny|smollm] [--threads N]

Two random-weight models: the tiny preset's shape (Qwen2, 4 layers, block 1..2 looped k=3) and a
SmolLM2-135M-sized Llama (30 layers, block 10..13 looped k=3). The twin is the plain model
`tifa export unroll` writes (N + (k-1)·B layers, same computation). Prints seconds per step (median,
the two models interleaved, order alternating, so machine load hits both alike), the ratio looped / unrolled (target
<= 1.05: the loop's bookkeeping must cost nothing), the activation bytes saved for backward (counted
with saved-tensor hooks) and the weight bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tifaforge.export.unroll import unrolled_config, unrolled_state_dict  # noqa: E402
from tifaforge.models.looping import apply_loop  # noqa: E402
from tifaforge.config import LoopConfig

SHAPES = {  # name: (config class, config kwargs, loop, batch, seq)
    "tiny": ("Qwen2Config", dict(vocab_size=6000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
             LoopConfig(start=1, end=3, k=3), 8, 128),
    "smollm": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
               LoopConfig(start=10, end=14, k=3), 2, 128),
}


def build(name: str):
    """(looped model, unrolled twin, input ids) for one shape; fp32, seeded."""
    import transformers

    cls_name, kw, loop, batch, seq = SHAPES[name]
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).float()
    looped = apply_loop(base, loop)
    twin = transformers.AutoModelForCausalLM.from_config(unrolled_config(looped))
    missing = twin.load_state_dict(unrolled_state_dict(looped), strict=False).missing_keys
    assert set(missing) <= {"lm_head.weight"}, missing  # lm_head is tied to the embeddings
    twin.tie_weights()
    ids = torch.randint(0, kw["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    return looped.train(), twin.train(), ids


def step(model, ids, backward: bool) -> None:
    if not backward:
        with torch.no_grad():
            model(input_ids=ids)
        return
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-weight tensors autograd keeps for backward in one forward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed(models, ids, backward: bool, repeats: int) -> list[float]:
    for m in models:
        step(m, ids, backward)  # warm-up
    times: list[list[float]] = [[] for _ in models]
    for r in range(repeats):
        for i in range(len(models)) if r % 2 == 0 else reversed(range(len(models))):  # no first-runner bias
            t = time.perf_counter()
            step(models[i], ids, backward)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", choices=list(SHAPES))
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is steadier on a busy machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, fp32, random weights, {args.repeats} repeats (median)")
    print(f"{'shape':<7} {'layers':>11} {'pass':<8} {'looped s':>9} {'unrolled s':>10} {'ratio':>6}")
    for name in [args.only] if args.only else list(SHAPES):
        looped, twin, ids = build(name)
        layers = f"{looped.config.num_hidden_layers}->{twin.config.num_hidden_layers}"
        for backward in (False, True):
            a, b = timed([looped, twin], ids, backward, args.repeats)
            print(f"{name:<7} {layers:>11} {'fwd+bwd' if backward else 'fwd':<8} {a:>9.3f} {b:>10.3f} {a / b:>6.3f}")
        sa, sb = saved_bytes(looped, ids), saved_bytes(twin, ids)
        wa, wb = weight_bytes(looped), weight_bytes(twin)
        mb = 1024 * 1024
        print(f"{name:<7} activations saved for backward: looped {sa / mb:.1f} MB, unrolled {sb / mb:.1f} MB "
              f"(ratio {sa / sb:.3f}); weights: looped {wa / mb:.1f} MB, unrolled {wb / mb:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

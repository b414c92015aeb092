"""Unroll a looped model into a plain Qwen2/Llama folder that every runtime runs unchanged.

    tifa export unroll runs/demo/02-sft/model --out models/unrolled [--k 3]

The block's layers are copied k times in run order (layers before the block, the block k times, the
layers after), so the folder is an ordinary `Qwen2ForCausalLM`/`LlamaForCausalLM` with N + (k-1)·B
layers that transformers, vLLM and llama.cpp (through `tifa export gguf`) load as is. A residual scale
α folds exactly into the copies: their `o_proj` and `down_proj` (weights and any bias) are multiplied
by α for iterations 2..k. Size: the base's weights plus (k-1)× the block's. Tensors are written
straight from the looped model's state_dict (no second model is built), in its dtype, one safetensors
file; `config.tifaforge["unrolled"]` records the loop it came from.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from tifaforge.errors import TifaError

SCALED = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")


def _source_layer(v: int, start: int, end: int, k: int) -> tuple[int, int]:
    """(iteration, physical layer) that virtual layer v of the unrolled model copies."""
    b = end - start
    if v < start:
        return 0, v
    if v < start + k * b:
        return (v - start) // b, start + (v - start) % b
    return 0, v - (k - 1) * b


def unrolled_state_dict(model, k: int | None = None) -> dict:
    """The plain model's tensors: block layers copied k times (α folded into copies 2..k)."""
    import torch

    loop = _loop_of(model)
    cfg, n = loop.cfg, len(loop)
    k = k or cfg.k
    sd = model.state_dict()
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.startswith("model.layers."):
            j, rest = name[len("model.layers."):].split(".", 1)
            by_layer.setdefault(int(j), {})[rest] = t
        elif not (name == "lm_head.weight" and model.config.tie_word_embeddings):
            out[name] = t.detach().contiguous()
    for v in range(n + (k - 1) * (cfg.end - cfg.start)):
        it, j = _source_layer(v, cfg.start, cfg.end, k)
        for rest, t in by_layer[j].items():
            t = t.detach()
            if it > 0:  # a copy of its own: safetensors refuses tensors sharing storage
                t = t * cfg.residual_scale if cfg.residual_scale != 1.0 and rest.endswith(SCALED) else t.clone()
            out[f"model.layers.{v}.{rest}"] = t.contiguous()
    return out


def unrolled_config(model, k: int | None = None):
    """The plain config: N + (k-1)·B layers, layer types extended, the loop recorded as the origin."""
    from tifaforge.models.looping import SUPPORTED

    loop = _loop_of(model)
    cfg, n = loop.cfg, len(loop)
    k = k or cfg.k
    config = copy.deepcopy(model.config)
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    config.layer_types = [types[_source_layer(v, cfg.start, cfg.end, k)[1]]
                          for v in range(n + (k - 1) * (cfg.end - cfg.start))]
    config.num_hidden_layers = len(config.layer_types)
    record = dict(config.tifaforge or {})
    record["unrolled"] = {"loop": record.pop("loop"), "k": k}
    config.tifaforge = record
    config.architectures = [SUPPORTED[config.model_type]]
    return config


def export_unrolled(model, tokenizer, out: str | Path, k: int | None = None) -> dict:
    """Write the plain folder atomically; returns {layers, bytes, base_bytes, extra_bytes}."""
    from safetensors.torch import save_file

    from tifaforge.utils import atomic_dir

    tensors = unrolled_state_dict(model, k)
    config = unrolled_config(model, k)
    with atomic_dir(out) as tmp:
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
    return size_report(model, tensors, config.num_hidden_layers)


def size_report(model, tensors: dict, layers: int) -> dict:
    """Bytes of the plain model's tensors, of the base's, and what the copies add."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    base = sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if not (name == "lm_head.weight" and model.config.tie_word_embeddings))
    return {"layers": layers, "bytes": total, "base_bytes": base, "extra_bytes": total - base}


def _loop_of(model):
    from tifaforge.models.looping import get_loop

    if hasattr(model, "peft_config"):
        raise TifaError("unroll: merge the LoRA adapters first (model.merge_and_unload()); "
                        "each copy would otherwise need its own merge")
    loop = get_loop(model)
    if loop is None:
        raise TifaError("unroll: the model has no loop (config.tifaforge has no 'loop'); it is already plain")
    return loop


# ---------------------------------------------------------------------------------------------
# tifa export unroll


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder saved with a loop (config.tifaforge.loop)")
    p.add_argument("--out", required=True, help="output folder: a plain Qwen2/Llama model")
    p.add_argument("--k", type=int, default=None, help="iterations to unroll (default: the saved loop's k)")


def unroll(folder: str | Path, out: str | Path, k: int | None = None) -> Path:
    """A saved looped model folder -> a plain folder at `out` (what `tifa export gguf` runs first)."""
    from tifaforge.models.looping import load_looped

    model, tokenizer = load_looped(folder, device="cpu", dtype=None)
    export_unrolled(model, tokenizer, out, k)
    return Path(out)


def run(args: argparse.Namespace) -> int:
    from tifaforge.models.looping import load_looped

    if args.k is not None and args.k < 1:
        raise TifaError(f"--k must be at least 1, got {args.k}")
    model, tokenizer = load_looped(args.model, device="cpu", dtype=None)  # the saved dtype: sizes as stored
    r = export_unrolled(model, tokenizer, args.out, args.k)
    mb = 1024 * 1024
    print(f"wrote {args.out}: {r['layers']} layers, {r['bytes'] / mb:.1f} MB of weights "
          f"(+{r['extra_bytes'] / mb:.1f} MB, +{100 * r['extra_bytes'] / r['base_bytes']:.0f}% over the looped model)")
    return 0

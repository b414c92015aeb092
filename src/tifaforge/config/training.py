"""Training config sections: the one source of the stages' defaults and help (`cpt`, `sft`, `mgrpo`, `dpo`).

    tifa config configs/tiny-cpt.yaml --keys     # every key, its default and its help

`TrainConfig` holds what every TRL trainer shares (optimiser, schedule, batch, checkpoints, samples,
device); `CPTConfig`, `SFTConfig` and `DPOConfig` add their data. `MGRPOConfig` is MGRPO's own
(DESIGN.md §5.1). Defaults suit a 7B model on GPUs; `configs/tiny-*.yaml` sets the tiny CPU values.
Dataclasses only: the device and precision checks that need torch are in train/device.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tifaforge.fields import opt, section

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]


@dataclass
class LoraConfig:
    """LoRA adapters (peft) instead of a full fine-tune."""

    enabled: bool = opt(False, "Train LoRA adapters instead of every weight.")
    r: int = opt(16, "LoRA rank.", min=1)
    alpha: int = opt(32, "LoRA scaling numerator (the update is scaled by alpha / r).", min=1)
    dropout: float = opt(0.0, "Dropout on the LoRA input.", min=0.0, max=1.0)
    target_modules: list[str] = opt(["all-linear"], "Modules that get adapters; 'all-linear' = every linear layer but the head.")
    merge: bool = opt(True, "Merge the adapters into the weights when saving model/ (a plain transformers folder); "
                      "false saves the adapter folder only.")
    quantize: Literal["none", "4bit"] = opt(
        "none", "4bit = QLoRA: the frozen base loaded in 4-bit NF4 (bitsandbytes, CUDA only; the qlora extra), "
        "computing in bf16; model/ merges the adapters into the full-precision base.")


@dataclass
class TrainConfig:
    """What every training stage shares. `steps` wins over `epochs` when it is positive."""

    learning_rate: float = opt(1e-5, "Peak learning rate.", min=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = opt(
        "cosine", "Learning-rate schedule after warm-up.")
    warmup: float = opt(0.03, "Warm-up: a fraction of the steps when below 1, else a number of steps.", min=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = opt(1.0, "Clip the gradient to this global norm; 0 = no clipping.", min=0.0)
    steps: int = opt(-1, "Optimizer steps to train; -1 = `epochs` passes over the data.", min=-1)
    epochs: float = opt(1.0, "Passes over the data (when `steps` is -1).", min=0.0)
    batch_size: int = opt(8, "Sequences per device per micro-batch.", min=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step (global batch = batch_size x grad_accum x devices).", min=1)
    max_length: int = opt(2048, "Tokens per training sequence.", min=8)
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass: less memory, ~30% slower.")
    torch_compile: bool = opt(False, "Compile the model with torch.compile (inductor): the first steps compile "
                              "(a minute or more; cached for later runs), then ~1.3x faster on CPU (bench/train.py).")
    lora: LoraConfig = section(LoraConfig, "LoRA adapters (peft).")
    save_every: int = opt(200, "Write a checkpoint every N optimizer steps (and at the last step).", min=1)
    keep_last: int = opt(2, "Complete checkpoints kept; older ones are deleted only after a newer one is complete.", min=1)
    log_every: int = opt(10, "Write a metrics.jsonl row every N steps.", min=1)
    samples_every: int = opt(200, "Generate samples on fixed prompts every N steps (samples.jsonl); 0 = never.", min=0)
    sample_prompts: int = opt(3, "How many fixed prompts the samples use.", min=1)
    sample_max_new_tokens: int = opt(128, "Most new tokens per sample.", min=1)
    max_nonfinite_steps: int = opt(3, "Stop the stage after this many consecutive steps with a non-finite loss "
                                   "or gradient (each such step is skipped and reported).", min=1)
    seed: int | None = opt(None, "Seed of data order and initialisation; null = the run's top-level seed.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = CUDA when available, else CPU.")
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "Compute precision: auto = bf16 mixed precision on CUDA, float32 on CPU (bf16 there is slow or missing).")
    report_to: Literal["none", "tensorboard", "trackio"] = opt("none", "Live curves besides metrics.jsonl.")


@dataclass
class CPTConfig(TrainConfig):
    """Stage 1: continued pretraining (next-token loss on every token of packed novel text)."""

    learning_rate: float = opt(2e-5, "Peak learning rate.", min=0.0)
    data: str = opt("data/demo/novels", "The packed dataset written by `tifa data novels`, or a folder/file of "
                    ".txt/.epub novels (ingested into OUT/data with the model's tokenizer, blocks of max_length).")
    dedup_threshold: float = opt(0.8, "When `data` is raw novels: near-duplicate threshold of the ingest.", min=0.01, max=1.0)
    pack: Literal["stream", "chapters"] = opt(
        "stream", "When `data` is raw novels: stream = blocks are consecutive slices of the text; chapters = rows "
        "of whole chapters up to max_length (long-context training; `tifa data novels --pack`).")
    length_curriculum: list[int] = opt(
        [], "Shorter sequences first: e.g. [2048, 8192] trains the first third of the tokens cut into pieces of "
        "2048, the next third of 8192, the rest at max_length (each epoch in that order). [] = none.")


@dataclass
class SFTConfig(TrainConfig):
    """Stage 2: chain-of-thought SFT cold start (loss on the final assistant turn: think block,
    answer, end tag), through the chat template's training form."""

    learning_rate: float = opt(1e-5, "Peak learning rate.", min=0.0)
    data: str = opt("data/demo/sft.jsonl", "SFT dialogues (JSONL, DESIGN.md 2a).")
    per_turn: bool = opt(True, "One example per assistant turn of a multi-turn dialogue (false: the final turn only).")
    too_long: Literal["drop", "error", "trim"] = opt(
        "drop", "An example over max_length: drop it (counted and reported), stop, or trim = drop its oldest turns "
        "after the system prompt until it fits, as `tifa chat` and the server do with a long session.")
    length_curriculum: list[int] = opt(
        [], "Shorter examples first: e.g. [1024, 4096] trains the examples up to 1024 tokens, then those up to "
        "4096, then the rest (each phase shuffled). [] = none.")
    user_name: str | None = opt(None, "{{user}} in character cards (null: the card's default).")
    prime_new_tokens: bool = opt(True, "Before training, aim the output rows of template tags the loader added "
                                 "(<think>, </think>, the end tag) at where the data puts them (train/prime.py); "
                                 "once per model.")


@dataclass
class DPOConfig(TrainConfig):
    """Stage 4: anti-repetition DPO (TRL's DPOTrainer) on pairs mined from the starting model's own
    answers (the `mining` section) and/or a preference file of your own; an SFT term on the chosen
    answers guards the lexical diversity plain DPO is known to lose."""

    learning_rate: float = opt(5e-7, "Peak learning rate (DPO wants a small one).", min=0.0)
    mine: bool = opt(True, "Mine pairs from the starting model's own answers to `prompts` (the `mining` section).")
    prompts: str = opt("data/demo/prompts.jsonl", "Prompts JSONL to mine pairs on (its `mining.split` lines).")
    pairs: str = opt("", "A preference-pairs JSONL of your own (DESIGN 2a), used with or instead of mined pairs; '' = none.")
    beta: float = opt(0.1, "DPO beta: how far the policy may move from the reference (modest by default).", min=1e-6)
    loss_type: Literal["sigmoid", "ipo", "robust", "hinge"] = opt("sigmoid", "The preference loss (TRL's names).")
    sft_weight: float = opt(0.2, "Weight of an SFT (NLL) term on the chosen answers; 0 = plain DPO.", min=0.0)
    precompute_ref: bool = opt(False, "Compute the reference log-probs once before training (no reference model "
                               "kept in memory while training).")
    too_long: Literal["drop", "error"] = opt("drop", "A pair whose prompt fills max_length: drop it (reported per "
                                             "line) or stop.")
    report: bool = opt(True, "Evaluate the model before and after on the `eval` prompts and write report.md "
                       "(repetition, distinct-n, think format, reward; a distinct-2 drop is flagged).")
    report_limit: int = opt(0, "Prompts in the before/after report (0 = the whole eval split).", min=0)


@dataclass
class MGRPOConfig:
    """MGRPO (DESIGN.md §5.1): pass 1 = GRPO on G answers; pass 2 = revisions guided by the rules' messages."""

    prompts: str = opt("data/demo/prompts.jsonl", "Prompts JSONL (DESIGN §2a): messages ending with a user turn.")
    split: Literal["train", "eval", "all"] = opt("train", "Which prompts to train on (lines without a split count as train).")
    steps: int = opt(100, "Updates (rollout batches) in the stage.", min=1)
    max_sequences: int = opt(0, "Stop once this many sequences have been sampled (pass 1, resampled groups and "
                             "pass-2 revisions all count; the update that reaches it is the last), or at `steps`; "
                             "0 = `steps` only. What `tifa ablate` equalises between arms.", min=0)
    prompts_per_step: int = opt(4, "Prompts per update.", min=1)
    group_size: int = opt(4, "G: answers sampled per prompt in pass 1.", min=2)
    revisions: int = opt(2, "M: revisions sampled per revised answer in pass 2 (M = 1: advantage r2 - r1).", min=1)
    pass2: Literal["off", "below", "all"] = opt(
        "below", "Which first answers get revised: none (plain GRPO), those scoring below revise_below, or all.")
    revise_below: float = opt(0.9, "Pass 2 revises first answers whose reward is below this.", min=0.0, max=1.0)
    pass2_weight: float = opt(1.0, "lambda: total loss = L_pass1 + lambda * L_pass2.", min=0.0)
    revision_bonus: float = opt(0.0, "alpha: add alpha * (r2 - r1) to a revision's advantage (SCoRe shaping).", min=0.0)
    scale_rewards: bool = opt(True, "Divide group advantages by the group's std (GRPO); false = Dr. GRPO.")
    drop_zero_std: bool = opt(True, "Leave groups whose rewards are all equal out of the loss (counted as frac_zero_std).")
    resample_zero_spread: int = opt(
        0, "Rounds of fresh prompts drawn in place of pass-1 groups whose rewards all tie, until every group of "
        "the update carries signal (0 = off); after the last round the update trains on what it has "
        "(the card's pre-vector confirmation, DESIGN §5.1).", min=0)
    loss_type: LossType = opt(
        "dapo", "Aggregation, as TRL 1.16: grpo (per-sequence mean), dr_grpo (/ max_new_tokens), "
        "dapo (/ tokens in the batch), bnpo (/ tokens in the micro-batch).")
    epsilon_low: float = opt(0.2, "Clip the ratio below at 1 - epsilon_low.", min=0.0, max=1.0)
    epsilon_high: float = opt(0.28, "Clip the ratio above at 1 + epsilon_high (DAPO clip-higher).", min=0.0)
    beta: float = opt(0.0, "Weight of the k3 KL to a frozen reference (0: no reference model is loaded).", min=0.0)
    kl_ratio_correction: bool = opt(True, "Multiply the per-token KL by the ratio to the sampling policy (TRL's default).")
    iterations: int = opt(1, "mu: optimizer steps on each rollout batch (> 1 uses the stored old log-probs).", min=1)
    learning_rate: float = opt(1e-6, "AdamW learning rate (constant after warm-up).", min=0.0)
    warmup_steps: int = opt(0, "Linear learning-rate warm-up, in optimizer steps.", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this; a non-finite norm skips the step.", min=0.0)
    micro_batch: int = opt(16, "Sequences per forward/backward (memory); the loss is the same for any value.", min=1)
    lora_r: int = opt(0, "LoRA rank; 0 trains every weight.", min=0)
    lora_alpha: int = opt(32, "LoRA alpha.", min=1)
    quantize: Literal["none", "4bit"] = opt(
        "none", "4bit = QLoRA (needs lora_r > 0): the frozen base in 4-bit NF4 (bitsandbytes, CUDA only; the qlora "
        "extra); the reference is that base with the adapters off.")
    temperature: float = opt(1.0, "Rollout temperature; the loss scores tokens at the same temperature.", min=0.01)
    top_p: float = opt(1.0, "Rollout nucleus mass (1.0 samples from the policy itself).", min=0.0, max=1.0)
    repetition_penalty: float = opt(1.0, "Rollout repetition penalty (1.0 samples from the policy itself).", min=0.0)
    max_new_tokens: int = opt(512, "Most tokens per rollout answer; dr_grpo divides by it.", min=1)
    save_every: int = opt(10, "Write a resumable checkpoint every this many updates (and at the end).", min=1)
    keep_checkpoints: int = opt(2, "Complete checkpoints kept (oldest removed first).", min=1)
    samples_per_step: int = opt(4, "Rollouts per update written to samples.jsonl.", min=0)
    rollout_backend: Literal["transformers", "vllm"] = opt(
        "transformers", "Who samples the rollouts: our transformers engine, or vLLM on the same GPU (the vllm "
        "extra; the policy's weights are pushed into it after every update).")
    vllm_memory: float = opt(0.3, "With rollout_backend vllm: the share of GPU memory vLLM may take.", min=0.05, max=0.95)
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "Compute precision: auto = bf16 on CUDA, float32 on CPU. The policy's weights and AdamW's states "
        "stay float32 either way (a bf16 weight would round a 1e-6 update away).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass: less memory, slower.")


def cosmetic_keys() -> set[str]:
    """Keys that may change between a run and its resume: they change what is logged, not the math."""
    return {"log_every", "samples_every", "sample_prompts", "sample_max_new_tokens", "keep_last", "report_to",
            "max_nonfinite_steps", "gradient_checkpointing"}  # the last: memory, not the math (tested equal)

"""The `mgrpo:` config section: every MGRPO knob, its default and its help, defined only here.

    tifa config configs/tiny.yaml --keys      # lists mgrpo.* with this help (once wired into Config)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tifaforge.fields import opt

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]


@dataclass
class MGRPOConfig:
    """MGRPO (DESIGN.md §5.1): pass 1 = GRPO on G answers; pass 2 = revisions guided by the rules' messages."""

    prompts: str = opt("data/demo/prompts.jsonl", "Prompts JSONL (DESIGN §2a): messages ending with a user turn.")
    split: Literal["train", "eval", "all"] = opt("train", "Which prompts to train on (lines without a split count as train).")
    steps: int = opt(100, "Updates (rollout batches) in the stage.", min=1)
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

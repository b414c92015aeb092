"""Stage 3, MGRPO: GRPO on the logic rewards plus a second pass that revises answers with the rules' messages.

    tifa train mgrpo configs/tiny.yaml --set mgrpo.steps=30

Per update (DESIGN.md §5.1): pass 1 samples G answers per prompt through the Engine, scores them
with `LogicReward` and normalises advantages per group; pass 2 asks for M revisions of each answer
below `revise_below` (or all), prompted with the first answer and the reward's error summary, scores
them against the ORIGINAL context and normalises within the M; then μ optimizer steps on
L1 + λ·L2 with TRL 1.16's clipped token-level surrogate (`tifaforge.rl.losses`).
Outputs in OUT (train/stage.py's run directory): checkpoints/ (resumable), metrics.jsonl, samples.jsonl,
plots/, config.yaml, model/, manifest.json (written last).

Departures from the paper (arXiv 2506.04746) and from TRL, and why:
1. Pass 2 is feedback-conditioned: its prompt carries the rules' messages, not a fixed "guiding
   phrase", because our rewards can say what is wrong.
2. Groups with all-equal rewards are left out of the loss and counted (`frac_zero_std`), where TRL
   keeps them with advantage 0 (`mgrpo.drop_zero_std: false` restores TRL's normalisers).
3. Rollouts sample from the policy itself (temperature, top_p, repetition_penalty of `mgrpo`, the
   other samplers off), so the ratio's denominator is the distribution the tokens came from; the
   chat defaults in `sampling` are not used here.
4. An answer that stopped on a stop token is trained with the tokenizer's end token appended (the
   Engine does not report which stop token fired): the policy learns to end its turn there.
5. Rollout seeds are a function of (seed, update, row), so a resumed run samples what the
   uninterrupted run would have sampled.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tifaforge.config import Config, MGRPOConfig, SamplingConfig
from tifaforge.errors import TifaError
from tifaforge.rewards import LogicReward, RewardResult
from tifaforge.train import distributed as dist
from tifaforge.train import sharding
from tifaforge.utils import atomic_write_bytes, atomic_write_json

STAGE = "mgrpo"
PLOT_KEYS = ("reward/pass1", "reward/pass2", "pass2_gain", "kl", "clip_ratio/region", "entropy", "len/pass1",
             "len/pass2", "frac_zero_std", "loss", "grad_norm")


# ---------------------------------------------------------------------------------------------
# Command line: tifa train mgrpo CONFIG


def add_arguments(p) -> None:
    from tifaforge.train import stage

    stage.stage_arguments(p)


def run(args) -> int:
    """`tifa train mgrpo CONFIG`: one process, or N data-parallel ones with --launcher torchrun|accelerate."""
    from tifaforge.train import stage

    return stage.run_command(args, STAGE, run_stage)


# ---------------------------------------------------------------------------------------------
# The stage


def run_stage(cfg: Config, base_model_dir: str | Path, out_dir: str | Path, *, resume: bool = True,
              stop_after: int | None = None) -> Path:
    """Train MGRPO from `base_model_dir` into `out_dir`, resuming from its last complete checkpoint.

    `stop_after`: return after this many updates in this call (a time-boxed run; the next call
    resumes). Returns the final model folder, or the checkpoints folder when stopped early.
    """
    import torch
    from tqdm import tqdm

    from tifaforge.models.load import save_model
    from tifaforge.train import stage
    from tifaforge.train.device import check_precision, check_quantize
    from tifaforge.train.metrics import plot_curves

    m = cfg.mgrpo
    # --- config, reward, prompts (checked before any model loads), processes, run directory
    reward = LogicReward(cfg.reward)
    records = read_prompts(m)
    stage.check_world(cfg, STAGE, dist.world_size())
    mode = sharding.sharding(cfg)
    sharding.check(cfg, STAGE, mode)
    check_quantize(m.quantize, m.lora_r > 0, "mgrpo.quantize")
    precision = check_precision(SimpleNamespace(device="auto", dtype=m.dtype), STAGE)
    dist.start("cuda" if torch.cuda.is_available() else "cpu")
    run, resume_from = stage.prepare_out(out_dir, cfg, STAGE, resume)
    dist.barrier()  # rank 0 has set the run directory up (resume point, truncated logs)
    if (run.out / "manifest.json").exists():  # finished: nothing to redo
        return run.model
    # --- model, data, optimizer
    torch.manual_seed(cfg.seed)
    policy, tok, ref = build_models(base_model_dir, m, cfg.model.loop, precision, cfg.model.rope_scaling)
    if mode == "fsdp2":  # each rank keeps 1/N of the weights, gradients and AdamW states
        for model in (policy, ref):
            if model is not None:
                sharding.shard(model, mixed_bf16=precision == "bf16")
    prompts = render_prompts(records, reward, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    opt, sched = make_optimizer(policy, m)
    start = load_checkpoint(resume_from, policy, opt, sched)
    sampled = sampled_before(run, start) if m.max_sequences else 0
    done = start
    last = start if m.max_sequences and sampled >= m.max_sequences else m.steps  # a resume after the budget's end
    engine = (rollout_engine(base_model_dir, m, cfg.model.loop, cfg.seed, policy, tok, run.out, precision)
              if start < last else None)
    # --- the loop
    try:
        bar = tqdm(range(start, last), initial=start, total=m.steps, desc=STAGE, unit="update",
                   disable=not stage.is_main())
        for step in bar:
            row = update(policy, tok, ref, reward, prompts, opt, sched, m, cfg.seed, step, pad, run, engine,
                         lambda: autocast(precision, policy), sampled)
            sampled = row["sampled_total"]
            bar.set_postfix(reward=f"{row['reward/pass1']:.3f}", gain=f"{row.get('pass2_gain') or 0:+.3f}",
                            sampled=sampled)
            done = step + 1
            spent = bool(m.max_sequences) and sampled >= m.max_sequences  # the budget: this update is the last
            stopping = stop_after is not None and done - start >= stop_after and done < m.steps and not spent
            if done % m.save_every == 0 or done == m.steps or stopping or spent:
                save_checkpoint(run, done, policy, opt, sched, m.keep_checkpoints)
                if stage.is_main():
                    plot_curves(run.metrics.path, run.plots, PLOT_KEYS)
                dist.barrier()  # no rank goes on (or returns) before the checkpoint is complete
            if stopping:
                return run.checkpoints
            if spent:
                break
    finally:  # vLLM's GPU memory back before the next stage of a pipeline runs in this process
        if engine is not None:
            engine.close()
    # --- save: a plain transformers folder (LoRA merged), then the manifest, last
    final = unsharded(policy, base_model_dir, m, cfg.model.loop, cfg.model.rope_scaling) if sharding.is_sharded(policy) else policy
    if m.quantize == "4bit" and stage.is_main():  # QLoRA: the adapters merged into the full-precision base
        from peft import get_peft_model_state_dict

        final = set_full_precision(build_models(base_model_dir, dataclasses_replace(m, quantize="none", beta=0.0),
                                                cfg.model.loop, rope=cfg.model.rope_scaling)[0],
                                   get_peft_model_state_dict(policy))
    if stage.is_main():
        final = final.merge_and_unload() if m.lora_r > 0 else final
        save_model(final.eval(), tok, run.model)
        atomic_write_json(run.out / "manifest.json", {"stage": STAGE, "status": "complete", "updates": done,
                                                      "sequences_sampled": sampled,
                                                      "base": str(Path(base_model_dir).resolve())})
    dist.barrier()
    return run.model


def update(policy, tok, ref, reward, prompts, opt, sched, m: MGRPOConfig, seed: int, step: int, pad: int,
           run, rollouts=None, amp=contextlib.nullcontext, sampled: int = 0) -> dict:
    """One MGRPO update: pass 1, pass 2, μ optimizer steps, one metrics row and a few samples.
    `rollouts`: a vLLM engine that samples with the policy's weights pushed in (else our engine).
    `amp()`: the compute precision's context, entered around forward passes only (autocast keeps its
    bf16 weight copies until the context exits: around an optimizer step they would go stale).
    `sampled`: sequences sampled by the updates before this one (the row's running total)."""
    from tifaforge.engine.generate import Engine

    t0 = time.perf_counter()
    batch_seed = (seed * 1_000_003 + step) * 100_003
    # This rank's share of the update's prompts, in global order; seeds follow the global row index.
    share = m.prompts_per_step // dist.world_size()
    mine = prompts_for_step(prompts, step, m.prompts_per_step, seed)[dist.rank() * share:(dist.rank() + 1) * share]
    with amp(), sharding.whole(policy):  # FSDP2: weights gathered once, sampling runs without collectives
        if rollouts is not None:
            rollouts.load_policy(policy)
        engine = rollouts if rollouts is not None else Engine(policy, tok)
        firsts, zero1 = pass1(engine, reward, mine, m, batch_seed + dist.rank() * share * m.group_size)
        drawn = resample(engine, reward, prompts, firsts, zero1, m, seed, step, batch_seed, dist.rank() * share)
        revs, zero2 = pass2(engine, reward, firsts, m, batch_seed + 50_000)
    t1 = time.perf_counter()
    train1, train2 = kept(firsts, zero1, m.group_size, m), kept(revs, zero2, m.revisions, m)
    for rows in (train1, train2):  # per pass, as pass_loss cuts its micro-batches
        with amp(), sharding.whole(policy), sharding.whole(ref):
            store_logps(policy, ref, rows, m, pad)
    losses = optimize(policy, opt, sched, [(train1, 1.0), (train2, m.pass2_weight)], m, pad, amp, firsts[0])
    t2 = time.perf_counter()
    for r in firsts + revs:  # what the log needs crosses the ranks, not the log-prob tensors
        r.old_logps = r.ref_logps = None
    parts = dist.gather((firsts, zero1, revs, zero2, [drawn]))  # in rank order = the one-process order
    firsts, zero1, revs, zero2, drawn = ([x for part in parts for x in part[i]] for i in range(5))
    row = {"step": step + 1, **step_metrics(firsts, zero1, revs, zero2, losses, t1 - t0, t2 - t1,
                                            sched.get_last_lr()[0]),
           "world_size": dist.world_size(), "global_batch": m.prompts_per_step}
    if m.resample_zero_spread:
        row["resampled"] = sum(drawn)  # groups drawn in place of tied ones (frac_zero_std: after them)
    # Every sequence the rollouts generated, over all ranks: the kept groups, the tied groups that fresh
    # prompts replaced, and the revisions (what an equal-budget comparison of GRPO and MGRPO counts).
    row["sampled"] = len(firsts) + sum(drawn) * m.group_size + len(revs)
    row["sampled_total"] = sampled + row["sampled"]
    row["time"] = time.time()  # wall clock at the end of the update (bench/mgrpo.py times step to step)
    if dist.rank() == 0:
        for sample_row in sample_rows(step + 1, firsts, revs, m.samples_per_step):
            run.samples.write(sample_row)
        run.metrics.write(row)
    return row


def sampled_before(run, start: int) -> int:
    """Sequences sampled by the first `start` updates, from the metrics rows a resume kept."""
    from tifaforge.train.metrics import JsonlLog

    if not start:
        return 0
    rows = [r for r in JsonlLog(run.metrics.path).rows() if r.get("step") == start and "sampled_total" in r] \
        if run.metrics.path.exists() else []
    if not rows:
        raise TifaError(f"{run.metrics.path}: no row for update {start} with `sampled_total`, so the sequences "
                        "sampled before the checkpoint are unknown; restart the stage (--restart-from mgrpo)")
    return int(rows[-1]["sampled_total"])


def rollout_engine(base_model_dir, m: MGRPOConfig, loop, seed: int, policy=None, tok=None, scratch: Path | None = None,
                   precision: str = "fp32"):
    """None (each update samples through `Engine(policy)`), or a vLLM engine started once on the base
    model's folder, sharing the GPU; `update` pushes the policy's weights into it before sampling. A
    base whose vocabulary the loader grew (template tags added) is saved as loaded for vLLM to start from."""
    if m.rollout_backend != "vllm":
        return None
    import torch

    from tifaforge.engine.vllm_backend import VLLMEngine

    if loop is not None and loop.end > loop.start:
        raise TifaError("mgrpo.rollout_backend vllm: vLLM cannot run a looped policy; use the transformers backend")
    if not torch.cuda.is_available():
        raise TifaError("mgrpo.rollout_backend vllm needs a CUDA GPU (vLLM is CUDA-only); use transformers here")
    dtype = "bfloat16" if precision == "bf16" else "float32" if policy is not None else "auto"
    start_dir = vllm_start_folder(base_model_dir, policy, tok, scratch) if policy is not None else base_model_dir
    try:
        return VLLMEngine(start_dir, gpu_memory_utilization=m.vllm_memory, seed=seed, dtype=dtype)
    finally:
        if start_dir != base_model_dir:  # vLLM holds the weights now
            import shutil

            shutil.rmtree(start_dir, ignore_errors=True)


def vllm_start_folder(base_model_dir, policy, tok, scratch: Path | None):
    """The folder vLLM starts from: the base's own, unless the loader grew the policy's vocabulary
    (template tags added to a tagless base): then the policy as loaded (LoRA merged on a copy), saved
    under `scratch`, since pushed weights must have the shapes vLLM was built with."""
    from transformers import AutoConfig

    from tifaforge.models.load import run_model, save_model

    rows = policy.get_input_embeddings().weight.shape[0]
    if scratch is None or rows == AutoConfig.from_pretrained(run_model(Path(base_model_dir))).vocab_size:
        return base_model_dir
    plain = copy.deepcopy(policy).merge_and_unload() if hasattr(policy, "peft_config") else policy
    return save_model(plain, tok, Path(scratch) / "vllm-start")


# ---------------------------------------------------------------------------------------------
# Data: prompts with their rendered ids and reward contexts


@dataclass
class Prompt:
    id: str
    messages: list[dict]
    card: dict | None
    ids: list[int]
    ctx: Any  # RewardContext of the ORIGINAL conversation: both passes are scored against it


def read_prompts(m: MGRPOConfig) -> list:
    """The configured split of the prompts file, checked line by line (before any model loads)."""
    from tifaforge.data.conversations import check_file, select_split

    records, _ = check_file(m.prompts, "prompts")
    return select_split(records, m.split, m.prompts, "mgrpo.split")


def render_prompts(records: list, reward: LogicReward, tokenizer) -> list[Prompt]:
    """Each prompt rendered with the policy's template, with its reward context."""
    from tifaforge.chat.template import THINK_OPEN, render
    from tifaforge.data.conversations import to_chat

    out = []
    for r in records:
        messages = to_chat(r, reward.cfg.user_name or None)
        text = render(messages, tokenizer, add_generation_prompt=True)
        card = r.card.to_dict() if r.card is not None else None
        ctx = reward.context(messages, card, started_in_think=text.rstrip().endswith(THINK_OPEN))
        out.append(Prompt(r.id, messages, card, tokenizer(text, add_special_tokens=False).input_ids, ctx))
    return out


def load_prompts(m: MGRPOConfig, reward: LogicReward, tokenizer) -> list[Prompt]:
    return render_prompts(read_prompts(m), reward, tokenizer)


def prompts_for_step(prompts: list[Prompt], step: int, per_step: int, seed: int) -> list[Prompt]:
    """Epoch-wise shuffled order, computed from (seed, step) alone so a resumed run picks the same."""
    n, picked = len(prompts), []
    for pos in range(step * per_step, (step + 1) * per_step):
        perm = random.Random(seed * 1_000_003 + pos // n).sample(range(n), n)
        picked.append(prompts[perm[pos % n]])
    return picked


# ---------------------------------------------------------------------------------------------
# Model: policy (+ LoRA), frozen reference when beta > 0


def build_models(base_dir: str | Path, m: MGRPOConfig, loop=None, precision: str = "fp32", rope=None):
    """(policy, tokenizer, reference or None). With LoRA the reference is the base, adapters off.
    `loop` (the config's `model.loop`) loops the block; use a fixed k here: rollouts and old
    log-probs run without autograd, where a sampled k is not drawn.

    The policy is float32 whatever the checkpoint's dtype: master weights and AdamW's states in fp32,
    compute in bf16 under autocast when `precision` is bf16 (mixed precision, as TRL's stages run);
    the frozen reference is kept in the compute dtype."""
    import torch

    from tifaforge.models.load import load_model
    from tifaforge.train.stage import apply_configured_loop

    quantize = m.quantize if m.lora_r > 0 else "none"
    policy, tok = load_model(base_dir, dtype="float32", device="cpu" if not torch.cuda.is_available() else "cuda",
                             quantize=quantize, rope_scaling=rope)
    apply_configured_loop(policy, loop)
    if quantize == "4bit":  # QLoRA: the 4-bit base frozen, norms in fp32, inputs that carry gradients
        from peft import prepare_model_for_kbit_training

        policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=m.gradient_checkpointing)
    if m.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = None
    if m.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        from tifaforge.train.stage import new_tag_rows

        policy = get_peft_model(policy, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, target_modules="all-linear",
                                                   lora_dropout=0.0, task_type="CAUSAL_LM",
                                                   trainable_token_indices=new_tag_rows(policy, tok)))
    elif m.beta > 0:
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        if precision == "bf16":
            ref = ref.to(torch.bfloat16)
    return policy, tok, ref


def unsharded(policy, base_dir, m: MGRPOConfig, loop, rope=None):
    """The sharded policy's weights gathered into a whole copy on rank 0 (None elsewhere); every rank calls it."""
    state = sharding.full_state_dict(policy)
    if dist.rank() != 0:
        return None
    whole, _, _ = build_models(base_dir, dataclasses_replace(m, beta=0.0, gradient_checkpointing=False), loop,
                               rope=rope)
    missing, unexpected = whole.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k}  # tied to the embeddings: restored with them
    if unexpected or set(missing) - tied:
        raise TifaError(f"mgrpo: gathered weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return whole


def set_full_precision(model, adapter_state: dict):
    """`model` (a LoRA policy on the full-precision base) with QLoRA's trained adapter weights loaded."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: v.float().cpu() for k, v in adapter_state.items()})
    return model


def autocast(precision: str, policy):
    """bf16 compute over fp32 weights for rollouts, scoring and the loss; a no-op in fp32."""
    import torch

    device = next(policy.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def reference_logps(policy, ref, chunk, pad: int, m: MGRPOConfig):
    """Reference log-probs, scored as the policy's are (`score`): the frozen copy, or the LoRA policy
    with its adapters disabled."""
    if ref is not None:
        return score(ref, chunk, pad, m)[0]
    with policy.disable_adapter():
        return score(policy, chunk, pad, m)[0]


# ---------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    prompt: Prompt
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    reward: RewardResult
    pass_: int = 1
    advantage: float = 0.0
    revises: Rollout | None = None  # pass 2: the first answer this revises
    revision_note: str = ""
    old_logps: Any = None
    ref_logps: Any = None


def rollout_sampling(m: MGRPOConfig, seed: int) -> SamplingConfig:
    return SamplingConfig(temperature=m.temperature, top_p=m.top_p, top_k=0, min_p=0.0,
                          repetition_penalty=m.repetition_penalty, max_new_tokens=m.max_new_tokens,
                          do_sample=True, seed=seed)


def sample(engine, prompt_ids: list[list[int]], m: MGRPOConfig, seed: int, seeds: list[int] | None = None):
    """One batched Engine call; every row has its own seed derived from (seed, row), or `seeds`."""
    from tifaforge.engine.generate import Request

    seeds = seeds or [seed + i for i in range(len(prompt_ids))]
    reqs = [Request(ids, rollout_sampling(m, s)) for ids, s in zip(prompt_ids, seeds)]
    results = engine.generate(reqs)
    eos = engine.tokenizer.eos_token_id
    return [(r, r.token_ids + ([eos] if r.finish_reason == "stop" and eos is not None else [])) for r in results]


def pass1(engine, reward: LogicReward, prompts: list[Prompt], m: MGRPOConfig, seed: int,
          seeds: list[int] | None = None):
    """G answers per prompt, scored, group advantages. Returns (rollouts, zero_spread per prompt)."""
    import torch

    from tifaforge.rl.losses import group_advantages

    rows = [p for p in prompts for _ in range(m.group_size)]
    outs = sample(engine, [p.ids for p in rows], m, seed, seeds)
    scores = reward.score_batch([p.ctx for p in rows], [r.text for r, _ in outs])
    rolls = [Rollout(p, p.ids, ids, r.text, s) for p, (r, ids), s in zip(rows, outs, scores)]
    adv, zero = group_advantages(advantage_values(reward, scores, m.group_size), m.group_size, m.scale_rewards)
    for r, a in zip(rolls, adv.tolist()):
        r.advantage = a
    return rolls, zero.tolist()


def advantage_values(reward: LogicReward, scores: list, group_size: int):
    """What group advantages normalise: the weighted totals, or (reward.normalize: per_rule) each rule
    normalised within its group, then weighted and summed (rl/losses.py: per_rule_values)."""
    import torch

    from tifaforge.rl.losses import per_rule_values

    if reward.cfg.normalize != "per_rule":
        return torch.tensor([s.total for s in scores])
    return per_rule_values([{n: r.score for n, r in s.rules.items()} for s in scores], [s.vetoed for s in scores],
                           reward.cfg.weights, reward.cfg.caps, group_size)


def resample(engine, reward: LogicReward, prompts: list[Prompt], firsts: list[Rollout], zero: list[bool],
             m: MGRPOConfig, seed: int, step: int, batch_seed: int, slot0: int) -> int:
    """Replace, in place, each pass-1 group whose rewards all tie with a group on a fresh prompt, for
    up to `resample_zero_spread` rounds; returns how many groups were drawn. A slot's fresh prompt and
    seeds depend on (seed, step, round, global slot) alone, so a resumed run or another process count
    draws the same ones."""
    drawn, G = 0, m.group_size
    for k in range(1, m.resample_zero_spread + 1):
        slots = [j for j, z in enumerate(zero) if z]
        if not slots:
            break
        fresh = prompts_for_step(prompts, step, m.prompts_per_step, seed + 7919 * k)
        seeds = [batch_seed + 10_000_000 * k + (slot0 + j) * G + i for j in slots for i in range(G)]
        rolls, flags = pass1(engine, reward, [fresh[slot0 + j] for j in slots], m, 0, seeds)
        for n, j in enumerate(slots):
            firsts[j * G:(j + 1) * G], zero[j] = rolls[n * G:(n + 1) * G], flags[n]
        drawn += len(slots)
    return drawn


def pass2(engine, reward: LogicReward, firsts: list[Rollout], m: MGRPOConfig, seed: int):
    """M revisions of each selected first answer, scored against the ORIGINAL context."""
    import torch

    from tifaforge.rl.losses import revision_advantages
    from tifaforge.rl.revise import revision_messages

    chosen = [r for r in firsts if m.pass2 == "all" or r.reward.total < m.revise_below]
    if m.pass2 == "off":
        return [], []
    before = sum(dist.gather(len(chosen))[:dist.rank()])  # revised answers on the ranks before this one
    if not chosen:
        return [], []
    rows, notes = [], []
    for f in chosen:
        msgs = revision_messages(f.prompt.messages, f.text, f.reward.summary, f.prompt.ctx.language,
                                 f.prompt.ctx.character)
        ids = engine.tokenizer(engine.render(msgs), add_special_tokens=False).input_ids
        rows += [(f, ids)] * m.revisions
        notes.append(msgs[-1]["content"])
    outs = sample(engine, [ids for _, ids in rows], m, seed + before * m.revisions)
    scores = reward.score_batch([f.prompt.ctx for f, _ in rows], [r.text for r, _ in outs])
    rolls = [Rollout(f.prompt, pids, ids, r.text, s, pass_=2, revises=f, revision_note=notes[i // m.revisions])
             for i, ((f, pids), (r, ids), s) in enumerate(zip(rows, outs, scores))]
    revised = torch.tensor([s.total for s in scores]).view(-1, m.revisions)
    values = advantage_values(reward, scores, m.revisions).view(-1, m.revisions) if m.revisions > 1 else None
    adv, zero = revision_advantages(revised, torch.tensor([f.reward.total for f in chosen]), m.scale_rewards,
                                    m.revision_bonus, values=values)
    for r, a in zip(rolls, adv.view(-1).tolist()):
        r.advantage = a
    return rolls, zero.tolist()


def kept(rolls: list[Rollout], zero: list[bool], size: int, m: MGRPOConfig) -> list[Rollout]:
    """Drop the groups (consecutive `size` rows) that carry no signal, when configured."""
    if not m.drop_zero_std:
        return rolls
    return [r for i, r in enumerate(rolls) if not zero[i // size]]


# ---------------------------------------------------------------------------------------------
# Loss and optimisation


def collate(rows: list[Rollout], pad: int):
    """(input_ids, attention_mask, completion_len): prompts left-padded, completions right-padded."""
    from tifaforge.rl.losses import left_collate

    C = max(len(r.completion_ids) for r in rows)
    ids, mask = left_collate([r.prompt_ids for r in rows], [r.completion_ids for r in rows], C, pad)
    return ids, mask, C


def chunks(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def pad_stack(tensors: list, C: int):
    import torch

    return torch.stack([torch.nn.functional.pad(t, (0, C - t.numel())) for t in tensors])


def score(policy, chunk: list[Rollout], pad: int, m: MGRPOConfig, entropy: bool = False):
    """(log-probs (B, C), entropies or None, completion mask (B, C), C) of a micro-batch's completions.
    Rows sharing a prompt opening of >= SHARED_MIN tokens (a pass-1 group, the revisions of one
    conversation) compute it once (`grouped_completion_logps`); a looped policy (its KV cache has a
    slot per iteration), one with gradient checkpointing (it keeps no cache) or a sharded one scores
    the plain batch."""
    import torch

    from tifaforge.engine.generate import SHARED_MIN
    from tifaforge.models.looping import get_loop
    from tifaforge.rl.losses import completion_logps, grouped_completion_logps

    C = max(len(r.completion_ids) for r in chunk)
    # A looped policy, one with gradient checkpointing (both drop the cache) or a sharded one: one forward.
    # (FSDP2 reduce-scatters once per layer call; a prefix computed once for some groups and not others
    # would call layers a data-dependent number of times and the ranks' collectives would not match.)
    if get_loop(policy) is None and not getattr(policy, "is_gradient_checkpointing", False) \
            and not sharding.is_sharded(policy):
        logps, ent = grouped_completion_logps(policy, [r.prompt_ids for r in chunk], [r.completion_ids for r in chunk],
                                              C, pad, m.temperature, entropy, SHARED_MIN)
        cmask = torch.tensor([[1.0] * len(r.completion_ids) + [0.0] * (C - len(r.completion_ids)) for r in chunk],
                             device=logps.device)
        return logps, ent, cmask, C
    ids, mask, C = collate(chunk, pad)
    logps, ent = completion_logps(policy, ids, mask, C, m.temperature, entropy=entropy)
    return logps, ent, mask[:, -C:].float().to(logps.device), C


def store_logps(policy, ref, rows: list[Rollout], m: MGRPOConfig, pad: int) -> None:
    """Old log-probs (needed when μ > 1) and reference log-probs (β > 0), once per rollout batch."""
    import torch

    if m.iterations == 1 and m.beta == 0:
        return
    with torch.no_grad():
        for chunk in chunks(rows, m.micro_batch):  # the micro-batches pass_loss will score: the same groups
            old = score(policy, chunk, pad, m)[0] if m.iterations > 1 else None
            refl = reference_logps(policy, ref, chunk, pad, m) if m.beta > 0 else None
            for i, r in enumerate(chunk):
                n = len(r.completion_ids)
                r.old_logps = None if old is None else old[i, :n]
                r.ref_logps = None if refl is None else refl[i, :n]


def pass_totals(rows: list[Rollout], m: MGRPOConfig) -> tuple[int, int, int]:
    """(sequences, tokens, micro-batches) of one pass over every rank: the loss's normalisers."""
    local = [len(rows), sum(len(r.completion_ids) for r in rows), len(chunks(rows, m.micro_batch))]
    return tuple(int(x) for x in dist.sum_all(local))


def pass_loss(policy, rows: list[Rollout], weight: float, m: MGRPOConfig, pad: int, acc: dict,
              totals: tuple[int, int, int], amp=contextlib.nullcontext, fill: int = 0, filler=None) -> None:
    """Backward this rank's part of one pass's loss (× weight) micro-batch by micro-batch, normalised
    over the whole pass on every rank (`totals`), so the ranks' gradients add up to the one-process one:
    exactly for grpo, dr_grpo and dapo; for bnpo when each rank's rows fill whole micro-batches."""
    import torch

    from tifaforge.rl.losses import LossSettings, aggregate, per_token_loss

    s = LossSettings(m.loss_type, m.epsilon_low, m.epsilon_high, m.beta, m.kl_ratio_correction, m.max_new_tokens)
    parts = chunks(rows, m.micro_batch)
    n_seqs, n_tokens, n_micro = totals
    for chunk in parts:
        with amp():  # the forward and the loss in the compute precision; the backward outside, as autocast wants
            logps, ent, cmask, C = score(policy, chunk, pad, m, entropy=True)
            dev = logps.device
            old = pad_stack([r.old_logps for r in chunk], C).to(dev) if m.iterations > 1 else logps.detach()
            ref = pad_stack([r.ref_logps for r in chunk], C).to(dev) if m.beta > 0 else None
            adv = torch.tensor([r.advantage for r in chunk], dtype=logps.dtype, device=dev)
            ptl, stats = per_token_loss(logps, old, adv, cmask, s, ref)
            loss = aggregate(ptl, cmask, s, n_seqs=n_seqs, n_tokens=n_tokens, n_micro=n_micro) * weight
        loss.backward()
        acc["loss"] += float(loss.detach())
        acc["stats"].add(stats)
        acc["entropy"] += float(ent.sum())
    for _ in range(fill):  # FSDP2: a zero-weight pass, so this rank joins the busiest rank's collectives
        with amp():
            loss = score(policy, [filler], pad, m)[0].sum() * 0.0
        loss.backward()


def optimize(policy, opt, sched, batches: list[tuple[list[Rollout], float]], m: MGRPOConfig, pad: int,
             amp=contextlib.nullcontext, filler: Rollout | None = None) -> dict:
    """μ optimizer steps on one rollout batch; returns the step's loss metrics (means over the μ).
    Sharded (FSDP2), each forward and backward gathers and reduce-scatters with the other ranks, so every
    rank runs as many micro-batches as the busiest one (`filler` pads with zero-weight passes) and the
    gradients arrive summed; unsharded, they are summed once after the backward passes."""
    from tifaforge.models.looping import clip_and_check, get_loop
    from tifaforge.rl.losses import LossStats
    out: dict[str, float] = defaultdict(float)
    policy.train()
    totals = [pass_totals(rows, m) for rows, _ in batches]
    sharded = sharding.is_sharded(policy)
    mine = [len(chunks(rows, m.micro_batch)) for rows, _ in batches]
    fills = [max(n) - k for n, k in zip(zip(*dist.gather(mine)), mine)] if sharded else [0] * len(batches)
    for _ in range(m.iterations):
        acc = {"loss": 0.0, "entropy": 0.0, "stats": LossStats()}
        opt.zero_grad(set_to_none=True)
        with sharding.whole(policy):  # FSDP2: gathered for the passes, resharded before the step
            for (rows, weight), total, fill in zip(batches, totals, fills):
                if rows or fill:
                    pass_loss(policy, rows, weight, m, pad, acc, total, amp, fill, filler)
        if any(t[0] for t in totals) and not sharded:  # the ranks' parts, summed (nothing to train: none)
            dist.sum_gradients(policy.parameters())
        reduce_accumulators(acc)
        # clip_and_check also reports the looped block's norm apart (0 when the model does not loop)
        norm, loop_norm, ok = clip_and_check(policy, m.max_grad_norm)
        if ok:
            opt.step()
        else:  # one bad batch must not poison the weights: skip and count it
            out["skipped_steps"] += 1
        sched.step()
        means = {"loss": acc["loss"], "grad_norm": norm, **acc["stats"].means(),
                 "entropy": acc["entropy"] / max(acc["stats"].tokens, 1.0)}
        if get_loop(policy) is not None:
            means["loop_grad_norm"] = loop_norm
        for k, v in means.items():
            out[k] += v / m.iterations
    opt.zero_grad(set_to_none=True)
    return dict(out)


def reduce_accumulators(acc: dict) -> None:
    """The loss, entropy and clip/KL sums of every rank, added (each rank holds a part of the batch)."""
    stats = acc["stats"]
    names = list(vars(stats))
    summed = dist.sum_all([acc["loss"], acc["entropy"], *(getattr(stats, k) for k in names)])
    acc["loss"], acc["entropy"] = summed[0], summed[1]
    for k, v in zip(names, summed[2:]):
        setattr(stats, k, v)


def make_optimizer(policy, m: MGRPOConfig):
    import torch

    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=m.learning_rate, weight_decay=m.weight_decay)
    warm = max(m.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm))
    return opt, sched


# ---------------------------------------------------------------------------------------------
# Logging: metrics per update, readable samples, plots


def step_metrics(firsts, zero1, revs, zero2, loss: dict, t_gen: float, t_train: float, lr: float) -> dict:
    """Reward per pass and per rule, pass-2 gain, zero-spread fractions, lengths, missing rule scores."""
    row: dict[str, float] = {}
    for name, rolls in (("pass1", firsts), ("pass2", revs)):
        if not rolls:
            continue
        row[f"reward/{name}"] = _mean(r.reward.total for r in rolls)
        row[f"len/{name}"] = _mean(len(r.completion_ids) for r in rolls)
        for rule in rolls[0].reward.rules:
            scores = [r.reward.rules[rule].score for r in rolls]
            row[f"reward/{name}/{rule}"] = _mean(s for s in scores if s is not None)
            missing = sum(s is None for s in scores)
            if missing:
                row[f"missing/{rule}"] = row.get(f"missing/{rule}", 0) + missing
    if revs:
        row["pass2_gain"] = _mean(r.reward.total - r.revises.reward.total for r in revs)
        row["frac_zero_std_pass2"] = _mean(zero2)
    row["frac_zero_std"] = _mean(zero1)
    row["revised"] = len({id(r.revises) for r in revs})  # first answers sent to pass 2
    row["sequences"] = len(firsts) + len(revs)
    row.update(loss, lr=lr, gen_s=t_gen, train_s=t_train)
    return row


def _mean(xs) -> float | None:
    """The mean, or None (JSON null) when nothing scored, e.g. every judge call timed out."""
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else None


def sample_rows(step: int, firsts: list[Rollout], revs: list[Rollout], n: int) -> list[dict]:
    """The first n answers of the update with their scores, messages and (first) revision."""
    by_first = {}
    for r in revs:
        by_first.setdefault(id(r.revises), r)
    rows = []
    for f in firsts[:n]:
        z = by_first.get(id(f))
        rows.append({"step": step, "prompt_id": f.prompt.id, "prompt": f.prompt.messages, "answer": f.text,
                     "advantage": round(f.advantage, 4), "reward": f.reward.to_json(),
                     "revision": None if z is None else {"request": z.revision_note, "answer": z.text,
                                                          "advantage": round(z.advantage, 4),
                                                          "reward": z.reward.to_json()}})
    return rows


# ---------------------------------------------------------------------------------------------
# Checkpoints (train/checkpoints.py's protocol: files, then the complete marker, then rotation)


def save_checkpoint(run, step: int, policy, opt, sched, keep: int) -> None:
    """Every rank calls it. Unsharded, rank 0 writes the trainable weights and AdamW state (every rank
    holds the same); sharded, each rank writes its shard (DCP), and rank 0 marks the checkpoint
    complete only after all have."""
    import torch

    from tifaforge.train import checkpoints as ckpt

    folder = run.checkpoints / f"checkpoint-{step}"
    objs = [("scheduler.pt", sched.state_dict())]
    if sharding.is_sharded(policy):
        sharding.save_dcp(folder, policy, opt)
        dist.barrier()
    else:
        trainable = {n: p.detach().cpu() for n, p in policy.named_parameters() if p.requires_grad}
        objs = [("trainable.pt", trainable), ("optimizer.pt", opt.state_dict()), *objs]
    if dist.rank() != 0:
        return
    for name, obj in objs:
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(folder / name, buf.getvalue())
    ckpt.mark_complete(folder, step)
    ckpt.rotate(run.checkpoints, keep)


def load_checkpoint(folder: Path | None, policy, opt, sched) -> int:
    """Restore a complete checkpoint (None: a fresh start); return its update count."""
    import torch

    if folder is None:
        return 0
    sched.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if sharding.is_sharded(policy):  # prepare_out refused a checkpoint of the other sharding
        sharding.load_dcp(folder, policy, opt)
        return int(folder.name.split("-")[1])
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for n, t in torch.load(folder / "trainable.pt", weights_only=True).items():
            params[n].copy_(t)
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return int(folder.name.split("-")[1])


if __name__ == "__main__":  # what launchers start on every rank: python -m tifaforge.stages.mgrpo CONFIG ...
    from tifaforge.train import stage as _stage

    raise SystemExit(_stage.module_main(STAGE, run_stage))

"""MGRPO's pure tensor functions: group and revision advantages, per-token log-probs, the clipped loss.

    .venv/bin/python -m pytest tests/test_mgrpo.py -k trl     # equal to TRL 1.16's GRPOTrainer

The policy loss is TRL 1.16's `GRPOTrainer._compute_loss` for loss types grpo | dr_grpo | dapo | bnpo
with token-level importance sampling: ratio to the sampling policy clipped to [1 - ε_low, 1 + ε_high],
k3 KL to a reference weighted by β (times the ratio, TRL's `use_bias_correction_kl`), then one of the
four aggregations. Departures, and why:
1. The normalisers are passed in as totals over the whole update (sequences, tokens, micro-batches)
   instead of TRL's gradient-accumulation count, so any micro-batch split gives the same loss and
   gradients; with one micro-batch every loss type is exactly TRL's (tested).
2. Advantages of a group whose rewards are all equal are 0 and the group is flagged, never NaN
   (a G = 1 group, whose std is undefined, counts as zero-spread).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)


# ---------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = STD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass-1 advantages: (r - group mean) [/ (group std + eps) when `scale`, i.e. GRPO; not: Dr. GRPO].

    rewards: (N * G,) with each prompt's G answers consecutive. Returns (advantages (N * G,),
    zero_spread (N,) bool): a group whose rewards are all equal gets advantage 0 and is flagged.
    """
    grouped = rewards.view(-1, group_size).double()  # (N, G); double so equal floats stay equal
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # Bessel, as TRL
    zero = torch.isclose(std, torch.zeros_like(std)).squeeze(1)  # (N,)
    adv = grouped - mean
    if scale:
        adv = adv / (std + eps)
    adv[zero] = 0.0
    return adv.view(-1).to(rewards.dtype), zero


def per_rule_values(rules: list[dict[str, float | None]], vetoed: list[bool], weights: dict[str, float],
                    caps: dict[str, float], group_size: int, eps: float = STD_EPS) -> torch.Tensor:
    """GDPO-style rewards for group advantages (reward.normalize: per_rule).

    Each weighted rule's scores (capped as the composite caps them) are normalised within each group of
    `group_size` consecutive answers, (s - mean) / (std + eps), 0 where the rule ties or did not score
    (a missing judge score counts as the group's mean, never as 0); the normalised scores are weighted
    and summed. A vetoed answer is placed below every answer of its group that was not vetoed, as the
    weighted total's 0 does. Returns (N * G,) values to pass to `group_advantages`.
    (Liu et al. 2026, "GDPO": summed rewards let a rule with a large spread hide another's signal.)"""
    n = len(rules)
    out = torch.zeros(n, dtype=torch.float64)
    wsum = sum(w for w in weights.values() if w) or 1.0
    for name, w in weights.items():
        if not w:
            continue
        cap = caps.get(name, 1.0)
        raw = [r.get(name) for r in rules]
        for g in range(0, n, group_size):
            have = [(i, min(raw[i], cap) / cap) for i in range(g, g + group_size)
                    if raw[i] is not None and not vetoed[i]]  # a vetoed answer goes below all, not into the scale
            if len(have) < 2:
                continue
            vals = torch.tensor([v for _, v in have], dtype=torch.float64)
            std = vals.std()
            if torch.isclose(std, torch.zeros_like(std)):
                continue
            for (i, _), z in zip(have, ((vals - vals.mean()) / (std + eps)).tolist()):
                out[i] += w / wsum * z
    for g in range(0, n, group_size):
        idx = range(g, g + group_size)
        kept = [out[i].item() for i in idx if not vetoed[i]]
        floor = (min(kept) if kept else 0.0) - 1.0
        for i in idx:
            if vetoed[i]:
                out[i] = floor
    return out.float()


def revision_advantages(revised: torch.Tensor, first: torch.Tensor, scale: bool = True, bonus: float = 0.0,
                        eps: float = STD_EPS, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass-2 advantages, normalised within the M revisions of one first answer.

    revised: (N, M) rewards of the revisions (scored against the ORIGINAL context); first: (N,) the
    rewards of the answers they revise. M = 1: A = r2 - r1. M > 1: group-normalised like pass 1 (on
    `values` (N, M) instead of `revised` when given: per_rule_values).
    `bonus` (α) adds α·(r2 - r1), so "change nothing" earns nothing (SCoRe). Returns (advantages
    (N, M), zero_signal (N,) bool: every advantage of that answer's revisions is 0).
    """
    gain = revised - first[:, None]  # (N, M)
    if revised.size(1) == 1:
        adv = gain.clone()
    else:
        adv, _ = group_advantages((revised if values is None else values).reshape(-1), revised.size(1), scale, eps)
        adv = adv.view_as(revised)
    adv = adv + bonus * gain
    zero = (adv == 0).all(dim=1)
    return adv, zero


# ---------------------------------------------------------------------------------------------
# Log-probabilities


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                     temperature: float = 1.0, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, C) of the last `completion_len` tokens at `temperature` (pads: 0).

    input_ids: (B, P + C), prompts left-padded and completions right-padded; positions follow the
    mask (as the engine's), so a left-padded row scores as it was sampled. With `entropy`, also the
    per-token entropy of that distribution (B, C), without a graph.
    """
    device = next(model.parameters()).device  # rollouts are collated on the CPU
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                use_cache=False, logits_to_keep=completion_len + 1)
    logits = out.logits[:, :-1, :].float() / temperature  # (B, C, V): logits at t predict token t+1
    logp_all = torch.log_softmax(logits, dim=-1)
    target = input_ids[:, -completion_len:]
    logps = logp_all.gather(-1, target[..., None]).squeeze(-1)  # (B, C)
    mask = attention_mask[:, -completion_len:]
    logps = logps * mask
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1) * mask  # (B, C)
    return logps, ent


def prefix_groups(prompts: list[list[int]], min_shared: int) -> list[tuple[list[int], int]]:
    """Runs of consecutive rows whose prompts open with the same >= `min_shared` tokens: (row indices,
    shared length). The shared part stops one token short of every member's prompt end, so the logit
    that predicts each row's first completion token comes from its own suffix. Single rows: length 0."""
    groups: list[tuple[list[int], int]] = []
    for i, p in enumerate(prompts):
        if groups:
            rows, k = groups[-1]
            first = prompts[rows[0]]
            n = 0
            limit = min(k if len(rows) > 1 else len(first) - 1, len(p) - 1)
            while n < limit and first[n] == p[n]:
                n += 1
            if n >= min_shared:
                groups[-1] = (rows + [i], n)
                continue
        groups.append(([i], 0))
    return [(rows, k if len(rows) > 1 else 0) for rows, k in groups]


def grouped_completion_logps(model, prompts: list[list[int]], completions: list[list[int]], C: int, pad: int,
                             temperature: float = 1.0, entropy: bool = False, min_shared: int = 32):
    """`completion_logps` of the collated rows, with each run of rows that shares a prompt opening of at
    least `min_shared` tokens computing that opening once: one forward of the shared tokens (with
    gradient), its KV cache repeated for the run, then the rows' rest (prompt tail + completion, right-
    padded) on top. The G answers of a pass-1 prompt share their whole prompt, the revision prompts of
    pass 2 their original conversation; every row gets the log-probs it has alone (up to float rounding),
    and the gradient through the shared part is the sum over its rows, as when each row computed it.

    Returns ((B, C) log-probs, (B, C) entropies or None) in the rows' order; pads score 0."""
    device = next(model.parameters()).device
    parts: list[torch.Tensor] = []
    ents: list[torch.Tensor] = []
    order: list[int] = []
    single: list[int] = []
    for rows, k in prefix_groups(prompts, min_shared):
        if k == 0:
            single += rows
            continue
        lp, en = _shared_logps(model, [prompts[i] for i in rows], [completions[i] for i in rows], k, C, pad,
                               temperature, entropy, device)
        parts.append(lp)
        ents.append(en)
        order += rows
    if single:
        ids, mask = left_collate([prompts[i] for i in single], [completions[i] for i in single], C, pad)
        lp, en = completion_logps(model, ids, mask, C, temperature, entropy)
        parts.append(lp)
        ents.append(en)
        order += single
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    inverse = inverse.to(device)
    logps = torch.cat(parts)[inverse]
    return logps, (torch.cat(ents)[inverse] if entropy else None)


def left_collate(prompts, completions, C: int, pad: int):
    """(input_ids, attention_mask): prompts left-padded, completions right-padded to C (the engine's
    and completion_logps' layout)."""
    P = max(len(p) for p in prompts)
    ids = [[pad] * (P - len(p)) + p + c + [pad] * (C - len(c)) for p, c in zip(prompts, completions)]
    mask = [[0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c)) for p, c in zip(prompts, completions)]
    return torch.tensor(ids), torch.tensor(mask)


def _shared_logps(model, prompts, completions, k: int, C: int, pad: int, temperature: float, entropy: bool, device):
    n = len(prompts)
    cache = model(input_ids=torch.tensor([prompts[0][:k]], device=device), use_cache=True, logits_to_keep=1).cache
    if cache is None or cache.get_seq_length() != k:
        raise RuntimeError("the shared opening left no KV cache (gradient checkpointing?): score the plain batch")
    cache.batch_repeat_interleave(n)
    tails = [p[k:] + c for p, c in zip(prompts, completions)]
    S = max(len(t) for t in tails)
    ids = torch.tensor([t + [pad] * (S - len(t)) for t in tails], device=device)
    mask = torch.tensor([[1] * (k + len(t)) + [0] * (S - len(t)) for t in tails], device=device)
    positions = (k + torch.arange(S, device=device)).expand(n, S)
    starts = torch.tensor([len(p) - k - 1 for p in prompts], device=device)  # logit predicting completion[0]
    low = int(starts.min())
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=S - low)
    index = (starts[:, None] - low + torch.arange(C, device=device)).clamp(max=S - low - 1)  # (n, C)
    logits = out.logits.gather(1, index[..., None].expand(-1, -1, out.logits.size(-1))).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    target = torch.tensor([c + [pad] * (C - len(c)) for c in completions], device=device)
    cmask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in completions], device=device)
    logps = logp_all.gather(-1, target[..., None]).squeeze(-1) * cmask
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1) * cmask
    return logps, ent


# ---------------------------------------------------------------------------------------------
# The loss


@dataclass
class LossSettings:
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    kl_ratio_correction: bool = True
    max_completion_length: int = 512


@dataclass
class LossStats:
    """Sums over active tokens (divide by `tokens` for means), so micro-batches add up exactly."""

    tokens: float = 0.0
    kl: float = 0.0
    clip_low: float = 0.0
    clip_high: float = 0.0
    clip_region: float = 0.0

    def add(self, other: LossStats) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def means(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        return {"kl": self.kl / n, "clip_ratio/low": self.clip_low / n, "clip_ratio/high": self.clip_high / n,
                "clip_ratio/region": self.clip_region / n}


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   s: LossSettings, ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """TRL's token-level clipped surrogate (+ β·k3 KL). logps/old/ref/mask: (B, C); advantages: (B,)."""
    adv = advantages[:, None]  # (B, 1)
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - s.epsilon_low, 1 + s.epsilon_high)
    loss = -torch.min(coef_1 * adv, coef_2 * adv)
    stats = LossStats(tokens=float(mask.sum()))
    if s.beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1  # k3, >= 0
        if s.kl_ratio_correction:
            kl = kl * coef_1
        loss = loss + s.beta * kl
        stats.kl = float((kl.detach() * mask).sum())
    with torch.no_grad():
        low = (coef_1 < 1 - s.epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + s.epsilon_high) & (adv > 0)
        stats.clip_low, stats.clip_high = float((low * mask).sum()), float((high * mask).sum())
        stats.clip_region = float(((low | high) * mask).sum())
    return loss, stats


def aggregate(loss: torch.Tensor, mask: torch.Tensor, s: LossSettings, *, n_seqs: int | None = None,
              n_tokens: float | None = None, n_micro: int = 1) -> torch.Tensor:
    """Reduce a (B, C) per-token loss as TRL 1.16 does; totals default to this micro-batch's own.

    grpo: mean over sequences of each sequence's token mean; dr_grpo: token sum / (sequences ×
    max_completion_length); dapo: token sum / tokens in the whole batch; bnpo: token mean of the
    micro-batch, averaged over micro-batches.
    """
    n_seqs = loss.size(0) if n_seqs is None else n_seqs
    masked = loss * mask
    if s.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_seqs
    if s.loss_type == "dr_grpo":
        return masked.sum() / (n_seqs * s.max_completion_length)
    if s.loss_type == "dapo":
        return masked.sum() / max(float(mask.sum()) if n_tokens is None else n_tokens, 1.0)
    if s.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / n_micro
    raise ValueError(f"unknown loss_type {s.loss_type!r}")

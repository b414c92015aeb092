"""Priming the template tags a base model never saw, before the SFT that teaches them.

A base without the seed template's tags (SmolLM2, a Qwen2.5 base with other tags) gets them from the
loader (`models.load.ensure_template_tokens`) as new rows, set to the mean of the old rows. The model
must *emit* three of them: `<think>` first, `</think>` after its reasoning and the end tag last. A
mean row scores ~15 nats below the top token where it should come (measured on SmolLM2-135M at the
positions of the English demo set: rank ~23,000 of 49,167), and Adam moves each coordinate by about
the learning rate per step, so a short SFT run never closes the gap: after 30 steps at lr 3e-4
SmolLM2 wrote its reasoning with no `<think>` tag, the format rule failed every answer, and MGRPO and
DPO had nothing to work with.

So before training, each new tag that the SFT data asks for gets its output row moved along the
direction that tells its positions apart: d = mean(h at the tag's positions) − mean(h elsewhere),
h the final hidden states of the model being trained (the same as a one-step linear probe). The
step is the one that puts the tag's average logit at its positions `margin` nats above the best
other token there. On SmolLM2 that moved the rows by ~5% of their norm and made the tags the top
token at 7, 10 and 8 of 10 held-out positions (and at ~3% of other positions, which the SFT loss then
trains away). With tied embeddings the input row moves too; the SFT then trains both.

Done once per model: the primed tags are recorded in `config.tifaforge["primed_tokens"]`, so a
second SFT (or a resumed one, whose checkpoint weights replace these anyway) does not prime again.
Hand-written because no library does it: transformers' `resize_token_embeddings(mean_resizing=True)`
is the mean-row init this starts from.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def prime_new_tokens(model, tokenizer, examples, *, max_examples: int = 16, margin: float = 1.0) -> dict:
    """Prime the loader-added tags that `examples` (dicts with `input_ids` and `labels`, -100 where
    there is no loss) train the model to emit. Returns {tag: {"positions", "top_before", "top_after"}}
    (how many of its positions had it as the top token before and after) and records the tags in
    `model.config.tifaforge["primed_tokens"]`."""
    import torch

    record = dict(getattr(model.config, "tifaforge", None) or {})
    added = [t for t in record.get("added_tokens", []) if t not in record.get("primed_tokens", [])]
    if not added:
        return {}
    ids = {tokenizer.convert_tokens_to_ids(t): t for t in added}
    rows = list(examples)[:max_examples]
    hidden, targets = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for ex in rows:
            x = torch.tensor([ex["input_ids"]])
            h = model.get_decoder()(input_ids=x).last_hidden_state[0, :-1]  # h at p predicts token p+1
            hidden.append(h)
            targets.append(torch.tensor(ex["labels"][1:]))
    model.train(was_training)
    if not hidden:
        return {}
    h, y = torch.cat(hidden), torch.cat(targets)
    head = model.get_output_embeddings().weight
    out: dict = {}
    with torch.no_grad():
        for tid, tag in ids.items():
            at = y == tid
            if not at.any():
                continue  # the data never asks for it: nothing to aim at
            d = h[at].mean(0) - h[~at].mean(0)
            logits = h[at] @ head.T  # only the tag's positions: all of them would be tokens x vocab
            before = int((logits.argmax(-1) == tid).sum())
            others = logits.clone()
            others[:, tid] = float("-inf")
            goal = others.max(-1).values + margin
            c = ((goal - logits[:, tid]) / (h[at] @ d)).mean()
            head[tid] += c * d
            logits[:, tid] = h[at] @ head[tid]
            out[tag] = {"positions": int(at.sum()), "top_before": before,
                        "top_after": int((logits.argmax(-1) == tid).sum())}
    if out:
        record["primed_tokens"] = record.get("primed_tokens", []) + list(out)
        model.config.tifaforge = record
        log.warning("primed the new tags' output rows from %d examples (top token at their positions, before -> "
                    "after: %s)", len(rows), ", ".join(f"{t} {v['top_before']}->{v['top_after']}/{v['positions']}"
                                                      for t, v in out.items()))
    return out

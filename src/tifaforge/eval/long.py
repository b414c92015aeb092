"""Long-context evaluation: perplexity by position and in-character recall at several lengths.

    tifa eval MODEL --long [--long-text FILE] [--lengths 512,1024,2048]

Two measures a long role-play session depends on:
- Perplexity by position: one long held-out text (the config's `eval.ppl_text`, the bundled demo
  novel when that is missing, or --long-text) read as one sequence up to the longest length, the
  next-token loss averaged in eight equal position buckets. A model that uses its context gets
  better (lower) further in; one past its trained window (no YaRN) gets worse there.
- Recall: a detail the user states at the start of a role-play chat (a sword's name, a town, a
  password), then filler turns up to each length, then the user asks for it. Scored without
  sampling, as a forced choice: the log-probability of the true answer against three others given
  in the same slot, so a tiny model's near-random text does not hide the signal. Accuracy and the
  mean margin (true minus best other, in nats) per length.
Writes OUT/long.json and OUT/long.png.
"""

from __future__ import annotations

import math
from pathlib import Path

from tifaforge.errors import TifaError
from tifaforge.utils import atomic_write_json, read_text_bounded, resolve_path

BUCKETS = 8
# (what the user says first, the question later, the answer, three others of the same kind)
FACTS = [
    ("我的剑叫“霜降”，是师父留下的。", "我刚才说我的剑叫什么？", "霜降", ["惊蛰", "白露", "小满"]),
    ("我从青石镇来，那里下了一个月的雨。", "我是从哪个镇来的？", "青石镇", ["落雁镇", "白沙镇", "临水镇"]),
    ("暗号是“海棠未眠”，别忘了。", "暗号是什么？", "海棠未眠", ["梨花带雨", "松风无言", "月下独酌"]),
    ("我今年二十三岁，属马。", "我今年多大？", "二十三岁", ["十九岁", "三十一岁", "二十七岁"]),
]
FILLER = [("外面的雨还在下吗？", "*她望向窗外。* 「还在下，檐下的灯笼被风吹得直晃。」"),
          ("客栈里还有别人吗？", "「只剩掌柜的了，他在后厨温酒。」*她把剑横放在膝上。*"),
          ("你在等谁？", "*她沉默片刻。* 「等一个不会来的人。」")]


def _nll(model, ids: list[int]):
    """Next-token negative log-likelihoods of `ids` (len - 1 values), one forward pass."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)
        logp = model(input_ids=x[:, :-1]).logits.float().log_softmax(-1)
        return -logp.gather(-1, x[:, 1:, None])[0, :, 0]


def perplexity_by_position(model, tokenizer, text: str, length: int) -> list[dict]:
    ids = tokenizer(text, add_special_tokens=False).input_ids[:length + 1]
    if len(ids) < 2 * BUCKETS:
        raise TifaError(f"the long text has {len(ids)} tokens: too short to bucket (give --long-text)")
    nll = _nll(model, ids)
    width = math.ceil(len(nll) / BUCKETS)
    return [{"from": i * width, "to": min((i + 1) * width, len(nll)),
             "ppl": math.exp(float(nll[i * width:(i + 1) * width].mean()))} for i in range(BUCKETS)
            if i * width < len(nll)]


def _chat(fact: str, question: str, filler_turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "你是沈青崖，青石镇客栈里的剑客，记得别人告诉你的每一件事。"},
            {"role": "user", "content": fact}, {"role": "assistant", "content": "「记下了。」"}]
    for i in range(filler_turns):
        u, a = FILLER[i % len(FILLER)]
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": question}]


def recall(model, tokenizer, length: int) -> dict:
    """Forced-choice recall of each fact with filler up to about `length` tokens."""
    from tifaforge.chat.template import render

    correct, margins, tokens = 0, [], []
    for fact, question, answer, others in FACTS:
        turns = 0
        while True:
            prompt = render(_chat(fact, question, turns + 1), tokenizer, add_generation_prompt=True) + "「"
            if len(tokenizer(prompt, add_special_tokens=False).input_ids) > length:
                break
            turns += 1
        prompt = render(_chat(fact, question, turns), tokenizer, add_generation_prompt=True) + "「"
        base = tokenizer(prompt, add_special_tokens=False).input_ids
        if len(base) > length:
            raise TifaError(f"--lengths {length}: shorter than the recall probe itself ({len(base)} tokens)")
        tokens.append(len(base))
        scores = []
        for option in [answer, *others]:
            ids = base + tokenizer(option + "」", add_special_tokens=False).input_ids
            scores.append(-float(_nll(model, ids)[len(base) - 1:].sum()))
        correct += scores[0] > max(scores[1:])
        margins.append(scores[0] - max(scores[1:]))
    return {"length": length, "prompt_tokens": tokens, "accuracy": correct / len(FACTS),
            "margin": sum(margins) / len(margins)}


def evaluate_long(model_dir: str | Path, out: str | Path, lengths: list[int], text_path: str | Path | None,
                  rope_scaling=None) -> dict:
    from tifaforge.models.load import load_model

    model, tokenizer = load_model(model_dir, device="cpu", rope_scaling=rope_scaling)
    model.eval()
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    if max(lengths) > context:
        raise TifaError(f"--lengths {max(lengths)}: past the model's context of {context} tokens "
                        "(set model.rope_scaling to read further)")
    text = _long_text(text_path)
    res = {"model": str(model_dir), "context": context,
           "perplexity_by_position": perplexity_by_position(model, tokenizer, text, max(lengths)),
           "recall": [recall(model, tokenizer, n) for n in lengths]}
    out = Path(out)
    atomic_write_json(out / "long.json", res)
    res["plot"] = str(_plot(res, out / "long.png"))
    return res


def _long_text(path: str | Path | None) -> str:
    if path:
        return read_text_bounded(path, 256 << 20, "long text")
    held = resolve_path("data/demo/eval/novel_heldout.txt")
    if held.is_file():
        return read_text_bounded(held, 256 << 20, "long text")
    from importlib import resources

    return "\n".join(resources.files("tifaforge").joinpath("assets", "demo", f).read_text(encoding="utf-8")
                     for f in ("novel_zh.txt", "passages_zh.txt"))


def _plot(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    ppl = res["perplexity_by_position"]
    a.plot([(p["from"] + p["to"]) / 2 for p in ppl], [p["ppl"] for p in ppl], marker="o")
    a.set(xlabel="position (tokens)", ylabel="perplexity", title="perplexity by position")
    rec = res["recall"]
    b.plot([r["length"] for r in rec], [r["accuracy"] for r in rec], marker="o", label="accuracy")
    b.plot([r["length"] for r in rec], [r["margin"] for r in rec], marker="s", label="margin (nats)")
    b.set(xlabel="conversation length (tokens)", title="recall of an early detail")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_long(res: dict) -> str:
    ppl = res["perplexity_by_position"]
    lines = [f"perplexity by position (the text's first {ppl[-1]['to'] + 1} tokens): "
             + "  ".join(f"{p['from']}-{p['to']}: {p['ppl']:.1f}" for p in ppl)]
    lines += [f"recall at {r['length']} tokens: accuracy {r['accuracy']:.2f}, margin {r['margin']:+.2f} nats"
              for r in res["recall"]]
    return "\n".join(lines)


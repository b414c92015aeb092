"""MGRPO: pure advantages and losses, equality with TRL 1.16's GRPOTrainer, the stage end to end.

    .venv/bin/python -m pytest tests/test_mgrpo.py

The learning test starts from the tiny preset after a quick in-test SFT on the demo dialogues
(`sft_tiny_dir`, cached), standing in for the SFT stage until `stages/sft.py` lands.
"""

from __future__ import annotations

import copy
import json
import math
import random
import threading
import time
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import ROOT, _code_key, cached_dir
from tifaforge.config import load_config
from tifaforge.errors import ConfigError, TifaError
from tifaforge.rl.losses import (
    LossSettings,
    aggregate,
    completion_logps,
    group_advantages,
    per_token_loss,
    revision_advantages,
)

DEMO = ROOT / "data" / "demo"


# A reward proportional to the answer's length (far below the band): the samples of a group score
# apart unless they are exactly as long, so the first update has advantages to move the policy with.
# (Format rewards on a few tokens of a warmed-up model often tie the whole group: zero advantages.)
BY_LENGTH = ("reward.weights={answer_length: 1.0}", "reward.answer_length_zh=[200, 400]")
SHORT_PROMPTS = ["师姐，你教我画引火符好不好？", "今天饭堂又是白菜豆腐，我实在吃不下了。", "外面下雨了，我们去哪儿？",
                 "你觉得内门的大师兄怎么样？"]


@pytest.fixture(scope="module")
def short_prompts(tmp_path_factory) -> Path:
    """Card-less one-turn prompts: the stage's logic at a fraction of the demo prompts' prefill cost."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": t}]},
                                       ensure_ascii=False) + "\n" for i, t in enumerate(SHORT_PROMPTS)), encoding="utf-8")
    return path


def stage_cfg(*overrides: str, prompts: Path = DEMO / "prompts.jsonl"):
    from tifaforge.config import Config

    base = ["mgrpo.steps=2", "mgrpo.prompts_per_step=2", "mgrpo.group_size=3", "mgrpo.revisions=1",
            "mgrpo.max_new_tokens=12", "mgrpo.learning_rate=0.0001", "mgrpo.pass2=all", "mgrpo.save_every=1",
            f"mgrpo.prompts={prompts}", "reward.weights={think_format: 1.0, answer_length: 1.0}",
            "reward.vetoes=[]", "reward.answer_length_zh=[3, 20]"]
    return load_config(None, base + list(overrides), cls=Config)


# ---------------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("scale", [True, False])
def test_zero_spread_group_has_zero_advantage_not_nan_and_is_counted(scale):
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.5])
    adv, zero = group_advantages(rewards, 3, scale=scale)
    assert torch.isfinite(adv).all()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert zero.tolist() == [True, False]
    single, zero1 = group_advantages(torch.tensor([0.7, 0.2]), 1, scale=scale)  # G = 1: std undefined
    assert single.tolist() == [0.0, 0.0] and zero1.tolist() == [True, True]


def test_group_advantages_are_trl_formula():
    r = torch.tensor([0.1, 0.4, 0.9, 0.3])
    adv, _ = group_advantages(r, 4, scale=True)
    want = (r - r.mean()) / (r.std() + 1e-4)  # TRL: unbiased std, + 1e-4
    torch.testing.assert_close(adv, want)
    adv_dr, _ = group_advantages(r, 4, scale=False)
    torch.testing.assert_close(adv_dr, r - r.mean())


def test_revision_advantages_m1_is_gain_and_bonus_shapes():
    first = torch.tensor([0.2, 0.5])
    adv, zero = revision_advantages(torch.tensor([[0.6], [0.5]]), first)
    torch.testing.assert_close(adv, torch.tensor([[0.4], [0.0]]))
    assert zero.tolist() == [False, True]
    revised = torch.tensor([[0.6, 0.2], [0.5, 0.5]])
    adv, zero = revision_advantages(revised, first, scale=False, bonus=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.2 + 0.2, -0.2 + 0.0], [0.0, 0.0]]))
    assert zero.tolist() == [False, True]


def test_aggregation_is_independent_of_the_micro_batch_split():
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    for lt in ("grpo", "dr_grpo", "dapo"):
        s = LossSettings(loss_type=lt, max_completion_length=8)
        whole = aggregate(loss, mask, s)
        parts = sum(aggregate(loss[i:i + 2], mask[i:i + 2], s, n_seqs=6, n_tokens=float(mask.sum()), n_micro=3)
                    for i in (0, 2, 4))
        torch.testing.assert_close(parts, whole)


# ---------------------------------------------------------------------------------------------
# Equality with TRL's GRPOTrainer (pass 2 off, sampled answers, stale old log-probs, beta > 0)


def _perturbed(model, scale: float, seed: int):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return out


@pytest.fixture(scope="module")
def trl_batch(trained_tiny_dir):
    """Answers sampled by the policy that generated them (pass 1 of our stage), old log-probs from
    that sampler, a policy one "update" away (μ > 1: ratios far from 1), the start model as reference."""
    from tifaforge.engine.generate import Engine
    from tifaforge.models.load import load_model
    from tifaforge.rewards import LogicReward
    from tifaforge.stages.mgrpo import collate, load_prompts, pass1

    cfg = stage_cfg("mgrpo.group_size=3", "mgrpo.max_new_tokens=10", "mgrpo.temperature=0.9",
                    "reward.weights={answer_length: 1.0, language: 1.0}", "reward.answer_length_zh=[12, 40]")
    base, tok = load_model(trained_tiny_dir, device="cpu")
    sampler = _perturbed(base, 0.05, seed=1)
    reward = LogicReward(cfg.reward)
    prompts = load_prompts(cfg.mgrpo, reward, tok)
    prompts = [prompts[0], min(prompts[1:], key=lambda p: len(p.ids))]  # two prompt lengths: left padding
    rolls, zero = pass1(Engine(sampler, tok), reward, prompts, cfg.mgrpo, seed=7)
    assert not all(zero), "the batch must carry signal"
    ids, mask, C = collate(rolls, tok.pad_token_id)
    with torch.no_grad():
        old = completion_logps(sampler, ids, mask, C, 0.9)[0]
        ref = completion_logps(base, ids, mask, C, 0.9)[0]
    adv = torch.tensor([r.advantage for r in rolls])
    return dict(policy=_perturbed(sampler, 0.3, seed=2), tok=tok, ids=ids, mask=mask, C=C, old=old, ref=ref, adv=adv)


def _trl_trainer(model, tok, loss_type: str, tmp_path: Path, max_len: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                      max_completion_length=max_len, beta=0.04, num_iterations=2, loss_type=loss_type,
                      epsilon=0.2, epsilon_high=0.28, temperature=0.9, use_cpu=True, bf16=False,
                      gradient_checkpointing=False, report_to=[])
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["x"] * 6}), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one window of one micro-batch here
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_loss_and_gradients_equal_trl_grpo(trl_batch, loss_type, tmp_path):
    b = trl_batch
    C, P = b["C"], b["ids"].size(1) - b["C"]
    cmask = b["mask"][:, -C:]
    # ours
    ours = copy.deepcopy(b["policy"]).train()
    s = LossSettings(loss_type, 0.2, 0.28, beta=0.04, kl_ratio_correction=True, max_completion_length=10)
    logps, _ = completion_logps(ours, b["ids"], b["mask"], C, 0.9)
    ptl, stats = per_token_loss(logps, b["old"], b["adv"], cmask.float(), s, b["ref"])
    loss = aggregate(ptl, cmask.float(), s)
    loss.backward()
    # TRL's _compute_loss on the same batch, same weights
    trainer = _trl_trainer(copy.deepcopy(b["policy"]), b["tok"], loss_type, tmp_path, 10)
    inputs = {"prompt_ids": b["ids"][:, :P], "prompt_mask": b["mask"][:, :P], "completion_ids": b["ids"][:, P:],
              "completion_mask": cmask, "advantages": b["adv"], "old_per_token_logps": b["old"],
              "ref_per_token_logps": b["ref"], "num_items_in_batch": cmask.sum()}
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    assert abs(loss.item()) > 1e-3, "a loss of about 0 would prove nothing"
    assert stats.means()["clip_ratio/region"] > 0 and stats.means()["kl"] > 0  # clipping and KL exercised
    torch.testing.assert_close(loss, theirs.detach(), atol=1e-5, rtol=1e-5)
    assert abs(stats.means()["kl"] - trainer._metrics["train"]["kl"][-1]) < 1e-5
    theirs_named = dict(trainer.model.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_named[name].grad, atol=1e-5, rtol=1e-5, msg=name)


def test_shared_prefix_scoring_equals_the_collated_batch(trained_tiny_dir):
    """The stage scores rows that share a prompt opening (a pass-1 group; the revisions of one
    conversation) by computing that opening once: the log-probs, entropies and per-parameter gradients
    must equal `completion_logps` on the plain left-padded batch, which equals TRL's (test above)."""
    from tifaforge.engine.generate import SHARED_MIN, Engine
    from tifaforge.models.load import load_model
    from tifaforge.rewards import LogicReward
    from tifaforge.rl.losses import prefix_groups
    from tifaforge.stages.mgrpo import collate, load_prompts, pass1, pass2, score

    cfg = stage_cfg("mgrpo.group_size=3", "mgrpo.max_new_tokens=10", "mgrpo.pass2=all", "mgrpo.revisions=2")
    model, tok = load_model(trained_tiny_dir, device="cpu")
    reward = LogicReward(cfg.reward)
    prompts = load_prompts(cfg.mgrpo, reward, tok)
    prompts = [prompts[0], min(prompts[1:], key=lambda p: len(p.ids))]
    engine = Engine(model, tok)
    firsts, _ = pass1(engine, reward, prompts, cfg.mgrpo, seed=7)
    revs, _ = pass2(engine, reward, firsts, cfg.mgrpo, seed=8)
    lone = copy.copy(revs[0])  # a row that shares no opening with its neighbours: scored on its own
    lone.prompt_ids = tok("你好。", add_special_tokens=False).input_ids
    for rows in (firsts, revs, firsts + [lone] + revs):
        groups = prefix_groups([r.prompt_ids for r in rows], SHARED_MIN)
        assert any(k > 0 and len(g) >= 2 for g, k in groups), "nothing shared: the test would prove nothing"
        if lone in rows:  # the lone row is its own group: the plain path, then put back in place
            assert ([rows.index(lone)], 0) in groups
        weights = torch.randn(len(rows), max(len(r.completion_ids) for r in rows), generator=torch.Generator().manual_seed(0))
        grads = []
        for shared in (True, False):
            policy = copy.deepcopy(model).train()
            if shared:
                logps, ent, cmask, C = score(policy, rows, tok.pad_token_id, cfg.mgrpo, entropy=True)
            else:
                ids, mask, C = collate(rows, tok.pad_token_id)
                logps, ent = completion_logps(policy, ids, mask, C, cfg.mgrpo.temperature, entropy=True)
                cmask = mask[:, -C:].float()
            (logps * weights).sum().backward()
            grads.append(({n: p.grad for n, p in policy.named_parameters()}, logps.detach(), ent, cmask))
        (ga, la, ea, ma), (gb, lb, eb, mb) = grads
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ea, eb, atol=1e-5, rtol=1e-5)
        assert torch.equal(ma, mb)
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], atol=5e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# Revision prompts and self-revision at inference


def test_revision_messages_carry_answer_summary_and_language():
    from tifaforge.rl.revise import revision_messages

    msgs = [{"role": "system", "content": "你是林小满。"}, {"role": "user", "content": "师姐，你好。"}]
    zh = revision_messages(msgs, "<think>\n想\n</think>\n你好呀", "- 缺少<think>…</think>思考部分", "zh", "林小满")
    assert zh[:2] == msgs and zh[2] == {"role": "assistant", "content": "<think>\n想\n</think>\n你好呀"}
    assert zh[3]["role"] == "user" and "缺少<think>…</think>思考部分" in zh[3]["content"]
    assert "以林小满的身份重写" in zh[3]["content"]
    en = revision_messages([{"role": "user", "content": "Hi"}], "Hello", "- no <think>…</think> block", "en", "Mira")
    assert "no <think>…</think> block" in en[-1]["content"] and "as Mira" in en[-1]["content"]
    assert "重写" not in en[-1]["content"]


def test_revise_runs_pass2_once_with_the_rules_messages(engine):
    from tifaforge.config import SamplingConfig
    from tifaforge.engine.generate import Engine
    from tifaforge.rewards import LogicReward, RewardConfig
    from tifaforge.rl.revise import revision

    class Recording(Engine):  # the real engine, remembering what it was asked
        prompts: list = []

        def generate(self, requests):
            self.prompts += [r.prompt for r in requests]
            return super().generate(requests)

    eng = Recording(engine.model, engine.tokenizer)
    reward = LogicReward(RewardConfig(weights={"think_format": 1.0}, vetoes=[]))
    messages = [{"role": "user", "content": "师姐，你教我画引火符好不好？"}]
    sampling = SamplingConfig(max_new_tokens=8, seed=3)
    first = eng.chat(messages, sampling)
    assert reward.score(reward.context(messages), first.text).summary  # the tiny model writes no think block
    eng.prompts.clear()
    out = revision(eng, messages, first, reward, sampling).final
    assert len(eng.prompts) == 1 and "缺少<think>…</think>思考部分" in eng.prompts[0] and first.text.split("</think>")[-1] in eng.prompts[0]
    ctx = reward.context(messages)
    assert reward.score(ctx, out.text).total >= reward.score(ctx, first.text).total
    eng.prompts.clear()
    good = type(first)("<think>\n想想\n</think>\n好呀。", [], "stop", "想想", "好呀。", 1)
    assert revision(eng, messages, good, reward, sampling).final is good and eng.prompts == []  # nothing to fix


# ---------------------------------------------------------------------------------------------
# The stage: outputs, resume, bad input


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_stage_outputs_and_resume_mid_stage_equal_an_uninterrupted_run(trained_tiny_dir, short_prompts, tmp_path):
    from tifaforge.stages.mgrpo import run_stage

    cfg = stage_cfg("mgrpo.steps=3", "mgrpo.iterations=2", "mgrpo.beta=0.04", "mgrpo.group_size=2",
                    "mgrpo.max_new_tokens=8", prompts=short_prompts)
    whole = run_stage(cfg, trained_tiny_dir, tmp_path / "whole")
    part = tmp_path / "part"
    assert run_stage(cfg, trained_tiny_dir, part, stop_after=2) == part / "checkpoints"
    assert not (part / "model").exists() and (part / "checkpoints" / "checkpoint-2" / "complete.json").exists()
    with pytest.raises(TifaError, match=r"config changed .*mgrpo.beta 0.04 -> 0.1"):
        run_stage(stage_cfg("mgrpo.steps=3", "mgrpo.iterations=2", "mgrpo.beta=0.1", "mgrpo.group_size=2",
                            "mgrpo.max_new_tokens=8", prompts=short_prompts), trained_tiny_dir, part)
    resumed = run_stage(cfg, trained_tiny_dir, part)
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in _weights(trained_tiny_dir).items() if k in a)  # it trained
    rows = [json.loads(ln) for ln in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward/pass1", "reward/pass1/think_format", "reward/pass2", "pass2_gain", "kl", "clip_ratio/region",
                "entropy", "len/pass1", "len/pass2", "frac_zero_std", "grad_norm"):
        assert key in rows[-1], key
    sample = json.loads((part / "samples.jsonl").read_text().splitlines()[0])
    assert {"prompt", "answer", "reward", "revision"} <= sample.keys() and sample["revision"]["request"]
    assert "think_format" in sample["reward"]["rules"] and sample["reward"]["rules"]["think_format"]["message"]
    assert (part / "plots" / "reward_pass1.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((part / "manifest.json").read_text())["status"] == "complete"


def test_unknown_reward_rule_is_a_clear_error(trained_tiny_dir, tmp_path):
    from tifaforge.stages.mgrpo import run_stage

    with pytest.raises(ConfigError, match=r"reward.weights: unknown rule 'thinkformat' \(did you mean 'think_format'\?\)"):
        run_stage(stage_cfg("reward.weights={thinkformat: 1.0}"), trained_tiny_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompt_without_user_turn_names_file_and_line(trained_tiny_dir, tmp_path):
    from tifaforge.stages.mgrpo import run_stage

    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "你好"}]}, ensure_ascii=False) + "\n"
                   + json.dumps({"id": "b", "messages": [{"role": "user", "content": "你好"},
                                                          {"role": "assistant", "content": "嗯"}]}, ensure_ascii=False) + "\n")
    with pytest.raises(TifaError, match=r"prompts.jsonl:2: messages\[1\]: a prompt must end with a user turn"):
        run_stage(stage_cfg(f"mgrpo.prompts={bad}"), trained_tiny_dir, tmp_path / "out")


class _SlowJudge(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        time.sleep(1.5)
        try:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"choices": [{"message": {"content": "9"}}]}')
        except OSError:
            pass  # the client gave up first: that is the point

    def log_message(self, *args):
        pass


def test_judge_timeout_counts_missing_and_the_run_goes_on(trained_tiny_dir, short_prompts, tmp_path):
    from tifaforge.stages.mgrpo import run

    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = tmp_path / "mgrpo.yaml"
        config.write_text(
            "mgrpo:\n  steps: 1\n  prompts_per_step: 1\n  group_size: 2\n  pass2: 'off'\n  max_new_tokens: 8\n"
            f"  prompts: {short_prompts}\n"
            "reward:\n  weights: {think_format: 1.0, answer_length: 1.0, judge: 1.0}\n  vetoes: []\n"
            f"  judge_url: http://127.0.0.1:{server.server_port}/v1\n  judge_timeout: 0.2\n", encoding="utf-8")
        out = tmp_path / "out"
        assert run(Namespace(config=str(config), model=str(trained_tiny_dir), out=str(out), set=[], resume=False, launcher="none")) == 0
    finally:
        server.shutdown()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["missing/judge"] == 2 and row["reward/pass1/judge"] is None  # no scores, not 0
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["reward"]["rules"]["judge"] == {"score": None, "message": "评审超时（0.2秒）"}
    assert (out / "model" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Learning: 30 updates on the tiny preset after a quick SFT raise a learnable rule's reward

SFT_RECIPE = "sft-v1: demo sft.jsonl, last 256 tokens, 60 steps x 8, AdamW 2e-3, clip 1.0, seed 0"


def _quick_sft(warm: Path, out: Path) -> None:
    """Next-token loss on the final assistant turn (think block included) of the demo dialogues, so
    the model opens answers with <think> and sometimes closes it: think_format has signal."""
    from tifaforge.chat.template import training_tokens
    from tifaforge.data.conversations import check_file, expand_turns, to_chat
    from tifaforge.models.load import load_model, save_model

    model, tok = load_model(warm, device="cpu")
    records, _ = check_file(DEMO / "sft.jsonl", "sft")
    examples = [tuple(x[-256:] for x in training_tokens(to_chat(e), tok)) for r in records for e in expand_turns(r)]
    rng, opt = random.Random(0), torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):
        batch = rng.sample(examples, 8)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in batch])
        att = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([[t if m else -100 for t, m in zip(i, mk)] + [-100] * (width - len(i)) for i, mk in batch])
        model(input_ids=ids, attention_mask=att, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), opt.zero_grad()
    save_model(model.eval(), tok, out)


@pytest.fixture(scope="session")
def sft_tiny_dir(trained_tiny_dir) -> Path:
    """The warm tiny preset after a quick SFT (stands in for stages/sft.py), cached on disk."""
    import hashlib

    key = _code_key("models/presets.py", "models/load.py", "chat/template.py") + hashlib.sha256(SFT_RECIPE.encode()).hexdigest()[:6]
    return cached_dir("tiny-sft-mgrpo", key, lambda p: _quick_sft(trained_tiny_dir, p / "model")) / "model"


def _think_format_rate(model_dir: Path, prompts: list[str]) -> float:
    from tifaforge.config import SamplingConfig
    from tifaforge.engine.generate import Engine, Request
    from tifaforge.rewards import LogicReward, RewardConfig

    eng = Engine.load(model_dir, device="cpu")
    reward = LogicReward(RewardConfig(weights={"think_format": 1.0}, vetoes=[]))
    scores = []
    for text in prompts:
        msgs = [{"role": "user", "content": text}]
        sampling = [SamplingConfig(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=64, seed=s)
                    for s in range(8)]
        results = eng.generate([Request(eng.render(msgs), s) for s in sampling])
        scores += [reward.score(reward.context(msgs), r.text).total for r in results]
    return sum(scores) / len(scores)


@pytest.mark.slow
def test_thirty_updates_raise_the_think_format_reward(sft_tiny_dir, short_prompts, tmp_path):
    from tifaforge.stages.mgrpo import run_stage

    cfg = stage_cfg("mgrpo.steps=30", "mgrpo.group_size=6", "mgrpo.max_new_tokens=64", "mgrpo.pass2=below",
                    "mgrpo.revise_below=0.5", "mgrpo.learning_rate=0.0005", "mgrpo.save_every=30",
                    "reward.weights={think_format: 1.0}", prompts=short_prompts)
    before = _think_format_rate(sft_tiny_dir, SHORT_PROMPTS)
    after = _think_format_rate(run_stage(cfg, sft_tiny_dir, tmp_path / "out"), SHORT_PROMPTS)
    assert after >= before + 0.15, (before, after)


def test_a_looped_policy_trains_and_keeps_its_loop(trained_tiny_dir, short_prompts, tmp_path):
    """`model.loop` in the config: rollouts and updates run the looped block; model/ keeps the loop."""
    from tifaforge.models.load import load_model
    from tifaforge.models.looping import get_loop
    from tifaforge.stages.mgrpo import run_stage

    cfg = stage_cfg("mgrpo.steps=1", "mgrpo.group_size=3", "mgrpo.max_new_tokens=6", "model.loop.start=1",
                    "model.loop.end=3", "model.loop.k=2", *BY_LENGTH, prompts=short_prompts)
    out = run_stage(cfg, trained_tiny_dir, tmp_path / "03-mgrpo")
    model, _ = load_model(out, device="cpu")
    assert get_loop(model) is not None and get_loop(model).cfg.k == 2
    rows = [json.loads(x) for x in (tmp_path / "03-mgrpo" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert all(r["loop_grad_norm"] > 0 for r in rows if "loss" in r)  # the looped block, logged apart


# ---------------------------------------------------------------------------------------------
# LoRA (`mgrpo.lora_r > 0`): only the adapters train, the reference is the base with the adapters
# off, model/ is the merged plain transformers folder, and a resumed run equals an uninterrupted one

LORA = ("mgrpo.lora_r=4", "mgrpo.lora_alpha=8", "mgrpo.beta=0.04", "mgrpo.group_size=2", "mgrpo.max_new_tokens=8")


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def test_lora_trains_only_the_adapters_and_its_reference_is_the_untouched_base(trained_tiny_dir, short_prompts):
    from tifaforge.engine.generate import Engine
    from tifaforge.models.load import load_model
    from tifaforge.rewards import LogicReward
    from tifaforge.stages.mgrpo import build_models, collate, load_prompts, make_optimizer, optimize, pass1, store_logps

    cfg = stage_cfg(*LORA, "mgrpo.learning_rate=0.01", "mgrpo.iterations=2", prompts=short_prompts)
    m = cfg.mgrpo
    torch.manual_seed(0)
    policy, tok, ref = build_models(trained_tiny_dir, m)
    assert ref is None, "with LoRA the reference is the policy with its adapters off, not a second copy"
    device = str(next(policy.parameters()).device)  # the stage puts the policy on CUDA when there is one
    frozen, _ = load_model(trained_tiny_dir, device=device)
    frozen.eval().requires_grad_(False)
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    names = {id(p): n for n, p in policy.named_parameters()}
    # the optimizer holds the LoRA parameters, all of them and nothing else
    opt, sched = make_optimizer(policy, m)
    held = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert held and all(_is_lora(n) for n in held)
    assert sorted(held) == sorted(n for n in names.values() if _is_lora(n))
    assert not any(p.requires_grad for n, p in policy.named_parameters() if not _is_lora(n))
    # a rollout batch from the policy (advantages set: the update must move the adapters)
    reward = LogicReward(cfg.reward)
    rolls, _ = pass1(Engine(policy, tok), reward, load_prompts(m, reward, tok)[:2], m, seed=5)
    for i, r in enumerate(rolls):
        r.advantage = 1.0 if i % 2 else -1.0
    pad = tok.pad_token_id
    batch = collate(rolls, pad)
    with torch.no_grad():
        base_logps = completion_logps(frozen, *batch, m.temperature)[0].cpu()

    def kl(logps, ref_logps):
        s = LossSettings(m.loss_type, m.epsilon_low, m.epsilon_high, m.beta, m.kl_ratio_correction, m.max_new_tokens)
        cmask = batch[1][:, -batch[2]:].float()
        return per_token_loss(logps, logps, torch.zeros(len(rolls)), cmask, s, ref_logps)[1].means()["kl"]

    def stored_refs():
        store_logps(policy, None, rolls, m, pad)
        return torch.stack([torch.nn.functional.pad(r.ref_logps.cpu(), (0, batch[2] - r.ref_logps.numel()))
                            for r in rolls])

    # step 0: the reference (adapters disabled) is the frozen base, and so is the policy (B = 0)
    ref0 = stored_refs()
    torch.testing.assert_close(ref0, base_logps, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        pol0 = completion_logps(policy, *batch, m.temperature)[0].cpu()
    assert kl(pol0, ref0) == pytest.approx(kl(pol0, base_logps), abs=1e-7)
    # μ = 2 optimizer steps: the adapters move, the base weights stay bitwise as they were
    losses = optimize(policy, opt, sched, [(rolls, 1.0)], m, pad)
    assert math.isfinite(losses["loss"]) and losses["grad_norm"] > 0 and not losses.get("skipped_steps")
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in start.items() if not _is_lora(n)), "a base weight changed"
    assert any(not torch.equal(after[n], t) for n, t in start.items() if ".lora_B." in n), "the adapters did not train"
    # after training: the reference is still the untouched base, the policy is not, and the KL
    # against the adapters-off reference is the KL against a frozen copy of the start model
    ref1 = stored_refs()
    torch.testing.assert_close(ref1, base_logps, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        pol1 = completion_logps(policy, *batch, m.temperature)[0].cpu()
    assert (pol1 - base_logps).abs().max() > 1e-3, "the update should have changed the policy"
    assert kl(pol1, ref1) > 1e-6
    assert kl(pol1, ref1) == pytest.approx(kl(pol1, base_logps), rel=1e-4, abs=1e-7)


def test_lora_stage_saves_a_merged_plain_transformers_model(trained_tiny_dir, short_prompts, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tifaforge.models.load import load_model
    from tifaforge.stages.mgrpo import run_stage

    cfg = stage_cfg(*LORA, "mgrpo.steps=2", "mgrpo.learning_rate=0.01", *BY_LENGTH, prompts=short_prompts)
    out = run_stage(cfg, trained_tiny_dir, tmp_path / "out")
    assert out == tmp_path / "out" / "model"
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # step 1: B = 0, the policy is its reference
    assert rows[-1]["kl"] > 0  # step 2: the trained adapters against the base (adapters off)
    # a plain transformers folder: no adapter files, the base's config and tensor names
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"} & files
    assert json.loads((out / "config.json").read_text()) == json.loads((trained_tiny_dir / "config.json").read_text())
    base, new = _weights(trained_tiny_dir), _weights(out)
    assert base.keys() == new.keys() and not any("lora" in k for k in new)
    # the weights differ from the start only by the merged adapters of the last checkpoint: W + (α/r)·B·A
    trainable = torch.load(tmp_path / "out" / "checkpoints" / "checkpoint-2" / "trainable.pt", weights_only=True)
    assert trainable and all(_is_lora(n) for n in trainable)
    optim = torch.load(tmp_path / "out" / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert len(optim["state"]) == len(trainable)  # the optimizer held the adapters only
    scale, merged = cfg.mgrpo.lora_alpha / cfg.mgrpo.lora_r, 0
    for k, w in base.items():
        a = trainable.get(f"base_model.model.{k.removesuffix('.weight')}.lora_A.default.weight")
        if a is None:
            assert torch.equal(new[k], w), f"{k} is not adapted and must not change"
            continue
        b = trainable[f"base_model.model.{k.removesuffix('.weight')}.lora_B.default.weight"]
        torch.testing.assert_close(new[k] - w, scale * b @ a, atol=1e-6, rtol=1e-4, msg=k)
        merged += not torch.equal(new[k], w)
    assert merged > 0, "the saved weights must differ from the start model"
    # loads with transformers and with our loader, to the same logits, which are not the base's
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        ours = load_model(out, device="cpu")[0].eval()(input_ids=ids).logits
        start = load_model(trained_tiny_dir, device="cpu")[0].eval()(input_ids=ids).logits
    torch.testing.assert_close(hf, ours)
    assert (hf - start).abs().max() > 1e-4


@pytest.mark.slow
def test_lora_resume_mid_stage_equals_an_uninterrupted_run(trained_tiny_dir, short_prompts, tmp_path):
    from tifaforge.stages.mgrpo import run_stage

    cfg = stage_cfg(*LORA, "mgrpo.steps=2", "mgrpo.iterations=2", "mgrpo.learning_rate=0.01", prompts=short_prompts)
    whole = run_stage(cfg, trained_tiny_dir, tmp_path / "whole")
    part = tmp_path / "part"
    assert run_stage(cfg, trained_tiny_dir, part, stop_after=1) == part / "checkpoints"
    assert not (part / "model").exists()
    saved = torch.load(part / "checkpoints" / "checkpoint-1" / "trainable.pt", weights_only=True)
    assert saved and all(_is_lora(n) for n in saved)  # the checkpoint holds the adapters, not the base
    with pytest.raises(TifaError, match=r"config changed .*mgrpo.lora_r 4 -> 8"):
        run_stage(stage_cfg(*LORA, "mgrpo.lora_r=8", "mgrpo.steps=2", "mgrpo.iterations=2", "mgrpo.learning_rate=0.01",
                            prompts=short_prompts), trained_tiny_dir, part)
    resumed = run_stage(cfg, trained_tiny_dir, part)
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in _weights(trained_tiny_dir).items() if k in a)  # it trained
    whole_rows = [json.loads(ln) for ln in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    part_rows = [json.loads(ln) for ln in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in part_rows] == [1, 2]
    assert [r["kl"] for r in part_rows] == [r["kl"] for r in whole_rows]  # the resumed reference is the base


def test_bf16_compute_keeps_fp32_master_weights_so_a_small_lr_moves_them(trained_tiny_dir, short_prompts,
                                                                           tmp_path, monkeypatch):
    """A bf16 checkpoint trained at lr 1e-6 with bf16 compute: the policy's weights and AdamW's states
    are float32, so the update lands (in bf16 weights it rounds away: 1e-6 is far below bf16's spacing
    at these magnitudes)."""
    from tifaforge.models.load import load_model, save_model
    from tifaforge.stages.mgrpo import run_stage
    from tifaforge.train import device

    monkeypatch.setattr(device, "cpu_bf16_supported", lambda: True)  # autocast runs on any CPU, slowly
    model, tok = load_model(trained_tiny_dir, dtype="bfloat16", device="cpu")
    base = save_model(model, tok, tmp_path / "bf16")
    cfg = stage_cfg("mgrpo.steps=1", "mgrpo.learning_rate=0.000001", "mgrpo.dtype=bfloat16", "mgrpo.group_size=2",
                    "mgrpo.max_new_tokens=8", "mgrpo.pass2=off", *BY_LENGTH, prompts=short_prompts)
    a, b = _weights(base), _weights(run_stage(cfg, base, tmp_path / "out"))
    w = "model.layers.0.mlp.down_proj.weight"
    assert a[w].dtype == torch.bfloat16 and b[w].dtype == torch.float32
    moved = (b[w] != a[w].float()).float().mean().item()
    assert moved > 0.5, f"only {moved:.0%} of the weights moved"
    assert (b[w] - a[w].float()).abs().max().item() < 1e-5  # by about the learning rate, as AdamW's first step


def test_gradient_checkpointing_gives_the_same_update(trained_tiny_dir, short_prompts, tmp_path):
    from tifaforge.stages.mgrpo import run_stage

    sets = ("mgrpo.steps=1", "mgrpo.group_size=2", "mgrpo.max_new_tokens=8", "mgrpo.beta=0.04", *BY_LENGTH)
    plain = run_stage(stage_cfg(*sets, prompts=short_prompts), trained_tiny_dir, tmp_path / "plain")
    ckpt = run_stage(stage_cfg(*sets, "mgrpo.gradient_checkpointing=true", prompts=short_prompts), trained_tiny_dir,
                     tmp_path / "ckpt")
    rows = [json.loads((d.parent / "metrics.jsonl").read_text().splitlines()[0]) for d in (plain, ckpt)]
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4, abs=1e-6)
    a, b = _weights(plain), _weights(ckpt)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resampling_replaces_tied_groups_with_fresh_prompts(trained_tiny_dir, short_prompts, tmp_path):
    """Two-token answers often tie on length: with resampling on, tied groups are redrawn on fresh
    prompts (the same first draw as without, then fewer ties), counted in `resampled`; a rule that
    every answer fails alike ties every group, and after its rounds the update goes on with them."""
    from tifaforge.stages.mgrpo import run_stage

    sets = ("mgrpo.steps=1", "mgrpo.prompts_per_step=4", "mgrpo.group_size=2", "mgrpo.max_new_tokens=2",
            "mgrpo.pass2=off", *BY_LENGTH)

    def first_row(*extra, name):
        out = run_stage(stage_cfg(*sets, *extra, prompts=short_prompts), trained_tiny_dir, tmp_path / name)
        return json.loads((out.parent / "metrics.jsonl").read_text().splitlines()[0])

    for seed in range(6):  # which draws tie depends on the fixture's weights: the first seed with a tie
        plain = first_row(f"seed={seed}", name=f"plain-{seed}")
        if plain["frac_zero_std"] > 0:
            break
    assert plain["frac_zero_std"] > 0, "no group tied in 6 seeds: nothing to resample"
    again = first_row(f"seed={seed}", "mgrpo.resample_zero_spread=3", name="resampled")
    assert again["resampled"] >= plain["frac_zero_std"] * 4  # every tied group was redrawn at least once
    assert again["frac_zero_std"] < plain["frac_zero_std"]
    tied = first_row("mgrpo.resample_zero_spread=2", "reward.weights={blocklist: 1.0}", "reward.blocklist=[]",
                     name="tied")
    assert tied["frac_zero_std"] == 1 and tied["resampled"] == 2 * 4


def test_bf16_compute_scores_the_second_iteration_with_the_updated_weights(trained_tiny_dir, short_prompts,
                                                                           tmp_path, monkeypatch):
    """mu = 2 in bf16: the second optimizer step's ratios come from the weights the first step moved,
    so they leave the clip region (with one step per batch they are exactly 1)."""
    from tifaforge.stages.mgrpo import run_stage
    from tifaforge.train import device

    monkeypatch.setattr(device, "cpu_bf16_supported", lambda: True)
    cfg = stage_cfg("mgrpo.steps=1", "mgrpo.iterations=2", "mgrpo.learning_rate=0.01", "mgrpo.dtype=bfloat16",
                    "mgrpo.group_size=3", "mgrpo.max_new_tokens=8", "mgrpo.pass2=off", *BY_LENGTH, prompts=short_prompts)
    out = run_stage(cfg, trained_tiny_dir, tmp_path / "out")
    row = json.loads((out.parent / "metrics.jsonl").read_text().splitlines()[0])
    assert row["frac_zero_std"] < 1 and row["clip_ratio/region"] > 0, row

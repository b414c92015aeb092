import json
import math
import shutil

import pytest
import torch

from tifaforge.config import EvalConfig, RewardConfig, SamplingConfig
from tifaforge.errors import TifaError
from tifaforge.eval.metrics import answer_metrics, bootstrap_ci, perplexity, summarise
from tifaforge.eval.report import models_of, run_eval
from tifaforge.rewards.literary import LogicReward


@pytest.fixture(scope="module")
def reward():
    return LogicReward(RewardConfig())


def test_metrics_of_hand_made_answers(reward):
    ctx = reward.context([{"role": "user", "content": "讲讲你的剑。"},
                          {"role": "assistant", "content": "这把剑陪我走过十年江湖风雨。"},
                          {"role": "user", "content": "再说说。"}])
    good = "<think>\n他想起往事。\n</think>\n\n他低头看着剑鞘，沉默良久。"
    no_think = "他低头看着剑鞘，沉默良久。"
    loop = "<think>想</think>" + "走吧走吧" * 10
    echo = "<think>想</think>这把剑陪我走过十年江湖风雨。"
    m_good, m_none, m_loop, m_echo = (answer_metrics(reward, ctx, a) for a in (good, no_think, loop, echo))
    assert (m_good["think_format"], m_none["think_format"]) == (1.0, 0.0)
    # "走吧走吧"x10 = 40 characters: 37 4-grams, only 2 distinct ("走吧走吧", "吧走吧走")
    assert m_loop["repetition_4gram"] == pytest.approx(1 - 2 / 37)
    assert m_good["repetition_4gram"] == 0.0
    assert m_echo["cross_turn_overlap"] == pytest.approx(1.0) and m_good["cross_turn_overlap"] == 0.0
    assert m_good["answer_length"] == len("他低头看着剑鞘沉默良久")
    assert m_loop["reward"] < m_good["reward"]
    refusal = answer_metrics(reward, ctx, "<think>想</think>抱歉，作为一个AI语言模型，我无法满足这个请求。")
    assert refusal["refusal"] == 1.0 and m_good["refusal"] == 0.0


def test_bootstrap_interval():
    vals = [0.0, 1.0] * 20
    mean, lo, hi = bootstrap_ci(vals, n=500, seed=1)
    assert mean == 0.5 and lo < 0.5 < hi and (lo, hi) == bootstrap_ci(vals, n=500, seed=1)[1:]
    assert bootstrap_ci([2.0] * 5) == (2.0, 2.0, 2.0)
    s = summarise([{"x": 1.0}, {"x": 3.0}], ["甲乙丙", "甲乙丁"], 100)
    assert s["x"]["mean"] == 2.0 and s["distinct_1"]["mean"] == pytest.approx(4 / 6)


def test_cluster_bootstrap_counts_a_prompt_s_answers_together():
    # 8 prompts x 4 answers, the answers of a prompt all alike: 32 values carry the evidence of 8.
    vals = [float(i % 2) for i in range(8) for _ in range(4)]
    groups = [i for i in range(8) for _ in range(4)]
    _, lo_c, hi_c = bootstrap_ci(vals, n=500, seed=1, groups=groups)
    _, lo_i, hi_i = bootstrap_ci(vals, n=500, seed=1)
    _, lo_8, hi_8 = bootstrap_ci([float(i % 2) for i in range(8)], n=500, seed=1)
    assert hi_c - lo_c > 1.5 * (hi_i - lo_i)  # treated as independent, the interval is far too narrow
    assert (lo_c, hi_c) == (lo_8, hi_8)  # clusters of equal values: exactly the 8-value bootstrap
    s = summarise([{"x": v} for v in vals], ["甲"] * 32, 500, 1, groups)
    assert (s["x"]["low"], s["x"]["high"]) == (lo_c, hi_c)


def test_several_answers_per_prompt_have_their_own_seeds(trained_tiny_dir):
    from tifaforge.engine.generate import Engine
    from tifaforge.eval.metrics import evaluate

    engine = Engine.load(trained_tiny_dir, device="cpu")
    one = evaluate(engine, EvalConfig(limit=2, max_new_tokens=8, bootstrap=20), SamplingConfig(), progress=False)
    two = evaluate(engine, EvalConfig(limit=2, max_new_tokens=8, bootstrap=20, samples=3), SamplingConfig(),
                   progress=False)
    assert (two["n"], two["samples_per_prompt"], len(two["samples"])) == (2, 3, 6)
    assert [a["answer"] for a in two["samples"][:2]] == [a["answer"] for a in one["samples"]]  # answer 0: same seeds
    assert [(a["id"], a["sample"]) for a in two["samples"]] == [(i, j) for j in range(3) for i in (one["samples"][0]["id"], one["samples"][1]["id"])]
    assert len({a["answer"] for a in two["samples"]}) > 2  # the extra answers are new draws


def test_perplexity_matches_the_model_loss(engine):
    text = "暮色压着青石镇的屋檐，细雨从黄昏一直下到掌灯时分。"
    ids = torch.tensor([engine.tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        loss = engine.model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(engine.model, engine.tokenizer, text) == pytest.approx(math.exp(loss), rel=1e-4)


def test_models_of_a_run(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "base")
    shutil.copytree(tiny_model_dir, run / "02-sft" / "model")
    (run / "03-mgrpo").mkdir()  # unfinished stage: no model yet
    assert [lb for lb, _ in models_of(run)] == ["base", "02-sft"]
    assert models_of(run / "base") == [("base", run / "base")]
    with pytest.raises(TifaError, match="neither a model folder"):
        models_of(tmp_path)


def test_a_run_is_evaluated_with_its_own_settings(tmp_path):
    """`tifa eval runs/NAME` without --config: the run's config.yaml (the settings the pipeline trained
    and evaluated with), not the defaults; a model folder or an explicit --config: as given."""
    from tifaforge.config import load_config
    from tifaforge.eval.report import run_config

    run = tmp_path / "run"
    (run / "01-cpt" / "model").mkdir(parents=True)
    (run / "01-cpt" / "manifest.json").write_text("{}")
    (run / "config.yaml").write_text("eval:\n  max_new_tokens: 7\n", encoding="utf-8")
    assert load_config(run_config(run, None)).eval.max_new_tokens == 7
    assert run_config(run, "other.yaml") == "other.yaml"
    assert run_config(run / "01-cpt" / "model", None) is None


def test_eval_writes_a_reproducible_report(trained_tiny_dir, tmp_path):
    cfg = EvalConfig(limit=3, max_new_tokens=8, bootstrap=50)
    a = run_eval(trained_tiny_dir, tmp_path / "a", cfg, SamplingConfig(), progress=False)
    b = run_eval(trained_tiny_dir, tmp_path / "b", cfg, SamplingConfig(), progress=False)
    ja = json.loads((tmp_path / "a" / "eval.json").read_text(encoding="utf-8"))
    assert ja == json.loads((tmp_path / "b" / "eval.json").read_text(encoding="utf-8"))
    label = trained_tiny_dir.name
    assert ja[label]["n"] == 3 and "perplexity" in ja[label]["metrics"]
    report = (tmp_path / "a" / "report.md").read_text(encoding="utf-8")
    assert "think-format rate" in report and "at most 8 new tokens" in report and a["table"] == b["table"]
    assert (tmp_path / "a" / "plots" / "eval_metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_split_means_the_same_in_mgrpo_mining_and_eval(tmp_path, tiny_model_dir):
    """A line without `split` is in "train" for MGRPO, DPO mining and eval alike; "" and "all" take
    every line; an empty split is an error naming the file and the config key."""
    from tifaforge.config import MiningConfig, MGRPOConfig, SamplingConfig
    from tifaforge.engine.generate import Engine
    from tifaforge.eval.metrics import load_prompts
    from tifaforge.stages.mgrpo import read_prompts
    from tifaforge.stages.mining import mine_shard

    p = tmp_path / "p.jsonl"
    lines = [{"id": "a", "messages": [{"role": "user", "content": "你好"}]},
             {"id": "b", "messages": [{"role": "user", "content": "说说雨。"}]},
             {"id": "c", "messages": [{"role": "user", "content": "说说风。"}], "split": "eval"}]
    p.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    assert [r.id for r in read_prompts(MGRPOConfig(prompts=str(p), split="train"))] == ["a", "b"]
    assert [r.id for r in load_prompts(EvalConfig(prompts=str(p), split="train"))[0]] == ["a", "b"]
    assert [r.id for r in load_prompts(EvalConfig(prompts=str(p), split="eval"))[0]] == ["c"]
    for every in ("", "all"):
        assert len(read_prompts(MGRPOConfig(prompts=str(p), split="all"))) == 3
        assert len(load_prompts(EvalConfig(prompts=str(p), split=every))[0]) == 3
    engine = Engine.load(tiny_model_dir, device="cpu")
    mining = MiningConfig(k=2, max_new_tokens=2, split="train")
    assert mine_shard(engine, p, mining, SamplingConfig(), progress=False)[2] == 2  # prompts in the split
    only_train = tmp_path / "train.jsonl"
    only_train.write_text(json.dumps(lines[0], ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(TifaError, match=r"train.jsonl: no prompts in split 'eval' \(eval.split; a line without"):
        load_prompts(EvalConfig(prompts=str(only_train)))
    with pytest.raises(TifaError, match=r"no prompts in split 'eval' \(mining.split"):
        mine_shard(engine, only_train, MiningConfig(split="eval"), SamplingConfig(), progress=False)
    with pytest.raises(TifaError, match=r"no prompts in split 'eval' \(mgrpo.split"):
        read_prompts(MGRPOConfig(prompts=str(only_train), split="eval"))


def test_unpenalised_repetition_is_measured_on_answers_made_without_penalties(trained_tiny_dir):
    import dataclasses

    from tifaforge.data.conversations import to_chat
    from tifaforge.engine.generate import Engine, Request
    from tifaforge.eval.metrics import evaluate, load_prompts
    from tifaforge.rewards.rules import ngram_repetition_rate

    engine = Engine.load(trained_tiny_dir, device="cpu")
    cfg = EvalConfig(limit=3, max_new_tokens=40, bootstrap=20, samples=2)
    plain = evaluate(engine, cfg, SamplingConfig(), progress=False)
    both = evaluate(engine, dataclasses.replace(cfg, unpenalised=True), SamplingConfig(), progress=False)
    assert [a["answer"] for a in both["samples"]] == [a["answer"] for a in plain["samples"]]  # first pass untouched
    assert "repetition_4gram_unpenalised" not in plain["metrics"]
    records, _ = load_prompts(cfg)
    off = dataclasses.replace(SamplingConfig(), repetition_penalty=1.0, max_new_tokens=40, seed=cfg.seed + 1 + 3)
    again = engine.generate([Request(engine.render(to_chat(records[1], cfg.user_name)), off)])[0]  # prompt 1, answer 1
    got = both["samples"][4]
    assert (got["id"], got["sample"]) == (records[1].id, 1)
    assert got["repetition_4gram_unpenalised"] == ngram_repetition_rate(again.content, 4)
    m = both["metrics"]["repetition_4gram_unpenalised"]
    vals = [a["repetition_4gram_unpenalised"] for a in both["samples"]]
    assert m["mean"] == pytest.approx(sum(vals) / len(vals)) and m["low"] <= m["mean"] <= m["high"]


def test_stage_effects_are_paired_by_prompt_and_seed():
    from tifaforge.eval.report import format_effects, stage_effects

    def model(values):  # 6 prompts x 2 answers of one metric
        return {"samples": [{"id": f"p{i}", "sample": j, "reward": v} for j in range(2) for i, v in enumerate(values)]}

    noisy = [0.1, 0.9, 0.3, 0.7, 0.2, 0.8]  # big spread between prompts ...
    results = {"a": model(noisy), "b": model([v + 0.05 for v in noisy]), "c": model(noisy[::-1])}
    effects = stage_effects(results, n_boot=300)
    up = effects["b vs a"]["reward"]
    assert up["mean"] == pytest.approx(0.05) and up["low"] == pytest.approx(0.05)  # ... but the same +0.05 on every slot
    mixed = effects["c vs b"]["reward"]
    assert mixed["low"] < 0 < mixed["high"]
    table = format_effects(effects)
    assert "| b vs a | **+0.05** ✓" in table and "| c vs b | -0.05 [" in table
    results["c"]["samples"] = results["c"]["samples"][:-1]  # not the same slots: nothing paired
    assert list(stage_effects(results, n_boot=50)) == ["b vs a"]


def test_eval_scores_with_the_run_s_reward_section(trained_tiny_dir):
    """The mean logic reward of the eval is the reward MGRPO trained on (the config's `reward`
    section), not the defaults: with only the think-format rule weighted, each answer's reward is its
    think-format score."""
    from tifaforge.engine.generate import Engine
    from tifaforge.eval.metrics import evaluate
    from tifaforge.rewards.literary import reward_with_user
    from tifaforge.config import RewardConfig

    engine = Engine.load(trained_tiny_dir, device="cpu")
    cfg = EvalConfig(limit=3, max_new_tokens=12, bootstrap=20, user_name="小林")
    only_format = RewardConfig(weights={"think_format": 1.0}, vetoes=[])
    default = evaluate(engine, cfg, SamplingConfig(), progress=False)
    run = evaluate(engine, cfg, SamplingConfig(), progress=False, reward=only_format)
    assert [a["answer"] for a in run["samples"]] == [a["answer"] for a in default["samples"]]
    assert [a["reward"] for a in run["samples"]] == [a["think_format"] for a in run["samples"]]
    assert [a["reward"] for a in run["samples"]] != [a["reward"] for a in default["samples"]]
    assert reward_with_user(only_format, "小林").user_name == "小林"  # the eval's user unless the section names one
    assert reward_with_user(RewardConfig(user_name="Sam"), "小林").user_name == "Sam"


def test_an_earlier_evaluation_is_reused_only_when_its_key_matches(trained_tiny_dir, tmp_path):
    """run_eval(reuse=...) takes an earlier result (the DPO stage's before/after) in place of generating,
    but only for the same settings and the same weight files."""
    import dataclasses
    import os

    cfg = EvalConfig(limit=2, max_new_tokens=6, bootstrap=20)
    label = trained_tiny_dir.name
    first = run_eval(trained_tiny_dir, tmp_path / "a", cfg, SamplingConfig(), progress=False)["results"][label]
    doctored = json.loads(json.dumps(first))
    doctored["metrics"]["reward"]["mean"] = 123.0  # a value no evaluation gives: shows which one was used
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(doctored), encoding="utf-8")

    same = run_eval(trained_tiny_dir, tmp_path / "b", cfg, SamplingConfig(), progress=False, reuse=(earlier,))
    assert same["results"][label]["metrics"]["reward"]["mean"] == 123.0
    other_seed = run_eval(trained_tiny_dir, tmp_path / "c", dataclasses.replace(cfg, seed=1), SamplingConfig(),
                          progress=False, reuse=(earlier,))
    assert other_seed["results"][label]["metrics"]["reward"]["mean"] != 123.0
    other_sampling = run_eval(trained_tiny_dir, tmp_path / "d", cfg, SamplingConfig(temperature=0.5),
                              progress=False, reuse=(earlier,))
    assert other_sampling["results"][label]["metrics"]["reward"]["mean"] != 123.0
    model = tmp_path / label
    shutil.copytree(trained_tiny_dir, model)
    for f in model.glob("*.safetensors"):  # rewritten weights (a retrained stage): a new mtime
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    retrained = run_eval(model, tmp_path / "e", cfg, SamplingConfig(), progress=False, reuse=(earlier,))
    assert retrained["results"][label]["metrics"]["reward"]["mean"] == first["metrics"]["reward"]["mean"]
    assert run_eval(trained_tiny_dir, tmp_path / "f", cfg, SamplingConfig(), progress=False,
                    reuse=(tmp_path / "missing.json",))["results"][label]["key"] == first["key"]
    from tifaforge.eval.metrics import eval_key
    from tifaforge.utils import REPO_ROOT as ROOT

    prompts = tmp_path / "prompts.jsonl"  # the same path with other prompts in it: another key
    shutil.copy(ROOT / "data/demo/prompts.jsonl", prompts)
    mine = dataclasses.replace(cfg, prompts=str(prompts))
    key = eval_key(trained_tiny_dir, mine, SamplingConfig())
    assert key == eval_key(trained_tiny_dir, mine, SamplingConfig())
    prompts.write_text(prompts.read_text(encoding="utf-8").replace("师姐", "师兄"), encoding="utf-8")
    assert key != eval_key(trained_tiny_dir, mine, SamplingConfig())

"""Long contexts: YaRN (`model.rope_scaling`) applied at load, saved in transformers' own form,
reloaded by plain transformers, exported to GGUF; llama.cpp's logits past the original window agree
with transformers'."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tifaforge.config import RopeScalingConfig
from tifaforge.errors import TifaError

YARN = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=64)


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def yarn_dir(trained_tiny_dir, tmp_path_factory):
    from tifaforge.models.load import load_model, save_model

    model, tok = load_model(trained_tiny_dir, device="cpu", rope_scaling=YARN)
    return save_model(model, tok, tmp_path_factory.mktemp("yarn") / "model")


def test_yarn_is_applied_saved_and_reloaded_by_plain_transformers(trained_tiny_dir, yarn_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from tifaforge.models.load import load_model

    plain = AutoModelForCausalLM.from_pretrained(str(yarn_dir)).eval()
    p = plain.config.rope_parameters
    assert (p["rope_type"], p["factor"], p["original_max_position_embeddings"]) == ("yarn", 4.0, 64)
    assert plain.config.max_position_embeddings == 256
    ids = tiny_tokenizer("暮色压着青石镇的屋檐，雨下了一夜。" * 12, add_special_tokens=False).input_ids[:150]
    ours, _ = load_model(trained_tiny_dir, device="cpu", rope_scaling=YARN)
    assert torch.equal(_logits(ours, ids), _logits(plain, ids))  # what was trained is what plain transformers runs
    base, _ = load_model(trained_tiny_dir, device="cpu")
    assert not torch.allclose(_logits(base, ids)[100:], _logits(plain, ids)[100:])  # the scaling does something
    again, _ = load_model(yarn_dir, device="cpu", rope_scaling=YARN)  # loading twice does not compound
    assert again.config.max_position_embeddings == 256 and again.config.rope_parameters["factor"] == 4.0


def test_a_model_without_rotary_embeddings_is_refused(tiny_model_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tifaforge.models.load import load_model

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=6000)).save_pretrained(str(folder))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / f, folder / f)
    with pytest.raises(TifaError, match="gpt2.*no rotary position embeddings"):
        load_model(folder, device="cpu", rope_scaling=YARN)


@pytest.mark.slow
def test_llama_cpp_agrees_with_transformers_past_the_original_window(yarn_dir, tiny_tokenizer, tmp_path):
    """The GGUF carries llama.cpp's rope-scaling keys, and llama.cpp's logits at positions 64..150
    (past the original window of 64) match transformers' (logits, not near-tie greedy text)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from tifaforge.export.gguf import export_gguf
    from tifaforge.models.gguf_file import open_llama

    path = export_gguf(yarn_dir, tmp_path / "yarn-f32.gguf", "f32", progress=False).path
    fields = gguf.GGUFReader(str(path)).fields
    value = lambda k: fields[k].parts[fields[k].data[0]][0]  # noqa: E731
    assert bytes(fields["qwen2.rope.scaling.type"].parts[-1]).decode() == "yarn"
    assert value("qwen2.rope.scaling.factor") == 4.0 and value("qwen2.rope.scaling.original_context_length") == 64
    ids = tiny_tokenizer("暮色压着青石镇的屋檐，雨下了一夜。" * 12, add_special_tokens=False).input_ids[:150]
    hf = _logits(AutoModelForCausalLM.from_pretrained(str(yarn_dir)).eval(), ids).numpy()
    llm = open_llama(path, n_ctx=256, logits_all=True)
    try:
        llm.eval(ids)
        lc = np.asarray(llm.scores[:len(ids)])
    finally:
        llm.close()
    spread = hf.max() - hf.min()
    assert np.abs(lc[64:] - hf[64:]).max() < 0.01 * spread, np.abs(lc[64:] - hf[64:]).max()
    assert (lc[64:].argmax(-1) == hf[64:].argmax(-1)).mean() > 0.95


def test_eval_long_reports_perplexity_by_position_and_recall(trained_tiny_dir, tmp_path, capsys):
    import json

    from tifaforge import cli

    assert cli.main(["eval", str(trained_tiny_dir), "--long", "--lengths", "256,512", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "long.json").read_text(encoding="utf-8"))
    buckets = res["perplexity_by_position"]
    assert len(buckets) == 8 and buckets[0]["from"] == 0 and buckets[-1]["to"] == 512
    assert all(0 < b["ppl"] < 1e5 for b in buckets)
    assert [r["length"] for r in res["recall"]] == [256, 512]
    for r in res["recall"]:
        assert 0 <= r["accuracy"] <= 1 and all(t <= r["length"] for t in r["prompt_tokens"])
    assert res["recall"][1]["prompt_tokens"][0] > res["recall"][0]["prompt_tokens"][0] + 50  # filler grew it
    assert (tmp_path / "long.png").stat().st_size > 1000 and "recall at 512 tokens" in capsys.readouterr().out
    for bad, words in (("99999", "past the model's context"), ("abc", "expected token counts"), ("8", "at least 64")):
        assert cli.main(["eval", str(trained_tiny_dir), "--long", "--lengths", bad, "--out", str(tmp_path)]) == 2
        assert words in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Long-context training: whole chapters, a length curriculum, long sessions trimmed in SFT


def test_cpt_trains_whole_chapters_shortest_pieces_first(tiny_model_dir, tmp_path):
    """Raw novels with `cpt.pack: chapters` and `cpt.length_curriculum: [16, 32]`: the rows are whole
    chapters up to max_length, and the trainer sees the curriculum's order (tokens per step rise with
    the phase: 16-token pieces, then 32, then whole rows), which a shuffled sampler would not give."""
    import json
    from pathlib import Path

    from tifaforge.config import load_config
    from tifaforge.stages import cpt

    novel = Path(__file__).resolve().parents[1] / "data" / "demo" / "novels" / "zh-campus-2.txt"
    text = novel.read_text(encoding="utf-8")
    (tmp_path / "novels").mkdir()
    (tmp_path / "novels" / "a.txt").write_text(text[:3000], encoding="utf-8")  # a few chapters
    cfg = load_config(None, [f"cpt.data={tmp_path / 'novels'}", "cpt.pack=chapters", "cpt.length_curriculum=[16, 32]",
                             "cpt.max_length=128", "cpt.batch_size=4", "cpt.steps=-1", "cpt.epochs=1",
                             "cpt.log_every=1", "cpt.samples_every=0", "cpt.save_every=100000", "cpt.warmup=0"])
    out = tmp_path / "01-cpt"
    cpt.run_stage(cfg, tiny_model_dir, out)
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["pack"] == "chapters" and stats["block_size"] == 128 and stats["chapters"]["kept"] > 2
    phases = json.loads((out / "curriculum.json").read_text())["phases"]
    assert [p["length"] for p in phases] == [16, 32, 128] and sum(p["tokens"] for p in phases) == stats["tokens"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    seen = [r["num_tokens"] for r in rows if "num_tokens" in r]
    per_step = np.diff([0, *seen])
    first = phases[0]["rows"] // 4  # whole steps of the first phase
    assert first >= 3 and per_step[:first].max() <= 4 * 16 < per_step[-2:].max()  # short pieces first, whole rows last


def test_sft_trims_a_long_session_to_its_latest_turns_and_orders_by_length(tmp_path, tiny_tokenizer):
    """`sft.too_long: trim` keeps the system prompt and the latest exchanges that fit (what the server
    shows the model of a long session) instead of dropping the example; `sft.length_curriculum` puts
    the short examples first."""
    import json

    from tifaforge.config import SFTConfig
    from tifaforge.train.data import sft_curriculum, sft_examples

    turns = [{"role": "system", "content": "你是林小满，一个爱说话的剑客。"}]
    for i in range(8):
        turns += [{"role": "user", "content": f"第{i}个问题：今天去哪里练剑？"},
                  {"role": "assistant", "content": f"<think>\n想一想第{i}个\n</think>\n\n去后山第{i}块石头旁。"}]
    short = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "<think>\n嗯\n</think>\n\n你好！"}]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": turns}, ensure_ascii=False) + "\n"
                    + json.dumps({"messages": short}, ensure_ascii=False) + "\n", encoding="utf-8")
    ds, chats = sft_examples(path, tiny_tokenizer, SFTConfig(max_length=160, per_turn=False, too_long="trim"))
    long_chat = max(chats, key=len)
    assert long_chat[0] == turns[0] and long_chat[1]["role"] == "user" and long_chat[-1] == turns[-1]
    assert 3 <= len(long_chat) < len(turns) and max(len(x) for x in ds["input_ids"]) <= 160
    assert turns[-4]["content"] in [m["content"] for m in long_chat] or len(long_chat) == 3  # the latest stay
    dropped, _ = sft_examples(path, tiny_tokenizer, SFTConfig(max_length=160, per_turn=False, too_long="drop"))
    assert len(dropped) == 1  # without trim the long session is lost
    every, _ = sft_examples(path, tiny_tokenizer, SFTConfig(max_length=512, per_turn=True))
    ordered, phases = sft_curriculum(every, [64, 256], 512, seed=0)
    sizes = [len(x) for x in ordered["input_ids"]]
    bounds = [next(i for i, b in enumerate([64, 256, 512]) if n <= b) for n in sizes]
    assert bounds == sorted(bounds) and len(set(bounds)) > 1 and sum(p["rows"] for p in phases) == len(every)


@pytest.mark.parametrize("lengths, why", [([32, 16], "must rise"), ([4], "at least 8"), ([64, 128], "shorter than max_length")])
def test_a_bad_length_curriculum_is_refused_before_any_work(tiny_model_dir, tmp_path, lengths, why):
    from tifaforge.config import load_config
    from tifaforge.stages import cpt

    cfg = load_config(None, [f"cpt.data={tmp_path}", f"cpt.length_curriculum={lengths}", "cpt.max_length=128"])
    with pytest.raises(TifaError, match=f"cpt.length_curriculum: .*{why}"):
        cpt.run_stage(cfg, tiny_model_dir, tmp_path / "out")

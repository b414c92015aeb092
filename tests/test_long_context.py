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

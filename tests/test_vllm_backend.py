"""The vLLM backend's parts that do not need a GPU: what it refuses, and the weights it pushes.

vLLM itself is CUDA-only and not part of `make setup`; `bench/gpu_check.py --vllm` runs this backend on a
GPU (greedy equal to the transformers engine, streaming, stop strings, seeds, pushed weights, MGRPO's
vLLM rollouts; README "GPU checks")."""

import argparse
import copy

import pytest
import torch

from tifaforge.config import LoopConfig, load_config
from tifaforge.engine.vllm_backend import VLLMEngine
from tifaforge.errors import MissingExtraError, TifaError
from tifaforge.models.load import load_model, save_model
from tifaforge.models.looping import apply_loop


def test_without_the_extra_the_error_names_it(trained_tiny_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a))
    with pytest.raises(MissingExtraError, match=r"pip install 'tifaforge\[vllm\]'"):
        VLLMEngine.load(trained_tiny_dir)


def test_a_looped_model_or_a_non_model_is_refused_before_vllm_loads(trained_tiny_dir, tmp_path):
    model, tok = load_model(trained_tiny_dir, device="cpu")
    save_model(apply_loop(model, LoopConfig(start=1, end=3, k=2)), tok, tmp_path / "looped")
    with pytest.raises(TifaError, match="looped model.*tifa export unroll"):
        VLLMEngine.load(tmp_path / "looped")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TifaError, match="transformers model folder"):
        VLLMEngine.load(tmp_path / "empty")


@pytest.mark.parametrize("raw,match", [("{not json", "not JSON"), ("[1, 2]", "JSON object")])
def test_bad_extra_vllm_arguments_are_named(trained_tiny_dir, monkeypatch, raw, match):
    monkeypatch.setenv("TIFA_VLLM_ARGS", raw)
    with pytest.raises(TifaError, match=rf"TIFA_VLLM_ARGS.*{match}|{match}"):
        VLLMEngine.load(trained_tiny_dir)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_weights_are_pushed_merged_under_the_plain_models_names(trained_tiny_dir, dtype):
    """What `load_policy` sends for a LoRA policy: every base weight, by the plain model's name, with
    the adapters merged in (as merge_and_unload), no LoRA tensor, and the policy left exactly as it was
    (merging in place and back would drift a bf16 base)."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(trained_tiny_dir, device="cpu")
    base = base.to(dtype)
    names = dict(base.named_parameters())
    policy = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            lora_dropout=0.0))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # B starts at zero: make the adapters change the weights
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    merged = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM here: record what would reach its load_weights
    sent = {}
    engine.load_weights = lambda pairs: sent.update({n: p.detach().clone() for n, p in pairs})
    for _ in range(3):
        engine.load_policy(policy)
    assert set(sent) == set(names)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    changed = sum(not torch.equal(sent[n], names[n]) for n in names)
    assert changed >= 4 * 7  # every linear layer of the 4 blocks moved
    for n in names:
        torch.testing.assert_close(sent[n], merged[n], atol=tol, rtol=0)
    for n, p in policy.named_parameters():
        assert torch.equal(p, before[n]), n


def test_mgrpo_vllm_rollouts_need_a_gpu_and_a_plain_policy(trained_tiny_dir, tmp_path, monkeypatch):
    from tifaforge.stages import mgrpo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only machine answers
    cfg = load_config(None, ["mgrpo.rollout_backend=vllm", "mgrpo.steps=1"])
    with pytest.raises(TifaError, match="needs a CUDA GPU"):
        mgrpo.run_stage(cfg, trained_tiny_dir, tmp_path / "run")
    looped = load_config(None, ["mgrpo.rollout_backend=vllm", "model.loop.start=1", "model.loop.end=3"])
    with pytest.raises(TifaError, match="cannot run a looped policy"):
        mgrpo.rollout_engine(trained_tiny_dir, looped.mgrpo, looped.model.loop, 0)


def test_the_chat_and_serve_commands_offer_the_vllm_backend():
    from tifaforge import cli
    from tifaforge.serve import app

    for add in (cli._chat_args, app.add_arguments):
        p = argparse.ArgumentParser()
        add(p)
        assert p.parse_args(["m", "--backend", "vllm"]).backend == "vllm"


@pytest.mark.parametrize("lora", [False, True])
def test_vllm_starts_from_the_policy_as_loaded_when_the_loader_grew_its_vocabulary(trained_tiny_dir, tmp_path, lora):
    """A tagless base gets the template tags from the loader (more embedding rows than its folder has):
    vLLM must start from the grown model, or the first weight push would not fit. A base that already
    has them is used as is."""
    from peft import LoraConfig, get_peft_model
    from test_train import _tagless_base

    from tifaforge.stages.mgrpo import vllm_start_folder

    plain, tok = load_model(trained_tiny_dir, device="cpu")
    assert vllm_start_folder(trained_tiny_dir, plain, tok, tmp_path / "a") == trained_tiny_dir
    base = _tagless_base(tmp_path / "base", tied=True)
    policy, tok = load_model(base, device="cpu")
    grown = policy.get_input_embeddings().weight.shape[0]
    if lora:
        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    folder = vllm_start_folder(base, policy, tok, tmp_path / "b")
    assert folder != base
    saved, _ = load_model(folder, device="cpu")
    assert saved.get_input_embeddings().weight.shape[0] == saved.config.vocab_size == grown
    source = policy.merge_and_unload() if lora else policy
    for (n, a), (_, b) in zip(source.named_parameters(), saved.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


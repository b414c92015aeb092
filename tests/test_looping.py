"""Looped layers (models/looping.py) and the unrolled export (export/unroll.py), at tiny size.

References: the base model (k = 1), the unrolled plain model loaded by plain transformers (k > 1),
uncached full forwards (cached generation), the unrolled model's per-copy gradients (backprop).
"""

import argparse
import copy
import json
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from tifaforge.config import ConfigError, LoopConfig, SamplingConfig, load_config
from tifaforge.engine.generate import Engine, Request
from tifaforge.errors import TifaError
from tifaforge.export import unroll
from tifaforge.fields import opt, section
from tifaforge.models import looping
from tifaforge.models.load import load_model, save_model
from tifaforge.models.looping import apply_loop, clip_and_check

TEXT = "长安城的夜晚很冷，你在屋顶上做什么？她推开窗，看见了雪。Tell me about the inn."


@pytest.fixture(scope="module")
def qwen(trained_tiny_dir):
    model, tok = load_model(trained_tiny_dir, device="cpu")
    return model, tok, torch.tensor([tok(TEXT, add_special_tokens=False).input_ids])


@pytest.fixture(scope="module")
def llama():
    """A random tiny Llama (3 layers); logits are compared with tolerances, never by argmax."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    return model, None, torch.randint(0, 300, (1, 23), generator=torch.Generator().manual_seed(1))


def looped(base, **kw):
    return apply_loop(copy.deepcopy(base), LoopConfig(**kw))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# ---------------------------------------------------------------------------------------------
# Forward: k = 1, k > 1 against the unrolled export


@pytest.mark.parametrize("arch", ["qwen", "llama"])
def test_k1_reproduces_the_base_logits_exactly(arch, request):
    base, _, ids = request.getfixturevalue(arch)
    for start, end in [(1, 3), (0, base.config.num_hidden_layers)]:
        assert torch.equal(logits(looped(base, start=start, end=end, k=1), ids), logits(base, ids))


def _payload(file):
    """Bytes of tensor data in a safetensors file (file size minus its JSON header)."""
    with open(file, "rb") as f:
        return file.stat().st_size - 8 - struct.unpack("<Q", f.read(8))[0]


def _block_bytes(folder, start, end):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(n).nbytes for n in f.keys()
                   if n.startswith("model.layers.") and start <= int(n.split(".")[2]) < end)


@pytest.mark.parametrize("k,scale", [(2, 1.0), (3, 0.7)])
def test_looped_equals_its_unrolled_export_loaded_by_plain_transformers(qwen, trained_tiny_dir, tmp_path,
                                                                        k, scale):
    base, tok, ids = qwen
    model = looped(base, start=1, end=3, k=k, residual_scale=scale)
    ours = logits(model, ids)
    assert (ours - logits(base, ids)).abs().max() > 0.1  # the loop changes the model
    report = unroll.export_unrolled(model, tok, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert type(plain).__name__ == "Qwen2ForCausalLM" and plain.config.num_hidden_layers == 4 + (k - 1) * 2
    torch.testing.assert_close(logits(plain, ids), ours, atol=1e-5, rtol=0)
    predicted = _payload(trained_tiny_dir / "model.safetensors") + (k - 1) * _block_bytes(trained_tiny_dir, 1, 3)
    assert _payload(tmp_path / "plain" / "model.safetensors") == predicted == report["bytes"]


def test_llama_looped_equals_unrolled_export(llama, tmp_path, tiny_tokenizer):
    base, _, ids = llama
    model = looped(base, start=1, end=2, k=3)
    unroll.export_unrolled(model, tiny_tokenizer, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.num_hidden_layers == 5
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Cached generation equals uncached


@pytest.mark.parametrize("arch", ["qwen", "llama"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_prompt_split_over_two_calls_then_decode_equals_one_full_forward(arch, k, request):
    base, _, ids = request.getfixturevalue(arch)
    model = looped(base, start=1, end=3 if arch == "qwen" else 2, k=k)
    cache = DynamicCache(config=model.config)  # what the Engine builds: sized for the physical layers
    cut = ids.shape[1] // 2
    steps = [logits(model, ids[:, :cut], cache=cache, use_cache=True),
             logits(model, ids[:, cut:cut + 3], cache=cache, use_cache=True)]
    steps += [logits(model, ids[:, i:i + 1], cache=cache, use_cache=True) for i in range(cut + 3, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), logits(model, ids), atol=1e-4, rtol=0)
    b = model.model.layers.cfg.end - model.model.layers.cfg.start
    assert len(cache.layers) == model.config.num_hidden_layers + (k - 1) * b  # one slot per (iteration, layer)


def _greedy_uncached(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(logits(model, torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def test_engine_greedy_on_left_padded_batch_equals_uncached(qwen):
    base, tok, _ = qwen
    model = looped(base, start=1, end=3, k=3)
    engine = Engine(model, tok)
    engine.stop_ids = set()  # exactly n tokens per row
    prompts = [tok(t, add_special_tokens=False).input_ids for t in ("你好，楚夜。", TEXT, "雪落在剑上，")]
    greedy = SamplingConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=8)
    results = engine.generate([Request(p, greedy) for p in prompts])
    for p, r in zip(prompts, results):
        assert r.token_ids == _greedy_uncached(model, p, 8)


def test_model_generate_cached_equals_uncached_left_padded(qwen):
    base, tok, _ = qwen
    model = looped(base, start=1, end=3, k=2)
    enc = tok(["你好，楚夜。", TEXT], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    assert (enc.attention_mask[0] == 0).any()  # the first row is left-padded
    kw = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(**enc, use_cache=True, **kw), model.generate(**enc, use_cache=False, **kw))


# ---------------------------------------------------------------------------------------------
# Gradients


def _plain_twin(model, tok, tmp_path):
    unroll.export_unrolled(model, tok, tmp_path / "twin")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "twin")


def _backward(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_grad", [0, 1, 2])
def test_shared_weight_gradient_is_the_sum_over_its_last_n_copies(qwen, tmp_path, n_grad):
    base, tok, ids = qwen
    k, start, end = 3, 1, 3
    model = looped(base, start=start, end=end, k=k, grad_iterations=n_grad)
    twin = _plain_twin(model, tok, tmp_path)
    ours, theirs = _backward(model.train(), ids), _backward(twin.train(), ids)
    counted = range(k) if n_grad == 0 else range(k - n_grad, k)
    for j in range(start, end):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            expect = sum(theirs[f"model.layers.{start + t * (end - start) + j - start}.{name}"] for t in counted)
            torch.testing.assert_close(ours[f"model.layers.{j}.{name}"], expect, atol=1e-6, rtol=1e-4)
    prelude = ours["model.layers.0.mlp.up_proj.weight"]
    if n_grad == 0:
        torch.testing.assert_close(prelude, theirs["model.layers.0.mlp.up_proj.weight"], atol=1e-6, rtol=1e-4)
    else:  # the early iterations ran without autograd: nothing before them gets a gradient
        assert prelude is None or not prelude.any()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(qwen, reentrant):
    base, _, ids = qwen
    model = looped(base, start=1, end=3, k=3, grad_iterations=2, residual_scale=0.7).train()
    plain = _backward(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt = _backward(model, ids)
    for name, g in plain.items():
        if g is None:
            assert ckpt[name] is None or not ckpt[name].any(), name
        else:
            torch.testing.assert_close(ckpt[name], g, atol=1e-6, rtol=1e-4)


def test_short_training_at_k4_stays_finite_with_clipping(qwen):
    base, _, ids = qwen
    model = looped(base, start=1, end=3, k=4).train()
    opt_ = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        total, block, ok = clip_and_check(model, 1.0)
        grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        clipped = torch.linalg.vector_norm(torch.stack(grads))
        assert ok and torch.isfinite(loss) and 0 < block <= total and clipped <= 1.0 + 1e-4
        opt_.step(), opt_.zero_grad(set_to_none=True)


def test_non_finite_gradients_are_cleared_and_reported(qwen):
    base, _, ids = qwen
    model = looped(base, start=1, end=3, k=2).train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.model.layers[2].mlp.up_proj.weight.grad[0, 0] = float("nan")
    before = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    total, block, ok = clip_and_check(model, 1.0)
    assert not ok and all(p.grad is None for p in model.parameters())
    torch.optim.AdamW(model.parameters(), lr=1.0).step()  # a step taken anyway changes nothing
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, before)


def test_lora_with_gradient_checkpointing_trains_a_looped_model_and_merges_into_the_export(qwen, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tok, ids = qwen
    model = looped(base, start=1, end=3, k=2, schedule="uniform", k_min=1, k_max=3, residual_scale=0.7)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft = get_peft_model(model, lora)
    peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft.enable_input_require_grads()
    peft.train()
    opt_ = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(6):
        looping.set_loop_step(peft, step)
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        assert clip_and_check(peft, 1.0)[2]
        assert peft.base_model.model.model.layers[2].self_attn.q_proj.lora_B.default.weight.grad.abs().sum() > 0
        opt_.step(), opt_.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in peft.base_model.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), n
    merged = peft.eval().merge_and_unload()
    plain = _plain_twin(merged, tok, tmp_path)
    torch.testing.assert_close(logits(plain, ids), logits(merged, ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Iteration counts in training


def test_iteration_schedules():
    fixed = LoopConfig(start=0, end=1, k=3)
    assert {looping.iterations_for_step(fixed, s, d) for s in range(5) for d in range(5)} == {3}
    uni = LoopConfig(start=0, end=1, schedule="uniform", k_min=2, k_max=4)
    draws = [looping.iterations_for_step(uni, s, d) for s in range(30) for d in range(3)]
    assert set(draws) == {2, 3, 4}
    assert draws == [looping.iterations_for_step(uni, s, d) for s in range(30) for d in range(3)]  # reproducible
    cur = LoopConfig(start=0, end=1, schedule="curriculum", k_min=1, k_max=5, ramp_steps=100)
    assert {looping.iterations_for_step(cur, 0, d) for d in range(20)} == {1}
    assert max(looping.iterations_for_step(cur, 50, d) for d in range(50)) == 3
    assert {looping.iterations_for_step(cur, 400, d) for d in range(80)} == {1, 2, 3, 4, 5}


def test_training_forward_runs_the_drawn_k_and_eval_runs_k(qwen):
    base, _, ids = qwen
    model = looped(base, start=1, end=3, k=2, schedule="uniform", k_min=1, k_max=4, seed=7)
    calls = []
    model.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    model.train()
    looping.set_loop_step(model, 5)
    seen = []
    for d in range(6):
        calls.clear()
        model(input_ids=ids)
        seen.append(len(calls))
    assert seen == [looping.iterations_for_step(model.model.layers.cfg, 5, d) for d in range(6)]
    model.eval()
    calls.clear()
    logits(model, ids)
    assert len(calls) == 2


def test_trainer_callback_sets_the_step(qwen):
    model = looped(qwen[0], start=1, end=3, k=2)
    looping.trainer_callback().on_step_begin(None, argparse.Namespace(global_step=42), None, model=model)
    assert model.model.layers.step == 42


# ---------------------------------------------------------------------------------------------
# Saving, loading, exporting


def test_save_reload_identical_and_plain_transformers_refuses(qwen, tmp_path):
    base, tok, ids = qwen
    model = looped(base, start=1, end=3, k=3, residual_scale=0.7, grad_iterations=2)
    save_model(model, tok, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "tifaforge_looped_qwen2" and saved["tifaforge"]["loop"]["k"] == 3
    with pytest.raises(ValueError, match="tifaforge_looped_qwen2"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    again, _ = looping.load_looped(tmp_path / "m")
    assert again.model.layers.cfg == model.model.layers.cfg
    assert torch.equal(logits(again, ids), logits(model, ids))
    assert torch.equal(logits(copy.deepcopy(again), ids), logits(model, ids))  # TRL copies reference models
    assert looping.saved_base_config(tmp_path / "m").model_type == "qwen2"
    assert looping.saved_base_config(tmp_path / "nothing") is None


def test_remove_loop_gives_back_the_base(qwen, tmp_path):
    base, tok, ids = qwen
    model = looping.remove_loop(looped(base, start=1, end=3, k=3))
    assert torch.equal(logits(model, ids), logits(base, ids)) and "loop" not in model.config.tifaforge
    save_model(model, tok, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "qwen2"


def test_export_unroll_command(qwen, tmp_path, tiny_model_dir, capsys):
    base, tok, ids = qwen
    model = looped(base, start=1, end=3, k=2)
    save_model(model, tok, tmp_path / "m")
    assert unroll.run(argparse.Namespace(model=str(tmp_path / "m"), out=str(tmp_path / "u"), k=3)) == 0
    assert "8 layers" in capsys.readouterr().out
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    three = looped(base, start=1, end=3, k=3)
    torch.testing.assert_close(logits(plain, ids), logits(three, ids), atol=1e-5, rtol=0)
    with pytest.raises(TifaError, match="no loop"):
        unroll.run(argparse.Namespace(model=str(tiny_model_dir), out=str(tmp_path / "x"), k=None))
    with pytest.raises(TifaError, match="--k"):
        unroll.run(argparse.Namespace(model=str(tmp_path / "m"), out=str(tmp_path / "x"), k=0))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kw,match", [
    (dict(start=2, end=9), "not inside the model's 4 layers"),
    (dict(start=3, end=1), "not inside"),
    (dict(start=1, end=3, k=0), "k: must be at least 1"),
    (dict(start=1, end=3, schedule="uniform", k_min=3, k_max=2), "k_min"),
])
def test_bad_loop_settings_are_clear_errors(qwen, kw, match):
    with pytest.raises(TifaError, match=match):
        looped(qwen[0], **kw)


def test_unsupported_architecture_and_mixed_attention_types():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TifaError, match="support Qwen2 and Llama.*gpt2"):
        apply_loop(gpt2, LoopConfig(start=0, end=1))
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
                      max_window_layers=2)
    with pytest.raises(TifaError, match="mix attention types"):
        apply_loop(Qwen2ForCausalLM(cfg), LoopConfig(start=1, end=3))


def test_loop_config_section_validates_through_the_config_loader(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Model:
        loop: LoopConfig = section(LoopConfig, "looped layers")
        name: str = opt("x", "unused")

    f = tmp_path / "c.yaml"
    f.write_text("loop:\n  start: 1\n  end: 3\n  k: 0\n")
    with pytest.raises(ConfigError, match="line 4: key 'loop.k': 0 is out of range"):
        load_config(f, cls=Model)
    f.write_text("loop:\n  start: 1\n  end: 3\n  schedule: curriculum\n")
    assert load_config(f, cls=Model).loop == LoopConfig(start=1, end=3, schedule="curriculum")
    with pytest.raises(TifaError, match="unknown key"):
        looping.loop_config({"start": 1, "end": 2, "iterations": 3})
    with pytest.raises(TifaError, match="k must be int"):
        looping.loop_config({"start": 1, "end": 2, "k": "3"})


def test_load_model_restores_a_saved_loop(trained_tiny_dir, tmp_path):
    """tifaforge's own loader (every command's) brings the loop back; plain transformers refuses it."""
    import torch
    from transformers import AutoModelForCausalLM

    from tifaforge.models.load import load_model, save_model
    from tifaforge.models.looping import apply_loop, get_loop
    from tifaforge.config import LoopConfig

    model, tok = load_model(trained_tiny_dir, device="cpu")
    cfg = LoopConfig(start=1, end=3, k=3)
    apply_loop(model, cfg)
    ids = torch.tensor([tok("楚夜站在屋顶上，", add_special_tokens=False).input_ids])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_model(model, tok, tmp_path / "looped")
    again, _ = load_model(tmp_path / "looped", device="cpu")
    assert get_loop(again).cfg == cfg
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)
    with pytest.raises(Exception, match="tifaforge_looped"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "looped")

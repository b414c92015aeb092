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
from tifaforge.export import check
from tifaforge.export import gguf as export
from tifaforge.models.gguf_file import open_llama, read_gguf

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
    ours = read_gguf(exported[quant])  # the validating reader agrees with gguf's own
    assert [(t.name, t.type, t.offset, t.nbytes) for t in ours.tensors] == \
           [(t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]


def test_metadata_read_back(exported, tiny_tokenizer):
    from tifaforge.chat.template import serving_template

    md = read_gguf(exported["q8_0"]).metadata
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
    assert md["tokenizer.chat_template"] == serving_template("ascii")  # the seed's, with the serving rules


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


@pytest.fixture(scope="module")
def llama_tiny_dir(trained_tiny_dir, tmp_path_factory) -> Path:
    """The trained tiny Qwen2 as a LlamaForCausalLM computing the same function (Llama with attention
    biases, o_proj's zero), so llama.cpp runs Llama's graph and the writer's q/k rope reordering, which
    Qwen2 does not need, on a small model too."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    qwen = AutoModelForCausalLM.from_pretrained(str(trained_tiny_dir), dtype=torch.float32)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    llama = LlamaForCausalLM(LlamaConfig(**{k: getattr(qwen.config, k) for k in keep}, attention_bias=True))
    missing, unexpected = llama.load_state_dict(qwen.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("o_proj.bias") for k in missing)
    for layer in llama.model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
    out = tmp_path_factory.mktemp("llama") / "model"
    llama.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(trained_tiny_dir / name, out / name)
    return out


def _rounded(model, quant: str):
    """A copy of `model` with each weight rounded to the type the writer gives it in a `quant` file."""
    qtype = export.PY_QUANTS[quant][0]
    copy = type(model)(model.config).eval()
    state = {}
    for name, w in model.state_dict().items():
        kind, a = export._tensor_type(tuple(w.shape), qtype), w.numpy()
        if kind == Q.F16:
            a = a.astype(np.float16)
        elif kind != Q.F32:
            a = gguf.quants.dequantize(gguf.quants.quantize(a, kind), kind)
        state[name] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    copy.load_state_dict(state)
    return copy


@pytest.mark.parametrize(("arch", "quant"), [("qwen2", "f32"), ("qwen2", "f16"), ("qwen2", "q8_0"), ("llama", "q8_0")])
def test_llamacpp_agrees_with_transformers_within_rounding(exported, trained_tiny_dir, llama_tiny_dir, tmp_path,
                                                           arch, quant):
    """llama.cpp's logits equal transformers' within what the file's rounding explains, so its greedy
    tokens are the reference's wherever the reference's top-1 margin is wider than that error could
    close. Nothing rests on the fixture's exact weights: a briefly trained model has near-ties (margins
    of a few hundredths) that q8_0, or another CPU's kernels, may legitimately flip. A wrong tensor
    order or a missing rope reordering is off by whole logits, wrong token types tokenize otherwise:
    both fail."""
    from transformers import AutoModelForCausalLM

    folder = trained_tiny_dir if arch == "qwen2" else llama_tiny_dir
    path = exported[quant] if arch == "qwen2" else \
        export.export_gguf(folder, tmp_path / f"{arch}-{quant}.gguf", quant, progress=False).path
    report = check.check_gguf(path, folder)
    assert report.prompts == len(check.CHECK_CONVERSATIONS) and report.tokenization_equal and report.template_equal

    # The error that rounding the weights alone makes, on the prompts and continuations compared.
    # llama.cpp also rounds the activations entering each q8_0 product to 8 bits per block of 32 (about
    # as much again) and keeps its KV cache in f16 (0.002 with f32 weights): 4x plus 0.01 leaves 3x or
    # more to spare (measured: q8_0 0.057 against 0.041 for the weights alone, f16 0.003 against 0.001).
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    rounded = _rounded(model, quant)
    weights_only = max(float(np.abs(check._hf_logits(rounded, ids) - check._hf_logits(model, ids)).max())
                       for ids in (r.prompt + r.ref for r in report.results))
    bound = 4 * weights_only + 0.01
    assert report.max_abs_logit <= bound, (report.max_abs_logit, weights_only)

    decided = 0
    for r in report.results:
        sure = r.margin > 2 * bound  # no error within the bound can change the argmax here
        assert (r.llama_argmax[sure] == np.asarray(r.ref)[sure]).all()
        first_unsure = len(sure) if sure.all() else int(np.argmin(sure))
        assert r.ours[:first_unsure] == r.ref[:first_unsure]  # greedy: the same tokens up to the first near-tie
        decided += int(sure.sum())
    assert decided >= 0.5 * sum(len(r.ref) for r in report.results)  # the bound is tight enough to decide most


@pytest.mark.parametrize("quant", ("q4_0", "q4_k_m"))
def test_llamacpp_4bit_agreement_reported(exported, trained_tiny_dir, quant, capsys):
    report = check.check_gguf(exported[quant], trained_tiny_dir)
    with capsys.disabled():
        print(f"\n{quant}: greedy {report.greedy_equal}/{report.prompts}, top-1 {report.top1:.1%}, "
              f"max |dlogit| {report.max_abs_logit:.3f}")
    assert report.top1 >= 0.8 and report.tokenization_equal and report.template_equal


def test_llamacpp_tokenizes_like_ours(exported, tiny_tokenizer):
    texts = [*check.CHECK_TEXTS, "“你好，”她说。", "1234567890 3.14", "\n\n\n", "　全角空格", "<think>\n嗯</think>\n答"]
    llm = open_llama(exported["q8_0"])
    try:
        for text in texts:
            ours = tiny_tokenizer(text, add_special_tokens=False).input_ids
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours, text
            assert llm.detokenize(ours, special=True).decode() == text
    finally:
        llm.close()


def test_file_template_renders_like_ours(exported, tiny_tokenizer):
    from tifaforge.chat.template import render

    info = read_gguf(exported["f16"])
    conversations = [*check.CHECK_CONVERSATIONS, [{"role": "system", "content": "旁白"}, {"role": "user", "content": "a"},
                                                   {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
    for conv in conversations:
        assert check._render_file_template(info, conv) == render(conv, tiny_tokenizer, add_generation_prompt=True)


def test_check_against_the_file_itself(exported):
    """No reference: transformers' GGUF loader reads the same (quantised) weights."""
    report = check.check_gguf(exported["q4_0"])
    assert report.top1 >= 0.95 and report.tokenization_equal is None
    assert "q4_0" in report.lines()[0].lower()


# --------------------------------------------------------------------------------------------
# K-quants, LoRA, runs, atomic writes


def test_k_quant_types_come_from_llama_cpp(exported):
    types = {t.type for t in read_gguf(exported["q4_k_m"]).tensors}
    assert {Q.Q4_K, Q.Q6_K} <= types and read_gguf(exported["q4_k_m"]).metadata["general.file_type"] == 15


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
    """The report and its verdict. The f32 file, whose logits are within 0.002 of the reference's: its
    verdict is decided by construction (q8_0's agreement is the test above's, with its bound)."""
    import argparse
    import re

    p = argparse.ArgumentParser()
    export.add_arguments(p)
    assert export.run(p.parse_args(["--check", str(exported["f32"]), "--reference", str(trained_tiny_dir)])) == 0
    out = capsys.readouterr().out
    assert re.search(r"^greedy +[0-4]/4 prompts token-for-token equal$", out, re.M)
    assert re.search(r"^top-1 +(9\d\.\d|100\.0)% agreement", out, re.M)
    assert "tokenization  equal" in out and "template      equal" in out and out.endswith("check         ok\n")


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
        read_gguf(path)
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
        check.check_gguf(bad)


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


def _patched(data: bytes, at: bytes, patch: bytes, skip: int = 0, start: int = 0) -> bytes:
    """`data` with `patch` written `skip` bytes after the first `at` found from `start`."""
    i = data.index(at, start) + skip
    return data[:i] + patch + data[i + len(patch):]


def _tiny_file(*kvs: tuple[str, int, bytes]) -> bytes:
    """A GGUF with these (key, value type, value bytes) and no tensors."""
    body = b"".join(struct.pack("<Q", len(k.encode())) + k.encode() + struct.pack("<I", t) + v for k, t, v in kvs)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + body


def _nested(depth: int) -> bytes:
    """An array holding an array ... `depth` levels, then one uint32."""
    return struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQI", 4, 1, 7)


_ATTN_K_SHAPE = len(b"blk.0.attn_k.weight") + 4  # its dimensions, after the name and their count
# What gguf.GGUFReader alone reads wrongly (a short string, a byte-swapped file, a nest without end,
# overlapping or broken tensors) or refuses with a bare KeyError/ValueError: name -> (bad file, message)
_READER_FAULTS = {
    "truncated string": (lambda d: _tiny_file(("x", 8, struct.pack("<Q", 100) + b"0123456789")), "run past the end"),
    "big-endian": (lambda d: _patched(d, b"GGUF", struct.pack(">I", 3), 4), "version 50331648"),
    "duplicate key": (lambda d: _patched(d, b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.bos_token_id"),
                      "Duplicate tokenizer.ggml.bos_token_id"),
    "duplicate tensor": (lambda d: _patched(d, b"blk.0.attn_k.weight", b"blk.0.attn_q.weight"),
                         "'blk.0.attn_q.weight' appears twice"),
    "overlapping tensors": (lambda d: _patched(d, b"blk.0.attn_k.weight", struct.pack("<Q", 0), _ATTN_K_SHAPE + 16 + 4),
                            "overlaps another"),
    "rows a block does not divide": (lambda d: _patched(d, b"blk.0.attn_k.weight", struct.pack("<Q", 250),
                                                        _ATTN_K_SHAPE), r"shape \[250, 128\], whose rows a Q8_0 block \(32\)"),
    "zero dimensions": (lambda d: _patched(d, b"blk.0.attn_k.weight", struct.pack("<I", 0), _ATTN_K_SHAPE - 4),
                        "0 dimensions"),
    "key not UTF-8": (lambda d: _patched(d, b"general.architecture", b"\xff"), "not UTF-8"),
    "value not UTF-8": (lambda d: _patched(d, b"qwen2", b"\xff", start=d.index(b"general.architecture")), "not UTF-8"),
    "unknown element type": (lambda d: _patched(d, b"tokenizer.ggml.tokens", struct.pack("<I", 99),
                                                len(b"tokenizer.ggml.tokens") + 4), "unknown element type 99"),
    "arrays nested three deep": (lambda d: _tiny_file(("x", 9, _nested(3))), "nested more than two deep"),
    "a nest 100000 deep": (lambda d: _tiny_file(("x", 9, _nested(100_000))), "nested more than two deep"),
    "alignment not a power of two": (lambda d: _tiny_file(("general.alignment", 4, struct.pack("<I", 48))), "power of two"),
    "alignment of the wrong type": (lambda d: _tiny_file(("general.alignment", 10, struct.pack("<Q", 32))), "general.alignment"),
}


@pytest.mark.parametrize("name", list(_READER_FAULTS))
def test_what_gguf_reader_alone_misses_is_rejected(exported, tmp_path, name):
    make, message = _READER_FAULTS[name]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(make(exported["q8_0"].read_bytes()))
    assert str(bad) in _rejected(bad, message)


def test_nested_and_empty_arrays_read_as_written(tmp_path):
    """GGUFReader's own `contents()` flattens nested arrays and types an empty one as nothing."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(_tiny_file(("x", 9, _nested(2)), ("y", 9, struct.pack("<IQ", 4, 0)),
                                ("z", 9, struct.pack("<IQ", 8, 0))))
    md = read_gguf(path).metadata
    assert [a.tolist() for a in md["x"]] == [[7]] and md["y"].dtype == np.uint32 and md["y"].size == 0 and md["z"] == []


@pytest.mark.parametrize(("etype", "n", "item"), [(0, 2**20, b"\0"), (8, 2**17, struct.pack("<Q", 0))])
def test_a_long_array_costs_memory_in_proportion_to_its_bytes(tmp_path, etype, n, item):
    """A valid 1 MiB file: a million one-byte numbers, or 128k empty strings. gguf.GGUFReader alone makes
    a numpy view per element (two per string): 300x and 70x the file's bytes, seconds of work."""
    import tracemalloc

    path = tmp_path / "long.gguf"
    path.write_bytes(_tiny_file(("x", 9, struct.pack("<IQ", etype, n) + item * n)))
    tracemalloc.start()
    t = time.monotonic()
    md = read_gguf(path).metadata
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(md["x"]) == n and time.monotonic() - t < 5 and peak < 8 * 2**20


def test_random_header_corruption_never_escapes_as_another_error(exported, tmp_path):
    data = exported["q4_0"].read_bytes()
    header_end = read_gguf(exported["q4_0"]).tensors[0].offset
    rng = random.Random(0)
    bad = tmp_path / "fuzz.gguf"
    for _ in range(60):
        mutated = bytearray(data[:header_end + 64])  # the header plus a little data: keeps each try fast
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        bad.write_bytes(bytes(mutated))
        try:
            read_gguf(bad)
        except TifaError as e:
            assert "\n" not in str(e)


def test_dequantised_tensor_bytes_match_the_table(exported):
    """Offsets from the validating reader point at the right bytes: dequantise one tensor from them."""
    info = read_gguf(exported["q8_0"])
    t = next(t for t in info.tensors if t.name == "blk.0.ffn_up.weight")
    raw = np.fromfile(exported["q8_0"], dtype=np.uint8, count=t.nbytes, offset=t.offset)
    values = gguf.quants.dequantize(raw.reshape(t.shape[0], -1), t.type)
    reader = gguf.GGUFReader(exported["f32"])
    ref = next(r for r in reader.tensors if r.name == t.name).data
    assert values.shape == ref.shape and np.abs(values - ref).max() < 0.02


# --------------------------------------------------------------------------------------------
# SmolLM2-135M (Llama architecture, 30 layers): HF folder -> GGUF -> llama.cpp


def test_smollm2_round_trip_through_llama_cpp(smollm2_hf_dir, tmp_path):
    """Llama's q/k rope reordering, a GPT-2-regex tokenizer and a ChatML template, all checked at once."""
    path = export.export_gguf(smollm2_hf_dir, tmp_path / "smollm2-f16.gguf", "f16", progress=False).path
    md = read_gguf(path).metadata
    assert (md["general.architecture"], md["llama.block_count"], md["tokenizer.ggml.pre"]) == ("llama", 30, "gpt-2")
    report = check.check_gguf(path, smollm2_hf_dir, n_tokens=12)
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
    assert read_gguf(path).metadata["qwen2.block_count"] == 6  # 4 layers, the block of 2 twice
    ids = tok("楚夜站在屋顶上，", add_special_tokens=False).input_ids
    llm = open_llama(path)
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


def test_check_fails_on_non_finite_weights_and_shows_nan(trained_tiny_dir, tmp_path):
    """A weight set to NaN: --check names the tensor and fails, and the logit delta reads NaN (Python's
    max() used to drop it and print 0 at 0% agreement)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(trained_tiny_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    path = export.export_gguf(folder, tmp_path / "nan.gguf", "f32", progress=False).path
    report = check.check_gguf(path, n_tokens=4)
    assert report.nonfinite == ["blk.0.ffn_down.weight"] and not report.ok(0.0)
    text = "\n".join(report.lines())
    assert "1 tensor(s) hold NaN or Inf: blk.0.ffn_down.weight" in text and "max |Δlogit| nan" in text
    assert check.nonfinite_tensors(export.export_gguf(trained_tiny_dir, tmp_path / "ok.gguf", "q8_0",
                                                      progress=False).path) == []


def test_check_names_a_chat_template_the_sandbox_refuses(trained_tiny_dir, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(trained_tiny_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for f in folder.glob("chat_template.j*"):
        f.write_text(config["chat_template"], encoding="utf-8")
    path = export.export_gguf(folder, tmp_path / "evil.gguf", "f32", progress=False).path
    with pytest.raises(TifaError, match=r"evil.gguf: tokenizer.chat_template cannot be rendered \(SecurityError"):
        check.check_gguf(path, n_tokens=2)

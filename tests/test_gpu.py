"""The GPU paths, on a CUDA machine: bf16 training stages and engine generation; the vLLM backend and
MGRPO's vLLM rollouts. Marked `gpu`: `make test` deselects them (`-m "not gpu"`), so CI, which has no
GPU, neither runs nor skips them.

    .venv/bin/python -m pytest -m gpu -s tests/test_gpu.py     # or: python bench/gpu_check.py [--vllm]

Each test prints the figures it measured (run with -s to see them; docs/gpu.md has those measured).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cuda():
    import torch

    assert torch.cuda.is_available(), "no CUDA device: the gpu tests run on a CUDA machine"
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    return torch


@pytest.fixture(scope="module")
def gpu_out(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu")


@pytest.fixture(scope="module")
def gpu_base(cuda, gpu_out):
    from tifaforge.models.presets import init_model

    return init_model("tiny", gpu_out / "base")


@pytest.fixture(scope="module")
def gpu_sft(gpu_base, gpu_out):
    cpt = check_stage("cpt", gpu_base, gpu_out, ["cpt.steps=30", "cpt.batch_size=16", "cpt.samples_every=0"])
    return check_stage("sft", cpt, gpu_out, ["sft.steps=30", "sft.batch_size=16", "sft.samples_every=0"])


@pytest.fixture(scope="module")
def vllm_cpt(cuda, gpu_base, gpu_out):
    pytest.importorskip("vllm")
    return raw_cpt(gpu_base, gpu_out / "raw-cpt")


def test_cpt_and_sft_train_on_cuda_in_bf16(gpu_sft):
    assert (gpu_sft / "config.json").exists()


def test_engine_on_cuda_in_bf16(gpu_sft):
    check_engine(gpu_sft)


def test_mgrpo_on_cuda(gpu_sft, gpu_out):
    check_stage("mgrpo", gpu_sft, gpu_out, ["mgrpo.steps=3"])


def test_vllm_engine(vllm_cpt, gpu_base):
    check_vllm(vllm_cpt, gpu_base)


def test_mgrpo_with_vllm_rollouts(vllm_cpt, gpu_out):
    check_mgrpo_vllm(vllm_cpt, gpu_out)


# ---------------------------------------------------------------------------------------------
# The checks


def check_engine(model_dir: Path) -> None:
    import torch

    from tifaforge.config import SamplingConfig
    from tifaforge.engine.generate import Engine, Request

    engine = Engine.load(model_dir)  # dtype auto: bfloat16 on CUDA
    assert engine.model.device.type == "cuda" and engine.model.dtype == torch.bfloat16, (engine.model.device, engine.model.dtype)
    prompts = [engine.render([{"role": "user", "content": f"第{i}个问题：你好。"}]) for i in range(8)]
    greedy = SamplingConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=32)
    ours = engine.generate([Request(prompts[0], greedy)])[0]
    enc = engine.tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False).to("cuda")
    ref = engine.model.generate(**enc, do_sample=False, max_new_tokens=32, repetition_penalty=1.0,
                                eos_token_id=sorted(engine.stop_ids), pad_token_id=engine.tokenizer.pad_token_id)
    ref_ids = [t for t in ref[0, enc.input_ids.shape[1]:].tolist() if t not in engine.stop_ids]
    same = ours.token_ids == ref_ids[: len(ours.token_ids)]
    engine.stop_ids = set()
    s = SamplingConfig(max_new_tokens=128, seed=0, dry_multiplier=0.8)
    engine.generate([Request(p, s) for p in prompts])  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = engine.generate([Request(p, s) for p in prompts])
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"engine cuda bf16: greedy equals model.generate: {same}; batch 8 x 128 tokens with DRY: "
          f"{sum(r.completion_tokens for r in out) / dt:.0f} tok/s")
    assert same


def check_stage(name: str, model_dir: Path, out: Path, sets: list[str]) -> Path:
    import importlib

    from tifaforge.config import load_config

    cfg = load_config(ROOT / "configs/tiny.yaml", sets)
    t = time.perf_counter()
    mod = importlib.import_module(f"tifaforge.stages.{name}")
    model = mod.run_stage(cfg, model_dir, out / name)
    dt = time.perf_counter() - t
    import json

    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"stage {name} on cuda: {dt:.1f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else f"stage {name}: {dt:.1f}s")
    return model


def raw_cpt(base: Path, out: Path, steps: int = 300) -> Path:
    """Plain next-token training on the bundled demo texts (no TRL: runs on the GPU image's packages), so
    the vLLM checks compare a model whose logits are not the near-ties of random weights."""
    import torch

    from tifaforge.models.load import load_model, save_model

    model, tok = load_model(base, dtype="float32", device="cuda")
    demo = ROOT / "src/tifaforge/assets/demo"
    text = "\n".join((demo / f).read_text(encoding="utf-8") for f in ("novel_zh.txt", "roleplay_zh.txt", "passages_zh.txt"))
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    blocks = ids[: len(ids) // 129 * 129].view(-1, 129)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for step in range(steps):
        b = blocks[torch.randint(len(blocks), (32,), generator=g)].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in (0, steps - 1):
            print(f"raw CPT step {step + 1}: loss {loss.item():.3f}")
    print(f"raw CPT {steps} steps of 32 x 129 tokens: {time.perf_counter() - t:.1f}s")
    return save_model(model.eval(), tok, out)


def check_vllm(cpt: Path, base: Path) -> None:
    """The vLLM backend against the transformers engine (both fp32, so greedy paths can be compared
    token for token), streaming, stop strings, seeds, refused samplers, and pushed weights."""
    import torch

    from tifaforge.config import SamplingConfig
    from tifaforge.engine.generate import Engine, Request
    from tifaforge.engine.vllm_backend import VLLMEngine
    from tifaforge.errors import TifaError

    problems: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            print(f"CHECK FAILED: {what}")
            problems.append(what)

    hf = Engine.load(cpt, dtype="float32")
    t = time.perf_counter()
    v = VLLMEngine(cpt, dtype="float32", gpu_memory_utilization=0.25)
    print(f"vLLM engine up in {time.perf_counter() - t:.1f}s (fp32, context {v.context})")
    prompts = [v.render([{"role": "system", "content": "你是沈清雅，一位说话温柔的剑客。"},
                         {"role": "user", "content": q}])
               for q in ("你好。", "今天去哪里？", "你的剑叫什么名字？", "给我讲一个故事。", "我们什么时候出发？",
                         "你害怕吗？", "山那边有什么？", "晚饭吃什么？")]
    greedy = SamplingConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=48)
    a = hf.generate([Request(p, greedy) for p in prompts])
    b = v.generate([Request(p, greedy) for p in prompts])
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b))
    prefix = [next((k for k, (s, u) in enumerate(zip(x.token_ids, y.token_ids)) if s != u),
                   min(len(x.token_ids), len(y.token_ids))) for x, y in zip(a, b)]
    print(f"vLLM greedy == transformers greedy (fp32, 8 prompts x 48 tokens): {same}/8 rows identical; "
          f"common prefix per row {prefix}; finish {[r.finish_reason for r in b]}")
    expect(same >= 6, "vLLM greedy disagrees with the transformers engine")
    # streaming concatenates to the non-streaming text, one final delta per request
    pieces: dict[int, str] = {}
    ends = {}
    for d in v.stream([Request(p, greedy) for p in prompts[:4]]):
        pieces[d.index] = pieces.get(d.index, "") + d.text
        if d.finish_reason:
            ends[d.index] = d.finish_reason
    expect([pieces.get(i) for i in range(4)] == [r.text for r in b[:4]] and len(ends) == 4, "stream != generate")
    # a stop string cuts exactly, and the request stops there
    longest = max(b, key=lambda r: len(r.text))
    expect(len(longest.text) >= 4, f"greedy answers too short for a stop-string check: {longest.text!r}")
    stop = longest.text[len(longest.text) // 2: len(longest.text) // 2 + 2] or "。"
    cut = v.generate([Request(prompts[b.index(longest)], greedy, stop=[stop])])[0]
    expect(cut.finish_reason == "stop" and cut.text == longest.text[: longest.text.find(stop)],
           f"stop string {stop!r}: {cut.text!r} ({cut.finish_reason})")
    # seeds: the same seed repeats, another differs
    s = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=48, seed=7)
    r1, r2 = (v.generate([Request(p, s) for p in prompts]) for _ in range(2))
    r3 = v.generate([Request(p, dataclasses.replace(s, seed=8)) for p in prompts])
    expect([r.token_ids for r in r1] == [r.token_ids for r in r2], "the same seed gave other tokens")
    expect([r.token_ids for r in r1] != [r.token_ids for r in r3], "another seed gave the same tokens")
    try:
        v.generate([Request(prompts[0], dataclasses.replace(s, dry_multiplier=0.8))])
        expect(False, "DRY was not refused")
    except TifaError as e:
        print(f"vLLM refuses DRY: {e}")
    # pushed weights: the random base's weights in, then the trained ones back; greedy follows each
    base_model, _ = __import__("tifaforge.models.load", fromlist=["load_model"]).load_model(base, dtype="float32", device="cuda")
    hb = Engine(base_model, hf.tokenizer).generate([Request(p, greedy) for p in prompts[:4]])
    v.load_weights(base_model.named_parameters())
    vb = v.generate([Request(p, greedy) for p in prompts[:4]])
    v.load_weights(hf.model.named_parameters())
    back = v.generate([Request(p, greedy) for p in prompts])
    nb = sum(x.token_ids == y.token_ids for x, y in zip(hb, vb))
    print(f"vLLM after load_weights(random base): {nb}/4 rows equal transformers on the base; "
          f"trained weights back: {sum(x.token_ids == y.token_ids for x, y in zip(back, b))}/8 rows as before")
    expect(nb >= 3 and [r.token_ids for r in back] == [r.token_ids for r in b], "pushed weights not served")
    # throughput: 64 sampled answers of 128 tokens, this vLLM engine vs ours on the same fp32 weights
    speed = SamplingConfig(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=128, seed=0)
    many = [v.render([{"role": "user", "content": f"第{i}个问题：今天去哪里？"}]) for i in range(64)]
    rates = {}
    for name, e in (("transformers", hf), ("vllm", v)):
        e.stop_ids = set()
        e.generate([Request(q, speed) for q in many[:8]])  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = e.generate([Request(q, speed) for q in many])
        torch.cuda.synchronize()
        rates[name] = sum(r.completion_tokens for r in out) / (time.perf_counter() - t)
    print(f"batch 64 x 128 tokens, fp32: transformers engine {rates['transformers']:.0f} tok/s, "
          f"vLLM {rates['vllm']:.0f} tok/s ({rates['vllm'] / rates['transformers']:.1f}x)")
    assert not problems, problems


def check_mgrpo_vllm(model: Path, out: Path) -> None:
    """MGRPO with vLLM rollouts against transformers rollouts, each in its own process, same updates."""
    import json
    import os
    import subprocess

    times = {}
    for backend in os.environ.get("GPU_CHECK_MGRPO", "transformers,vllm").split(","):
        folder = out / f"mgrpo-{backend}"
        code = ("import sys; sys.path.insert(0, 'src'); from tifaforge.config import load_config; "
                "from tifaforge.stages import mgrpo; "
                f"cfg = load_config('configs/tiny.yaml', ['mgrpo.steps=4', 'mgrpo.rollout_backend={backend}', "
                "'mgrpo.prompts_per_step=8', 'mgrpo.group_size=8', 'mgrpo.max_new_tokens=128']); "
                f"mgrpo.run_stage(cfg, {str(model)!r}, {str(folder)!r})")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=os.environ)
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
        times[backend] = sum(gaps) / len(gaps)
        print(f"MGRPO 4 updates (8 prompts x G 8, 128 tokens) with {backend} rollouts: {time.perf_counter() - t:.1f}s "
              f"process, {times[backend]:.2f} s/update after the first; reward/pass1 "
              f"{[round(r['reward/pass1'], 3) for r in rows]}")
    if len(times) == 2:
        print(f"MGRPO s/update, vLLM rollouts vs transformers: {times['transformers'] / times['vllm']:.2f}x faster")

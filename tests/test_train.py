"""Stages 1 and 2 on the tiny preset: CPT loss falls, SFT learns the think format, checkpoints are
trusted (marker last, rotation after, torn ones skipped), NaN steps are skipped and reported, bad
input is refused with one clear line."""

from __future__ import annotations

import json
import math
import logging
import shutil
from pathlib import Path

import pytest

from tifaforge.config import load_config
from tifaforge.errors import TifaError
from tifaforge.train import checkpoints as ckpt

ROOT = Path(__file__).resolve().parents[1]
NOVELS = ROOT / "data" / "demo" / "novels"

# A few small steps: 4 sequences of 64 tokens each.
CPT_SMALL = ["cpt.steps=8", "cpt.batch_size=4", "cpt.max_length=64", "cpt.learning_rate=0.003", "cpt.warmup=0",
             "cpt.lr_scheduler=constant", "cpt.save_every=2", "cpt.keep_last=2", "cpt.log_every=1",
             "cpt.samples_every=4", "cpt.sample_prompts=1", "cpt.sample_max_new_tokens=8"]


def cfg_with(*overrides: str):
    return load_config(None, list(overrides))


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_tokenizer) -> Path:
    """The demo novels packed into 64-token blocks by `tifa data novels`' library function."""
    from tifaforge.data.novels import ingest_novels

    out = tmp_path_factory.mktemp("packed") / "novels"
    ingest_novels([NOVELS], out, tiny_tokenizer, block_size=64, progress=False)
    return out


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory, packed, tiny_model_dir) -> Path:
    """One finished 8-step CPT run (shared by the tests that read its outputs; copy it to modify)."""
    from tifaforge.stages import cpt

    out = tmp_path_factory.mktemp("cpt") / "01-cpt"
    cpt.run_stage(cfg_with(*CPT_SMALL, f"cpt.data={packed}"), tiny_model_dir, out)
    return out


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# CPT


def test_cpt_loss_falls_and_outputs_are_complete(cpt_run):
    losses = [r["loss"] for r in metric_rows(cpt_run) if "loss" in r]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    for name in ("loss.png", "learning_rate.png"):
        assert (cpt_run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (cpt_run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [4, 8] and all(s["text"] for s in samples)
    assert load_config(cpt_run / "config.yaml").cpt.steps == 8


def test_cpt_model_loads_in_plain_transformers(cpt_run):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cpt_run / "model")
    assert not (cpt_run / "model" / "training_args.bin").exists()  # no pickles in model/
    last = ckpt.latest_complete(cpt_run / "checkpoints")
    trained = AutoModelForCausalLM.from_pretrained(last)
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_torch_compile_trains_and_saves_a_plain_model(packed, tiny_model_dir, tmp_path):
    """`torch_compile: true` reaches the Trainer (inductor compiles the model: bench/train.py's MFU
    figure needs it) and model/ still loads in plain transformers with trained, finite weights
    (no `_orig_mod.` names from the compiled wrapper)."""
    import torch
    import torch._dynamo
    from transformers import AutoModelForCausalLM

    from tifaforge.stages import cpt

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = tmp_path / "01-cpt"
    cpt.run_stage(cfg_with(*CPT_SMALL, "cpt.steps=3", "cpt.samples_every=0", "cpt.save_every=3",
                           "cpt.torch_compile=true", f"cpt.data={packed}"), tiny_model_dir, out)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the forward was compiled
    losses = [r["loss"] for r in metric_rows(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.state_dict().keys() == start.state_dict().keys()
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)
    torch._dynamo.reset()


def test_keep_last_after_complete(cpt_run):
    steps = [s for s, _ in ckpt.checkpoint_dirs(cpt_run / "checkpoints")]
    assert steps == [6, 8]  # keep_last=2 of saves at 2, 4, 6, 8
    for _, folder in ckpt.checkpoint_dirs(cpt_run / "checkpoints"):
        assert ckpt.torn_reason(folder) is None
        assert json.loads((folder / ckpt.MARKER).read_text())["files"]["optimizer.pt"] > 0


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_torn_checkpoint_is_skipped_with_a_message(cpt_run, tmp_path, caplog):
    root = tmp_path / "checkpoints"
    shutil.copytree(cpt_run / "checkpoints", root)
    (root / "checkpoint-8" / ckpt.MARKER).unlink()  # killed before the marker
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_complete(root) == root / "checkpoint-6"
    assert "skipping torn checkpoint" in caplog.text and "checkpoint-8" in caplog.text
    # a file cut short after the marker was written is torn too
    with (root / "checkpoint-6" / "optimizer.pt").open("r+b") as f:
        f.truncate(100)
    assert "optimizer.pt has 100 bytes" in ckpt.torn_reason(root / "checkpoint-6")
    assert ckpt.latest_complete(root) is None


def test_a_checkpoint_corrupted_at_the_same_size_is_never_resumed(cpt_run, tmp_path, caplog):
    """complete.json records every file's SHA-256: a byte flipped after the save (same size) makes
    resume skip that checkpoint, naming the file, and fall back to the newest intact one."""
    root = tmp_path / "checkpoints"
    shutil.copytree(cpt_run / "checkpoints", root)
    weights = root / "checkpoint-8" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert ckpt.torn_reason(root / "checkpoint-8") is None  # sizes alone (what rotation checks) pass
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_complete(root) == root / "checkpoint-6"
    assert "checkpoint-8: model.safetensors is corrupt: its content changed since it was written" in caplog.text


def test_resume_with_nothing_to_resume_says_so(tmp_path, tiny_model_dir, capsys):
    """`tifa train ... --resume` on a folder with no complete checkpoint says so before starting over."""
    from tifaforge.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("name: r\n", encoding="utf-8")
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["train", "sft", str(config), "--out", str(out), "--model", str(tiny_model_dir), "--resume",
                 "--set", "sft.steps=1", "--set", "sft.batch_size=1", "--set", "sft.max_length=512",
                 "--set", "sft.samples_every=0", "--set", "sft.data=" + str(ROOT / "data/demo/sft.jsonl")]) == 0
    assert f"sft: --resume: nothing to resume in {out} (no checkpoints): starting from the beginning" in \
        capsys.readouterr().err


def test_rotation_never_deletes_before_a_newer_complete_one(tmp_path):
    root = tmp_path
    for step in (2, 4):
        (root / f"checkpoint-{step}").mkdir()
        (root / f"checkpoint-{step}" / "w").write_bytes(b"x" * step)
        ckpt.mark_complete(root / f"checkpoint-{step}", step)
    (root / "checkpoint-6").mkdir()  # being written: no marker yet
    assert ckpt.rotate(root, keep_last=1) == [root / "checkpoint-2"]
    assert [s for s, _ in ckpt.checkpoint_dirs(root)] == [4, 6]


def test_resume_continues_from_latest_complete(cpt_run, tmp_path, tiny_model_dir):
    """Resume a copy whose newest checkpoint is torn: it restarts from 6, rewrites 8, and the
    metrics read as one run."""
    from tifaforge.stages import cpt

    out = tmp_path / "01-cpt"
    shutil.copytree(cpt_run, out)
    shutil.rmtree(out / "model")
    (out / "checkpoints" / "checkpoint-8" / ckpt.MARKER).unlink()
    cfg = load_config(out / "config.yaml")
    with pytest.raises(TifaError, match="pass --resume"):
        cpt.run_stage(cfg, tiny_model_dir, out, resume=False)
    cpt.run_stage(cfg, tiny_model_dir, out, resume=True)
    steps = [r["step"] for r in metric_rows(out) if "loss" in r]
    assert steps == list(range(1, 9))
    assert ckpt.torn_reason(out / "checkpoints" / "checkpoint-8") is None


def test_resume_refuses_a_changed_config(cpt_run, tmp_path, tiny_model_dir):
    from tifaforge.stages import cpt

    out = tmp_path / "01-cpt"
    shutil.copytree(cpt_run, out)
    cfg = load_config(out / "config.yaml", ["cpt.learning_rate=0.01", "cpt.log_every=3"])
    with pytest.raises(TifaError, match=r"config changed .*cpt\.learning_rate 0\.003 -> 0\.01"):
        cpt.run_stage(cfg, tiny_model_dir, out, resume=True)


# ---------------------------------------------------------------------------------------------
# Non-finite steps


def nan_at(steps: set[int]):
    """A callback that makes the embeddings NaN during the given (1-based) steps."""
    from transformers import TrainerCallback

    class InjectNaN(TrainerCallback):
        hook = None

        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step + 1 in steps:
                emb = model.get_input_embeddings()
                self.hook = emb.register_forward_hook(lambda m, i, out: out * float("nan"))

        def on_step_end(self, args, state, control, **kw):
            if self.hook is not None:
                self.hook.remove()
                self.hook = None

    return InjectNaN()


def test_nan_step_is_skipped_reported_and_never_checkpointed(packed, tiny_model_dir, tmp_path, caplog):
    import torch
    from safetensors.torch import load_file

    from tifaforge.stages import cpt

    out = tmp_path / "01-cpt"
    cfg = cfg_with(*CPT_SMALL, f"cpt.data={packed}", "cpt.steps=4", "cpt.save_every=1", "cpt.keep_last=4",
                   "cpt.samples_every=0")
    with caplog.at_level(logging.WARNING):
        cpt.run_stage(cfg, tiny_model_dir, out, extra_callbacks=(nan_at({3}),))
    assert "step 3: non-finite gradient" in caplog.text and "skipped" in caplog.text
    events = [r for r in metric_rows(out) if r.get("event")]
    assert [(e["step"], e["event"]) for e in events] == [(3, "nonfinite_step_skipped")]
    assert [s for s, _ in ckpt.checkpoint_dirs(out / "checkpoints")] == [1, 2, 4]
    w2 = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    w4 = load_file(out / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w4.values())
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)  # step 4 trained normally


def test_repeated_nan_stops_the_stage_naming_the_step(packed, tiny_model_dir, tmp_path):
    from tifaforge.stages import cpt

    cfg = cfg_with(*CPT_SMALL, f"cpt.data={packed}", "cpt.steps=6", "cpt.max_nonfinite_steps=2",
                   "cpt.samples_every=0")
    with pytest.raises(TifaError, match=r"cpt: step 3: non-finite loss or gradient for 2 consecutive steps"):
        cpt.run_stage(cfg, tiny_model_dir, tmp_path / "01-cpt", extra_callbacks=(nan_at({2, 3, 4, 5, 6}),))
    assert not (tmp_path / "01-cpt" / "model").exists()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_dataset_from_another_tokenizer_is_refused(packed, tmp_path, tiny_tokenizer, tiny_model_dir):
    """Novels packed with a different (smaller) BPE: ids are in range, but mean other text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tifaforge.data.novels import ingest_novels
    from tifaforge.stages import cpt

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    from tifaforge.models.presets import corpus_text

    raw.train_from_iterator(corpus_text().split("\n\n"), trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"]))
    other = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    ingest_novels([NOVELS], tmp_path / "other", other, block_size=64, progress=False)
    cfg = cfg_with(*CPT_SMALL, f"cpt.data={tmp_path / 'other'}")
    with pytest.raises(TifaError, match="built with another tokenizer"):
        cpt.run_stage(cfg, tiny_model_dir, tmp_path / "01-cpt")


def test_same_tokenizer_round_trips(packed, tiny_tokenizer):
    from datasets import load_from_disk

    from tifaforge.train.data import round_trip_agreement

    assert round_trip_agreement(load_from_disk(str(packed)), tiny_tokenizer) > 0.9


def test_empty_and_out_of_range_datasets_are_refused(tmp_path, tiny_tokenizer):
    from datasets import Dataset

    from tifaforge.train.data import cpt_dataset

    Dataset.from_dict({"input_ids": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(TifaError, match=r"empty \(0 blocks\)"):
        cpt_dataset(str(tmp_path / "empty"), tiny_tokenizer, 64, tmp_path / "x")
    Dataset.from_dict({"input_ids": [[1, 2, 99999]]}).save_to_disk(str(tmp_path / "wide"))
    with pytest.raises(TifaError, match=r"token id 99999 is outside this tokenizer's \d+ ids"):
        cpt_dataset(str(tmp_path / "wide"), tiny_tokenizer, 64, tmp_path / "x")
    with pytest.raises(TifaError, match=r"longer than cpt.max_length=2"):
        cpt_dataset(str(tmp_path / "wide"), tiny_tokenizer, 2, tmp_path / "x")
    with pytest.raises(TifaError, match="no such dataset"):
        cpt_dataset(str(tmp_path / "missing"), tiny_tokenizer, 64, tmp_path / "x")


def test_bf16_on_a_cpu_without_support_is_refused(monkeypatch, packed, tiny_model_dir, tmp_path):
    from tifaforge.stages import cpt
    from tifaforge.train import device as train_config

    monkeypatch.setattr(train_config, "cpu_bf16_supported", lambda: False)
    cfg = cfg_with(*CPT_SMALL, f"cpt.data={packed}", "cpt.dtype=bfloat16", "cpt.device=cpu")
    with pytest.raises(TifaError, match=r"cpt.dtype: bfloat16 asked, but this CPU has no bf16 support"):
        cpt.run_stage(cfg, tiny_model_dir, tmp_path / "01-cpt")
    assert train_config.check_precision(cfg.cpt.__class__(device="cpu"), "cpt") == "fp32"  # auto -> fp32 on CPU


# ---------------------------------------------------------------------------------------------
# SFT


DIALOGUES = [
    ("你好", "打招呼", "你好呀，今天想聊点什么？"),
    ("今天天气怎么样", "聊天气", "外面晴朗，微风正好。"),
    ("给我讲个故事", "讲故事", "从前有座山，山里有座庙。"),
    ("你叫什么名字", "自我介绍", "我叫小满，是云岚宗的弟子。"),
]


def write_dialogues(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": u},
                          {"role": "assistant", "content": f"<think>\n{t}\n</think>\n\n{a}"}]}
            for u, t, a in DIALOGUES]
    # one two-turn dialogue: it expands into two examples
    rows.append({"messages": rows[0]["messages"] + rows[1]["messages"]})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sft_loss_mask_is_the_final_assistant_turn(tmp_path, tiny_tokenizer):
    from tifaforge.config import SFTConfig
    from tifaforge.train.data import sft_examples

    ds, chats = sft_examples(write_dialogues(tmp_path / "d.jsonl"), tiny_tokenizer, SFTConfig(max_length=512))
    assert len(ds) == 6  # 4 one-turn dialogues + a two-turn one expanded per turn
    row = ds[5]
    kept = [t for t in row["labels"] if t != -100]
    text = tiny_tokenizer.decode(kept)
    assert text == f"<think>\n{DIALOGUES[1][1]}\n</think>\n\n{DIALOGUES[1][2]}<|end▁of▁sentence|>"
    first = row["labels"].index(kept[0])
    assert all(t == -100 for t in row["labels"][:first])  # the earlier turns and the prompt: no loss
    assert tiny_tokenizer.decode(row["input_ids"][first - 1]) == "<|Assistant|>"


def test_sft_too_long_examples_are_dropped_or_refused(tmp_path, tiny_tokenizer):
    from tifaforge.config import SFTConfig
    from tifaforge.train.data import sft_examples

    path = write_dialogues(tmp_path / "d.jsonl")
    with pytest.raises(TifaError, match=r"d\.jsonl: line 1: \d+ tokens, longer than sft.max_length=20"):
        sft_examples(path, tiny_tokenizer, SFTConfig(max_length=20, too_long="error"))
    with pytest.raises(TifaError, match="all 6 examples are longer"):
        sft_examples(path, tiny_tokenizer, SFTConfig(max_length=8))


@pytest.mark.slow
def test_sft_learns_the_think_format(tmp_path, trained_tiny_dir):
    import torch

    from tifaforge.engine.generate import Engine
    from tifaforge.stages import sft

    cfg = cfg_with(f"sft.data={write_dialogues(tmp_path / 'd.jsonl')}", "sft.steps=60", "sft.batch_size=6",
                   "sft.max_length=128", "sft.learning_rate=0.003", "sft.warmup=0", "sft.lr_scheduler=constant",
                   "sft.save_every=60", "sft.log_every=10", "sft.samples_every=60", "sft.sample_prompts=2")
    model_dir = sft.run_stage(cfg, trained_tiny_dir, tmp_path / "02-sft")
    engine = Engine.load(model_dir, device="cpu")
    greedy = cfg.sampling.__class__(do_sample=False, repetition_penalty=1.0, max_new_tokens=32)
    tok = engine.tokenizer
    for user, think, answer in DIALOGUES[:3]:
        r = engine.chat([{"role": "user", "content": user}], greedy)
        assert r.text.startswith("<think>\n") and r.reasoning, r.text  # it opens and fills a think block
        # Teacher-forced: the trained target (think block, answer, end tag) is the model's top-1 token at
        # almost every position. Measured on the whole target rather than one greedy text, which a single
        # near-tie (another CPU's float kernels) would send elsewhere from that token on.
        prompt = tok(engine.render([{"role": "user", "content": user}]), add_special_tokens=False).input_ids
        target = tok(f"<think>\n{think}\n</think>\n\n{answer}{tok.eos_token}", add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            top = engine.model(input_ids=ids).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert sum(a == b for a, b in zip(top, target)) >= 0.9 * len(target), (user, tok.decode(top))


def test_lora_stage_saves_a_merged_plain_model(packed, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tifaforge.stages import cpt

    cfg = cfg_with(*CPT_SMALL, f"cpt.data={packed}", "cpt.steps=2", "cpt.samples_every=2", "cpt.lora.enabled=true",
                   "cpt.lora.r=4", "cpt.lora.alpha=8")
    out = cpt.run_stage(cfg, tiny_model_dir, tmp_path / "01-cpt")
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # adapters on the linear layers only
    assert (tmp_path / "01-cpt" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Shipped configs


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("tiny-*.yaml")), ids=lambda p: p.name)
def test_stage_configs_load(path):
    cfg = load_config(path)
    assert cfg.cpt.steps > 0 or cfg.sft.steps > 0


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(path))
    nodes = 2 if "2x8" in path.name else 1
    assert (c.num_machines, c.num_processes, c.mixed_precision) == (nodes, 8 * nodes, "bf16")
    assert c.distributed_type.value == ("DEEPSPEED" if "zero3" in path.name else "FSDP")
    if c.distributed_type.value == "DEEPSPEED":
        assert c.deepspeed_config["zero_stage"] == 3
    else:
        assert c.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"


def test_base_model_is_a_folder_or_a_preset_built_once(tmp_path):
    from tifaforge.train.stage import resolve_base

    cfg = cfg_with()
    with pytest.raises(TifaError, match="model.base: nope: no such model folder or file"):
        resolve_base("nope", tmp_path, cfg)
    built = resolve_base("tiny", tmp_path, cfg)
    assert built == tmp_path / "base" and (built / "model.safetensors").exists()
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert resolve_base("tiny", tmp_path, cfg) == built and (built / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_base(str(built), tmp_path / "other", cfg) == built


def test_launcher_reruns_the_stage_under_accelerate(tmp_path):
    import argparse

    from tifaforge.train import stage

    p = argparse.ArgumentParser()
    stage.stage_arguments(p)
    args = p.parse_args(["c.yaml", "--launcher", "accelerate", "--accelerate-config", "configs/accelerate/zero3-1x8.yaml",
                         "--resume", "--set", "sft.steps=5"])
    cmd = stage.launch_command(args, "sft", tmp_path / "out", tmp_path / "base")
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    i = cmd.index("tifaforge.stages.sft")
    assert cmd[i + 1:] == ["c.yaml", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "base"), "--resume",
                           "--set", "sft.steps=5"]


def test_a_looped_cpt_stage_saves_a_looped_model(packed, tiny_model_dir, tmp_path):
    """`model.loop` in a stage's config: the block runs k times while training (sampled k advanced by
    the step callback) and the stage's model/ keeps the loop for every later stage and command."""
    from transformers import AutoModelForCausalLM

    from tifaforge.models.load import load_model
    from tifaforge.models.looping import get_loop
    from tifaforge.stages import cpt

    cfg = cfg_with(*CPT_SMALL, f"cpt.data={packed}", "cpt.steps=3", "cpt.samples_every=0",
                   "model.loop.start=1", "model.loop.end=3", "model.loop.schedule=uniform", "model.loop.k_max=3")
    out = cpt.run_stage(cfg, tiny_model_dir, tmp_path / "01-cpt")
    model, _ = load_model(out, device="cpu")
    loop = get_loop(model)
    assert loop is not None and (loop.cfg.start, loop.cfg.end, loop.cfg.schedule) == (1, 3, "uniform")
    rows = [r for r in metric_rows(tmp_path / "01-cpt") if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert all(0 < r["loop_grad_norm"] < math.inf for r in rows)  # the looped block's norm, logged apart
    with pytest.raises(Exception, match="tifaforge_looped"):
        AutoModelForCausalLM.from_pretrained(out)


# ---------------------------------------------------------------------------------------------
# Priming the tags the loader added to a base that lacked them (train/prime.py)


def _tagless_base(folder: Path, tied: bool) -> Path:
    """A random Qwen2 base whose tokenizer has no template tags (like SmolLM2 or a Qwen2.5 base)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from tifaforge.models.load import save_model

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    text = (ROOT / "data" / "demo" / "en" / "sft.jsonl").read_text(encoding="utf-8")
    raw.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                                        max_position_embeddings=2048))
    return save_model(base, tok, folder)


@pytest.mark.parametrize("tied", [True, False])
def test_new_tags_are_primed_where_the_sft_data_puts_them(tmp_path, tied):
    import torch

    from tifaforge.chat.template import training_tokens
    from tifaforge.data.conversations import check_file, to_chat
    from tifaforge.models.load import load_model
    from tifaforge.train.prime import prime_new_tokens

    model, tok = load_model(_tagless_base(tmp_path / "base", tied), device="cpu")
    records, _ = check_file(ROOT / "data" / "demo" / "en" / "sft.jsonl", "sft")
    examples = []
    for r in records[:20]:
        ids, mask = training_tokens(to_chat(r, "Sam"), tok)
        examples.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    train, held_out = examples[:16], examples[16:]
    tags = ["<think>", "</think>", tok.eos_token]
    tag_ids = tok.convert_tokens_to_ids(tags)
    head_before = model.get_output_embeddings().weight.detach().clone()
    emb_before = model.get_input_embeddings().weight.detach().clone()

    def top_at_tags(exs) -> dict:
        hits = dict.fromkeys(tags, 0)
        with torch.no_grad():
            for ex in exs:
                pred = model(torch.tensor([ex["input_ids"]])).logits[0, :-1].argmax(-1)
                for tag, tid in zip(tags, tag_ids):
                    at = torch.tensor(ex["input_ids"][1:]) == tid
                    hits[tag] += int((pred[at] == tid).sum())
        return hits

    assert top_at_tags(held_out) == dict.fromkeys(tags, 0)  # a mean row is never the top token
    report = prime_new_tokens(model, tok, train)
    assert set(report) == set(tags) and all(v["top_after"] > v["top_before"] for v in report.values())
    after = top_at_tags(held_out)
    assert all(after[t] >= 3 for t in tags), after  # 4 held-out examples: each tag occurs once in each
    changed = (model.get_output_embeddings().weight != head_before).any(-1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(tag_ids)  # only the primed rows moved
    if not tied:  # untied: the input rows stay as the loader made them
        assert torch.equal(model.get_input_embeddings().weight, emb_before)
    assert sorted(model.config.tifaforge["primed_tokens"]) == sorted(tags)
    assert prime_new_tokens(model, tok, train) == {}  # once per model


def test_sft_stage_primes_a_tagless_base_once(tmp_path):
    import json as _json

    from tifaforge.stages import sft

    base = _tagless_base(tmp_path / "base", tied=True)
    sets = ["sft.data=" + str(ROOT / "data" / "demo" / "en" / "sft.jsonl"), "sft.steps=1", "sft.batch_size=2",
            "sft.max_length=1024", "sft.save_every=1", "sft.samples_every=0", "sft.user_name=Sam"]
    sft.run_stage(cfg_with(*sets), base, tmp_path / "02-sft")
    record = _json.loads((tmp_path / "02-sft" / "model" / "config.json").read_text())["tifaforge"]
    assert sorted(record["primed_tokens"]) == sorted(["<think>", "</think>", "<|end▁of▁sentence|>"])
    off = cfg_with(*sets, "sft.prime_new_tokens=false")
    sft.run_stage(off, base, tmp_path / "plain")
    assert "primed_tokens" not in _json.loads((tmp_path / "plain" / "model" / "config.json").read_text())["tifaforge"]


@pytest.mark.parametrize("tied", [True, False])
def test_lora_sft_keeps_the_primed_and_trained_tag_rows_in_the_merged_model(tmp_path, tied):
    """LoRA on all linear layers never trains the embeddings, and the merge reloads the base (the tags
    back at the loader's mean rows): the tags' rows are trained as peft trainable tokens, so model/
    holds them primed and trained; every other embedding and head row is the base's."""
    import torch
    from transformers import AutoModelForCausalLM

    from tifaforge.models.load import load_model
    from tifaforge.stages import sft

    base = _tagless_base(tmp_path / "base", tied=tied)
    sets = ["sft.data=" + str(ROOT / "data" / "demo" / "en" / "sft.jsonl"), "sft.steps=2", "sft.batch_size=2",
            "sft.max_length=1024", "sft.save_every=2", "sft.samples_every=0", "sft.user_name=Sam",
            "sft.lora.enabled=true", "sft.lora.r=4", "sft.lora.alpha=8", "sft.learning_rate=0.01"]
    out = sft.run_stage(cfg_with(*sets), base, tmp_path / "02-sft")
    loaded, tok = load_model(base, device="cpu")  # what the merge starts from: the tags at the mean rows
    merged = AutoModelForCausalLM.from_pretrained(out)
    added = loaded.config.tifaforge["added_tokens"]
    ids = tok.convert_tokens_to_ids(added)
    primed = tok.convert_tokens_to_ids(["<think>", "</think>", tok.eos_token])
    for layer in ("get_input_embeddings", "get_output_embeddings"):
        new, old = getattr(merged, layer)().weight, getattr(loaded, layer)().weight
        moved = (new != old).any(-1).nonzero().flatten().tolist()
        assert set(moved) <= set(ids), layer  # only tag rows differ from the base
        assert set(primed) <= set(moved), layer  # the tags the data asks for were primed / trained
    assert merged.get_output_embeddings().weight[primed].sub(loaded.get_output_embeddings().weight[primed]).norm() > 0


def test_qlora_is_refused_before_any_model_loads_where_it_cannot_run(tmp_path):
    """QLoRA needs adapters, a CUDA GPU and bitsandbytes: each missing one is a one-line error naming
    the setting, raised before a model is read (the base folder here does not even exist)."""
    from tifaforge.errors import TifaError
    from tifaforge.stages import mgrpo, sft

    nowhere = tmp_path / "no-model"
    with pytest.raises(TifaError, match=r"sft.lora.quantize 4bit: a 4-bit base cannot be trained itself; enable LoRA"):
        sft.run_stage(cfg_with("sft.lora.quantize=4bit"), nowhere, tmp_path / "a")
    with pytest.raises(TifaError, match=r"sft.lora.quantize 4bit: QLoRA needs a CUDA GPU"):
        sft.run_stage(cfg_with("sft.lora.quantize=4bit", "sft.lora.enabled=true"), nowhere, tmp_path / "b")
    with pytest.raises(TifaError, match=r"mgrpo.quantize 4bit: QLoRA needs a CUDA GPU"):
        mgrpo.run_stage(cfg_with("mgrpo.quantize=4bit", "mgrpo.lora_r=8",
                                 f"mgrpo.prompts={ROOT / 'data/demo/prompts.jsonl'}"), nowhere, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_short_last_block_trains_with_its_padding_out_of_the_loss(packed, tiny_model_dir, tmp_path):
    """`tifa data novels` keeps the stream's tail as a shorter last row; the CPT stage's trainer pads it
    in a batch and its labels are -100 on the padding, so no padding token is trained on."""
    from datasets import load_from_disk
    from trl import SFTTrainer

    from tifaforge.train import stage

    cfg = cfg_with(*CPT_SMALL, f"cpt.data={packed}")
    ds = load_from_disk(str(packed))
    last = ds[len(ds) - 1]["input_ids"]
    assert 0 < len(last) < 64 and json.loads((packed / "stats.json").read_text())["tail_block_tokens"] == len(last)
    model, tok = stage.load_for_training(tiny_model_dir)
    args = stage.training_args(cfg.cpt, stage.RunDir(tmp_path), 0, "cpt")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds.select_columns(["input_ids"]), processing_class=tok)
    batch = trainer.data_collator([ds[0], ds[len(ds) - 1]])
    assert batch["input_ids"].shape == (2, 64)
    assert batch["labels"][1, : len(last)].tolist() == last and bool((batch["labels"][1, len(last):] == -100).all())
    assert batch["labels"][0].tolist() == ds[0]["input_ids"]

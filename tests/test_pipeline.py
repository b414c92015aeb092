"""`tifa pipeline`: four stages on the tiny preset with a few steps each, skipped when finished,
refused when their config or inputs changed (until --restart-from), SIGKILL in stage 2 then a rerun
ends with the weights of an uninterrupted run; bad input is refused before any training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tifaforge.config import load_config
from tifaforge.errors import TifaError
from tifaforge.train import checkpoints as ckpt

ROOT = Path(__file__).resolve().parents[1]
WORDS = "雨剑酒灯风月江山"


def write_data(d: Path) -> dict[str, Path]:
    """Short dialogues and prompts (the bundled ones carry long cards: too slow for a test)."""
    d.mkdir(parents=True, exist_ok=True)
    sft, prompts, pairs = d / "sft.jsonl", d / "prompts.jsonl", d / "pairs.jsonl"
    pairs.write_text(json.dumps({"messages": [{"role": "user", "content": "说说雨。"}],
                                 "chosen": "<think>\n想雨。\n</think>\n\n他看着雨，想起了往事。",
                                 "rejected": "<think>\n想雨。\n</think>\n\n" + "雨走吧" * 8}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    sft.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"说说{w}。"},
        {"role": "assistant", "content": f"<think>\n想{w}。\n</think>\n\n他看着{w}，想起了往事。"}]}, ensure_ascii=False) + "\n"
        for w in WORDS), encoding="utf-8")
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"说说{w}。"}],
                                           "split": "eval" if i >= 6 else "train"}, ensure_ascii=False) + "\n"
                               for i, w in enumerate(WORDS)), encoding="utf-8")
    return {"sft": sft, "prompts": prompts, "pairs": pairs}


def small(data: dict[str, Path], *extra: str) -> list[str]:
    common = ["batch_size=2", "log_every=1", "samples_every=1000", "sample_prompts=1", "sample_max_new_tokens=4",
              "warmup=0", "lr_scheduler=constant"]
    return [
        "name=pipe", "seed=3",
        *[f"{s}.{c}" for s in ("cpt", "sft", "dpo") for c in common],
        f"cpt.data={ROOT / 'data/demo/novels'}", "cpt.steps=2", "cpt.max_length=64", "cpt.save_every=2",
        f"sft.data={data['sft']}", "sft.steps=4", "sft.max_length=64", "sft.save_every=2", "sft.learning_rate=0.003",
        f"mgrpo.prompts={data['prompts']}", "mgrpo.steps=1", "mgrpo.prompts_per_step=1", "mgrpo.group_size=2",
        "mgrpo.revisions=1", "mgrpo.max_new_tokens=6",
        f"dpo.prompts={data['prompts']}", f"dpo.pairs={data['pairs']}", "dpo.steps=2", "dpo.max_length=64", "dpo.save_every=2", "dpo.report=false",
        "mining.k=2", "mining.max_new_tokens=6",
        f"eval.prompts={data['prompts']}", "eval.max_new_tokens=6", "eval.bootstrap=10", "eval.ppl_text=",
        *extra]


def cfg_of(data, *extra):
    return load_config(None, small(data, *extra))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """One finished four-stage run (copy it to modify)."""
    from tifaforge.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipe")
    data = write_data(root / "data")
    run_pipeline(cfg_of(data), ["cpt", "sft", "mgrpo", "dpo"], root / "runs" / "pipe")
    return root / "runs" / "pipe", data


def test_four_stages_write_the_run_layout(finished):
    run, _ = finished
    assert (run / "base" / "config.json").exists()
    for name, stage in (("01-cpt", "cpt"), ("02-sft", "sft"), ("03-mgrpo", "mgrpo"), ("04-dpo", "dpo")):
        d = run / name
        m = json.loads((d / "manifest.json").read_text())
        assert m["stage"] == stage and m["status"] == "complete" and m["digest"] and m["versions"]["torch"]
        assert (d / "model" / "model.safetensors").exists() and (d / "config.yaml").exists()
        assert not (d / "started.json").exists()
        card = (d / "model" / "README.md").read_text(encoding="utf-8")
        assert card.startswith("---\nlicense: apache-2.0") and "## Held-out evaluation" in card
    # each stage starts from the previous stage's model
    assert json.loads((run / "02-sft" / "manifest.json").read_text())["base"].startswith("stage:")
    assert (run / "04-dpo" / "pairs.jsonl").exists()
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "| think-format rate ↑ |" in report and "01-cpt" in report and "04-dpo" in report
    assert (run / "plots" / "eval_metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "plots" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert set(json.loads((run / "eval.json").read_text())) == {"base", "01-cpt", "02-sft", "03-mgrpo", "04-dpo"}
    from tifaforge.models.load import run_model

    assert run_model(run) == run / "04-dpo" / "model"  # a RUN argument means its last finished stage


def test_rerun_skips_finished_stages(finished, tmp_path, capsys):
    from tifaforge.pipeline import run_pipeline

    run, data = finished
    copy = tmp_path / "pipe"
    shutil.copytree(run, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.glob("*/model/model.safetensors")}
    res = run_pipeline(cfg_of(data), ["cpt", "sft", "mgrpo", "dpo"], copy, evaluate=False)
    assert res["stages"] == {"cpt": "done", "sft": "done", "mgrpo": "done", "dpo": "done"}
    assert {p: p.stat().st_mtime_ns for p in copy.glob("*/model/model.safetensors")} == before
    assert capsys.readouterr().out.count("skipped") == 4


def test_final_eval_reuses_the_dpo_stage_s_before_and_after(finished, tmp_path):
    """The DPO stage's before/after evaluations (report_before/after.json, with their answers and key)
    stand for 03-mgrpo and 04-dpo in the final eval when the settings and weights match; not otherwise."""
    from tifaforge.eval.report import run_eval
    from tifaforge.pipeline import run_pipeline

    run, data = finished
    copy = tmp_path / "pipe"
    shutil.copytree(run, copy)
    cfg = cfg_of(data)
    res = run_eval(copy / "04-dpo" / "model", tmp_path / "e", cfg.eval, cfg.sampling, progress=False, reward=cfg.reward)
    after = res["results"]["model"]
    after["metrics"]["reward"]["mean"] = 123.0  # no evaluation gives it: shows which result was used
    (copy / "04-dpo" / "report_after.json").write_text(json.dumps(after), encoding="utf-8")
    run_pipeline(cfg, ["cpt", "sft", "mgrpo", "dpo"], copy)
    ev = json.loads((copy / "eval.json").read_text(encoding="utf-8"))
    assert ev["04-dpo"]["metrics"]["reward"]["mean"] == 123.0 and ev["04-dpo"]["key"] == after["key"]
    assert ev["03-mgrpo"]["metrics"]["reward"]["mean"] != 123.0
    run_pipeline(cfg_of(data, "eval.seed=5"), ["cpt", "sft", "mgrpo", "dpo"], copy)  # other settings: evaluated anew
    assert json.loads((copy / "eval.json").read_text(encoding="utf-8"))["04-dpo"]["metrics"]["reward"]["mean"] != 123.0


def test_changed_config_or_input_is_refused_then_restarted(finished, tmp_path):
    from tifaforge.pipeline import run_pipeline

    run, data = finished
    copy = tmp_path / "pipe"
    shutil.copytree(run, copy)
    stages = ["cpt", "sft", "mgrpo", "dpo"]
    with pytest.raises(TifaError, match=r"02-sft: finished with a different config or input \(sft.learning_rate: "
                                        r"0.003 -> 0.002\); rerun with --restart-from sft"):
        run_pipeline(cfg_of(data, "sft.learning_rate=0.002"), stages, copy, evaluate=False)
    changed = write_data(tmp_path / "data2")
    changed["sft"].write_text(data["sft"].read_text(encoding="utf-8").replace("往事", "旧事"), encoding="utf-8")
    with pytest.raises(TifaError, match=r"02-sft: finished with a different config or input \(.*input .*sft.jsonl changed"):
        run_pipeline(cfg_of({**data, "sft": changed["sft"]}), stages, copy, evaluate=False)
    sft_mtime = (copy / "01-cpt" / "model" / "model.safetensors").stat().st_mtime_ns
    res = run_pipeline(cfg_of(data, "sft.learning_rate=0.002"), stages, copy, evaluate=False, restart_from="sft")
    assert res["stages"] == {"cpt": "done", "sft": "fresh", "mgrpo": "fresh", "dpo": "fresh"}
    assert (copy / "01-cpt" / "model" / "model.safetensors").stat().st_mtime_ns == sft_mtime


def test_run_of_another_config_is_refused(finished, tmp_path):
    from tifaforge.pipeline import run_pipeline

    run, data = finished
    copy = tmp_path / "pipe"
    shutil.copytree(run, copy)
    with pytest.raises(TifaError, match="a run of another config"):
        run_pipeline(cfg_of(data, "model.preset_seed=5"), ["cpt", "sft"], copy, evaluate=False)


def test_bad_input_is_refused_before_any_training(tmp_path):
    from tifaforge.pipeline import parse_stages, run_pipeline

    data = write_data(tmp_path / "data")
    with pytest.raises(TifaError, match=r"stages: unknown stage 'rlhf' \(known: cpt, sft, mgrpo, dpo\)"):
        parse_stages("cpt,rlhf")
    with pytest.raises(TifaError, match=r"sft: .*missing.jsonl: no such file"):
        run_pipeline(cfg_of({**data, "sft": tmp_path / "missing.jsonl"}), ["cpt", "sft"], tmp_path / "run")
    assert not (tmp_path / "run").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(TifaError, match=r"bad.jsonl:1"):
        run_pipeline(cfg_of({**data, "sft": bad}), ["cpt", "sft"], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_names_the_unknown_stage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tifaforge.cli", "pipeline", str(ROOT / "configs/tiny.yaml"),
                           "--stages", "cpt,ppo", "--runs", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "stages: unknown stage 'ppo'" in proc.stderr
    assert not any(tmp_path.iterdir())


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_sigkill_in_stage_two_then_rerun_matches_an_uninterrupted_run(tmp_path):
    import torch
    import yaml

    data = write_data(tmp_path / "data")
    sets = small(data, "sft.steps=24", "sft.save_every=2")  # killed at its first checkpoint, 22 steps to go
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "pipe"}))
    cmd = [sys.executable, "-m", "tifaforge.cli", "pipeline", str(config), "--stages", "cpt,sft", "--no-eval",
           *[a for s in sets for a in ("--set", s)]]
    subprocess.run([*cmd, "--runs", str(tmp_path / "straight")], check=True, capture_output=True)

    runs = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--runs", str(runs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    ckdir = runs / "pipe" / "02-sft" / "checkpoints"
    while time.monotonic() < deadline and proc.poll() is None:
        if (ckdir / "checkpoint-2" / ckpt.MARKER).exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (runs / "pipe" / "02-sft" / "started.json").exists() and not (runs / "pipe" / "02-sft" / "manifest.json").exists()
    out = subprocess.run([*cmd, "--runs", str(runs)], check=True, capture_output=True, text=True).stdout
    assert "cpt: finished earlier" in out and "sft: resuming" in out
    a, b = weights(tmp_path / "straight" / "pipe" / "02-sft" / "model"), weights(runs / "pipe" / "02-sft" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Data parallelism on real processes (torchrun, gloo on CPU): N processes train as one does.

    .venv/bin/python -m pytest -q tests/test_data_parallel.py
"""

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

from test_mgrpo import BY_LENGTH, short_prompts  # noqa: F401  (fixture)
from tifaforge.config import load_config
from tifaforge.errors import TifaError

ROOT = Path(__file__).resolve().parents[1]

# Both passes on, a reference (beta > 0), two optimizer steps per rollout batch (mu > 1), DAPO's
# global token normaliser, and micro-batches that do not line up with a rank's rows.
MGRPO = ["mgrpo.steps=2", "mgrpo.prompts_per_step=4", "mgrpo.group_size=2", "mgrpo.revisions=2",
         "mgrpo.pass2=all", "mgrpo.beta=0.04", "mgrpo.iterations=2", "mgrpo.loss_type=dapo",
         "mgrpo.micro_batch=3", "mgrpo.max_new_tokens=8", "mgrpo.learning_rate=0.0003", "mgrpo.save_every=1",
         "mgrpo.resample_zero_spread=2",
         *BY_LENGTH, "reward.vetoes=[]"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_mgrpo_on_two_processes_equals_one(trained_tiny_dir, short_prompts, tmp_path, sharding):
    """DDP: a whole policy per rank, gradients summed; FSDP2: each rank holds half of every weight and
    of AdamW's state (DCP checkpoints), gathered for the rollouts."""
    from tifaforge.stages.mgrpo import run_stage

    config = tmp_path / "dp.yaml"
    config.write_text("name: dp\nseed: 5\n", encoding="utf-8")
    sets = [*MGRPO, f"mgrpo.prompts={short_prompts}"]
    one = run_stage(load_config(config, sets), trained_tiny_dir, tmp_path / "one")
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "tifaforge.cli", "train", "mgrpo", str(config), "--out", str(two), "--model",
           str(trained_tiny_dir), "--launcher", "torchrun", "--num-processes", "2", "--sharding", sharding,
           *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-20000:]

    a, b = _rows(tmp_path / "one"), _rows(two)
    assert [r["step"] for r in b] == [1, 2] and {r["world_size"] for r in b} == {2} and b[0]["global_batch"] == 4
    for x, y in zip(a, b):  # the same rollouts, rewards and advantages; the same loss up to float sums
        for key in ("reward/pass1", "reward/pass2", "pass2_gain", "sequences", "revised", "frac_zero_std", "len/pass1"):
            assert x[key] == y[key], key
        for key in ("loss", "kl", "grad_norm", "entropy", "clip_ratio/region"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    assert a[0]["frac_zero_std"] < 1, "every group tied: the test would not train"
    wa, wb, w0 = _weights(one), _weights(two / "model"), _weights(trained_tiny_dir)
    assert wa.keys() == wb.keys()
    moved = max(float((wa[k] - w0[k]).abs().max()) for k in wa)
    assert moved > 1e-4  # it trained
    for k in wa:  # the same updates, up to the order of float sums (measured: 0.3% of the largest step)
        assert float(((wa[k] - w0[k]) - (wb[k] - w0[k])).abs().max()) <= 0.01 * moved, k
    samples = (two / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert samples == (tmp_path / "one" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    shards = list((two / "checkpoints").rglob("*.distcp"))
    assert bool(shards) == (sharding == "fsdp2")


def test_prompts_that_do_not_split_over_the_ranks_are_refused_before_work():
    from tifaforge.config import Config
    from tifaforge.train.stage import check_launch

    cfg = load_config(None, ["mgrpo.prompts_per_step=4"], cls=Config)
    assert check_launch(cfg, ["cpt", "mgrpo"], "torchrun", 2, "") == 2
    with pytest.raises(TifaError, match=r"mgrpo.prompts_per_step 4 does not split over 3 processes"):
        check_launch(cfg, ["mgrpo"], "torchrun", 3, "")


def test_launches_that_cannot_shard_are_refused_before_work(tmp_path):
    """What FSDP2 or DeepSpeed cannot run is refused by check_launch, naming the setting, before any
    process starts; an FSDP2 accelerate config is accepted for every stage (on CPU too)."""
    import yaml

    from tifaforge.config import Config
    from tifaforge.train.stage import check_launch

    cfg = load_config(None, ["mgrpo.prompts_per_step=8"], cls=Config)
    fsdp = str(ROOT / "configs/accelerate/fsdp-1x8.yaml")
    assert check_launch(cfg, ["cpt", "sft", "mgrpo", "dpo"], "accelerate", 2, fsdp) == 2
    zero3 = str(ROOT / "configs/accelerate/zero3-1x8.yaml")
    with pytest.raises(TifaError, match=r"launch.accelerate_config .*zero3-1x8.yaml: DeepSpeed cannot run MGRPO"):
        check_launch(cfg, ["cpt", "mgrpo"], "accelerate", 0, zero3)
    with pytest.raises(TifaError, match=r"zero3-1x8.yaml: DeepSpeed needs CUDA GPUs"):
        check_launch(cfg, ["cpt", "sft"], "accelerate", 0, zero3)
    fsdp1 = tmp_path / "fsdp1.yaml"
    acc = yaml.safe_load(Path(fsdp).read_text())
    acc["fsdp_config"]["fsdp_version"] = 1
    fsdp1.write_text(yaml.safe_dump(acc))
    with pytest.raises(TifaError, match=r"fsdp1.yaml: fsdp_version 1 needs CUDA GPUs; set fsdp_version: 2"):
        check_launch(cfg, ["sft"], "accelerate", 2, str(fsdp1))
    looped = load_config(None, ["model.loop.start=1", "model.loop.end=2", "launch.sharding=fsdp2"], cls=Config)
    with pytest.raises(TifaError, match=r"launch.sharding fsdp2: model.loop \(layers 1..1\) is not supported"):
        check_launch(looped, ["cpt"], "torchrun", 2, "")
    assert check_launch(looped, ["cpt"], "torchrun", 1, "") == 1  # one process: nothing to shard
    with pytest.raises(TifaError, match=r"--accelerate-config .*only read with --launcher accelerate"):
        check_launch(cfg, ["cpt"], "torchrun", 2, fsdp, "--")


def test_resuming_with_another_sharding_is_refused(tmp_path, monkeypatch):
    """A checkpoint of sharded DCP files cannot be resumed as DDP (and the reverse): one line says how."""
    from tifaforge.config import Config
    from tifaforge.train import checkpoints as ckpt
    from tifaforge.train.stage import prepare_out

    cfg = load_config(None, [], cls=Config)
    out = tmp_path / "run"
    folder = out / "checkpoints" / "checkpoint-2"
    (folder / "pytorch_model_fsdp_0").mkdir(parents=True)
    (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    ckpt.mark_complete(folder, 2)
    from tifaforge.config import save_resolved

    save_resolved(cfg, out)
    with pytest.raises(TifaError, match=r"checkpoint-2: written by a fsdp2 run, this one is ddp: resume it with "
                                        r"launch.sharding fsdp2 and more than one process"):
        prepare_out(out, cfg, "sft", resume=True)


@pytest.mark.slow
def test_pipeline_on_two_processes_killed_mid_mgrpo_resumes_to_the_uninterrupted_result(tmp_path):
    """`tifa pipeline --launcher torchrun --num-processes 2 --sharding fsdp2`, all four stages sharded;
    one MGRPO rank is SIGKILLed after a checkpoint (DCP shards): the launcher stops the other, the
    command fails with a line saying to rerun, and the rerun resumes MGRPO from the shards and ends on
    the weights of an uninterrupted 2-process run."""
    import psutil
    import torch
    import yaml

    from test_pipeline import small, weights, write_data

    from tifaforge.train import checkpoints as ckpt

    data = write_data(tmp_path / "data")
    sets = small(data, "mgrpo.prompts_per_step=2", "mgrpo.steps=3", "mgrpo.save_every=1", "mgrpo.max_new_tokens=4")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "pipe"}))
    cmd = [sys.executable, "-m", "tifaforge.cli", "pipeline", str(config), "--no-eval", "--launcher", "torchrun",
           "--num-processes", "2", "--sharding", "fsdp2", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--runs", str(runs)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    ckdir = runs / "pipe" / "03-mgrpo" / "checkpoints"
    deadline, killed = time.monotonic() + 600, None
    while time.monotonic() < deadline and proc.poll() is None and killed is None:
        if (ckdir / "checkpoint-1" / ckpt.MARKER).exists():
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "tifaforge.stages.mgrpo" in " ".join(p.cmdline()) and "torch.distributed.run" not in p.cmdline()]
            if ranks:
                killed = ranks[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    err = proc.communicate(timeout=300)[1]
    assert killed is not None, "MGRPO finished before a rank could be killed: " + err[-2000:]
    assert proc.returncode == 2 and "stage mgrpo" in err and "rerun the same command to resume" in err, err[-3000:]
    assert not (runs / "pipe" / "03-mgrpo" / "manifest.json").exists()

    # The uninterrupted reference: the same finished CPT and SFT (copied; a stage is known by its
    # contents), then MGRPO and DPO in one go.
    for stage in ("01-cpt", "02-sft"):
        shutil.copytree(runs / "pipe" / stage, tmp_path / "straight" / "pipe" / stage)
    straight = subprocess.run([*cmd, "--runs", str(tmp_path / "straight")], capture_output=True, text=True, env=env)
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert "sft: finished earlier" in straight.stdout and "mgrpo: resuming" not in straight.stdout

    again = subprocess.run([*cmd, "--runs", str(runs)], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "sft: finished earlier" in again.stdout and "mgrpo: resuming" in again.stdout
    for stage in ("03-mgrpo", "04-dpo"):
        a, b = weights(tmp_path / "straight" / "pipe" / stage / "model"), weights(runs / "pipe" / stage / "model")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    rows = [json.loads(x) for x in (runs / "pipe" / "03-mgrpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and {r["world_size"] for r in rows} == {2}
    for stage in ("01-cpt", "02-sft", "03-mgrpo", "04-dpo"):  # every stage kept sharded checkpoints
        assert list((runs / "pipe" / stage / "checkpoints").rglob("*.distcp")), stage


SHARDED_EVAL = """
import json, sys
from tifaforge.config import EvalConfig, SamplingConfig
from tifaforge.engine.generate import Engine
from tifaforge.eval.metrics import evaluate
from tifaforge.train import distributed as dist

dist.start("cpu")
cfg = EvalConfig(limit=5, samples=2, max_new_tokens=8, bootstrap=50, unpenalised=True, ppl_text="")
res = evaluate(Engine.load(sys.argv[1], device="cpu"), cfg, SamplingConfig(), progress=False,
               shard=(dist.rank(), dist.world_size()))
json.dump(res, open(sys.argv[2] + f".{dist.rank()}", "w"))
"""


@pytest.mark.slow
def test_evaluation_split_over_two_processes_equals_one(trained_tiny_dir, tmp_path):
    """The DPO stage's before/after evaluation on N ranks: each answers every N-th slot, every rank
    gets the whole result, equal to one process's (answers, metrics and intervals)."""
    script, out = tmp_path / "eval.py", tmp_path / "res.json"
    script.write_text(SHARDED_EVAL, encoding="utf-8")
    one = subprocess.run([sys.executable, str(script), str(trained_tiny_dir), str(tmp_path / "one.json")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          str(trained_tiny_dir), str(out)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one.json.0").read_text())
    b0, b1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    assert b0 == b1 and len(a["samples"]) == 10
    assert [s["answer"] for s in b0["samples"]] == [s["answer"] for s in a["samples"]]
    assert b0["metrics"] == a["metrics"]


def test_context_and_sequence_parallel_configs_are_checked_before_any_work(monkeypatch, tmp_path):
    """The shipped long-context accelerate configs: accelerate reads their parallelism_config, whose
    sizes multiply to num_processes; a launch with them is refused for MGRPO, with a process count
    they do not split into, and on a machine without CUDA, each before any work; under the launcher a
    stage pads every batch to the multiple the split needs."""
    from accelerate.commands.config.config_args import load_config_from_file

    from tifaforge.config import Config
    from tifaforge.train import stage

    cfg = load_config(None, ["mgrpo.prompts_per_step=8"], cls=Config)
    cp = str(ROOT / "configs/accelerate/cp-fsdp2-1x8.yaml")
    sp = str(ROOT / "configs/accelerate/sp-zero3-1x8.yaml")
    for path, key in ((cp, "cp"), (sp, "sp")):
        acc = load_config_from_file(path)
        par = acc.parallelism_config
        assert par[f"parallelism_config_{key}_size"] > 1
        assert par["parallelism_config_dp_shard_size"] * par[f"parallelism_config_{key}_size"] == acc.num_processes
    with pytest.raises(TifaError, match=r"cp-fsdp2-1x8.yaml: context parallelism \(cp_size 4\) .*MGRPO's own loop"):
        stage.check_launch(cfg, ["sft", "mgrpo"], "accelerate", 0, cp)
    with pytest.raises(TifaError, match=r"dp_replicate x dp_shard x tp x cp x sp = 8, but 4 processes"):
        stage.check_launch(cfg, ["cpt"], "accelerate", 4, cp)
    with pytest.raises(TifaError, match=r"context parallelism \(cp_size 4\) needs CUDA GPUs"):
        stage.check_launch(cfg, ["cpt", "sft", "dpo"], "accelerate", 0, cp)
    with pytest.raises(TifaError, match=r"sp-zero3-1x8.yaml: sequence parallelism \(sp_size 4\) needs CUDA GPUs"):
        stage.check_launch(cfg, ["sft"], "accelerate", 0, sp)

    run = stage.RunDir(tmp_path)
    assert stage.training_args(cfg.sft, run, 0, "sft").pad_to_multiple_of is None
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "4")
    assert stage.training_args(cfg.sft, run, 0, "sft").pad_to_multiple_of == 8  # the ring's 2 x cp_size halves
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "1")
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "4")
    assert stage.training_args(cfg.cpt, run, 0, "cpt").pad_to_multiple_of == 4

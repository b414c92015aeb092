import subprocess
import sys
import time
from pathlib import Path

import pytest

from tifaforge.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def run_tifa(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tifaforge.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command_and_ends_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert " ".join(c.words) in out
    assert out.rstrip().splitlines()[-2].strip() == "example:"


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c.words))
def test_each_subcommand_help_ends_with_its_example(cmd, capsys):
    with pytest.raises(SystemExit):
        main([*cmd.words, "--help"])
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-2].strip() == "example:" and lines[-1].strip() == cmd.example
    assert cmd.example.startswith("tifa " + " ".join(cmd.words))


def test_example_commands_parse():
    parser = build_parser()
    for c in COMMANDS:
        args = parser.parse_args(c.example.split("&&")[0].split()[1:])
        assert args._target == c.target


def test_config_typo_is_one_line_error_and_nonzero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  top_pp: 0.5\n", encoding="utf-8")
    r = run_tifa("config", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip() == f"tifa: error: {bad}: line 2: unknown key 'sampling.top_pp' (did you mean 'top_p'?)"


def test_cli_import_is_light():
    # `tifa --help` must not pay for torch/transformers.
    code = "import sys, tifaforge.cli, tifaforge.config; print(sorted(m for m in ('torch','transformers','trl') if m in sys.modules))"
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    assert time.perf_counter() - t < 10


def test_doctor_reports_environment_and_model(tiny_model_dir):
    r = run_tifa("doctor", str(tiny_model_dir))
    assert r.returncode == 0, r.stderr
    for field in ("torch", "transformers", "threads", "extra llamacpp", "ingest kernel built", "tag spelling  ascii",
                  "template      ok"):
        assert field in r.stdout


def test_doctor_flags_a_template_with_split_tags(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    tpl = broken / "chat_template.jinja"
    tpl.write_text(tpl.read_text(encoding="utf-8").replace("<|User|>", "<|Human|>"), encoding="utf-8")
    r = run_tifa("doctor", str(broken))
    assert r.returncode == 1
    assert "<|Human|>" in r.stdout and "PROBLEM" in r.stdout


def test_make_demo_runs_end_to_end(tmp_path):
    """`make demo`'s script with a few steps per stage: all four stages, the evaluation table, one turn."""
    quick = ["cpt.steps=2", "cpt.max_length=64", "sft.steps=2", "sft.batch_size=2", "mgrpo.steps=1",
             "mgrpo.prompts_per_step=1", "mgrpo.group_size=2", "mgrpo.max_new_tokens=4", "mining.k=2",
             "mining.max_new_tokens=4", "mining.split=eval", "dpo.steps=1", "dpo.batch_size=2", "dpo.report=false",
             "eval.limit=2", "eval.max_new_tokens=4", "eval.bootstrap=10", "sampling.max_new_tokens=8",
             f"dpo.pairs={ROOT / 'data/demo/prefs.jsonl'}"]
    r = subprocess.run([sys.executable, "-m", "tifaforge.demo", "--runs", str(tmp_path), "--name", "demo",
                        *[a for q in quick for a in ("--set", q)]], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    assert "| think-format rate ↑ |" in r.stdout and "04-dpo" in r.stdout
    assert "小林>" in r.stdout and "沈青崖>" in r.stdout and "done in" in r.stdout
    assert (tmp_path / "demo" / "04-dpo" / "model" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "report.md").exists()

import subprocess
import sys
import time

import pytest

from tifaforge.cli import COMMANDS, build_parser, main


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
    for field in ("torch", "transformers", "threads", "extra llamacpp", "tag spelling  ascii", "template      ok"):
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
    """`make demo`'s script, with a short warm-up: builds the tiny model and answers one role-play turn."""
    r = subprocess.run([sys.executable, "-m", "tifaforge.demo", "--out", str(tmp_path / "demo"), "--steps", "5"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "小林>" in r.stdout and "沈青崖>" in r.stdout and "done in" in r.stdout
    assert (tmp_path / "demo" / "warm" / "model.safetensors").exists()

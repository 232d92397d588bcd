"""The `pagedbackend` command as a user runs it: build a tiny model, stream a generation."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedbackend.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_model_then_generate_streams_to_the_terminal(tmp_path):
    out = tmp_path / "gpt2"
    built = run_cli("tiny-model", "--arch", "gpt2", "--out", str(out), "--hidden-size", "32", "--num-heads", "2",
                    "--vocab-size", "400", "--max-position-embeddings", "256")
    assert built.returncode == 0, built.stderr
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    gen = run_cli("generate", "--model", str(out), "--prompt", "Once upon a time", "--max-tokens", "12",
                  "--ignore-eos")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Once upon a time")
    assert "[12 tokens in" in gen.stdout and "finish_reason=length" in gen.stdout


def test_generate_reports_a_bad_model_dir_without_a_traceback(tmp_path):
    gen = run_cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert gen.returncode == 2
    assert "error: model:" in gen.stderr and "config.json" in gen.stderr
    assert "Traceback" not in gen.stderr


def test_offline_batch_example_runs(model_dir):
    import pathlib

    example = pathlib.Path(__file__).resolve().parents[1] / "examples" / "offline_batch.py"
    done = subprocess.run([sys.executable, str(example), "--model", str(model_dir("llama"))], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("->") == 5  # four prompts, one of them with n=2
    assert "'num_free_blocks'" in done.stdout

"""benchmarks/gpu_validate.py is what runs in the few minutes a lent GPU gives; it only gets there
with the checkout, so a refactor that breaks it must show up here first. Its --dry-run runs every
stage on CPU (Triton interpreter, tiny sizes): each must report a result, not an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["env", "ceilings", "kernels", "bigindex", "bandwidth", "recompile", "engine", "async", "pytest"]


@pytest.mark.slow
def test_dry_run_reports_a_result_for_every_stage(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --dry-run
    # The budget bounds the run the way --budget-s bounds a GPU call; generous for a loaded CPU box,
    # because a stage skipped for time would fail this test as surely as one that raised.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_validate.py"), "--dry-run", "--out",
                           str(tmp_path), "--budget-s", "420"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_validate.json").read_text())
    stages = report["stages"]
    assert report["dry_run"] is True
    assert list(stages) == STAGES, log
    failed = {name: st.get("error") or st.get("skipped") for name, st in stages.items() if "result" not in st}
    assert not failed, f"{failed}\n{log}"
    assert done.returncode == 0, log

    results = {name: st["result"] for name, st in stages.items()}
    assert results["kernels"]["failures"] == 0 and results["kernels"]["cases"] >= 5, results["kernels"]
    assert results["bigindex"]["ok"], results["bigindex"]
    engine = results["engine"]
    # Every phase _time_parts wraps still exists under the name it uses (a rename loses a column on the GPU).
    for label in ("b256", "b1"):
        assert "not_found" not in engine[f"host_ms_{label}"], engine[f"host_ms_{label}"]
        assert engine[f"host_ms_{label}"]["step"] > 0
    assert engine["gen_tok_s"] > 0 and engine["steps"] > 0
    streams = results["async"]
    assert streams["completed"] == streams["streams"] and streams["equal_to_offline"] == f"{streams['streams']}/" \
        f"{streams['streams']}", streams  # fp32 on CPU: the engine thread gives the offline tokens exactly
    assert results["pytest"]["ran"] and results["pytest"]["returncode"] == 0, results["pytest"]
    assert "collected" in results["pytest"]["summary"]

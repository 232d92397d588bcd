"""Engine-wide counters and latency histograms, and the one table of the metrics adapters
export: the Prometheus text (`prometheus.py`, PyTriton) and TorchServe's metrics
(`adapters/torchserve/metrics.py`) are both generated from `METRICS`."""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

from pagedbackend.outputs import RequestOutput

# Seconds; Prometheus' default latency buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


@dataclass(frozen=True)
class Metric:
    """One exported number: `key` in `LLMEngine.get_stats()`, `kind` gauge / counter
    (cumulative) / histogram, the Prometheus name (after `pagedbackend_`) and TorchServe's."""

    key: str
    kind: str
    unit: str
    help: str
    prometheus: str
    torchserve: str
    scale: float = 1.0  # TorchServe shows ratios as percent


METRICS: tuple[Metric, ...] = (
    Metric("kv_cache_usage", "gauge", "percent", "Fraction of KV-cache blocks in use.",
           "kv_cache_usage_ratio", "KVCacheUsagePercent", 100.0),
    Metric("num_free_blocks", "gauge", "count", "KV-cache blocks free now.", "num_kv_blocks_free", "FreeKVBlocks"),
    Metric("num_running_requests", "gauge", "count", "Requests with at least one sequence being computed.",
           "num_requests_running", "RunningRequests"),
    Metric("num_waiting_requests", "gauge", "count", "Requests waiting to start (or to resume after preemption).",
           "num_requests_waiting", "WaitingRequests"),
    Metric("num_running", "gauge", "count", "Sequences being computed (a request has n or best_of of them).",
           "num_seqs_running", "RunningSequences"),
    Metric("num_waiting", "gauge", "count", "Sequences waiting to be scheduled (new or preempted by recompute).",
           "num_seqs_waiting", "WaitingSequences"),
    Metric("num_swapped", "gauge", "count", "Sequences swapped out to host memory.",
           "num_seqs_swapped", "SwappedSequences"),
    Metric("num_free_host_blocks", "gauge", "count", "Free blocks of the host swap pool.",
           "num_host_blocks_free", "FreeHostKVBlocks"),
    Metric("prefix_cache_hit_rate", "gauge", "percent", "Prompt tokens served from the prefix cache / prompt tokens.",
           "prefix_cache_hit_rate", "PrefixCacheHitRatePercent", 100.0),
    Metric("last_batch_seqs", "gauge", "count", "Sequences computed in the latest step.", "batch_size",
           "EngineBatchSize"),
    Metric("max_batch_seqs", "gauge", "count", "Most sequences computed in one step so far.", "max_batch_size",
           "EngineMaxBatchSize"),
    Metric("num_preemptions", "counter", "count", "Sequences preempted, by recompute or by swapping.",
           "preemptions_total", "Preemptions"),
    Metric("num_swapped_out", "counter", "count", "Preemptions by swapping the blocks out to host memory.",
           "swap_outs_total", "SwapOuts"),
    Metric("num_swapped_in", "counter", "count", "Swapped-out sequences brought back to the device.",
           "swap_ins_total", "SwapIns"),
    Metric("prompt_tokens", "counter", "count", "Prompt tokens received.", "prompt_tokens_total", "PromptTokens"),
    Metric("generation_tokens", "counter", "count", "Tokens generated.", "generation_tokens_total",
           "GeneratedTokens"),
    Metric("time_to_first_token_seconds", "histogram", "s", "Arrival to first token.",
           "time_to_first_token_seconds", "TimeToFirstTokenSeconds"),
    Metric("time_per_output_token_seconds", "histogram", "s", "Mean time between tokens, per request.",
           "time_per_output_token_seconds", "TimePerOutputTokenSeconds"),
)


@dataclass
class Histogram:
    """Cumulative counts per upper bound, like a Prometheus histogram (the last is +Inf)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[int]:
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: collections.Counter = field(default_factory=collections.Counter)
    # Recent per-request latencies (seconds); bounded so a long-running server stays small.
    time_to_first_token: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    time_per_output_token: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    ttft_histogram: Histogram = field(default_factory=Histogram)
    tpot_histogram: Histogram = field(default_factory=Histogram)
    steps: int = 0

    def record_finished(self, out: RequestOutput) -> None:
        for c in out.outputs:
            self.requests_finished[c.finish_reason or "unknown"] += 1
        m = out.metrics
        if m is None:
            return
        if m.time_to_first_token is not None:
            self.time_to_first_token.append(m.time_to_first_token)
            self.ttft_histogram.observe(m.time_to_first_token)
        if m.time_per_output_token is not None:
            self.time_per_output_token.append(m.time_per_output_token)
            self.tpot_histogram.observe(m.time_per_output_token)

"""Engine-wide counters and latency histograms, and the one table of the metrics adapters
export: the Prometheus text (`prometheus.py`, PyTriton) and TorchServe's metrics
(`adapters/torchserve/metrics.py`) are both generated from `METRICS`."""

from __future__ import annotations

import bisect
import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pagedbackend.outputs import RequestOutput

# Seconds; Prometheus' default latency buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# Token counts per request, vLLM's 1-2-5 series.
TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))
# Seconds from arrival to the last output (vLLM's e2e_request_latency_seconds buckets).
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
# Samples per request (vLLM's request_params_n buckets).
N_BUCKETS = (1, 2, 5, 10, 20)


# Every finish_reason a sample can end with (vLLM's, plus "error" for a failed step).
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class Metric:
    """One exported number: `key` in `LLMEngine.get_stats()`, `kind` gauge / counter
    (cumulative) / histogram / positional (a list of counters, one per position, exported with a
    position label), the Prometheus name (after `pagedbackend_`) and TorchServe's."""

    key: str
    kind: str
    unit: str
    help: str
    prometheus: str
    torchserve: str
    scale: float = 1.0  # TorchServe shows ratios as percent
    # The name Triton's vLLM backend exports it under (`vllm:...`), rendered beside ours so its
    # dashboards work unchanged; None where it has none.
    vllm: str | None = None


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
    Metric("prompt_tokens", "counter", "count", "Prompt tokens received.", "prompt_tokens_total", "PromptTokens",
           vllm="vllm:prompt_tokens_total"),
    Metric("generation_tokens", "counter", "count", "Tokens generated.", "generation_tokens_total",
           "GeneratedTokens", vllm="vllm:generation_tokens_total"),
    Metric("num_kv_blocks", "gauge", "count", "KV-cache blocks in the pool.", "num_kv_blocks", "KVBlocks"),
    Metric("steps", "counter", "count", "Engine steps that computed tokens.", "steps_total", "EngineSteps"),
    Metric("num_chunked_prefill_steps", "counter", "count", "Steps that computed part, not all, of a prompt.",
           "chunked_prefill_steps_total", "ChunkedPrefillSteps"),
    Metric("prefix_cache_queries", "counter", "count", "Prompt tokens looked up in the prefix cache (once per request).",
           "prefix_cache_queries_total", "PrefixCacheQueries"),
    Metric("prefix_cache_hits", "counter", "count", "Of those, tokens found in the cache.", "prefix_cache_hits_total",
           "PrefixCacheHits"),
    *(Metric(f"requests_finished_{reason}", "counter", "count", f"Samples finished with finish_reason {reason!r}.",
             f"requests_finished_{reason}_total", f"Finished{reason.capitalize()}") for reason in FINISH_REASONS),
    Metric("spec_decode_num_drafts", "counter", "count",
           "Speculative decoding: sequence steps that verified proposals.", "spec_decode_num_drafts_total",
           "SpecDecodeDrafts"),
    Metric("spec_decode_num_draft_tokens", "counter", "count", "Speculative decoding: tokens proposed and verified.",
           "spec_decode_num_draft_tokens_total", "SpecDecodeDraftTokens"),
    Metric("spec_decode_num_accepted_tokens", "counter", "count", "Speculative decoding: proposed tokens accepted.",
           "spec_decode_num_accepted_tokens_total", "SpecDecodeAcceptedTokens"),
    Metric("spec_decode_acceptance_rate", "gauge", "percent", "Speculative decoding: accepted / proposed tokens.",
           "spec_decode_acceptance_rate", "SpecDecodeAcceptanceRatePercent", 100.0),
    Metric("spec_decode_mean_accepted_length", "gauge", "count",
           "Speculative decoding: tokens a verifying step emits per sequence (1 + accepted / drafts).",
           "spec_decode_mean_accepted_length", "SpecDecodeMeanAcceptedLength"),
    Metric("spec_decode_accepted_per_position", "positional", "count",
           "Speculative decoding: proposals accepted at each position (label position, 0 = first).",
           "spec_decode_num_accepted_tokens_per_pos_total", "SpecDecodeAcceptedPerPosition"),
    Metric("structured_output_requests", "counter", "count",
           "Structured output: requests admitted with a grammar (JSON schema, regex, choice, EBNF).",
           "structured_output_requests_total", "StructuredOutputRequests"),
    Metric("grammar_compiles", "counter", "count", "Structured output: grammars compiled (cache misses).",
           "grammar_compiles_total", "GrammarCompiles"),
    Metric("grammar_cache_hits", "counter", "count", "Structured output: grammars found in the compile cache.",
           "grammar_cache_hits_total", "GrammarCacheHits"),
    Metric("grammar_compile_seconds", "histogram", "s", "Structured output: time to compile one grammar.",
           "grammar_compile_seconds", "GrammarCompileSeconds"),
    Metric("time_to_first_token_seconds", "histogram", "s", "Arrival to first token.",
           "time_to_first_token_seconds", "TimeToFirstTokenSeconds", vllm="vllm:time_to_first_token_seconds"),
    Metric("time_per_output_token_seconds", "histogram", "s", "Mean time between tokens, per request.",
           "time_per_output_token_seconds", "TimePerOutputTokenSeconds", vllm="vllm:time_per_output_token_seconds"),
    Metric("e2e_request_latency_seconds", "histogram", "s", "Arrival to the last output, per finished request.",
           "e2e_request_latency_seconds", "E2ERequestLatencySeconds", vllm="vllm:e2e_request_latency_seconds"),
    Metric("request_prompt_tokens", "histogram", "count", "Prompt tokens per finished request.",
           "request_prompt_tokens", "RequestPromptTokens", vllm="vllm:request_prompt_tokens"),
    Metric("request_generation_tokens", "histogram", "count", "Tokens generated per finished request (all samples).",
           "request_generation_tokens", "RequestGenerationTokens", vllm="vllm:request_generation_tokens"),
    Metric("request_params_n", "histogram", "count", "Samples asked for (n) per finished request.",
           "request_params_n", "RequestParamsN", vllm="vllm:request_params_n"),
)


# The engine's stats at one moment, one field per metric (generated from the table, so the two
# cannot drift apart): counters and gauges are numbers, histograms their buckets and counts.
StatsSnapshot = dataclasses.make_dataclass(
    "StatsSnapshot",
    [(m.key, {"histogram": dict, "positional": list}.get(m.kind, float)) for m in METRICS],
    frozen=True,
    namespace={"__doc__": "A frozen snapshot of the engine's stats; `as_dict()` for exporters.",
               "as_dict": lambda self: dataclasses.asdict(self),
               "from_dict": classmethod(lambda cls, d: cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)}))},
)


@dataclass
class Histogram:
    """Cumulative counts per upper bound, like a Prometheus histogram (the last is +Inf)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    @classmethod
    def with_bounds(cls, bounds: tuple[float, ...]) -> "Histogram":
        return cls(bounds, [0] * (len(bounds) + 1))

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def as_dict(self) -> dict:
        return {"buckets": list(self.bounds), "cumulative_counts": self.cumulative(), "sum": self.total,
                "count": self.count}

    def cumulative(self) -> list[int]:
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


@dataclass
class EngineStats:
    """What the frontend learns from finished requests (the core counts tokens and blocks)."""

    requests_finished: collections.Counter = field(default_factory=collections.Counter)  # finish_reason ->
    ttft_histogram: Histogram = field(default_factory=Histogram)
    tpot_histogram: Histogram = field(default_factory=Histogram)
    e2e_histogram: Histogram = field(default_factory=lambda: Histogram.with_bounds(E2E_BUCKETS))
    prompt_tokens_histogram: Histogram = field(default_factory=lambda: Histogram.with_bounds(TOKEN_BUCKETS))
    generation_tokens_histogram: Histogram = field(default_factory=lambda: Histogram.with_bounds(TOKEN_BUCKETS))
    n_histogram: Histogram = field(default_factory=lambda: Histogram.with_bounds(N_BUCKETS))

    def record_finished(self, out: RequestOutput) -> None:
        for c in out.outputs:
            self.requests_finished[c.finish_reason or "unknown"] += 1
        self.prompt_tokens_histogram.observe(len(out.prompt_token_ids))
        self.n_histogram.observe(len(out.outputs))
        m = out.metrics
        self.generation_tokens_histogram.observe(  # every sample's (best_of's too); outputs may be deltas
            m.num_generated_tokens if m is not None else sum(len(c.token_ids) for c in out.outputs))
        if m is None:
            return
        if m.time_to_first_token is not None:
            self.ttft_histogram.observe(m.time_to_first_token)
        if m.time_per_output_token is not None:
            self.tpot_histogram.observe(m.time_per_output_token)
        if m.finished_time is not None:
            self.e2e_histogram.observe(m.finished_time - m.arrival_time)

    def snapshot(self) -> dict:
        return {
            **{f"requests_finished_{r}": self.requests_finished[r] for r in FINISH_REASONS},
            "time_to_first_token_seconds": self.ttft_histogram.as_dict(),
            "time_per_output_token_seconds": self.tpot_histogram.as_dict(),
            "e2e_request_latency_seconds": self.e2e_histogram.as_dict(),
            "request_prompt_tokens": self.prompt_tokens_histogram.as_dict(),
            "request_generation_tokens": self.generation_tokens_histogram.as_dict(),
            "request_params_n": self.n_histogram.as_dict(),
        }

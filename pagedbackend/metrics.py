"""Engine-wide counters and latency histograms that adapters export (Prometheus, TorchServe)."""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

from pagedbackend.outputs import RequestOutput

# Seconds; Prometheus' default latency buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


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

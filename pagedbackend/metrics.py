"""Engine-wide counters and latency samples that adapters export (Prometheus, TorchServe)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from pagedbackend.outputs import RequestOutput


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: collections.Counter = field(default_factory=collections.Counter)
    # Recent per-request latencies (seconds); bounded so a long-running server stays small.
    time_to_first_token: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    time_per_output_token: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    steps: int = 0

    def record_finished(self, out: RequestOutput) -> None:
        for c in out.outputs:
            self.requests_finished[c.finish_reason or "unknown"] += 1
        m = out.metrics
        if m is None:
            return
        if m.time_to_first_token is not None:
            self.time_to_first_token.append(m.time_to_first_token)
        if m.time_per_output_token is not None:
            self.time_per_output_token.append(m.time_per_output_token)

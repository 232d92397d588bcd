"""What the engine hands back: vLLM's `RequestOutput` / `CompletionOutput` shapes.

Outputs are cumulative like vLLM's (``text`` and ``token_ids`` hold everything so far); each
also carries the piece new since the previous output (``delta_text``, ``delta_token_ids``) so
streaming adapters never diff strings themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability under the model's raw distribution (vLLM's `Logprob`)."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


# Per position: the chosen (or prompt) token and the requested top-k alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # set when logprobs were requested (or best_of ranks)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None  # set when the request failed inside the engine
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: "RequestMetrics | None" = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # first entry None, like vLLM


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic) of one request's life, for TTFT / TPOT."""

    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        if self.first_token_time is None or self.last_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_generated_tokens - 1)

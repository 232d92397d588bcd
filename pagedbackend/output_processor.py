"""Turns sequences' new tokens into text and `RequestOutput`s.

Stop strings live here (they are about text): a match ends the sequence through the scheduler,
which frees its blocks. While streaming, the last `len(longest stop) - 1` characters are held
back so a stop string that is still forming is never sent and then retracted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedbackend.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.sequence import Sequence, SequenceStatus
from pagedbackend.tokenizer import IncrementalDetokenizer


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    sent_chars: list[int] = field(default_factory=list)
    sent_tokens: list[int] = field(default_factory=list)
    error: str | None = None

    def __post_init__(self) -> None:
        self.sent_chars = [0] * len(self.seqs)
        self.sent_tokens = [0] * len(self.seqs)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def find_stop_string(text: str, num_new_chars: int, stops: list[str]) -> tuple[str, int] | None:
    """Earliest stop string that ends within the new characters: (stop, start index)."""
    best: tuple[str, int] | None = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[1]):
            best = (stop, idx)
    return best


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, state: RequestState) -> None:
        self.states[state.request_id] = state

    def make_detokenizer(self, prompt_token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                      params.spaces_between_special_tokens)

    def process(self, updated: list[Sequence], scheduler) -> list[RequestOutput]:
        """Detokenize the token each updated sequence just received, apply stop strings, and
        build one output per touched request (plus those finished without a new token)."""
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        for seq in updated:
            state = self.states.get(seq.request_id)
            if state is None:
                continue
            touched[seq.request_id] = state
            m = state.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            m.num_generated_tokens += 1
            detok = state.detokenizers[seq.index]
            before = len(detok.text)
            detok.add(seq.token_ids[-1])
            params = seq.params
            stopped_by_token = seq.status == SequenceStatus.FINISHED_STOPPED
            if params.stop and not stopped_by_token and seq.num_output_tokens > params.min_tokens:
                match = find_stop_string(detok.text, len(detok.text) - before, params.stop)
                if match is not None:
                    stop, idx = match
                    cut = idx + len(stop) if params.include_stop_str_in_output else idx
                    detok.text = detok.text[:cut]
                    if seq.is_finished:  # also hit max_tokens on this token: the stop string wins
                        seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
                    else:
                        scheduler.finish_sequence(seq, SequenceStatus.FINISHED_STOPPED, stop)
        return [self._output(state, now) for state in touched.values()]

    def finish_without_token(self, request_id: str, error: str | None = None) -> RequestOutput | None:
        """Final output for a request ended from outside (abort, failed step)."""
        state = self.states.get(request_id)
        if state is None:
            return None
        if error is not None:
            state.error = error
        return self._output(state, time.monotonic())

    def _output(self, state: RequestState, now: float) -> RequestOutput:
        completions = []
        for i, seq in enumerate(state.seqs):
            text = state.detokenizers[i].text
            if not seq.is_finished:
                hold = seq.params.output_text_buffer_length
                if hold:
                    text = text[:max(state.sent_chars[i], len(text) - hold)]
            out_ids = seq.output_token_ids
            completions.append(CompletionOutput(
                index=seq.index,
                text=text,
                token_ids=out_ids,
                finish_reason=seq.status.finish_reason,
                stop_reason=seq.stop_reason,
                delta_text=text[state.sent_chars[i]:],
                delta_token_ids=out_ids[state.sent_tokens[i]:],
            ))
            state.sent_chars[i] = len(text)
            state.sent_tokens[i] = len(out_ids)
        finished = state.finished
        if finished:
            state.metrics.finished_time = now
            del self.states[state.request_id]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            error=state.error,
            num_cached_tokens=max(0, state.seqs[0].num_cached_tokens),
            metrics=state.metrics,
        )

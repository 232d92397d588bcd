"""The frontend's half of every step: turns the engine core's plain `SeqOutput`s into text and
`RequestOutput`s. It keeps its own copy of each request's generated tokens, text and logprobs;
it never touches the scheduler or a `Sequence`.

Stop strings live here (they are about text). A match cuts the text at the stop (keeping it
with `include_stop_str_in_output`), drops any token after it, and returns the sequence's id
to be aborted in the engine core, which frees its blocks — so nothing after a stop is ever
streamed, however far the engine got in the meantime. While streaming, the last
`len(longest stop) - 1` characters are held back so a stop string that is still forming is
never sent and then retracted.

What an output holds follows the request's `output_kind` (everything so far, only what is new,
or nothing until the end). A request with `best_of > n` and a beam search are ranked only once
all their sequences have finished, so they produce a single, final output.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pagedbackend.metrics import EngineStats
from pagedbackend.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from pagedbackend.sampling_params import RequestOutputKind, SamplingParams
from pagedbackend.step import BeamHypothesis, RequestDone, SeqOutput, TokenLogprobs
from pagedbackend.tokenizer import IncrementalDetokenizer, make_detokenizer


@dataclass
class SampleState:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_chars: int = 0
    sent_tokens: int = 0
    logprob_dicts: list[PositionLogprobs] = field(default_factory=list)


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    metrics: RequestMetrics
    beam_search: bool = False
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=lambda: [None])
    num_cached_tokens: int = 0
    error: str | None = None
    done: bool = False  # ended by the engine as a whole (abort, error, beam search over)
    beams: list[BeamHypothesis] | None = None
    sent_prompt_logprobs: bool = False

    @property
    def finished(self) -> bool:
        return self.done or all(s.finish_reason is not None for s in self.samples)

    @property
    def final_only(self) -> bool:
        """Outputs only once finished: asked for, or the sequences are ranked at the end."""
        return (self.params.output_kind == RequestOutputKind.FINAL_ONLY or self.beam_search
                or self.params.num_samples > self.params.n)


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
    """Thread-safe: requests are registered from submitting threads while another thread
    processes the engine's outputs."""

    def __init__(self, tokenizer: Any, stats: EngineStats | None = None) -> None:
        self.tokenizer = tokenizer
        self.stats = stats if stats is not None else EngineStats()
        self.states: dict[str, RequestState] = {}
        self._token_text: dict[int, str] = {}
        self._lock = threading.Lock()

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float, beam_search: bool = False) -> None:
        samples = [] if beam_search else [
            SampleState(i, make_detokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                            params.spaces_between_special_tokens))
            for i in range(params.num_samples)]
        with self._lock:
            if request_id in self.states:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self.states[request_id] = RequestState(request_id, prompt, prompt_token_ids, params, samples,
                                                   RequestMetrics(arrival_time), beam_search)

    def remove(self, request_id: str) -> None:
        with self._lock:
            self.states.pop(request_id, None)

    def process(self, outputs: list[SeqOutput | RequestDone]) -> tuple[list[RequestOutput], list[int]]:
        """(one output per touched request, ids of sequences a stop string ended: abort them)."""
        now = time.monotonic()
        aborts: list[int] = []
        results: list[RequestOutput] = []
        with self._lock:
            touched: dict[str, RequestState] = {}
            for out in outputs:
                state = self.states.get(out.request_id)
                if state is None:
                    continue
                touched[out.request_id] = state
                if isinstance(out, RequestDone):
                    self._done(state, out)
                else:
                    self._seq_output(state, out, now, aborts)
            for state in touched.values():
                result = self._output(state, now)
                if result is not None:
                    results.append(result)
                    if result.finished:
                        self.stats.record_finished(result)
        return results, aborts

    def _done(self, state: RequestState, out: RequestDone) -> None:
        state.done = True
        state.beams = out.beams
        if out.error is not None:
            state.error = out.error
        for sample in state.samples:
            if sample.finish_reason is None:
                sample.finish_reason = out.finish_reason

    def _seq_output(self, state: RequestState, out: SeqOutput, now: float, aborts: list[int]) -> None:
        if out.new_prompt_logprobs:
            state.prompt_logprobs.extend(out.new_prompt_logprobs)
        if state.beam_search or not out.new_token_ids and out.finish_reason is None:
            return
        sample = state.samples[out.index]
        if sample.finish_reason is not None:
            return  # a stop string ended it; tokens the engine computed meanwhile are dropped
        if out.index == 0 and not sample.token_ids:
            state.num_cached_tokens = out.num_cached_tokens
        m = state.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        params = state.params
        detok = sample.detokenizer
        for i, token in enumerate(out.new_token_ids):
            m.num_generated_tokens += 1
            sample.token_ids.append(token)
            if out.new_logprobs is not None:
                sample.logprobs.append(out.new_logprobs[i])
            before = len(detok.text)
            detok.add(token)
            last = i == len(out.new_token_ids) - 1
            stopped_by_token = last and out.finish_reason == "stop"
            if params.stop and not stopped_by_token and len(sample.token_ids) > params.min_tokens:
                match = find_stop_string(detok.text, len(detok.text) - before, params.stop)
                if match is not None:
                    stop, idx = match
                    detok.text = detok.text[:idx + len(stop) if params.include_stop_str_in_output else idx]
                    sample.finish_reason, sample.stop_reason = "stop", stop
                    sample.cumulative_logprob = out.cumulative_logprob
                    if not (last and out.finish_reason is not None):  # the engine goes on: stop it
                        aborts.append(out.seq_id)
                    return
        sample.cumulative_logprob = out.cumulative_logprob
        if out.finish_reason is not None:
            sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
            if out.error is not None:
                state.error = out.error

    def _output(self, state: RequestState, now: float) -> RequestOutput | None:
        finished = state.finished
        if state.final_only and not finished:
            return None
        if state.beam_search:
            completions = self._beam_completions(state)
        else:
            completions = self._completions(state)
            if state.params.num_samples > state.params.n:  # best_of: the n most likely samples
                completions = sorted(completions, key=lambda c: -c.cumulative_logprob)[:state.params.n]
                for rank, c in enumerate(completions):
                    c.index = rank
        if finished:
            state.metrics.finished_time = now
            del self.states[state.request_id]
        prompt_logprobs = None
        if state.params.prompt_logprobs is not None and not (
                state.params.output_kind == RequestOutputKind.DELTA and state.sent_prompt_logprobs):
            if len(state.prompt_logprobs) == len(state.prompt_token_ids):
                prompt_logprobs = [None] + [self._position(e) for e in state.prompt_logprobs[1:]]
                state.sent_prompt_logprobs = True
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            error=state.error,
            num_cached_tokens=state.num_cached_tokens,
            metrics=state.metrics,
            prompt_logprobs=prompt_logprobs,
        )

    def _completions(self, state: RequestState) -> list[CompletionOutput]:
        params = state.params
        delta = params.output_kind == RequestOutputKind.DELTA
        wants_cumulative = params.logprobs is not None or params.num_samples > params.n
        completions = []
        for sample in state.samples:
            text = sample.detokenizer.text
            if sample.finish_reason is None:
                hold = params.output_text_buffer_length
                if hold:
                    text = text[:max(sample.sent_chars, len(text) - hold)]
            out_ids = sample.token_ids
            logprobs = None
            if params.logprobs is not None:
                dicts = sample.logprob_dicts
                dicts.extend(self._position(e) for e in sample.logprobs[len(dicts):len(out_ids)])
                logprobs = dicts[sample.sent_tokens:] if delta else list(dicts)
            delta_text, delta_ids = text[sample.sent_chars:], out_ids[sample.sent_tokens:]
            completions.append(CompletionOutput(
                index=sample.index,
                text=delta_text if delta else text,
                token_ids=list(delta_ids) if delta else list(out_ids),
                cumulative_logprob=sample.cumulative_logprob if wants_cumulative else None,
                logprobs=logprobs,
                finish_reason=sample.finish_reason,
                stop_reason=sample.stop_reason,
                delta_text=delta_text,
                delta_token_ids=list(delta_ids),
            ))
            sample.sent_chars = len(text)
            sample.sent_tokens = len(out_ids)
        return completions

    def _beam_completions(self, state: RequestState) -> list[CompletionOutput]:
        """The finished hypotheses, best first (a search aborted early returns what it has)."""
        out = []
        skip = state.params.skip_special_tokens
        for i, hyp in enumerate(state.beams or []):
            text = self.tokenizer.decode(hyp.token_ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            out.append(CompletionOutput(index=i, text=text, token_ids=hyp.token_ids,
                                        cumulative_logprob=hyp.cumulative_logprob, finish_reason=hyp.finish_reason,
                                        delta_text=text, delta_token_ids=hyp.token_ids))
        return out

    def _position(self, entry: TokenLogprobs) -> PositionLogprobs:
        """vLLM's per-position dict: the chosen token first, then the top-k alternatives."""
        result = {entry.token: Logprob(entry.logprob, entry.rank, self._decode_one(entry.token))}
        for token, (logprob, rank) in entry.top.items():
            if token not in result:
                result[token] = Logprob(logprob, rank, self._decode_one(token))
        return result

    def _decode_one(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token], clean_up_tokenization_spaces=False)
        return text

"""Turns sequences' new tokens into text and `RequestOutput`s.

Stop strings live here (they are about text): a match ends the sequence through the scheduler,
which frees its blocks. While streaming, the last `len(longest stop) - 1` characters are held
back so a stop string that is still forming is never sent and then retracted.

What an output holds follows the request's `output_kind` (everything so far, only what is new,
or nothing until the end). A request with `best_of > n` and a beam search are ranked only once
all their sequences have finished, so they produce a single, final output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedbackend.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from pagedbackend.sampler import TokenLogprobs
from pagedbackend.sampling_params import RequestOutputKind, SamplingParams
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
    beam_group: Any = None  # pagedbackend.beam_search.BeamSearchGroup for beam search
    sent_chars: list[int] = field(default_factory=list)
    sent_tokens: list[int] = field(default_factory=list)
    sent_prompt_logprobs: bool = False
    error: str | None = None

    def __post_init__(self) -> None:
        self.sent_chars = [0] * len(self.seqs)
        self.sent_tokens = [0] * len(self.seqs)
        self.logprob_dicts: list[list[PositionLogprobs]] = [[] for _ in self.seqs]

    @property
    def finished(self) -> bool:
        seqs = self.beam_group.running if self.beam_group is not None else self.seqs
        return all(s.is_finished for s in seqs)

    @property
    def final_only(self) -> bool:
        """Outputs only once finished: asked for, or the sequences are ranked at the end."""
        return (self.params.output_kind == RequestOutputKind.FINAL_ONLY or self.beam_group is not None
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
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self._token_text: dict[int, str] = {}

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
            if state.beam_group is not None:
                continue  # beams are detokenized once, when the search is over
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
        outputs = (self._output(state, now) for state in touched.values())
        return [out for out in outputs if out is not None]

    def finish_without_token(self, request_id: str, error: str | None = None) -> RequestOutput | None:
        """Final output for a request ended from outside (abort, failed step)."""
        state = self.states.get(request_id)
        if state is None:
            return None
        if error is not None:
            state.error = error
        return self._output(state, time.monotonic())

    def _output(self, state: RequestState, now: float) -> RequestOutput | None:
        finished = state.finished
        if state.final_only and not finished:
            return None
        if state.beam_group is not None:
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
            seq = state.seqs[0]
            if len(seq.prompt_logprobs) == seq.prompt_len:
                prompt_logprobs = [None] + [self._position(e) for e in seq.prompt_logprobs[1:]]
                state.sent_prompt_logprobs = True
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            error=state.error,
            num_cached_tokens=max(0, state.seqs[0].num_cached_tokens),
            metrics=state.metrics,
            prompt_logprobs=prompt_logprobs,
        )

    def _completions(self, state: RequestState) -> list[CompletionOutput]:
        delta = state.params.output_kind == RequestOutputKind.DELTA
        completions = []
        for i, seq in enumerate(state.seqs):
            text = state.detokenizers[i].text
            if not seq.is_finished:
                hold = seq.params.output_text_buffer_length
                if hold:
                    text = text[:max(state.sent_chars[i], len(text) - hold)]
            out_ids = seq.output_token_ids
            logprobs = None
            if seq.params.logprobs is not None:
                dicts = state.logprob_dicts[i]
                dicts.extend(self._position(e) for e in seq.logprobs[len(dicts):])
                logprobs = dicts[state.sent_tokens[i]:] if delta else list(dicts)
            delta_text, delta_ids = text[state.sent_chars[i]:], out_ids[state.sent_tokens[i]:]
            completions.append(CompletionOutput(
                index=seq.index,
                text=delta_text if delta else text,
                token_ids=delta_ids if delta else out_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.wants_logprobs else None,
                logprobs=logprobs,
                finish_reason=seq.status.finish_reason,
                stop_reason=seq.stop_reason,
                delta_text=delta_text,
                delta_token_ids=delta_ids,
            ))
            state.sent_chars[i] = len(text)
            state.sent_tokens[i] = len(out_ids)
        return completions

    def _beam_completions(self, state: RequestState) -> list[CompletionOutput]:
        """The finished hypotheses, best first (a search aborted early returns what it has)."""
        out = []
        skip = state.params.skip_special_tokens
        for i, hyp in enumerate(state.beam_group.best()):
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

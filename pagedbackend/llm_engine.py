"""The synchronous engine: add requests, `step()` until done. One step = schedule, execute,
update, detokenize. `LLM` drives it for offline batches; `AsyncLLMEngine` runs it on a thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Union

from pagedbackend.beam_search import BeamSearchGroup, BeamSearchParams
from pagedbackend.config import EngineArgs, EngineConfig
from pagedbackend.errors import InvalidRequest
from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.metrics import EngineStats
from pagedbackend.model_runner import ModelRunner
from pagedbackend.output_processor import OutputProcessor, RequestState
from pagedbackend.outputs import RequestMetrics, RequestOutput
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.scheduler import Scheduler
from pagedbackend.sequence import Sequence, SequenceStatus
from pagedbackend.tokenizer import load_tokenizer, max_token_chars

logger = logging.getLogger(__name__)

# A prompt is text, or vLLM's dict forms {"prompt": text} / {"prompt_token_ids": [...]}.
PromptType = Union[str, Mapping[str, Any]]


@dataclass
class PreparedRequest:
    """A request that passed every check and is tokenized: what the engine loop still has to
    do with it is only bookkeeping. Built by `LLMEngine.process_request`, on the caller's
    thread when the engine runs on its own (so a slow or bad prompt costs its sender only)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int
    bad_words_ids: list[list[int]]


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.runner = ModelRunner(config, progress)
        config.num_kv_blocks = self.runner.num_blocks
        self.kv_cache_manager = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                               self.runner.num_host_blocks)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len, config.enable_chunked_prefill,
                                   config.scheduling_policy, config.preemption_mode)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats()
        self._request_ids = itertools.count()
        self._eos_ids = self._eos_token_ids()
        # A prompt longer than this many characters cannot fit max_model_len tokens (no token
        # covers more than max_token_chars characters); twice that leaves room for normalisers.
        self.max_prompt_chars = config.max_prompt_chars or 2 * max_token_chars(self.tokenizer) * config.max_model_len

    @classmethod
    def from_engine_args(cls, args: EngineArgs, progress: bool = True) -> "LLMEngine":
        return cls(args.create_engine_config(), progress)

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.config.model_config.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None and tok_eos not in ids:
            ids.append(tok_eos)
        return tuple(ids)

    # --------------------------------------------------------------- requests
    def new_request_id(self) -> str:
        return str(next(self._request_ids))

    def tokenize_prompt(self, prompt: PromptType, truncate: int | None = None) -> tuple[str | None, list[int]]:
        """Validate a prompt and return (text, token ids), keeping only the last `truncate`
        tokens if given (vLLM's truncate_prompt_tokens); errors name the field. Sizes are
        checked before any per-character or per-token work."""
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, Mapping):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise InvalidRequest("prompt", f"prompt: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                                               "use 'prompt' or 'prompt_token_ids'")
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if text is not None and not isinstance(text, str):
                raise InvalidRequest("prompt", f"prompt must be a string, got {type(text).__name__}")
        else:
            raise InvalidRequest("prompt", f"prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got {type(prompt).__name__}")
        max_len = self.config.max_model_len
        if ids is None:
            if text is None or text == "":
                raise InvalidRequest("prompt", "prompt must not be empty")
            if len(text) > self.max_prompt_chars:
                raise InvalidRequest("prompt", f"prompt is {len(text)} characters, more than max_prompt_chars="
                                               f"{self.max_prompt_chars} (max_model_len is {max_len} tokens)")
            ids = self.tokenizer.encode(text)
            if not ids:
                raise InvalidRequest("prompt", "prompt: the text encodes to zero tokens")
        else:
            if not isinstance(ids, (list, tuple)):
                raise InvalidRequest("prompt_token_ids", "prompt_token_ids must be a list of integers")
            if not ids:
                raise InvalidRequest("prompt_token_ids", "prompt_token_ids must not be empty")
            limit = self.max_prompt_chars if truncate is not None else max_len - 1
            if len(ids) > limit:
                raise InvalidRequest("prompt", f"prompt is {len(ids)} tokens, max_model_len is "
                                                         f"{max_len}: it must be shorter to leave room for at least "
                                                         "one generated token")
            if not all(type(t) is int for t in ids):
                raise InvalidRequest("prompt_token_ids", "prompt_token_ids must be a list of integers")
            vocab = self.config.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest("prompt_token_ids", f"prompt_token_ids: token id {bad[0]} is out of range [0, {vocab})")
            ids = list(ids)
        if truncate is not None:
            ids = ids[-truncate:]
        if len(ids) >= max_len:
            raise InvalidRequest("prompt", f"prompt is {len(ids)} tokens, max_model_len is {max_len}: "
                             "it must be shorter to leave room for at least one generated token")
        return text, ids

    def process_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                        arrival_time: float | None = None, priority: int = 0,
                        max_tokens_fit: bool = False) -> PreparedRequest:
        """Every check a request must pass, cheapest first, and its tokenization. Reads only
        immutable engine state, so any thread may call it while the loop runs.

        `max_tokens_fit`: refuse a `max_tokens` beyond what the context leaves after the
        prompt, as vLLM's server does (the serving frontends ask for it); without it, as in
        vLLM's offline `LLM`, generation simply stops at max_model_len."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("sampling_params", f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequest("priority", f"priority must be an integer, got {priority!r}")
        max_seqs = self.config.max_num_seqs
        if params.num_samples > max_seqs:
            name = "best_of" if params.best_of is not None and params.best_of > params.n else "n"
            raise InvalidRequest(name, f"{name}={getattr(params, name)} exceeds max_num_seqs={max_seqs}: "
                                       "a request's samples must fit one batch")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.config.max_logprobs:
                raise InvalidRequest(name, f"{name} must be at most max_logprobs={self.config.max_logprobs}, got {value}")
        self._check_token_ids(params)
        text, ids = self.tokenize_prompt(prompt, params.truncate_prompt_tokens)
        room = self.config.max_model_len - len(ids)
        if max_tokens_fit and params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequest("max_tokens", f"'max_tokens' or 'max_completion_tokens' is too large: {params.max_tokens}. This model's maximum "
                                               f"context length is {self.config.max_model_len} tokens and your request "
                                               f"has {len(ids)} input tokens ({params.max_tokens} > "
                                               f"{self.config.max_model_len} - {len(ids)}).")
        bad_words_ids = self._bad_words_ids(params.bad_words) if params.bad_words else []
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        return PreparedRequest(str(request_id), text, ids, params, arrival, priority, bad_words_ids)

    def _check_token_ids(self, params: SamplingParams) -> None:
        """Token ids in the request must be rows of the model's logits (vLLM's messages)."""
        vocab = self.config.model_config.vocab_size
        if params.allowed_token_ids is not None:
            bad = [t for t in params.allowed_token_ids if t >= vocab]
            if bad:
                raise InvalidRequest("allowed_token_ids", f"allowed_token_ids contains out-of-vocab token id(s) "
                                                          f"{bad[:8]}; vocabulary size: {vocab}")
        if params.logit_bias:
            bad = sorted(t for t in params.logit_bias if t >= vocab)
            if bad:
                raise InvalidRequest("logit_bias", f"token_id(s) {bad[:8]} in logit_bias contain out-of-vocab token "
                                                   f"ids. Vocabulary size: {vocab}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        self.add_prepared(self.process_request(request_id, prompt, params, arrival_time, priority))

    def add_prepared(self, req: PreparedRequest) -> None:
        """Queue a request that `process_request` accepted: sequences and bookkeeping only."""
        self._check_new_request(req.request_id, req.priority)
        params, ids = req.params, req.prompt_token_ids
        seqs = []
        for i in range(params.num_samples):
            p = params.clone(_eos_token_ids=self._eos_ids,
                             seed=None if params.seed is None else params.seed + i)
            seq = Sequence(req.request_id, ids, p, req.arrival_time, index=i, priority=req.priority)
            seq.bad_words_ids = req.bad_words_ids
            seqs.append(seq)
        self.scheduler.add_request(seqs)
        op = self.output_processor
        op.add(RequestState(req.request_id, req.prompt, ids, params, seqs,
                            [op.make_detokenizer(ids, s.params) for s in seqs], RequestMetrics(req.arrival_time)))
        self.stats.prompt_tokens += len(ids)

    def add_beam_search_request(self, request_id: str, prompt: PromptType, params: BeamSearchParams,
                                arrival_time: float | None = None, priority: int = 0) -> None:
        """A beam search over `params.beam_width` beams that share KV blocks; its one output
        arrives when the search is over, holding the best `beam_width` hypotheses."""
        if not isinstance(params, BeamSearchParams):
            raise InvalidRequest("params", f"params must be a BeamSearchParams, got {type(params).__name__}")
        self._check_new_request(request_id, priority)
        text, ids = self.tokenize_prompt(prompt)
        eos = () if params.ignore_eos else self._eos_ids
        seq_params = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
                                    include_stop_str_in_output=params.include_stop_str_in_output,
                                    _eos_token_ids=self._eos_ids)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seq = Sequence(request_id, ids, seq_params, arrival, priority=priority)
        group = BeamSearchGroup(params, len(ids), frozenset(eos), self.config.max_model_len)
        group.start(seq)
        self.scheduler.add_request([seq])
        self.output_processor.add(RequestState(request_id, text, ids, seq_params, [seq], [], RequestMetrics(arrival),
                                               beam_group=group))
        self.stats.prompt_tokens += len(ids)

    def _check_new_request(self, request_id: str, priority: int) -> None:
        if request_id in self.output_processor.states:
            raise InvalidRequest("request_id", f"request_id {request_id!r} is already in use")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequest("priority", f"priority must be an integer, got {priority!r}")

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Token sequences of each bad word as it appears at the start of the text and after a
        space (vLLM tokenizes both forms too; it drops the spaced one when its length differs,
        which lets " word" through whenever the word alone takes several tokens)."""
        result: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in result:
                    result.append(ids)
        return result

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks; returns its final output (finish_reason
        "abort"), or None if it is unknown or already finished."""
        if not self.scheduler.finish_request(request_id, SequenceStatus.FINISHED_ABORTED):
            return None
        out = self.output_processor.finish_without_token(request_id)
        if out is not None and out.finished:
            self.stats.record_finished(out)
        return out

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            self.runner.sampler.forget(sched_out.finished_seq_ids)
            return []
        try:
            sampled = self.runner.execute(sched_out)
        except Exception as e:  # fail this step's requests, keep serving the rest
            logger.exception("step failed; failing %d request(s)", len(sched_out.scheduled))
            outputs = []
            for request_id in self.scheduler.fail_step(sched_out):
                out = self.output_processor.finish_without_token(request_id, f"{type(e).__name__}: {e}")
                if out is not None:
                    self.stats.record_finished(out)
                    outputs.append(out)
            return outputs
        self.stats.steps += 1
        updated = self.scheduler.update_from_output(sched_out, sampled)
        self.stats.generation_tokens += len(updated)
        outputs = self.output_processor.process(updated, self.scheduler)
        for out in outputs:
            if out.finished:
                self.stats.record_finished(out)
        return outputs

    # ------------------------------------------------------------------ stats
    def get_stats(self) -> dict[str, Any]:
        sched = self.scheduler.stats
        kv = self.kv_cache_manager
        running = {s.request_id for s in self.scheduler.running}
        return {
            "kv_cache_usage": kv.usage,
            "num_kv_blocks": kv.num_blocks,
            "num_free_blocks": kv.num_free_blocks,
            "num_running_requests": len(running),
            "num_waiting_requests": len(self.scheduler.requests) - len(running),
            "num_running": len(self.scheduler.running),  # sequences
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": sched.num_preemptions,
            "num_swapped": len(self.scheduler.swapped),
            "num_swapped_out": sched.num_swapped_out,
            "num_swapped_in": sched.num_swapped_in,
            "num_free_host_blocks": kv.num_free_host_blocks,
            "last_batch_seqs": sched.last_batch_seqs,
            "max_batch_seqs": sched.max_batch_seqs,
            "num_chunked_prefill_steps": sched.num_chunked_prefill_steps,
            "prefix_cache_queries": kv.prefix_stats.queries,
            "prefix_cache_hits": kv.prefix_stats.hits,
            "prefix_cache_hit_rate": kv.prefix_stats.hit_rate,
            "prompt_tokens": self.stats.prompt_tokens,
            "generation_tokens": self.stats.generation_tokens,
            "steps": self.stats.steps,
            "requests_finished": dict(self.stats.requests_finished),
            "time_to_first_token_seconds": _histogram_dict(self.stats.ttft_histogram),
            "time_per_output_token_seconds": _histogram_dict(self.stats.tpot_histogram),
        }

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (vLLM's name); False, changing nothing, while requests run."""
        return self.kv_cache_manager.reset_prefix_cache()

    def check_all_blocks_free(self) -> None:
        """AssertionError unless no request holds a block (tests call this after every run)."""
        self.scheduler.check_all_free()


def _histogram_dict(h) -> dict[str, Any]:
    return {"buckets": list(h.bounds), "cumulative_counts": h.cumulative(), "sum": h.total, "count": h.count}

"""The synchronous engine: the frontend pieces (validation and tokenization, the output
processor) around an `EngineCore` (scheduler, KV cache manager, executor). One `step()` = the
core's fold (schedule, execute, update), then detokenization and stop strings, whose aborts go
back to the core. `LLM` drives it for offline batches on one thread; `AsyncLLMEngine` uses the
same pieces with the core on its own thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Union

from pagedbackend.beam_search import BeamSearchParams
from pagedbackend.config import EngineArgs, EngineConfig
from pagedbackend.engine_core import EngineCore
from pagedbackend.errors import InvalidRequest
from pagedbackend.executor import make_executor
from pagedbackend.metrics import EngineStats, StatsSnapshot
from pagedbackend.model_runner import pin_device
from pagedbackend.output_processor import OutputProcessor
from pagedbackend.outputs import RequestOutput
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.structured_output.compiler import GrammarCompiler
from pagedbackend.structured_output.params import StructuredOutputsParams
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
    grammar: Any = None  # structured output: the compiled grammar (xgrammar), shared through the cache


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.executor = make_executor(config, progress)
        config.num_kv_blocks = self.executor.num_blocks
        self._eos_ids = self._eos_token_ids()
        self.core = EngineCore(self.executor, block_size=config.block_size,
                               enable_prefix_caching=config.enable_prefix_caching, max_num_seqs=config.max_num_seqs,
                               max_num_batched_tokens=config.max_num_batched_tokens,
                               max_model_len=config.max_model_len, enable_chunked_prefill=config.enable_chunked_prefill,
                               scheduling_policy=config.scheduling_policy, preemption_mode=config.preemption_mode,
                               eos_token_ids=self._eos_ids, speculative_config=config.speculative_config,
                               vocab_size=config.model_config.vocab_size)
        # Grammars for structured output compile on the submitting thread (process_request).
        self.grammar_compiler = GrammarCompiler(self.tokenizer, config.model_config.vocab_size, self._eos_ids)
        self.stats = EngineStats()
        self.output_processor = OutputProcessor(self.tokenizer, self.stats)
        self._request_ids = itertools.count()
        # A prompt longer than this many characters cannot fit max_model_len tokens (no token
        # covers more than max_token_chars characters); twice that leaves room for normalisers.
        self.max_prompt_chars = config.max_prompt_chars or 2 * max_token_chars(self.tokenizer) * config.max_model_len

    # The parts, for tests and tools that look inside.
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def kv_cache_manager(self):
        return self.core.kv_cache_manager

    @property
    def runner(self):
        return self.executor.runner

    def pin_thread_device(self) -> None:
        """Make the in-process runner's GPU the calling thread's current CUDA device. The thread
        that steps the engine launches that rank's kernels, and Triton launches on the current
        device (per thread, 0 by default), not the tensors'. A no-op off CUDA."""
        runner = getattr(self.executor, "runner", None)
        if runner is not None:
            pin_device(runner.device)

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
        # Last: the one check that may take long (a big schema compiles), once everything
        # cheaper passed; cached, so a repeated schema costs a lookup.
        grammar = self._compile_grammar(params.structured_outputs) if params.structured_outputs else None
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        return PreparedRequest(str(request_id), text, ids, params, arrival, priority, bad_words_ids, grammar)

    def _compile_grammar(self, constraint: StructuredOutputsParams) -> Any:
        if self.config.structured_outputs_config.disable_any_whitespace and not constraint.disable_any_whitespace:
            constraint = dataclasses.replace(constraint, disable_any_whitespace=True)  # the engine's default
        return self.grammar_compiler.compile(constraint)

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
        """Queue a request that `process_request` accepted: the output processor's state, then
        the core's sequences."""
        self.output_processor.add_request(req.request_id, req.prompt, req.prompt_token_ids, req.params,
                                          req.arrival_time)
        try:
            self.core.add(req)
        except BaseException:
            self.output_processor.remove(req.request_id)
            raise

    def add_beam_search_request(self, request_id: str, prompt: PromptType, params: BeamSearchParams,
                                arrival_time: float | None = None, priority: int = 0) -> None:
        """A beam search over `params.beam_width` beams that share KV blocks; its one output
        arrives when the search is over, holding the best `beam_width` hypotheses."""
        if not isinstance(params, BeamSearchParams):
            raise InvalidRequest("params", f"params must be a BeamSearchParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequest("priority", f"priority must be an integer, got {priority!r}")
        if params.beam_width > self.config.max_num_seqs:
            raise InvalidRequest("beam_width", f"beam_width={params.beam_width} exceeds max_num_seqs="
                                               f"{self.config.max_num_seqs}")
        text, ids = self.tokenize_prompt(prompt)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seq_params = self.core.add_beam_search(request_id, ids, params, arrival, priority)
        try:
            self.output_processor.add_request(request_id, text, ids, seq_params, arrival, beam_search=True)
        except BaseException:
            self.core.abort(request_id)
            self.core.take_outputs()
            raise

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
        if not self.core.abort(request_id):
            return None
        outputs = self._process(self.core.take_outputs())
        return next((o for o in outputs if o.request_id == request_id and o.finished), None)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        return self._process(self.core.step())

    def _process(self, core_outputs) -> list[RequestOutput]:
        outputs, aborts = self.output_processor.process(core_outputs)
        if aborts:  # stop strings: the frontend's stop decisions go back to the core
            self.core.abort_seqs(aborts)
        return outputs

    # ------------------------------------------------------------------ stats
    def get_stats(self) -> dict[str, Any]:
        """The core's counters and gauges, and the frontend's finished-request statistics."""
        return self.stats_snapshot().as_dict()

    def stats_snapshot(self) -> StatsSnapshot:
        return StatsSnapshot.from_dict({**self.core.stats(), **self.frontend_stats()})

    def frontend_stats(self) -> dict[str, Any]:
        """What the frontend counts: finished requests and their latencies, grammar compiles
        (safe from any thread; the core's counters are the engine loop's)."""
        return {**self.stats.snapshot(), **self.grammar_compiler.stats.snapshot()}

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (vLLM's name); False, changing nothing, while requests run."""
        return self.kv_cache_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the executor: tensor-parallel workers end (bounded), the process group is left.
        Idempotent; a one-rank engine has nothing to stop."""
        self.executor.shutdown()

    def check_all_blocks_free(self) -> None:
        """AssertionError unless no request holds a block (tests call this after every run)."""
        self.scheduler.check_all_free()
        grammars = self.core.structured_output
        assert not grammars, f"{len(grammars)} grammar matcher(s) outlived their sequences"


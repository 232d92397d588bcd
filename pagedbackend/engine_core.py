"""The engine core: the scheduler, the KV cache manager and an executor, and one step as a fold
with no back-edges:

    out = scheduler.schedule(); result = executor.execute(out); outputs = scheduler.update(out, result)

Requests come in already validated and tokenized (`PreparedRequest`, from the frontend); what
goes out is plain data (`SeqOutput`, `RequestDone`) for the frontend to turn into text. Stop
decisions the frontend makes (stop strings) come back as `abort_seqs`. No text, no tensors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pagedbackend.executor.base import ExecutorDied
from pagedbackend.beam_search import BeamSearchGroup, BeamSearchParams
from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.scheduler import CoreOutput, Scheduler
from pagedbackend.sequence import Sequence, SequenceStatus
from pagedbackend.spec_decode.config import SpeculativeConfig
from pagedbackend.step import RequestDone, SeqOutput
from pagedbackend.structured_output.manager import StructuredOutputManager

if TYPE_CHECKING:  # the core itself never needs the frontend's module
    from pagedbackend.executor import Executor
    from pagedbackend.llm_engine import PreparedRequest

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, executor: "Executor", *, block_size: int, enable_prefix_caching: bool, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, enable_chunked_prefill: bool,
                 scheduling_policy: str, preemption_mode: str, eos_token_ids: tuple[int, ...],
                 speculative_config: SpeculativeConfig | None = None, vocab_size: int | None = None) -> None:
        self.executor = executor
        self.kv_cache_manager = KVCacheManager(executor.num_blocks, block_size, enable_prefix_caching,
                                               executor.num_host_blocks)
        spec = speculative_config
        self.scheduler = Scheduler(self.kv_cache_manager, max_num_seqs, max_num_batched_tokens, max_model_len,
                                   enable_chunked_prefill, scheduling_policy, preemption_mode,
                                   num_spec_tokens=spec.num_speculative_tokens if spec else 0,
                                   num_lookahead_slots=spec.num_lookahead_slots if spec else 0,
                                   spec_disable_by_batch_size=spec.disable_by_batch_size if spec else None)
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.num_steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._pending: list[CoreOutput] = []  # outputs of aborts, handed out with the next step's
        # Grammar matchers of constrained sequences (structured output); idle until one arrives.
        self.structured_output = StructuredOutputManager(vocab_size, eos_token_ids) if vocab_size else None

    # --------------------------------------------------------------- requests
    def add(self, req: "PreparedRequest") -> None:
        params, ids = req.params, req.prompt_token_ids
        seqs = []
        for i in range(params.num_samples):
            p = params.clone(_eos_token_ids=self.eos_token_ids, seed=None if params.seed is None else params.seed + i)
            seq = Sequence(req.request_id, ids, p, req.arrival_time, index=i, priority=req.priority)
            seq.bad_words_ids = req.bad_words_ids
            seqs.append(seq)
        if req.grammar is not None:
            self.structured_output.add([s.seq_id for s in seqs], req.grammar)
        try:
            self.scheduler.add_request(seqs)
        except BaseException:
            self._sweep_grammars()
            raise
        self.prompt_tokens += len(ids)

    def add_beam_search(self, request_id: str, prompt_token_ids: list[int], params: BeamSearchParams,
                        arrival_time: float, priority: int = 0) -> SamplingParams:
        """A beam search over `params.beam_width` beams sharing KV blocks; returns the
        per-beam SamplingParams (for the frontend's bookkeeping)."""
        eos = () if params.ignore_eos else self.eos_token_ids
        seq_params = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
                                    include_stop_str_in_output=params.include_stop_str_in_output,
                                    _eos_token_ids=self.eos_token_ids)
        seq = Sequence(request_id, prompt_token_ids, seq_params, arrival_time, priority=priority)
        group = BeamSearchGroup(params, len(prompt_token_ids), frozenset(eos), self.max_model_len)
        group.start(seq)
        self.scheduler.add_request([seq])
        self.prompt_tokens += len(prompt_token_ids)
        return seq_params

    def abort(self, request_id: str) -> bool:
        """End a request now and free its blocks; its `RequestDone` comes with the next outputs."""
        group = self.scheduler.beam_group(request_id)
        if not self.scheduler.finish_request(request_id, SequenceStatus.FINISHED_ABORTED):
            return False
        self._pending.append(RequestDone(request_id, "abort", beams=group.hypotheses() if group else None))
        self._sweep_grammars()
        return True

    def abort_seqs(self, seq_ids: list[int]) -> None:
        """Sequences the frontend ended (a stop string): free them; it already knows why."""
        self.scheduler.abort_seqs(seq_ids)
        self._sweep_grammars()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def take_outputs(self) -> list[CoreOutput]:
        outputs, self._pending = self._pending, []
        return outputs

    def stats(self) -> dict[str, Any]:
        """What the core knows now: KV, scheduler, prefix cache, swap, token counters."""
        sched, kv = self.scheduler, self.kv_cache_manager
        running = {s.request_id for s in sched.running}
        return {
            "kv_cache_usage": kv.usage,
            "num_kv_blocks": kv.num_blocks,
            "num_free_blocks": kv.num_free_blocks,
            "num_running_requests": len(running),
            "num_waiting_requests": len(sched.requests) - len(running),
            "num_running": len(sched.running),  # sequences
            "num_waiting": len(sched.waiting) - sched.num_swapped,
            "num_preemptions": sched.stats.num_preemptions,
            "num_swapped": sched.num_swapped,
            "num_swapped_out": sched.stats.num_swapped_out,
            "num_swapped_in": sched.stats.num_swapped_in,
            "num_free_host_blocks": kv.num_free_host_blocks,
            "last_batch_seqs": sched.stats.last_batch_seqs,
            "max_batch_seqs": sched.stats.max_batch_seqs,
            "num_chunked_prefill_steps": sched.stats.num_chunked_prefill_steps,
            "prefix_cache_queries": kv.prefix_stats.queries,
            "prefix_cache_hits": kv.prefix_stats.hits,
            "prefix_cache_hit_rate": kv.prefix_stats.hit_rate,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "steps": self.num_steps,
            "spec_decode_num_drafts": sched.spec_stats.num_drafts,
            "spec_decode_num_draft_tokens": sched.spec_stats.num_draft_tokens,
            "spec_decode_num_accepted_tokens": sched.spec_stats.num_accepted_tokens,
            "spec_decode_acceptance_rate": sched.spec_stats.acceptance_rate,
            "spec_decode_mean_accepted_length": sched.spec_stats.mean_accepted_length,
            "spec_decode_accepted_per_position": list(sched.spec_stats.accepted_per_position),
            "structured_output_requests": (self.structured_output.num_constrained_requests
                                           if self.structured_output is not None else 0),
        }

    # ------------------------------------------------------------------- step
    def step(self) -> list[CoreOutput]:
        out = self.scheduler.schedule()
        if out.is_empty and not out.removed_seq_ids and not out.finished_seq_ids:
            return self.take_outputs()
        grammars = self.structured_output
        try:
            if grammars:
                out.grammar = grammars.fill(out)
            result = self.executor.execute(out)
        except ExecutorDied as e:  # no step can run again: fail every request, then say so
            message = str(e)
            for request_id in list(self.scheduler.requests):
                self.scheduler.finish_request(request_id, SequenceStatus.FINISHED_ERROR)
                self._pending.append(RequestDone(request_id, "error", error=message))
            raise
        except Exception as e:  # fail this step's requests, keep serving the rest
            logger.exception("step failed; failing %d sequence(s)", len(out.scheduled))
            message = f"{type(e).__name__}: {e}"
            for request_id in self.scheduler.fail_step(out):
                self._pending.append(RequestDone(request_id, "error", error=message))
            self._sweep_grammars()
            return self.take_outputs()
        if out.scheduled:
            self.num_steps += 1
        outputs = self.scheduler.update(out, result)
        if grammars:
            outputs += self._advance_grammars(outputs, result.spec_token_ids)
        self.generation_tokens += sum(len(o.new_token_ids) for o in outputs if not isinstance(o, RequestDone))
        return self.take_outputs() + outputs

    def _advance_grammars(self, outputs: list[CoreOutput], proposals: dict[int, list[int]]) -> list[RequestDone]:
        """After a step: each constrained sequence's matcher takes the tokens it kept, and its
        new proposals are cut to what its grammar allows. A token the grammar refuses (another
        mask left no token it allows) fails that request, naming why (after its outputs)."""
        grammars, scheduler = self.structured_output, self.scheduler
        failed: list[RequestDone] = []
        for o in outputs:
            if isinstance(o, SeqOutput) and o.new_token_ids and o.seq_id in grammars:
                if not grammars.accept(o.seq_id, o.new_token_ids) and scheduler.finish_request(
                        o.request_id, SequenceStatus.FINISHED_ERROR):
                    failed.append(RequestDone(
                        o.request_id, "error", error="structured_outputs: the sampled token is not allowed by the "
                                                     "grammar (the request's other masks left no token it allows)"))
        for seq_id in proposals:
            seq = scheduler.seq(seq_id)
            if seq is not None and seq.spec_token_ids and seq_id in grammars:
                seq.spec_token_ids = grammars.validate_drafts(seq_id, seq.spec_token_ids)
        self._sweep_grammars()
        return failed

    def _sweep_grammars(self) -> None:
        if self.structured_output:
            self.structured_output.sweep(lambda seq_id: self.scheduler.seq(seq_id) is not None)

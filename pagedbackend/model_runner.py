"""Executes one scheduled step: flattened inputs -> model -> logits of sampling rows -> tokens.

Owns the model, the KV cache tensors, the sampler and the persistent batch (`InputBatch`):
the step's plain-data diffs update the batch, the inputs are gathered from it, and the tokens
it samples are appended to it. It knows nothing about queues, requests' text or frameworks.
Sequences computing a single token are placed first so the attention backend can batch them
as decodes; sampled tokens come back in the scheduler's order.

Decode-only steps can run padded (`EngineConfig.padded_decode`): on persistent input buffers,
the batch padded to the next CUDA-graph capture size (1, 2, 4, 8, 16, 24, ...) with rows that
write into a scratch block past the KV pool (the convention is in attention/metadata.py), so
every step of one size has the same shapes and addresses. On CUDA (`cuda_graphs`) each size is
captured once at start and replayed; steps with a prefill take the dynamic path. At start on
CUDA a dummy step of max_num_batched_tokens tokens measures the activations' peak memory
before the KV pool is sized, and compiles the kernels the first request would otherwise wait for.
"""

from __future__ import annotations

import bisect
import logging
import os
from typing import Callable

import numpy as np
import torch

from pagedbackend.attention import get_attention_backend
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.config import EngineConfig
from pagedbackend.distributed import rank_device, ranks_agree, tp_min
from pagedbackend.host_upload import HostUpload
from pagedbackend.input_batch import InputBatch, StepInputs
from pagedbackend.models.loader import load_model
from pagedbackend.sampler import Sampler, SamplingBatch, gather_logprobs
from pagedbackend.spec_decode.proposer import DraftModelProposer, NgramProposer, Proposer
from pagedbackend.spec_decode.verifier import verify
from pagedbackend.step import RunnerOutput, SchedulerOutput
from pagedbackend.structured_output.bitmask import grammar_rows

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        # Triton launches on the thread's current device, whatever the tensors' device is.
        pin_device(self.device)
        # What was free before this engine took anything: its budget counts only its own use, so
        # several engines (a model repository) can share a device as vLLM instances do.
        self._free_at_start = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        self.block_size = config.block_size
        self.model = load_model(config, progress, str(self.device))
        self.vocab_size = config.model_config.vocab_size
        layers = self.model.attention_layers()
        self.num_kv_heads = layers[0].num_kv_heads
        self.head_dim = layers[0].head_dim
        self.backend = get_attention_backend(config.attention_backend)
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        # A draft model (speculative decoding): its own KV cache, indexed by the same block ids.
        self.draft_model = load_model(config.draft, progress, str(self.device)) if config.draft else None
        self.draft_backend = get_attention_backend(config.draft.attention_backend) if config.draft else None
        # On CUDA, measured before the pool takes the memory (and the kernels compiled on the way).
        self.activation_bytes = self.profile_run() if self.device.type == "cuda" else None
        # The same pool (size and block ids) on every rank: the smallest any rank can hold.
        self.num_blocks = config.num_kv_blocks or tp_min(self._blocks_from_memory())
        min_blocks = self.max_blocks_per_seq
        if self.num_blocks < min_blocks:
            raise ValueError(
                f"num_kv_blocks: {self.num_blocks} blocks of {self.block_size} tokens cannot hold one sequence of "
                f"max_model_len={config.max_model_len} (needs {min_blocks}); give the KV cache more memory "
                "(num_kv_blocks / kv_cache_memory_fraction) or lower max_model_len"
            )
        # One block past the pool, never given to a sequence: padding rows of padded decode
        # steps write their K/V there (and the profile run's tokens).
        self.padding_block = self.num_blocks
        shape = self.backend.get_kv_cache_shape(self.num_blocks + 1, self.num_kv_heads, self.block_size,
                                                self.head_dim)
        # One tensor for every layer's K and V ([layers, 2, *shape]), so a block copy is one
        # operation over all layers. Zeros, not empty: padded block-table entries are read
        # (then masked), and must be finite.
        self.kv_cache = torch.zeros((len(layers), 2, *shape), dtype=config.dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(len(layers))]
        for layer, (key_cache, value_cache) in zip(layers, self.kv_caches):
            layer.bind(self.backend, key_cache, value_cache)
        self.draft_kv_cache = None
        if self.draft_model is not None:
            draft_layers = self.draft_model.attention_layers()
            shape = self.draft_backend.get_kv_cache_shape(self.num_blocks + 1, draft_layers[0].num_kv_heads,
                                                          self.block_size, draft_layers[0].head_dim)
            self.draft_kv_cache = torch.zeros((len(draft_layers), 2, *shape), dtype=config.dtype, device=self.device)
            for i, layer in enumerate(draft_layers):
                layer.bind(self.draft_backend, self.draft_kv_cache[i, 0], self.draft_kv_cache[i, 1])
        # Host-memory pool for swap preemption, block-major ([blocks, layers, 2, heads, block,
        # dim]): each host block is one contiguous slab, so a swap copies straight between it
        # and the device (pinned on CUDA: asynchronous DMA, no pageable temporary). Its own
        # tensor even on a CPU device, so the swap path is the same code everywhere.
        self.num_host_blocks = 0
        self.host_cache = None
        if config.preemption_mode == "swap":
            # Only the target's KV is swapped (a draft model recomputes its own on resumption).
            self.num_host_blocks = int(config.swap_space * 2**30 // self._block_bytes(self.model))
            # Empty: a host block is always written (swap out) before it is read (swap in).
            block_shape = self.backend.get_kv_cache_shape(1, self.num_kv_heads, self.block_size, self.head_dim)[1:]
            self.host_cache = torch.empty((self.num_host_blocks, len(layers), 2, *block_shape), dtype=config.dtype,
                                          pin_memory=self.device.type == "cuda")
            logger.info("swap space: %d host blocks (%.1f GiB)", self.num_host_blocks, config.swap_space)
        self.sampler = Sampler(self.device, config.seed)
        self.proposer: Proposer | None = None
        self._draft_probs: dict[int, torch.Tensor] = {}  # seq_id -> distribution its proposals were drawn from
        spec = config.speculative_config
        if spec is not None and spec.method == "ngram":
            self.proposer = NgramProposer(spec)
        elif spec is not None:
            self.proposer = DraftModelProposer(spec, self.draft_model, self.draft_backend, self.draft_kv_cache,
                                               config.max_num_batched_tokens, self._tensors, self.sampler)
        self.batch = InputBatch(config.max_num_seqs, config.max_model_len, self.block_size, self.vocab_size)
        self.padded: PaddedDecodeInputs | None = None
        self._graphs: dict[int, Callable[[], None]] = {}  # capture size -> replay
        self._graph_hidden: torch.Tensor | None = None  # the captured steps' output rows
        if config.padded_decode:
            self.padded = PaddedDecodeInputs(config.cuda_graph_sizes, self.max_blocks_per_seq,
                                             self.padding_block * self.block_size, self.padding_block, self.device)
            self._warm_up_decode(capture=config.cuda_graphs)

    @property
    def bytes_per_block(self) -> int:
        """A block's bytes in every cache that holds it: the target's, and the draft model's."""
        models = [self.model] + ([self.draft_model] if self.draft_model is not None else [])
        return sum(self._block_bytes(m) for m in models)

    def _block_bytes(self, model) -> int:
        layers = model.attention_layers()
        elem = torch.empty((), dtype=self.config.dtype).element_size()
        return 2 * len(layers) * layers[0].num_kv_heads * self.block_size * layers[0].head_dim * elem

    def _blocks_from_memory(self) -> int:
        cfg = self.config
        fraction = cfg.kv_cache_memory_fraction or 0.2
        per_block = self.bytes_per_block
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = cuda_kv_budget(fraction, total, self._free_at_start, free, self.activation_bytes or 0)
        else:
            budget = fraction * _host_available_bytes()
        # More blocks than max_num_seqs full-length sequences can use is only prefix cache.
        useful = cfg.max_num_seqs * self.max_blocks_per_seq
        num = min(int(budget // per_block) - 1, useful)  # - 1: the padding block
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB)", num, self.block_size, num * per_block / 2**20)
        return max(num, 0)

    # ------------------------------------------------------------------ warm-up
    @torch.inference_mode()
    def profile_run(self) -> int | None:
        """One dummy step of max_num_batched_tokens prompt tokens (sequences of max_model_len)
        and the logits of every one of them with a float32 log-softmax (a prompt-logprobs
        request over the whole step: the largest logits any step makes, beyond the sampler's
        max_num_seqs rows). It runs on a one-block scratch cache (every token writes slot 0;
        prompts with no context read no cache), so it can run before the pool exists. Returns
        the peak of memory allocated above the weights on CUDA (what the KV budget leaves
        free), None on the CPU. On the way, the prefill kernels of this shape are compiled."""
        cfg = self.config
        dev = self.device
        layers = self.model.attention_layers()
        bound = [(layer.backend, layer.kv_cache) for layer in layers]
        shape = self.backend.get_kv_cache_shape(1, self.num_kv_heads, self.block_size, self.head_dim)
        scratch = torch.zeros((len(layers), 2, *shape), dtype=cfg.dtype, device=dev)
        for i, layer in enumerate(layers):
            layer.bind(self.backend, scratch[i, 0], scratch[i, 1])
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        try:
            total = cfg.max_num_batched_tokens
            longest = min(total, cfg.max_model_len)
            lens = [longest] * (total // longest) + ([total % longest] if total % longest else [])
            starts = np.concatenate([[0], np.cumsum(lens)])
            positions = np.concatenate([np.arange(n) for n in lens])
            meta = AttentionMetadata(
                num_decodes=0, num_seqs=len(lens), num_tokens=total,
                slot_mapping=torch.zeros(total, dtype=torch.int64, device=dev),
                query_start_loc=torch.from_numpy(starts.astype(np.int32)).to(dev),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
                block_tables=torch.zeros((len(lens), -(-longest // self.block_size)), dtype=torch.int32, device=dev),
                max_query_len=longest, max_seq_len=longest, query_start_loc_host=starts.tolist(), seq_lens_host=lens)
            self.backend.prepare(meta, scratch[0, 0])
            hidden = self.model(torch.zeros(total, dtype=torch.int64, device=dev), torch.from_numpy(positions).to(dev),
                                meta)
            torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
            del hidden
            if not cuda:
                return None
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev) - base
            logger.info("profile run: %d tokens peak at %.1f MiB of activations", total, peak / 2**20)
            return peak
        finally:
            for layer, (backend, kv_cache) in zip(layers, bound):
                layer.backend, layer.kv_cache = backend, kv_cache
            del scratch
            if cuda:
                torch.cuda.empty_cache()

    def _warm_up_decode(self, capture: bool) -> None:
        """Run every padded decode size once on padding rows only (compiling its kernels) and,
        with `capture`, record it as a CUDA graph, the largest first so the smaller graphs
        reuse its memory pool. The backend must declare that it can be captured."""
        padded = self.padded
        assert padded is not None
        if capture and not self.backend.supports_cuda_graphs:
            logger.warning("attention backend %r cannot be captured in CUDA graphs: decode steps run padded, "
                           "eagerly", self.backend.name)
            capture = False
        if not capture and self.device.type != "cuda":
            return  # nothing to compile on the CPU
        record = make_graph_capture(self.device) if capture else None
        with torch.inference_mode():
            for size in reversed(padded.sizes):
                padded.fill_padding(size)
                meta = padded.metadata(size, cuda_graph=capture, max_seq_len=self.config.max_model_len)
                ids, positions = padded.input_ids[:size], padded.positions[:size]
                hidden = self._forward(ids, positions, meta)  # eagerly first: this size's kernels compile
                if record is None:
                    continue
                if self._graph_hidden is None:  # the output rows every graph writes, outside the graphs' pool
                    self._graph_hidden = torch.empty_like(hidden)

                def step(meta: AttentionMetadata = meta, ids: torch.Tensor = ids, positions: torch.Tensor = positions,
                         size: int = size) -> None:
                    self._graph_hidden[:size].copy_(self._forward(ids, positions, meta))

                try:
                    self._graphs[size] = record(step)
                except Exception as e:
                    raise RuntimeError(f"capturing the decode step of {size} sequences as a CUDA graph failed "
                                       f"({type(e).__name__}: {e}); enforce_eager=True runs without graphs") from e
        if self._graphs:
            logger.info("captured %d decode CUDA graphs (batch sizes %s)", len(self._graphs),
                        ", ".join(map(str, padded.sizes)))

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step: apply the step's diffs to the batch, block moves (swap out, swap in,
        copy-on-write), then the forward pass; one result row per sampled sequence."""
        # Everything before the forward pass, agreed on by every tensor-parallel rank: one
        # rank failing here fails the step on all of them (no rank waits in a collective).
        with ranks_agree("preparing the step"):
            self.sampler.forget(out.finished_seq_ids)
            if self.proposer is not None:
                self._forget_proposals(out)
            self.batch.apply(out)
            if out.blocks_to_swap_out:
                swap_out(self.kv_cache, self.host_cache, out.blocks_to_swap_out)
            if out.blocks_to_swap_in:
                swap_in(self.host_cache, self.kv_cache, out.blocks_to_swap_in)
            if out.blocks_to_copy:
                self.backend.copy_blocks(self.kv_cache, out.blocks_to_copy)
                if self.draft_kv_cache is not None:
                    self.proposer.copy_blocks(out.blocks_to_copy)
            if not out.scheduled:
                return RunnerOutput.empty()
            step = self.batch.prepare(out)
            size = self._padded_size(step)
            if size is None:
                input_ids, positions, meta, logits_indices = self._tensors(step)
            else:
                meta = self.padded.fill(step, size)
                input_ids, positions = self.padded.input_ids[:size], self.padded.positions[:size]
                up = HostUpload()
                up.add("logits_indices", step.logits_indices)  # a fork repeats its parent's row
                logits_indices = up.send(self.device, one_copy=self.device.type != "cpu")["logits_indices"]
        replay = self._graphs.get(size) if size is not None else None
        if replay is not None:
            replay()  # reads the buffers fill() just wrote
            hidden = self._graph_hidden[:size]
        else:
            hidden = self._forward(input_ids, positions, meta)
        seq_ids = out.sampled_seq_ids()
        if step.spec_seqs:
            result = self._sample_speculative(out, step, hidden, logits_indices, seq_ids)
        else:
            result = self._sample(out, step, self.model.compute_logits(hidden[logits_indices]), seq_ids)
        if step.prompt_rows:
            result.prompt_logprobs = self._prompt_logprobs(hidden, step.prompt_rows)
        if out.propose and self.proposer is not None:
            result.spec_token_ids = self._propose(out, step)
        return result

    def _sample(self, out: SchedulerOutput, step: StepInputs, logits: torch.Tensor, seq_ids: list[int]) -> RunnerOutput:
        """One token per sampled row (a beam: its candidates), appended to the batch."""
        sampled = self.sampler(logits, self._sampling_batch(out, step, seq_ids))
        self._append_sampled(out, step, sampled.tokens)
        tokens, beams, logprobs = sampled.tokens, sampled.beam_candidates, sampled.logprobs
        if any(beams) or any(logprobs):  # row by row only when a row is a beam or reports logprobs
            return RunnerOutput(seq_ids, [[] if beam is not None else [t] for t, beam in zip(tokens, beams)],
                                [None if lp is None else [lp] for lp in logprobs], beams)
        return RunnerOutput(seq_ids, [[t] for t in tokens], [None] * len(tokens), beams)  # the usual step

    def _sample_speculative(self, out: SchedulerOutput, step: StepInputs, hidden: torch.Tensor,
                            logits_indices: torch.Tensor, seq_ids: list[int]) -> RunnerOutput:
        """A step verifying proposals: the rows without proposals sample as usual; each
        sequence with proposals emits the accepted ones and one token of the target's; the
        results merge back into the scheduler's row order."""
        verifying = {seq_id for seq_id, _, _ in step.spec_seqs}
        plain_ids = [seq_id for seq_id in seq_ids if seq_id not in verifying]
        logits = self.model.compute_logits(hidden[logits_indices])  # plain rows first (see _tensors)
        plain = self._sample(out, step, logits[:len(plain_ids)], plain_ids) if plain_ids else RunnerOutput.empty()
        verified = verify(self.sampler, self.batch, logits[len(plain_ids):], step.spec_seqs,
                          {seq_id: self._draft_probs.pop(seq_id) for seq_id in verifying if seq_id in self._draft_probs},
                          out.grammar)
        rows: dict[int, tuple[list[int], list | None, tuple | None]] = {}
        for (seq_id, slot, _), tokens, lps in zip(step.spec_seqs, verified.tokens, verified.logprobs):
            self.batch.append(slot, tokens)
            rows[seq_id] = (tokens, lps, None)
        plain_rows = iter(zip(plain.token_ids, plain.logprobs, plain.beam_candidates))
        merged = [rows[seq_id] if seq_id in rows else next(plain_rows) for seq_id in seq_ids]
        return RunnerOutput(seq_ids, [r[0] for r in merged], [r[1] for r in merged], [r[2] for r in merged])

    def _propose(self, out: SchedulerOutput, step: StepInputs) -> dict[int, list[int]]:
        """Proposals for the next step of every sequence that sampled its own token now (not
        beams; forks join the batch next step). The third field of each candidate: how many
        tokens a draft model may write the KV of (its lookahead slots, plus the slots of
        rejected proposals it now re-uses)."""
        b = self.batch
        candidates = []
        for item in out.scheduled:
            slot = b.slot_of.get(item.seq_id)
            if not item.sample or slot is None or b.beam_k[slot]:
                continue
            room = item.num_computed_tokens + item.num_new_tokens + item.num_lookahead + 1 - int(b.num_tokens[slot])
            candidates.append((item.seq_id, slot, room))
        proposals, probs = self.proposer.propose(b, candidates)
        self._draft_probs.update(probs)
        return proposals

    def _forget_proposals(self, out: SchedulerOutput) -> None:
        """Sequences that left the batch lose their proposer state (a draft model's KV
        position) and the distributions of proposals nobody will verify now."""
        gone = out.removed_seq_ids + out.finished_seq_ids
        if gone:
            self.proposer.forget(gone)
        if self._draft_probs:
            verifying = {item.seq_id for item in out.scheduled if item.spec_token_ids}
            for seq_id in [s for s in self._draft_probs if s not in verifying]:
                del self._draft_probs[seq_id]

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The backend's per-step preparation, then the model: what a CUDA graph captures."""
        self.backend.prepare(meta, self.kv_caches[0][0])
        return self.model(input_ids, positions, meta)

    def _padded_size(self, step: StepInputs) -> int | None:
        """The capture size a decode-only step runs padded to; None: the dynamic path (a step
        with a prefill, or padding off)."""
        if self.padded is None or step.num_decodes != len(step.seq_lens):
            return None
        return self.padded.size_for(step.num_decodes)

    def _sampling_batch(self, out: SchedulerOutput, step: StepInputs, seq_ids: list[int]) -> SamplingBatch:
        """Each sampled row's settings gathered from its slot; a fork samples from its parent's
        slot with its own params (seed). Only special rows are looked at one by one."""
        b = self.batch
        slots = step.sample_slots
        special = []
        has_forks = len(slots) > len(step.own_rows)
        if has_forks or b.special:  # else no row is special: the usual decode step skips the loop
            fork_params = {f.seq_id: f.params for it in out.scheduled if it.sample for f in it.forks}
            for row, (slot, seq_id) in enumerate(zip(slots.tolist(), seq_ids)):
                params = fork_params.get(seq_id)
                if params is None:
                    if slot not in b.special:
                        continue
                    params = b.params[slot]
                special.append((row, b.row_view(slot, seq_id, params)))
        return self.sampler.build_batch(b.temperature[slots], b.top_k[slots], b.top_p[slots], b.min_p[slots],
                                        b.greedy[slots], special, self.vocab_size, grammar_rows(out.grammar, seq_ids))

    def _append_sampled(self, out: SchedulerOutput, step: StepInputs, tokens: list[int]) -> None:
        """Append each sequence's own sampled token to its slot (forks enter the batch as new
        sequences later, with their token; beams get theirs from the scheduler's decision)."""
        b = self.batch
        rows = step.own_rows
        slots = step.sample_slots[rows]
        values = np.asarray(tokens, dtype=np.int32)[rows]
        if b.special:  # a beam's slot is always special; its token comes from the scheduler's decision
            keep = np.fromiter((not b.beam_k[slot] for slot in slots.tolist()), dtype=np.bool_, count=len(slots))
            slots, values = slots[keep], values[keep]
        if len(slots):
            b.append_sampled(slots, values)

    def _prompt_logprobs(self, hidden: torch.Tensor, prompt_rows: list[tuple[int, list[int], list[int], int]]):
        """Logprob of each prompt token given the ones before it, from this chunk's hidden
        states (the logits at position p predict token p + 1)."""
        up = HostUpload()  # one non-blocking upload, not a blocking torch.tensor(list, device=) each
        up.add("index", np.array([i for _, rows, _, _ in prompt_rows for i in rows], dtype=np.int64))
        up.add("targets", np.array([t for _, _, tokens, _ in prompt_rows for t in tokens], dtype=np.int64))
        sent = up.send(self.device, one_copy=self.device.type != "cpu")
        index, targets = sent["index"], sent["targets"]
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[index]).float(), dim=-1)
        entries = gather_logprobs(logprobs, targets, [k for _, rows, _, k in prompt_rows for _ in rows])
        result, start = {}, 0
        for seq_id, rows, _, _ in prompt_rows:
            result[seq_id] = entries[start:start + len(rows)]
            start += len(rows)
        return result

    def _tensors(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """The step's arrays as device tensors: input ids, positions, attention metadata and the
        rows to compute logits for (the sampled rows, then the verifying ones). On CUDA they
        travel as one pinned buffer, one copy that does not block (a pageable copy per array
        would each wait for the stream); on the CPU they are wrapped where they lie."""
        up = HostUpload()
        for name in ("input_ids", "positions", "slot_mapping", "block_tables"):
            up.add(name, getattr(step, name))
        logits_indices = step.logits_indices  # sampled rows, then the rows verifying proposals
        if step.spec_logits_indices is not None:
            logits_indices = np.concatenate([logits_indices, step.spec_logits_indices])
        up.add("logits_indices", logits_indices)
        up.add("query_start_loc", step.query_start_loc.astype(np.int32))
        up.add("seq_lens", step.seq_lens.astype(np.int32))
        t = up.send(self.device, one_copy=self.device.type != "cpu")
        meta = AttentionMetadata(
            num_decodes=step.num_decodes,
            num_seqs=len(step.seq_lens),
            num_tokens=len(step.input_ids),
            slot_mapping=t["slot_mapping"],
            query_start_loc=t["query_start_loc"],
            seq_lens=t["seq_lens"],
            block_tables=t["block_tables"],
            max_query_len=int((step.query_start_loc[1:] - step.query_start_loc[:-1]).max()),
            max_seq_len=int(step.seq_lens.max()),
            query_start_loc_host=step.query_start_loc.tolist(),
            seq_lens_host=step.seq_lens.tolist(),
        )
        return t["input_ids"], t["positions"], meta, t["logits_indices"]


# ---------------------------------------------------------------------------- padded decode inputs
class PaddedDecodeInputs:
    """The persistent input buffers of padded decode steps, sized for the largest capture size.

    A step of n decodes fills rows [0, n) from the step and rows [n, size) with padding (token
    0 at position 0, written to offset 0 of the padding block, seq_len 1, block table [padding
    block, 0, ...]), size being the smallest capture size >= n. A captured graph reads these
    very tensors, so they are written in place, never reallocated. On CUDA the step is staged
    in pinned host twins and copied with one asynchronous copy per buffer; on the CPU the host
    arrays are the buffers."""

    def __init__(self, sizes: tuple[int, ...], max_blocks: int, padding_slot: int, padding_block: int,
                 device: torch.device) -> None:
        self.sizes = sizes
        self.padding_slot, self.padding_block = padding_slot, padding_block
        self.device = device
        n = sizes[-1]
        on_cuda = device.type == "cuda"
        shapes = {"input_ids": ((n,), torch.int64), "positions": ((n,), torch.int64),
                  "slot_mapping": ((n,), torch.int64), "seq_lens": ((n,), torch.int32),
                  "block_tables": ((n, max_blocks), torch.int32)}
        self._host: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in shapes.items():
            host = torch.zeros(shape, dtype=dtype, pin_memory=on_cuda)
            self._host[name] = host
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device) if on_cuda else host)
        self.input_ids: torch.Tensor
        self.positions: torch.Tensor
        self.slot_mapping: torch.Tensor
        self.seq_lens: torch.Tensor
        self.block_tables: torch.Tensor
        # numpy views of the host twins: the step is written into them with numpy
        self._np = {name: t.numpy() for name, t in self._host.items()}
        # A decode row i's query is token i: query_start_loc is the same for every step.
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._qsl_host = list(range(n + 1))
        # The previous step's copies read the pinned twins until they have run.
        self._copied: torch.cuda.Event | None = torch.cuda.Event() if on_cuda else None

    def size_for(self, num_seqs: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def fill(self, step: StepInputs, size: int) -> AttentionMetadata:
        """Write a decode-only step into rows [0, n) and padding into [n, size); its metadata."""
        n = len(step.seq_lens)
        self._wait_for_copies()
        a = self._np
        a["input_ids"][:n] = step.input_ids
        a["positions"][:n] = step.positions
        a["slot_mapping"][:n] = step.slot_mapping
        a["seq_lens"][:n] = step.seq_lens
        tables = a["block_tables"]
        width = step.block_tables.shape[1]
        tables[:n, :width] = step.block_tables
        tables[:n, width:] = 0
        self._write_padding(n, size)
        self._copy_to_device(size)
        return self.metadata(size, max_seq_len=int(step.seq_lens.max()),
                             seq_lens_host=step.seq_lens.tolist() + [1] * (size - n))

    def fill_padding(self, size: int) -> None:
        """Every row of `size` a padding row (warm-up and capture)."""
        self._wait_for_copies()
        self._write_padding(0, size)
        self._copy_to_device(size)

    def metadata(self, size: int, *, max_seq_len: int, seq_lens_host: list[int] | None = None,
                 cuda_graph: bool = False) -> AttentionMetadata:
        """The metadata of a step of `size` rows, views of the buffers (what a graph captures)."""
        return AttentionMetadata(
            num_decodes=size, num_seqs=size, num_tokens=size, slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], max_query_len=1, max_seq_len=max_seq_len,
            query_start_loc_host=self._qsl_host[:size + 1],
            seq_lens_host=seq_lens_host if seq_lens_host is not None else [1] * size, cuda_graph=cuda_graph)

    def _write_padding(self, start: int, end: int) -> None:
        a = self._np
        a["input_ids"][start:end] = 0
        a["positions"][start:end] = 0
        a["slot_mapping"][start:end] = self.padding_slot
        a["seq_lens"][start:end] = 1
        a["block_tables"][start:end] = 0
        a["block_tables"][start:end, 0] = self.padding_block

    def _copy_to_device(self, size: int) -> None:
        if self._copied is None:
            return  # CPU: the host arrays are the buffers
        for name, host in self._host.items():
            getattr(self, name)[:size].copy_(host[:size], non_blocking=True)
        self._copied.record()

    def _wait_for_copies(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()


def make_graph_capture(device: torch.device) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """A function that captures a step (a callable writing only into tensors that outlive it)
    into a CUDA graph and returns its replay. All graphs share one memory pool: captured
    largest first, the smaller ones reuse its memory, as they never run at the same time."""
    pool: list = []

    def capture(step: Callable[[], None]) -> Callable[[], None]:
        # A warm-up run on a side stream first, as torch.cuda.graphs asks (lazy initialisation,
        # autotuning and allocator state happen outside the capture).
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool[0] if pool else None):
            step()
        if not pool:
            pool.append(graph.pool())
        return graph.replay

    return capture


# ---------------------------------------------------------------------------- devices
def cuda_kv_budget(fraction: float, total: int, free_at_start: int, free_now: int, activations: int) -> float:
    """Bytes for the KV cache on a GPU (vLLM's `gpu_memory_utilization`, per instance): this
    engine's own use (what it took since its runner started: weights, buffers), its peak
    activations and the KV together reach `fraction` of the device, and never more than is free."""
    own = max(free_at_start - free_now, 0)
    return min(fraction * total - own - activations, free_now - activations)


def resolve_device(device: str) -> torch.device:
    """The one device this rank runs on. `cuda` (what device="auto" resolves to) names a GPU:
    a tensor-parallel rank's own (its local rank), else the calling thread's current device
    (0 unless the host process chose one). `cuda:N` and `cpu` are taken as they are."""
    device = rank_device(device)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return torch.device(device)


def pin_device(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device. Triton kernels (and any
    `torch.empty(device="cuda")`) launch on the current device, which is per thread and 0 by
    default: the runner's thread and the engine loop's thread both pin it. A no-op off CUDA."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


# ---------------------------------------------------------------------------- swapping
def swap_out(kv_cache: torch.Tensor, host_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """Copy device blocks to host blocks (src, dst): one gather on the device into block-major
    order, then each block straight into its (pinned, contiguous) host slab, asynchronously
    on CUDA. Later reads of the host pool are swap-ins on the same stream, so in order."""
    src = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=kv_cache.device)
    blocks = kv_cache.index_select(2, src).movedim(2, 0).contiguous()  # [n, layers, 2, heads, block, dim]
    non_blocking = kv_cache.device.type == "cuda"
    for i, (_, dst) in enumerate(pairs):
        host_cache[dst].copy_(blocks[i], non_blocking=non_blocking)


def swap_in(host_cache: torch.Tensor, kv_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """Copy host blocks to device blocks (src, dst): each host slab into a device staging
    tensor (asynchronously from pinned memory on CUDA), then one scatter into the cache."""
    staging = torch.empty((len(pairs), *host_cache.shape[1:]), dtype=host_cache.dtype, device=kv_cache.device)
    non_blocking = kv_cache.device.type == "cuda"
    for i, (src, _) in enumerate(pairs):
        staging[i].copy_(host_cache[src], non_blocking=non_blocking)
    dst = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=kv_cache.device)
    kv_cache.index_copy_(2, dst, staging.movedim(0, 2))


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

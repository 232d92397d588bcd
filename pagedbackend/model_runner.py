"""Executes one scheduled step: flattened inputs -> model -> logits of sampling rows -> tokens.

Owns the model, the KV cache tensors, the sampler and the persistent batch (`InputBatch`):
the step's plain-data diffs update the batch, the inputs are gathered from it, and the tokens
it samples are appended to it. It knows nothing about queues, requests' text or frameworks.
Sequences computing a single token are placed first so the attention backend can batch them
as decodes; sampled tokens come back in the scheduler's order.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from pagedbackend.attention import get_attention_backend
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.config import EngineConfig
from pagedbackend.distributed import rank_device, ranks_agree, tp_min
from pagedbackend.input_batch import InputBatch, StepInputs
from pagedbackend.models.loader import load_model
from pagedbackend.sampler import Sampler, SamplingBatch, gather_logprobs
from pagedbackend.step import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.config = config
        self.device = torch.device(rank_device(config.device))
        self.block_size = config.block_size
        self.model = load_model(config, progress, str(self.device))
        self.vocab_size = config.model_config.vocab_size
        layers = self.model.attention_layers()
        self.num_kv_heads = layers[0].num_kv_heads
        self.head_dim = layers[0].head_dim
        self.backend = get_attention_backend(config.attention_backend)
        # The same pool (size and block ids) on every rank: the smallest any rank can hold.
        self.num_blocks = config.num_kv_blocks or tp_min(self._blocks_from_memory(len(layers)))
        min_blocks = -(-config.max_model_len // self.block_size)
        if self.num_blocks < min_blocks:
            raise ValueError(
                f"num_kv_blocks: {self.num_blocks} blocks of {self.block_size} tokens cannot hold one sequence of "
                f"max_model_len={config.max_model_len} (needs {min_blocks}); give the KV cache more memory "
                "(num_kv_blocks / kv_cache_memory_fraction) or lower max_model_len"
            )
        shape = self.backend.get_kv_cache_shape(self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)
        # One tensor for every layer's K and V ([layers, 2, *shape]), so a block copy is one
        # operation over all layers. Zeros, not empty: padded block-table entries are read
        # (then masked), and must be finite.
        self.kv_cache = torch.zeros((len(layers), 2, *shape), dtype=config.dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(len(layers))]
        for layer, (key_cache, value_cache) in zip(layers, self.kv_caches):
            layer.bind(self.backend, key_cache, value_cache)
        # Host-memory pool for swap preemption: same layout, its own tensor even on a CPU
        # device (so the swap path is the same code everywhere). Pinned for fast CUDA copies.
        self.num_host_blocks = 0
        self.host_cache = None
        if config.preemption_mode == "swap":
            self.num_host_blocks = int(config.swap_space * 2**30 // self.bytes_per_block)
            # Empty: a host block is always written (swap out) before it is read (swap in).
            host_shape = self.backend.get_kv_cache_shape(self.num_host_blocks, self.num_kv_heads, self.block_size,
                                                         self.head_dim)
            self.host_cache = torch.empty((len(layers), 2, *host_shape), dtype=config.dtype,
                                          pin_memory=self.device.type == "cuda")
            logger.info("swap space: %d host blocks (%.1f GiB)", self.num_host_blocks, config.swap_space)
        self.sampler = Sampler(self.device, config.seed)
        self.batch = InputBatch(config.max_num_seqs, config.max_model_len, self.block_size, self.vocab_size)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.config.dtype).element_size()
        return 2 * len(self.model.attention_layers()) * self.num_kv_heads * self.block_size * self.head_dim * elem

    def _blocks_from_memory(self, num_layers: int) -> int:
        cfg = self.config
        fraction = cfg.kv_cache_memory_fraction or 0.2
        per_block = self.bytes_per_block
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = fraction * total - (total - free) - self._activation_bytes()
        else:
            budget = fraction * _host_available_bytes()
        # More blocks than max_num_seqs full-length sequences can use is only prefix cache.
        useful = cfg.max_num_seqs * -(-cfg.max_model_len // self.block_size)
        num = min(int(budget // per_block), useful)
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB)", num, self.block_size, num * per_block / 2**20)
        return max(num, 0)

    def _activation_bytes(self) -> int:
        """Rough peak of one step's activations (hidden states, MLP, logits), kept out of the KV budget."""
        hf = self.config.model_config.hf
        elem = torch.empty((), dtype=self.config.dtype).element_size()
        per_token = (6 * hf.hidden_size + 3 * hf.get("intermediate_size", 4 * hf.hidden_size)) * elem
        logits = self.config.max_num_seqs * self.vocab_size * 4 * 3
        return self.config.max_num_batched_tokens * per_token + logits

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step: apply the step's diffs to the batch, block moves (swap out, swap in,
        copy-on-write), then the forward pass; one result row per sampled sequence."""
        # Everything before the forward pass, agreed on by every tensor-parallel rank: one
        # rank failing here fails the step on all of them (no rank waits in a collective).
        with ranks_agree("preparing the step"):
            self.sampler.forget(out.finished_seq_ids)
            self.batch.apply(out)
            if out.blocks_to_swap_out:
                _copy_between(self.kv_cache, self.host_cache, out.blocks_to_swap_out)
            if out.blocks_to_swap_in:
                _copy_between(self.host_cache, self.kv_cache, out.blocks_to_swap_in)
            if out.blocks_to_copy:
                self.backend.copy_blocks(self.kv_cache, out.blocks_to_copy)
            if not out.scheduled:
                return RunnerOutput.empty()
            step = self.batch.prepare(out)
            input_ids, positions, meta = self._tensors(step)
        self.backend.prepare(meta, self.kv_caches[0][0])
        hidden = self.model(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden[torch.from_numpy(step.logits_indices).to(self.device)])
        seq_ids = out.sampled_seq_ids()
        sampled = self.sampler(logits, self._sampling_batch(out, step, seq_ids))
        self._append_sampled(out, step, sampled.tokens)
        tokens, beams, logprobs = sampled.tokens, sampled.beam_candidates, sampled.logprobs
        if any(beams) or any(logprobs):  # row by row only when a row is a beam or reports logprobs
            result = RunnerOutput(seq_ids, [[] if beam is not None else [t] for t, beam in zip(tokens, beams)],
                                  [None if lp is None else [lp] for lp in logprobs], beams)
        else:  # the usual step (any() is a C loop)
            result = RunnerOutput(seq_ids, [[t] for t in tokens], [None] * len(tokens), beams)
        if step.prompt_rows:
            result.prompt_logprobs = self._prompt_logprobs(hidden, step.prompt_rows)
        return result

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
                                        b.greedy[slots], special, self.vocab_size)

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
        index = torch.tensor([i for _, rows, _, _ in prompt_rows for i in rows], device=self.device)
        targets = torch.tensor([t for _, _, tokens, _ in prompt_rows for t in tokens], device=self.device)
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[index]).float(), dim=-1)
        entries = gather_logprobs(logprobs, targets, [k for _, rows, _, k in prompt_rows for _ in rows])
        result, start = {}, 0
        for seq_id, rows, _, _ in prompt_rows:
            result[seq_id] = entries[start:start + len(rows)]
            start += len(rows)
        return result

    def _tensors(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's arrays as device tensors, one copy each."""
        dev = self.device
        meta = AttentionMetadata(
            num_decodes=step.num_decodes,
            num_seqs=len(step.seq_lens),
            num_tokens=len(step.input_ids),
            slot_mapping=torch.from_numpy(step.slot_mapping).to(dev),
            query_start_loc=torch.from_numpy(step.query_start_loc.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(step.seq_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(step.block_tables).to(dev),
            max_query_len=int((step.query_start_loc[1:] - step.query_start_loc[:-1]).max()),
            max_seq_len=int(step.seq_lens.max()),
            query_start_loc_host=step.query_start_loc.tolist(),
            seq_lens_host=step.seq_lens.tolist(),
        )
        return torch.from_numpy(step.input_ids).to(dev), torch.from_numpy(step.positions).to(dev), meta


def _copy_between(src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """Copy whole blocks (all layers, K and V) between the device cache and the host pool."""
    src_ids = torch.tensor([s for s, _ in pairs], device=src.device)
    dst_ids = torch.tensor([d for _, d in pairs], device=dst.device)
    dst[:, :, dst_ids] = src[:, :, src_ids].to(dst.device)


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

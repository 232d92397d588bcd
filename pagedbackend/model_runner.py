"""Executes one scheduled step: flattened inputs -> model -> logits of sampling rows -> tokens.

Owns the model, the KV cache tensors and the sampler. It knows one batch at a time and
nothing about queues or frameworks. Sequences computing a single token are placed first so the
attention backend can batch them as decodes; sampled tokens come back in the scheduler's order.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from pagedbackend.attention import get_attention_backend
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.config import EngineConfig
from pagedbackend.kernels.layout import kv_cache_shape
from pagedbackend.models.loader import load_model
from pagedbackend.sampler import Sampler, SamplerOutput, gather_logprobs
from pagedbackend.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.model = load_model(config, progress)
        self.vocab_size = config.model_config.vocab_size
        layers = self.model.attention_layers()
        self.num_kv_heads = layers[0].num_kv_heads
        self.head_dim = layers[0].head_dim
        self.backend = get_attention_backend(config.attention_backend)
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory(len(layers))
        min_blocks = -(-config.max_model_len // self.block_size)
        if self.num_blocks < min_blocks:
            raise ValueError(
                f"num_kv_blocks: {self.num_blocks} blocks of {self.block_size} tokens cannot hold one sequence of "
                f"max_model_len={config.max_model_len} (needs {min_blocks}); give the KV cache more memory "
                "(num_kv_blocks / kv_cache_memory_fraction) or lower max_model_len"
            )
        shape = kv_cache_shape(self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)
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
            host_shape = kv_cache_shape(self.num_host_blocks, self.num_kv_heads, self.block_size, self.head_dim)
            self.host_cache = torch.empty((len(layers), 2, *host_shape), dtype=config.dtype,
                                          pin_memory=self.device.type == "cuda")
            logger.info("swap space: %d host blocks (%.1f GiB)", self.num_host_blocks, config.swap_space)
        self.sampler = Sampler(self.device, config.seed)

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
    def execute(self, out: SchedulerOutput) -> SamplerOutput:
        """Run one step: block moves first (swap out, swap in, copy-on-write), then the forward
        pass; returns one sampled token per entry of `out.sampling_sequences()`."""
        self.sampler.forget(out.finished_seq_ids)
        if out.blocks_to_swap_out:
            _copy_between(self.kv_cache, self.host_cache, out.blocks_to_swap_out)
        if out.blocks_to_swap_in:
            _copy_between(self.host_cache, self.kv_cache, out.blocks_to_swap_in)
        if out.blocks_to_copy:
            self.backend.copy_blocks(self.kv_cache, out.blocks_to_copy)
        if not out.scheduled:
            return SamplerOutput([], [], [])
        input_ids, positions, meta, logits_indices, prompt_rows = self._prepare(out)
        self.backend.prepare(meta, self.kv_caches[0][0])
        hidden = self.model(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden[logits_indices])
        seqs = out.sampling_sequences()
        result = self.sampler(logits, self.sampler.make_batch(seqs, logits.shape[-1]))
        if prompt_rows:
            result.prompt_logprobs = self._prompt_logprobs(hidden, prompt_rows)
        return result

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

    def _prepare(self, out: SchedulerOutput):
        items = out.scheduled
        # Decodes first, shortest context first: backends batch them in length-sorted chunks.
        order = sorted((i for i, it in enumerate(items) if it.num_new_tokens == 1),
                       key=lambda i: items[i].seq.num_computed_tokens)
        num_decodes = len(order)
        order += [i for i, it in enumerate(items) if it.num_new_tokens != 1]

        input_ids: list[int] = []
        q_lens = np.empty(len(order), dtype=np.int64)
        ctx_lens = np.empty(len(order), dtype=np.int64)
        max_blocks = max(len(it.block_ids) for it in items)
        block_tables = np.zeros((len(order), max_blocks), dtype=np.int64)
        for row, i in enumerate(order):
            it = items[i]
            start = it.seq.num_computed_tokens
            n = it.num_new_tokens
            if n == 1:
                input_ids.append(it.seq.token_ids[start])
            else:
                input_ids.extend(it.seq.token_ids[start:start + n])
            q_lens[row] = n
            ctx_lens[row] = start
            block_tables[row, :len(it.block_ids)] = it.block_ids

        query_start = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start[1:])
        num_tokens = int(query_start[-1])
        seq_of_token = np.repeat(np.arange(len(order)), q_lens)
        positions = np.arange(num_tokens) - query_start[seq_of_token] + ctx_lens[seq_of_token]
        bs = self.block_size
        slots = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        seq_lens = ctx_lens + q_lens

        # Logit rows in the scheduler's sampling order; a fork reuses its parent's row.
        row_of_item = np.empty(len(items), dtype=np.int64)
        row_of_item[order] = np.arange(len(order))
        logits_indices = []
        prompt_rows = []  # (seq_id, flat token rows, the prompt tokens they predict, top-k)
        for i, it in enumerate(items):
            if it.sample:
                last = int(query_start[row_of_item[i] + 1]) - 1
                logits_indices.extend([last] * (1 + len(it.fork_children)))
            seq = it.seq
            if seq.wants_prompt_logprobs:
                # Positions p predicting prompt token p + 1 not yet recorded (a recompute after
                # preemption does not record them twice).
                first = max(seq.num_computed_tokens, len(seq.prompt_logprobs) - 1)
                end = min(seq.num_computed_tokens + it.num_new_tokens, seq.prompt_len - 1)
                if first < end:
                    base = int(query_start[row_of_item[i]]) - seq.num_computed_tokens
                    prompt_rows.append((seq.seq_id, list(range(base + first, base + end)),
                                        seq.token_ids[first + 1:end + 1], seq.params.prompt_logprobs))

        dev = self.device
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            num_seqs=len(order),
            num_tokens=num_tokens,
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=torch.from_numpy(query_start.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(block_tables.astype(np.int32)).to(dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_host=query_start.tolist(),
            seq_lens_host=seq_lens.tolist(),
        )
        return (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.from_numpy(positions).to(dev), meta,
                torch.tensor(logits_indices, dtype=torch.long, device=dev), prompt_rows)


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

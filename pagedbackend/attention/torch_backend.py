"""Attention in plain PyTorch over the paged cache: the CPU path and the reference.

Decodes (one new token per sequence) are batched in chunks of similar length: one
`index_select` gathers a chunk's context into `[kv_heads * seqs, tokens, head_dim]`, then two
batched matmuls and a masked softmax, so all query heads sharing a KV head read its keys once
(GQA without copies).
In a CUDA-graph capture (`meta.cuda_graph`) the chunks are fixed instead: rows in equal
slices, each gathering the whole block table (max_model_len, masked), so nothing depends on
the step's lengths; that costs attention time that grows with max_model_len, not the context
(this backend is the reference; the GPU default is triton).
Prefill chunks run one `scaled_dot_product_attention` per sequence, reading cached context
only when the chunk has any, as 4-D tensors (with 3-D ones torch's CPU SDPA takes bmm +
softmax instead of its flash kernel) and, on the CPU, with grouped heads passed as such
(`enable_gqa`) instead of repeated. With an attention-logit soft-cap (Gemma 2) the scores are made
explicitly instead, as transformers' eager attention does: (q k^T * scale) / cap, tanh, * cap,
then the mask and a float32 softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pagedbackend.attention.base import AttentionBackend
from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.kernels.layout import slot_to_rows


def _write_rows(slot_mapping: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """`slot_to_rows`, the same values; on the CPU computed by numpy over the same memory. Its
    half-dozen torch ops on a few hundred indices cost 0.15-0.2 ms a step (each small torch op
    pays the dispatcher, and after a forward pass the CPU caches are cold), numpy's ~0.03 ms."""
    if slot_mapping.device.type != "cpu":
        return slot_to_rows(slot_mapping, num_kv_heads, block_size)
    slots = slot_mapping.numpy()
    block = slots // block_size  # floor division, as slot_to_rows' torch.div(rounding_mode="floor")
    offset = slots - block * block_size
    heads = np.arange(num_kv_heads, dtype=slots.dtype)
    rows = (block[:, None] * num_kv_heads + heads[None, :]) * block_size + offset[:, None]
    return torch.from_numpy(rows.reshape(-1))


_SCORES_BUDGET = 1 << 26  # elements of one soft-capped prefill's score tensor (256 MB in fp32)


def _soft_capped_attention(qh: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, cap: float,
                           allowed: torch.Tensor) -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap), masked to `allowed`) v, in the operation order of
    transformers' eager Gemma 2 attention. qh [H, q_len, D], keys/values [H, L, D], allowed [q_len, L].
    Query rows go in slices, so the scores stay within _SCORES_BUDGET elements."""
    num_heads, q_len, _ = qh.shape
    rows = max(1, _SCORES_BUDGET // (num_heads * keys.shape[1]))
    outs = []
    for start in range(0, q_len, rows):
        scores = torch.matmul(qh[:, start:start + rows], keys.transpose(1, 2)).mul_(scale)
        scores = scores.div_(cap).tanh_().mul_(cap).masked_fill_(~allowed[start:start + rows], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        outs.append(torch.matmul(probs, values))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@dataclass
class _DecodeChunk:
    """Decode rows [start, end) of the batch, attended together: their gathered context is
    padded to the longest of them and sized to stay in the CPU cache between gather and matmul."""

    start: int
    end: int
    rows: torch.Tensor  # gather indices into the cache viewed as [num_blocks * H, block_size, D]
    length: int  # padded context length
    seq_lens: torch.Tensor
    # Gather into fresh tensors, not the backend's cached buffers: inside a CUDA-graph capture
    # those are graph-pool intermediates, which must not outlive the capture in the cache.
    fresh_buffers: bool = False
    masks: dict = field(default_factory=dict)  # (window, heads, dtype) -> additive mask

    def bias(self, window: int | None, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [kv_heads * seqs, 1, length]: -inf where a query must not look
        (padding past the sequence end, keys that left the sliding window), else 0. Built
        once per step and shared by all layers, so each layer's scores are one `baddbmm`."""
        key = (window, num_kv_heads, dtype)
        if key not in self.masks:
            pos = torch.arange(self.length, device=self.seq_lens.device)
            masked = pos[None, :] >= self.seq_lens[:, None]
            if window is not None:
                masked |= pos[None, :] < (self.seq_lens[:, None] - window)
            bias = torch.zeros(masked.shape, dtype=dtype, device=masked.device).masked_fill_(masked, float("-inf"))
            self.masks[key] = bias.repeat(num_kv_heads, 1).unsqueeze(1)
        return self.masks[key]


@dataclass
class TorchAttentionState:
    """The torch (and cpu) backend's per-step state, built once by prepare() for every layer."""

    write_rows: torch.Tensor  # cache rows the step's new K/V go to (token-major, see slot_to_rows)
    decode_chunks: list[_DecodeChunk]  # the decode rows, in gather-sized chunks


# SDPA reads grouped K/V heads itself from torch 2.5 (no repeated copy of them).
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def _allowed(ctx_len: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[q_len, seq_len] mask of the keys each query of a chunk at [ctx_len, seq_len) sees:
    causal, and within the sliding window."""
    qpos = torch.arange(ctx_len, seq_len, device=device)[:, None]
    kpos = torch.arange(seq_len, device=device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    return allowed


class TorchAttentionBackend(AttentionBackend):
    """Declared: any device torch runs on, fp32/fp16/bf16, every head and block size, sliding
    windows, attention-logit soft-capping."""

    name = "torch"
    device_types = ("cpu", "cuda")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    min_head_size, max_head_size = 1, None
    block_sizes = None
    supports_sliding_window = True
    supports_logits_soft_cap = True
    supports_cuda_graphs = True  # decode in fixed chunks over the full block table (see the module doc)
    # Gathered K (and V) bytes per decode chunk: small enough to still be in L2/L3 when the
    # matmul reads it back. Measured on the 2-core dev box (64 seqs, 64-384 tokens): chunks
    # of ~8 sequences ran decode attention in 5.5 ms/layer against 8.8 ms for one big gather.
    CHUNK_BYTES = 2 << 20
    # The same for a captured decode step, whose chunks span max_model_len: larger, so a graph
    # of 256 rows is tens of gathers, not hundreds.
    GRAPH_CHUNK_BYTES = 64 << 20

    def __init__(self) -> None:
        # Gather buffers reused across layers and steps: allocating fresh ones each layer costs
        # page faults that made gathering 4x slower in measurements.
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # ------------------------------------------------------------------ per step
    def prepare(self, meta: AttentionMetadata, key_cache: torch.Tensor) -> None:
        """Expects decodes first and sorted by sequence length (the model runner's order)."""
        _, num_kv_heads, block_size, head_dim = key_cache.shape
        meta.backend_state = TorchAttentionState(_write_rows(meta.slot_mapping, num_kv_heads, block_size),
                                                 self._decode_chunks(meta, key_cache))

    def _decode_chunks(self, meta: AttentionMetadata, key_cache: torch.Tensor) -> list[_DecodeChunk]:
        if meta.cuda_graph:
            return self._static_decode_chunks(meta, key_cache)
        _, num_kv_heads, block_size, head_dim = key_cache.shape
        budget = max(block_size, self.CHUNK_BYTES // (num_kv_heads * head_dim * key_cache.element_size()))
        lens = meta.seq_lens_host
        chunks = []
        start = 0
        while start < meta.num_decodes:
            # A chunk is padded to its longest row. The runner sorts decodes by length, except
            # a padded decode step's padding rows (length 1) at the end: hence the running max.
            end, longest = start + 1, lens[start]
            while end < meta.num_decodes and (end + 1 - start) * max(longest, lens[end]) <= budget:
                longest = max(longest, lens[end])
                end += 1
            chunks.append(self._chunk(meta, start, end, -(-longest // block_size), key_cache))
            start = end
        return chunks

    def _static_decode_chunks(self, meta: AttentionMetadata, key_cache: torch.Tensor) -> list[_DecodeChunk]:
        """A captured step's chunks: equal row slices over the whole block-table width, a
        structure that depends on the batch's shapes only (the lengths are in the mask)."""
        _, num_kv_heads, block_size, head_dim = key_cache.shape
        num_blocks = meta.block_tables.shape[1]
        row_bytes = num_kv_heads * num_blocks * block_size * head_dim * key_cache.element_size()
        per_chunk = max(1, self.GRAPH_CHUNK_BYTES // row_bytes)
        return [self._chunk(meta, start, min(start + per_chunk, meta.num_decodes), num_blocks, key_cache,
                            fresh_buffers=True)
                for start in range(0, meta.num_decodes, per_chunk)]

    @staticmethod
    def _chunk(meta: AttentionMetadata, start: int, end: int, num_blocks: int, key_cache: torch.Tensor,
               fresh_buffers: bool = False) -> _DecodeChunk:
        """Decode rows [start, end), each gathering its first `num_blocks` blocks."""
        _, num_kv_heads, block_size, _ = key_cache.shape
        bt = meta.block_tables[start:end, :num_blocks].long()
        heads = torch.arange(num_kv_heads, device=bt.device)
        # Head-major rows, so the gather lands as [H, seqs, tokens, D].
        rows = (bt[None] * num_kv_heads + heads[:, None, None]).reshape(-1)
        return _DecodeChunk(start, end, rows, num_blocks * block_size, meta.seq_lens[start:end].long(),
                            fresh_buffers=fresh_buffers)

    def _buffer(self, tag: str, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        key = (tag, like.device, like.dtype)
        numel = 1
        for s in shape:
            numel *= s
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, int(numel * 1.25)), device=like.device, dtype=like.dtype)
            self._buffers[key] = buf
        return buf[:numel].view(shape)

    # ------------------------------------------------------------------ per layer
    def forward(self, q, k, v, key_cache, value_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None, logits_soft_cap: float | None = None) -> torch.Tensor:
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be positive (or None for no cap), got {logits_soft_cap}")
        num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
        rows = self.state_of(meta, TorchAttentionState).write_rows
        key_cache.view(-1, head_dim).index_copy_(0, rows, k.reshape(-1, head_dim))
        value_cache.view(-1, head_dim).index_copy_(0, rows, v.reshape(-1, head_dim))

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.num_decodes:
            nd = meta.num_decodes
            self._decode_batch(out[:nd], q[:nd], key_cache, value_cache, meta, scale, sliding_window,
                               logits_soft_cap)
        for i in range(meta.num_decodes, meta.num_seqs):
            start, end = meta.query_start_loc_host[i], meta.query_start_loc_host[i + 1]
            out[start:end] = self._prefill(i, q[start:end], k[start:end], v[start:end], key_cache,
                                           value_cache, meta, scale, sliding_window, logits_soft_cap)
        return out

    def _decode_batch(self, out, q, key_cache, value_cache, meta, scale, window, soft_cap=None) -> None:
        """Attention of the decode rows (first in the batch) into `out`."""
        for chunk in self.state_of(meta, TorchAttentionState).decode_chunks:
            out[chunk.start:chunk.end] = self._decode(q[chunk.start:chunk.end], key_cache, value_cache, chunk,
                                                      scale, window, soft_cap)

    def _decode(self, q, key_cache, value_cache, chunk: _DecodeChunk, scale, window, soft_cap=None) -> torch.Tensor:
        nd, num_heads, head_dim = q.shape
        _, num_kv_heads, block_size, _ = key_cache.shape
        group = num_heads // num_kv_heads
        rows = chunk.rows
        length = chunk.length
        shape = (rows.numel(), block_size, head_dim)
        if chunk.fresh_buffers:
            keys = torch.index_select(key_cache.view(-1, block_size, head_dim), 0, rows)
            values = torch.index_select(value_cache.view(-1, block_size, head_dim), 0, rows)
        else:
            keys = torch.index_select(key_cache.view(-1, block_size, head_dim), 0, rows,
                                      out=self._buffer("k", key_cache, shape))
            values = torch.index_select(value_cache.view(-1, block_size, head_dim), 0, rows,
                                        out=self._buffer("v", value_cache, shape))
        keys = keys.view(num_kv_heads * nd, length, head_dim)
        values = values.view(num_kv_heads * nd, length, head_dim)
        qh = q.view(nd, num_kv_heads, group, head_dim).transpose(0, 1).reshape(num_kv_heads * nd, group, head_dim)
        bias = chunk.bias(window, num_kv_heads, q.dtype)
        if soft_cap is None:
            scores = torch.baddbmm(bias, qh, keys.transpose(1, 2), alpha=scale)
        else:  # capped before the mask is added: tanh would turn its -inf into a visible -cap
            scores = torch.bmm(qh, keys.transpose(1, 2)).mul_(scale).div_(soft_cap).tanh_().mul_(soft_cap).add_(bias)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        o = torch.bmm(probs, values)
        return o.view(num_kv_heads, nd, group, head_dim).transpose(0, 1).reshape(nd, num_heads, head_dim)

    def _prefill(self, i, q, k, v, key_cache, value_cache, meta, scale, window, soft_cap=None) -> torch.Tensor:
        q_len, num_heads, head_dim = q.shape
        _, num_kv_heads, block_size, _ = key_cache.shape
        seq_len = meta.seq_lens_host[i]
        ctx_len = seq_len - q_len
        if ctx_len == 0:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)  # [H_kv, L, D]
        else:
            nb = -(-seq_len // block_size)
            blocks = meta.block_tables[i, :nb].long()
            heads = torch.arange(num_kv_heads, device=blocks.device)
            rows = (blocks[None, :] * num_kv_heads + heads[:, None]).reshape(-1)
            keys = key_cache.view(-1, block_size, head_dim).index_select(0, rows)
            values = value_cache.view(-1, block_size, head_dim).index_select(0, rows)
            keys = keys.view(num_kv_heads, nb * block_size, head_dim)[:, :seq_len]
            values = values.view(num_kv_heads, nb * block_size, head_dim)[:, :seq_len]
        group = num_heads // num_kv_heads
        qh = q.transpose(0, 1)  # [H, q_len, D]
        # Grouped heads as such only for SDPA on the CPU: on CUDA only the flash kernel reads
        # them, which takes neither a mask nor fp32, and the math fallback would hold every score.
        gqa = {"enable_gqa": True} if soft_cap is None and _SDPA_GQA and group > 1 and q.device.type == "cpu" else {}
        if group > 1 and not gqa:
            keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
        if soft_cap is not None:
            o = _soft_capped_attention(qh, keys, values, scale, soft_cap, _allowed(ctx_len, seq_len, window, q.device))
            return o.transpose(0, 1)
        # 4-D (a batch of one): with 3-D inputs torch's CPU SDPA takes its unfused math path.
        if ctx_len == 0 and (window is None or window >= seq_len):
            o = F.scaled_dot_product_attention(qh[None], keys[None], values[None], is_causal=True, scale=scale, **gqa)
        else:
            o = F.scaled_dot_product_attention(qh[None], keys[None], values[None], scale=scale, **gqa,
                                               attn_mask=_allowed(ctx_len, seq_len, window, q.device))
        return o[0].transpose(0, 1)

    def copy_blocks(self, kv_cache, pairs) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=kv_cache.device, dtype=torch.long)
        dst = torch.tensor([d for _, d in pairs], device=kv_cache.device, dtype=torch.long)
        kv_cache.index_copy_(2, dst, kv_cache.index_select(2, src))

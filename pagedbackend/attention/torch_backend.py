"""Attention in plain PyTorch over the paged cache: the CPU path and the reference.

Decodes (one new token per sequence) are batched: one `index_select` gathers every decode
sequence's context into `[kv_heads * seqs, tokens, head_dim]`, then two batched matmuls and a
masked softmax, so all query heads sharing a KV head read its keys once (GQA without copies).
Prefill chunks run one `scaled_dot_product_attention` per sequence, reading cached context
only when the chunk has any.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedbackend.attention.metadata import AttentionMetadata
from pagedbackend.kernels.layout import slot_to_rows


class TorchAttentionBackend:
    name = "torch"

    def __init__(self) -> None:
        # Gather buffers reused across layers and steps: allocating fresh ones each layer costs
        # page faults that made gathering 4x slower in measurements.
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # ------------------------------------------------------------------ per step
    def prepare(self, meta: AttentionMetadata, num_kv_heads: int, block_size: int) -> None:
        x = meta.extra
        x["write_rows"] = slot_to_rows(meta.slot_mapping, num_kv_heads, block_size)
        nd = meta.num_decodes
        if nd:
            seq_lens = meta.seq_lens[:nd].long()
            max_len = max(meta.seq_lens_host[:nd])
            num_blocks = -(-max_len // block_size)
            bt = meta.block_tables[:nd, :num_blocks].long()
            heads = torch.arange(num_kv_heads, device=bt.device)
            # Row (block * H + head) of the cache viewed as [num_blocks * H, block_size, D],
            # ordered head-major so the gather lands as [H, seqs, tokens, D].
            x["decode_rows"] = (bt[None] * num_kv_heads + heads[:, None, None]).reshape(-1)
            x["decode_len"] = num_blocks * block_size
            pos = torch.arange(num_blocks * block_size, device=bt.device)
            x["decode_pos"] = pos
            x["decode_seq_lens"] = seq_lens
            x["decode_masks"] = {}

    def _decode_mask(self, meta: AttentionMetadata, window: int | None) -> torch.Tensor:
        """True where a decode query must NOT look: padding past the sequence end, and keys
        that fell out of the sliding window."""
        masks = meta.extra["decode_masks"]
        if window not in masks:
            pos, lens = meta.extra["decode_pos"], meta.extra["decode_seq_lens"]
            masked = pos[None, :] >= lens[:, None]
            if window is not None:
                masked |= pos[None, :] < (lens[:, None] - window)
            masks[window] = masked
        return masks[window]

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
                sliding_window: int | None) -> torch.Tensor:
        num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
        rows = meta.extra["write_rows"]
        key_cache.view(-1, head_dim).index_copy_(0, rows, k.reshape(-1, head_dim))
        value_cache.view(-1, head_dim).index_copy_(0, rows, v.reshape(-1, head_dim))

        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], key_cache, value_cache, meta, scale, sliding_window)
        for i in range(nd, meta.num_seqs):
            start, end = meta.query_start_loc_host[i], meta.query_start_loc_host[i + 1]
            out[start:end] = self._prefill(i, q[start:end], k[start:end], v[start:end], key_cache,
                                           value_cache, meta, scale, sliding_window)
        return out

    def _decode(self, q, key_cache, value_cache, meta, scale, window) -> torch.Tensor:
        nd, num_heads, head_dim = q.shape
        _, num_kv_heads, block_size, _ = key_cache.shape
        group = num_heads // num_kv_heads
        rows = meta.extra["decode_rows"]
        length = meta.extra["decode_len"]
        shape = (rows.numel(), block_size, head_dim)
        keys = torch.index_select(key_cache.view(-1, block_size, head_dim), 0, rows,
                                  out=self._buffer("k", key_cache, shape))
        values = torch.index_select(value_cache.view(-1, block_size, head_dim), 0, rows,
                                    out=self._buffer("v", value_cache, shape))
        keys = keys.view(num_kv_heads * nd, length, head_dim)
        values = values.view(num_kv_heads * nd, length, head_dim)
        qh = q.view(nd, num_kv_heads, group, head_dim).transpose(0, 1).reshape(num_kv_heads * nd, group, head_dim)
        scores = torch.bmm(qh, keys.transpose(1, 2))
        scores.mul_(scale)
        scores.view(num_kv_heads, nd, group, length).masked_fill_(
            self._decode_mask(meta, window)[None, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        o = torch.bmm(probs, values)
        return o.view(num_kv_heads, nd, group, head_dim).transpose(0, 1).reshape(nd, num_heads, head_dim)

    def _prefill(self, i, q, k, v, key_cache, value_cache, meta, scale, window) -> torch.Tensor:
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
        if group > 1:
            keys = keys.repeat_interleave(group, dim=0)
            values = values.repeat_interleave(group, dim=0)
        qh = q.transpose(0, 1)  # [H, q_len, D]
        if ctx_len == 0 and (window is None or window >= seq_len):
            o = F.scaled_dot_product_attention(qh, keys, values, is_causal=True, scale=scale)
        else:
            qpos = torch.arange(ctx_len, seq_len, device=q.device)[:, None]
            kpos = torch.arange(seq_len, device=q.device)[None, :]
            allowed = kpos <= qpos
            if window is not None:
                allowed &= kpos > qpos - window
            o = F.scaled_dot_product_attention(qh, keys, values, attn_mask=allowed, scale=scale)
        return o.transpose(0, 1)

    def copy_blocks(self, caches, pairs) -> None:
        if not pairs:
            return
        device = caches[0][0].device
        src = torch.tensor([s for s, _ in pairs], device=device, dtype=torch.long)
        dst = torch.tensor([d for _, d in pairs], device=device, dtype=torch.long)
        for key_cache, value_cache in caches:
            key_cache.index_copy_(0, dst, key_cache.index_select(0, src))
            value_cache.index_copy_(0, dst, value_cache.index_select(0, src))

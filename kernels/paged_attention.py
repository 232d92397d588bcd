"""Paged attention in Triton: one launch for a mixed batch of prefill chunks and decodes, and a
split-KV (flash-decoding) variant for long-context decode with few sequences.

Inputs are the flattened batch: queries `[num_tokens, num_heads, head_dim]`, `query_start_loc`
(cu_seqlens_q), `seq_lens` (context + new tokens), `block_tables`, and the paged caches
(pagedbackend.kernels.layout). A sequence's new tokens see its cached context and, causally,
each other; an optional sliding window limits how far back a token looks, and an optional
soft-cap (Gemma 2's `attn_logit_softcapping`) bends the scaled scores: cap * tanh(s / cap).

Design:
* A program owns BLOCK_Q query tokens of one sequence and *all* query heads of one KV head
  (rows = token x head-in-group), so each K/V tile is loaded once for the whole GQA group.
  Rows are padded to at least 16 (tensor-core dots need M >= 16).
* Online softmax over the sequence's KV blocks, accumulating in fp32 whatever the input dtype.
* head_dim need not be a power of two (80, 96): tiles are padded and masked.
* Split-KV: the KV blocks of each decode sequence are divided among `num_splits` programs that
  write partial (acc, max, sum); a small kernel combines them. Used when there are too few
  sequence x KV-head pairs to fill the GPU and the contexts are long.
* Nothing that grows with the context or the batch is a constexpr or a specialised integer
  (split sizes, split counts, sequence counts, block-table widths are runtime arguments marked
  `do_not_specialize`), so a long decode compiles each kernel once instead of once per length.
* Launches run on the tensors' CUDA device (kernels.launch), not the thread's current one.

The Triton interpreter multiplies bf16 dot operands as raw bits (triton#11584); when
interpreting, bf16 tiles are upcast to fp32 before `tl.dot` (UPCAST), which the compiled
kernels never do.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from pagedbackend.kernels.launch import on_device_of

_MASKED = tl.constexpr(-1e30)  # finite, so rows with every key masked never compute inf - inf


@triton.jit
def _tanh(x):
    """tanh from exp alone (the interpreter has no libdevice): 2 sigmoid(2x) - 1, which
    saturates to -1 / 1 (exp overflows to inf, or underflows to 0) instead of giving NaN."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _attend_kv_blocks(
    q, pos_q, seq_len, seq, kv_head, lo, hi, k_cache_ptr, v_cache_ptr, block_tables_ptr, scale, sliding_window,
    soft_cap, stride_kb, stride_kh, stride_kn, stride_bt, offs_d, d_ok,
    BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax of the rows of `q` (query positions `pos_q`) over KV blocks [lo, hi) of
    one sequence and KV head: the unnormalized (max, sum, acc). A key is visible to a row when
    it is at or before the row's position (and inside the sliding window). With USE_SOFT_CAP the
    scaled scores are capped before masking: soft_cap * tanh(s / soft_cap)."""
    m_i = tl.full([BLOCK_M], _MASKED, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # One flat loop over BLOCK_N-row sub-tiles of the KV blocks: shared memory holds only
    # (pipeline stages) x one K and one V sub-tile, whatever the block size.
    for it in range(lo * (BLOCK_SIZE // BLOCK_N), hi * (BLOCK_SIZE // BLOCK_N)):
        j = it // (BLOCK_SIZE // BLOCK_N)
        block = tl.load(block_tables_ptr + seq * stride_bt + j).to(tl.int64)
        offs_n = (it % (BLOCK_SIZE // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
        kv = block * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_cache_ptr + kv, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if USE_SOFT_CAP:
            s = _tanh(s / soft_cap) * soft_cap
        key_pos = j * BLOCK_SIZE + offs_n
        visible = (key_pos[None, :] <= pos_q[:, None]) & (key_pos[None, :] < seq_len)
        if USE_WINDOW:
            visible = visible & (key_pos[None, :] > pos_q[:, None] - sliding_window)
        s = tl.where(visible, s, _MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        # Zero, not exp(0), for masked keys: a row that sees no key in a split keeps l = 0.
        p = tl.where(visible, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


# The block table's width follows the batch's longest sequence: not specialised on.
@triton.jit(do_not_specialize=["stride_bt"])
def _unified_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    prog_seq_ptr, prog_qoff_ptr, scale, sliding_window, soft_cap,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kh, stride_kn, stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(prog_seq_ptr + pid)
    q_off = tl.load(prog_qoff_ptr + pid)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_off + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    token_row = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + token_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    pos_q = ctx_len + tok

    last = tl.minimum(ctx_len + q_off + BLOCK_Q - 1, seq_len - 1)
    hi = last // BLOCK_SIZE + 1
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx_len + q_off - sliding_window + 1, 0) // BLOCK_SIZE

    m_i, l_i, acc = _attend_kv_blocks(
        q, pos_q, seq_len, seq, kv_head, lo, hi, k_cache_ptr, v_cache_ptr, block_tables_ptr, scale, sliding_window,
        soft_cap, stride_kb, stride_kh, stride_kn, stride_bt, offs_d, d_ok,
        BLOCK_M, D_PAD, BLOCK_SIZE, BLOCK_N, USE_WINDOW, USE_SOFT_CAP, UPCAST, PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + token_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# blocks_per_split grows with the longest context and num_seqs / stride_bt with the batch: runtime
# values, never specialised on, so a growing decode reuses one compiled kernel.
@triton.jit(do_not_specialize=["num_seqs", "blocks_per_split", "stride_bt"])
def _split_decode_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    scale, sliding_window, soft_cap, num_seqs, blocks_per_split,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_kn, stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_m = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + offs_m
    row_ok = offs_m < GROUP
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    pos_q = tl.full([BLOCK_M], 0, tl.int32) + (seq_len - 1)  # every row is the sequence's last token

    lo = split * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, tl.cdiv(seq_len, BLOCK_SIZE))
    if USE_WINDOW:
        lo = tl.maximum(lo, tl.maximum(seq_len - sliding_window, 0) // BLOCK_SIZE)

    m_i, l_i, acc = _attend_kv_blocks(
        q, pos_q, seq_len, seq, kv_head, lo, hi, k_cache_ptr, v_cache_ptr, block_tables_ptr, scale, sliding_window,
        soft_cap, stride_kb, stride_kh, stride_kn, stride_bt, offs_d, d_ok,
        BLOCK_M, D_PAD, BLOCK_SIZE, BLOCK_N, USE_WINDOW, USE_SOFT_CAP, UPCAST, PRECISION)
    # partials: [splits, seqs, heads, (D_PAD)]
    row = (split * num_seqs + seq).to(tl.int64) * NUM_HEADS + head
    tl.store(part_m_ptr + row, m_i, mask=row_ok)
    tl.store(part_l_ptr + row, l_i, mask=row_ok)
    tl.store(part_acc_ptr + row[:, None] * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _split_reduce_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, num_seqs, num_splits, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    """Combine one (sequence, head)'s `num_splits` partials. The split count is a runtime loop
    bound, not a constexpr tile size: it changes with the context length (choose_num_splits),
    and each new value would have been a new compile."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    first = seq.to(tl.int64) * NUM_HEADS + head  # partials: [splits, seqs, heads, (D_PAD)]
    split_stride = num_seqs.to(tl.int64) * NUM_HEADS
    m_max = tl.load(part_m_ptr + first)
    for s in range(1, num_splits):
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + first + s * split_stride))
    offs_d = tl.arange(0, D_PAD)
    # Splits that saw no key have l = 0 (and acc = 0) and weigh nothing.
    weight = tl.exp(tl.load(part_m_ptr + first) - m_max)
    l_sum = tl.load(part_l_ptr + first) * weight
    acc = tl.load(part_acc_ptr + first * D_PAD + offs_d) * weight
    for s in range(1, num_splits):
        row = first + s * split_stride
        weight = tl.exp(tl.load(part_m_ptr + row) - m_max)
        l_sum += tl.load(part_l_ptr + row) * weight
        acc += tl.load(part_acc_ptr + row * D_PAD + offs_d) * weight
    out = acc / l_sum
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_options(dtype: torch.dtype) -> dict:
    """Per-dtype constexprs: exact fp32 dots (no TF32) for fp32 models; the interpreter's bf16
    workaround only when interpreting."""
    return {"UPCAST": _interpreting() and dtype == torch.bfloat16,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def kv_sub_tile(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
    """Rows of a KV block processed at once (BLOCK_N). Whole 64 x 256 fp32 K and V tiles beside
    the queries needed 172 KB of shared memory, more than an A100's 163 KB; sub-tiles of at most
    16 KB fit every supported shape with the default three pipeline stages on sm_80 and sm_90
    (see compile_check). 16 rows is the least a tensor-core dot accepts."""
    per_row = triton.next_power_of_2(head_dim) * torch.empty((), dtype=dtype).element_size()
    rows = 1 << max(4, (16 * 1024 // per_row).bit_length() - 1)
    return min(block_size, rows)


def query_block_shape(group: int, max_query_len: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_M rows, BLOCK_Q tokens) per program: decode-only batches need just the GQA group
    (padded to 16 rows); prefills pack more tokens, fewer for the widest heads."""
    rows = 16 if max_query_len == 1 else (32 if head_dim > 128 else 64)
    rows = max(rows, triton.next_power_of_2(group))
    return rows, max(1, rows // group)


def program_map(query_start_loc_host: list[int], block_q: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every program: its sequence, and the offset of its first query token in it."""
    starts = np.asarray(query_start_loc_host, dtype=np.int64)
    counts = -(-(starts[1:] - starts[:-1]) // block_q)
    seq = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    first = np.cumsum(counts) - counts
    qoff = (np.arange(int(counts.sum())) - np.repeat(first, counts)) * block_q
    return (torch.from_numpy(seq).to(device), torch.from_numpy(qoff.astype(np.int32)).to(device))


def decode_program_map(num_seqs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`program_map` of a decode-only step (one query token per sequence, so one program each),
    made on the device: no host-to-device copy, which a CUDA graph could not capture."""
    return (torch.arange(num_seqs, dtype=torch.int32, device=device),
            torch.zeros(num_seqs, dtype=torch.int32, device=device))


def _check_soft_cap(logits_soft_cap: float | None) -> None:
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be positive (or None for no cap), got {logits_soft_cap}")


def unified_attention(out: torch.Tensor, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      query_start_loc_host: list[int], max_query_len: int, scale: float,
                      sliding_window: int | None = None,
                      programs: tuple[torch.Tensor, torch.Tensor] | None = None,
                      logits_soft_cap: float | None = None) -> None:
    """Attention for a mixed batch into `out` ([num_tokens, num_heads, head_dim]). `programs`
    (from `program_map`) can be computed once per step and shared by all layers;
    `logits_soft_cap` caps the scaled scores (cap * tanh(s / cap)) before the softmax."""
    _check_soft_cap(logits_soft_cap)
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    group = num_heads // num_kv_heads
    block_m, block_q = query_block_shape(group, max_query_len, head_dim)
    prog_seq, prog_qoff = programs or program_map(query_start_loc_host, block_q, q.device)
    if prog_seq.numel() == 0:
        return
    grid = (prog_seq.numel(), num_kv_heads)
    with on_device_of(q):
        _unified_attention_kernel[grid](
            out, q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, prog_seq, prog_qoff,
            scale, sliding_window or 0, logits_soft_cap or 1.0,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
            GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, HEAD_DIM=head_dim,
            D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
            BLOCK_N=kv_sub_tile(block_size, head_dim, q.dtype), USE_WINDOW=bool(sliding_window),
            USE_SOFT_CAP=logits_soft_cap is not None, **kernel_options(q.dtype),
        )


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_size: int,
                      num_sms: int | None = None, device: torch.device | str | None = None) -> int:
    """Split-KV pays off when seqs x KV heads leave most SMs idle and contexts are long enough
    to give each split several blocks; 1 means: use the unified kernel. The SM count is that of
    `device` (pass the KV cache's device; None: the current CUDA device) unless `num_sms` is given;
    a CPU device never splits."""
    if num_sms is None:
        device = torch.device("cuda") if device is None else torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return 1
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    work = num_seqs * num_kv_heads
    if work >= num_sms or max_seq_len < 1024:
        return 1
    max_blocks = -(-max_seq_len // block_size)
    splits = min(triton.next_power_of_2(-(-2 * num_sms // work)), max(1, max_blocks // 8), 64)
    return 1 << (splits.bit_length() - 1)  # powers of two: few distinct grids (and CUDA graphs) per batch size


def split_kv_decode_attention(out: torch.Tensor, q: torch.Tensor, key_cache: torch.Tensor,
                              value_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              max_seq_len: int, scale: float, num_splits: int,
                              sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
    """Decode attention (one query token per sequence, token i = sequence i) with each
    sequence's KV blocks divided among `num_splits` programs (any count; a split left without
    blocks weighs nothing in the reduction)."""
    _check_soft_cap(logits_soft_cap)
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    group = num_heads // num_kv_heads
    d_pad = triton.next_power_of_2(head_dim)
    max_blocks = -(-max_seq_len // block_size)
    blocks_per_split = -(-max_blocks // num_splits)
    part_acc = torch.empty((num_splits, num_seqs, num_heads, d_pad), dtype=torch.float32, device=q.device)
    part_m = torch.empty((num_splits, num_seqs, num_heads), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    options = kernel_options(q.dtype)
    with on_device_of(q):
        _split_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
            part_acc, part_m, part_l, q, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window or 0,
            logits_soft_cap or 1.0, num_seqs, blocks_per_split, q.stride(0), q.stride(1), key_cache.stride(0),
            key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
            NUM_HEADS=num_heads, GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
            D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_N=kv_sub_tile(block_size, head_dim, q.dtype),
            USE_WINDOW=bool(sliding_window), USE_SOFT_CAP=logits_soft_cap is not None, **options,
        )
        _split_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_m, part_l, num_seqs, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_PAD=d_pad,
        )

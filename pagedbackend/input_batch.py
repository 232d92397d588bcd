"""The model runner's persistent batch (vLLM V1's InputBatch idea): every sequence the runner
holds has a slot in preallocated arrays — its token ids, block table, sampling settings — that
the step's diffs update in place. A step's inputs are gathered from those arrays with a few
vectorised copies, so host work per step follows what changed, not everything there is.

Plain numpy: no torch, no requests. The runner turns the gathered arrays into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from pagedbackend.sampling_params import SamplingParams
from pagedbackend.sequence import SampledTokens
from pagedbackend.step import NewSeq, SchedulerOutput


_seq_id = attrgetter("seq_id")
_num_new_tokens = attrgetter("num_new_tokens")
_num_computed_tokens = attrgetter("num_computed_tokens")
_sample = attrgetter("sample")
_forks = attrgetter("forks")
_spec_token_ids = attrgetter("spec_token_ids")


@dataclass
class StepInputs:
    """A step's flattened batch: decodes first (shortest context first), then the rest."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T] cache slot of each new token
    query_start_loc: np.ndarray  # [S + 1]
    seq_lens: np.ndarray  # [S]
    block_tables: np.ndarray  # [S, max blocks] int32
    num_decodes: int
    logits_indices: np.ndarray  # token row of each sampled row (a fork repeats its parent's)
    sample_slots: np.ndarray  # batch slot of each sampled row (a fork: its parent's)
    own_rows: np.ndarray  # the sampled row of each sampling item's own token (not its forks')
    # (seq_id, flat token rows, the prompt tokens they predict, top-k), for prompt logprobs
    prompt_rows: list[tuple[int, list[int], list[int], int]]
    # Speculative decoding: (seq_id, slot, proposals) of each sequence verifying proposals, in
    # the scheduler's order, and the token rows of their logits (each sequence's last known
    # token and its proposals, len(proposals) + 1 rows); their rows are not in logits_indices.
    spec_seqs: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    spec_logits_indices: np.ndarray | None = None


class RowView(SampledTokens):
    """One batch slot as the sampler's special cases read it (penalties, bad words, ...),
    with the same attributes a `Sequence` offers."""

    __slots__ = ("seq_id", "params", "prompt_len", "token_ids", "bad_words_ids", "beam_k")

    def __init__(self, seq_id: int, params: SamplingParams, prompt_len: int, token_ids: list[int],
                 bad_words_ids: list[list[int]], beam_k: int) -> None:
        self.seq_id, self.params, self.prompt_len = seq_id, params, prompt_len
        self.token_ids, self.bad_words_ids, self.beam_k = token_ids, bad_words_ids, beam_k


def needs_row_view(params: SamplingParams, bad_words: bool, beam_k: int) -> bool:
    """Whether a row needs the sampler's per-row treatment beyond temperature and filters."""
    return bool(params.min_tokens or bad_words or params.allowed_token_ids or params.logit_bias
                or params.has_penalties or (params.seed is not None and not params.is_greedy)
                or params.logprobs is not None or params.num_samples > params.n or beam_k)


class InputBatch:
    def __init__(self, max_seqs: int, max_model_len: int, block_size: int, vocab_size: int) -> None:
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.max_blocks = -(-max_model_len // block_size)
        self._alloc(max(1, max_seqs))
        self.slot_of: dict[int, int] = {}

    def _alloc(self, cap: int) -> None:
        old = getattr(self, "capacity", 0)

        def grow(name: str, shape: tuple, dtype, fill) -> None:
            arr = np.full(shape, fill, dtype=dtype)
            if old:
                arr[:old] = getattr(self, name)
            setattr(self, name, arr)

        grow("token_ids", (cap, self.max_model_len), np.int32, 0)
        grow("num_tokens", (cap,), np.int64, 0)
        grow("prompt_len", (cap,), np.int64, 0)
        grow("block_table", (cap, self.max_blocks), np.int32, 0)
        grow("temperature", (cap,), np.float32, 1.0)
        grow("greedy", (cap,), np.bool_, False)
        grow("top_k", (cap,), np.int64, self.vocab_size)
        grow("top_p", (cap,), np.float32, 1.0)
        grow("min_p", (cap,), np.float32, 0.0)
        grow("prompt_logprobs_done", (cap,), np.int64, 0)
        self.params: list[SamplingParams | None] = getattr(self, "params", []) + [None] * (cap - old)
        self.seq_ids: list[int | None] = getattr(self, "seq_ids", []) + [None] * (cap - old)
        self.bad_words: list[list[list[int]]] = getattr(self, "bad_words", []) + [[] for _ in range(cap - old)]
        self.beam_k: list[int] = getattr(self, "beam_k", []) + [0] * (cap - old)
        self.free_slots: list[int] = getattr(self, "free_slots", []) + list(range(cap - 1, old - 1, -1))
        self.special: set[int] = getattr(self, "special", set())  # slots needing a RowView when sampled
        self.prompt_logprob_slots: set[int] = getattr(self, "prompt_logprob_slots", set())
        self.capacity = cap

    # ------------------------------------------------------------ the diffs
    def apply(self, out: SchedulerOutput) -> None:
        """Removals first (a preempted sequence may re-enter in the same step), then new
        sequences, then changed block tables and tokens the scheduler appended."""
        for seq_id in out.removed_seq_ids:
            self.remove(seq_id)
        for new in out.new_seqs:
            self.add(new)
        for seq_id, (start, ids) in out.block_updates.items():
            slot = self.slot_of[seq_id]
            self.block_table[slot, start:start + len(ids)] = ids
        for seq_id, tokens in out.new_token_ids.items():
            self.append(self.slot_of[seq_id], tokens)

    def add(self, new: NewSeq) -> int:
        if new.seq_id in self.slot_of:
            raise RuntimeError(f"sequence {new.seq_id} is already in the batch")
        if not self.free_slots:
            self._alloc(2 * self.capacity)
        slot = self.free_slots.pop()
        self.slot_of[new.seq_id] = slot
        n = len(new.token_ids)
        self.token_ids[slot, :n] = new.token_ids
        self.num_tokens[slot] = n
        self.prompt_len[slot] = new.prompt_len
        self.block_table[slot] = 0  # nothing of the slot's previous occupant stays visible
        self.block_table[slot, :len(new.block_ids)] = new.block_ids
        p = new.params
        self.params[slot], self.seq_ids[slot] = p, new.seq_id
        self.bad_words[slot], self.beam_k[slot] = new.bad_words_ids, new.beam_k
        self.greedy[slot] = p.is_greedy
        self.temperature[slot] = 1.0 if p.is_greedy else p.temperature
        self.top_k[slot] = p.top_k if 0 < p.top_k < self.vocab_size else self.vocab_size
        self.top_p[slot], self.min_p[slot] = p.top_p, p.min_p
        self.prompt_logprobs_done[slot] = new.prompt_logprobs_done
        if needs_row_view(p, bool(new.bad_words_ids), new.beam_k):
            self.special.add(slot)
        if p.prompt_logprobs is not None:
            self.prompt_logprob_slots.add(slot)
        return slot

    def remove(self, seq_id: int) -> None:
        slot = self.slot_of.pop(seq_id, None)
        if slot is None:
            return
        self.params[slot] = self.seq_ids[slot] = None
        self.bad_words[slot] = []
        self.special.discard(slot)
        self.prompt_logprob_slots.discard(slot)
        self.free_slots.append(slot)

    def append(self, slot: int, tokens: list[int]) -> None:
        n = int(self.num_tokens[slot])
        self.token_ids[slot, n:n + len(tokens)] = tokens
        self.num_tokens[slot] = n + len(tokens)

    def append_sampled(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """One sampled token per slot, appended with one scatter."""
        self.token_ids[slots, self.num_tokens[slots]] = tokens
        self.num_tokens[slots] += 1

    def row_view(self, slot: int, seq_id: int, params: SamplingParams) -> RowView:
        n = int(self.num_tokens[slot])
        return RowView(seq_id, params, int(self.prompt_len[slot]), self.token_ids[slot, :n].tolist(),
                       self.bad_words[slot], self.beam_k[slot])

    # ------------------------------------------------------------ the inputs
    def prepare(self, out: SchedulerOutput, prompt_logprobs: bool = True) -> StepInputs:
        """The step's flattened inputs. `prompt_logprobs=False`: rows for nobody's prompt
        logprobs (a draft model's steps over the same sequences)."""
        items = out.scheduled
        n = len(items)
        # One C-level pass per field (map over attrgetter), not a Python loop over the items.
        slots = np.fromiter(map(self.slot_of.__getitem__, map(_seq_id, items)), dtype=np.int64, count=n)
        q_lens = np.fromiter(map(_num_new_tokens, items), dtype=np.int64, count=n)
        ctx_lens = np.fromiter(map(_num_computed_tokens, items), dtype=np.int64, count=n)
        # Sampled rows per item: its own and one per fork when it samples, else none. None: one
        # each, the usual step (every item samples, none forks; the checks are C loops).
        num_rows = None
        speculating = any(map(_spec_token_ids, items))
        if not all(map(_sample, items)) or any(map(_forks, items)) or speculating:
            num_rows = np.fromiter(map(_sample, items), dtype=np.bool_, count=n) * (
                1 + np.fromiter(map(len, map(_forks, items)), dtype=np.int64, count=n))
        num_drafts = None
        if speculating:  # proposals sit after each one's tokens, where its input ids are read from
            num_drafts = np.fromiter(map(len, map(_spec_token_ids, items)), dtype=np.int64, count=n)
            num_rows[num_drafts > 0] = 0  # verified apart, below
            for i in np.flatnonzero(num_drafts).tolist():
                slot, drafts = int(slots[i]), items[i].spec_token_ids
                start = int(self.num_tokens[slot])
                self.token_ids[slot, start:start + len(drafts)] = drafts
        # Decodes first, shortest context first: backends batch them in length-sorted chunks.
        is_decode = q_lens == 1
        if is_decode.all():
            # Only decodes, the usual step: row i's one token sits at position ctx_len, so the
            # general path's token -> row bookkeeping below reduces to this, in a third of the
            # numpy calls (each costs 10-25 us when a forward pass has just flushed the caches).
            num_decodes = n
            order = np.argsort(ctx_lens, kind="stable")
            o_slots = token_slots = slots[order]
            positions = ctx_lens[order]
            query_start = np.arange(n + 1, dtype=np.int64)
            seq_lens = positions + 1
        else:
            decodes = np.flatnonzero(is_decode)
            num_decodes = len(decodes)
            order = np.concatenate([decodes[np.argsort(ctx_lens[decodes], kind="stable")], np.flatnonzero(~is_decode)])
            o_slots, o_q, o_ctx = slots[order], q_lens[order], ctx_lens[order]
            query_start = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(o_q, out=query_start[1:])
            num_tokens = int(query_start[-1])
            row_of_token = np.repeat(np.arange(len(order)), o_q)
            positions = np.arange(num_tokens) - query_start[row_of_token] + o_ctx[row_of_token]
            token_slots = o_slots[row_of_token]
            seq_lens = o_ctx + o_q
        input_ids = self.token_ids[token_slots, positions]
        bs = self.block_size
        slot_mapping = self.block_table[token_slots, positions // bs].astype(np.int64) * bs + positions % bs
        max_blocks = int(-(-seq_lens.max() // bs))
        block_tables = self.block_table[o_slots, :max_blocks]

        # Logit rows in the scheduler's sampling order; a fork reuses its parent's row.
        row_of_item = np.empty(len(items), dtype=np.int64)
        row_of_item[order] = np.arange(len(order))
        last_token = query_start[1:] - 1
        if num_rows is None:
            logits_indices, sample_slots, own_rows = last_token[row_of_item], slots, np.arange(n)
        else:
            logits_indices = np.repeat(last_token[row_of_item], num_rows)
            sample_slots = np.repeat(slots, num_rows)
            own_rows = (np.cumsum(num_rows) - num_rows)[num_rows > 0]
        spec_seqs, spec_logits_indices = [], None
        if num_drafts is not None:
            verifying = np.flatnonzero(num_drafts)
            spec_seqs = [(items[i].seq_id, int(slots[i]), items[i].spec_token_ids) for i in verifying.tolist()]
            ends = last_token[row_of_item[verifying]]
            counts = num_drafts[verifying] + 1
            spec_logits_indices = np.repeat(ends - counts + 1, counts) + (
                np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
        prompt_rows = []
        if self.prompt_logprob_slots and prompt_logprobs:
            for i, it in enumerate(items):
                slot = int(slots[i])
                if slot not in self.prompt_logprob_slots:
                    continue
                prompt_len = int(self.prompt_len[slot])
                # Positions p predicting prompt token p + 1 not yet reported (a recompute after
                # preemption does not report them twice).
                first = max(it.num_computed_tokens, int(self.prompt_logprobs_done[slot]))
                end = min(it.num_computed_tokens + it.num_new_tokens, prompt_len - 1)
                if first < end:
                    base = int(query_start[row_of_item[i]]) - it.num_computed_tokens
                    prompt_rows.append((it.seq_id, list(range(base + first, base + end)),
                                        self.token_ids[slot, first + 1:end + 1].tolist(),
                                        self.params[slot].prompt_logprobs))
                    self.prompt_logprobs_done[slot] = end
        return StepInputs(input_ids.astype(np.int64), positions, slot_mapping, query_start, seq_lens, block_tables,
                          num_decodes, logits_indices, sample_slots, own_rows, prompt_rows, spec_seqs,
                          spec_logits_indices)

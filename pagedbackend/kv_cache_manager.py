"""Maps sequences to KV blocks: on-demand allocation, prefix-cache lookups, forks with
copy-on-write, and swapping to a host-memory pool. It answers "can this sequence get room for
k more tokens?" with yes or no; what to do about a no (preempt someone) is the scheduler's
decision. Block copies it decides on (copy-on-write, swap out, swap in) are queued for the
model runner, which performs them before the next forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedbackend.block_pool import BlockPool, KVBlock, hash_block_tokens
from pagedbackend.sequence import Sequence


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def record(self, num_tokens: int, num_hit_tokens: int) -> None:
        """One admitted prompt (counted once: not while it waits, not again when resumed)."""
        self.queries += num_tokens
        self.hits += num_hit_tokens


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self._blocks: dict[int, list[KVBlock]] = {}
        self._num_cached: dict[int, int] = {}  # leading blocks of a seq already registered in the cache
        self._pending_copies: list[tuple[int, int]] = []
        self.prefix_stats = PrefixCacheStats()
        # Host (swap) pool: plain ids, no sharing or caching; a swapped sequence owns its copies.
        self.num_host_blocks = num_host_blocks
        self._host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))
        self._host_blocks: dict[int, list[int]] = {}
        self._pending_swap_out: list[tuple[int, int]] = []  # (device block, host block)
        self._pending_swap_in: list[tuple[int, int]] = []  # (host block, device block)
        # What the model runner knows of each sequence's block table: its length when last
        # sent, and the first entry replaced in place since (copy-on-write).
        self._sent: dict[int, int] = {}
        self._replaced_from: dict[int, int] = {}

    # ---------------------------------------------------------------- queries
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, seq: Sequence) -> list[int]:
        return [b.block_id for b in self._blocks.get(seq.seq_id, ())]

    def blocks(self, seq: Sequence) -> list[KVBlock]:
        return self._blocks.get(seq.seq_id, [])

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------ the runner's view
    def runner_blocks(self, seq: Sequence) -> list[int]:
        """The whole block table, for a sequence entering the runner's batch."""
        self._replaced_from.pop(seq.seq_id, None)
        ids = self.block_ids(seq)
        self._sent[seq.seq_id] = len(ids)
        return ids

    def block_update(self, seq: Sequence) -> tuple[int, list[int]] | None:
        """(start, ids): the table from `start` on, if it changed since the runner last saw it
        (new blocks appended; a block replaced by copy-on-write); else None."""
        blocks = self._blocks.get(seq.seq_id, ())
        sent = self._sent.get(seq.seq_id, 0)
        start = min(sent, self._replaced_from.pop(seq.seq_id, sent))
        if start == len(blocks) == sent:
            return None
        self._sent[seq.seq_id] = len(blocks)
        return start, [b.block_id for b in blocks[start:]]

    def fits_next_token(self, seq: Sequence) -> bool:
        """Whether one more token after the computed ones goes into a block the sequence already
        owns with nothing to do: no new block, no copy-on-write, and a block table the runner
        has already seen. Then `allocate_slots(seq, 1)` would succeed changing nothing and
        `block_update(seq)` would return None, so the scheduler's decode fast path skips both
        (block_size - 1 of every block_size decode steps of a sequence are this case)."""
        seq_id = seq.seq_id
        blocks = self._blocks.get(seq_id)
        if not blocks:
            return False
        n, bs = seq.num_computed_tokens, self.block_size
        if n >= len(blocks) * bs:
            return False  # needs a new block
        if n % bs and blocks[n // bs].ref_cnt > 1:
            return False  # writes into a shared partial block: copy-on-write first
        return self._sent.get(seq_id) == len(blocks) and seq_id not in self._replaced_from

    def _forget_sent(self, seq_id: int) -> None:
        self._sent.pop(seq_id, None)
        self._replaced_from.pop(seq_id, None)

    # ------------------------------------------------------------- prefix cache
    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (benchmarks, weight reloads); False while any is in use."""
        return self.pool.reset_prefix_cache()

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[KVBlock], int]:
        """Longest run of this sequence's leading full blocks present in the cache.

        At least one token is always left to compute, because the step that computes it is the
        one that yields the logits to sample from.
        """
        if not self.enable_caching or seq.wants_prompt_logprobs:
            # Prompt logprobs need the logits of every prompt position: compute them all.
            return [], 0
        self._extend_hashes(seq, seq.num_tokens)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's full blocks whose KV has been written (after a step)."""
        if not self.enable_caching:
            return
        start = self._num_cached.get(seq.seq_id, 0)
        if seq.num_computed_tokens < (start + 1) * self.block_size:
            return  # no block filled since the last call: the usual decode step, checked first
        blocks = self._blocks.get(seq.seq_id)
        if not blocks:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(blocks))
        if num_full <= start:
            return
        self._extend_hashes(seq, num_full * self.block_size)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], seq.block_hashes[i])
        self._num_cached[seq.seq_id] = num_full

    def _extend_hashes(self, seq: Sequence, num_tokens: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        while (len(hashes) + 1) * bs <= num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, seq.token_ids[i * bs:(i + 1) * bs]))

    # --------------------------------------------------------------- allocation
    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones (and after
        `computed_blocks`, prefix-cache hits being adopted now). False, changing nothing, if
        the pool cannot supply the blocks."""
        computed_blocks = computed_blocks or []
        blocks = self._blocks.setdefault(seq.seq_id, [])
        num_computed = seq.num_computed_tokens + len(computed_blocks) * self.block_size
        total_blocks = self.num_blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = max(0, total_blocks - len(blocks) - len(computed_blocks))

        # Writing into a partial last block that another sequence also references needs a
        # private copy first (copy-on-write).
        cow = (
            not computed_blocks
            and num_new_tokens > 0
            and num_computed % self.block_size != 0
            and bool(blocks)
            and blocks[num_computed // self.block_size].ref_cnt > 1
        )
        # Hits that are currently free would be taken out of the free queue by touch().
        free_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + int(cow) > self.pool.num_free_blocks - free_hits:
            if not blocks:
                del self._blocks[seq.seq_id]
            return False

        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
            self._num_cached[seq.seq_id] = len(blocks)
        if cow:
            idx = num_computed // self.block_size
            (new_block,) = self.pool.get_new_blocks(1) or ()
            old_block = blocks[idx]
            self._pending_copies.append((old_block.block_id, new_block.block_id))
            self.pool.free_blocks([old_block])
            blocks[idx] = new_block
            self._replaced_from[seq.seq_id] = min(idx, self._replaced_from.get(seq.seq_id, idx))
        if num_new_blocks:
            new_blocks = self.pool.get_new_blocks(num_new_blocks)
            assert new_blocks is not None
            blocks.extend(new_blocks)
        return True

    def trim(self, seq: Sequence, num_slots: int) -> None:
        """Free the sequence's blocks past its first `num_slots` KV slots (speculative decoding:
        blocks holding only rejected proposals or unused lookahead slots). Its block table
        shrinks; the runner's copy keeps the stale entries past the end, which nothing reads,
        until new blocks are sent from there on."""
        blocks = self._blocks.get(seq.seq_id)
        keep = self.num_blocks_needed(num_slots)
        if not blocks or len(blocks) <= keep:
            return
        freed = blocks[keep:]
        del blocks[keep:]
        self.pool.free_blocks(reversed(freed))
        seq_id = seq.seq_id
        if self._sent.get(seq_id, 0) > keep:
            self._sent[seq_id] = keep
        if self._num_cached.get(seq_id, 0) > keep:
            self._num_cached[seq_id] = keep

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (one more reference each)."""
        blocks = self._blocks.get(parent.seq_id, [])
        self.pool.touch(blocks)
        self._blocks[child.seq_id] = list(blocks)
        self._num_cached[child.seq_id] = self._num_cached.get(parent.seq_id, 0)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """(src, dst) block copies the model runner must do before the next forward."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def take_pending_swaps(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(swap out: device -> host, swap in: host -> device) copies for the model runner;
        swap-outs first, since a device block freed by one may be reused in the same step."""
        out, self._pending_swap_out = self._pending_swap_out, []
        into, self._pending_swap_in = self._pending_swap_in, []
        return out, into

    # ------------------------------------------------------------------- swap
    @property
    def num_free_host_blocks(self) -> int:
        return len(self._host_free)

    @property
    def num_swapped_seqs(self) -> int:
        """Sequences whose KV lives in the host pool now."""
        return len(self._host_blocks)

    def can_swap_out(self, seq: Sequence) -> bool:
        return 0 < len(self._blocks.get(seq.seq_id, ())) <= len(self._host_free)

    def swap_out(self, seq: Sequence) -> None:
        """Copy the sequence's blocks to host blocks it owns and release the device blocks
        (shared ones just lose a reference; cached ones stay cached until evicted)."""
        blocks = self._blocks.pop(seq.seq_id)
        self._num_cached.pop(seq.seq_id, None)
        self._forget_sent(seq.seq_id)
        host = [self._host_free.pop() for _ in blocks]
        self._pending_swap_out.extend((b.block_id, h) for b, h in zip(blocks, host))
        self._host_blocks[seq.seq_id] = host
        self.pool.free_blocks(reversed(blocks))

    def swap_in(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Bring a swapped sequence back into fresh device blocks, with room for
        `num_new_tokens` more tokens. False, changing nothing, if the pool cannot supply them."""
        host = self._host_blocks[seq.seq_id]
        need = max(len(host), self.num_blocks_needed(seq.num_computed_tokens + num_new_tokens))
        blocks = self.pool.get_new_blocks(need)
        if blocks is None:
            return False
        self._pending_swap_in.extend((h, b.block_id) for h, b in zip(host, blocks))
        del self._host_blocks[seq.seq_id]
        self._host_free.extend(host)
        self._blocks[seq.seq_id] = blocks
        self._num_cached[seq.seq_id] = 0  # re-registered by cache_computed_blocks after the step
        return True

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. Tail blocks go first into the free queue so they are
        evicted before the prefix blocks that other requests are likelier to share.

        Blocks are registered in the prefix cache only after the step that wrote them succeeded
        (`cache_computed_blocks`), so a failed step never leaves untrusted contents cached."""
        blocks = self._blocks.pop(seq.seq_id, None)
        self._num_cached.pop(seq.seq_id, None)
        self._forget_sent(seq.seq_id)
        if blocks:
            self.pool.free_blocks(reversed(blocks))
        host = self._host_blocks.pop(seq.seq_id, None)
        if host:
            self._host_free.extend(host)

    def check_all_free(self) -> None:
        assert not self._blocks, f"sequences still hold blocks: {sorted(self._blocks)[:8]}"
        assert not self._sent, f"the runner's view still holds sequences: {sorted(self._sent)[:8]}"
        assert not self._host_blocks, f"sequences still hold host blocks: {sorted(self._host_blocks)[:8]}"
        assert len(self._host_free) == self.num_host_blocks, (
            f"host pool holds {len(self._host_free)} of {self.num_host_blocks} blocks")
        self.pool.check_all_free()

"""The pool of fixed-size KV blocks: reference counts, the free queue, and the prefix cache.

Plain Python on purpose: the pool only knows block ids, ref counts and hashes, so it behaves
the same on CPU and GPU and can be driven by property-based tests.

A block whose ref count drops to zero goes to the tail of the free queue but keeps its hash,
so a later request with the same prefix can take it back (a prefix-cache hit) until it is
reused for something else. Allocation pops from the head, so the least recently freed cached
block is evicted first (LRU).
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Iterable, Sequence

BlockHash = bytes

_ROOT_HASH: BlockHash = b""


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of a full block, chained to the hash of the block before it.

    Chaining makes a block's hash identify the whole prefix up to and including it, so equal
    hashes mean equal KV contents. blake2b keeps accidental collisions out of the question.
    """
    h = hashlib.blake2b(parent_hash or _ROOT_HASH, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class KVBlock:
    """Metadata of one physical block; the KV tensors live in the model runner."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: O(1) pop from the head, push to the tail, and removal
    from the middle (needed when a free but cached block is reused by a prefix hit)."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        block.prev_free, block.next_free = last, self._tail
        last.next_free = block
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def __iter__(self):
        block = self._head.next_free
        while block is not self._tail:
            assert block is not None
            yield block
            block = block.next_free


class BlockPool:
    """Owns every block's metadata and the hash -> block map of the prefix cache."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free ones, cached or not)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, num: int) -> list[KVBlock] | None:
        """Take `num` blocks with ref count 1, evicting cached contents; None if there are not
        enough (the caller decides whether to preempt), never a partial allocation."""
        if num > len(self.free_queue):
            return None
        out = []
        for _ in range(num):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on blocks found in the cache (or shared by a fork)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full, computed block under its chained hash.

        If another block already holds the same contents (two requests computed the same prefix
        at once), the first one stays the cached copy; the duplicate is simply not cached.
        """
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue's tail
        in the order given, so pass the ones to evict first first."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; only allowed when no block is in use (like vLLM's)."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
            self.num_evictions += 1
        block.block_hash = None

    def check_all_free(self) -> None:
        """Raise AssertionError unless every block is free (the invariant tests check)."""
        in_use = [b for b in self.blocks if b.ref_cnt != 0]
        assert not in_use, f"blocks still referenced: {in_use[:8]}"
        assert len(self.free_queue) == self.num_blocks, (
            f"free queue holds {len(self.free_queue)} of {self.num_blocks} blocks"
        )

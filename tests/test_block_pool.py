"""BlockPool and KVCacheManager: ref counts, the free queue, the prefix cache, forks with
copy-on-write. Plain Python, so the invariants are checked exhaustively and by hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedbackend.block_pool import BlockPool, FreeBlockQueue, KVBlock, hash_block_tokens
from pagedbackend.kv_cache_manager import KVCacheManager
from pagedbackend.sampling_params import SamplingParams
from pagedbackend.sequence import Sequence


def _seq(tokens, request_id="r"):
    return Sequence(request_id, list(tokens), SamplingParams(), 0.0)


def test_free_queue_removes_from_the_middle_in_constant_time_order():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4]
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    assert [b.block_id for b in q] == [1, 3, 4, 2]
    assert len(q) == 4


def test_allocation_that_cannot_be_satisfied_returns_none_and_changes_nothing():
    pool = BlockPool(4)
    assert pool.get_new_blocks(5) is None
    assert pool.num_free_blocks == 4
    got = pool.get_new_blocks(4)
    assert [b.ref_cnt for b in got] == [1, 1, 1, 1]
    assert pool.get_new_blocks(1) is None
    pool.free_blocks(got)
    pool.check_all_free()


def test_double_free_is_an_error():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    try:
        pool.free_blocks([b])
    except RuntimeError as e:
        assert "double free" in str(e)
    else:
        raise AssertionError("double free went unnoticed")


def test_freed_cached_block_is_reused_by_a_prefix_hit_until_evicted():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_block(a, h)
    pool.free_blocks([a, b])
    assert pool.get_cached_block(h) is a
    pool.touch([a])  # a prefix hit takes it back out of the free queue
    assert a.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free_blocks([a])
    # LRU: b was freed first, so it is handed out first; a keeps its contents.
    (x,) = pool.get_new_blocks(1)
    assert x is b and pool.get_cached_block(h) is a
    (y,) = pool.get_new_blocks(1)
    assert y is a and pool.get_cached_block(h) is None and a.block_hash is None
    pool.free_blocks([x, y])
    pool.check_all_free()


def test_block_hash_chains_the_whole_prefix():
    h1 = hash_block_tokens(None, [1, 2, 3])
    assert hash_block_tokens(h1, [4, 5, 6]) != hash_block_tokens(hash_block_tokens(None, [9, 2, 3]), [4, 5, 6])
    assert hash_block_tokens(h1, [4, 5, 6]) == hash_block_tokens(hash_block_tokens(None, [1, 2, 3]), [4, 5, 6])


def test_prefix_hit_leaves_the_last_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = _seq(range(8))
    assert kv.allocate_slots(first, 8)
    first.num_computed_tokens = 8
    kv.cache_computed_blocks(first)
    kv.free(first)
    again = _seq(range(8), "again")
    hits, n = kv.get_computed_blocks(again)
    assert n == 4 and len(hits) == 1  # two full blocks cached, but one token must be computed
    longer = _seq(list(range(8)) + [99], "longer")
    hits, n = kv.get_computed_blocks(longer)
    assert n == 8 and len(hits) == 2


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = _seq(range(6))  # one full block + a partial one
    assert kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = parent.fork(1, parent.params)
    child.num_computed_tokens = 6
    kv.fork(parent, child)
    assert [b.ref_cnt for b in kv.blocks(parent)] == [2, 2]
    assert kv.allocate_slots(child, 1)  # writes position 6 into the shared partial block
    copies = kv.take_pending_copies()
    assert len(copies) == 1 and copies[0][0] == kv.block_ids(parent)[1]
    assert kv.block_ids(child)[0] == kv.block_ids(parent)[0]  # full block still shared
    assert kv.block_ids(child)[1] == copies[0][1]
    assert [b.ref_cnt for b in kv.blocks(parent)] == [2, 1]
    assert kv.allocate_slots(parent, 1)  # now the sole owner: writes in place
    assert kv.take_pending_copies() == []
    kv.free(parent)
    kv.free(child)
    kv.check_all_free()


def test_cow_counts_toward_the_allocation_check():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    parent = _seq(range(6))
    assert kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = parent.fork(1, parent.params)
    child.num_computed_tokens = 6
    kv.fork(parent, child)
    assert not kv.allocate_slots(child, 1)  # the copy needs a block and none is free
    assert kv.take_pending_copies() == []
    kv.free(parent)
    kv.free(child)
    kv.check_all_free()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "hit"]), st.integers(0, 40), st.integers(0, 3)),
                max_size=60))
def test_random_allocations_keep_ref_counts_and_free_queue_consistent(ops):
    """Any interleaving of allocations, prefix hits and frees keeps: every block either
    referenced or in the free queue (never both), ref counts equal the number of holders,
    and everything free at the end."""
    block_size = 4
    kv = KVCacheManager(num_blocks=12, block_size=block_size)
    live: list[Sequence] = []
    prefixes = [list(range(p * 100, p * 100 + 40)) for p in range(4)]
    for op, length, which in ops:
        if op == "free" and live:
            kv.free(live.pop(which % len(live)))
        elif op in ("alloc", "hit") and length:
            seq = _seq(prefixes[which][:length], f"s{len(live)}")
            hits, n = kv.get_computed_blocks(seq) if op == "hit" else ([], 0)
            if kv.allocate_slots(seq, length - n, hits):
                seq.num_computed_tokens = length
                kv.cache_computed_blocks(seq)
                live.append(seq)
        holders: dict[int, int] = {}
        for s in live:
            for b in kv.blocks(s):
                holders[b.block_id] = holders.get(b.block_id, 0) + 1
        free_ids = {b.block_id for b in kv.pool.free_queue}
        for b in kv.pool.blocks:
            assert b.ref_cnt == holders.get(b.block_id, 0)
            assert (b.ref_cnt == 0) == (b.block_id in free_ids)
        assert len(free_ids) == kv.num_free_blocks
    for s in live:
        kv.free(s)
    kv.check_all_free()

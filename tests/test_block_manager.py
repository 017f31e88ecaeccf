"""The scheduler's KV block manager (docs/design.md §3): allocation as tokens arrive, prefix
caching, LRU eviction, forks with eager copy-on-write, and a stateful model check that no shared
block is ever written and that every sequence's blocks hold its tokens."""

import copy
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pagedserve.scheduler.block_manager import (
    ROOT_HASH,
    BlockCopy,
    BlockManager,
    NoFreeBlocks,
    chain_root,
    hash_block,
)


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def compute(bm: BlockManager, seq_id: str, token_ids: list[int]) -> int:
    """Admit a sequence and compute all of its tokens; returns its prefix hit."""
    hit = bm.admit(seq_id, token_ids)
    bm.allocate(seq_id, len(token_ids))
    bm.commit(seq_id, token_ids, len(token_ids))
    return hit


def state(bm: BlockManager) -> dict:
    """Everything the manager holds, for "nothing changed" checks (free-list order included)."""
    return copy.deepcopy(vars(bm))


# -- allocation ---------------------------------------------------------------------------


def test_blocks_are_allocated_as_tokens_arrive():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.admit("a", toks(10)) == 0
    assert bm.block_table("a") == [] and bm.num_free_blocks == 8
    assert bm.allocate("a", 1) == [0]
    assert bm.allocate("a", 4) == []
    assert bm.allocate("a", 5) == [1]
    assert bm.allocate("a", 10) == [2]
    assert bm.allocate("a", 9) == []  # never shrinks
    assert bm.block_table("a") == [0, 1, 2]
    assert (bm.num_used_blocks, bm.num_free_blocks) == (3, 5)
    assert bm.can_allocate("a", 32) and not bm.can_allocate("a", 33)
    bm.free("a")
    assert (bm.num_free_blocks, bm.num_cached_free_blocks) == (8, 0)  # nothing was committed
    bm.check_invariants()


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    compute(bm, "a", toks(8))
    bm.free("a")  # two cached-free blocks, two never-cached ones
    bm.admit("b", toks(4, 100))
    bm.allocate("b", 4)
    before = state(bm)
    assert not bm.can_allocate("b", 17)  # needs 4 more, 3 are free
    with pytest.raises(NoFreeBlocks):
        bm.allocate("b", 17)
    assert state(bm) == before
    assert bm.num_cached_prefix_tokens(toks(9)) == 8  # nothing was evicted
    bm.check_invariants()


def test_misuse_is_reported_saying_what_is_wrong():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.admit("a", toks(6))
    with pytest.raises(ValueError, match="^sequence 'a' is already admitted$"):
        bm.admit("a", toks(6))
    with pytest.raises(ValueError, match=r"^'a': 4 computed tokens exceed its 6 tokens or its "
                       r"0 blocks$"):  # no block holds those tokens yet
        bm.commit("a", toks(6), 4)
    with pytest.raises(NoFreeBlocks, match="^'a' needs 5 blocks, 4 free$"):
        bm.allocate("a", 20)
    bm.allocate("a", 6)
    with pytest.raises(ValueError, match="^sequence 'a' is already admitted$"):
        bm.fork("a", "a", 4)
    with pytest.raises(ValueError, match="^'a' has no blocks for 9 tokens$"):
        bm.fork("a", "b", 9)
    with pytest.raises(KeyError):
        bm.free("unknown")


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4), (4, -1)])
def test_a_pool_needs_at_least_one_block_of_at_least_one_token(num_blocks, block_size):
    with pytest.raises(ValueError, match="^num_blocks and block_size must be positive$"):
        BlockManager(num_blocks, block_size)
    BlockManager(1, 1)  # the smallest pool there is


# -- prefix caching -----------------------------------------------------------------------


def test_prefix_hit_after_a_finished_request_reuses_its_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = toks(10)
    assert compute(bm, "a", prompt) == 0
    table_a = bm.block_table("a")
    bm.free("a")
    # Two full blocks stay cached; the partial third one is not.
    assert (bm.num_free_blocks, bm.num_cached_free_blocks) == (16, 2)

    follow_up = [*prompt, 99, 98]
    assert bm.num_cached_prefix_tokens(follow_up) == 8
    assert bm.admit("b", follow_up) == 8
    assert bm.block_table("b") == table_a[:2]
    assert [bm.ref_count(b) for b in table_a[:2]] == [1, 1]
    assert bm.num_cached_free_blocks == 0  # the hit blocks left the free list
    assert (bm.stats.queried_tokens, bm.stats.hit_tokens) == (10 + 12, 8)
    new = bm.allocate("b", 12)
    assert len(new) == 1 and new[0] not in table_a[:2]
    bm.check_invariants()


def test_prefix_hit_on_blocks_in_use_shares_them():
    bm = BlockManager(num_blocks=16, block_size=4)
    compute(bm, "a", toks(10))
    assert bm.admit("b", toks(12)) == 8
    shared = bm.block_table("b")
    assert shared == bm.block_table("a")[:2]
    assert [bm.ref_count(b) for b in shared] == [2, 2]
    bm.free("a")
    assert [bm.ref_count(b) for b in shared] == [1, 1] and bm.num_cached_free_blocks == 0
    bm.free("b")
    assert bm.num_cached_free_blocks == 2
    bm.check_invariants()


def test_a_hit_always_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    compute(bm, "a", toks(8))
    bm.free("a")
    assert bm.num_cached_prefix_tokens(toks(9)) == 8
    assert bm.num_cached_prefix_tokens(toks(8)) == 4  # the whole prompt is cached: drop a block
    assert bm.num_cached_prefix_tokens(toks(5)) == 4
    assert bm.num_cached_prefix_tokens(toks(4)) == 0
    assert bm.num_cached_prefix_tokens([]) == 0
    assert bm.admit("b", toks(8)) == 4


def test_lookup_has_no_side_effects():
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, "a", toks(12))
    bm.free("a")
    before = state(bm)
    assert bm.num_cached_prefix_tokens(toks(13)) == 12
    assert state(bm) == before


def test_identical_prompts_computed_concurrently_index_one_copy():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = toks(9)
    assert bm.admit("a", prompt) == 0
    assert bm.admit("b", prompt) == 0  # neither has committed: no hit, both compute
    for seq_id in ("a", "b"):
        bm.allocate(seq_id, 9)
        bm.commit(seq_id, prompt, 9)
    bm.check_invariants()
    first = bm.block_table("a")[:2]
    bm.free("a")
    bm.free("b")
    assert bm.num_cached_free_blocks == 2  # b's duplicates were never indexed
    assert bm.admit("c", prompt) == 8
    assert bm.block_table("c") == first


def test_commit_is_incremental():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = toks(6)
    bm.admit("a", tokens)
    bm.allocate("a", 6)
    bm.commit("a", tokens, 3)
    assert bm.num_cached_prefix_tokens(toks(9)) == 0  # no block is full of computed tokens
    bm.commit("a", tokens, 6)
    assert bm.num_cached_prefix_tokens(toks(9)) == 4
    tokens += [6, 7, 8]  # generated tokens extend the chain
    bm.allocate("a", 9)
    bm.commit("a", tokens, 9)
    assert bm.num_cached_prefix_tokens(toks(9)) == 8


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    compute(bm, "a", toks(10))
    bm.free("a")
    assert (bm.num_free_blocks, bm.num_cached_free_blocks) == (16, 0)
    assert bm.num_cached_prefix_tokens(toks(10)) == 0
    assert bm.admit("b", toks(10)) == 0 and bm.block_table("b") == []
    assert (bm.stats.queried_tokens, bm.stats.hit_tokens) == (20, 0)
    bm.check_invariants()


# -- eviction -----------------------------------------------------------------------------


def _two_cached_chains() -> tuple[BlockManager, list[int], list[int]]:
    """A pool of 6 blocks: a's chain (freed first) and b's chain cached-free, 2 blocks unused."""
    bm = BlockManager(num_blocks=6, block_size=4)
    for seq_id, start in (("a", 0), ("b", 100)):
        compute(bm, seq_id, toks(8, start))
    table_a, table_b = bm.block_table("a"), bm.block_table("b")
    bm.free("a")
    bm.free("b")
    return bm, table_a, table_b


def hits(bm: BlockManager) -> tuple[int, int]:
    return bm.num_cached_prefix_tokens(toks(9)), bm.num_cached_prefix_tokens(toks(9, 100))


def test_eviction_is_lru_tail_first_and_only_on_demand():
    bm, table_a, table_b = _two_cached_chains()
    assert hits(bm) == (8, 8)
    bm.admit("c", toks(40, 200))
    unused = bm.allocate("c", 8)
    assert set(unused).isdisjoint(table_a + table_b)  # never-cached blocks go first
    assert hits(bm) == (8, 8) and bm.num_cached_free_blocks == 4
    # Then the least recently freed chain, its last block first.
    assert bm.allocate("c", 12) == [table_a[1]]
    assert hits(bm) == (4, 8)
    assert bm.allocate("c", 16) == [table_a[0]]
    assert hits(bm) == (0, 8)
    assert bm.allocate("c", 20) == [table_b[1]]
    assert hits(bm) == (0, 4) and bm.num_cached_free_blocks == 1
    bm.check_invariants()


def test_a_prefix_hit_makes_blocks_recently_used():
    bm, table_a, table_b = _two_cached_chains()
    assert bm.admit("again", toks(9)) == 8  # a's chain leaves the free list...
    bm.free("again")  # ...and comes back behind b's
    bm.admit("c", toks(40, 200))
    bm.allocate("c", 8)  # the two never-cached blocks
    assert bm.allocate("c", 16) == [table_b[1], table_b[0]]
    assert hits(bm) == (8, 0)


def test_an_evicted_parent_orphans_its_children_until_recomputed():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.admit("a", toks(8))
    bm.admit("b", toks(12))  # same first 8 tokens, computed concurrently: duplicates
    for seq_id, n in (("a", 8), ("b", 12)):
        bm.allocate(seq_id, n)
        bm.commit(seq_id, toks(n), n)
    child = bm.block_table("b")[2]  # indexed under a's chain
    bm.free("a")
    bm.free("b")
    assert bm.num_cached_free_blocks == 3 and bm.num_cached_prefix_tokens(toks(13)) == 12
    bm.admit("c", toks(28, 100))
    bm.allocate("c", 28)  # 5 never-cached blocks, then a's 2: b's block outlives its parents
    assert bm.num_cached_free_blocks == 1
    assert bm.num_cached_prefix_tokens(toks(13)) == 0  # lookups walk from the root
    bm.free("c")
    compute(bm, "d", toks(8))  # the parents come back under the same hashes
    assert bm.num_cached_prefix_tokens(toks(13)) == 12
    bm.free("d")
    assert bm.admit("e", toks(13)) == 12 and bm.block_table("e")[2] == child
    bm.check_invariants()


def test_reset_prefix_cache_only_when_nothing_is_in_use():
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, "a", toks(8))
    compute(bm, "b", toks(8, 100))
    bm.free("b")
    before = state(bm)
    assert bm.reset_prefix_cache() is False
    assert state(bm) == before
    bm.free("a")
    assert bm.reset_prefix_cache() is True
    assert (bm.num_free_blocks, bm.num_cached_free_blocks) == (8, 0)
    assert bm.num_cached_prefix_tokens(toks(9)) == 0
    bm.check_invariants()


# -- forks --------------------------------------------------------------------------------


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = toks(10)
    compute(bm, "p", prompt)
    parent = bm.block_table("p")

    copy_ = bm.fork("p", "c1", 10)
    child = bm.block_table("c1")
    assert child[:2] == parent[:2] and len(child) == 3
    assert copy_ == BlockCopy(src=parent[2], dst=child[2])
    assert child[2] not in parent
    assert [bm.ref_count(b) for b in parent] == [2, 2, 1]
    assert bm.ref_count(child[2]) == 1

    assert bm.fork("p", "c2", 8) is None  # ends on a block boundary: nothing to copy
    assert bm.block_table("c2") == parent[:2]
    assert bm.fork("p", "c3", 0) is None and bm.block_table("c3") == []
    assert [bm.ref_count(b) for b in parent] == [3, 3, 1]

    # The child writes its own sample into its copy, and it is cached under its own tokens.
    tokens = [*prompt, 50, 51]
    assert bm.allocate("c1", 12) == []
    bm.commit("c1", tokens, 12)
    for seq_id in ("p", "c1", "c2", "c3"):
        bm.free(seq_id)
    assert bm.admit("d", [*tokens, 0]) == 12
    assert bm.block_table("d") == child
    bm.check_invariants()


def test_a_fork_inside_a_committed_block_diverges_from_there():
    bm = BlockManager(num_blocks=16, block_size=4)
    compute(bm, "p", toks(10))
    parent = bm.block_table("p")
    block_copy = bm.fork("p", "c", 6)
    child = bm.block_table("c")
    assert block_copy == BlockCopy(src=parent[1], dst=child[1]) and child[0] == parent[0]
    tokens = [*toks(6), 70, 71]  # the child's own sample overwrites the copy's last slots
    assert bm.allocate("c", 8) == []
    bm.commit("c", tokens, 8)
    bm.free("p")
    bm.free("c")
    assert bm.num_cached_prefix_tokens(toks(9)) == 8  # the parent's chain is intact
    assert bm.admit("d", [*tokens, 0]) == 8 and bm.block_table("d") == child
    bm.check_invariants()


def test_fork_without_a_free_block_for_the_copy_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    compute(bm, "p", toks(10))
    before = state(bm)
    with pytest.raises(NoFreeBlocks, match="^fork of 'p' needs a block for its partial block$"):
        bm.fork("p", "c", 10)
    assert state(bm) == before
    assert bm.fork("p", "c", 8) is None  # sharing full blocks needs no free block


def test_parallel_sampling_of_a_long_prompt_costs_one_prompt_and_eight_tails():
    bm = BlockManager(num_blocks=200, block_size=16)
    prompt = toks(1000)  # 62 full blocks and 8 tokens in a 63rd
    compute(bm, "s0", prompt)
    assert bm.num_used_blocks == 63
    samples = ["s0"] + [f"s{i}" for i in range(1, 8)]
    for sample in samples[1:]:
        assert bm.fork("s0", sample, 1000) is not None
    assert bm.num_used_blocks == 62 + 8
    assert all(bm.ref_count(b) == 8 for b in bm.block_table("s0")[:62])
    assert len({bm.block_table(s)[62] for s in samples}) == 8

    for i, sample in enumerate(samples):  # each fills its own tail with different tokens
        tokens = prompt + [5000 + i] * 8
        assert bm.allocate(sample, 1008) == []
        bm.commit(sample, tokens, 1008)
    assert bm.num_used_blocks == 70
    for sample in samples:
        assert len(bm.allocate(sample, 1009)) == 1
    assert bm.num_used_blocks == 78
    for sample in samples:
        bm.free(sample)
    assert (bm.num_free_blocks, bm.num_cached_free_blocks) == (200, 62 + 8)
    bm.check_invariants()


# -- hashing ------------------------------------------------------------------------------


CHAIN_SCRIPT = """
from pagedserve.scheduler.block_manager import ROOT_HASH, hash_block
parent = ROOT_HASH
for start in range(0, 48, 16):
    parent = hash_block(parent, list(range(start, start + 16)), b"model-x")
print(parent.hex())
"""


def test_a_sliding_window_releases_the_blocks_wholly_before_it():
    """Window 6, blocks of 4: a query at position 20 sees 15..20, so blocks 0-2 (positions
    0-11) go back to the pool; the table keeps their positions (as block 0 for the executor,
    which never reads them) and grows after them."""
    bm = BlockManager(16, 4, sliding_window=6)
    compute(bm, "a", toks(20))
    table = bm.block_table("a")
    free = bm.num_free_blocks
    assert bm.release_outside_window("a", 20) == 3
    assert bm.block_table("a") == [0, 0, 0, *table[3:]]
    assert bm.num_free_blocks == free + 3 and bm.num_held_blocks("a") == 2
    assert bm.release_outside_window("a", 20) == 0
    assert bm.release_outside_window("a", 16) == 0  # never takes back
    assert len(bm.allocate("a", 21)) == 1 and len(bm.block_table("a")) == 6
    bm.check_invariants()
    # Released blocks stay indexed like any freed block: the same prompt hits them all.
    assert compute(bm, "b", toks(20)) == 16
    bm.free("a")
    bm.free("b")
    bm.check_invariants()
    assert bm.num_free_blocks == 16


def test_without_a_window_nothing_is_released():
    bm = BlockManager(16, 4)
    compute(bm, "a", toks(40 - 8))
    assert bm.release_outside_window("a", 32) == 0 and bm.num_held_blocks("a") == 8
    with pytest.raises(ValueError, match="sliding_window must be positive"):
        BlockManager(16, 4, sliding_window=0)


def test_a_fork_shares_what_its_parent_still_holds():
    bm = BlockManager(16, 4, sliding_window=5)
    compute(bm, "p", toks(18))
    assert bm.release_outside_window("p", 18) == 3  # sees 14..18
    parent = bm.block_table("p")
    copy = bm.fork("p", "c", 18)
    child = bm.block_table("c")
    assert child[:4] == parent[:4] == [0, 0, 0, parent[3]]
    assert copy == BlockCopy(src=parent[4], dst=child[4])
    assert bm.ref_count(parent[3]) == 2 and bm.num_held_blocks("c") == 2
    bm.check_invariants()
    with pytest.raises(ValueError, match="released blocks that a fork at 12 tokens attends to"):
        bm.fork("p", "d", 12)
    bm.free("p")
    bm.free("c")
    bm.check_invariants()
    assert bm.num_free_blocks == 16


def test_chain_hash_is_the_same_in_every_process():
    parent = ROOT_HASH
    for start in range(0, 48, 16):
        parent = hash_block(parent, toks(16, start), b"model-x")
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", CHAIN_SCRIPT], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert out == parent.hex()


# Chain hashes are a format: a prefix must hash alike across processes, restarts and versions
# (docs: block_manager.py). Changing the encoding on purpose means changing ROOT_HASH's version
# tag and these values.
GOLDEN_HASHES = {
    "root": "f09505637af66fee2d3075ffae41199593d64755315bd8a94a365db33cf46ac5",
    "block [1, 2, 3, 4]": "e96d4ea1dd2efdb9887c92831308334191b00ddaa7a41e3bcaf664973a3c91fb",
    "block [1, 2, 3, 4] salted tenant-a":
        "72fbc1ae9cafb1374989f936b8b2252641f73b9a5fe575240dd266d059b55817",
}


def test_chain_hashes_do_not_change_between_versions():
    assert {"root": ROOT_HASH.hex(),
            "block [1, 2, 3, 4]": hash_block(ROOT_HASH, [1, 2, 3, 4]).hex(),
            "block [1, 2, 3, 4] salted tenant-a":
                hash_block(chain_root(b"tenant-a"), [1, 2, 3, 4]).hex()} == GOLDEN_HASHES
    assert chain_root(b"") == ROOT_HASH and hash_block(ROOT_HASH, [1]) == \
        hash_block(ROOT_HASH, [1], b"")  # no salt, no extra key: the plain chain


def test_cache_salts_keep_chains_apart():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = toks(9)
    bm.admit("a", prompt, salt=b"tenant-a")
    bm.allocate("a", 9)
    bm.commit("a", prompt, 9)
    bm.free("a")
    assert bm.num_cached_prefix_tokens(prompt, b"tenant-a") == 8
    assert bm.num_cached_prefix_tokens(prompt, b"tenant-b") == 0
    assert bm.num_cached_prefix_tokens(prompt) == 0
    assert bm.admit("same salt", prompt, salt=b"tenant-a") == 8
    assert bm.admit("other salt", prompt, salt=b"tenant-b") == 0
    assert bm.admit("no salt", prompt) == 0
    bm.check_invariants()


def test_a_fork_inside_the_first_block_keeps_the_parent_s_salt():
    """The child of a salted parent forked before any block is full chains its blocks from
    the salted root: they never serve another salt's (or no salt's) requests."""
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.admit("parent", toks(3), salt=b"tenant-a")
    bm.allocate("parent", 3)
    bm.commit("parent", toks(3), 3)
    bm.fork("parent", "child", 3)
    child_tokens = [*toks(3), 7, 8]
    bm.allocate("child", 5)
    bm.commit("child", child_tokens, 5)
    bm.free("child")
    assert bm.num_cached_prefix_tokens(child_tokens, b"tenant-a") == 4
    assert bm.num_cached_prefix_tokens(child_tokens) == 0


def test_admit_without_the_cache_takes_no_cached_block():
    """Prompt logprobs need every prompt position computed: such a sequence computes from its
    first token even when its prefix is cached, and holds none of the cached blocks."""
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, "a", toks(9))
    bm.free("a")
    cached = bm.num_cached_free_blocks
    assert bm.admit("b", toks(9), use_cache=False) == 0
    assert bm.block_table("b") == [] and bm.num_cached_free_blocks == cached
    assert bm.admit("c", toks(9)) == 8


def test_an_extra_key_is_used_for_lookups_and_commits_alike():
    """A manager's extra key (one per model) goes into every hash it indexes and looks up."""
    bm = BlockManager(num_blocks=8, block_size=4, extra_key=b"model-x")
    compute(bm, "a", toks(9))
    bm.free("a")
    assert bm.admit("b", toks(9)) == 8


def test_chain_hash_covers_parent_tokens_and_extra_key():
    base = hash_block(ROOT_HASH, [1, 2], b"k")
    assert len(base) == 32
    assert hash_block(base, [1, 2], b"k") != base
    assert hash_block(ROOT_HASH, [1, 3], b"k") != base
    assert hash_block(ROOT_HASH, [1, 2], b"j") != base
    # The length-prefixed key cannot run into the tokens.
    assert hash_block(ROOT_HASH, [], b"k\x01") != hash_block(ROOT_HASH, [1], b"k")


# -- stateful model check -----------------------------------------------------------------

TOKENS = st.integers(0, 2)  # a tiny vocabulary, so that prompts share prefixes often


class BlockManagerMachine(RuleBasedStateMachine):
    """Random sequences against a model of which tokens each holds. `content` shadows the
    physical blocks: what each slot's K/V depends on, i.e. the sequence's tokens up to and
    including the one written there (None where nothing was written since the block was handed
    out). A prefix hit on a block computed after another prefix, a write into a shared block or
    a block reused while still held all show up as a sequence whose blocks no longer hold its
    prefixes."""

    def __init__(self):
        super().__init__()
        self.bm: BlockManager | None = None
        self.tokens: dict[str, list[int]] = {}  # running sequences: all known tokens
        self.computed: dict[str, int] = {}
        self.preempted: dict[str, list[int]] = {}
        self.history: list[list[int]] = []  # prompts to share prefixes with
        self.content: dict[int, list[tuple[int, ...] | None]] = {}
        self.next_id = 0

    @initialize(num_blocks=st.integers(4, 16), block_size=st.sampled_from([1, 2, 4]),
                caching=st.sampled_from([True, True, True, False]),
                window=st.sampled_from([None, None, 1, 3, 6]))
    def setup(self, num_blocks, block_size, caching, window):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching,
                               extra_key=b"test", sliding_window=window)

    def _released(self, seq_id: str) -> int:
        return len(self.bm.block_table(seq_id)) - self.bm.num_held_blocks(seq_id)

    def _new_id(self) -> str:
        self.next_id += 1
        return f"s{self.next_id}"

    def _pick(self, data, ids) -> str:
        return data.draw(st.sampled_from(sorted(ids)))

    def _admit(self, seq_id: str, tokens: list[int]) -> None:
        bm = self.bm
        expected = bm.num_cached_prefix_tokens(tokens)
        queried, hit_before = bm.stats.queried_tokens, bm.stats.hit_tokens
        hit = bm.admit(seq_id, tokens)
        assert hit == expected
        assert hit % bm.block_size == 0 and hit < len(tokens)
        assert bm.enable_prefix_caching or hit == 0
        assert len(bm.block_table(seq_id)) == hit // bm.block_size
        assert (bm.stats.queried_tokens, bm.stats.hit_tokens) == (
            queried + len(tokens), hit_before + hit)
        self.tokens[seq_id], self.computed[seq_id] = list(tokens), hit
        self.history = [*self.history[-15:], list(tokens)]

    def _compute(self, seq_id: str, target: int) -> bool:
        """Allocate for and write tokens up to `target`, then commit; False if out of blocks."""
        bm, bs = self.bm, self.bm.block_size
        table = bm.block_table(seq_id)
        if not bm.can_allocate(seq_id, target):
            before = state(bm)
            with pytest.raises(NoFreeBlocks):
                bm.allocate(seq_id, target)
            assert state(bm) == before
            return False
        free_before = bm.num_free_blocks
        new = bm.allocate(seq_id, target)
        assert len(new) == max(0, -(-target // bs) - len(table))
        assert bm.block_table(seq_id) == table + new
        assert bm.num_free_blocks == free_before - len(new)
        for block_id in new:
            assert bm.ref_count(block_id) == 1
            self.content[block_id] = [None] * bs
        table += new
        for pos in range(self.computed[seq_id], target):
            block_id = table[pos // bs]
            assert bm.ref_count(block_id) == 1, f"write into shared block {block_id}"
            self.content[block_id][pos % bs] = tuple(self.tokens[seq_id][:pos + 1])
        self.computed[seq_id] = target
        bm.commit(seq_id, self.tokens[seq_id], target)
        return True

    def _release(self, seq_id: str) -> None:
        bm = self.bm
        held = bm.block_table(seq_id)[self._released(seq_id):]
        last_holder = sum(bm.ref_count(b) == 1 for b in held)
        free_before = bm.num_free_blocks
        bm.free(seq_id)
        assert bm.num_free_blocks == free_before + last_holder
        del self.tokens[seq_id], self.computed[seq_id]

    @rule(data=st.data())
    def admit(self, data):
        base = data.draw(st.sampled_from(self.history)) if self.history else []
        cut = data.draw(st.integers(0, len(base)))
        suffix = data.draw(st.lists(TOKENS, min_size=0 if cut else 1,
                                    max_size=3 * self.bm.block_size))
        self._admit(self._new_id(), base[:cut] + suffix)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 9))
    def grow(self, data, n):
        """A prefill chunk of up to n prompt tokens, or n generated tokens."""
        seq_id = self._pick(data, self.tokens)
        tokens, computed = self.tokens[seq_id], self.computed[seq_id]
        if computed == len(tokens):
            tokens += data.draw(st.lists(TOKENS, min_size=n, max_size=n))
        self._compute(seq_id, min(len(tokens), computed + n))

    @precondition(lambda self: any(self.computed.values()))
    @rule(data=st.data())
    def fork(self, data):
        """Parallel sampling: a child shares the first tokens its parent computed (usually all of
        them; at least one, a fork of nothing is a unit test)."""
        bm, bs = self.bm, self.bm.block_size
        parent_id = self._pick(data, [s for s, n in self.computed.items() if n])
        # Not before what the parent released: its window there is gone (the scheduler forks
        # a parent where it stands).
        earliest = max(1, self._released(parent_id) * bs + (bm.sliding_window or 1) - 1)
        if earliest > self.computed[parent_id]:
            return
        computed = data.draw(st.just(self.computed[parent_id])
                             | st.integers(earliest, self.computed[parent_id]))
        parent = bm.block_table(parent_id)
        child_id = self._new_id()
        if computed % bs and not bm.num_free_blocks:
            before = state(bm)
            with pytest.raises(NoFreeBlocks):
                bm.fork(parent_id, child_id, computed)
            assert state(bm) == before
            return
        block_copy = bm.fork(parent_id, child_id, computed)
        child = bm.block_table(child_id)
        full = computed // bs
        assert child[:full] == parent[:full]
        assert len(child) == -(-computed // bs)
        if computed % bs:
            assert block_copy == BlockCopy(src=parent[full], dst=child[full])
            assert bm.ref_count(block_copy.dst) == 1
            assert block_copy.dst not in parent[self._released(parent_id):]
            self.content[block_copy.dst] = list(self.content[block_copy.src])
        else:
            assert block_copy is None
        self.tokens[child_id] = self.tokens[parent_id][:computed]
        self.computed[child_id] = computed

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def slide(self, data):
        """Before a sequence's next step: the blocks wholly before its next query's window go
        back to the pool (none without a window); the blocks in the window stay."""
        bm, bs = self.bm, self.bm.block_size
        seq_id = self._pick(data, self.tokens)
        computed, released = self.computed[seq_id], self._released(seq_id)
        table = bm.block_table(seq_id)
        window = bm.sliding_window
        outside = 0 if window is None else min(max(computed - window + 1, 0) // bs, len(table))
        newly = table[released:outside]
        last_holder = sum(bm.ref_count(b) == 1 for b in newly)
        free_before = bm.num_free_blocks
        assert bm.release_outside_window(seq_id, computed) == len(newly)
        assert self._released(seq_id) == max(released, outside)
        assert bm.num_free_blocks == free_before + last_holder
        assert bm.block_table(seq_id) == [0] * max(released, outside) + table[
            max(released, outside):]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def finish_or_abort(self, data):
        """Finished, or aborted at any point (mid-prefill included): the blocks go back."""
        self._release(self._pick(data, self.tokens))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def preempt(self, data):
        seq_id = self._pick(data, self.tokens)
        self.preempted[seq_id] = self.tokens[seq_id]
        self._release(seq_id)

    @precondition(lambda self: self.preempted)
    @rule(data=st.data())
    def readmit(self, data):
        """A preempted sequence returns with its prompt and generated tokens."""
        seq_id = self._pick(data, self.preempted)
        self._admit(seq_id, self.preempted.pop(seq_id))

    @precondition(lambda self: self.bm.num_free_blocks)
    @rule(data=st.data())
    def pressure(self, data):
        """A new sequence of unseen tokens takes k free blocks: never-cached blocks go first,
        cached ones are evicted only for the rest."""
        bm = self.bm
        k = data.draw(st.integers(1, bm.num_free_blocks))
        cached = bm.num_cached_free_blocks
        uncached = bm.num_free_blocks - cached
        seq_id = self._new_id()
        self._admit(seq_id, [1000 + self.next_id] * (k * bm.block_size))
        assert self._compute(seq_id, k * bm.block_size)
        assert bm.num_cached_free_blocks == cached - max(0, k - uncached)

    @rule()
    def reset_prefix_cache(self):
        bm = self.bm
        idle = bm.num_used_blocks == 0
        assert bm.reset_prefix_cache() is idle
        if idle:
            assert bm.num_cached_free_blocks == 0
            self.history = []

    @invariant()
    def blocks_hold_their_sequences_tokens(self):
        if self.bm is None:
            return
        bm, bs = self.bm, self.bm.block_size
        bm.check_invariants()
        for seq_id, tokens in self.tokens.items():
            table, computed = bm.block_table(seq_id), self.computed[seq_id]
            assert len(table) * bs >= computed
            # Released blocks lie wholly before the window of the next query; the rest hold
            # the sequence's tokens.
            first_held = self._released(seq_id) * bs
            window = bm.sliding_window
            assert first_held == 0 or first_held <= computed - window + 1
            for pos in range(first_held, computed):
                assert self.content[table[pos // bs]][pos % bs] == tuple(tokens[:pos + 1]), (
                    f"{seq_id}: block {table[pos // bs]} does not hold the K/V of token {pos}")
            # The block the next token lands in, once allocated, is this sequence's alone.
            if computed // bs < len(table):
                assert bm.ref_count(table[computed // bs]) == 1

    def teardown(self):
        if self.bm is None:
            return
        for seq_id in list(self.tokens):
            self._release(seq_id)
        bm = self.bm
        assert (bm.num_free_blocks, bm.num_used_blocks) == (bm.num_blocks, 0)
        bm.check_invariants()
        assert bm.reset_prefix_cache()
        assert bm.num_cached_free_blocks == 0
        bm.check_invariants()


TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])

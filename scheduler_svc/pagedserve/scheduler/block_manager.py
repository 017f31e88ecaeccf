"""The KV block pool of one executor (or tensor-parallel group): block tables, ref counts and the
prefix cache (docs/design.md §3). Pure bookkeeping on block ids; the executor holds the tensors.

Blocks hold `block_size` tokens and are allocated as tokens arrive. A full block of computed
tokens gets a chain hash, sha256 over (parent hash, extra key, token ids) in a fixed byte
encoding, so the same prefix hashes alike in every process and across restarts (Python's
`hash()` is salted per process). The index hash -> block is the prefix cache; a new sequence
attaches the longest chain of indexed full blocks of its tokens and computes only the rest.
A request's cache salt (vLLM's `cache_salt`) gives its chains a root of their own
(`chain_root`), so it is folded into the first block's hash and into every hash after it:
requests with different salts never share a block, nor learn from a hit that the other's
prompt was seen.

Free blocks (ref count 0) live in one of two structures, both O(1) per block touched:

- `_uncached_free`, a stack of blocks without a hash: nothing is lost by reusing them, so
  allocation takes them first.
- `_cached_free`, an `OrderedDict` used as the LRU list of free blocks that are still indexed.
  It is a hash map over a doubly linked list (in C): O(1) append at the back when a block is
  freed, O(1) pop from the front when one is evicted, and O(1) removal from the middle when a
  prefix hit revives a free block. That is exactly what vLLM V1's hand-written
  FreeKVCacheBlockQueue provides, without per-block link fields to keep consistent.

So an indexed block is evicted (its hash dropped from the index) only when a block is needed and
no never-cached free block is left, least recently freed first. A sequence's blocks are freed
tail first, so the end of a chain is evicted before its beginning (as in vLLM V1); a lookup
walks a chain from its root, so an evicted parent leaves its children indexed but unreachable
until the parent is computed and indexed again.

Sliding windows (`sliding_window`, where every attention layer of the model has one): a block
whose positions all lie before the window of the sequence's next query is released while the
sequence runs (`release_outside_window`), as vLLM does; kernels never read positions outside
the window. The table keeps its positions: the released entries stay at its front, counted by
`_SeqBlocks.released`, no longer held (ref counts skip them) and sent to the executor as block
0, which nothing reads. A released block that was indexed stays in the prefix cache like any
other freed block. A sequence then holds about window / block_size + 1 blocks however long it
grows.

Shared blocks are never written: full blocks are immutable, and the only partial block two
sequences could share, the one a fork covers, is copied eagerly (the returned `BlockCopy` must
run before the next step's writes, which is where the step plan puts it).

Errors: running out of blocks raises `NoFreeBlocks` with nothing changed (`can_allocate` asks
first); an unknown or duplicate sequence id, or a request for tokens the table does not cover, is
the caller's bug and raises `KeyError` / `ValueError`.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BlockHash = bytes

# The parent of a chain's first block: a fixed, named constant rather than empty bytes, so a
# change of the encoding can change it and never collide with older hashes.
ROOT_HASH: BlockHash = hashlib.sha256(b"pagedserve kv block chain v1").digest()


def hash_block(parent: BlockHash, token_ids: Sequence[int], extra_key: bytes = b"") -> BlockHash:
    """The chain hash of one full block: sha256 over the parent hash (32 bytes), the extra key
    (length-prefixed, so the fields cannot run into each other) and the token ids as
    little-endian int64."""
    digest = hashlib.sha256(parent)
    digest.update(struct.pack("<I", len(extra_key)))
    digest.update(extra_key)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


def chain_root(salt: bytes = b"") -> BlockHash:
    """The parent of the first block of a request salted with `salt`: ROOT_HASH without one.
    A salted root hashes no tokens, which no real block does, so it is never a block's hash."""
    return hash_block(ROOT_HASH, (), b"cache salt " + salt) if salt else ROOT_HASH


class NoFreeBlocks(Exception):
    """Not enough free blocks (cached-free ones included) for the request; nothing changed."""


@dataclass(frozen=True)
class BlockCopy:
    """Copy the K/V of block `src` into block `dst` (copy-on-write for a fork)."""
    src: int
    dst: int


@dataclass
class PrefixCacheStats:
    """Counted by `admit` (whether or not prefix caching is on): tokens looked up, tokens hit."""
    queried_tokens: int = 0
    hit_tokens: int = 0


@dataclass(slots=True)
class _Block:
    ref_count: int = 0
    hash: BlockHash | None = None  # set only while the block is the index's entry for it


@dataclass(slots=True)
class _SeqBlocks:
    # The parent of the first block's hash (chain_root of the request's cache salt).
    root: BlockHash = ROOT_HASH
    table: list[int] = field(default_factory=list)
    # Chain hashes of this sequence's first len(hashes) full blocks, committed so far. Kept per
    # sequence, not read from the blocks: a duplicate block is not indexed and carries no hash,
    # yet its hash is the parent of the next one.
    hashes: list[BlockHash] = field(default_factory=list)
    # Leading table entries released (outside the sliding window): positions only.
    released: int = 0

    @property
    def held(self) -> list[int]:
        """The blocks the sequence holds: its table after the released entries."""
        return self.table[self.released:]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 extra_key: bytes = b"", sliding_window: int | None = None):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError("sliding_window must be positive (None: no window)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.extra_key = extra_key
        self.stats = PrefixCacheStats()
        self._blocks = [_Block() for _ in range(num_blocks)]
        # Popped from the end: block 0 is handed out first, which keeps tests readable.
        self._uncached_free = list(range(num_blocks - 1, -1, -1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._index: dict[BlockHash, int] = {}
        self._seqs: dict[str, _SeqBlocks] = {}

    # -- counts -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached-free (evictable) ones included."""
        return len(self._uncached_free) + len(self._cached_free)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def block_table(self, seq_id: str) -> list[int]:
        """A copy of the sequence's block table (logical block i -> physical block id), its
        released entries as block 0."""
        seq = self._seqs[seq_id]
        return [0] * seq.released + seq.held

    def num_held_blocks(self, seq_id: str) -> int:
        return len(self._seqs[seq_id].table) - self._seqs[seq_id].released

    # -- prefix cache lookups -----------------------------------------------------------

    def _cached_chain(self, token_ids: Sequence[int],
                      root: BlockHash) -> list[tuple[BlockHash, int]]:
        """(hash, block id) of the longest indexed chain of full blocks of token_ids from
        `root`, leaving at least one token to compute: the step that computes it produces the
        next logits."""
        if not self.enable_prefix_caching:
            return []
        chain, parent = [], root
        max_blocks = (len(token_ids) - 1) // self.block_size
        for i in range(max_blocks):
            block_hash = hash_block(
                parent, token_ids[i * self.block_size:(i + 1) * self.block_size], self.extra_key)
            block_id = self._index.get(block_hash)
            if block_id is None:
                break
            chain.append((block_hash, block_id))
            parent = block_hash
        return chain

    def num_cached_prefix_tokens(self, token_ids: Sequence[int], salt: bytes = b"") -> int:
        """Tokens of the longest cached chain of full blocks of token_ids (under the cache
        salt `salt`), without side effects (for routing a request to the executor with the
        longest hit). Capped so at least one token is left to compute."""
        return len(self._cached_chain(token_ids, chain_root(salt))) * self.block_size

    # -- sequence lifecycle -------------------------------------------------------------

    def admit(self, seq_id: str, token_ids: Sequence[int], use_cache: bool = True,
              salt: bytes = b"") -> int:
        """Start a sequence: attach the longest cached prefix of its cache salt `salt` (none
        without `use_cache`) and return how many tokens are already computed (a multiple of
        block_size, < len(token_ids) when token_ids is not empty). Allocates nothing else."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already admitted")
        seq = _SeqBlocks(root=chain_root(salt))
        chain = self._cached_chain(token_ids, seq.root) if use_cache else []
        for block_hash, block_id in chain:
            self._take(block_id)
            seq.table.append(block_id)
            seq.hashes.append(block_hash)
        self._seqs[seq_id] = seq
        hit_tokens = len(chain) * self.block_size
        self.stats.queried_tokens += len(token_ids)
        self.stats.hit_tokens += hit_tokens
        return hit_tokens

    def _blocks_needed(self, seq_id: str, num_total_tokens: int) -> int:
        needed = -(-num_total_tokens // self.block_size) - len(self._seqs[seq_id].table)
        return max(needed, 0)

    def can_allocate(self, seq_id: str, num_total_tokens: int) -> bool:
        return self._blocks_needed(seq_id, num_total_tokens) <= self.num_free_blocks

    def allocate(self, seq_id: str, num_total_tokens: int) -> list[int]:
        """Append blocks so the table covers num_total_tokens tokens and return the new ids
        (possibly none), evicting least recently freed cached blocks as needed. Raises
        NoFreeBlocks, with nothing changed, if there are not enough free blocks."""
        needed = self._blocks_needed(seq_id, num_total_tokens)
        if needed > self.num_free_blocks:
            raise NoFreeBlocks(f"{seq_id!r} needs {needed} blocks, {self.num_free_blocks} free")
        new_blocks = [self._take_free() for _ in range(needed)]
        self._seqs[seq_id].table.extend(new_blocks)
        return new_blocks

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Index every block that became full of computed tokens: the first num_computed_tokens
        of token_ids (all known tokens of the sequence) have K/V in the cache. Incremental, so
        calling it every step costs nothing until a block fills. An identical block already
        indexed keeps its entry; this sequence's copy simply is not indexed."""
        seq = self._seqs[seq_id]
        if num_computed_tokens > min(len(token_ids), len(seq.table) * self.block_size):
            raise ValueError(f"{seq_id!r}: {num_computed_tokens} computed tokens exceed its "
                             f"{len(token_ids)} tokens or its {len(seq.table)} blocks")
        if not self.enable_prefix_caching:
            return
        parent = seq.hashes[-1] if seq.hashes else seq.root
        for i in range(len(seq.hashes), num_computed_tokens // self.block_size):
            parent = hash_block(
                parent, token_ids[i * self.block_size:(i + 1) * self.block_size], self.extra_key)
            seq.hashes.append(parent)
            if i < seq.released:  # no longer this sequence's block: another may hold it
                continue
            block = self._blocks[seq.table[i]]
            # A block shared through a fork may have been indexed by its other holder already.
            if block.hash is None and parent not in self._index:
                block.hash = parent
                self._index[parent] = seq.table[i]

    def fork(self, parent_id: str, child_id: str, num_computed_tokens: int) -> BlockCopy | None:
        """Start `child_id` sharing the parent's first num_computed_tokens computed tokens. Full
        blocks are shared (ref +1); if num_computed_tokens ends inside a block, the child gets
        a fresh block and the returned BlockCopy fills it from the parent's block before the
        next step writes anything, so no shared block is ever written. The child's table then
        covers ceil(num_computed_tokens / block_size) blocks. Raises NoFreeBlocks, with nothing
        changed, if a copy is needed and no block is free."""
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} is already admitted")
        parent = self._seqs[parent_id]
        if num_computed_tokens > len(parent.table) * self.block_size:
            raise ValueError(f"{parent_id!r} has no blocks for {num_computed_tokens} tokens")
        if parent.released and parent.released * self.block_size > \
                num_computed_tokens - self.sliding_window + 1:
            raise ValueError(f"{parent_id!r} released blocks that a fork at "
                             f"{num_computed_tokens} tokens attends to")
        num_full, partial = divmod(num_computed_tokens, self.block_size)
        if partial and not self.num_free_blocks:
            raise NoFreeBlocks(f"fork of {parent_id!r} needs a block for its partial block")
        child = _SeqBlocks(root=parent.root, table=parent.table[:num_full],
                           hashes=parent.hashes[:num_full],
                           released=min(parent.released, num_full))
        for block_id in child.held:
            self._blocks[block_id].ref_count += 1
        copy = None
        if partial:
            copy = BlockCopy(src=parent.table[num_full], dst=self._take_free())
            child.table.append(copy.dst)
        self._seqs[child_id] = child
        return copy

    def free(self, seq_id: str) -> None:
        """Finish, abort or preempt: release every block of the table. Last block first, so the
        tail of a chain is evicted before its head; indexed blocks stay in the prefix cache until
        evicted."""
        for block_id in reversed(self._seqs.pop(seq_id).held):
            self._release(block_id)

    def release_outside_window(self, seq_id: str, next_position: int) -> int:
        """With a sliding window: release the blocks of `seq_id` whose positions all lie before
        the window of a query at `next_position` (the first token it will compute next; no
        later query reaches further back). Returns how many were released; none without a
        window."""
        if self.sliding_window is None:
            return 0
        seq = self._seqs[seq_id]
        first_needed = next_position - self.sliding_window + 1
        outside = min(max(first_needed, 0) // self.block_size, len(seq.table))
        for block_id in seq.table[seq.released:outside]:
            self._release(block_id)
        released = max(outside - seq.released, 0)
        seq.released += released
        return released

    def reset_prefix_cache(self) -> bool:
        """Drop every hash from the index (e.g. after new weights). As in vLLM, only when no
        block is in use: a running sequence's blocks would otherwise stay indexed. Returns
        whether it was done; nothing changes when it was not."""
        if self.num_used_blocks:
            return False
        for block_id in self._cached_free:
            self._blocks[block_id].hash = None
            self._uncached_free.append(block_id)
        self._cached_free.clear()
        self._index.clear()
        return True

    # -- internals ----------------------------------------------------------------------

    def _release(self, block_id: int) -> None:
        """One holder fewer; at none the block is free (still indexed, if it was)."""
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count:
            return
        if block.hash is None:
            self._uncached_free.append(block_id)
        else:
            self._cached_free[block_id] = None

    def _take(self, block_id: int) -> None:
        """Another holder for an indexed block (a prefix hit); a free one leaves the LRU list."""
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._cached_free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        """A free block with ref count 1 and no hash: a never-cached one if any, else the least
        recently freed cached one, whose hash leaves the index."""
        if self._uncached_free:
            block_id = self._uncached_free.pop()
        else:
            block_id, _ = self._cached_free.popitem(last=False)
            block = self._blocks[block_id]
            del self._index[block.hash]
            block.hash = None
        self._blocks[block_id].ref_count = 1
        return block_id

    def check_invariants(self) -> None:  # pragma: no mutate block
        """Assert the pool's invariants (O(pool); for tests), naming the one that breaks. The
        tests' oracle, so `make mutation` leaves it alone (the pragma)."""
        holders = Counter(b for seq in self._seqs.values() for b in seq.held)
        for block_id, block in enumerate(self._blocks):
            assert block.ref_count == holders[block_id], (
                f"ref count: block {block_id} has {block.ref_count}, "
                f"{holders[block_id]} tables hold it")
        free_ids = [*self._uncached_free, *self._cached_free]
        assert len(free_ids) == len(set(free_ids)), "free lists: a block is listed twice"
        assert set(free_ids) == {b for b, blk in enumerate(self._blocks) if blk.ref_count == 0}, \
            "free lists: they must hold exactly the blocks with ref count 0"
        assert self.num_free_blocks + self.num_used_blocks == self.num_blocks, \
            "free + used == total"
        assert all(self._blocks[b].hash is None for b in self._uncached_free), \
            "free lists: an uncached free block carries a hash"
        assert all(self._blocks[b].hash is not None for b in self._cached_free), \
            "free lists: a cached free block has no hash"
        for block_hash, block_id in self._index.items():
            assert self._blocks[block_id].hash == block_hash, \
                f"index: {block_hash.hex()[:12]} -> block {block_id}, which has another hash"
        assert sum(blk.hash is not None for blk in self._blocks) == len(self._index), \
            "index: a block carries a hash the index does not map to it"
        assert self.enable_prefix_caching or not self._index, "index: caching is off"
        for seq_id, seq in self._seqs.items():
            assert len(seq.hashes) <= len(seq.table), f"{seq_id}: more hashes than blocks"
            assert seq.released <= len(seq.table), f"{seq_id}: released more than its table"
            for block_id, block_hash in list(zip(seq.table, seq.hashes,
                                                 strict=False))[seq.released:]:
                own = self._blocks[block_id].hash
                assert own in (None, block_hash), \
                    f"{seq_id}: block {block_id} is indexed under another chain hash"

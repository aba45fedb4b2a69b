"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block lists, prefix caching.

A full block of prompt tokens is named by a hash chain (hash of the previous block's hash and
its own tokens), so equal prefixes map to the same block. Blocks are ref-counted; a freed block
that still holds a named prefix stays reusable until it is evicted, least recently used first.
Block 0 is reserved as a scratch target for padded (dummy) tokens and is never handed out.
"""
from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np

NULL_BLOCK = 0


def block_hash(prev: int, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"KV cache too small: {num_blocks} blocks")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = np.zeros(num_blocks, dtype=np.int32)
        self.ref[NULL_BLOCK] = 1 << 30
        self.hash_of: dict[int, int] = {}  # block -> hash of the prefix it holds
        self.tokens_of: dict[int, tuple[int, ...]] = {}  # block -> its tokens (guards against hash collisions)
        self.block_of: dict[int, int] = {}  # hash -> block
        self.free_plain: deque[int] = deque(range(1, num_blocks))  # hold nothing reusable
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # hold a named prefix, LRU order
        self.hit_tokens = 0  # prompt tokens served from the cache (counted by the scheduler on admission)

    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def _take(self) -> int:
        if self.free_plain:
            b = self.free_plain.popleft()
        else:  # evict the least recently used cached prefix block
            b, _ = self.free_cached.popitem(last=False)
            self._forget(b)
        self.ref[b] = 1
        return b

    def _forget(self, b: int) -> None:
        h = self.hash_of.pop(b, None)
        self.tokens_of.pop(b, None)
        if h is not None and self.block_of.get(h) == b:
            del self.block_of[h]

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError("out of KV blocks")  # callers check num_free first
        return [self._take() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero become free (cached ones stay reusable)."""
        for b in reversed(blocks):  # tail blocks first: they are the least likely to be shared again
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.free_cached[b] = None
                else:
                    self.free_plain.append(b)

    def match_prefix(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], int]:
        """Longest run of cached full blocks covering token_ids[:max_tokens]. Takes a reference to each.
        Returns (blocks, hash of the last matched block or 0)."""
        if not self.prefix_caching:
            return [], 0
        bs, blocks, h = self.block_size, [], 0
        for i in range(max_tokens // bs):
            toks = tuple(token_ids[i * bs:(i + 1) * bs])
            nh = block_hash(h, toks)
            b = self.block_of.get(nh)
            if b is None or self.tokens_of.get(b) != toks:
                break
            if self.ref[b] == 0:
                del self.free_cached[b]
            self.ref[b] += 1
            blocks.append(b)
            h = nh
        return blocks, h

    def register(self, block: int, prev_hash: int, tokens: tuple[int, ...]) -> int:
        """Name a block that now holds a full block of known tokens; returns its hash."""
        h = block_hash(prev_hash, tokens)
        if self.prefix_caching and block not in self.hash_of:
            self.hash_of[block] = h
            self.tokens_of[block] = tokens
            self.block_of.setdefault(h, block)
        return h

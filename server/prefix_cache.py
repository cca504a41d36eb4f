"""Automatic prefix caching for the native engine: K/V of token blocks kept after their
requests finish, reused by later requests whose prompts start with the same tokens.

Chat applications resend the whole conversation every turn, A/B comparisons and GRPO groups
sample one prompt in several requests, system prompts are shared: a prompt whose first
blocks were seen before is prefilled from the end of its cached prefix only.

- A block is `block_size` tokens. Its key is the hash of (the previous block's key, its
  tokens), so a key stands for the whole prefix up to the block's end (vLLM's scheme); the
  tokens and the parent are kept too and compared on lookup, so a hash collision is a miss,
  never a wrong hit.
- Blocks live in one preallocated pool per layer ([max_blocks, kv_heads, block_size,
  head_dim], made at the first insert), as vLLM's block pool: an insert copies into free
  slots with one copy per layer and allocates nothing. (Allocating each block afresh cost a
  burst of 64 finished rows ~400 ms of page faults and 12,288 small copies in one step.)
  What a running request does to its own slot row (or a cancel) cannot change a block.
- The cache is filled from a prompt right after its prefill, and from a sequence's whole
  row (prompt and reply) when it finishes, so a conversation's next turn reuses its history
  as far as its tokens match.
- At most `max_tokens` (a multiple of the block size) are kept; the least recently used
  block goes first. A lookup or insert touches its chain from the last block back to the
  first, so a chain's first blocks are the most recent and leaves are evicted before the
  prefixes other chains share.
- A hit covers whole blocks and leaves at least one prompt token to prefill (the next
  token's logits come from it).

Only the engine thread uses it (no lock).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(eq=False)
class Block:
    key: int
    parent: int | None
    tokens: tuple[int, ...]
    slot: int  # its row in the pool


class PrefixCache:
    def __init__(self, max_tokens: int, block_size: int = 16):
        if block_size < 1 or max_tokens < block_size:
            raise ValueError(f"prefix cache: max_tokens ({max_tokens}) must be at least one block ({block_size})")
        self.block_size = block_size
        self.max_blocks = max_tokens // block_size
        self.blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first
        self.k: list[torch.Tensor] = []  # per layer [max_blocks, kv_heads, block_size, head_dim]
        self.v: list[torch.Tensor] = []
        self.free = list(range(self.max_blocks - 1, -1, -1))  # popped from the end: slots 0, 1, 2, ...

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    def _chain(self, ids: list[int], n_blocks: int):
        """(key, parent key, tokens) of the first n_blocks blocks of ids."""
        parent = None
        for i in range(n_blocks):
            tokens = tuple(ids[i * self.block_size:(i + 1) * self.block_size])
            key = hash((parent, tokens))
            yield key, parent, tokens
            parent = key

    def lookup(self, prompt_ids: list[int]) -> list[Block]:
        """The cached blocks that start this prompt (whole blocks, at least one token left).
        Read them (stacked) before the next insert, which may reuse their slots."""
        found = []
        for key, parent, tokens in self._chain(prompt_ids, (len(prompt_ids) - 1) // self.block_size):
            block = self.blocks.get(key)
            if block is None or block.parent != parent or block.tokens != tokens:
                break
            found.append(block)
        self._touch(found)
        return found

    def insert(self, ids: list[int], n_cached: int, num_layers: int,
               kv: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]):
        """Cache the whole blocks of ids[:n_cached] (at most max_blocks of them), whose K/V
        kv(layer, start, end) gives ([kv_heads, end - start, head_dim] each); blocks already
        cached are only touched."""
        chain = []
        for key, parent, tokens in self._chain(ids, min(n_cached // self.block_size, self.max_blocks)):
            block = self.blocks.get(key)
            if block is not None and (block.parent != parent or block.tokens != tokens):
                break  # a hash collision: keep the cached block, cache nothing past it
            chain.append((key, parent, tokens, block))
        self._touch([block for *_, block in chain if block is not None])
        new = [i for i, (*_, block) in enumerate(chain) if block is None]
        if new:
            B = self.block_size
            first = new[0]
            slots = []
            for i in new:
                if not self.free:  # the least recently used block; never this chain's (touched above)
                    self.free.append(self.blocks.popitem(last=False)[1].slot)
                key, parent, tokens, _ = chain[i]
                block = Block(key, parent, tokens, self.free.pop())
                self.blocks[key] = block
                chain[i] = (key, parent, tokens, block)
                slots.append(block.slot)
            rel = torch.tensor([i - first for i in new])
            contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
            for layer in range(num_layers):
                k, v = kv(layer, first * B, (new[-1] + 1) * B)
                if not self.k or len(self.k) <= layer:
                    self.k.append(k.new_empty((self.max_blocks, k.shape[0], B, k.shape[2])))
                    self.v.append(v.new_empty((self.max_blocks, v.shape[0], B, v.shape[2])))
                for pool, src in ((self.k[layer], k), (self.v[layer], v)):
                    src = src.unflatten(1, (-1, B))[:, rel.to(src.device)].transpose(0, 1)
                    if contiguous:  # consecutive free slots (the usual case): a plain copy, no scatter
                        pool[slots[0]:slots[0] + len(slots)].copy_(src)
                    else:
                        pool[torch.tensor(slots, device=src.device)] = src
        self._touch([block for *_, block in chain])

    def _touch(self, chain: list[Block]):
        for block in reversed(chain):
            if block.key in self.blocks:
                self.blocks.move_to_end(block.key)

    def stacked(self, blocks: list[Block], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of consecutive blocks for one layer, [1, kv_heads, tokens, head_dim] (copies)."""
        index = torch.tensor([b.slot for b in blocks], device=self.k[layer].device)
        return tuple(pool[layer][index].transpose(0, 1).flatten(1, 2).unsqueeze(0) for pool in (self.k, self.v))

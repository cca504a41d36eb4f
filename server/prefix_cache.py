"""Automatic prefix caching for the native engine: K/V of token blocks kept after their
requests finish, reused by later requests whose prompts start with the same tokens.

Chat applications resend the whole conversation every turn, A/B comparisons and GRPO groups
sample one prompt in several requests, system prompts are shared: a prompt whose first
blocks were seen before is prefilled from the end of its cached prefix only.

- A block is `block_size` tokens. Its key is the hash of (the previous block's key, its
  tokens), so a key stands for the whole prefix up to the block's end (vLLM's scheme); the
  tokens and the parent are kept too and compared on lookup, so a hash collision is a miss,
  never a wrong hit.
- Blocks hold copies ([layers] of K and V, each [kv_heads, block_size, head_dim]): what a
  running request does to its own slot row (or a cancel) cannot change a cached block.
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
    k: list[torch.Tensor]  # per layer [kv_heads, block_size, head_dim]
    v: list[torch.Tensor]


class PrefixCache:
    def __init__(self, max_tokens: int, block_size: int = 16):
        if block_size < 1 or max_tokens < block_size:
            raise ValueError(f"prefix cache: max_tokens ({max_tokens}) must be at least one block ({block_size})")
        self.block_size = block_size
        self.max_blocks = max_tokens // block_size
        self.blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first

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
        """The cached blocks that start this prompt (whole blocks, at least one token left)."""
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
        """Cache the whole blocks of ids[:n_cached], whose K/V kv(layer, start, end) gives
        ([kv_heads, end - start, head_dim] each); blocks already cached are only touched."""
        chain = []
        for key, parent, tokens in self._chain(ids, n_cached // self.block_size):
            block = self.blocks.get(key)
            if block is not None and (block.parent != parent or block.tokens != tokens):
                break  # a hash collision: keep the cached block, cache nothing past it
            if block is None:
                start = len(chain) * self.block_size
                pairs = [kv(layer, start, start + self.block_size) for layer in range(num_layers)]
                block = Block(key, parent, tokens, [k.clone() for k, _ in pairs], [v.clone() for _, v in pairs])
                self.blocks[key] = block
            chain.append(block)
        self._touch(chain)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def _touch(self, chain: list[Block]):
        for block in reversed(chain):
            if block.key in self.blocks:
                self.blocks.move_to_end(block.key)

    @staticmethod
    def stacked(blocks: list[Block], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of consecutive blocks for one layer, [1, kv_heads, tokens, head_dim]."""
        return (torch.cat([b.k[layer] for b in blocks], dim=1).unsqueeze(0),
                torch.cat([b.v[layer] for b in blocks], dim=1).unsqueeze(0))

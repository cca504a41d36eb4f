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
  slots, one copy per run of consecutive blocks and layer, and allocates nothing.
  (Allocating each block afresh cost a burst of 64 finished rows ~400 ms of page faults and
  12,288 small copies in one step.)
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
from typing import Callable, NamedTuple

import torch


class Row(NamedTuple):
    """Tokens to cache from one row of a K/V source (see PrefixCache.insert)."""

    ids: list[int]
    n_cached: int  # K/V exists for ids[:n_cached]
    row: int = 0  # its row in the source tensors
    offset: int = 0  # where its token 0 sits there (left padding)


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

    def insert(self, rows: list[Row], num_layers: int, source: Callable[[int], tuple[torch.Tensor, torch.Tensor]]):
        """Cache the whole blocks of each row's ids[:n_cached] (at most max_blocks of them);
        source(layer) gives that layer's (K, V), each [rows, kv_heads, positions, head_dim], in
        which token t of a row sits at [row.row, :, row.offset + t]. Blocks already cached are
        only touched."""
        # slot -> (source row, first position) of each block to copy; keyed by slot, so a slot
        # evicted and reused within this insert is copied once, for its last block.
        pending: dict[int, tuple[int, int]] = {}
        for r in rows:
            chain = []
            for key, parent, tokens in self._chain(r.ids, min(r.n_cached // self.block_size, self.max_blocks)):
                block = self.blocks.get(key)
                if block is not None and (block.parent != parent or block.tokens != tokens):
                    break  # a hash collision: keep the cached block, cache nothing past it
                chain.append((key, parent, tokens, block))
            self._touch([block for *_, block in chain if block is not None])
            for i, (key, parent, tokens, block) in enumerate(chain):
                if block is None:
                    if not self.free:  # the least recently used block; never this chain's (touched above)
                        self.free.append(self.blocks.popitem(last=False)[1].slot)
                    block = Block(key, parent, tokens, self.free.pop())
                    self.blocks[key] = block
                    pending[block.slot] = (r.row, r.offset + i * self.block_size)
                    chain[i] = (key, parent, tokens, block)
            self._touch([block for *_, block in chain])
        if not pending:
            return
        # Runs of blocks consecutive in both their source row and the pool (the usual case:
        # a row's new blocks get consecutive free slots) are copied with one copy_ each, from a
        # view, so no temporary is made (each fresh temporary page-faulted on this CPU: an
        # advanced-index gather of 64 finished rows cost ~70,000 faults and ~170 ms).
        runs: list[list[int]] = []  # [first slot, source row, first position, blocks]
        for slot, (row, start) in pending.items():
            last = runs[-1] if runs else None
            if last and slot == last[0] + last[3] and row == last[1] and start == last[2] + last[3] * self.block_size:
                last[3] += 1
            else:
                runs.append([slot, row, start, 1])
        for layer in range(num_layers):
            for pools, src in zip((self.k, self.v), source(layer)):
                if len(pools) <= layer:
                    pools.append(src.new_empty((self.max_blocks, src.shape[1], self.block_size, src.shape[3])))
                for slot, row, start, n in runs:
                    view = src[row, :, start:start + n * self.block_size].unflatten(1, (n, self.block_size))
                    pools[layer][slot:slot + n].copy_(view.transpose(0, 1))

    def _touch(self, chain: list[Block]):
        for block in reversed(chain):
            if block.key in self.blocks:
                self.blocks.move_to_end(block.key)

    def stacked(self, blocks: list[Block], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of consecutive blocks for one layer, [1, kv_heads, tokens, head_dim] (copies)."""
        index = torch.tensor([b.slot for b in blocks], device=self.k[layer].device)
        return tuple(pool[layer][index].transpose(0, 1).flatten(1, 2).unsqueeze(0) for pool in (self.k, self.v))

"""A slot KV cache for continuous batching with Hugging Face models.

Each layer keeps K and V in one buffer [rows, kv_heads, capacity, head_dim]. Running
sequence b owns row b and its positions 0..lens[b]-1 (no left padding), so:

- a decode step writes one K/V column per row in place (no torch.cat of the whole cache,
  which is what DynamicCache does every step);
- attention reads buf[:B], a prefix of the outermost dimension, hence contiguous: no
  gather copy; positions past a row's length are masked out;
- a sequence that joins has its prefilled K/V copied into a free row; one that leaves is
  replaced by the last row (one row copied, never the whole batch);
- capacity grows in chunks of `chunk` positions, so attention reads at most chunk - 1
  masked columns, and the whole cache is copied only once per `chunk` decode steps.

The engine drives it: `add_rows` after a prefill, `begin_decode` before each decode
forward (it returns the attention mask and position ids), `end_decode` after it, and
`remove_rows` when sequences finish. Models with sliding-window layers are not supported
(their masks need each row's true query position).
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, owner: "SlotKVCache", index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # buffers are made by SlotKVCache
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        B = key_states.shape[0]
        k, v = o.k[self.index], o.v[self.index]
        rows = o.row_index[:B]
        # One new position per row, each at that row's own length.
        k[rows, :, o.write_pos] = key_states[:, :, 0]
        v[rows, :, o.write_pos] = value_states[:, :, 0]
        return k[:B], v[:B]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.capacity, 0

    def get_seq_length(self) -> int:
        return self.owner.capacity - 1

    def get_max_length(self) -> int:
        return -1


class SlotKVCache(Cache):
    def __init__(self, num_layers: int, chunk: int = 32):
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])
        self.chunk = chunk
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lens: list[int] = []  # tokens cached per running row
        self.capacity = 0
        self.row_index = torch.arange(0)
        self.write_pos = torch.zeros(0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return len(self.lens)

    def _reserve(self, rows: int, length: int, like: torch.Tensor):
        """Make room for `rows` rows of `length` positions (copying only when growing)."""
        have_rows = self.k[0].shape[0] if self.k else 0
        need_cap = -(-length // self.chunk) * self.chunk
        if self.k and rows <= have_rows and need_cap <= self.capacity:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        new_cap = max(need_cap, self.capacity)
        _, heads, _, dim = like.shape
        for store in (self.k, self.v):
            for i in range(len(self.layers)):
                buf = like.new_zeros((new_rows, heads, new_cap, dim))
                if i < len(store):
                    old = store[i]
                    buf[:old.shape[0], :, :old.shape[2]] = old
                    store[i] = buf
                else:
                    store.append(buf)
        self.capacity = new_cap
        self.row_index = torch.arange(new_rows, device=like.device)

    def add_rows(self, prefill: DynamicCache, prompt_lens: list[int]):
        """Append the sequences of a left-padded prefill batch as new rows."""
        first = prefill.layers[0].keys
        start = self.rows
        self._reserve(start + len(prompt_lens), max(self.lens + prompt_lens) + 1, first)
        width = first.shape[2]
        for li, layer in enumerate(prefill.layers):
            for j, n in enumerate(prompt_lens):
                self.k[li][start + j, :, :n] = layer.keys[j, :, width - n:]
                self.v[li][start + j, :, :n] = layer.values[j, :, width - n:]
        self.lens += prompt_lens

    def begin_decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Room for one more token per row; returns (attention_mask [B, capacity],
        position_ids [B, 1], cache_position [1]) for the decode forward."""
        B = self.rows
        self._reserve(B, max(self.lens) + 1, self.k[0])
        device = self.k[0].device
        lens = torch.tensor(self.lens, device=device)
        self.write_pos = lens
        mask = (torch.arange(self.capacity, device=device).unsqueeze(0) <= lens.unsqueeze(1)).long()
        # The query sits after every cached column as far as the causal mask is concerned;
        # the padding mask above is what limits each row to its own positions.
        return mask, lens.unsqueeze(1), torch.tensor([self.capacity - 1], device=device)

    def end_decode(self):
        self.lens = [n + 1 for n in self.lens]

    def remove_rows(self, rows: list[int]):
        """Drop these rows: the last row moves into each hole (swap_remove order)."""
        for r in sorted(rows, reverse=True):
            last = self.rows - 1
            if r != last:
                n = self.lens[last]
                for store in (self.k, self.v):
                    for buf in store:
                        buf[r, :, :n] = buf[last, :, :n]
            swap_remove(self.lens, [r])


def swap_remove(items: list, rows: list[int]):
    """Remove `rows` from `items` by moving the last item into each hole, highest row first
    (the order SlotKVCache.remove_rows moves cache rows in)."""
    for r in sorted(rows, reverse=True):
        last = items.pop()
        if r < len(items):
            items[r] = last

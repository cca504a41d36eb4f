"""A slot KV cache for continuous batching with Hugging Face models.

Each layer keeps K and V in one buffer [rows, kv_heads, capacity, head_dim]. Running
sequence b owns row b and its positions 0..lens[b]-1 (no left padding), so:

- a decode step writes one K/V column per row in place (no torch.cat of the whole cache,
  which is what DynamicCache does every step);
- attention reads buf[:B, :, :width], width = the longest row + 1: a strided view, no
  gather copy; positions past a row's own length are masked out. Decode attention is
  bound by memory bandwidth on CPU, so columns past the longest row are never read;
- a sequence that joins has its prefilled K/V copied into a free row; one that leaves is
  replaced by the last row (one row copied, never the whole batch);
- capacity at least doubles when it grows (up to `max_length`, the model's context), so
  the whole cache is copied O(log length) times, not every few steps.

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
        return k[:B, :, :o.width], v[:B, :, :o.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0

    def get_seq_length(self) -> int:
        return self.owner.width - 1

    def get_max_length(self) -> int:
        return -1


class SlotKVCache(Cache):
    def __init__(self, num_layers: int, max_length: int, chunk: int = 32):
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])
        self.max_length, self.chunk = max_length, chunk
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lens: list[int] = []  # tokens cached per running row
        self.capacity = 0
        self.width = 0  # columns attention reads this decode step: the longest row + 1
        self.row_index = torch.arange(0)
        self.write_pos = torch.zeros(0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return len(self.lens)

    def _reserve(self, rows: int, length: int, like: torch.Tensor):
        """Make room for `rows` rows of `length` positions (copying only when growing)."""
        have_rows = self.k[0].shape[0] if self.k else 0
        if self.k and rows <= have_rows and length <= self.capacity:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        new_cap = self.capacity
        if length > self.capacity:
            new_cap = min(max(-(-length // self.chunk) * self.chunk, 2 * self.capacity), max(self.max_length, length))
        _, heads, _, dim = like.shape
        for store in (self.k, self.v):
            for i in range(len(self.layers)):
                # Never-written columns must be finite (a masked score is -inf, its weight
                # 0, and 0 * NaN would be NaN): zero what the old buffer does not cover.
                buf = like.new_empty((new_rows, heads, new_cap, dim))
                old = store[i] if i < len(store) else buf[:0, :, :0]
                r, c = old.shape[0], old.shape[2]
                buf[:r, :, :c] = old
                buf[:r, :, c:] = 0
                buf[r:] = 0
                if i < len(store):
                    store[i] = buf
                else:
                    store.append(buf)
        self.capacity = new_cap
        self.row_index = torch.arange(new_rows, device=like.device)

    def add_rows(self, prefill: DynamicCache, prompt_lens: list[int], source: list[int]):
        """Append sequences from a left-padded prefill batch as new rows: new row j copies
        prefill row source[j] (several rows may share one prefilled prompt)."""
        first = prefill.layers[0].keys
        start = self.rows
        self._reserve(start + len(prompt_lens), max(self.lens + prompt_lens) + 1, first)
        width = first.shape[2]
        for li, layer in enumerate(prefill.layers):
            for j, (src, n) in enumerate(zip(source, prompt_lens)):
                self.k[li][start + j, :, :n] = layer.keys[src, :, width - n:]
                self.v[li][start + j, :, :n] = layer.values[src, :, width - n:]
        self.lens += prompt_lens

    def begin_decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Room for one more token per row; returns (attention_mask [B, width],
        position_ids [B, 1], cache_position [1]) for the decode forward."""
        B = self.rows
        self.width = max(self.lens) + 1
        self._reserve(B, self.width, self.k[0])
        device = self.k[0].device
        lens = torch.tensor(self.lens, device=device)
        self.write_pos = lens
        mask = (torch.arange(self.width, device=device).unsqueeze(0) <= lens.unsqueeze(1)).long()
        # The query sits after every cached column as far as the causal mask is concerned;
        # the padding mask above is what limits each row to its own positions.
        return mask, lens.unsqueeze(1), torch.tensor([self.width - 1], device=device)

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

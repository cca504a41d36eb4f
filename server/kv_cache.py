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
`remove_rows` when sequences finish.

Sliding-window layers (Mistral, Phi-3, Qwen2 with use_sliding_window, Gemma 2/3) need each
row's own query position: row b's new token sits at position lens[b] and sees the columns
j with lens[b] - window < j <= lens[b]. transformers builds a sliding mask from one query
offset for the whole batch (the cache length, here the longest row), which would hide
recent tokens of every shorter row. So for a model whose window is shorter than its
context, `begin_decode` builds the 4-D masks itself (one per layer type) and the model uses
them as given; `AttentionLayout.of` says which layers slide, and `unsupported_reason` names
what this cache cannot serve (load_checkpoint refuses such a model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin


FULL, SLIDING = "full_attention", "sliding_attention"
# Families whose sliding-window layers are tested against transformers.generate with a window
# shorter than prompt + generation (tests/test_architectures.py). Another family's window
# might be applied differently by its modeling code, so such a model is refused, not guessed.
SLIDING_VERIFIED = frozenset({"mistral", "qwen2", "phi3", "gemma2", "gemma3_text"})
# Attention implementations that take a 4-D mask as given: a boolean one (sdpa) or an
# additive float one (eager).
MASK_4D_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class AttentionLayout:
    """Which layers of a model slide, as far as the slot cache must know."""

    layer_types: tuple[str, ...]  # per layer: FULL or SLIDING
    window: int | None = None  # the sliding window; None when no layer's window is shorter than the context
    model_type: str = ""
    attn_implementation: str = "sdpa"
    bidirectional: bool = False

    @classmethod
    def of(cls, config, context_length: int | None = None) -> "AttentionLayout":
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types is None:  # Mistral, Phi-3: every layer slides when a window is set
            types = [SLIDING if window else FULL] * n
        if not isinstance(window, int) or window <= 0 or not any(t == SLIDING for t in types) \
                or (context_length is not None and window >= context_length):
            window = None  # a window as long as the context hides nothing: full attention
        return cls(tuple(types), window, getattr(config, "model_type", ""),
                   getattr(config, "_attn_implementation", None) or "sdpa",
                   bool(getattr(config, "use_bidirectional_attention", False)) or not getattr(config, "is_causal", True))

    @property
    def sliding(self) -> bool:
        return self.window is not None

    def unsupported_reason(self) -> str | None:
        """Why the engine cannot serve this model token-for-token like transformers, or None."""
        if self.bidirectional:
            return "its attention is bidirectional (use_bidirectional_attention / is_causal=False): not a causal LM"
        other = sorted(set(self.layer_types) - {FULL, SLIDING})
        if other:
            return (f"it has {', '.join(other)} layers; the native engine's KV cache serves full and "
                    "sliding-window attention layers only")
        if not self.sliding:
            return None
        if self.model_type not in SLIDING_VERIFIED:
            return (f"its sliding-window attention (window {self.window}, shorter than the context) is served "
                    f"only for the verified families {sorted(SLIDING_VERIFIED)}, not {self.model_type!r}; "
                    "set sliding_window to null (or at least the context length) in config.json if the model "
                    "was trained with full attention")
        if self.attn_implementation not in MASK_4D_IMPLEMENTATIONS:
            return (f"its sliding-window layers need per-row 4-D masks, which attn_implementation="
                    f"{self.attn_implementation!r} does not take; use sdpa or eager")
        return None


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
    def __init__(self, num_layers: int, max_length: int, chunk: int = 32, layout: AttentionLayout | None = None):
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])
        self.max_length, self.chunk = max_length, chunk
        self.layout = layout if layout is not None and layout.sliding else None
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

    def begin_decode(self) -> tuple[torch.Tensor | dict, torch.Tensor, torch.Tensor]:
        """Room for one more token per row; returns (attention_mask [B, width],
        position_ids [B, 1], cache_position [1]) for the decode forward. With sliding-window
        layers the mask is 4-D per row instead (see `_sliding_masks`)."""
        B = self.rows
        self.width = max(self.lens) + 1
        self._reserve(B, self.width, self.k[0])
        device = self.k[0].device
        lens = torch.tensor(self.lens, device=device)
        self.write_pos = lens
        cols = torch.arange(self.width, device=device).unsqueeze(0)
        mask = cols <= lens.unsqueeze(1)
        positions, cache_position = lens.unsqueeze(1), torch.tensor([self.width - 1], device=device)
        if self.layout is not None:
            return self._sliding_masks(mask, cols > (lens - self.layout.window).unsqueeze(1)), positions, cache_position
        # The query sits after every cached column as far as the causal mask is concerned;
        # the padding mask above is what limits each row to its own positions.
        return mask.long(), positions, cache_position

    def _sliding_masks(self, full: torch.Tensor, in_window: torch.Tensor):
        """4-D decode masks [B, 1, 1, width], which the model uses as given: row b attends to
        its own columns (full layers) and only the last `window` of them (sliding layers),
        counted from its own position. A dict by layer type when the model mixes both (the
        form Qwen2 / Gemma 2 / Gemma 3 take), one tensor when every layer slides (Mistral, Phi-3)."""
        masks = {FULL: full, SLIDING: full & in_window}
        if self.layout.attn_implementation == "eager":  # eager adds the mask to the scores
            dtype = self.k[0].dtype
            masks = {t: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)
                     for t, m in masks.items()}
        masks = {t: m[:, None, None, :] for t, m in masks.items()}
        if set(self.layout.layer_types) == {SLIDING}:
            return masks[SLIDING]
        return masks

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

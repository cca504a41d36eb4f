"""Incremental detokenization: the text of a growing token list at constant work per token.

Decoding a sequence's whole token list again at every step is quadratic in the reply's
length (a 1024-token reply decodes ~half a million tokens). vLLM's IncrementalDetokenizer
instead decodes a short window: `prefix_offset..read_offset` is text already emitted, and
`read_offset..` the tokens since. The new text is decode(window) minus decode(prefix part),
both starting at the same token, so a tokenizer that drops a leading space at the start of
a decode (SentencePiece's "▁") drops it from both. A window whose text ends in U+FFFD is an
incomplete multi-byte character: nothing is emitted until a later token completes it, or
until the sequence ends (then the rest is emitted as decode gives it).

The text it accumulates equals tokenizer.decode(token_ids, skip_special_tokens=True)
(tests/test_detokenizer.py checks it on random token streams of byte-level and SentencePiece
tokenizers).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int | None, final: bool = False) -> str:
        """Append a token (None: none, only flush) and return the text it completes; with
        final=True everything still held back is returned too."""
        if token_id is not None:
            self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.token_ids[self.prefix_offset:])
        if len(window) <= len(prefix) and not final:
            return ""  # e.g. a special token, or bytes that decode to nothing yet
        if window.endswith("\ufffd") and not final:
            return ""  # a multi-byte character still being assembled
        if not window.startswith(prefix):
            # The window's text changed what it already said (a tokenizer that merges text
            # across token boundaries when decoding): fall back to a full decode for this step.
            full = self._decode(self.token_ids)
            new = full[len(self.text):] if full.startswith(self.text) else ""
        else:
            new = window[len(prefix):]
        self.text += new
        # Keep the window short: the next one starts at the tokens just read.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new

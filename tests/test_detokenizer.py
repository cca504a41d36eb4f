"""Incremental detokenization (issue #16): the text accumulated a token at a time equals a
full decode of the token list, for random token streams (which split multi-byte characters
and mix in special tokens) and real text, on a byte-level BPE and a SentencePiece-style
(Metaspace) tokenizer; text is never emitted and then taken back; a step decodes a short
window, not the whole list."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhfkit.server.detokenizer import IncrementalDetokenizer
from rlhfkit.training.tiny import add_chat_template, sample_corpus, train_tokenizer

TEXTS = sample_corpus() + ["héllo wörld ñandú 日本語のテキスト 🙂🚀 ünïcödé", "naïve café — “quotes” ½ ∑ 𝔘𝔫𝔦"] * 20


def byte_level():
    return add_chat_template(train_tokenizer(TEXTS))  # with <|im_start|>/<|im_end|> special tokens


def sentencepiece_like():
    sp = Tokenizer(models.Unigram())
    sp.normalizer = normalizers.Replace(" ", "▁")
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()  # drops the leading space of a decode: the window must not
    sp.train_from_iterator(TEXTS, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                          unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece_like"])
def tokenizer(request):
    return globals()[request.param]()


def streams(tokenizer, count, seed=0):
    rng = random.Random(seed)
    for trial in range(count):
        n = rng.randint(1, 80)
        if trial % 2:  # real text, cut anywhere
            yield tokenizer.encode(rng.choice(TEXTS)[:300], add_special_tokens=False)[:n]
        else:  # any ids: split UTF-8 sequences, special tokens, nonsense
            yield [rng.randrange(len(tokenizer)) for _ in range(n)]


def test_accumulated_text_equals_a_full_decode(tokenizer):
    checked = 0
    for ids in streams(tokenizer, 400):
        d = IncrementalDetokenizer(tokenizer)
        pieces = [d.add(t, final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
        assert "".join(pieces) == d.text == tokenizer.decode(ids, skip_special_tokens=True), ids
        checked += 1
    assert checked == 400


def test_emitted_text_is_a_prefix_of_the_decode_at_every_step(tokenizer):
    for ids in streams(tokenizer, 100, seed=1):
        d = IncrementalDetokenizer(tokenizer)
        for i, t in enumerate(ids):
            d.add(t)
            full = tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
            assert full.startswith(d.text)
            if not full.endswith("\ufffd"):  # held back only while a character is incomplete
                assert d.text == full


def test_multi_byte_characters_come_out_whole():
    tok = train_tokenizer(["ab"] * 10, vocab_size=300)  # too small to merge: every UTF-8 byte is a token
    ids = tok.encode("a🙂b", add_special_tokens=False)
    assert len(ids) == 6  # a, 4 bytes of the emoji, b
    d = IncrementalDetokenizer(tok)
    assert [d.add(t) for t in ids] == ["a", "", "", "", "🙂", "b"]


def test_a_step_decodes_a_short_window():
    """Constant work per token: after 2,000 tokens the decode window is a few tokens long."""
    tok = byte_level()
    ids = tok.encode(" ".join(TEXTS) * 3, add_special_tokens=False)[:2000]
    d = IncrementalDetokenizer(tok)
    widths = []
    for t in ids:
        d.add(t)
        widths.append(len(d.token_ids) - d.prefix_offset)
    assert max(widths[100:]) <= 8 and d.text == tok.decode(ids)

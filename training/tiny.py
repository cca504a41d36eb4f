"""Small models from scratch: a byte-level BPE tokenizer trained on the spot and a
Llama-shaped policy or reward model with random weights, saved as ordinary Hugging Face
checkpoints. Nothing is downloaded: tests, benchmarks and the demo build their models here.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# ChatML, as Qwen2 chat models write it: each turn is <|im_start|>role\ncontent<|im_end|>\n and
# <|im_end|> (a special token of its own, not EOS) ends the assistant's turn.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a one two three four five six seven eight nine ten red green blue small large "
    "quick slow cat dog bird fish tree river stone cloud answer question please write list "
    "count sort reverse repeat word words number numbers letter letters sentence short long "
    "is are was be and or not with from to of in on at by for it this that what how why"
).split()


def sample_corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic toy sentences (words, digits, punctuation) for tokenizer training."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ":", ""]))
    return lines


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes; no unknown tokens) trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=1_000_000,  # the model's config is the limit
    )


def add_chat_template(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give a tokenizer the ChatML template and its two special tokens (in place; a model
    built on it afterwards has room for them in its vocabulary)."""
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2,
                      num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                      max_position_embeddings: int = 256, **overrides) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )


def make_tiny_checkpoint(out_dir: str | Path, kind: str = "policy", tokenizer: PreTrainedTokenizerFast | None = None,
                         seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> Path:
    """Save a randomly initialised Llama policy (`kind="policy"`, AutoModelForCausalLM) or
    reward model (`kind="reward"`, AutoModelForSequenceClassification, num_labels=1)."""
    if kind not in ("policy", "reward"):
        raise ValueError(f"kind must be 'policy' or 'reward', got {kind!r}")
    out_dir = Path(out_dir)
    tokenizer = tokenizer or train_tokenizer(sample_corpus())
    config = tiny_llama_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    if kind == "policy":
        model = LlamaForCausalLM(config)
    else:
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    model.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

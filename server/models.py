"""Loading served checkpoints: any Hugging Face causal LM (the policy) or
sequence-classification model with num_labels=1 (the reward model, TRL's format), from a
local directory or the Hugging Face cache (rlhfkit.hf.resolve_model), with its tokenizer and
the optional rlhfkit.json written by rlhfkit.training."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.hf import hub_snapshot, resolve_model
from rlhfkit.server.kv_cache import AttentionLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    kind: str  # "policy" (causal LM) or "reward" (sequence classification)
    path: Path
    model: torch.nn.Module
    tokenizer: object
    context_length: int
    meta: dict = field(default_factory=dict)  # rlhfkit.json, {} for outside checkpoints
    stamp: tuple = ()  # identifies the directory's contents; a republish changes it
    engine: object = None  # the generation engine of a causal LM, set by the registry
    attention: AttentionLayout | None = None  # which layers slide (the engine's KV cache needs to know)

    @property
    def version(self) -> str:
        """The checkpoint's name, and when it was created (rlhfkit.json), so republishing a
        directory under the same name gives a new version. A model from the Hugging Face
        cache is named by its repo and commit (NAME-0123456789ab)."""
        if self.meta.get("version"):
            return str(self.meta["version"])
        snapshot = hub_snapshot(self.path)
        base = f"{snapshot[0].split('/')[-1]}-{snapshot[1][:12]}" if snapshot else self.path.name
        created = "".join(ch for ch in str(self.meta.get("created_at") or "") if ch.isdigit())[:14]
        return f"{base}-{created}" if created else base

    @property
    def model_version(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def context_length(config, tokenizer) -> int:
    """The longest sequence the model takes: its position table, else the tokenizer's limit."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            break
    else:
        n = None
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        n = min(n, tok_max) if n else tok_max
    if not n:
        raise ValueError("cannot tell the model's context length: set max_position_embeddings in config.json")
    return n


def _check_servable(path: Path, attention: AttentionLayout, what: str):
    reason = attention.unsupported_reason()
    if reason:
        raise ValueError(f"{path}: cannot serve this {what} for generation: {reason}")


def load_checkpoint(path: str | Path, kind: str, device: str = "auto", dtype: str = "float32",
                    name: str | None = None, stamp: tuple = (), revision: str | None = None) -> LoadedModel:
    """Load a checkpoint as a `kind` of model: "policy" -> causal LM, "reward" -> sequence
    classification with one label. `path` is a directory or a Hugging Face Hub id (at
    `revision`), resolved by rlhfkit.hf.resolve_model. Errors say what is wrong with the
    directory; a checkpoint whose weights are missing or do not fit its config never loads
    (transformers would fill the gap with random weights), and a causal LM the engine cannot
    decode exactly as transformers does (AttentionLayout.unsupported_reason) is refused."""
    path = resolve_model(str(path), revision)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"{path}: no weights (*.safetensors or *.bin); is it still being written?")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; masks hide it
    if kind not in ("policy", "reward"):
        raise ValueError(f"kind must be 'policy' or 'reward', got {kind!r}")
    auto = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    if kind == "policy":  # refuse before reading the weights
        config = AutoConfig.from_pretrained(path)
        _check_servable(path, AttentionLayout.of(config, context_length(config, tokenizer)),
                        (config.architectures or [config.model_type])[0])
    model, info = auto.from_pretrained(path, dtype=DTYPES[dtype], output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        missing = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
        raise ValueError(f"{path}: weights do not match the config (missing or mismatched: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); the checkpoint is "
                         "incomplete or corrupt")
    if kind == "reward" and model.config.num_labels != 1:
        raise ValueError(f"{path}: a reward model needs num_labels=1, this one has {model.config.num_labels}")
    if model.config.pad_token_id is None:
        # AutoModelForSequenceClassification finds the last real token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    ctx = context_length(model.config, tokenizer)
    attention = AttentionLayout.of(model.config, ctx)
    if kind == "policy":
        _check_servable(path, attention, type(model).__name__)  # again: now the attention implementation is known
    model.to(dev).eval()
    meta_file = path / "rlhfkit.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return LoadedModel(name=name or kind, kind=kind, path=path, model=model, tokenizer=tokenizer,
                       context_length=ctx, meta=meta, stamp=stamp, attention=attention)

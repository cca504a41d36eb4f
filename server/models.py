"""Loading served checkpoints: any local Hugging Face causal LM (the policy) or
sequence-classification model with num_labels=1 (the reward model, TRL's format), with
its tokenizer and the optional rlhfkit.json written by rlhfkit.training."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(KeyError):
    """A request named a model the server does not serve."""

    def __str__(self):
        return self.args[0]


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

    @property
    def version(self) -> str:
        """The checkpoint's name, and when it was created (rlhfkit.json), so republishing a
        directory under the same name gives a new version."""
        if self.meta.get("version"):
            return str(self.meta["version"])
        created = "".join(ch for ch in str(self.meta.get("created_at") or "") if ch.isdigit())[:14]
        return f"{self.path.name}-{created}" if created else self.path.name

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


def load_checkpoint(path: str | Path, kind: str, device: str = "auto", dtype: str = "float32",
                    name: str | None = None, stamp: tuple = ()) -> LoadedModel:
    """Load a checkpoint directory as a `kind` of model: "policy" -> causal LM, "reward" ->
    sequence classification with one label. Errors say what is wrong with the directory;
    a checkpoint whose weights are missing or do not fit its config never loads (transformers
    would fill the gap with random weights)."""
    path = Path(path)
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
    model.to(dev).eval()
    meta_file = path / "rlhfkit.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return LoadedModel(name=name or kind, kind=kind, path=path, model=model, tokenizer=tokenizer,
                       context_length=context_length(model.config, tokenizer), meta=meta, stamp=stamp)

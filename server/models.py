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
    role: str  # policy | reference | reward
    path: Path
    model: torch.nn.Module
    tokenizer: object
    context_length: int
    meta: dict = field(default_factory=dict)  # rlhfkit.json, {} for outside checkpoints

    @property
    def version(self) -> str:
        return str(self.meta.get("version") or self.path.name)

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


def load_checkpoint(path: str | Path, role: str, device: str = "auto", dtype: str = "float32",
                    name: str | None = None) -> LoadedModel:
    """Load a checkpoint directory for `role` ("policy"/"reference" -> causal LM, "reward" ->
    sequence classification with one label). Errors say what is wrong with the directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; masks hide it
    auto = AutoModelForSequenceClassification if role == "reward" else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=DTYPES[dtype])
    if role == "reward" and model.config.num_labels != 1:
        raise ValueError(f"{path}: a reward model needs num_labels=1, this one has {model.config.num_labels}")
    if model.config.pad_token_id is None:
        # AutoModelForSequenceClassification finds the last real token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(dev).eval()
    meta_file = path / "rlhfkit.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return LoadedModel(name=name or role, role=role, path=path, model=model, tokenizer=tokenizer,
                       context_length=context_length(model.config, tokenizer), meta=meta)


class ModelRegistry:
    """The served models by name; a request's empty `model` means the role's default."""

    def __init__(self):
        self.models: dict[str, LoadedModel] = {}

    def add(self, m: LoadedModel):
        self.models[m.name] = m

    def get(self, name: str, role: str) -> LoadedModel:
        """The model named `name` (or the one serving `role` when name is empty), which must
        be able to do `role`'s job."""
        if not name:
            name = role
        m = self.models.get(name)
        if m is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"model {name!r} is not served here; served models: {known}")
        compatible = {"reward": ("reward",), "policy": ("policy", "reference"), "reference": ("policy", "reference")}
        if m.role not in compatible[role]:
            raise ModelNotFoundError(f"model {name!r} is a {m.role} model, not a {role} model")
        return m

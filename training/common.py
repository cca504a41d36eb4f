"""What every trainer shares: padding, the LR schedule, the optimizer, the metrics log
(JSONL, one line per logged step) and its plot. Rendering text and conversations to token
ids is rlhfkit.chat's, shared with the server."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed


@dataclass(kw_only=True)
class TrainConfig:
    """The options SFT, RM and DPO share (TRL's TrainingArguments, small): batching,
    optimisation, schedule, logging and run control. Each trainer's config adds its own."""

    max_length: int = field(default=256, metadata={"help": "truncate each example to this many tokens"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step (over all processes under torchrun)"})
    micro_batch_size: int = field(default=0, metadata={"help": "examples per forward/backward in each process, gradients accumulated up to --batch-size (0: all at once)"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the training file"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: num_epochs decides)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of steps of linear warmup"})
    warmup_steps: int = field(default=0, metadata={"help": "warmup steps (overrides --warmup-ratio when > 0)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to this fraction of the peak LR"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm (0: no clipping)"})
    eval_every: int = field(default=0, metadata={"help": "eval every N steps (0: only at the end)"})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N steps"})
    log_dir: str | None = field(default=None, metadata={"help": "metrics.jsonl and curves.png (default: runs/ beside the output)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})
    revision: str | None = field(default=None, metadata={"help": "branch, tag or commit of --model when it is a Hugging Face Hub id (read through the Hub cache; HF_HUB_OFFLINE=1 is honoured)"})

    def __post_init__(self):
        for name in ("max_length", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size < 0:
            raise ValueError(f"micro_batch_size must be >= 0 (0: the whole batch), got {self.micro_batch_size}")
        if self.num_epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set num_epochs > 0 or max_steps > 0")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps for a training set of n_examples: max_steps, else num_epochs passes."""
        return self.max_steps or max(1, math.ceil(self.num_epochs * math.ceil(n_examples / self.batch_size)))

    def optimizer(self, model: torch.nn.Module, total_steps: int):
        """AdamW and its warmup + cosine schedule, as these options set them."""
        warmup = resolve_warmup(self.warmup_steps, self.warmup_ratio, total_steps)
        return make_optimizer(model, self.learning_rate, self.weight_decay, total_steps, warmup, self.min_lr_ratio)

    def metrics_log(self) -> "MetricsLog":
        return MetricsLog(self.log_dir or default_log_dir(self.output_dir))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> random.Random:
    torch.manual_seed(seed)
    return random.Random(seed)


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def batched(items: list, batch_size: int, rng: random.Random | None = None):
    """Batches over `items`, shuffled by `rng` when given; the last one may be short."""
    order = list(range(len(items)))
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start:start + batch_size]]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int,
                   warmup_steps: int, min_lr_ratio: float):
    # No decay on biases and norm weights (1-d tensors), as in nanoGPT.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, min_lr_ratio))
    return optimizer, scheduler


def resolve_warmup(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    return warmup_steps if warmup_steps > 0 else int(round(warmup_ratio * total_steps))


def default_log_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return output_dir.parent / "runs" / f"{output_dir.name}-{stamp}"


class MetricsLog:
    """Appends one JSON object per call to log_dir/metrics.jsonl (flushed, so a crashed run
    keeps its curve) and draws log_dir/curves.png at the end. Under torchrun only rank 0
    writes; the other ranks keep their rows in memory."""

    def __init__(self, log_dir: str | Path):
        self.dir = Path(log_dir)
        self.path = self.dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self._file = None
        if distributed.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._start = time.time()

    def log(self, step: int, **metrics) -> dict:
        row = {"step": step, "time": round(time.time() - self._start, 3),
               **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in metrics.items()}}
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        return row

    def close(self) -> Path | None:
        """Close the file and draw the curves (rank 0; None on the others)."""
        if self._file is None:
            return None
        self._file.close()
        return self.plot()

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt

        keys = sorted({k for row in self.rows for k in row if k not in ("step", "time")})
        out = self.dir / "curves.png"
        fig, axes = plt.subplots(len(keys) or 1, 1, figsize=(6, 2.2 * max(1, len(keys))), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            points = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), float)]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out

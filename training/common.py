"""What every trainer's config shares, the LR schedule, the optimizer, and the metrics log
(JSONL, one line per logged step) and its plot. Rendering text and conversations to token
ids is rlhfkit.chat's, shared with the server."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import distributed


@dataclass(kw_only=True)
class TrainConfig:
    """The options every trainer shares (TRL's TrainingArguments, small): batching,
    optimisation, schedule, precision, LoRA, logging, saves and run control. Each trainer's
    config adds its own. A step is one optimizer step (PPO: one rollout-and-update iteration)."""

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
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW's epsilon"})
    dtype: Literal["float32", "bfloat16", "float64"] = field(default="float32", metadata={"help": "compute precision: bfloat16 runs the forward passes under autocast over float32 trained weights (frozen weights stored in bfloat16); float64 for numerics checks"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each block's activations in the backward pass instead of keeping them (less memory, about a third more compute)"})
    lora_r: int = field(default=0, metadata={"help": "train LoRA adapters of this rank instead of every weight (0: full fine-tuning); the published checkpoint is merged, the adapter saved beside it in adapter/"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (the update is alpha / r * B A)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    lora_target_modules: list[str] = field(default_factory=list, metadata={"help": "module names to adapt, e.g. q_proj v_proj (default: every linear layer of the transformer blocks)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun, shard parameters, gradients and optimizer state over the ranks (FSDP2, torch.distributed.fsdp.fully_shard) instead of replicating them (DDP)"})
    save_every: int = field(default=0, metadata={"help": "save the run (trained weights or adapter, optimizer, schedule, RNG states, data position) every N steps, keeping the last two (0: never)"})
    save_dir: str | None = field(default=None, metadata={"help": "where saves go (default: OUTPUT_DIR.saves beside the output)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest save in --save-dir (the run's config must be the same)"})
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
        if self.lora_r < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_r must be >= 0 (0: no LoRA), lora_alpha > 0 and lora_dropout in [0, 1); got "
                             f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}")
        if self.lora_target_modules and not self.lora_r:
            raise ValueError("lora_target_modules needs lora_r > 0")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0: never), got {self.save_every}")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps for a training set of n_examples: max_steps, else num_epochs passes."""
        return self.max_steps or max(1, math.ceil(self.num_epochs * math.ceil(n_examples / self.batch_size)))

    def optimizer(self, model: torch.nn.Module, total_steps: int):
        """AdamW and its warmup + cosine schedule, as these options set them."""
        warmup = resolve_warmup(self.warmup_steps, self.warmup_ratio, total_steps)
        return make_optimizer(model, self.learning_rate, self.weight_decay, total_steps, warmup, self.min_lr_ratio,
                              self.adam_eps)



def cpu_model() -> str:
    """The host's CPU model: reports and bench results name it, as timings differ across hosts."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> random.Random:
    torch.manual_seed(seed)
    return random.Random(seed)


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
                   warmup_steps: int, min_lr_ratio: float, eps: float = 1e-8):
    # No decay on biases and norm weights (1-d tensors), as in nanoGPT.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=eps)
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
    writes; the other ranks keep their rows in memory. A resumed run (resume_step) keeps
    the rows up to its save and drops the later ones, which it is about to log again."""

    def __init__(self, log_dir: str | Path, resume_step: int | None = None):
        self.dir = Path(log_dir)
        self.path = self.dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self._file = None
        if distributed.is_main():  # the other ranks never write nor draw: they need no old rows
            self.dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.is_file():
                self.rows = [row for row in map(json.loads, self.path.read_text().splitlines())
                             if row["step"] <= resume_step]
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
                os.replace(tmp, self.path)  # a kill here leaves the old log or the new one
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

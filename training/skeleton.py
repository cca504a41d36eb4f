"""The one training skeleton SFT, RM, DPO and PPO's update phase run on.

A trainer builds a `Run` from its config, loads its models through it (dtype, LoRA,
gradient checkpointing), puts what it trains and its loss into one `LossModule`, and then
either calls `Run.fit` (SFT, RM, DPO: batches of examples, one optimizer step each) or
drives `accumulate` / `optimizer_step` / `end_step` itself (PPO: rollouts, then minibatch
steps). The Run owns everything else: micro-batches and gradient accumulation, DDP or FSDP2
under torchrun, clipping, the warmup + cosine schedule, the metrics log, saves every N steps
and resuming from them, and publishing the checkpoint.

Why the loss lives inside a module: DDP and FSDP hook into the wrapped module's forward.
The trainers read hidden states from the transformer body and apply the LM head or score
head through the shared kernel, so the whole loss runs in LossModule.forward, where the
wrappers see every parameter it uses.

Precision (`--dtype bfloat16`): weights that are trained stay float32 and the forward
passes run under autocast in bfloat16, so the optimizer's state and its updates are float32
(an lr * update of ~1e-7 of a weight vanishes in bfloat16's 8-bit mantissa); weights that
are never updated (the reference, the reward model, LoRA's frozen base) are stored in
bfloat16. `float64` exists for numerics checks.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import _fsync_dir, _fsync_tree, publish_checkpoint
from .common import MetricsLog, TrainConfig, default_log_dir, pick_device, seed_everything
from .sequences import hf_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
STATE_FILE = "train_state.pt"


class Batches:
    """Shuffled batches over `items`, epoch after epoch (a short last batch), drawing each
    epoch's order from `rng` when the epoch starts, as `common.batched` does. Its position
    is part of a save: a resumed run continues with the same next batch."""

    def __init__(self, items: list, batch_size: int, rng: random.Random):
        self.items, self.batch_size, self.rng = items, batch_size, rng
        self.order: list[int] = []
        self.next = 0

    def __iter__(self):
        return self

    def __next__(self) -> list:
        if self.next >= len(self.order):
            self.order = list(range(len(self.items)))
            self.rng.shuffle(self.order)
            self.next = 0
        rows = self.order[self.next:self.next + self.batch_size]
        self.next += self.batch_size
        return [self.items[i] for i in rows]

    def state_dict(self) -> dict:
        return {"order": self.order, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.next = list(state["order"]), state["next"]


class LossModule(torch.nn.Module):
    """A trainer's trained models and its loss as one module: forward(micro, batch) returns
    loss_fn(micro, batch, **models): (this micro-batch's loss, already weighted as its share
    of the whole batch's, and a dict of detached statistics)."""

    def __init__(self, loss_fn, **models: torch.nn.Module):
        super().__init__()
        self.loss_fn = loss_fn
        self.models = torch.nn.ModuleDict(models)

    def forward(self, micro, batch):
        return self.loss_fn(micro, batch, **self.models)


def lora_targets(model) -> list[str]:
    """Names of the linear layers inside the transformer blocks (not the LM or score head)."""
    body = hf_model(model).base_model
    return sorted({name.rsplit(".", 1)[-1] for name, m in body.named_modules() if isinstance(m, torch.nn.Linear)})


class Run:
    """One training run: device and process group, seeds, models, optimizer, log, saves."""

    def __init__(self, config: TrainConfig, stage: str):
        self.config, self.stage = config, stage
        self.rng = seed_everything(config.seed)
        self.device = distributed.init(pick_device(config.device))
        self.dtype = DTYPES[config.dtype]
        self.step = 0
        self.metrics: dict = {}
        self.best: dict | None = None  # keep_if_best: {"objective", "step", "weights"}
        self.module = self.wrapped = self.optimizer = self.scheduler = None
        self.save_dir = Path(config.save_dir or f"{Path(config.output_dir).absolute()}.saves")
        self.resumed = self._latest_save() if config.resume else None
        if config.fsdp and not torch.distributed.is_initialized():
            raise ValueError("--fsdp shards over the processes of torchrun: run under `torchrun --nproc_per_node N`")
        if config.fsdp and config.lora_r:
            raise ValueError("--fsdp with LoRA is not supported: LoRA's trained weights are small, use data parallelism "
                             "(torchrun without --fsdp)")
        if config.resume and self.resumed is None:
            raise FileNotFoundError(f"--resume: no save under {self.save_dir}; a run saves there with --save-every N")
        # mmap: a rank reads only what it touches (under FSDP the others take rank 0's broadcast)
        state = torch.load(self.resumed / STATE_FILE, weights_only=False, mmap=True) if self.resumed else None
        if state:
            self._check_same_run(state)
        self._state = state
        # A resumed run logs where the saved one did, unless told otherwise
        self.log = MetricsLog(config.log_dir or (state["log_dir"] if state else default_log_dir(config.output_dir)),
                              resume_step=state["step"] if state else None)

    # ------------------------------------------------------------ models

    def load(self, model_cls, path, *, trainable: bool = True, **kwargs):
        """from_pretrained on this rank's device. A trained model gets the LoRA adapter
        (--lora-r) and gradient checkpointing; a frozen one is stored in the compute dtype."""
        config = self.config
        # The precision recipe: weights that train stay float32 under bfloat16 autocast.
        in_compute_dtype = not trainable or config.lora_r or self.dtype == torch.float64
        model = model_cls.from_pretrained(path, dtype=self.dtype if in_compute_dtype else torch.float32, **kwargs)
        if not trainable:
            return model.to(self.device).eval().requires_grad_(False)
        if config.gradient_checkpointing:
            # Non-reentrant: works with frozen inputs (LoRA) and under DDP/FSDP. transformers
            # 5.2x renamed gradient_checkpointing_enable (deprecated) to activation_...
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if config.lora_r:
            import peft

            seq_cls = not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None
            targets = lora_targets(model)
            # The heads are read as weights by the shared kernel (an adapter there would be skipped)
            outside = sorted(set(config.lora_target_modules) - set(targets))
            if outside:
                raise ValueError(f"lora_target_modules: {outside} are not linear layers of {path}'s transformer "
                                 f"blocks; choose from {targets}")
            lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                   target_modules=config.lora_target_modules or targets,
                                   task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM")
            with warnings.catch_warnings():
                # peft reads transformers' deprecated is_gradient_checkpointing: nothing a user can change
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                model = peft.get_peft_model(model, lora, autocast_adapter_dtype=True)
            for p in model.parameters():  # the adapters and the RM's score head (SEQ_CLS keeps it trainable)
                if p.requires_grad and p.dtype == torch.bfloat16:
                    p.data = p.data.float()
        return model.to(self.device).train()

    @contextlib.contextmanager
    def gathered(self):
        """Whole weights on every rank for what runs outside the training forward
        (evaluation, rollouts, reward bias): under FSDP2 they are gathered once and kept for
        the block (the ranks may then run different numbers of forwards); else a no-op."""
        if not self.config.fsdp or self.module is None:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        groups = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        blocks = [m for m in groups if m is not self.module]  # the root never reshards after forward
        for m in blocks:
            m.set_reshard_after_forward(False, recurse=False)
        for m in groups:
            m.unshard()
        try:
            yield
        finally:
            for m in groups:
                m.reshard()
            for m in blocks:
                m.set_reshard_after_forward(True, recurse=False)

    @contextlib.contextmanager
    def inference(self):
        """Gathered weights (FSDP) and the compute precision, for evaluation and rollouts."""
        with self.gathered(), self.autocast():
            yield

    def autocast(self):
        """The forward passes' precision: bfloat16 autocast, or the weights' own dtype."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, module: LossModule, total_steps: int) -> None:
        """Wrap `module` for data parallelism, build its optimizer and schedule, and restore
        a save when resuming."""
        self.module, self.total_steps = module, total_steps
        if self.config.fsdp:
            self.wrapped = distributed.fully_shard_module(module)
        elif distributed.world_size() > 1:
            self.wrapped = distributed.data_parallel(module, self.device)
        else:
            self.wrapped = module
        self.optimizer, self.scheduler = self.config.optimizer(module, total_steps)
        self._clock, self._seconds_before = time.time(), 0.0
        if self._state:
            self._restore(self._state)

    # ------------------------------------------------------------ one step

    def accumulate(self, batch: list, context=None, *, shard: bool = True) -> tuple[float, list[dict]]:
        """Forward and backward over this rank's share of `batch` (all of it with
        shard=False: a batch that is already this rank's), in micro-batches, with the
        gradients reduced across ranks once, after the last. The module sees
        (micro-batch, context), the context defaulting to the whole batch. Returns the
        batch's loss (every rank's shares summed) and this rank's statistics per micro-batch.

        Every rank runs as many micro-batches as rank 0 (a rank with fewer runs the missing
        ones at zero weight): collectives must match. DDP averages gradients over ranks; the loss
        is scaled by the world size to make that the sum of the ranks' shares."""
        world = distributed.world_size()
        mine, largest = (distributed.shard(batch), len(batch[0::world])) if shard else (batch, len(batch))
        size = self.config.micro_batch_size or max(largest, 1)  # the same on every rank
        micros = [mine[i:i + size] for i in range(0, len(mine), size)]
        micros += [None] * (-(-largest // size) - len(micros))  # ran on batch[:1], at zero weight
        total, stats = 0.0, []
        for i, micro in enumerate(micros):
            with self._sync(last=i == len(micros) - 1):
                with self.autocast():
                    loss, out = self.wrapped(micro if micro is not None else batch[:1],
                                             batch if context is None else context)
                if micro is None:
                    loss = loss * 0.0
                else:
                    stats.append(out)
                    total += float(loss.detach())
                (loss * world).backward()
        [total] = distributed.all_sum([total])
        return total, stats

    def _sync(self, last: bool):
        """Reduce gradients only on the last micro-batch."""
        if self.config.fsdp:
            self.wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.wrapped is self.module:
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.wrapped.no_sync()

    def optimizer_step(self) -> float:
        """Clip, step, zero the gradients; the gradient norm before clipping."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def end_step(self) -> None:
        """One step done: the schedule moves on."""
        self.scheduler.step()
        self.step += 1

    def keep_if_best(self, objective: float, evaluation: dict | None = None) -> bool:
        """Checkpoint selection: keep a copy of the trained weights (and the `evaluation`
        that chose them) when `objective` (a held-out measure, higher is better) beats every
        earlier one; restore_best() puts the kept weights back before publishing."""
        if not math.isfinite(objective) or (self.best is not None and objective <= self.best["objective"]):
            return False  # a NaN evaluation (a diverged reward model, say) is never the best
        # Rank 0 keeps the copy (DDP replicas are equal; gathering FSDP shards is a collective).
        state = self.trained_state(copy=True) if self.config.fsdp or distributed.is_main() else None
        weights = state if distributed.is_main() else None
        self.best = {"objective": objective, "step": self.step, "weights": weights,
                     "evaluation": dict(evaluation or {})}
        return True

    def restore_best(self) -> int:
        """The weights keep_if_best kept, on every rank; returns the step they are from (the
        current step when nothing was kept)."""
        if self.best is None:
            return self.step
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.module, self.best["weights"] if distributed.is_main() else {},
                                 options=distributed._fsdp_options(broadcast_from_rank0=True))
            return self.best["step"]
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            if distributed.is_main():
                for name, tensor in self.best["weights"].items():
                    params[name].copy_(tensor)
            if distributed.world_size() > 1:  # the other replicas take rank 0's
                for name in sorted(n for n, p in params.items() if p.requires_grad):
                    torch.distributed.broadcast(params[name].data, src=0)
        return self.best["step"]

    def maybe_save(self, **save_state) -> None:
        """Every save_every steps (after the step's log row), save the run; `save_state`:
        what the trainer needs besides the Run's own state to continue exactly."""
        if self.config.save_every and self.step % self.config.save_every == 0 and self.step < self.total_steps:
            self.save(**save_state)

    # ------------------------------------------------------------ the loop of SFT, RM and DPO

    def fit(self, train: list, *, train_stats, evaluate=None, on_batch=None) -> None:
        """config.total_steps batches of `train`, one optimizer step each (on_batch(batch)
        first, if given), logged every log_every steps (loss, grad_norm, lr and
        train_stats(batch, this rank's micro-batch statistics, self.metrics)) and evaluated
        every eval_every steps and at the end (evaluate() -> metrics, kept in self.metrics).
        Adds steps and seconds to self.metrics."""
        config = self.config
        batches = Batches(train, config.batch_size, self.rng)
        if self._state:
            batches.load_state_dict(self._state["batches"])
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.stage,
                   disable=not config.progress or not distributed.is_main())
        while self.step < self.total_steps:
            chunk = next(batches)
            if on_batch:
                on_batch(chunk)
            loss, stats = self.accumulate(chunk)
            grad_norm = self.optimizer_step()
            self.end_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            row = {}
            last = self.step == self.total_steps
            if self.step % config.log_every == 0 or last:
                row = {"loss": loss, **train_stats(chunk, stats, self.metrics), "grad_norm": grad_norm,
                       "lr": self.scheduler.get_last_lr()[0]}
                self.metrics["train_loss"] = loss
            if evaluate and ((config.eval_every and self.step % config.eval_every == 0) or last):
                with self.inference():
                    result = evaluate()
                self.metrics.update(result)
                row.update(result)
            if row:
                self.log.log(self.step, **row)
            self.maybe_save(batches=batches.state_dict())
        bar.close()
        self.metrics.update(steps=self.step, seconds=self.seconds())

    def seconds(self) -> float:
        """Training time since prepare(), plus the saved run's when resuming."""
        return round(self._seconds_before + time.time() - self._clock, 2)

    def upcoming(self, items: list) -> list[int]:
        """Indices of the items fit() will draw in the steps left (the run's shuffles, drawn
        here on a copy of its RNG and data position), in the order of first use: work done
        on the data before training (DPO's reference log-probs) can skip the rest."""
        rng = random.Random()
        rng.setstate(self._rng_state()["python"] if self._state else self.rng.getstate())
        probe = Batches(list(range(len(items))), self.config.batch_size, rng)
        if self._state:
            probe.load_state_dict(self._state["batches"])
        seen: dict[int, None] = {}
        for _ in range(self.config.total_steps(len(items)) - (self._state["step"] if self._state else 0)):
            seen.update(dict.fromkeys(next(probe)))
        return list(seen)

    # ------------------------------------------------------------ saves and resume

    def _rng_state(self) -> dict:
        return torch.load(self.resumed / f"rng-rank{distributed.rank()}.pt", weights_only=False)

    def _latest_save(self) -> Path | None:
        saves = sorted(self.save_dir.glob("step-*[0-9]")) if self.save_dir.is_dir() else []
        return saves[-1] if saves else None

    def trained_state(self, copy: bool = False) -> dict[str, torch.Tensor]:
        """The trained parameters (LoRA: the adapter and the score head), by name, on the CPU;
        with `copy`, tensors of their own even where the parameters already live on the CPU."""
        if self.config.fsdp:  # gathered into new CPU tensors; every weight is trained (no LoRA with FSDP)
            return distributed.full_state_dict(self.module)
        return {name: p.detach().to("cpu", copy=copy) for name, p in self.module.named_parameters() if p.requires_grad}

    def save(self, **extra) -> Path:
        """Write the trained weights, optimizer, schedule, step, metrics, the data position
        (in `extra`) and every rank's RNG states under save_dir/step-N, atomically (a
        directory appears under its final name only when complete); keep the last two."""
        final = self.save_dir / f"step-{self.step:06d}"
        tmp = self.save_dir / f".step-{self.step:06d}.tmp"
        generators = {k: v.get_state() for k, v in extra.pop("generators", {}).items()}
        weights = self.trained_state() if self.config.fsdp or distributed.is_main() else None  # FSDP: a collective
        optimizer = distributed.full_optimizer_state(self.module, self.optimizer) if self.config.fsdp \
            else self.optimizer.state_dict()
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"step": self.step, "seconds": self.seconds(), "identity": self._run_identity(), "weights": weights, "optimizer": optimizer,
                        "scheduler": self.scheduler.state_dict(), "metrics": self.metrics, "log_dir": str(self.log.dir),
                        "best": self.best,
                        **extra}, tmp / STATE_FILE)
        distributed.barrier()
        torch.save({"python": self.rng.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "generators": generators}, tmp / f"rng-rank{distributed.rank()}.pt")
        distributed.barrier()
        if distributed.is_main():
            _fsync_tree(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.save_dir)
            for old in sorted(self.save_dir.glob("step-*[0-9]"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return final

    def _run_identity(self) -> dict:
        """What a resumed run must share with the saved one."""
        from dataclasses import asdict

        ignored = {"resume", "overwrite", "progress", "device", "output_dir", "log_dir", "save_dir"}
        return {"config": {k: v for k, v in asdict(self.config).items() if k not in ignored},
                "world_size": distributed.world_size()}

    def _check_same_run(self, state: dict) -> None:
        saved, now = state["identity"], self._run_identity()
        changed = sorted(k for k in saved["config"].keys() | now["config"].keys()
                         if saved["config"].get(k) != now["config"].get(k))
        if changed or saved["world_size"] != now["world_size"]:
            detail = ", ".join(f"{k}: {saved['config'].get(k)!r} then, {now['config'].get(k)!r} now" for k in changed)
            if saved["world_size"] != now["world_size"]:
                detail += f"{', ' if detail else ''}processes: {saved['world_size']} then, {now['world_size']} now"
            raise ValueError(f"--resume: {self.resumed} was saved by a different run ({detail}); resume with the "
                             "same options, or start afresh without --resume")

    def _restore(self, state: dict) -> None:
        if self.config.fsdp:
            distributed.load_full_state(self.module, self.optimizer, state["weights"], state["optimizer"])
        else:
            params = dict(self.module.named_parameters())
            with torch.no_grad():
                for name, tensor in state["weights"].items():
                    params[name].copy_(tensor)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.metrics, self._seconds_before = state["step"], dict(state["metrics"]), state["seconds"]
        self.best = state.get("best")
        if self.best and not distributed.is_main():
            self.best = {**self.best, "weights": None}  # rank 0 keeps the copy
        rng = self._rng_state()
        self.rng.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._generator_states = rng["generators"]

    def resumed_state(self, key: str, default=None):
        """What the trainer passed to maybe_save under `key`, when resuming (else default)."""
        return self._state.get(key, default) if self._state else default

    def restore_generator(self, name: str, generator: torch.Generator) -> torch.Generator:
        if self._state and name in self._generator_states:
            generator.set_state(self._generator_states[name])
        return generator

    # ------------------------------------------------------------ the end

    def _adapter_over_float32_base(self, model):
        """The trained adapter over the base reloaded in float32: merged into the bfloat16
        copy of the base that trained it, a small update would round away."""
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        from rlhfkit.hf import resolve_model

        inner = hf_model(model)
        base = type(inner).from_pretrained(resolve_model(self.config.model, self.config.revision), config=inner.config,
                                           dtype=torch.float32)
        adapted = get_peft_model(base, model.peft_config["default"])
        set_peft_model_state_dict(adapted, get_peft_model_state_dict(model))
        return adapted

    def publish(self, model, tokenizer, *, data_files: list[str], extra: dict | None = None, **kwargs) -> None:
        """Close the log (drawing its curves), publish the model on rank 0 (a LoRA model
        merged, its adapter saved beside it), and return on every rank once it is there."""
        from dataclasses import asdict

        from .data import fingerprint_files

        plot = self.log.close()
        if self.config.lora_r and self.dtype != torch.float32 and distributed.is_main():
            model = self._adapter_over_float32_base(model)
        state = None
        if self.config.fsdp:  # the model's weights are shards: publish the gathered ones
            [prefix] = [f"models.{name}." for name, m in self.module.models.items() if m is model]
            state = {k[len(prefix):]: v for k, v in distributed.full_state_dict(self.module).items()
                     if k.startswith(prefix)}
        if distributed.is_main():
            publish_checkpoint(model, tokenizer, self.config.output_dir, stage=self.stage, parent=self.config.model,
                               data_fingerprint=fingerprint_files(data_files), metrics=self.metrics,
                               overwrite=self.config.overwrite, state_dict=state,
                               extra={**(extra or {}), "config": asdict(self.config), "metrics_file": str(self.log.path),
                                      "plot": str(plot)}, **kwargs)
        distributed.barrier()  # the other ranks return once the checkpoint is there

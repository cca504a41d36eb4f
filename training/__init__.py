"""rlhfkit.training: the trainers of the InstructGPT loop and the data they read.

    losses.py      RM (pairwise, K-wise), PPO (policy, value, GAE, whiten), DPO losses
    data.py        JSONL formats (SFT, preferences, rankings, prompts), validated readers
    task.py        the bundled task and its simulated demonstrators and annotators
    checkpoint.py  atomic publish of a checkpoint with rlhfkit.json (LoRA: merged, adapter beside it)
    common.py      TrainConfig (the options every trainer shares), schedule, optimizer, metrics log
    skeleton.py    the one training loop: precision, LoRA, checkpointing, accumulation, DDP/FSDP2, saves
    sequences.py   tokenized examples, token log-probs, rollouts, reward scores: what trainers share
    sft.py rm.py dpo.py ppo.py   one config dataclass, a loss and one train_* function each
    distributed.py under torchrun: the process group, each rank's share of a batch, DDP / FSDP2
    loop.py        label a policy's samples; judge policies (gold utility, win rate, KL)
    quickstart.py  `rlhfkit quickstart`: SFT -> RM -> PPO from scratch, evaluated, with a report
    cli.py         `rlhfkit train <stage>`, generated from the config dataclasses
    tiny.py        tiny random checkpoints and tokenizers (no downloads)

Modules are imported on use: `import rlhfkit.training` alone loads nothing heavy.
"""

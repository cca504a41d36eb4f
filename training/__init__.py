"""rlhfkit.training: the trainers of the InstructGPT loop and the data they read.

    losses.py      RM (pairwise, K-wise), PPO (policy, value, GAE, whiten), DPO losses
    data.py        JSONL formats (SFT, preferences, rankings, prompts), validated readers
    task.py        the bundled task and its simulated demonstrators and annotators
    checkpoint.py  atomic publish of a checkpoint with rlhfkit.json
    sft.py rm.py dpo.py ppo.py   one config dataclass and one train_* function each
    distributed.py under torchrun: the process group, each rank's share of a batch, summed gradients
    loop.py        label a policy's samples; judge policies (gold utility, win rate, KL)
    quickstart.py  `rlhfkit quickstart`: SFT -> RM -> PPO from scratch, evaluated, with a report
    cli.py         `rlhfkit train <stage>`, generated from the config dataclasses
    ops.py         the one import point of the shared kernels
    tiny.py        tiny random checkpoints and tokenizers (no downloads)

Modules are imported on use: `import rlhfkit.training` alone loads nothing heavy.
"""

"""What tests/test_distributed.py runs under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py SPEC.json OUT_DIR

SPEC.json maps a stage (sft, rm, dpo, ppo, grpo, or one of them with a suffix: ppo-lora) to its
config's keyword arguments. The real
trainers run one after the other; after each, this rank saves every parameter its optimizer
trained (PPO: policy and value model) and the metrics it returned to
OUT_DIR/STAGE-rankR.pt, for the test to compare across ranks and with a one-process run.
First, it saves this rank's part of a whitening across ranks (whiten-rankR.pt).
"""

import json
import os
import sys

import torch

from rlhfkit.training import critic_free, distributed, dpo, ppo, rm, sft

TRAINERS = {"sft": (sft.SFTConfig, sft.train_sft), "rm": (rm.RMConfig, rm.train_rm),
            "dpo": (dpo.DPOConfig, dpo.train_dpo), "ppo": (ppo.PPOConfig, ppo.train_ppo),
            "grpo": (critic_free.GRPOConfig, critic_free.train_grpo)}


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that remembers the last instance, so its parameters can be read after training
    (every trainer builds its optimizer from torch.optim.AdamW)."""

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingAdamW.last = self


def whiten_inputs():
    """Rows of advantages and masks of uneven lengths; each rank takes its rows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = (torch.rand(5, 7, generator=gen) < 0.7).long()
    return x, mask


def main(spec_file: str, out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    distributed.init(torch.device("cpu"))
    x, mask = whiten_inputs()
    torch.save(ppo.whiten_across_ranks(distributed.shard(x), distributed.shard(mask)), f"{out_dir}/whiten-rank{rank}.pt")

    torch.optim.AdamW = RecordingAdamW
    with open(spec_file) as f:
        spec = json.load(f)
    for stage, kwargs in spec.items():
        config_cls, train = TRAINERS[stage.split("-")[0]]  # e.g. "ppo-lora": PPO with other options
        metrics = train(config_cls(**kwargs))
        # FSDP2's parameters are this rank's shards: gather each whole (every rank, in order)
        params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                  for group in RecordingAdamW.last.param_groups for p in group["params"]]
        torch.save({"params": params, "metrics": metrics}, f"{out_dir}/{stage}-rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])

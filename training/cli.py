"""`rlhfkit train <stage> ...`: one subcommand per trainer, its flags generated from the
trainer's config dataclass (field -> --field-name, type, default, help), so the CLI and
the Python API can never drift apart. Prints the final metrics as JSON."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from rlhfkit.dataclass_cli import add_dataclass_arguments, dataclass_from_args
from rlhfkit.training import distributed

# stage -> (module, config class, train function); modules are imported only when listed
# here, and their heavy imports (transformers) are what a training run needs anyway.
STAGES = {
    "data": ("rlhfkit.training.task", "TaskDataConfig", "write_task_data_from_config"),
    "sft": ("rlhfkit.training.sft", "SFTConfig", "train_sft"),
    "rm": ("rlhfkit.training.rm", "RMConfig", "train_rm"),
    "dpo": ("rlhfkit.training.dpo", "DPOConfig", "train_dpo"),
    "ppo": ("rlhfkit.training.ppo", "PPOConfig", "train_ppo"),
    "grpo": ("rlhfkit.training.critic_free", "GRPOConfig", "train_grpo"),
    "rloo": ("rlhfkit.training.critic_free", "RLOOConfig", "train_rloo"),
    "label": ("rlhfkit.training.loop", "LabelConfig", "label_policy_samples"),
    "eval": ("rlhfkit.training.loop", "EvalConfig", "evaluate_policy"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="rlhfkit train", description="Train SFT / reward model / PPO / GRPO / RLOO / DPO "
                                     "checkpoints, or write the bundled task's data.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    entries = {}
    for stage, (module_name, config_name, train_name) in STAGES.items():
        module = importlib.import_module(module_name)
        config_cls, train_fn = getattr(module, config_name), getattr(module, train_name)
        doc = (config_cls.__doc__ or "").strip()
        stage_parser = sub.add_parser(stage, help=doc.split("\n")[0], description=doc)
        add_dataclass_arguments(stage_parser, config_cls)
        entries[stage] = (config_cls, train_fn, stage_parser)
    return parser, entries


def main(argv: list[str] | None = None) -> int:
    parser, entries = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config_cls, train_fn, stage_parser = entries[args.stage]
    return run_from_args(stage_parser, args, config_cls, train_fn)


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, config_cls, run_fn) -> int:
    """Build the config (its own validation errors worded for a person through the parser),
    run, and print the result as JSON."""
    try:
        config = dataclass_from_args(config_cls, args)
    except ValueError as e:
        parser.error(str(e))
    result = run_fn(config)
    if distributed.is_main():  # under torchrun, every rank returns the same metrics
        print(json.dumps(result, indent=2, default=str))
    return 0


def quickstart_main(argv: list[str] | None = None) -> int:
    from rlhfkit.training.quickstart import QuickstartConfig, run_quickstart

    doc = QuickstartConfig.__doc__.strip()
    parser = argparse.ArgumentParser(prog="rlhfkit quickstart", description=doc + " Serve the result with "
                                     "`rlhfkit serve --store OUT/store`.")
    add_dataclass_arguments(parser, QuickstartConfig)
    return run_from_args(parser, parser.parse_args(sys.argv[1:] if argv is None else argv), QuickstartConfig,
                         run_quickstart)


if __name__ == "__main__":
    sys.exit(main())

"""The quickstart's RL stage, algorithm against algorithm: PPO, GRPO and RLOO with the quickstart's
defaults, from the same SFT policy and reward model, each run its own process (alternated), timed
and measured (peak RSS from wait4), then judged as the quickstart judges (the simulated
annotators' win rate over SFT on the held-out prompts).

    # a finished quickstart gives the SFT policy, the reward model and the data
    rlhfkit quickstart --out /tmp/qs0 --seed 0
    python bench/rl_quickstart.py --quickstart /tmp/qs0 --algos ppo,grpo,rloo --repeats 2 \\
        --out bench/results/rl_quickstart_cpu.json

Results: per run wall seconds (process start to exit: imports, loads, training, publish), the
trainer's own seconds, peak RSS, win rate, gold utility and KL; per algorithm the medians, and
each one's ratio to PPO's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(algo: str, quickstart: Path, out: Path) -> int:
    from rlhfkit.training.quickstart import QuickstartConfig, rl_stage

    saved = json.loads((quickstart / "report.json").read_text())["config"]
    # the RL stage as the installed rlhfkit's quickstart defaults have it, on that quickstart's seed and data
    config = QuickstartConfig(out=str(quickstart), seed=saved["seed"], device="cpu", progress=False)
    files = {"prompts": str(quickstart / "data" / "prompts.jsonl"),
             "prompts_select": str(quickstart / "data" / "prompts_select.jsonl")}
    train, rl_config = rl_stage(config, algo, quickstart / "store", files, out / "runs", output_dir=out / algo)
    metrics = train(rl_config)
    (out / "metrics.json").write_text(json.dumps(metrics, default=str))
    return 0


def judge(policy: Path, quickstart: Path, seed: int) -> dict:
    from rlhfkit.training.data import read_jsonl
    from rlhfkit.training.loop import gold_utility, mean_kl, win_rate

    prompts = [r["prompt"] for r in read_jsonl(quickstart / "data" / "prompts_eval.jsonl", "prompts")]
    sft = quickstart / "store" / "sft-1"
    w = win_rate(policy, sft, prompts=prompts, samples_per_prompt=4, annotator_temperature=0.1, seed=seed + 1,
                 device="cpu")
    return {"win_rate": w["win_rate"], "sampled_gold": w["utility_policy"],
            "greedy_gold": gold_utility(policy, prompts, 0.0, device="cpu"),
            "kl": mean_kl(policy, sft, prompts, seed=seed + 2, device="cpu")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", help="a finished `rlhfkit quickstart --out DIR` (its store/sft-1, store/rm-1, data/)")
    p.add_argument("--algos", default="ppo,grpo,rloo", help="comma-separated subset of ppo,grpo,rloo")
    p.add_argument("--repeats", type=int, default=2, help="runs per algorithm, alternated")
    p.add_argument("--workdir", default="/tmp/bench-rl-quickstart", help="where the runs publish")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "rl_quickstart_cpu.json"))
    p.add_argument("--worker", nargs=3, metavar=("ALGO", "QUICKSTART", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
    from rlhfkit.training.common import cpu_model

    quickstart = Path(args.quickstart).absolute()
    seed = json.loads((quickstart / "report.json").read_text())["config"]["seed"]
    algos = [a for a in args.algos.split(",") if a]
    runs = []
    for repeat in range(args.repeats):
        for algo in algos:
            out = Path(args.workdir) / f"{algo}-{repeat}"
            out.mkdir(parents=True, exist_ok=True)
            start = time.time()
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", algo, str(quickstart),
                                     str(out)], stdout=subprocess.DEVNULL, stderr=open(out / "stderr.log", "w"))
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.time() - start
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{algo} run failed: see {out / 'stderr.log'}")
            metrics = json.loads((out / "metrics.json").read_text())
            run = {"algo": algo, "repeat": repeat, "wall_s": round(wall, 1), "train_s": metrics["seconds"],
                   "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "selected_iteration": metrics.get("selected_iteration"),
                   **judge(out / algo, quickstart, seed)}
            print(json.dumps(run), flush=True)
            runs.append(run)
    summary = {}
    for algo in algos:
        mine = [r for r in runs if r["algo"] == algo]
        summary[algo] = {k: statistics.median(r[k] for r in mine)
                         for k in ("wall_s", "train_s", "peak_rss_mb", "win_rate", "sampled_gold", "greedy_gold", "kl")}
    if "ppo" in summary:
        for algo in algos:
            summary[algo]["vs_ppo"] = {k: round(summary[algo][k] / summary["ppo"][k], 3)
                                       for k in ("wall_s", "train_s", "peak_rss_mb", "win_rate")}
    result = {"benchmark": "bench/rl_quickstart.py", "cpu": cpu_model(), "cpu_count": os.cpu_count(),
              "quickstart": str(quickstart), "seed": seed, "command": " ".join(sys.argv), "runs": runs,
              "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Trainers side by side with TRL: SFT, RM and DPO steps and a PPO iteration on a ~60M-parameter
Llama (random weights, 32,000-token vocabulary), ~160-token sequences, batch 8, fp32 on CPU.

Every measurement is its own process, started from the interpreter of its own environment, and
the runs alternate (rlhfkit, TRL, rlhfkit, TRL, ...). Per run: seconds per optimizer step
(median over the steps after the warm-up), the process's peak RSS (the kernel's high-water mark
from wait4), and the whole process's wall time (from exec to exit: interpreter start, imports,
model load, data, training, saving). Results: bench/results/train_cpu.json and .png.

Environments (the rlhfkit side runs a snapshot, not an editable install, so edits to the working
tree cannot change a run in progress; torch first and pinned, or pip pulls CUDA wheels):

  # TRL (SFTTrainer, RewardTrainer, DPOTrainer, GRPOTrainer) in its own environment
  python -m venv .venv-trl
  .venv-trl/bin/pip install torch==2.13.0
  .venv-trl/bin/pip install trl peft datasets

  # rlhfkit from a snapshot of a commit (here HEAD), non-editable
  rm -rf /tmp/rlhfkit-snap && mkdir -p /tmp/rlhfkit-snap && git archive HEAD | tar -x -C /tmp/rlhfkit-snap
  python -m venv .venv-bench
  .venv-bench/bin/pip install torch==2.13.0
  .venv-bench/bin/pip install /tmp/rlhfkit-snap peft

  # the full run behind bench/results/train_cpu.json (all trainers, alternated; 18 minutes on 2 cores)
  python bench/train.py --rlhfkit-python .venv-bench/bin/python --trl-python .venv-trl/bin/python \\
      --rlhfkit-commit $(git rev-parse --short HEAD) --steps 5 --warmup 2 --repeats 2 --variant-repeats 1 --phases

  # a quick check of the machinery (small model, 3 steps, a minute or three)
  python bench/train.py --hidden 64 --layers 2 --intermediate 128 --heads 4 --steps 3 --warmup 1 --repeats 1 \\
      --threads 1 --workdir /tmp/bench-train-smoke --out /tmp/bench-train-smoke/train.json

  # recompute the rows of a results file from the runs it records, and redraw its PNG
  .venv-bench/bin/python bench/train.py --rebuild bench/results/train_cpu.json

The driver itself needs only the standard library (any python3); the data, the checkpoints and
the plot are made by subprocesses of --rlhfkit-python.

Peers. SFT: rlhfkit `train sft` vs trl.SFTTrainer (prompt/completion, loss on the completion).
RM: `train rm` vs trl.RewardTrainer (both start from the policy checkpoint with a scalar head).
DPO: `train dpo` vs trl.DPOTrainer (sigmoid loss; rlhfkit scores the reference before training,
TRL with its default precompute_ref_log_probs=False runs the reference inside every step).
GRPO: one `train grpo` iteration (4 prompts x 2 completions of 32 tokens, the same reward model,
kl_coef 0.05 with k3 in the loss, one optimizer step) vs the same trl.GRPOTrainer step as PPO's peer
below: the like-for-like row of the two GRPO implementations.
PPO: one `train ppo` iteration (8 prompts, 32 sampled tokens each, policy + reference + reward
model + value model, one PPO epoch of one minibatch of 8 = one optimizer step) vs one
trl.GRPOTrainer step (8 completions, 32 tokens, the same reward model, beta=0.05 so it keeps a
reference like PPO's KL; no value model): TRL 1.x has no PPOTrainer (it is neither in trl nor in
trl.experimental), and GRPO with a reward model is its closest peer. TRL's defaults of
gradient_checkpointing=True and bf16=True are turned off (fp32, no checkpointing) so both sides
do the same arithmetic; every other TRL option is its default, except logging/saving to disk
(report_to=none, save_strategy=no) and the final save_model, which matches rlhfkit's publish.

Extra rows: rlhfkit with LoRA (`--lora-r 16 --lora-alpha 32`) and with gradient checkpointing
(`--gradient-checkpointing`). They run when the installed rlhfkit's trainer config has the field
(lora_r, lora_alpha, gradient_checkpointing) and are recorded as skipped, with the reason,
otherwise. --trl-extras adds the same two variants on the TRL side.

--phases adds one rlhfkit DPO run (16 steps by default) timed phase by phase (interpreter start,
imports, tokenizer and model loads, data, the reference pass, the loop, the plot, the publish,
exit), plus `python -X importtime` of the CLI's imports, to say where the time outside the
training loop goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

T0 = time.time()  # the worker's first moment after the interpreter started (see --worker)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAINERS = ("sft", "rm", "dpo", "ppo", "grpo")
RLHFKIT_CONFIG = {"sft": ("rlhfkit.training.sft", "SFTConfig"), "rm": ("rlhfkit.training.rm", "RMConfig"),
                  "dpo": ("rlhfkit.training.dpo", "DPOConfig"), "ppo": ("rlhfkit.training.ppo", "PPOConfig"),
                  "grpo": ("rlhfkit.training.critic_free", "GRPOConfig")}
# variant -> the rlhfkit config fields it needs and the CLI flags that turn it on
VARIANTS = {
    "base": ((), []),
    "lora": (("lora_r", "lora_alpha"), ["--lora-r", "16", "--lora-alpha", "32"]),
    "gc": (("gradient_checkpointing",), ["--gradient-checkpointing"]),
    "lora-gc": (("lora_r", "gradient_checkpointing"), ["--lora-r", "16", "--lora-alpha", "32", "--gradient-checkpointing"]),
}


# ============================================================================ driver

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rlhfkit-python", default=os.path.join(ROOT, ".venv-bench", "bin", "python"),
                   help="interpreter of the environment with rlhfkit installed from a snapshot (default: .venv-bench)")
    p.add_argument("--trl-python", default=os.path.join(ROOT, ".venv-trl", "bin", "python"),
                   help="interpreter of the environment with trl, peft, datasets (default: .venv-trl)")
    p.add_argument("--rlhfkit-commit", default="unknown", help="the commit the rlhfkit snapshot was made from (recorded in the JSON)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of sft,rm,dpo,ppo,grpo")
    p.add_argument("--variants", default="lora,gc", help="extra rlhfkit rows: comma-separated subset of lora,gc,lora-gc ('' for none)")
    p.add_argument("--trl-extras", action="store_true", help="also run the lora and gc variants on the TRL side")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (PPO/GRPO: iterations) per run")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median (the first ones)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each row, alternated rlhfkit/TRL")
    p.add_argument("--variant-repeats", type=int, default=None, help="runs of each extra variant row (default: --repeats)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=100, help="SFT/RM/DPO prompt length in tokens")
    p.add_argument("--completion-tokens", type=int, default=60, help="SFT completion / RM and DPO response length in tokens")
    p.add_argument("--ppo-prompt-tokens", type=int, default=128)
    p.add_argument("--ppo-new-tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of every run")
    p.add_argument("--phases", action="store_true", help="add the timed-phase rlhfkit DPO run (where wall time outside the loop goes)")
    p.add_argument("--phase-steps", type=int, default=16)
    p.add_argument("--workdir", default="/tmp/rlhfkit-bench-train", help="data, checkpoints and run outputs")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_cpu.json"), help="JSON results (the PNG beside it)")
    p.add_argument("--rebuild", default=None, metavar="JSON", help="recompute the rows of a results file from the runs it "
                   "records and redraw its PNG (needs matplotlib in this interpreter); measures nothing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_env(args, run_dir=None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", PYTHONUNBUFFERED="1", TQDM_MININTERVAL="5")
    env.pop("PYTHONPATH", None)
    if run_dir:  # a fresh datasets cache per run: a later TRL run must not reuse an earlier one's tokenized data
        env["HF_DATASETS_CACHE"] = os.path.join(run_dir, "hf-datasets")
        env["HF_HOME"] = os.path.join(run_dir, "hf-home")
        env["MPLCONFIGDIR"] = os.path.join(run_dir, "mpl")
    return env


def run_child(python, spec: dict, run_dir: str, args, extra_flags=()) -> dict:
    """One measurement: a subprocess of `python` running this file as a worker (cwd: run_dir, so
    no source tree shadows an installed package). Wall and peak RSS from the driver's side."""
    os.makedirs(run_dir, exist_ok=True)
    spec_path = os.path.join(run_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    log_path = os.path.join(run_dir, "log.txt")
    cmd = [python, *extra_flags, os.path.abspath(__file__), "--worker", spec["worker"], "--spec", spec_path]
    load = [round(x, 2) for x in os.getloadavg()]
    with open(log_path, "w") as log:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=run_dir, env=child_env(args, run_dir), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    result_path = os.path.join(run_dir, "result.json")
    result = json.load(open(result_path)) if os.path.exists(result_path) else {}
    result.update(loadavg_before=load, loadavg_after=[round(x, 2) for x in os.getloadavg()])
    result.update(rc=proc.returncode, wall_s=round(wall, 2), peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
                  spawn_s=round(result["t0"] - start, 3) if "t0" in result else None, log=log_path)
    if proc.returncode != 0:
        with open(log_path) as f:
            result["error_tail"] = f.read()[-3000:]
    return result


def summarize_steps(times: list[float], warmup: int) -> dict:
    """Step durations from the optimizer-step timestamps: step i (1-based) lasted t_i - t_{i-1};
    the first step has no start mark and is always dropped, then `warmup` more."""
    durations = [b - a for a, b in zip(times, times[1:])]  # durations of steps 2..N
    kept = durations[max(0, warmup - 1):]
    return {"step_s_all": [round(d, 3) for d in durations], "s_per_step": round(statistics.median(kept), 3) if kept else None,
            "steps_timed": len(kept)}


def rlhfkit_fields(args) -> dict:
    code = ("import dataclasses, importlib, json; spec = %r; print(json.dumps({k: [f.name for f in dataclasses.fields("
            "getattr(importlib.import_module(m), c))] for k, (m, c) in spec.items()}))" % (RLHFKIT_CONFIG,))
    out = subprocess.run([args.rlhfkit_python, "-c", code], cwd="/tmp", env=child_env(args), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"cannot import rlhfkit's trainer configs with {args.rlhfkit_python}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions(python, args, modules) -> dict:
    code = ("import importlib, json, sys; out = {'python': sys.version.split()[0]}\n"
            "for m in %r:\n"
            "    try: out[m] = importlib.import_module(m).__version__\n"
            "    except Exception as e: out[m] = 'missing (%%s)' %% type(e).__name__\n"
            "import torch; out['torch_threads'] = torch.get_num_threads(); print(json.dumps(out))" % (list(modules),))
    out = subprocess.run([python, "-c", code], cwd="/tmp", env=child_env(args), capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-1000:]}


def cpu_model() -> str:
    # rlhfkit.training.common.cpu_model's twin: this file also runs in TRL's environment, without rlhfkit
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def rlhfkit_snapshot(python, args) -> str:
    code = "import rlhfkit, os; print(os.path.dirname(rlhfkit.__file__))"
    out = subprocess.run([python, "-c", code], cwd="/tmp", env=child_env(args), capture_output=True, text=True)
    return out.stdout.strip()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.rebuild:
        return rebuild(args)
    trainers = [t for t in args.trainers.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    for name in trainers:
        if name not in TRAINERS:
            raise SystemExit(f"unknown trainer {name!r} (choose from {TRAINERS})")
    for name in variants:
        if name not in VARIANTS or name == "base":
            raise SystemExit(f"unknown variant {name!r} (choose from lora, gc)")
    # absolute, without resolving the venv's symlink (the venv is what makes the interpreter its own)
    args.rlhfkit_python, args.trl_python = os.path.abspath(args.rlhfkit_python), os.path.abspath(args.trl_python)
    for python in (args.rlhfkit_python, args.trl_python):
        if not os.path.exists(python):
            raise SystemExit(f"{python} does not exist: create the environments as `python bench/train.py --help` says")
    os.makedirs(args.workdir, exist_ok=True)
    started = time.time()

    # 1. data, tokenizer and checkpoints, made once and read by both sides
    data_dir = os.path.join(args.workdir, "data")
    prep_spec = {"worker": "prepare", "data_dir": data_dir, **model_shape(args)}
    prep_dir = os.path.join(args.workdir, "prepare")
    try:  # made before with the same settings: reuse
        prep = json.load(open(os.path.join(prep_dir, "result.json")))
        assert json.load(open(os.path.join(prep_dir, "spec.json"))) == prep_spec and "policy_params" in prep
    except (OSError, ValueError, AssertionError):
        prep = run_child(args.rlhfkit_python, prep_spec, prep_dir, args)
        if prep["rc"] != 0:
            raise SystemExit(f"prepare failed:\n{prep.get('error_tail')}")
    print(f"model: {prep['policy_params']:,} parameters (reward model {prep['reward_params']:,}); "
          f"vocab {prep['vocab_size']}; tokens per sequence {prep['lengths']}", flush=True)

    fields = rlhfkit_fields(args)
    meta = {
        "benchmark": "bench/train.py", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([os.path.basename(sys.executable), "bench/train.py", *(sys.argv[1:] if argv is None else argv)]),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "rlhfkit_env": versions(args.rlhfkit_python, args, ["torch", "transformers", "peft", "rlhfkit"]),
        "trl_env": versions(args.trl_python, args, ["torch", "transformers", "trl", "peft", "datasets", "accelerate"]),
        "rlhfkit_installed_from": rlhfkit_snapshot(args.rlhfkit_python, args),
        "rlhfkit_snapshot_commit": args.rlhfkit_commit,
        "model": {k: prep[k] for k in ("policy_params", "reward_params", "vocab_size", "config")},
        "data": {"lengths_tokens": prep["lengths"], "records": prep["records"], "files": prep["files"]},
        "settings": {k: getattr(args, k) for k in ("steps", "warmup", "repeats", "variant_repeats", "batch_size", "prompt_tokens",
                                                     "completion_tokens", "ppo_prompt_tokens", "ppo_new_tokens")},
        "peers": {"sft": "trl.SFTTrainer", "rm": "trl.RewardTrainer", "dpo": "trl.DPOTrainer",
                  "ppo": "trl.GRPOTrainer (TRL %s has no PPOTrainer; GRPO with the same reward model, beta=0.05, "
                         "8 completions of 32 tokens per step)" % "1.x",
                  "grpo": "trl.GRPOTrainer (the same reward model, 4 prompts x 2 completions of 32 tokens per step, "
                          "beta=0.05, one optimizer step per iteration)"},
    }

    # 2. the rows, alternated: for each repeat and trainer, rlhfkit then TRL, then the extra variants
    rows, runs = [], []
    plan = []
    for repeat in range(args.repeats):
        for trainer in trainers:
            plan.append(("rlhfkit", trainer, "base", repeat))
            plan.append(("trl", trainer, "base", repeat))
            for v in variants if repeat < (args.repeats if args.variant_repeats is None else args.variant_repeats) else ():
                plan.append(("rlhfkit", trainer, v, repeat))
                if args.trl_extras:
                    plan.append(("trl", trainer, v, repeat))
    skipped = {}
    for side, trainer, variant, repeat in plan:
        key = f"{side}-{trainer}-{variant}"
        if side == "rlhfkit":
            missing = [f for f in VARIANTS[variant][0] if f not in fields[trainer]]
            if missing:
                skipped[key] = (f"skipped: the installed rlhfkit's {RLHFKIT_CONFIG[trainer][1]} has no field "
                                f"{', '.join(missing)} (it arrives with the trainer refactor of issue 13)")
                if repeat == 0:
                    print(f"[{key}] {skipped[key]}", flush=True)
                continue
        spec = {"worker": f"run-{side}", "trainer": trainer, "variant": variant, "steps": args.steps,
                "batch_size": args.batch_size, "data_dir": data_dir, "ppo_new_tokens": args.ppo_new_tokens,
                "ppo_prompt_tokens": args.ppo_prompt_tokens, "threads": args.threads}
        run_dir = os.path.join(args.workdir, "runs", f"{key}-{repeat}")
        print(f"[{key} #{repeat}] ...", end=" ", flush=True)
        result = run_child(args.rlhfkit_python if side == "rlhfkit" else args.trl_python, spec, run_dir, args)
        result.update(summarize_steps(result.get("step_times", []), args.warmup))
        result.update(side=side, trainer=trainer, variant=variant, repeat=repeat)
        result.pop("step_times", None)
        runs.append(result)
        if result["rc"]:
            print(f"FAILED rc={result['rc']} (see {result['log']})\n{result.get('error_tail', '')[-1500:]}", flush=True)
        else:
            print(f"{result['s_per_step']} s/step, peak RSS {result['peak_rss_mb']:.0f} MB, wall {result['wall_s']} s "
                  f"(loop {result.get('loop_s')} s)", flush=True)

    # 3. one row per (side, trainer, variant): medians (and minima) over the repeats
    keys = list(dict.fromkeys((s, t, v) for s, t, v, _ in plan))
    rows = aggregate(keys, runs, skipped, meta["peers"])

    # 4. where the time outside the loop goes (rlhfkit DPO)
    phases = None
    if args.phases:
        phases = phase_breakdown(args, data_dir)

    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["bench_seconds"] = round(time.time() - started, 1)
    out = {**meta, "rows": rows, "runs": runs, "phases": phases}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print_table(rows)
    png = os.path.splitext(args.out)[0] + ".png"
    plot = subprocess.run([args.rlhfkit_python, os.path.abspath(__file__), "--worker", "plot", "--spec",
                           os.path.abspath(args.out)], cwd="/tmp", env=child_env(args), capture_output=True, text=True)
    print(f"wrote {args.out}" + (f" and {png}" if plot.returncode == 0 else f" (plot failed: {plot.stderr[-500:]})"))
    return 0


def aggregate(keys, runs, skipped, peers) -> list[dict]:
    """One row per (side, trainer, variant) from its runs: the median over the repeats, and the
    minimum (load from other processes only ever adds time, so the best repeat is the other
    estimate on a shared machine); ratios against TRL's base row of the same trainer."""
    rows = []
    for side, trainer, variant in keys:
        key = f"{side}-{trainer}-{variant}"
        mine = [r for r in runs if (r["side"], r["trainer"], r["variant"]) == (side, trainer, variant) and r["rc"] == 0]
        row = {"side": side, "trainer": trainer, "variant": variant,
               "peer": peers[trainer] if side == "trl" else f"rlhfkit train {trainer}"}
        if key in skipped:
            row["skipped"] = skipped[key]
        elif not mine:
            row["failed"] = next((r.get("error_tail", "")[-600:] for r in runs
                                  if (r["side"], r["trainer"], r["variant"]) == (side, trainer, variant)), "no run")
        else:
            for k in ("s_per_step", "peak_rss_mb", "wall_s", "loop_s"):
                values = [r[k] for r in mine if r.get(k) is not None]
                row[k] = round(statistics.median(values), 3) if values else None
                row[k + "_min"] = round(min(values), 3) if values else None
            row["repeats"] = len(mine)
        rows.append(row)
    for row in rows:
        trl = next((r for r in rows if r["side"] == "trl" and r["trainer"] == row["trainer"] and r["variant"] == "base"), None)
        if row["side"] == "rlhfkit" and trl and row.get("s_per_step") and trl.get("s_per_step"):
            row["vs_trl"] = {k: round(row[k] / trl[k], 3) for k in ("s_per_step", "peak_rss_mb", "wall_s")
                             if row.get(k) and trl.get(k)}
            row["vs_trl_min"] = {k: round(row[k + "_min"] / trl[k + "_min"], 3) for k in ("s_per_step", "wall_s")
                                 if row.get(k + "_min") and trl.get(k + "_min")}
    return rows


def rebuild(args) -> int:
    """--rebuild JSON: recompute the rows from the runs a results file records (no new
    measurement), rewrite it and redraw its PNG."""
    res = json.load(open(args.rebuild))
    keys = [(r["side"], r["trainer"], r["variant"]) for r in res["rows"]]
    skipped = {f"{r['side']}-{r['trainer']}-{r['variant']}": r["skipped"] for r in res["rows"] if "skipped" in r}
    res["rows"] = aggregate(keys, res["runs"], skipped, res["peers"])
    res["rows_rebuilt"] = time.strftime("%Y-%m-%d %H:%M:%S") + " by --rebuild from the runs recorded here"
    with open(args.rebuild, "w") as f:
        json.dump(res, f, indent=2)
    print_table(res["rows"])
    return plot_results(args.rebuild)


def model_shape(args) -> dict:
    return {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
            "intermediate": args.intermediate, "n_records": args.steps * args.batch_size,
            "n_phase_records": args.phase_steps * args.batch_size, "batch_size": args.batch_size,
            "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens,
            "ppo_prompt_tokens": args.ppo_prompt_tokens, "ppo_new_tokens": args.ppo_new_tokens}


def print_table(rows):
    print(f"\n{'trainer':7} {'side':8} {'variant':7} {'s/step':>8} {'(min)':>7} {'peakRSS MB':>11} {'wall s':>8} "
          f"{'(min)':>7} {'loop s':>8}  rlhfkit/TRL: median [min]")
    for r in rows:
        if "skipped" in r or "failed" in r:
            print(f"{r['trainer']:7} {r['side']:8} {r['variant']:7} {'skipped' if 'skipped' in r else 'FAILED'}")
            continue
        ratio, best = r.get("vs_trl", {}), r.get("vs_trl_min", {})
        print(f"{r['trainer']:7} {r['side']:8} {r['variant']:7} {r['s_per_step']!s:>8} {r.get('s_per_step_min')!s:>7} "
              f"{r['peak_rss_mb']!s:>11} {r['wall_s']!s:>8} {r.get('wall_s_min')!s:>7} {r.get('loop_s')!s:>8}  "
              + " ".join(f"{k}={v}" + (f" [{best[k]}]" if k in best else "") for k, v in ratio.items()))


def phase_breakdown(args, data_dir) -> dict:
    """One rlhfkit DPO run with timestamps around each phase, and -X importtime of the CLI's imports.
    The flat table adds up to the process's wall time."""
    print(f"[phases] rlhfkit dpo, {args.phase_steps} steps, timed phase by phase ...", flush=True)
    run_dir = os.path.join(args.workdir, "runs", "phases-rlhfkit-dpo")
    spec = {"worker": "run-rlhfkit", "trainer": "dpo", "variant": "base", "steps": args.phase_steps,
            "batch_size": args.batch_size, "data_dir": data_dir, "phases": True, "threads": args.threads,
            "ppo_new_tokens": args.ppo_new_tokens, "ppo_prompt_tokens": args.ppo_prompt_tokens}
    r = run_child(args.rlhfkit_python, spec, run_dir, args)
    if r["rc"]:
        return {"failed": r.get("error_tail", "")[-1500:]}
    steps = summarize_steps(r.get("step_times", []), args.warmup)
    marks, wall = r["marks"], r["wall_s"]  # [name, start, end] in seconds since the worker's first line
    cmd = next(m for m in marks if m[0] == CMD)
    flat = [("interpreter start (exec to the worker's first line)", r["spawn_s"]),
            ("imports (rlhfkit CLI, grpc, torch, transformers, the trainer modules)", cmd[1])]
    leaves = sorted((m for m in marks if m[0] in LEAVES and cmd[1] <= m[1] <= cmd[2]), key=lambda m: m[1])
    t, other, count = cmd[1], 0.0, {}
    for name, a, b in leaves:
        if a < t:  # nested in the previous leaf (does not happen for the leaves chosen)
            continue
        other += a - t
        count[name] = count.get(name, 0) + 1
        flat.append((name if name not in ("model from_pretrained", "tokenizer from_pretrained")
                     else f"{name} #{count[name]}", b - a))
        t = b
    other += cmd[2] - t
    flat.append(("other inside the command (parsing, config, between phases)", other))
    flat.append(("after the command (writing this bench's result)", r["t_atexit"] - cmd[2]))
    flat.append(("interpreter exit (finalization after atexit: freeing modules and tensors)",
                 wall - r["spawn_s"] - r["t_atexit"]))
    table = {k: round(v, 2) for k, v in flat}
    loop = sum(v for k, v in flat if k.startswith("training loop"))
    detail = {name: round(b - a, 3) for name, a, b in marks if name.startswith("publish:")}
    # imports, module by module
    imp_run = subprocess.run([args.rlhfkit_python, "-X", "importtime", "-c",
                              "import rlhfkit.clients.cli; from rlhfkit.training.cli import build_parser; build_parser()"],
                             cwd="/tmp", env=child_env(args), capture_output=True, text=True)
    imports = parse_importtime(imp_run.stderr)
    print(f"[phases] wall {wall} s, loop {loop:.1f} s, outside the loop {wall - loop:.1f} s:", flush=True)
    for k, v in table.items():
        print(f"    {v:8.2f}  {k}", flush=True)
    return {"steps": args.phase_steps, "records": args.phase_steps * args.batch_size, "wall_s": wall,
            "peak_rss_mb": r["peak_rss_mb"], "loop_s_reported_by_trainer": r.get("loop_s"),
            "s_per_step": steps["s_per_step"], "outside_loop_s": round(wall - loop, 2), "seconds": table,
            "publish_detail_s": detail, "marks": marks, "imports_cumulative_s": imports}


def parse_importtime(stderr: str) -> dict:
    """Top-level imports by cumulative import time (seconds), from `python -X importtime`."""
    out = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum_us, raw = line[len("import time:"):].split("|", 2)
        name = raw.strip()
        if len(raw) - len(raw.lstrip(" ")) == 1:  # depth 0: imported by the program itself
            out[name] = out.get(name, 0) + int(cum_us) / 1e6
    top = dict(sorted(((k, round(v, 3)) for k, v in out.items()), key=lambda kv: -kv[1])[:12])
    return {"total": round(sum(out.values()), 3), "top": top}


# ============================================================================ workers

def worker_main(args) -> int:
    spec = json.load(open(args.spec))
    if args.worker == "plot":
        return plot_results(args.spec)
    result = {"t0": T0}
    import atexit

    def at_exit():  # registered first, so it runs last of the atexit handlers
        with open("result.json") as f:
            r = json.load(f)
        r["t_atexit"] = time.time() - T0
        with open("result.json", "w") as f:
            json.dump(r, f, default=str)

    atexit.register(at_exit)
    try:
        if args.worker == "prepare":
            result.update(prepare(spec))
        elif args.worker == "run-rlhfkit":
            result.update(run_rlhfkit(spec))
        elif args.worker == "run-trl":
            result.update(run_trl(spec))
        else:
            raise SystemExit(f"unknown worker {args.worker}")
    finally:
        result["t_main_returned"] = time.time() - T0
        import resource
        result["ru_maxrss_self_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        with open("result.json", "w") as f:
            json.dump(result, f, default=str)
    return 0


# ---------------------------------------------------------------- data and checkpoints

_CONS = "b c d f g h j k l m n p r s t v w z br ch cl dr fl gr kr pl pr sh st th tr".split()
_VOWELS = "a e i o u ai ea ou io".split()
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "nd", "st"]


def pseudo_lexicon(n: int, rng) -> list[str]:
    words, seen = [], set()
    while len(words) < n:
        w = "".join(rng.choice(_CONS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 4)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def prepare(spec: dict) -> dict:
    """A byte-level BPE tokenizer with exactly spec['vocab'] entries (trained on a generated corpus of
    pseudo-words and the bundled task's texts), the policy and reward checkpoints (random weights),
    and the JSONL files: prompts and responses padded with pseudo-text to the token lengths asked."""
    import random

    import torch
    from rlhfkit.training import task
    from rlhfkit.training.data import write_jsonl
    from rlhfkit.training.tiny import make_tiny_checkpoint, train_tokenizer

    out = spec["data_dir"]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)
    lexicon = pseudo_lexicon(40000, rng)
    weights = [1.0 / (i + 1) ** 1.05 for i in range(len(lexicon))]

    def words(k):
        return rng.choices(lexicon, weights=weights, k=k)

    corpus = [" ".join(words(rng.randint(8, 24))) for _ in range(60000)] + task.all_task_texts(4000)
    tok = train_tokenizer(corpus, vocab_size=spec["vocab"])
    if len(tok) != spec["vocab"]:  # the corpus ran out of merges: pad with unused tokens
        tok.add_tokens([f"<extra_{i}>" for i in range(spec["vocab"] - len(tok))])
    assert len(tok) == spec["vocab"], len(tok)

    def n_tokens(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def grow(head: str, target: int, sep=" ") -> str:
        """`head` followed by pseudo-words until it is `target` tokens (or one over)."""
        text = head
        while n_tokens(text) < target:
            text += sep + " ".join(words(max(1, (target - n_tokens(text)) // 2)))
            sep = " "
        return text

    P, C = spec["prompt_tokens"], spec["completion_tokens"]
    n = max(spec["n_records"], spec["n_phase_records"])

    def long_prompt(prompt, target):  # context first, the task's instruction (ending "\nanswer:") last
        return grow("context:", target - n_tokens("\n" + prompt)) + "\n" + prompt

    sft = [{"prompt": long_prompt(r["prompt"], P), "completion": grow(r["completion"], C - 1)}  # + EOS
           for r in task.sft_records(n, seed=1)]
    prefs = [{"prompt": long_prompt(r["prompt"], P), "chosen": grow(r["chosen"], C - 1), "rejected": grow(r["rejected"], C - 1)}
             for r in task.preference_records(n, seed=2)]
    prompts = [{"prompt": long_prompt(r["prompt"], spec["ppo_prompt_tokens"])} for r in task.prompt_records(n, seed=3)]
    files = {}
    for name, recs in (("sft", sft), ("prefs", prefs), ("prompts", prompts)):
        # the benchmarked runs read exactly steps x batch records; the phase run its own count
        files[name] = str(write_jsonl(os.path.join(out, f"{name}.jsonl"), recs[:spec["n_records"]]))
        files[name + "_phases"] = str(write_jsonl(os.path.join(out, f"{name}_phases.jsonl"), recs[:spec["n_phase_records"]]))
    shape = dict(hidden_size=spec["hidden"], num_layers=spec["layers"], num_heads=spec["heads"],
                 num_kv_heads=spec["heads"], intermediate_size=spec["intermediate"], max_position_embeddings=512)
    policy = make_tiny_checkpoint(os.path.join(out, "policy"), "policy", tokenizer=tok, seed=0, **shape)
    reward = make_tiny_checkpoint(os.path.join(out, "reward"), "reward", tokenizer=tok, seed=1, **shape)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    n_policy = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).parameters())
    n_reward = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(reward, dtype=torch.float32).parameters())

    def stats(xs):
        return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}

    lengths = {
        "sft_prompt+completion+eos": stats([n_tokens(r["prompt"]) + n_tokens(r["completion"]) + 1 for r in sft]),
        "pref_prompt+response+eos": stats([n_tokens(r["prompt"]) + n_tokens(r[k]) + 1 for r in prefs for k in ("chosen", "rejected")]),
        "ppo_prompt": stats([n_tokens(r["prompt"]) for r in prompts]),
        "ppo_new_tokens": spec["ppo_new_tokens"],
    }
    return {"policy_params": n_policy, "reward_params": n_reward, "vocab_size": len(tok), "lengths": lengths,
            "records": {"benchmark_runs": spec["n_records"], "phase_run": spec["n_phase_records"]}, "files": files,
            "config": AutoConfig.from_pretrained(policy).to_diff_dict()}


# ---------------------------------------------------------------- timing hooks shared by both sides

_STEP_TIMES: list[float] = []


def install_step_hook():
    """Timestamp every optimizer step (torch's global post-step hook: rlhfkit's AdamW and TRL's
    accelerate-wrapped optimizer alike)."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *a, **k: _STEP_TIMES.append(time.time()))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))


def files_of(spec: dict) -> dict:
    d = spec["data_dir"]
    suffix = "_phases" if spec.get("phases") else ""
    return {k: os.path.join(d, f"{k}{suffix}.jsonl") for k in ("sft", "prefs", "prompts")} | {
        "policy": os.path.join(d, "policy"), "reward": os.path.join(d, "reward")}


# ---------------------------------------------------------------- rlhfkit side

CMD = "rlhfkit train (the whole command)"
LEAVES = ("tokenizer from_pretrained", "read the JSONL", "tokenize the pairs", "model from_pretrained",
          "reference log-probs of every pair (before training)", "optimizer (AdamW constructor)",
          "training loop (optimizer made to the last optimizer step)", "metrics plot (matplotlib import + curves.png)",
          "fingerprint the data file", "publish the checkpoint (save, fsync, rename)")


def run_rlhfkit(spec: dict) -> dict:
    """`rlhfkit train <stage> ...` in this process, through the console script's own main."""
    import contextlib
    import io

    marks: list = []
    phases = bool(spec.get("phases"))
    from rlhfkit.clients.cli import main as rlhfkit_main  # what the `rlhfkit` console script runs

    install_step_hook()
    f, n, bs, trainer = files_of(spec), spec["steps"], spec["batch_size"], spec["trainer"]
    out_dir = os.path.abspath("out")
    common = ["--output-dir", out_dir, "--overwrite", "--device", "cpu", "--no-progress", "--log-dir", os.path.abspath("log")]
    if trainer == "sft":
        argv = ["sft", "--model", f["policy"], "--train-file", f["sft"], "--batch-size", str(bs), "--max-steps", str(n)]
    elif trainer == "rm":
        argv = ["rm", "--model", f["policy"], "--train-file", f["prefs"], "--batch-size", str(bs), "--max-steps", str(n)]
    elif trainer == "dpo":
        argv = ["dpo", "--model", f["policy"], "--train-file", f["prefs"], "--batch-size", str(bs), "--max-steps", str(n)]
    elif trainer == "grpo":  # TRL's GRPO step: batch_size completions, num_generations=2, one optimizer step
        argv = ["grpo", "--model", f["policy"], "--reward-model", f["reward"], "--prompts-file", f["prompts"],
                "--num-iterations", str(n), "--prompts-per-iteration", str(bs // 2), "--num-generations", "2",
                "--ppo-epochs", "1", "--kl-coef", "0.05", "--max-new-tokens", str(spec["ppo_new_tokens"]),
                "--max-prompt-length", str(spec["ppo_prompt_tokens"])]
    else:
        argv = ["ppo", "--model", f["policy"], "--reward-model", f["reward"], "--prompts-file", f["prompts"],
                "--num-iterations", str(n), "--rollout-batch-size", str(bs), "--minibatch-size", str(bs),
                "--ppo-epochs", "1", "--max-new-tokens", str(spec["ppo_new_tokens"]),
                "--max-prompt-length", str(spec["ppo_prompt_tokens"])]
    argv = ["train", *argv, *common, *VARIANTS[spec["variant"]][1]]
    loop_start = []
    if phases:
        instrument_rlhfkit(marks, loop_start)
    buf = io.StringIO()
    t = time.time()
    with contextlib.redirect_stdout(buf):
        rc = rlhfkit_main(argv)
    mark(marks, CMD, t)
    text = buf.getvalue()
    sys.stdout.write(text)
    metrics = json.loads(text[text.index("{"):]) if "{" in text else {}
    if rc:
        raise SystemExit(rc)
    result = {"step_times": list(_STEP_TIMES), "loop_s": metrics.get("seconds"), "argv": argv, "trainer_metrics": metrics}
    if phases:
        if _STEP_TIMES and loop_start:
            mark(marks, LEAVES[6], loop_start[0], _STEP_TIMES[-1])
        result["marks"] = marks
    return result


def mark(marks, name, start, end=None):
    """Record a phase: [name, start, end] in seconds since T0."""
    end = time.time() if end is None else end
    marks.append([name, round(start - T0, 4), round(end - T0, 4)])


def instrument_rlhfkit(marks, loop_start):
    """Wrap the phases of a training run with timestamps, wherever the installed rlhfkit has them
    (names it lacks are reported as not found, so the instrumentation survives a refactor)."""
    import functools
    import importlib

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t = time.time()
            try:
                return fn(*a, **k)
            finally:
                mark(marks, name, t)
        return wrapper

    def timed_classmethod(cls, attr, name):
        orig = getattr(cls, attr).__func__
        setattr(cls, attr, classmethod(timed(name, orig)))

    timed_classmethod(PreTrainedModel, "from_pretrained", "model from_pretrained")
    timed_classmethod(PreTrainedTokenizerBase, "from_pretrained", "tokenizer from_pretrained")
    PreTrainedModel.save_pretrained = timed("publish: model save_pretrained", PreTrainedModel.save_pretrained)
    PreTrainedTokenizerBase.save_pretrained = timed("publish: tokenizer save_pretrained",
                                                    PreTrainedTokenizerBase.save_pretrained)
    targets = [  # before and after the trainer refactor of issue 13 (training/skeleton.py)
        ("rlhfkit.training.dpo", "read_jsonl", LEAVES[1]),
        ("rlhfkit.training.dpo", "tokenize_pairs", LEAVES[2]),
        ("rlhfkit.training.dpo", "add_reference_logps", LEAVES[4]),
        ("rlhfkit.training.dpo", "publish_checkpoint", LEAVES[9]),
        ("rlhfkit.training.skeleton", "publish_checkpoint", LEAVES[9]),
        ("rlhfkit.training.checkpoint", "_fsync_tree", "publish: fsync the files"),
        ("rlhfkit.training.dpo", "fingerprint_files", LEAVES[8]),
        ("rlhfkit.training.data", "fingerprint_files", LEAVES[8]),
        ("rlhfkit.training.common", "MetricsLog.close", LEAVES[7]),
    ]
    found = set()
    for module_name, attr, name in targets:
        try:
            module = importlib.import_module(module_name)
            owner, _, leaf = attr.rpartition(".")
            obj = getattr(module, owner) if owner else module
            setattr(obj, leaf, timed(name, getattr(obj, leaf)))
            found.add(name)
        except (ImportError, AttributeError):
            pass
    for name in LEAVES:
        if name not in found and name not in (LEAVES[0], LEAVES[3], LEAVES[5], LEAVES[6]):
            marks.append([f"(not instrumented: {name})", 0, 0])
    # The optimizer is made just before the loop (both before and after the refactor): the loop
    # starts when the last optimizer's constructor returns.
    orig_init = torch.optim.Optimizer.__init__

    def optimizer_init(self, *a, **k):
        t = time.time()
        orig_init(self, *a, **k)
        mark(marks, LEAVES[5], t)
        loop_start[:] = [time.time()]

    torch.optim.Optimizer.__init__ = optimizer_init


# ---------------------------------------------------------------- TRL side

def run_trl(spec: dict) -> dict:
    """The same work through TRL's trainers, written as a TRL user writes it."""
    install_step_hook()
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    f, n, bs, trainer, variant = files_of(spec), spec["steps"], spec["batch_size"], spec["trainer"], spec["variant"]
    common = dict(output_dir=os.path.abspath("out"), per_device_train_batch_size=bs, max_steps=n, use_cpu=True,
                  bf16=False, fp16=False, gradient_checkpointing=(variant == "gc"), report_to="none",
                  save_strategy="no", seed=0, dataloader_num_workers=0)
    peft_config = None
    if variant == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="SEQ_CLS" if trainer == "rm" else "CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(f["policy"])
    if trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(f["policy"], dtype=torch.float32)
        data = load_dataset("json", data_files=f["sft"], split="train")
        t = SFTTrainer(model=model, args=SFTConfig(**common, max_length=256, learning_rate=1e-4),
                       train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    elif trainer == "rm":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(f["policy"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        data = load_dataset("json", data_files=f["prefs"], split="train")
        t = RewardTrainer(model=model, args=RewardConfig(**common, max_length=256, learning_rate=5e-5),
                          train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    elif trainer == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(f["policy"], dtype=torch.float32)
        data = load_dataset("json", data_files=f["prefs"], split="train")
        t = DPOTrainer(model=model, args=DPOConfig(**common, max_length=256, learning_rate=5e-6, beta=0.1),
                       train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    else:
        from trl import GRPOConfig, GRPOTrainer

        model = AutoModelForCausalLM.from_pretrained(f["policy"], dtype=torch.float32)
        data = load_dataset("json", data_files=f["prompts"], split="train")
        reward_model = AutoModelForSequenceClassification.from_pretrained(f["reward"], num_labels=1, dtype=torch.float32)
        reward_tok = AutoTokenizer.from_pretrained(f["reward"])
        args = GRPOConfig(**common, learning_rate=1e-6, num_generations=2, max_completion_length=spec["ppo_new_tokens"],
                          temperature=1.0, beta=0.05)
        t = GRPOTrainer(model=model, reward_funcs=reward_model, args=args, train_dataset=data,
                        processing_class=tokenizer, reward_processing_classes=reward_tok, peft_config=peft_config)
    out = t.train()
    t.save_model(os.path.abspath("out"))
    return {"step_times": list(_STEP_TIMES), "loop_s": round(out.metrics.get("train_runtime", 0.0), 2),
            "trainer_metrics": out.metrics}


# ---------------------------------------------------------------- plot

def plot_results(path: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.load(open(path))
    rows = [r for r in res["rows"] if "s_per_step" in r]
    for r in rows:  # files written before the minima were recorded
        r.setdefault("s_per_step_min", r["s_per_step"])
        r.setdefault("wall_s_min", r["wall_s"])
    trainers = [t for t in TRAINERS if any(r["trainer"] == t for r in rows)]
    series = list(dict.fromkeys((r["side"], r["variant"]) for r in rows))
    colors = {("rlhfkit", "base"): "#1f77b4", ("trl", "base"): "#ff7f0e", ("rlhfkit", "lora"): "#2ca02c",
              ("rlhfkit", "gc"): "#9467bd", ("rlhfkit", "lora-gc"): "#17becf", ("trl", "lora"): "#bcbd22",
              ("trl", "gc"): "#8c564b"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(1, len(series))
    # time: the best repeat (load from other processes on a shared machine only adds time); memory: the median
    for ax, key, label in zip(axes, ("s_per_step_min", "peak_rss_mb", "wall_s_min"),
                              ("seconds per step (PPO: per iteration), best repeat", "peak RSS (GB), median of repeats",
                               "whole-process wall time (s), best repeat")):
        scale = 1 / 1024 if key == "peak_rss_mb" else 1
        for j, s in enumerate(series):
            xs, ys = [], []
            for i, t in enumerate(trainers):
                r = next((r for r in rows if (r["side"], r["variant"]) == s and r["trainer"] == t), None)
                if r and r.get(key) is not None:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ys.append(r[key] * scale)
            bars = ax.bar(xs, ys, width, label=f"{s[0]}" + ("" if s[1] == "base" else f" {s[1]}"),
                          color=colors.get(s, None))
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(trainers)))
        ax.set_xticklabels([t.upper() + (" (TRL: GRPO)" if t == "ppo" else "") for t in trainers])
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    p = res["model"]["policy_params"]
    fig.suptitle(f"rlhfkit vs TRL {res['trl_env'].get('trl')}: {p / 1e6:.1f}M-param Llama, vocab {res['model']['vocab_size']}, "
                 f"batch {res['settings']['batch_size']}, ~160 tokens, fp32, {res['threads']} threads, {res['cpu']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=90)
    return 0


if __name__ == "__main__":
    sys.exit(main())

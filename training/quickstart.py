"""`rlhfkit quickstart --out DIR`: InstructGPT's three steps on the bundled task, from
nothing, on a laptop CPU.

    task data + a tokenizer + a small Llama trained from scratch
      -> SFT on the careless demonstrators' answers
      -> the annotators rank K samples of the SFT policy per prompt -> reward model
      -> --algo: PPO (per-token KL penalty to the SFT policy), GRPO or RLOO against the
         reward model, or DPO on the preference pairs
      -> held-out evaluation: the annotators' win rate of the policy over SFT, the reward
         model's pairwise accuracy, KL(policy || SFT)
      -> DIR/report.md, DIR/report.png, DIR/report.json

DIR/store is a model store as the server reads it (ARCHITECTURE.md, Checkpoints):
`rlhfkit serve --store DIR/store` serves the trained policy, the SFT reference and the RM.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from . import task
from .common import cpu_model, pick_device
from .critic_free import GRPOConfig, RLOOConfig, train_grpo, train_rloo
from .data import read_jsonl, write_jsonl
from .dpo import DPOConfig, train_dpo
from .loop import LabelConfig, gold_utility, label_policy_samples, mean_kl, win_rate
from .ppo import PPOConfig, train_ppo
from .rm import RMConfig, train_rm
from .sft import SFTConfig, train_sft


ALGO_NAMES = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO"}


@dataclass
class QuickstartConfig:
    """SFT -> reward model -> PPO, GRPO, RLOO or DPO (--algo) on the bundled task with a small model trained from
    scratch, then the annotators' win rate of the policy over SFT on held-out prompts, in a report (markdown, PNG, JSON)."""

    out: str = field(metadata={"help": "output directory: data/, store/ (checkpoints), runs/ (curves), report.*"})
    model: str | None = field(default=None, metadata={"help": "policy to start from (default: a small Llama from scratch, tokenizer included)"})
    hidden_size: int = field(default=128, metadata={"help": "width of the model from scratch"})
    num_layers: int = field(default=4, metadata={"help": "depth of the model from scratch"})
    n_sft: int = field(default=2000, metadata={"help": "demonstrations (a fifth of them with a mistake)"})
    chatter_rate: float = field(default=0.6, metadata={"help": "fraction of demonstrations wrapped in chatter the annotators dislike"})
    sft_steps: int = field(default=600, metadata={"help": "SFT steps"})
    sft_learning_rate: float = field(default=2e-3, metadata={"help": "SFT peak learning rate"})
    n_prompts: int = field(default=6000, metadata={"help": "prompts whose SFT samples the annotators rank, and the RL prompts (6000 rather than 1500: RM accuracy 0.71-0.73 -> 0.74-0.76 and RLOO's win rate +2 to +5 points on seeds 0-2, about +40 s)"})
    k: int = field(default=4, metadata={"help": "SFT samples ranked per prompt (InstructGPT: 4 to 9)"})
    n_pairs: int = field(default=4000, metadata={"help": "synthetic preference pairs mixed into the RM data (4000 rather than 2000: +0.3 to +1.1 points of win rate on 3 paired chat runs, +30 s)"})
    rm_epochs: float = field(default=2.0, metadata={"help": "reward model epochs"})
    rm_learning_rate: float = field(default=3e-4, metadata={"help": "reward model peak learning rate"})
    algo: Literal["ppo", "grpo", "rloo", "dpo"] = field(default="rloo", metadata={"help": "the third step: PPO, GRPO or RLOO against the reward model, or DPO on the preference pairs"})
    ppo_iterations: int = field(default=500, metadata={"help": "PPO iterations"})
    ppo_learning_rate: float = field(default=1e-4, metadata={"help": "PPO learning rate"})
    kl_coef: float = field(default=0.35, metadata={"help": "PPO's per-token KL penalty (0.05 over-optimised the reward model: 60-65% win rate on the chat path, 70-71% on text; 0.35: 72-75% on both, seeds 0-3)"})
    critic_free_iterations: int = field(default=500, metadata={"help": "GRPO / RLOO iterations (batch_size responses each: batch_size / num_generations prompts)"})
    critic_free_learning_rate: float = field(default=1e-4, metadata={"help": "GRPO / RLOO learning rate"})
    critic_free_kl_coef: float = field(default=0.2, metadata={"help": "GRPO / RLOO per-token KL penalty in the reward (k1; RLOO, seeds 0-2: 0.35 -> 72.3 / 71.9 / 75.6%, 0.2 -> 74.0 / 72.1 / 75.1%, 0.5 -> 69.2% on seed 0)"})
    num_generations: int = field(default=4, metadata={"help": "GRPO / RLOO samples per prompt"})
    rl_evals: int = field(default=10, metadata={"help": "held-out evaluations during the RL run (reward, KL, gold utility: the over-optimisation curves; the best is published)"})
    batch_size: int = field(default=32, metadata={"help": "batch size of every stage (PPO: prompts per rollout)"})
    n_eval: int = field(default=200, metadata={"help": "held-out prompts of the evaluation"})
    eval_samples: int = field(default=4, metadata={"help": "sampled response pairs per held-out prompt for the win rate"})
    annotator_temperature: float = field(default=0.1, metadata={"help": "annotator noise: P(a > b) = sigmoid((u_a - u_b) / T)"})
    format: Literal["chat", "text"] = field(default="chat", metadata={"help": "chat: the task as conversations through the model's chat template (ChatML for the model from scratch), the path a chat model takes; text: plain prompt/completion strings"})
    dpo: bool = field(default=False, metadata={"help": "also train a DPO policy from the SFT one and judge it the same way"})
    seed: int = field(default=0, metadata={"help": "seed of the data, the model and every run"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        for name in ("n_sft", "sft_steps", "n_prompts", "ppo_iterations", "critic_free_iterations", "batch_size", "n_eval",
                     "eval_samples", "rl_evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.chatter_rate <= 1.0:
            raise ValueError(f"chatter_rate must be in [0, 1], got {self.chatter_rate}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 to rank, got {self.k}")
        if self.algo in ("grpo", "rloo") and (self.num_generations < 2 or self.batch_size % self.num_generations):
            raise ValueError(f"num_generations must be >= 2 and divide batch_size ({self.batch_size}), got "
                             f"{self.num_generations}")


def run_quickstart(config: QuickstartConfig) -> dict:
    c, started = config, time.time()
    out = Path(c.out)
    store, runs, data = out / "store", out / "runs", out / "data"
    device = str(pick_device(c.device))
    files = {k: str(v) for k, v in task.write_task_data(data, n_sft=c.n_sft, n_pairs=c.n_pairs, n_rankings=100,
                                                         n_prompts=c.n_prompts, n_eval=c.n_eval, seed=c.seed,
                                                         chatter_rate=c.chatter_rate, data_format=c.format).items()}
    eval_prompts = [r["prompt"] for r in read_jsonl(files["prompts_eval"], "prompts")]
    base = c.model
    if base is None:
        from .tiny import add_chat_template, make_tiny_checkpoint, sample_corpus, train_tokenizer

        tokenizer = train_tokenizer(sample_corpus() + task.all_task_texts(2000))
        if c.format == "chat":  # ChatML with its own end-of-turn token, as a chat model's tokenizer has
            add_chat_template(tokenizer)
        base = str(make_tiny_checkpoint(out / "base", tokenizer=tokenizer, seed=c.seed, hidden_size=c.hidden_size,
                                        num_layers=c.num_layers))
    common = dict(batch_size=c.batch_size, seed=c.seed, device=c.device, progress=c.progress, overwrite=True)
    algo = c.algo
    checkpoints = {name: str(store / f"{name}-1") for name in ("sft", "rm", algo)}
    seconds: dict[str, float] = {}
    stage_start = time.time()

    def stage(name: str):
        nonlocal stage_start
        seconds[name] = round(time.time() - stage_start, 1)
        stage_start = time.time()
        print(f"[quickstart] {name} done in {seconds[name]:.0f}s", flush=True)

    sft_metrics = train_sft(SFTConfig(model=base, train_file=files["sft"], eval_file=files["sft_eval"],
                                      output_dir=checkpoints["sft"], max_steps=c.sft_steps,
                                      learning_rate=c.sft_learning_rate, log_every=25, log_dir=str(runs / "sft-1"),
                                      **common))
    stage("sft")

    # Labeling (InstructGPT): the annotators rank K samples of the SFT policy per prompt, so
    # the RM learns on what PPO will visit; the task's synthetic pairs are mixed in as
    # rankings of two. Held out: noiseless rankings of SFT samples for other prompts.
    label = dict(policy=checkpoints["sft"], k=c.k, seed=c.seed, device=c.device)
    label_policy_samples(LabelConfig(prompts_file=files["prompts"], output_file=str(data / "sft_rankings.jsonl"),
                                     annotator_temperature=c.annotator_temperature, **label))
    label_policy_samples(LabelConfig(prompts_file=files["prompts_eval"], annotator_temperature=0.0,
                                     output_file=str(data / "sft_rankings_eval.jsonl"), **label))
    rm_train = write_jsonl(data / "rm_train.jsonl", read_jsonl(data / "sft_rankings.jsonl", "rankings")
                           + [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]}
                              for r in read_jsonl(files["preferences"], "preferences")])
    rm_metrics = train_rm(RMConfig(model=checkpoints["sft"], train_file=str(rm_train),
                                   eval_file=str(data / "sft_rankings_eval.jsonl"), data_format="rankings",
                                   sft_file=files["sft_eval"], output_dir=checkpoints["rm"], num_epochs=c.rm_epochs,
                                   learning_rate=c.rm_learning_rate, log_every=10, log_dir=str(runs / "rm-1"), **common))
    stage("rm")

    metrics: dict = {}
    if algo != "dpo":
        train, config = rl_stage(c, algo, store, files, runs)
        metrics = train(config)

    def dpo_stage() -> dict:
        checkpoints["dpo"] = str(store / "dpo-1")
        return train_dpo(DPOConfig(model=checkpoints["sft"], train_file=files["preferences"],
                                   eval_file=files["preferences_eval"], output_dir=checkpoints["dpo"], num_epochs=1.0,
                                   log_every=10, log_dir=str(runs / "dpo-1"), **common))

    if algo == "dpo":
        metrics = dpo_stage()
    stage(algo)
    if c.dpo and algo != "dpo":
        dpo_stage()
        stage("dpo")

    # Pin the roles (a DPO policy, published last, would otherwise take the policy role) and
    # serve the DPO policy by name beside them, for side-by-side comparisons.
    roles = {"policy": f"{algo}-1", "reference": "sft-1", "reward": "rm-1",
             "serve": ["dpo-1"] if c.dpo and algo != "dpo" else []}
    (store / "roles.json").write_text(json.dumps(roles, indent=2) + "\n")

    # Held-out evaluation: sampled at temperature 1, the distribution the RL algorithms optimise.
    judge = dict(prompts=eval_prompts, samples_per_prompt=c.eval_samples,
                 annotator_temperature=c.annotator_temperature, seed=c.seed + 1, device=device)
    names = [algo] + (["dpo"] if c.dpo and algo != "dpo" else [])
    versus_sft = {name: win_rate(checkpoints[name], checkpoints["sft"], **judge) for name in names}
    # Sampled utilities come from the win-rate samples; SFT's are the baseline's of any comparison.
    sampled = {"sft": versus_sft[algo]["utility_baseline"], **{n: r["utility_policy"] for n, r in versus_sft.items()}}
    gold = {name: {"greedy": gold_utility(checkpoints[name], eval_prompts, 0.0, device=device), "sampled": u}
            for name, u in sampled.items()}
    kl = mean_kl(checkpoints[algo], checkpoints["sft"], eval_prompts, seed=c.seed + 2, device=device)
    stage("evaluation")

    report = {
        "algo": algo,
        "win_rate_vs_sft": versus_sft[algo]["win_rate"],
        f"win_rate_{algo}_vs_sft": versus_sft[algo]["win_rate"],
        "rm_pairwise_accuracy": rm_metrics.get("eval_accuracy"),
        "mean_kl": kl,
        "elapsed_seconds": round(time.time() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "checkpoints": checkpoints,
        "comparisons_vs_sft": versus_sft,
        "gold_utility": gold,
        "stage_seconds": seconds,
        "selected_iteration": metrics.get("selected_iteration"),
        "metrics": {"sft": sft_metrics, "rm": rm_metrics, algo: metrics},
        "config": asdict(c),
        "device": device,
        "cpu": cpu_model(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot_report(runs, report, out / "report.png")
    (out / "report.md").write_text(report_markdown(report, out))
    print(f"[quickstart] {ALGO_NAMES[algo]} preferred over SFT {100 * report['win_rate_vs_sft']:.1f}% of the time; "
          f"RM accuracy {report['rm_pairwise_accuracy']:.3f}; KL({ALGO_NAMES[algo]}||SFT) {kl:.2f} nats; "
          f"{report['elapsed_seconds']:.0f}s. Report: {out / 'report.md'}\n"
          f"Serve it: rlhfkit serve --store {store}", flush=True)
    return {k: report[k] for k in ("algo", "win_rate_vs_sft", f"win_rate_{algo}_vs_sft", "rm_pairwise_accuracy",
                                   "mean_kl", "elapsed_seconds", "peak_rss_mib", "checkpoints")}


def rl_stage(c: QuickstartConfig, algo: str, store: Path, files: dict, runs: Path, output_dir: Path | None = None):
    """(train function, config) of the quickstart's RL stage, from store/sft-1 and store/rm-1
    (bench/rl_quickstart.py runs the same stage in processes of its own)."""
    common = dict(model=str(store / "sft-1"), reward_model=str(store / "rm-1"), prompts_file=files["prompts"],
                  eval_prompts_file=files["prompts_select"], output_dir=str(output_dir or store / f"{algo}-1"),
                  max_new_tokens=16, log_dir=str(runs / f"{algo}-1"), seed=c.seed, device=c.device,
                  progress=c.progress, overwrite=True)
    if algo == "ppo":
        return train_ppo, PPOConfig(num_iterations=c.ppo_iterations, rollout_batch_size=c.batch_size,
                                    minibatch_size=max(1, c.batch_size // 2), learning_rate=c.ppo_learning_rate,
                                    kl_coef=c.kl_coef, eval_every=max(1, c.ppo_iterations // c.rl_evals), **common)
    config_cls, train = (GRPOConfig, train_grpo) if algo == "grpo" else (RLOOConfig, train_rloo)
    # The KL goes in the reward for both (as PPO's): in GRPO's loss, k3 at beta 0.1 let the
    # policy game the reward model (KL 4.7 nats, gold utility 0.77 -> 0.59), at 0.5 it held
    # the policy back (KL 0.8, 64.5% win rate); in the reward at 0.35, 71.2% (seed 0).
    return train, config_cls(num_iterations=c.critic_free_iterations, num_generations=c.num_generations,
                             prompts_per_iteration=c.batch_size // c.num_generations,
                             minibatch_size=c.num_generations * max(1, c.batch_size // c.num_generations // 2),
                             learning_rate=c.critic_free_learning_rate, kl_coef=c.critic_free_kl_coef, kl_in="reward",
                             kl_estimator="k1", eval_every=max(1, c.critic_free_iterations // c.rl_evals), **common)


def plot_report(runs: Path, report: dict, path: Path) -> Path:
    """One figure of the three runs' curves, read back from their metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows(run: str) -> list[dict]:
        lines = (runs / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    algo, name = report["algo"], ALGO_NAMES[report["algo"]]
    run = f"{algo}-1"
    if algo == "dpo":
        third = [("DPO: loss", run, ["loss", "eval_loss"]), ("DPO: preference accuracy", run, ["accuracy", "eval_accuracy"])]
    else:
        score = "score" if algo == "ppo" else "reward"
        third = [(f"{name}: reward-model score, gold utility (held out)", run, [score, "eval_score", "eval_task_utility"]),
                 (f"{name}: KL to SFT per response (nats)", run, ["kl", "eval_kl"])]
    panels = [("SFT: loss", "sft-1", ["loss", "eval_loss"]),
              ("reward model: pairwise accuracy", "rm-1", ["accuracy", "eval_accuracy"]), *third]
    curves = algo != "dpo"  # Gao et al.'s over-optimisation curves: held-out score and gold utility against KL
    fig, axes = plt.subplots(2, 3 if curves else 2, figsize=(15 if curves else 10, 6.5))
    for ax, (title, run_name, keys) in zip(axes.T.flat if curves else axes.flat, panels):
        data = rows(run_name)
        for key in keys:
            points = [(r["step"], r[key]) for r in data if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 5 else None, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if curves:
        evals = [r for r in rows(run) if isinstance(r.get("eval_kl"), (int, float))]
        selected = report.get("selected_iteration")
        for ax, key, label in ((axes[0, 2], "eval_score", "reward-model score"),
                               (axes[1, 2], "eval_task_utility", "gold utility")):
            points = [(r["eval_kl"], r[key], r["step"]) for r in evals if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
                for kl, value, step in points:
                    if step == selected:
                        ax.scatter([kl], [value], s=120, facecolors="none", edgecolors="red", label="published")
            ax.set_title(f"{name}: held-out {label} against KL to SFT", fontsize=9)
            ax.set_xlabel("KL(policy || SFT) per response (nats)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"quickstart: {name} preferred over SFT {100 * report['win_rate_vs_sft']:.1f}% "
                 f"(held-out prompts, simulated annotators)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report_markdown(report: dict, out: Path) -> str:
    algo, name = report["algo"], ALGO_NAMES[report["algo"]]
    result = report["comparisons_vs_sft"][algo]
    third = {"ppo": "PPO against the reward model", "grpo": "GRPO against the reward model",
             "rloo": "RLOO against the reward model", "dpo": "DPO on the preference pairs"}[algo]
    selected = (f" The published {name} policy is the held-out evaluation's best (reward − KL penalty) at "
                f"iteration {report['selected_iteration']}." if report.get("selected_iteration") is not None else "")
    lines = [
        "# rlhfkit quickstart",
        "",
        f"SFT -> reward model -> {third} on the bundled task (training/task.py), with a small Llama trained from "
        "scratch; simulated annotators stand in for people. Evaluated on held-out prompts, responses sampled at "
        "temperature 1." + selected,
        "",
        "| measure | value |",
        "|---|---|",
        f"| win rate of {name} over SFT (annotators' expected vote) | {100 * report['win_rate_vs_sft']:.1f}% |",
        f"| noiseless pairs: {name} better / tie / SFT better | {result['wins']} / {result['ties']} / {result['losses']} |",
        f"| responses wrapped in chatter: SFT / {name} | {100 * result['chatty_baseline']:.0f}% / {100 * result['chatty_policy']:.0f}% |",
        f"| reward model pairwise accuracy (held-out SFT samples, noiseless labels) | {report['rm_pairwise_accuracy']:.3f} |",
        f"| KL({name} ‖ SFT) per response | {report['mean_kl']:.3f} nats |",
        f"| elapsed | {report['elapsed_seconds']:.0f} s on {report['device']} ({report['cpu']}), peak RSS "
        f"{report['peak_rss_mib']:.0f} MiB |",
        "",
        "Gold utility (the annotators' hidden score, 0 to 1) of each policy on the held-out prompts:",
        "",
        "| policy | greedy | sampled |",
        "|---|---|---|",
        *[f"| {name} | {g['greedy']:.3f} | {g['sampled']:.3f} |" for name, g in report["gold_utility"].items()],
        "",
        "![training curves](report.png)",
        "",
        "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()) + ".",
        "",
        "Checkpoints:",
        "",
        *[f"- {name}: `{path}`" for name, path in report["checkpoints"].items()],
        "",
        f"Serve them (store/roles.json gives the {name} policy the policy role, SFT the reference, the RM the reward):",
        "",
        "```bash",
        f"rlhfkit serve --store {out / 'store'}",
        *(["echo '[{\"role\": \"user\", \"content\": \"sort the numbers: 7 3 9 1\"}]' | "
           "rlhfkit generate --messages - --temperature 1 --seed 0", "rlhfkit chat"]
          if report["config"]["format"] == "chat" else
          ["rlhfkit generate $'sort the numbers: 7 3 9 1\\nanswer:' --temperature 1 --seed 0"]),
        "```",
        "",
    ]
    return "\n".join(lines)

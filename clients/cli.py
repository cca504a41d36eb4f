"""The `rlhfkit` command line.

Client commands (generate, score, compare, models) talk to a running server and need only
grpc; `serve`, `train`, `quickstart` and `init-demo` import the server or the training
module when run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from rlhfkit.clients.client import Client, score_request
from rlhfkit.v1 import models_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _client_args(p: argparse.ArgumentParser):
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default: {DEFAULT_ADDRESS})")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds for the call")
    p.add_argument("--json", action="store_true", help="print the full response as JSON (machine-readable)")
    p.add_argument("--model", default="", help="model name or role (default: the role's model)")


def _print_json(msg):
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def cmd_generate(args) -> int:
    kwargs = dict(model=args.model, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed, max_new_tokens=args.max_new_tokens, n=args.n, stop=args.stop or (),
                  logprobs=args.logprobs, ignore_eos=args.ignore_eos)
    with Client(args.address, timeout=args.timeout) as client:
        if args.stream:
            for chunk in client.generate_stream(args.prompt, **kwargs):
                if args.json:
                    print(json.dumps(MessageToDict(chunk, preserving_proto_field_name=True)), flush=True)
                else:
                    print(chunk.text, end="", flush=True)
            if not args.json:
                print()
            return 0
        resp = client.generate(args.prompt, **kwargs)
    if args.json:
        _print_json(resp)
    else:
        for c in resp.completions:
            if len(resp.completions) > 1:
                print(f"--- completion {c.index}")
            print(c.text)
    return 0


def cmd_score(args) -> int:
    with Client(args.address, timeout=args.timeout) as client:
        resp = client.reward.Score(score_request([(args.prompt, r) for r in args.responses], args.model),
                                   timeout=args.timeout)
    if args.json:
        _print_json(resp)
    else:
        for r, text in zip(resp.rewards, args.responses):
            print(f"{r:+.4f}\t{text}")
    return 0


def cmd_compare(args) -> int:
    with Client(args.address, timeout=args.timeout) as client:
        resp = client.compare(args.prompt, args.response_a, args.response_b, model=args.model)
    if args.json:
        _print_json(resp)
    else:
        print(f"P(a preferred) = {resp.prob_a_preferred:.4f}  (r_a={resp.reward_a:+.4f}, r_b={resp.reward_b:+.4f})")
    return 0


def _print_models(models, as_json: bool):
    if as_json:
        print(json.dumps([MessageToDict(m, preserving_proto_field_name=True) for m in models], indent=2))
        return
    for m in models:
        roles = ",".join(m.roles) or "-"
        print(f"{m.name:16s} {roles:18s} {m.version:28s} {m.stage or '-':4s} {m.num_parameters:>12,d} params  {m.path}")


def cmd_models(args) -> int:
    if args.action == "promote":
        if not args.name or not args.role:
            sys.exit("rlhfkit models promote: give the checkpoint NAME and --role policy|reference|reward")
        if args.store:  # edit the store on disk; running servers pick it up at their next reload check
            from rlhfkit.server.store import ModelStore, StoreError

            try:
                ModelStore(args.store).set_role(args.name, args.role)
            except (KeyError, StoreError, FileNotFoundError) as e:
                sys.exit(f"rlhfkit models promote: {e.args[0] if isinstance(e, KeyError) else e}")
            print(f"{args.store}: {args.role} -> {args.name}")
            return 0
        with Client(args.address, timeout=args.timeout) as client:
            _print_models(client.set_role(args.name, args.role), args.json)
        return 0
    with Client(args.address, timeout=args.timeout) as client:
        resp = client.models.ListModels(models_pb2.ListModelsRequest(),
                                        timeout=args.timeout)
    _print_models(resp.models, args.json)
    for f in resp.load_failures:
        print(f"load failure: {f.name} ({f.path}) at {f.failed_at}: {f.error}", file=sys.stderr)
    return 0


def cmd_feedback(args) -> int:
    if args.action == "leaderboard":
        with Client(args.address, timeout=args.timeout) as client:
            board = client.leaderboard(args.bootstrap_rounds)
        if args.json:
            _print_json(board)
            return 0
        print(f"{board.num_battles} battles ({board.num_votes} votes)")
        print(f"{'model':24s} {'Bradley-Terry':>14s} {'95% CI':>17s} {'Elo':>8s} {'battles':>8s}  W/L/T/BB")
        for r in board.ratings:
            print(f"{r.model:24s} {r.bradley_terry:14.1f} {r.bradley_terry_lower:8.1f}..{r.bradley_terry_upper:<7.1f} "
                  f"{r.elo:8.1f} {r.battles:8d}  {r.wins}/{r.losses}/{r.ties}/{r.both_bad}")
        return 0
    # export reads the store directly: no server needed (several replicas may share it).
    from rlhfkit.server.feedback import FeedbackStore, export_records

    if not args.feedback_db:
        sys.exit("rlhfkit feedback export: give --feedback-db sqlite:///PATH or postgresql://...")
    store = FeedbackStore(args.feedback_db)
    try:
        records = export_records(store.voted_comparisons(), args.format)
    finally:
        store.close()
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if args.out:
            out.close()
    print(f"rlhfkit feedback export: {len(records)} {args.format} records"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def cmd_init_demo(args) -> int:
    from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

    tok = train_tokenizer(sample_corpus())
    policy = make_tiny_checkpoint(f"{args.out}/policy", "policy", tok, seed=args.seed)
    reward = make_tiny_checkpoint(f"{args.out}/reward", "reward", tok, seed=args.seed + 1)
    print(f"random-weight demo models (they babble; train real ones with `rlhfkit train`):\n"
          f"  policy: {policy}\n  reward: {reward}\n"
          f"serve them with: rlhfkit serve --policy {policy} --reward {reward}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfkit",
        description="Serve and improve an RLHF-trained language model. "
                    "Start a server with `rlhfkit serve`, then call it with generate / score / compare / models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # serve and train build their own parsers (from their config dataclasses) when run, so the
    # client commands never import torch.
    sub.add_parser("serve", help="serve a policy and a reward model over gRPC (`rlhfkit serve --help`)",
                   add_help=False)
    p = sub.add_parser("generate", help="generate text from a running server",
                       description="Generate from a running server. Temperature 0 (the default) is greedy.")
    p.add_argument("prompt", help="prompt text")
    _client_args(p)
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 is greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help=">= 0; 0 disables top-k (default: 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    p.add_argument("--n", type=int, default=1, help="completions for the prompt, 1..16 (default: 1)")
    p.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    p.add_argument("--logprobs", type=int, default=0, help="top alternatives per token to return, 0..20")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="score responses with the served reward model",
                       description="Reward of each RESPONSE to PROMPT (the model reads prompt + response).")
    p.add_argument("prompt")
    p.add_argument("responses", nargs="+", metavar="RESPONSE")
    _client_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("compare", help="P(response a preferred over b) from the reward model")
    p.add_argument("prompt")
    p.add_argument("response_a")
    p.add_argument("response_b")
    _client_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("models", help="list the served models, or promote a checkpoint to a role",
                       description="`rlhfkit models` lists what a server serves (roles, versions, lineage, load "
                                   "failures). `rlhfkit models promote NAME --role policy` points a role at a store "
                                   "checkpoint: through the server (--address), or on disk (--store DIR).")
    p.add_argument("action", nargs="?", choices=["list", "promote"], default="list")
    p.add_argument("name", nargs="?", help="checkpoint name in the store (promote)")
    p.add_argument("--role", choices=["policy", "reference", "reward"], help="role to give NAME (promote)")
    p.add_argument("--store", help="model store directory to edit directly instead of asking a server")
    _client_args(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("feedback", help="export A/B votes as training data, or show the leaderboard",
                       description="`rlhfkit feedback export --feedback-db URL --format trl --out prefs.jsonl` writes "
                                   "the votes of a feedback store as {prompt, chosen, rejected} lines (TRL; ties and "
                                   "both-bad votes left out) or --format rankings {prompt, responses: [best, worst]}, "
                                   "ready for `rlhfkit train rm --train-file`. `rlhfkit feedback leaderboard` asks a "
                                   "server for its ratings.")
    p.add_argument("action", choices=["export", "leaderboard"])
    p.add_argument("--feedback-db", help="store to export: sqlite:///PATH or postgresql://... (export)")
    p.add_argument("--format", choices=["trl", "rankings"], default="trl", help="export format (default: trl)")
    p.add_argument("--out", help="output JSONL file (default: stdout)")
    p.add_argument("--bootstrap-rounds", type=int, default=0, help="leaderboard: bootstrap rounds (0: server default)")
    _client_args(p)
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("init-demo", help="write a random-weight tiny policy and reward model to serve",
                       description="Write a tiny Llama policy and reward model with random weights and a tokenizer "
                                   "trained on the spot (no download). For trying the server, not for quality.")
    p.add_argument("--out", default="demo", help="output directory (default: demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_demo)

    sub.add_parser("train", help="train SFT / reward model / PPO / DPO checkpoints (`rlhfkit train --help`)",
                   add_help=False)
    sub.add_parser("quickstart", help="SFT -> reward model -> PPO on the bundled task from scratch, evaluated, "
                   "with a report (`rlhfkit quickstart --help`)", add_help=False)
    return parser


def configure_openmp_wait():
    """Let OpenMP worker threads spin briefly between kernels, then sleep.

    A decode step is hundreds of small kernels back to back: with OMP_WAIT_POLICY=PASSIVE
    the workers sleep after each and waking them doubled a CPU step's time (bench/serve.py:
    1-stream inter-token latency 12.8 -> 6.2 ms, 64-stream throughput +10%). Spinning for
    libgomp's default long count instead starves the gRPC threads of an idle server's cores.
    Read when torch loads OpenMP, hence before the import; the user's own settings win.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "30000")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("serve", "train", "quickstart"):
        try:
            if argv[0] == "serve":
                configure_openmp_wait()
                from rlhfkit.server.app import main as command_main
            elif argv[0] == "train":
                from rlhfkit.training.cli import main as command_main
            else:
                from rlhfkit.training.cli import quickstart_main as command_main
        except ImportError as e:  # a client-only install lacks torch / transformers
            sys.exit(f"rlhfkit {argv[0]} needs the full install (torch, transformers): {e}")
        return command_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except grpc.RpcError as e:
        sys.exit(f"rlhfkit {args.command}: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    sys.exit(main())

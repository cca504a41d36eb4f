"""The `rlhfkit` command line.

Client commands (generate, score, compare, chat, models, feedback leaderboard and
annotators) talk to a running server and need only grpc; each takes the server's token
(--token / RLHFKIT_TOKEN) and TLS files (--tls-ca, --tls-cert, --tls-key). `tokens` edits a
server's tokens file; `serve`, `train`, `quickstart` and `init-demo` import the server or the
training module when run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from rlhfkit.chat import ChatFormatError, as_messages
from rlhfkit.clients.client import TOKEN_ENV, Client, read_pem, resolve_token, score_request
from rlhfkit.v1 import generation_pb2, models_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"


ACCESS_HELP = f"""access:
  A server started with --auth-tokens FILE wants a token on every call: set {TOKEN_ENV}
  (or give --token TOKEN; a token on the command line is visible to other local users,
  e.g. in `ps`). UNAUTHENTICATED means no token or one the server does not know;
  PERMISSION_DENIED means the token's role lacks the right (client < annotator < admin):
  ask the server's admin for a token (`rlhfkit tokens add NAME --role ROLE --file FILE`).
  A server started with --tls-cert/--tls-key speaks TLS only: give --tls-ca FILE (the CA
  that signed its certificate), and with --tls-client-ca (mutual TLS) also --tls-cert FILE
  --tls-key FILE, your client certificate and key."""


def _client_args(p: argparse.ArgumentParser, json_help: str = "print the full response as JSON (machine-readable)"):
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default: {DEFAULT_ADDRESS})")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds for the call")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--model", default="", help="model name or role (default: the role's model)")
    access = p.add_argument_group("access (a server with --auth-tokens, --tls-cert)")
    access.add_argument("--token", default=None,
                        help=f"bearer token for a server with --auth-tokens (default: the {TOKEN_ENV} environment "
                             "variable; prefer it: a token on the command line is visible to other local users)")
    access.add_argument("--tls-ca", metavar="FILE", help="PEM CA certificate that signed the server's certificate: "
                                                         "connect over TLS and trust it")
    access.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate, for a server with --tls-client-ca "
                                                           "(mutual TLS; with --tls-key)")
    access.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    access.add_argument("--tls", action="store_true", help="connect over TLS, checking the server's certificate "
                                                           "against gRPC's default root CAs (implied by --tls-ca)")
    p.set_defaults(parser=p)


def connect(args) -> Client:
    """The Client of a command's --address, --timeout, --token and --tls-* options; a file
    that cannot be read, or a half-given client certificate, is an argparse error naming it."""
    try:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ValueError("give --tls-cert FILE and --tls-key FILE together (your client certificate and its key)")
        try:
            token = resolve_token(args.token)
        except ValueError as e:
            source = "--token" if args.token is not None else TOKEN_ENV
            raise ValueError(f"{source}: {e}") from None
        return Client(args.address, timeout=args.timeout, token=token or "",
                      tls_ca=read_pem(args.tls_ca, "--tls-ca"), tls_cert=read_pem(args.tls_cert, "--tls-cert"),
                      tls_key=read_pem(args.tls_key, "--tls-key"), tls=args.tls)
    except ValueError as e:
        args.parser.error(str(e))


ACCESS_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def error_advice(args, error: grpc.RpcError) -> str:
    """What to do about an access or connection error ("" for the others)."""
    code = error.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if getattr(args, "token", None) is None and not os.environ.get(TOKEN_ENV, "").strip():
            return (f"the server wants a token: set {TOKEN_ENV}=TOKEN (or give --token TOKEN); ask the server's admin "
                    "for one (`rlhfkit tokens add NAME --role ROLE --file FILE`)")
        source = "--token" if getattr(args, "token", None) is not None else TOKEN_ENV
        return (f"the server does not accept the token of {source} (a typo, or it was removed from the server's "
                "tokens file): ask the server's admin for a valid one")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ("your token's role lacks this right (client < annotator < admin): ask the server's admin for a token "
                "with a role that has it")
    if code == grpc.StatusCode.UNAVAILABLE:
        address = getattr(args, "address", DEFAULT_ADDRESS)
        if getattr(args, "tls_ca", None) or getattr(args, "tls", False):
            return (f"is `rlhfkit serve` running at {address} with TLS, with a certificate signed by the CA you gave "
                    "(--tls-ca) and naming this host? With --tls-client-ca it also needs --tls-cert/--tls-key")
        return (f"is `rlhfkit serve` running at {address}? A server with --tls-cert needs --tls-ca FILE "
                "(and --tls-cert/--tls-key with mutual TLS)")
    return ""


def _sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 is greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help=">= 0; 0 disables top-k (default: 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    p.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")


def _print_json(msg):
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2))


MESSAGES_HELP = ("a JSON file holding the conversation, a list of {\"role\": \"system\"|\"user\"|\"assistant\", "
                 "\"content\": TEXT} messages (`-`: read it from stdin); the server renders it with the model's "
                 "chat template. Instead of PROMPT")


JSON_TYPES = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_messages(path: str) -> list[dict]:
    """The conversation in a --messages file (or stdin for `-`); ValueError naming the file."""
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise ValueError(f"--messages {name}: cannot read it: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--messages {name}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"--messages {name}: expected a JSON list of {{\"role\", \"content\"}} messages, "
                         f"got a JSON {JSON_TYPES.get(type(data), type(data).__name__)}")
    for i, m in enumerate(data):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"--messages {name}: messages[{i}] must be an object with exactly the keys \"role\" "
                             f"and \"content\", got {json.dumps(m)[:80]}")
    try:
        return as_messages(data)
    except ChatFormatError as e:
        raise ValueError(f"--messages {name}: {e}") from None


def messages_arg(args) -> list[dict]:
    """The conversation of --messages FILE; a bad file is an argparse error naming it."""
    try:
        return read_messages(args.messages)
    except ValueError as e:
        args.parser.error(str(e))


def prompt_or_messages(args):
    """The prompt of generate: PROMPT or --messages FILE, exactly one (argparse errors otherwise)."""
    if (args.prompt is None) == (args.messages is None):
        args.parser.error("give a PROMPT or --messages FILE, not both" if args.prompt is not None
                          else "give a PROMPT (text) or --messages FILE (a conversation)")
    return args.prompt if args.messages is None else messages_arg(args)


def split_positionals(args, texts: list[str], names: list[str], at_least: bool = False):
    """(prompt, responses) from score's / compare's positionals: the first is PROMPT unless
    --messages FILE gives the prompt, in which case all of them are responses."""
    if args.messages is not None:
        prompt, rest = messages_arg(args), texts
    else:
        prompt, rest = (texts[0] if texts else None), texts[1:]
    wanted = len(names)
    if (len(rest) < wanted) if at_least else (len(rest) != wanted):
        what = " ".join(names) + (" ..." if at_least else "")
        if args.messages is not None:
            args.parser.error(f"with --messages FILE, give {what} only (the file is the prompt), got "
                              f"{len(texts)} argument(s)")
        args.parser.error(f"give PROMPT {what}, or --messages FILE {what}")
    return prompt, rest


def sampling_kwargs(args) -> dict:
    return dict(model=args.model, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, max_new_tokens=args.max_new_tokens, stop=args.stop or ())


def cmd_generate(args) -> int:
    prompt = prompt_or_messages(args)
    kwargs = dict(sampling_kwargs(args), n=args.n, logprobs=args.logprobs, ignore_eos=args.ignore_eos)
    with connect(args) as client:
        if args.stream:
            for chunk in client.generate_stream(prompt, **kwargs):
                if args.json:
                    print(json.dumps(MessageToDict(chunk, preserving_proto_field_name=True)), flush=True)
                else:
                    print(chunk.text, end="", flush=True)
            if not args.json:
                print()
            return 0
        resp = client.generate(prompt, **kwargs)
    if args.json:
        _print_json(resp)
    else:
        for c in resp.completions:
            if len(resp.completions) > 1:
                print(f"--- completion {c.index}")
            print(c.text)
    return 0


def cmd_score(args) -> int:
    prompt, responses = split_positionals(args, args.texts, ["RESPONSE"], at_least=True)
    with connect(args) as client:
        resp = client.reward.Score(score_request([(prompt, r) for r in responses], args.model),
                                   timeout=args.timeout)
    if args.json:
        _print_json(resp)
    else:
        for r, text in zip(resp.rewards, responses):
            print(f"{r:+.4f}\t{text}")
    return 0


def cmd_compare(args) -> int:
    prompt, (response_a, response_b) = split_positionals(args, args.texts, ["RESPONSE_A", "RESPONSE_B"])
    with connect(args) as client:
        resp = client.compare(prompt, response_a, response_b, model=args.model)
    if args.json:
        _print_json(resp)
    else:
        print(f"P(a preferred) = {resp.prob_a_preferred:.4f}  (r_a={resp.reward_a:+.4f}, r_b={resp.reward_b:+.4f})")
    return 0


CHAT_COMMANDS = """commands:
  /system TEXT   set the system prompt (it starts every conversation; `/system` alone removes it)
  /reset         forget the conversation (the system prompt stays)
  /history       print the conversation so far as JSON
  /help          this list
  /exit          quit (so does end of input, Ctrl-D)
Ctrl-C while a reply streams stops that reply (the turn is not kept)."""


def cmd_chat(args) -> int:
    """A multi-turn chat: each user line is sent with the whole conversation so far
    (GenerateStream with messages); the streamed reply joins the history. Replies go to
    stdout, everything else (prompts, notices, errors) to stderr."""
    interactive = sys.stdin.isatty()
    system = args.system
    history: list[dict] = []
    kwargs = sampling_kwargs(args)

    def note(text: str):
        print(text, file=sys.stderr, flush=True)

    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        note(f"rlhfkit chat with {args.model or 'the policy'} at {args.address}; /help lists the commands")
    with connect(args) as client:
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                break
            if not line.strip():
                continue
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command in ("/exit", "/quit"):
                    break
                if command == "/reset":
                    history = []
                    note("(conversation cleared" + (", system prompt kept)" if system else ")"))
                elif command == "/system":
                    system = rest.strip() or None
                    note(f"(system prompt: {system})" if system else "(no system prompt)")
                elif command == "/history":
                    note(json.dumps(([{"role": "system", "content": system}] if system else []) + history,
                                    ensure_ascii=False, indent=2))
                elif command == "/help":
                    note(CHAT_COMMANDS)
                else:
                    note(f"unknown command {command}; /help lists the commands")
                continue
            user = {"role": "user", "content": line}
            messages = ([{"role": "system", "content": system}] if system else []) + history + [user]
            reply, finish, version = "", 0, ""
            call = client.generate_stream(messages=messages, **kwargs)
            try:
                for chunk in call:
                    reply += chunk.text
                    finish = chunk.finish_reason or finish
                    version = chunk.model_version or version
                    if not args.json:
                        print(chunk.text, end="", flush=True)
            except grpc.RpcError as e:
                if not args.json and reply:
                    print(flush=True)
                if e.code() in ACCESS_CODES:
                    raise  # the next turn would be refused the same way: main says what to do
                note(f"error: {e.code().name}: {e.details()}")
                continue  # the turn is not kept: the next line continues from the history before it
            except KeyboardInterrupt:
                call.cancel()
                if not args.json:
                    print(flush=True)
                note("(reply stopped; the turn is not kept)")
                continue
            if args.json:
                print(json.dumps({"role": "assistant", "content": reply, "model_version": version,
                                  "finish_reason": generation_pb2.FinishReason.Name(finish)}, ensure_ascii=False),
                      flush=True)
            else:
                print(flush=True)
            if interactive and finish == generation_pb2.FINISH_REASON_LENGTH:
                note(f"(cut at --max-new-tokens {args.max_new_tokens})")
            history += [user, {"role": "assistant", "content": reply}]
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
        with connect(args) as client:
            _print_models(client.set_role(args.name, args.role), args.json)
        return 0
    with connect(args) as client:
        resp = client.models.ListModels(models_pb2.ListModelsRequest(),
                                        timeout=args.timeout)
    _print_models(resp.models, args.json)
    for f in resp.load_failures:
        print(f"load failure: {f.name} ({f.path}) at {f.failed_at}: {f.error}", file=sys.stderr)
    return 0


# The feedback options that apply to some actions only: given to another, they are an error
# rather than silently ignored.
FEEDBACK_OPTIONS = {"feedback_db": ("--feedback-db", ("export", "annotators")),
                    "min_agreement": ("--min-agreement", ("export",)), "out": ("--out", ("export",)),
                    "prior_sd": ("--prior-sd", ("leaderboard",)), "png": ("--png", ("leaderboard",)),
                    "days": ("--days", ("annotators",))}


def check_feedback_args(args):
    for dest, (flag, actions) in FEEDBACK_OPTIONS.items():
        if getattr(args, dest) is not None and args.action not in actions:
            args.parser.error(f"{flag} applies to `feedback {'/'.join(actions)}`, not `feedback {args.action}`")
    if args.style_features and args.action != "export":
        args.parser.error(f"--style-features applies to `feedback export`, not `feedback {args.action}`")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        args.parser.error(f"--min-agreement must be in [0, 1] (a share of votes agreeing with the majority), "
                          f"got {args.min_agreement}")
    from rlhfkit.server.ratings import PRIOR_SD_RANGE

    if args.prior_sd is not None and not (PRIOR_SD_RANGE[0] <= args.prior_sd <= PRIOR_SD_RANGE[1]):
        args.parser.error(f"--prior-sd must be in [{PRIOR_SD_RANGE[0]:g}, {PRIOR_SD_RANGE[1]:g}] Elo points (the "
                          f"prior's standard deviation), got {args.prior_sd}")
    from rlhfkit.server.agreement import MAX_DAYS

    if args.days is not None and not 1 <= args.days <= MAX_DAYS:
        args.parser.error(f"--days must be in [1, {MAX_DAYS}], got {args.days}")
    if args.bootstrap_rounds < 0:
        args.parser.error(f"--bootstrap-rounds must be >= 0 (0: the server's default), got {args.bootstrap_rounds}")


def _share(value: float, n: int, present: bool) -> str:
    return f"{value:6.1%} ({n})" if present else "-"


def print_annotators(report, days: int, source: str):
    cap = report.max_votes_per_annotator_per_day
    cap_text = f"cap {cap} votes per annotator per UTC day" if cap else (
        "no cap" if source == "server" else "cap unknown (read from the store)")
    print(f"{len(report.annotators)} annotators, {report.num_votes} votes; {cap_text}")
    if not report.annotators:
        return
    width = max(9, *(len(a.annotator) for a in report.annotators))
    print(f"{'annotator':{width}s} {'votes':>6s} {'today':>6s} {'with majority (n)':>18s} "
          f"{'with reward model (n)':>22s}")
    for a in report.annotators:
        majority = _share(a.agreement_with_majority, a.majority_comparisons, a.HasField("agreement_with_majority"))
        reward = _share(a.agreement_with_reward_model, a.reward_comparisons, a.HasField("agreement_with_reward_model"))
        print(f"{a.annotator:{width}s} {a.votes:6d} {a.votes_today:6d} {majority:>18s} {reward:>22s}")
    if report.pairs:
        print("\nCohen's kappa of each pair (over the comparisons both voted on):")
        w = max(len(p.annotator_a) + len(p.annotator_b) + 3 for p in report.pairs)
        for p in report.pairs:
            pair = f"{p.annotator_a} / {p.annotator_b}"
            print(f"  {pair:{w}s} {p.cohen_kappa:7.3f}  ({p.shared_comparisons} shared)")
    if report.HasField("fleiss_kappa"):
        print(f"\nFleiss' kappa {report.fleiss_kappa:.3f} over {report.fleiss_comparisons} comparisons with "
              f"{report.fleiss_raters} annotators each")
    print(f"\nvotes per UTC day, last {days} days:")
    for a in report.annotators:
        print(f"  {a.annotator:{width}s} " + (", ".join(f"{d.day} {d.votes}" for d in a.daily) or "-"))


def cmd_feedback(args) -> int:
    check_feedback_args(args)
    if args.action == "leaderboard":
        with connect(args) as client:
            board = client.leaderboard(args.bootstrap_rounds, prior_sd=args.prior_sd)
        if args.png:
            from rlhfkit.clients.plots import leaderboard_png

            print(f"rlhfkit feedback leaderboard: wrote {leaderboard_png(board, args.png)}", file=sys.stderr)
        if args.json:
            _print_json(board)
            return 0
        print(f"{board.num_battles} battles ({board.num_votes} votes)")
        print(f"{'model':24s} {'Bradley-Terry':>14s} {'95% CI':>17s} {'style-ctrl':>11s} {'95% CI':>17s} {'Elo':>8s} "
              f"{'battles':>8s}  W/L/T/BB")
        for r in board.ratings:
            print(f"{r.model:24s} {r.bradley_terry:14.1f} {r.bradley_terry_lower:8.1f}..{r.bradley_terry_upper:<7.1f} "
                  f"{r.style_controlled:11.1f} {r.style_controlled_lower:8.1f}..{r.style_controlled_upper:<7.1f} "
                  f"{r.elo:8.1f} {r.battles:8d}  {r.wins}/{r.losses}/{r.ties}/{r.both_bad}")
        return 0
    days = args.days or 14
    if args.action == "annotators" and not args.feedback_db:
        with connect(args) as client:
            report = client.annotators(days)
        if args.json:
            _print_json(report)
        else:
            print_annotators(report, days, "server")
        return 0
    # The store read directly: no server needed (several replicas may share it).
    from rlhfkit.server.agreement import annotator_report, filter_by_agreement
    from rlhfkit.server.feedback import FeedbackStore, export_records

    if not args.feedback_db:
        sys.exit("rlhfkit feedback export: give --feedback-db sqlite:///PATH or postgresql://...")
    store = FeedbackStore(args.feedback_db)
    try:
        rows = store.voted_comparisons()
    finally:
        store.close()
    if args.action == "annotators":
        report = annotator_report(rows, 0, days)  # the server's cap is not in the store
        if args.json:
            _print_json(report)
        else:
            print_annotators(report, days, "store")
        return 0
    if args.min_agreement is not None:
        rows, dropped, unmeasured = filter_by_agreement(rows, args.min_agreement)
        print(f"rlhfkit feedback export: --min-agreement {args.min_agreement:g} dropped {sum(dropped.values())} votes "
              f"of {len(dropped)} annotators" + (f" ({', '.join(sorted(dropped))})" if dropped else "")
              + f"; kept {sum(unmeasured.values())} votes of {len(unmeasured)} annotators with no measure (no "
              "comparison where the others have a strict majority)", file=sys.stderr)
    records = export_records(rows, args.format, style_features=args.style_features)
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


def cmd_tokens(args) -> int:
    from rlhfkit.server.auth import ROLES, add_token, read_tokens_file, remove_token

    where = f"rlhfkit tokens {args.action}"
    if args.action in ("add", "remove") and not args.name:
        args.parser.error(f"give the NAME the token is for: rlhfkit tokens {args.action} NAME --file FILE")
    if args.action == "add" and not args.role:
        args.parser.error(f"give the token's --role ({', '.join(ROLES)})")
    if args.action == "list" and args.name:
        args.parser.error("rlhfkit tokens list takes no NAME (it lists every name and role)")
    if args.action == "add":
        try:
            token = add_token(args.file, args.name, args.role)
        except (OSError, ValueError) as e:
            sys.exit(f"{where}: {e}")
        print(token)
        print(f"{where}: {args.name} ({args.role}) added to {args.file}. The token is shown only now: hand it to "
              f"{args.name} privately (they set {TOKEN_ENV}); a running server picks it up within a second or two.",
              file=sys.stderr)
        return 0
    try:
        if args.action == "remove":
            removed = remove_token(args.file, args.name)
            if not removed:
                sys.exit(f"{where}: {args.file} has no token named {args.name!r}")
            print(f"{where}: removed {removed} token(s) of {args.name} from {args.file}; a running server "
                  "refuses them within a second or two", file=sys.stderr)
            return 0
        entries = list(read_tokens_file(args.file).values())
    except OSError as e:
        sys.exit(f"{where}: {args.file}: {e.strerror or e}")
    except ValueError as e:
        sys.exit(f"{where}: {e}")
    if args.json:  # names and roles only: the tokens themselves are never printed again
        print(json.dumps([{"name": e["name"], "role": e["role"]} for e in entries], indent=2))
    else:
        for e in entries:
            print(f"{e['name']}\t{e['role']}")
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
                    "Start a server with `rlhfkit serve`, then call it with generate / score / compare / chat / "
                    "models.",
        epilog=ACCESS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # serve and train build their own parsers (from their config dataclasses) when run, so the
    # client commands never import torch.
    sub.add_parser("serve", help="serve a policy and a reward model over gRPC (`rlhfkit serve --help`)",
                   add_help=False)
    p = sub.add_parser("generate", help="generate text from a running server",
                       usage="rlhfkit generate (PROMPT | --messages FILE) [options]",
                       description="Generate from a running server, for a PROMPT text or a conversation "
                                   "(--messages FILE: the reply is the assistant's next turn). Temperature 0 "
                                   "(the default) is greedy.")
    p.add_argument("prompt", nargs="?", help="prompt text (or give --messages FILE)")
    p.add_argument("--messages", metavar="FILE", help=MESSAGES_HELP)
    _client_args(p)
    _sampling_args(p)
    p.add_argument("--n", type=int, default=1, help="completions for the prompt, 1..16 (default: 1)")
    p.add_argument("--logprobs", type=int, default=0, help="top alternatives per token to return, 0..20")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.set_defaults(func=cmd_generate, parser=p)

    p = sub.add_parser("score", help="score responses with the served reward model",
                       usage="rlhfkit score (PROMPT | --messages FILE) RESPONSE [RESPONSE ...] [options]",
                       description="Reward of each RESPONSE to PROMPT (the model reads prompt + response). With "
                                   "--messages FILE the prompt is that conversation, every positional argument is "
                                   "a RESPONSE, and the model reads the conversation with the response as the "
                                   "assistant's next turn, rendered with its chat template.")
    p.add_argument("texts", nargs="+", metavar="PROMPT|RESPONSE",
                   help="PROMPT then the responses, or only the responses with --messages")
    p.add_argument("--messages", metavar="FILE", help=MESSAGES_HELP)
    _client_args(p)
    p.set_defaults(func=cmd_score, parser=p)

    p = sub.add_parser("compare", help="P(response a preferred over b) from the reward model",
                       usage="rlhfkit compare (PROMPT | --messages FILE) RESPONSE_A RESPONSE_B [options]",
                       description="P(RESPONSE_A preferred over RESPONSE_B) = sigmoid(r_a - r_b) for PROMPT, or "
                                   "for the conversation in --messages FILE (then give only the two responses).")
    p.add_argument("texts", nargs="+", metavar="PROMPT|RESPONSE",
                   help="PROMPT RESPONSE_A RESPONSE_B, or RESPONSE_A RESPONSE_B with --messages")
    p.add_argument("--messages", metavar="FILE", help=MESSAGES_HELP)
    _client_args(p)
    p.set_defaults(func=cmd_compare, parser=p)

    p = sub.add_parser("chat", help="chat with the served policy, turn by turn (it keeps the conversation)",
                       description="An interactive multi-turn chat with a running server's chat model.\n\n"
                                   "Each line you type is a user turn, sent with the whole conversation so far\n"
                                   "(the server renders it with the model's chat template); the reply streams in\n"
                                   "and joins the conversation. Lines that start with / are commands. Replies go\n"
                                   "to stdout, notices and errors to stderr. A turn the server refuses prints its\n"
                                   "status and message, is not kept, and the chat goes on. Reads lines from stdin,\n"
                                   "so a script can pipe a conversation in:\n\n"
                                   "  printf '/system be brief\\nhello\\n' | rlhfkit chat --max-new-tokens 32",
                       epilog=CHAT_COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    _client_args(p, json_help="print each reply as one JSON line {role, content, model_version, finish_reason} "
                              "instead of streaming its text")
    p.add_argument("--system", default=None, help="system prompt to start with (also: /system TEXT)")
    _sampling_args(p)
    p.set_defaults(func=cmd_chat, parser=p)

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

    p = sub.add_parser("feedback", help="export A/B votes as training data, show the leaderboard, or check the "
                                         "annotators",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""\
actions:
  export       the votes of a feedback store (--feedback-db URL, read directly: no server
               needed) as training data: --format trl writes {prompt, chosen, rejected}
               lines (TRL; ties and both-bad votes left out), --format rankings
               {prompt, responses: [best, worst]}, ready for `rlhfkit train rm --train-file`.
               A comparison made from a conversation is written in TRL's conversational
               form: prompt is the list of messages and each response one assistant
               message ({"prompt": [...], "chosen": [{"role": "assistant", "content": ...}],
               "rejected": [...]}; rankings: responses [[best], [worst]]).
               --min-agreement X (0..1) drops the votes of annotators who agree with the
               majority of the other annotators less than X of the time; those with no
               measure (no comparison where the others have a strict majority) are kept;
               stderr says how many votes of how many annotators of each. --style-features adds each response's style
               covariates (length in characters, markdown headers, list items, bold) as
               chosen_style / rejected_style (rankings: responses_style).
  leaderboard  asks a server (--address) for its ratings: Bradley-Terry and style-controlled
               (length and markdown effects taken out) with 95% intervals, online Elo, and
               battles. --prior-sd ELO sets the Gaussian prior on each rating (server default
               200; smaller pulls models with few battles towards the mean); --png FILE also
               draws the ratings and the win-rate matrix.
  annotators   who votes, how much (in all, today, per UTC day over --days N, default 14),
               and how far they agree: with the majority of the others, with the reward
               model that scored the two responses, pairwise Cohen's kappa and Fleiss' kappa.
               From a server (admin token; shows its --max-votes-per-annotator-per-day), or
               read from a store with --feedback-db URL.""")
    p.add_argument("action", choices=["export", "leaderboard", "annotators"])
    p.add_argument("--feedback-db", help="store to read: sqlite:///PATH or postgresql://... (export; annotators "
                                         "without a server)")
    p.add_argument("--format", choices=["trl", "rankings"], default="trl", help="export format (default: trl)")
    p.add_argument("--out", help="export: output JSONL file (default: stdout)")
    p.add_argument("--min-agreement", type=float, metavar="X", help="export: drop the votes of annotators whose "
                   "agreement with the majority of the others is below X, in [0, 1] (unmeasured ones are kept)")
    p.add_argument("--style-features", action="store_true", help="export: add the style covariates of each "
                                                                 "response (length, headers, lists, bold)")
    p.add_argument("--bootstrap-rounds", type=int, default=0, help="leaderboard: bootstrap rounds (0: server default)")
    p.add_argument("--prior-sd", type=float, metavar="ELO", help="leaderboard: standard deviation of the prior on "
                   "each rating, Elo points > 0 (default: the server's, 200)")
    p.add_argument("--png", metavar="FILE", help="leaderboard: also draw it (ratings with intervals, win-rate matrix) "
                                                 "to this PNG file")
    p.add_argument("--days", type=int, metavar="N", help="annotators: votes per day over the last N UTC days, "
                                                         "1..366 (default: 14)")
    _client_args(p)
    p.set_defaults(func=cmd_feedback)

    from rlhfkit.server.auth import ROLES

    p = sub.add_parser("tokens", help="add, list or remove the bearer tokens of a server's --auth-tokens file",
                       description="Edit the tokens file of `rlhfkit serve --auth-tokens FILE` (a running server "
                                   "re-reads it when it changes). `rlhfkit tokens add NAME --role ROLE --file FILE` "
                                   "makes a random token for NAME, adds it (creating the file, readable by its owner "
                                   "only) and prints it once, on stdout; it is not shown again. `rlhfkit tokens list "
                                   "--file FILE` prints names and roles, never tokens. `rlhfkit tokens remove NAME "
                                   "--file FILE` revokes NAME's tokens. Roles: client (generate, score, log-probs, "
                                   "list models, create comparisons, read the leaderboard), annotator (client + "
                                   "votes, recorded under NAME), admin (everything, including `models promote`).")
    p.add_argument("action", choices=["add", "list", "remove"])
    p.add_argument("name", nargs="?", help="who the token is for, e.g. ann-7 (add, remove); votes are recorded "
                                          "under it")
    p.add_argument("--role", choices=ROLES, help="the token's role (add)")
    p.add_argument("--file", required=True, help="the tokens file (JSON) the server reads with --auth-tokens")
    p.add_argument("--json", action="store_true", help="list: a JSON list of {name, role}")
    p.set_defaults(func=cmd_tokens, parser=p)

    p = sub.add_parser("init-demo", help="write a random-weight tiny policy and reward model to serve",
                       description="Write a tiny Llama policy and reward model with random weights and a tokenizer "
                                   "trained on the spot (no download). For trying the server, not for quality.")
    p.add_argument("--out", default="demo", help="output directory (default: demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_demo)

    sub.add_parser("train", help="train SFT / reward model / PPO / GRPO / RLOO / DPO checkpoints (`rlhfkit train --help`)",
                   add_help=False)
    sub.add_parser("quickstart", help="SFT -> reward model -> RLOO (or --algo ppo|grpo|dpo) on the bundled task "
                   "from scratch, evaluated, "
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
        advice = error_advice(args, e)
        sys.exit(f"rlhfkit {args.command}: {e.code().name}: {e.details()}" + (f"\n  {advice}" if advice else ""))


if __name__ == "__main__":
    sys.exit(main())

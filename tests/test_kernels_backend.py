"""use_backend: which implementation runs, and that it is scoped to the `with` block and thread."""

import os
import threading

import pytest
import torch

from rlhfkit.kernels import logprobs as logprobs_module
from rlhfkit.kernels import logprobs_from_logits, use_backend
from rlhfkit.kernels.backend import current_backend, resolve_backend

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


@needs_interpreter
def test_auto_is_torch_on_cpu_and_forcing_is_scoped():
    cpu = torch.zeros(2)
    assert current_backend() == "auto" and resolve_backend(cpu) == "torch"
    with use_backend("triton"):
        assert resolve_backend(cpu) == "triton"
        with use_backend("torch"):
            assert resolve_backend(cpu) == "torch"
        assert resolve_backend(cpu) == "triton"
    assert current_backend() == "auto"


def test_forcing_does_not_leak_into_other_threads():
    seen = []
    with use_backend("triton"):
        worker = threading.Thread(target=lambda: seen.append(current_backend()))
        worker.start()
        worker.join()
    assert seen == ["auto"]


def test_bad_backend_name():
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        with use_backend("cuda"):
            pass


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_the_forced_path_is_the_one_that_runs(backend, monkeypatch):
    calls = []
    for name in ("_torch_forward", "_triton_forward"):
        original = getattr(logprobs_module, name)
        monkeypatch.setattr(logprobs_module, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    with use_backend(backend):
        logprobs_from_logits(torch.randn(3, 50), torch.tensor([1, 2, 3]))
    assert calls == [f"_{backend}_forward"]


@pytest.mark.skipif(INTERPRETED, reason="only meaningful without the interpreter")
def test_triton_on_cpu_without_interpreter_says_why():
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend(torch.zeros(2))

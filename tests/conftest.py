import logging
import os

import pytest

# Without CUDA the Triton kernels run through Triton's interpreter on CPU tensors. The
# variable must be set before triton is first imported, hence here, at collection start.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


class _DeprecationRecorder(logging.Handler):
    """transformers announces some deprecations through logger.warning_once, not warnings
    (so pyproject's filterwarnings cannot turn them into errors): record those."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "deprecat" in msg.lower():
            self.messages.append(f"{record.name}: {msg}")


_deprecations = _DeprecationRecorder()


def pytest_configure(config):
    # On the library's root logger for the whole session (module fixtures load models before
    # any test starts); each test then fails on what was logged since the previous one.
    logging.getLogger("transformers").addHandler(_deprecations)


@pytest.fixture(autouse=True)
def _no_transformers_deprecations():
    yield
    logged, _deprecations.messages[:] = list(_deprecations.messages), []
    if logged:
        pytest.fail("transformers logged a deprecation (rename the call; see rlhfkit.hf):\n" + "\n".join(logged),
                    pytrace=False)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhfkit.training.tiny import sample_corpus, train_tokenizer

    return train_tokenizer(sample_corpus())


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, tiny_tokenizer):
    """A random-weight Llama causal LM with a tokenizer trained on the spot."""
    from rlhfkit.training.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "policy", "policy", tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, tiny_tokenizer):
    """A random-weight Llama reward model (sequence classification, num_labels=1)."""
    from rlhfkit.training.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "reward", "reward", tiny_tokenizer, seed=1)

